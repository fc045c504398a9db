"""TagMask-Synth pixels: sample a scene layout, then draw it with numpy into an RGB image and exact label maps.

Every shape, texture and part is an implicit function of an object's local coordinates (u, v), where the body
fills about [-1, 1]^2 and parts reach out to about 1.9; drawing evaluates them on the object's bounding box only.
Drawing writes one 2-D float map, the owning layer of each pixel (integer part) plus the weight of that layer's
secondary colour (fraction), and turns it into RGB once at the end (cheaper than painting RGB per object). Later
objects occlude earlier ones, so the class map has occlusion resolved by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ttd.synth.vocabulary import PALETTE, Vocabulary

Arr = np.ndarray
STUFF_TEXTURES = ("fine", "blotchy", "streaks_h", "streaks_v", "ripples", "tiles", "speckle")
_POSITION_RANK = {"top": 0, "any": 1, "bottom": 2}
_W = 0.999  # scale of the weight in the packed layer map: keeps the fraction below 1
_NOISE_BANK_SEED = 20240401  # fixed: the noise bank is part of the renderer, not of any sample


# Scalar draws through Generator.random(): several times cheaper than integers()/uniform()/choice() per call.
def randint(rng: np.random.Generator, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def weighted_index(rng: np.random.Generator, weights: Sequence[float]) -> int:
    total = float(sum(weights))
    x = rng.random() * total
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if x < acc:
            return i
    return len(weights) - 1


class SceneParams(Protocol):
    """The scene fields of SynthConfig (a protocol, so this module does not import the config)."""

    image_size: int
    n_things_min: int
    n_things_max: int
    p_dominant: float
    dominant_size: tuple[float, float]
    other_size: tuple[float, float]
    p_repeat: float
    aspect_jitter: float
    rotation_max_deg: float
    colour_jitter: float
    n_stuff_min: int
    n_stuff_max: int
    noise_std: float


@dataclass(frozen=True)
class Thing:
    """One object instance. Sizes are in pixels; `half` is the body's half-size before the aspect stretch."""

    class_id: int
    cx: float
    cy: float
    half: float
    aspect: float  # sy / sx, area-preserving
    angle: float  # radians
    gain: tuple[float, float, float]  # per-instance colour jitter
    dominant: bool


@dataclass(frozen=True)
class StuffLayout:
    class_ids: tuple[int, ...]  # region r = class_ids[r]; region 0 is on top in a horizontal layout
    angle: float  # orientation of the boundaries (0 = horizontal)
    cuts: tuple[tuple[float, float, float, float], ...]  # per boundary: offset px, amplitude px, cycles, phase


@dataclass(frozen=True)
class Scene:
    stuff: StuffLayout
    things: tuple[Thing, ...]  # back to front
    brightness: float


@dataclass
class Rendered:
    image: Arr  # (S, S, 3) uint8
    class_map: Arr  # (S, S) uint16 class ids
    layer_map: Arr  # (S, S) int16: stuff region r -> r; thing i (z-order) -> n_regions + i
    full_area: list[int]  # per thing: pixels inside the image before occlusion


# ---------------------------------------------------------------- scene layout

def sample_scene(rng: np.random.Generator, vocab: Vocabulary, p: SceneParams) -> Scene:
    S = p.image_size
    n_regions = min(p.n_stuff_min + randint(rng, p.n_stuff_max - p.n_stuff_min + 1), len(vocab.stuff_ids))
    stuff_ids: list[int] = []
    while len(stuff_ids) < n_regions:
        cid = int(vocab.stuff_ids[randint(rng, len(vocab.stuff_ids))])
        if cid not in stuff_ids:
            stuff_ids.append(cid)
    stuff_ids.sort(key=lambda i: _POSITION_RANK[vocab[i].stuff.position])  # sky above grass; stable sort
    vertical = rng.random() < 0.2
    angle = (math.pi / 2 if vertical else 0.0) + uniform(rng, -0.25, 0.25)
    offsets = sorted(uniform(rng, 0.2, 0.8) * S for _ in range(n_regions - 1))
    cuts = tuple((o, uniform(rng, 0.0, 0.06) * S, uniform(rng, 0.5, 2.5), uniform(rng, 0.0, 2 * math.pi))
                 for o in offsets)
    layout = StuffLayout(tuple(stuff_ids), angle, cuts)

    n = p.n_things_min + randint(rng, p.n_things_max - p.n_things_min + 1)
    has_dominant = rng.random() < p.p_dominant
    used: list[int] = []
    things: list[Thing] = []
    for i in range(n):
        if used and rng.random() < p.p_repeat:
            cid = used[randint(rng, len(used))]
        else:
            cid = _new_class(rng, vocab, used)
        used.append(cid)
        dominant = has_dominant and i == 0
        half = uniform(rng, *(p.dominant_size if dominant else p.other_size)) * S / 2
        if dominant:
            cx, cy = S * (0.5 + uniform(rng, -0.1, 0.1)), S * (0.5 + uniform(rng, -0.1, 0.1))
        else:
            cx, cy = _free_spot(rng, S, half, [t for t in things if not t.dominant])
        aspect = math.exp(uniform(rng, -p.aspect_jitter, p.aspect_jitter))
        angle_i = math.radians(uniform(rng, -p.rotation_max_deg, p.rotation_max_deg))
        base = 1.0 + uniform(rng, -p.colour_jitter, p.colour_jitter)
        gain = (base + uniform(rng, -0.04, 0.04), base + uniform(rng, -0.04, 0.04), base + uniform(rng, -0.04, 0.04))
        things.append(Thing(cid, cx, cy, half, aspect, angle_i, gain, dominant))
    # Big things behind small ones (the dominant one first), so occlusion rarely hides a whole object.
    things.sort(key=lambda t: (not t.dominant, -t.half))
    return Scene(layout, tuple(things), uniform(rng, 0.85, 1.12))


def _new_class(rng: np.random.Generator, vocab: Vocabulary, used: list[int]) -> int:
    if len(set(used)) >= len(vocab.thing_ids):
        return used[randint(rng, len(used))]
    while True:
        cid = int(vocab.thing_ids[randint(rng, len(vocab.thing_ids))])
        if cid not in used:
            return cid


def _free_spot(rng: np.random.Generator, S: int, half: float, others: list[Thing]) -> tuple[float, float]:
    """A centre that does not sit on top of another small object (a few tries, then accept overlap)."""
    cx = cy = 0.0
    for _ in range(8):
        cx, cy = S * uniform(rng, 0.08, 0.92), S * uniform(rng, 0.08, 0.92)
        if all(math.hypot(cx - t.cx, cy - t.cy) > 0.8 * (half + t.half) for t in others):
            break
    return cx, cy


# ---------------------------------------------------------------- shapes (body in about [-1, 1]^2)

def _hexagon(u: Arr, v: Arr) -> Arr:
    av = np.abs(v)
    return (av <= 0.87) & (np.abs(u) + av * 0.577 <= 1.0)


def _triangle_up(u: Arr, v: Arr) -> Arr:
    return (v <= 0.8) & (np.abs(u) * 1.8 <= v + 1.0)


def _heart(u: Arr, v: Arr) -> Arr:
    x = u * 1.1
    y = v * -1.1 + 0.25
    q = x * x + y * y - 1.0
    return q * q * q <= x * x * y * y * y


def _annulus(r2: Arr, inner2: float) -> Arr:
    return (r2 <= 1.0) & (r2 >= inner2)


SHAPE_FNS: dict[str, Callable[[Arr, Arr], Arr]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
    "triangle": _triangle_up,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.1,
    "star": lambda u, v: _triangle_up(u, v) | _triangle_up(u, -v),  # hexagram
    "ring": lambda u, v: _annulus(u * u + v * v, 0.36),
    "cross": lambda u, v: ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0)),
    "hexagon": _hexagon,
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.64),
    "ellipse": lambda u, v: u * u + (v * 1.9) ** 2 <= 1.0,
    "heart": _heart,
    "arrow": lambda u, v: ((np.abs(v) <= 0.28) & (u >= -1.0) & (u <= 0.1)) | ((u >= 0.0) & (np.abs(v) <= 1.0 - u)),
    "semicircle": lambda u, v: (u * u + (v + 0.4) ** 2 <= 1.0) & (v >= -0.4),
    "trapezoid": lambda u, v: (np.abs(v) <= 0.7) & (np.abs(u) <= 0.5 + (v + 0.7) * 0.36),
}


# ---------------------------------------------------------------- parts (drawn in the secondary colour)

def _disc(u: Arr, v: Arr, cu: float, cv: float, r: float) -> Arr:
    du = u - cu
    dv = v - cv
    return du * du + dv * dv <= r * r


def _box(u: Arr, v: Arr, u0: float, u1: float, v0: float, v1: float) -> Arr:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _ears(u: Arr, v: Arr) -> Arr:
    band = (v >= -1.55) & (v <= -0.8)
    return band & (np.abs(np.abs(u) - 0.6) <= (v + 1.55) * 0.45)


def _wings(u: Arr, v: Arr) -> Arr:
    au = np.abs(u)
    return (au >= 0.85) & (au <= 1.7) & (np.abs(v + 0.1) <= (1.7 - au) * 0.7)


PART_FNS: dict[str, Callable[[Arr, Arr], Arr]] = {
    "head": lambda u, v: _disc(u, v, 0.0, -1.3, 0.42),
    "wheels": lambda u, v: _disc(u, v, -0.55, 1.15, 0.34) | _disc(u, v, 0.55, 1.15, 0.34),
    "ears": _ears,
    "tail": lambda u, v: _box(u, v, 0.85, 1.7, 0.0, 0.32),
    "legs": lambda u, v: _box(u, v, -0.62, -0.3, 0.8, 1.6) | _box(u, v, 0.3, 0.62, 0.8, 1.6),
    "antenna": lambda u, v: _box(u, v, -0.1, 0.1, -1.55, -0.8) | _disc(u, v, 0.0, -1.6, 0.26),
    "handle": lambda u, v: (u >= 0.85) & _annulus(((u - 1.15) ** 2 + v * v) * (1 / 0.36), 0.28),
    "wings": _wings,
}
# Extent of each shape and part in local coordinates, (u0, u1, v0, v1, radius), measured on a fine grid (a test
# checks them): drawing evaluates only the pixels inside both the rotated box and the circle of that radius.
SHAPE_EXTENT: dict[str, tuple[float, float, float, float, float]] = {
    "circle": (-1.0, 1.0, -1.0, 1.0, 1.0), "square": (-0.85, 0.85, -0.85, 0.85, 1.21),
    "triangle": (-1.0, 1.0, -1.0, 0.8, 1.29), "diamond": (-1.1, 1.1, -1.1, 1.1, 1.1),
    "star": (-1.0, 1.0, -1.0, 1.0, 1.29), "ring": (-1.0, 1.0, -1.0, 1.0, 1.0), "cross": (-1.0, 1.0, -1.0, 1.0, 1.06),
    "hexagon": (-1.0, 1.0, -0.87, 0.87, 1.01), "crescent": (-1.0, 0.61, -1.0, 1.0, 1.0),
    "ellipse": (-1.0, 1.0, -0.53, 0.53, 1.0), "heart": (-1.04, 1.04, -0.9, 1.14, 1.14),
    "arrow": (-1.0, 1.0, -1.0, 1.0, 1.04), "semicircle": (-1.0, 1.0, -0.4, 0.6, 1.08),
    "trapezoid": (-1.01, 1.01, -0.7, 0.7, 1.23),
}
PART_EXTENT: dict[str, tuple[float, float, float, float, float]] = {
    "head": (-0.42, 0.42, -1.72, -0.88, 1.72), "wheels": (-0.89, 0.89, 0.81, 1.49, 1.62),
    "ears": (-0.94, 0.94, -1.55, -0.8, 1.67), "tail": (0.85, 1.7, 0.0, 0.32, 1.73),
    "legs": (-0.62, 0.62, 0.8, 1.6, 1.72), "antenna": (-0.26, 0.26, -1.86, -0.8, 1.86),
    "handle": (0.85, 1.75, -0.6, 0.6, 1.75), "wings": (-1.7, 1.7, -0.7, 0.5, 1.71),
}
_MARGIN = 0.03


def local_extent(shape: str, part: str) -> tuple[float, float, float, float, float]:
    """(u0, u1, v0, v1, radius) holding the body and its part, with a small margin."""
    e = SHAPE_EXTENT[shape]
    if part != "none":
        p = PART_EXTENT[part]
        e = (min(e[0], p[0]), max(e[1], p[1]), min(e[2], p[2]), max(e[3], p[3]), max(e[4], p[4]))
    return (e[0] - _MARGIN, e[1] + _MARGIN, e[2] - _MARGIN, e[3] + _MARGIN, e[4] + _MARGIN)


# ---------------------------------------------------------------- textures: weight of the secondary colour

def _parity(f: Arr) -> Arr:
    """f mod 2 for whole-number floats, without numpy's slow float modulo."""
    return f - 2.0 * np.floor(f * 0.5)


def _erode(mask: Arr, t: int) -> Arr:
    out = mask.copy()
    out[t:, :] &= mask[:-t, :]
    out[:-t, :] &= mask[t:, :]
    out[:, t:] &= mask[:, :-t]
    out[:, :-t] &= mask[:, t:]
    out[:t, :] = False
    out[-t:, :] = False
    out[:, :t] = False
    out[:, -t:] = False
    return out


def texture_weight(name: str, u: Arr, v: Arr, body: Arr, half: float) -> Arr:
    """Secondary-colour weight in [0, 1]. Bands are at least ~2.5 px wide so they survive JPEG at 96 px."""
    k = min(2.0, half / 2.5)
    if name == "outlined":
        return body & ~_erode(body, max(1, round(half * 0.22)))
    if name == "stripes_h":
        return _parity(np.floor(v * k))
    if name == "stripes_v":
        return _parity(np.floor(u * k))
    if name == "stripes_d":
        return _parity(np.floor((u + v) * (k * 0.75)))
    if name == "checker":
        return _parity(np.floor(u * k) + np.floor(v * k))
    if name == "dots":
        fu = u * (k * 1.25)
        fv = v * (k * 1.25)
        fu = fu - np.floor(fu) - 0.5
        fv = fv - np.floor(fv) - 0.5
        return fu * fu + fv * fv <= 0.09
    if name == "gradient":
        return np.clip((v + 1.0) * 0.5, 0.0, 1.0)
    if name == "concentric":
        return _parity(np.floor(np.sqrt(u * u + v * v) * (k * 1.5)))
    if name == "halves":
        return v < 0
    raise ValueError(f"unknown texture {name!r}")


# ---------------------------------------------------------------- drawing

class Renderer:
    """Draws scenes of one vocabulary at one image size; holds colour tables, pixel grids and a noise bank."""

    def __init__(self, vocab: Vocabulary, image_size: int, noise_std: float = 4.0):
        S = image_size
        self.vocab = vocab
        self.S = S
        self.noise_std = noise_std
        self.grid = np.arange(S, dtype=np.float32) + 0.5
        self.centred = self.grid - S / 2
        self._up = _upsampler(6, S)
        # Per-pixel noise is a window of this bank at a per-sample offset: drawing S*S normals per image would
        # cost more than drawing the whole scene.
        self.bank = np.random.default_rng(_NOISE_BANK_SEED).standard_normal((2 * S, 2 * S), dtype=np.float32)
        self._extent = {(c.thing.shape, c.thing.part): local_extent(c.thing.shape, c.thing.part)
                        for c in vocab.classes if c.thing is not None}
        n = vocab.n_classes
        self.rgb1 = np.zeros((n, 3), np.float32)
        self.rgb2 = np.zeros((n, 3), np.float32)
        for c in vocab.classes[1:]:
            if c.thing is not None:
                self.rgb1[c.id], self.rgb2[c.id] = PALETTE[c.thing.primary], PALETTE[c.thing.secondary]
            else:
                self.rgb1[c.id], self.rgb2[c.id] = c.stuff.rgb, c.stuff.rgb2

    def render(self, scene: Scene, rng: np.random.Generator) -> Rendered:
        S = self.S
        oy, ox = randint(rng, S), randint(rng, S)
        noise = self.bank[oy:oy + S, ox:ox + S]
        # One float map carries both the owning layer (integer part) and its secondary-colour weight (fraction,
        # scaled by _W): each object then needs a single masked write.
        packed = self._draw_stuff(scene.stuff, noise, rng)
        R = len(scene.stuff.class_ids)
        full_area = [self._draw_thing(R + i, t, packed) for i, t in enumerate(scene.things)]
        layer = packed.astype(np.int16)  # truncation == floor: values are >= 0
        weight = packed - layer
        weight *= 1.0 / _W
        # Colour tables per layer (stuff regions, then things with their jitter), applied once.
        classes = np.array(list(scene.stuff.class_ids) + [t.class_id for t in scene.things], dtype=np.intp)
        gain = np.ones((len(classes), 3), np.float32)
        if scene.things:
            gain[R:] = np.asarray([t.gain for t in scene.things], np.float32)
        gain *= scene.brightness
        c1 = (self.rgb1[classes] * gain).T  # (3, layers): planar maths keeps numpy's inner loops long
        dc = (self.rgb2[classes] * gain).T - c1
        index = layer.astype(np.intp)
        planes = np.take(dc, index, axis=1)
        planes *= weight
        planes += np.take(c1, index, axis=1)
        planes += noise * self.noise_std
        np.clip(planes, 0, 255, out=planes)
        planes8 = planes.astype(np.uint8)
        image = np.empty((S, S, 3), dtype=np.uint8)
        for ch in range(3):
            image[..., ch] = planes8[ch]
        class_map = np.take(classes.astype(np.uint16), index)
        return Rendered(image, class_map, layer, full_area)

    def _draw_stuff(self, layout: StuffLayout, noise: Arr, rng: np.random.Generator) -> Arr:
        """The packed map of the background: region index + _W * texture weight."""
        region = np.zeros((self.S, self.S), dtype=np.float32)
        if layout.cuts:
            c, s = math.cos(layout.angle), math.sin(layout.angle)
            x, y = self.centred, self.centred
            across = np.subtract.outer(y * c, x * s)
            for off, amp, cycles, phase in layout.cuts:
                # sin(f*along + phase) with along = x c + y s, as an outer product of 1-D sines and cosines
                f = 2 * math.pi * cycles / self.S
                line = _sin_outer(y * (f * s), x * (f * c) + phase) * amp
                line += off - self.S / 2
                region += across > line
        weight = None
        for r, cid in enumerate(layout.class_ids):
            spec = self.vocab[cid].stuff
            field = self._stuff_field(spec.texture, noise, rng) * (spec.amplitude * _W)
            weight = field if weight is None else np.where(region == r, field, weight)
        region += np.clip(weight, 0.0, _W)
        return region

    def _stuff_field(self, texture: str, noise: Arr, rng: np.random.Generator) -> Arr:
        """A texture field in about [0, 1] over the whole image (the region map picks its part)."""
        S = self.S
        scale = S / 96.0
        if texture == "fine":
            return 0.5 + 0.3 * noise
        if texture == "blotchy":
            small = rng.random((6, 6), dtype=np.float32)
            return self._up @ small @ self._up.T
        if texture == "streaks_h":
            return np.broadcast_to(rng.random((S, 1), dtype=np.float32), (S, S))
        if texture == "streaks_v":
            return np.broadcast_to(rng.random((1, S), dtype=np.float32), (S, S))
        if texture == "ripples":
            period = uniform(rng, 6, 11) * scale
            wob = np.sin(self.grid * (2 * math.pi / (S * uniform(rng, 0.3, 0.8))) + uniform(rng, 0, 6.3))
            field = _sin_outer(self.grid * (2 * math.pi / period), 2.0 * wob)
            field *= 0.5
            field += 0.5
            return field
        if texture == "tiles":
            period = uniform(rng, 9, 15) * scale
            width = 1.5 * scale

            def line(pos: Arr) -> Arr:
                return pos - period * np.floor(pos / period) < width

            odd_rows = _parity(np.floor(self.grid / period)).astype(bool)  # brick bond: odd rows shift half a tile
            bricks = np.where(odd_rows[:, None], line(self.grid + period / 2)[None, :], line(self.grid)[None, :])
            return (bricks | line(self.grid)[:, None]).astype(np.float32)
        if texture == "speckle":
            return (noise.T > 0.9).astype(np.float32)
        raise ValueError(f"unknown stuff texture {texture!r}")

    def _draw_thing(self, code: int, t: Thing, packed: Arr) -> int:
        look = self.vocab[t.class_id].thing
        root = math.sqrt(t.aspect)
        sx, sy = t.half / root, t.half * root
        c, s = math.cos(t.angle), math.sin(t.angle)
        u0, u1, v0, v1, radius = self._extent[(look.shape, look.part)]
        xs = [t.cx + sx * u * c - sy * v * s for u in (u0, u1) for v in (v0, v1)]
        ys = [t.cy + sx * u * s + sy * v * c for u in (u0, u1) for v in (v0, v1)]
        reach = radius * max(sx, sy)
        x0, x1 = max(0, int(max(min(xs), t.cx - reach))), min(self.S, int(min(max(xs), t.cx + reach)) + 1)
        y0, y1 = max(0, int(max(min(ys), t.cy - reach))), min(self.S, int(min(max(ys), t.cy + reach)) + 1)
        if x0 >= x1 or y0 >= y1:
            return 0
        dx = self.grid[x0:x1] - t.cx
        dy = self.grid[y0:y1] - t.cy
        u = dx[None, :] * (c / sx) + dy[:, None] * (s / sx)
        v = dy[:, None] * (c / sy) - dx[None, :] * (s / sy)
        body = SHAPE_FNS[look.shape](u, v)
        mask = body
        w = texture_weight(look.texture, u, v, body, t.half)
        if look.part != "none":
            part = PART_FNS[look.part](u, v)
            mask = body | part
            w = np.where(body, w, np.float32(1.0))
        area = int(np.count_nonzero(mask))
        if area:
            value = w * np.float32(_W)
            value += np.float32(code)
            np.copyto(packed[y0:y1, x0:x1], value, where=mask)
        return area


def _sin_outer(a: Arr, b: Arr) -> Arr:
    """sin(a[:, None] + b[None, :]) from 1-D sines and cosines: two outer products instead of a 2-D sine."""
    out = np.multiply.outer(np.sin(a), np.cos(b))
    out += np.multiply.outer(np.cos(a), np.sin(b))
    return out


def _upsampler(n: int, size: int) -> Arr:
    """(size, n) bilinear interpolation matrix: field = U @ small @ U.T upsamples an n x n grid smoothly."""
    pos = np.clip((np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    m = np.zeros((size, n), dtype=np.float32)
    m[np.arange(size), lo] += (1 - frac).astype(np.float32)
    m[np.arange(size), hi] += frac.astype(np.float32)
    return m
