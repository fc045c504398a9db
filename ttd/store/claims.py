"""Shard claims: two runs on one store never work on the same shard at once.

Before a process works on a shard it creates `claims/<stage>/<partition>.json` with an exclusive create (a local
`O_EXCL` open; on S3 a conditional PUT, `If-None-Match: *`). Whoever creates it holds the shard; the others skip
it and leave it to the holder. A holder refreshes the claim while it works (a heartbeat) and deletes it when done.

A claim outlives a killed process, so a claim is *stale*, and is taken over, when its heartbeat is older than its
time-to-live, or at once when it was made on this machine by a process that no longer runs (a resumed run after a
kill does not wait). Taking over is delete-then-create; two runs taking over the same stale claim at the same moment
can both work on the shard, which costs time, not data: commits are atomic and a shard's output is deterministic.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ttd.store.store import Store, check_name, partition_path

log = logging.getLogger(__name__)

TTL_S = 600.0  # a claim whose heartbeat is older than this is stale (a machine that died, a preempted worker)


def _boot_id() -> str:
    """Same host name and boot id = same running kernel, where a pid check means something."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_MACHINE = f"{socket.gethostname()}/{_boot_id()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def claim_path(store: Store, stage: str, partition: Mapping[str, str]) -> str:
    return store.root.join("claims", check_name(stage, "stage"), partition_path(partition) + ".json")


def _create_exclusive(store: Store, path: str, data: bytes) -> bool:
    """True if this call created `path`; False if it already existed."""
    fs = store.root.fs
    if store.root.protocol == "file":
        # written whole beside it, then linked into place (fails if the claim exists): an exclusive create and a
        # write after it would let another run read an empty claim in between, take it for stale and take it over
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
        return False
    return True


def _read(store: Store, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # torn or foreign content: treat as stale
        return {}


def is_stale(doc: dict[str, Any], now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if not doc or now - float(doc.get("heartbeat", 0)) > float(doc.get("ttl", TTL_S)):
        return True
    return doc.get("machine") == _MACHINE and not _pid_alive(int(doc.get("pid", 0)))


class _Heartbeat:
    def __init__(self, store: Store, path: str, doc: dict[str, Any], every: float, state: dict[str, Any]):
        self.store, self.path, self.doc, self.every, self.state = store, path, doc, every, state
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ttd-claim-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.doc["heartbeat"] = time.time()
            try:
                current = _read(self.store, self.path)
                if current is not None and current.get("owner") != self.doc["owner"]:
                    self.state["taken_over"] = True
                    log.warning("claim %s was taken over by %s; finishing anyway (commits are atomic)",
                                self.path, current.get("machine"))
                    return
                self.store.write_json(self.path, self.doc)  # atomic: never torn for a reader
            except Exception as exc:  # a missed heartbeat only risks a takeover, never data
                log.debug("claim heartbeat for %s failed: %s", self.path, exc)


@contextmanager
def claim(store: Store, stage: str, partition: Mapping[str, str], *, ttl: float = TTL_S,
          state: dict[str, Any] | None = None) -> Iterator[dict | None]:
    """Hold the shard for the duration of the block: yields None when this process holds it, else the other
    holder's claim (machine, pid, heartbeat), and the caller skips the shard. `state["taken_over"]` says whether
    a claim was involved that is not only this one: a stale claim this took over (a killed run's, which may have
    left files), or another run that took this one over meanwhile."""
    state = {} if state is None else state
    state["taken_over"] = False
    path = claim_path(store, stage, partition)
    doc = {"owner": uuid.uuid4().hex, "machine": _MACHINE, "pid": os.getpid(), "claimed_at": time.time(),
           "heartbeat": time.time(), "ttl": ttl}
    data = json.dumps(doc).encode()
    held = _create_exclusive(store, path, data)
    if not held:
        other = _read(store, path)
        # our own create: the server wrote it but its reply was lost, and the retried PUT found it there
        held = other is not None and other.get("owner") == doc["owner"]
    if not held:
        if other is None or is_stale(other):
            log.info("taking over stale claim %s (%s)", path, (other or {}).get("machine", "gone"))
            state["taken_over"] = True
            try:
                store.root.fs.rm_file(path)
            except FileNotFoundError:
                pass
            held = _create_exclusive(store, path, data)
            other = None if held else _read(store, path)
        if not held:
            yield other or {}
            return
    beat = _Heartbeat(store, path, doc, max(ttl / 4, 0.05), state)
    try:
        yield None
    finally:
        beat.stop.set()
        beat.thread.join()
        try:
            current = _read(store, path)
            if current is not None and current.get("owner") == doc["owner"]:
                store.root.fs.rm_file(path)
        except Exception as exc:  # a leftover claim goes stale; never hide the block's own error
            log.debug("could not release claim %s: %s", path, exc)


def clear_stale(store: Store, stage: str) -> int:
    """Remove stale claims on shards that are committed; returns how many. A run killed between its commit and its
    release leaves such a claim, and no later run takes it over, since they all skip the committed shard.
    One listing of the stage's claims; a claim of a shard still to do is left for the takeover above. Never raises:
    a leftover claim is untidy, not harmful, and the run's data is already committed."""
    fs, base = store.root.fs, store.root.join("claims", check_name(stage, "stage"))
    removed = 0
    try:
        paths = [p for p in store.find(base) if p.endswith(".json")]

        def stale_on_committed(path: str) -> bool:
            doc = _read(store, path)
            manifest = store.root.join("manifests", stage, posixpath.relpath(path, base))
            return doc is not None and is_stale(doc) and fs.exists(manifest)

        removed = store.remove(p for p in paths if stale_on_committed(p))
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("could not clear stale %s claims: %s", stage, exc)
    if removed:
        log.info("removed %d stale claim(s) on committed %s shards", removed, stage)
    return removed


def clear_leftovers(store: Store, stage: str) -> None:
    """What killed runs of `stage` left behind, removed at the end of a run: stale claims on committed shards, and
    data files staged but never committed (`Store.clear_staging`), except where a live claim says a run is working
    on that shard now."""
    clear_stale(store, stage)

    def in_progress(part: str) -> bool:
        doc = _read(store, store.root.join("claims", stage, part + ".json"))
        return doc is not None and not is_stale(doc)

    try:
        removed = store.clear_staging(stage, in_progress)
    except Exception as exc:  # noqa: BLE001 - staged files are invisible: untidy, never harmful
        log.warning("could not clear staged %s files of killed runs: %s", stage, exc)
        return
    if removed:
        log.info("removed %d staged %s file(s) that killed runs never committed", removed, stage)
