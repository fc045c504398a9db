"""How the scorer moves shards through its three kinds of work, in series or overlapped.

    read + decode (host threads)  ->  device: copy, normalise, forward, score  ->  host: rows, write, commit
          ReadBatch                               DeviceBatch                          per-shard tables

`run(..., pipelined=True)` runs each kind in its own thread, joined by queues two deep (double buffering): while the
device works on batch i, batch i+1 is decoded into pinned memory and batch i-1 becomes Arrow rows, and a shard's
write and commit happen while the next shard is already being read. `pipelined=False` does the same steps one after
the other: the baseline the benchmark compares with, and the same bytes by construction (each step is the same
function, only the schedule differs).

Images leave the host as uint8 (resize and crop on the host, as the model's own preprocessing does; scaling and
normalisation on the device: 4x fewer bytes to copy).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_DONE = object()  # end of a queue


class ImagePrep:
    """The model's preprocessing split at its ToTensor: resize/crop/convert on the host into uint8 [3, H, W];
    scaling to [0, 1] and normalisation on the device, with the same float operations torchvision applies."""

    def __init__(self, preprocess: Any, device: torch.device):
        steps = list(getattr(preprocess, "transforms", []))
        names = [type(s).__name__ for s in steps]
        cut = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
        norm = steps[-1] if names and names[-1] == "Normalize" else None
        self.split = cut is not None and norm is not None and cut == len(steps) - 2
        if self.split:
            from torchvision.transforms import Compose

            self.host_steps = Compose(steps[:cut])
            self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
            self.std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(-1, 1, 1)
        else:  # an unusual pipeline: all of it on the host, floats copied
            self.host_steps = preprocess

    def host(self, image: Any) -> torch.Tensor:
        out = self.host_steps(image)
        if not self.split:
            return out
        arr = np.array(out.convert("RGB") if getattr(out, "mode", "RGB") != "RGB" else out, dtype=np.uint8, copy=True)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def device(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return batch
        return batch.to(torch.float32).div(255).sub_(self.mean).div_(self.std)


@dataclass
class ShardJob:
    """One shard through the pipeline: its planning, its candidates, and what the steps accumulate."""

    shard: Any
    fingerprint: str
    input_fingerprint: str
    claim: Any = None  # the claim's context manager, entered by the reader, exited after the commit
    skipped: dict | None = None  # {"skipped": "claimed" | "done", ...}: nothing to do
    by_key: dict = field(default_factory=dict)
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
    images: torch.Tensor  # uint8 [B, 3, H, W] (pinned when the device is CUDA), or floats without a split


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


def read_batches(jobs: Iterable[ShardJob], open_job: Callable[[ShardJob], Iterator[Any]], decode: Callable,
                 batch_size: int, threads: int, pin: bool, timings: Timings) -> Iterator[ReadBatch | ShardJob]:
    """Per job: `open_job` claims the shard and yields its wanted samples (or nothing when skipped); samples are
    decoded `threads` at a time into uint8 batches. Each job ends with the job itself (the shard is read)."""
    with ThreadPoolExecutor(threads) as pool:
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
                    t0 = time.perf_counter()
                    decoded = list(pool.map(decode, pending))
                    ok = [(s, img) for s, (img, err) in zip(pending, decoded) if err is None]
                    job.errors.extend(err for _, err in decoded if err is not None)
                    pending = []
                    if ok:
                        images = torch.stack([img for _, img in ok])
                        if pin:
                            images = images.pin_memory()
                        timings.add("decode", time.perf_counter() - t0)
                        yield ReadBatch(job, [(s.key, s.caption) for s, _ in ok], images)
                    else:
                        timings.add("decode", time.perf_counter() - t0)
                if sample is None:
                    break
            yield job


def run(jobs: list[ShardJob], *, open_job: Callable, decode: Callable, device_step: Callable, host_step: Callable,
        finish_job: Callable, batch_size: int, threads: int, pin: bool, pipelined: bool,
        timings: Timings | None = None) -> list[dict]:
    """Every job through read -> device -> host, in series or overlapped; returns `finish_job`'s results."""
    timings = timings or Timings()
    results: list[dict] = []
    reads = read_batches(jobs, open_job, decode, batch_size, threads, pin, timings)

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
