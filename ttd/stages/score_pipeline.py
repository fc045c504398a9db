"""How the scorer moves shards through its three kinds of work, in series or overlapped.

    read + decode (host threads)  ->  device: copy, normalise, forward, score  ->  host: rows, write, commit
          ReadBatch                               DeviceBatch                          per-shard tables

`run(..., pipelined=True)` runs each kind in its own thread, joined by queues two deep (double buffering): while the
device works on batch i, batch i+1 is decoded into pinned memory and batch i-1 becomes Arrow rows, and a shard's
write and commit happen while the next shard is already being read. `pipelined=False` does the same steps one after
the other: the baseline the benchmark compares with, and the same bytes by construction (each step is the same
function, only the schedule differs).

Images leave the host as uint8 (resize and crop on the host, as the model's own preprocessing does; scaling and
normalisation on the device: 4x fewer bytes to copy). Decoding and resizing run in a pool of threads, or of
processes (`ProcessDecoder`: PIL outside this process's GIL, which the reading, the device step and the Arrow rows
share), with two batches in flight while the tar is read on. With `DeviceJpegDecoder` the JPEGs leave the host
still encoded (a tenth of the bytes again) and are decoded, resized and cropped on the device (nvJPEG on CUDA);
only what that decoder cannot take (PNG, CMYK, 16-bit, corrupt files) goes through PIL as before.
"""

from __future__ import annotations

import io
import multiprocessing
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from ttd.corpus.base import decode_image
from ttd.errors import ImageDecodeError

_DONE = object()  # end of a queue


class ImagePrep:
    """The model's preprocessing split at its ToTensor: resize/crop/convert on the host into uint8 [3, H, W];
    scaling to [0, 1] and normalisation on the device, with the same float operations torchvision applies, in the
    model's `dtype`. `decode` runs the resize/crop on the device instead, for JPEGs decoded there."""

    def __init__(self, preprocess: Any, device: torch.device, dtype: torch.dtype = torch.float32):
        steps = list(getattr(preprocess, "transforms", []))
        names = [type(s).__name__ for s in steps]
        cut = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
        norm = steps[-1] if names and names[-1] == "Normalize" else None
        self.target, self.dtype = torch.device(device), dtype
        self.split = cut is not None and norm is not None and cut == len(steps) - 2
        self.tensor_steps = None  # the host steps as tensor transforms, where each has one (Resize, CenterCrop)
        if self.split:
            from torchvision.transforms import Compose

            self.host_steps = Compose(steps[:cut])
            self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
            self.std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(-1, 1, 1)
            self.tensor_steps = _tensor_steps(steps[:cut])
        else:  # an unusual pipeline: all of it on the host, floats copied
            self.host_steps = preprocess

    def host(self, image: Any) -> torch.Tensor:
        if not self.split:
            return self.host_steps(image)
        return to_chw(host_array(self.host_steps, image))

    def device(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return batch.to(self.dtype)
        return batch.to(torch.float32).div(255).sub_(self.mean).div_(self.std).to(self.dtype)

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """JPEG bytes decoded on the device (nvJPEG on CUDA, libjpeg on a CPU) and resized/cropped there as the host
        steps would: uint8 [3, H, W] each on the device, None for a file the decoder refused (PIL then tries it)."""
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec for decoding; this still works
            warnings.filterwarnings("ignore", ".*decoding and encoding capabilities", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            try:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.target)
            except RuntimeError:  # one bad file fails the whole call: decode one by one to find it
                images = [_decode_or_none(decode_jpeg, e, ImageReadMode.RGB, self.target) for e in encoded]
        return [None if im is None else self.tensor_steps(im) for im in images]


def _decode_or_none(decode_jpeg: Callable, data: torch.Tensor, mode: Any, device: torch.device
                    ) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None


def _tensor_steps(steps: list[Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The host steps as transforms of a uint8 [3, H, W] tensor (torchvision's Resize and CenterCrop take tensors;
    the RGB conversion is the decoder's), or None when a step has no tensor form: then nothing is decoded on the
    device."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    kept = []
    for step in steps:
        if isinstance(step, (Resize, CenterCrop)):
            kept.append(step)
        elif "convert" not in type(step).__name__.lower() and "convert" not in getattr(step, "__name__", ""):
            return None
    return Compose(kept)


def host_array(steps: Any, image: Any) -> np.ndarray:
    """The host part of the preprocessing as a uint8 [H, W, 3] array (PIL and numpy only: safe in a forked child)."""
    out = steps(image)
    return np.array(out.convert("RGB") if getattr(out, "mode", "RGB") != "RGB" else out, dtype=np.uint8, copy=True)


def to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- decoders: threads or processes

class ThreadDecoder:
    """`decode(sample) -> (tensor | None, error row | None)` on `threads` threads; a batch is one future."""

    def __init__(self, decode: Callable, threads: int):
        self.decode, self.pool = decode, ThreadPoolExecutor(threads, thread_name_prefix="ttd-decode")

    def submit(self, samples: list) -> Future:
        return _gather([self.pool.submit(self.decode, s) for s in samples])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_CHILD: dict[str, Any] = {}


def _child_init(steps: Any, max_pixels: int) -> None:
    _CHILD.update(steps=steps, max_pixels=max_pixels)


def decode_one(convert: Callable[[Any], Any], data: bytes | None, max_pixels: int
               ) -> tuple[Any, tuple[str, str] | None]:
    """(convert(decoded image), None), or (None, (error type, message)) for an image that cannot be decoded or
    preprocessed: that sample's problem only, an `errors` row."""
    try:
        return convert(decode_image(data, max_pixels)), None
    except ImageDecodeError as exc:
        return None, (exc.error_type, str(exc))
    except Exception as exc:  # noqa: BLE001 - a preprocessing failure on an odd image
        return None, ("preprocess_failed", f"{type(exc).__name__}: {exc}")


def _child_host_array(image: Any) -> np.ndarray:
    return host_array(_CHILD["steps"], image)


def _child_decode(items: list[bytes | None]) -> list[tuple[np.ndarray | None, tuple[str, str] | None]]:
    return [decode_one(_child_host_array, data, _CHILD["max_pixels"]) for data in items]


class ProcessDecoder:
    """Decoding and the host preprocessing in `processes` forked children, a batch split across them. The
    children run PIL and numpy only (never torch, whose thread pools do not survive a fork), so fork is safe and
    starts in milliseconds; each returns uint8 arrays that become tensors here."""

    def __init__(self, steps: Any, max_pixels: int, processes: int, error_row: Callable):
        self.processes, self.error_row = processes, error_row
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_child_init, initargs=(steps, max_pixels))

    def submit(self, samples: list) -> Future:
        size = -(-len(samples) // self.processes)
        parts = [samples[i:i + size] for i in range(0, len(samples), size)]
        futures = [self.pool.submit(_child_decode, [s.image_bytes for s in part]) for part in parts]

        def combine(results: list[list]) -> list:
            decoded = [r for part in results for r in part]
            return [(to_chw(arr), None) if err is None else (None, self.error_row(s, err))
                    for s, (arr, err) in zip(samples, decoded)]

        return _gather(futures, combine)  # a dead child fails the batch, and the run says so

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Encoded(NamedTuple):
    """A JPEG left encoded for the device's decoder: its bytes as a uint8 tensor, and its sample."""

    data: torch.Tensor
    sample: Any


def device_decodable(data: bytes | None, max_pixels: int) -> bool:
    """Whether the device decoder can take these bytes: a JPEG in RGB or grey within `max_pixels`, judged from its
    header alone (PIL reads a few hundred bytes). CMYK, 16-bit, PNG and unreadable headers go to PIL, which decodes
    them or names their error as before."""
    if not data or data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= max_pixels
    except Exception:  # noqa: BLE001 - PIL's own decoding will name the problem
        return False


class DeviceJpegDecoder:
    """Leaves the JPEGs a device decoder can take encoded (`Encoded`), and hands everything else to `host` (a
    thread or process decoder)."""

    def __init__(self, host: Any, max_pixels: int):
        self.host, self.max_pixels = host, max_pixels

    def submit(self, samples: list) -> Future:
        on_device = [device_decodable(s.image_bytes, self.max_pixels) for s in samples]
        rest = [s for s, ok in zip(samples, on_device) if not ok]
        hosted = self.host.submit(rest) if rest else _resolved([])

        def combine(results: list[list]) -> list:
            host_results = iter(results[0])
            return [(Encoded(torch.frombuffer(bytearray(s.image_bytes), dtype=torch.uint8), s), None) if ok
                    else next(host_results) for s, ok in zip(samples, on_device)]

        return _gather([hosted], combine)

    def close(self) -> None:
        self.host.close()


def _resolved(value: Any) -> Future:
    done: Future = Future()
    done.set_result(value)
    return done


def _gather(futures: list[Future], combine: Callable[[list], Any] = list) -> Future:
    """One future for `combine` of a list of futures' results, in order; the first failure fails it."""
    done: Future = Future()
    lock = threading.Lock()

    def collect(_: Future) -> None:
        with lock:
            if done.done() or not all(f.done() for f in futures):
                return
            try:
                done.set_result(combine([f.result() for f in futures]))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the batch
                done.set_exception(exc)

    for f in futures:
        f.add_done_callback(collect)
    return done


@dataclass
class ShardJob:
    """One shard through the pipeline: its planning, its candidates, and what the steps accumulate."""

    shard: Any
    fingerprint: str
    input_fingerprint: str
    claim: Any = None  # the claim's context manager, entered by the reader, exited after the commit
    skipped: dict | None = None  # {"skipped": "claimed" | "done", ...}: nothing to do
    held: Any = None  # stage.Held, once the reader holds the claim and found the shard to do
    candidates: Any = None  # score_batch.ShardCandidates
    captions: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    relevancy: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    images: int = 0
    started: float = field(default_factory=time.perf_counter)
    context: Any = None  # the device step's per-shard state (tag-embedding matrix)


@dataclass
class ReadBatch:
    job: ShardJob
    samples: list  # (key, caption) per image
    images: torch.Tensor | None  # uint8 [B, 3, H, W] (pinned when the device is CUDA), or floats without a split
    encoded: list = field(default_factory=list)  # Encoded JPEGs, the last len(encoded) of `samples`
    rows: Any = None  # the device step's (candidate rows, counts), for the host step


@dataclass
class Timings:
    """Seconds spent in each kind of work (summed over threads), and the batches seen."""

    read: float = 0.0
    decode: float = 0.0
    device: float = 0.0
    host: float = 0.0
    write: float = 0.0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 4) for k in ("read", "decode", "device", "host", "write", "batches")}


def read_batches(jobs: Iterable[ShardJob], open_job: Callable[[ShardJob], Iterator[Any]], decoder: Any,
                 batch_size: int, pin: bool, timings: Timings, in_flight: int = 2) -> Iterator[ReadBatch | ShardJob]:
    """Per job: `open_job` claims the shard and yields its wanted samples (or nothing when skipped); every
    `batch_size` samples go to the decoder, `in_flight` batches ahead of the one handed on, so the tar is read
    while earlier batches decode. Each job ends with the job itself (the shard is read), after its batches."""
    ahead: deque = deque()  # (job, samples, future) or (job, None, None) for a job's end, in order

    def settle(entry: tuple) -> ReadBatch | ShardJob | None:
        job, samples, future = entry
        if future is None:
            return job
        t0 = time.perf_counter()
        decoded = future.result()
        job.errors.extend(err for _, err in decoded if err is not None)
        ok = [(s, img) for s, (img, err) in zip(samples, decoded) if err is None and not isinstance(img, Encoded)]
        encoded = [img for img, err in decoded if isinstance(img, Encoded)]
        if not ok and not encoded:
            timings.add("decode", time.perf_counter() - t0)
            return None
        images = torch.stack([img for _, img in ok]) if ok else None
        if pin and images is not None:
            images = images.pin_memory()
        timings.add("decode", time.perf_counter() - t0)
        keys = [(s.key, s.caption) for s, _ in ok] + [(e.sample.key, e.sample.caption) for e in encoded]
        return ReadBatch(job, keys, images, encoded)

    def push(entry: tuple) -> Iterator[ReadBatch | ShardJob]:
        ahead.append(entry)
        while len(ahead) > in_flight or (ahead and ahead[0][2] is None):
            item = settle(ahead.popleft())
            if item is not None:
                yield item

    for job in jobs:
        pending: list = []
        samples = open_job(job)
        while True:
            t0 = time.perf_counter()
            sample = next(samples, None)
            timings.add("read", time.perf_counter() - t0)
            if sample is not None:
                pending.append(sample)
            if pending and (sample is None or len(pending) >= batch_size):
                yield from push((job, pending, decoder.submit(pending)))
                pending = []
            if sample is None:
                break
        yield from push((job, None, None))
    while ahead:
        item = settle(ahead.popleft())
        if item is not None:
            yield item


def run(jobs: list[ShardJob], *, open_job: Callable, decoder: Any, device_step: Callable, host_step: Callable,
        finish_job: Callable, batch_size: int, pin: bool, pipelined: bool, timings: Timings | None = None
        ) -> list[dict]:
    """Every job through read -> device -> host, in series or overlapped; returns `finish_job`'s results."""
    timings = timings or Timings()
    results: list[dict] = []
    reads = read_batches(jobs, open_job, decoder, batch_size, pin, timings, in_flight=2 if pipelined else 0)

    def host(item: Any) -> None:
        t0 = time.perf_counter()
        if isinstance(item, ShardJob):
            results.append(finish_job(item))
            timings.add("write", time.perf_counter() - t0)
        else:
            host_step(*item)
            timings.add("host", time.perf_counter() - t0)

    def device(item: Any) -> Any:
        if isinstance(item, ShardJob):
            return item
        t0 = time.perf_counter()
        out = device_step(item)
        timings.add("device", time.perf_counter() - t0)
        timings.batches += 1
        return (item, out)

    if not pipelined:
        for item in reads:
            host(device(item))
        return results

    with _Background(reads, depth=2) as prefetched, _Worker(host, depth=2) as hosted:
        for item in prefetched:
            hosted.put(device(item))
    return results


class _Background:
    """Iterate `source` in a thread, `depth` items ahead; its exception is raised here."""

    def __init__(self, source: Iterator[Any], depth: int):
        self.source, self.q, self.stop, self.error = source, queue.Queue(depth), threading.Event(), None
        self.thread = threading.Thread(target=self._run, name="ttd-score-read", daemon=True)

    def _run(self) -> None:
        try:
            for item in self.source:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.error = exc
        finally:
            self.q.put(_DONE)

    def __enter__(self) -> Iterator[Any]:
        self.thread.start()
        return self._items()

    def _items(self) -> Iterator[Any]:
        while (item := self.q.get()) is not _DONE:
            yield item
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.q.get(timeout=0.1)
            except queue.Empty:
                pass
        self.thread.join()


class _Worker:
    """Run `fn` on every item put, in one thread, `depth` items behind; its exception is raised at `put` or exit."""

    def __init__(self, fn: Callable[[Any], None], depth: int):
        self.fn, self.q, self.error = fn, queue.Queue(depth), None
        self.thread = threading.Thread(target=self._run, name="ttd-score-host", daemon=True)

    def _run(self) -> None:
        while (item := self.q.get()) is not _DONE:
            if self.error is None:
                try:
                    self.fn(item)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    self.error = exc

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def __enter__(self) -> _Worker:
        self.thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.q.put(_DONE)
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error
