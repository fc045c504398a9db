"""Semantic segmentation eval sets in their official (or common mmseg) layouts, read lazily.

Every dataset is a list of items (key, image path, label path) found by listing the layout once; images and labels
are decoded only when iterated. Labels come out as uint8 arrays in the dataset's class order with 255 = ignore.
The exact paths each loader expects are in docs/SEGEVAL.md and in the error a wrong layout raises.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ttd.configs import SEGMENTATION_DATASETS
from ttd.errors import TTDError

log = logging.getLogger(__name__)

IGNORE = 255
CLASSES_DIR = Path(__file__).parent / "classes"


class SegSample(NamedTuple):
    key: str
    image: Image.Image  # RGB
    label: np.ndarray  # uint8 [H, W], class ids, 255 = ignore


class SampleError(Exception):
    """One item cannot be read (missing or corrupt file, label that does not fit its image)."""

    def __init__(self, key: str, error_type: str, message: str, source: str = ""):
        super().__init__(message)
        self.key, self.error_type, self.source = key, error_type, source


@dataclass(frozen=True)
class Item:
    key: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes_file: str
    has_background: bool  # class 0 is background, predicted by the threshold, never by a text embedding
    bg_threshold: float  # the paper's value; only used where has_background
    find: Callable[[Path], tuple[Path, list[Item]]]
    decode: Callable[[np.ndarray], np.ndarray]  # raw label values -> class ids with 255 = ignore

    @property
    def layout(self) -> str:
        """What the loader expects, for errors and docs: its finder's docstring."""
        return " ".join((self.find.__doc__ or "").split())


# ---- label decoders -----------------------------------------------------------------------------------------------
def _identity(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.uint8, copy=False)


def _ade(raw: np.ndarray) -> np.ndarray:
    """ADE20K: 0 = 'other' (ignored), 1..150 = classes -> 0..149."""
    out = raw.astype(np.int16) - 1
    out[out < 0] = IGNORE
    return out.astype(np.uint8)


# Cityscapes labelIds -> the 19 train ids (the benchmark's own table; every other id is ignored).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LUT = np.full(256, IGNORE, np.uint8)
for _lid, _tid in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_lid] = _tid


def _cityscapes(raw: np.ndarray) -> np.ndarray:
    return _CITYSCAPES_LUT[raw.astype(np.uint8)]


def _coco_object_from_stuff(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff-171 train ids -> COCO-Object: things 0..79 -> 1..80, stuff 80..170 -> background 0."""
    out = raw.astype(np.int16) + 1
    out[(raw >= 80) & (raw != IGNORE)] = 0
    out[raw == IGNORE] = IGNORE
    return out.astype(np.uint8)


# ---- layout finders -----------------------------------------------------------------------------------------------
def _first_dir(root: Path, candidates: list[str], required: list[str]) -> Path | None:
    """The first of root/candidate that holds every required sub-path."""
    for cand in candidates:
        base = root / cand if cand else root
        if all((base / r).exists() for r in required):
            return base
    return None


def _layout_error(spec_name: str, root: Path, layout: str) -> TTDError:
    return TTDError(f"{root} does not hold the {spec_name} layout: expected {layout}")


def _split_items(base: Path, split_file: str, image_dir: str, label_dir: str) -> list[Item]:
    ids = [line.strip() for line in (base / split_file).read_text().splitlines() if line.strip()]
    return [Item(i, base / image_dir / f"{i}.jpg", base / label_dir / f"{i}.png") for i in ids]


def _base(name: str, root: Path, candidates: list[str], need: list[str]) -> Path:
    """The first of ROOT/candidate holding every path in `need`; else the dataset's expected layout as an error."""
    base = _first_dir(root, candidates, need)
    if base is None:
        raise _layout_error(name, root, SPECS[name].layout)
    return base


def _voc_layout(name: str, root: Path, candidates: list[str], labels: str, split_file: str
                ) -> tuple[Path, list[Item]]:
    base = _base(name, root, candidates, ["JPEGImages", labels, split_file])
    return base, _split_items(base, split_file, "JPEGImages", labels)


def _find_voc(root: Path) -> tuple[Path, list[Item]]:
    """ROOT/VOCdevkit/VOC2012 (or ROOT/VOC2012, or ROOT itself) holding JPEGImages/ID.jpg,
    SegmentationClass/ID.png (palette indices, 255 = ignore) and ImageSets/Segmentation/val.txt"""
    return _voc_layout("voc", root, ["VOCdevkit/VOC2012", "VOC2012", ""], "SegmentationClass",
                       "ImageSets/Segmentation/val.txt")


def _find_context(root: Path) -> tuple[Path, list[Item]]:
    """ROOT/VOCdevkit/VOC2010 (or ROOT/VOC2010, or ROOT itself) holding JPEGImages/ID.jpg,
    SegmentationClassContext/ID.png (0 = background, 1..59 = classes) and ImageSets/SegmentationContext/val.txt (the
    mmseg layout)"""
    return _voc_layout("context", root, ["VOCdevkit/VOC2010", "VOC2010", ""], "SegmentationClassContext",
                       "ImageSets/SegmentationContext/val.txt")


def _listed_items(image_dir: Path, image_suffix: str, label_for: Callable[[Path], Path]) -> list[Item]:
    items = []
    for img in sorted(image_dir.rglob(f"*{image_suffix}")):
        items.append(Item(img.name[: -len(image_suffix)], img, label_for(img)))
    return items


def _coco_items(root: Path, name: str, suffixes: list[str]) -> tuple[Path, list[Item]]:
    base = _base(name, root, ["", "coco_stuff164k", "coco_object"], ["images/val2017", "annotations/val2017"])
    ann = base / "annotations/val2017"
    suffix = next((s for s in suffixes if next(ann.glob(f"*{s}"), None) is not None), None)
    if suffix is None:
        raise TTDError(f"{ann} holds no label files *{' or *'.join(suffixes)}: expected {SPECS[name].layout}")
    items = _listed_items(base / "images/val2017", ".jpg", lambda p: ann / (p.name[:-4] + suffix))
    return base, items


def _find_coco_stuff(root: Path) -> tuple[Path, list[Item]]:
    """ROOT (or ROOT/coco_stuff164k) holding images/val2017/ID.jpg and
    annotations/val2017/ID_labelTrainIds.png (171 train ids 0..170, 255 = ignore)"""
    return _coco_items(root, "coco-stuff", ["_labelTrainIds.png"])


# COCO-Object: GroupViT's converted instance maps first; else COCO-Stuff train ids (_coco_object_from_stuff)
COCO_OBJECT_SUFFIXES = ["_instanceTrainIds.png", "_labelTrainIds.png"]


def _find_coco_object(root: Path) -> tuple[Path, list[Item]]:
    """ROOT (or ROOT/coco_stuff164k, ROOT/coco_object) holding images/val2017/ID.jpg and
    annotations/val2017/ID_instanceTrainIds.png (0 = background, 1..80 = things, 255 = ignore) or, failing those,
    ID_labelTrainIds.png (COCO-Stuff-171 train ids: things 0..79, stuff = background)"""
    return _coco_items(root, "coco-object", COCO_OBJECT_SUFFIXES)


def _find_cityscapes(root: Path) -> tuple[Path, list[Item]]:
    """ROOT (or ROOT/cityscapes) holding leftImg8bit/val/CITY/ID_leftImg8bit.png and
    gtFine/val/CITY/ID_gtFine_labelIds.png (label ids, mapped to the 19 train ids; others ignored)"""
    base = _base("cityscapes", root, ["", "cityscapes"], ["leftImg8bit/val", "gtFine/val"])

    def label_for(img: Path) -> Path:
        stem = img.name[: -len("_leftImg8bit.png")]
        return base / "gtFine/val" / img.parent.name / f"{stem}_gtFine_labelIds.png"

    return base, _listed_items(base / "leftImg8bit/val", "_leftImg8bit.png", label_for)


def _find_ade(root: Path) -> tuple[Path, list[Item]]:
    """ROOT/ADEChallengeData2016 (or ROOT itself) holding images/validation/ID.jpg and
    annotations/validation/ID.png (0 = ignore, 1..150 = classes)"""
    base = _base("ade", root, ["ADEChallengeData2016", ""], ["images/validation", "annotations/validation"])
    ann = base / "annotations/validation"
    return base, _listed_items(base / "images/validation", ".jpg", lambda p: ann / (p.name[:-4] + ".png"))


# each finder's docstring is the layout it expects (`DatasetSpec.layout`: errors and docs say it)
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("voc", "voc.txt", True, 0.40, _find_voc, _identity),
    DatasetSpec("context", "context.txt", True, 0.45, _find_context, _identity),
    DatasetSpec("coco-object", "coco_object.txt", True, 0.45, _find_coco_object, _identity),
    DatasetSpec("coco-stuff", "coco_stuff.txt", False, 0.40, _find_coco_stuff, _identity),
    DatasetSpec("cityscapes", "cityscapes.txt", False, 0.40, _find_cityscapes, _cityscapes),
    DatasetSpec("ade", "ade.txt", False, 0.45, _find_ade, _ade),
)}
DATASETS = SEGMENTATION_DATASETS
if set(SPECS) != set(DATASETS):  # one list of names (ttd.configs, for the CLI), one spec each here
    raise ImportError(f"segmentation datasets {sorted(DATASETS)} and their specs {sorted(SPECS)} differ")


@cache
def class_names(dataset: str) -> tuple[str, ...]:
    """Names in label order (background first where the dataset has one). A line may list comma-separated
    synonyms for one class."""
    path = CLASSES_DIR / get_spec(dataset).classes_file
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def get_spec(dataset: str) -> DatasetSpec:
    try:
        return SPECS[dataset]
    except KeyError:
        raise TTDError(f"unknown segmentation dataset {dataset!r}: use one of {', '.join(DATASETS)}") from None


# ---- reading ------------------------------------------------------------------------------------------------------
def _read_image(item: Item) -> Image.Image:
    try:
        with Image.open(item.image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise SampleError(item.key, "missing_file", f"image {item.image} does not exist", str(item.image)) from None
    except Exception as exc:  # PIL raises many types for a corrupt file; each is this sample's problem only
        raise SampleError(item.key, "corrupt_image", f"{type(exc).__name__}: {exc}", str(item.image)) from None


def _read_label(item: Item) -> np.ndarray:
    try:
        with Image.open(item.label) as im:
            if im.mode not in ("P", "L"):  # palette indices or grey ids; RGB colour maps would be misread
                raise SampleError(item.key, "bad_label", f"label {item.label} has mode {im.mode}, expected a "
                                  "palette (P) or single-channel (L) PNG", str(item.label))
            return np.array(im)
    except FileNotFoundError:
        raise SampleError(item.key, "missing_file", f"label {item.label} does not exist", str(item.label)) from None
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError(item.key, "bad_label", f"{type(exc).__name__}: {exc}", str(item.label)) from None


class SegDataset:
    """One eval set: the items found under its root, decoded lazily, in a stable order."""

    def __init__(self, name: str, root: str | Path, max_images: int | None = None):
        self.spec = get_spec(name)
        self.name = name
        root = Path(root).expanduser()
        if not root.is_dir():
            raise TTDError(f"dataset root {str(root)!r} does not exist or is not a folder: expected "
                           f"{self.spec.layout}")
        self.root, items = self.spec.find(root.resolve())
        if not items:
            raise TTDError(f"no {name} images found under {self.root}: expected {self.spec.layout}")
        self.items = items[:max_images] if max_images is not None else items
        self.class_names = class_names(name)
        self.has_background = self.spec.has_background
        self._decode = self.spec.decode
        if name == "coco-object" and self.items[0].label.name.endswith("_labelTrainIds.png"):
            self._decode = _coco_object_from_stuff
            log.info("coco-object: deriving labels from COCO-Stuff train ids (no *_instanceTrainIds.png found)")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, item: Item) -> SegSample:
        image = _read_image(item)
        raw = _read_label(item)
        if raw.shape != (image.height, image.width):
            raise SampleError(item.key, "size_mismatch", f"label {raw.shape[::-1]} and image {image.size} differ in "
                              "size", str(item.label))
        label = self._decode(raw)
        bad = (label != IGNORE) & (label >= self.num_classes)
        if bad.any():  # a value outside the class list cannot be scored: ignore it, but say so
            log.warning("%s: %d label pixels outside 0..%d treated as ignore", item.key, int(bad.sum()),
                        self.num_classes - 1)
            label = np.where(bad, IGNORE, label).astype(np.uint8)
        return SegSample(item.key, image, label)

    def __iter__(self) -> Iterator[SegSample]:
        """Every sample; a bad one raises SampleError (use `samples` to skip and report them)."""
        for item in self.items:
            yield self.load(item)

    def samples(self, on_error: Callable[[SampleError], None]) -> Iterator[SegSample]:
        """Every readable sample; each unreadable one is passed to `on_error` and skipped."""
        for item in self.items:
            try:
                yield self.load(item)
            except SampleError as exc:
                on_error(exc)

    def fingerprint(self) -> str:
        """The listed files' names and sizes: a changed eval set re-runs; a copied one (new mtimes) does not."""
        h = hashlib.sha256()
        for item in self.items:
            for path in (item.image, item.label):
                try:
                    st = path.stat()
                    h.update(f"{path.relative_to(self.root)}:{st.st_size}\n".encode())
                except (OSError, ValueError):
                    h.update(f"{path}:missing\n".encode())
        return h.hexdigest()[:16]


def open_dataset(name: str, root: str | Path, max_images: int | None = None) -> SegDataset:
    return SegDataset(name, root, max_images)
