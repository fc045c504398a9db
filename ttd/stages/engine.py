"""The one stage engine behind index, parse and score: plan a corpus's shards against the store once, hand the work
to a distributor, and account for what came back.

A stage supplies only what is its own: a `StageSpec` (its name, version, output-affecting config and model, the
stage whose output it reads) and a worker class that does one shard's work and commits it. The rest is here:

- `plan`: one listing of the corpus and the stage's manifests read in bulk (`Store.committed`: one listing plus
  parallel reads, not a request or two per shard), a `PlannedShard` each; a flow plans once and hands each batch
  its planned shards (`PlannedShard.as_dict`), so a batch never plans again.
- the distributors, which decide where shards run: `run_here` (this process; `threads` > 1 overlaps the store
  requests of several shards), `run_processes` (a process pool, one worker each) and `run_on_ray` (long-lived Ray
  actors, each handed a few shards per call so its next shard is read while one computes).
- `Summary`: the counts every stage returns.

Workers are built where they run (`WorkerSpec.build`), load their model once, and are given lists of planned
shards; each result is a dict with the shard's name and either its counts, `skipped` ('done': another run
committed it after planning; 'claimed': another run holds it) or `failed` (the error; left for the next run).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol

from ttd.corpus import Corpus, ShardRef
from ttd.errors import TTDError
from ttd.store.claims import claim, clear_leftovers
from ttd.store.store import INDEX_REWRITE_AFTER, Store, fingerprint

log = logging.getLogger(__name__)

TODO, DONE, WAITING, BLOCKED = "todo", "done", "waiting", "blocked"


@dataclass(frozen=True)
class PlannedShard:
    """One shard as planning saw it. status: todo, done, waiting (img2dataset has not written its _stats.json) or
    blocked (the stage it reads has not committed it); the fingerprints are None unless todo or done."""

    shard: ShardRef
    status: str
    fingerprint: str | None = None
    input_fingerprint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for a flow to hand to the task that runs it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PlannedShard:
        shard = doc["shard"]
        ref = ShardRef(**{**shard, **{k: tuple(shard.get(k, ())) for k in ("paths", "sizes", "etags")}})
        return cls(ref, doc["status"], doc.get("fingerprint"), doc.get("input_fingerprint"))


@dataclass(frozen=True)
class StageSpec:
    """What makes a stage's fingerprint, and what it waits for. A shard's fingerprint covers the stage and its
    version, the output-affecting config, the model (when the stage has one) and its input: the shard's files,
    and the fingerprint of the `after` stage's commit when it reads one."""

    name: str
    version: int
    config: Any
    model_id: str | None = None
    after: str | None = None  # the stage whose committed output this one reads
    blocked: str = BLOCKED  # the summary's name for shards `after` has not committed ("unparsed")

    def fingerprints(self, shard: ShardRef, upstream_fp: str | None) -> tuple[str, str]:
        input_fp = shard.fingerprint if self.after is None else fingerprint(shard.fingerprint, upstream_fp)
        model = [] if self.model_id is None else [self.model_id]
        return fingerprint(self.name, self.version, self.config, *model, input_fp), input_fp


def select_shards(refs: list[ShardRef], wanted: Collection[str] | None, corpus: str) -> list[ShardRef]:
    """The shards named in `wanted`, in corpus order; all when None. A name the corpus lacks is a clear error."""
    if wanted is None:
        return refs
    wanted = set(wanted)
    unknown = sorted(wanted - {r.name for r in refs})
    if unknown:
        raise TTDError(f"corpus {corpus!r} has no shard(s) {', '.join(unknown[:5])}")
    return [r for r in refs if r.name in wanted]


def plan(corpus: Corpus, store: Store, spec: StageSpec, *, include_incomplete: bool = False,
         shards: Collection[str] | None = None) -> list[PlannedShard]:
    """Every shard of the corpus (or those named), in order, with its fingerprint and status. One listing of the
    corpus and the stage's (and its input stage's) manifests read in bulk; never a shard's data."""
    refs = select_shards(corpus.shards(), shards, corpus.name)
    committed = store.committed(spec.name, corpus.name)
    upstream = store.committed(spec.after, corpus.name) if spec.after else {}
    planned = []
    for ref in refs:
        if not ref.complete and not include_incomplete:
            planned.append(PlannedShard(ref, WAITING))
            continue
        if spec.after and ref.name not in upstream:
            planned.append(PlannedShard(ref, BLOCKED))
            continue
        fp, input_fp = spec.fingerprints(ref, upstream.get(ref.name, {}).get("fingerprint"))
        done = committed.get(ref.name, {}).get("fingerprint") == fp
        planned.append(PlannedShard(ref, DONE if done else TODO, fp, input_fp))
    return planned


# ---------------------------------------------------------------- bookkeeping

@dataclass
class Summary:
    """The counts a stage's run returns (`as_dict`): shards planned, done here, already done, held by another run,
    waiting, blocked and failed, and the stage's own per-shard counts (`summed`) added over the shards done."""

    stage: str
    corpus: str
    summed: tuple[str, ...]
    blocked_name: str = BLOCKED
    extra: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.counts: dict[str, Any] = {"shards": 0, "done": 0, "skipped_done": 0, "claimed_elsewhere": [],
                                       "waiting": [], self.blocked_name: [], "failed": [],
                                       **{k: 0 for k in self.summed}}

    def planned(self, planned: Iterable[PlannedShard]) -> list[PlannedShard]:
        """Count the plan; returns the shards to do."""
        todo = []
        for p in planned:
            self.counts["shards"] += 1
            if p.status == TODO:
                todo.append(p)
            elif p.status == DONE:
                self.counts["skipped_done"] += 1
            elif p.status == WAITING:
                log.warning("shard %s/%s has no _stats.json yet (still downloading?): left for a later run",
                            p.shard.corpus, p.shard.name)
                self.counts["waiting"].append(p.shard.name)
            else:
                self.counts[self.blocked_name].append(p.shard.name)
        blocked = self.counts[self.blocked_name]
        if blocked:
            log.warning("%d shard(s) wait for an earlier stage (%s): %s", len(blocked), self.blocked_name,
                        ", ".join(blocked[:5]))
        return todo

    def account(self, result: dict[str, Any]) -> None:
        """One shard's result, as a worker returned it."""
        c = self.counts
        if result.get("skipped") == "done":  # another run committed it after this one planned
            c["skipped_done"] += 1
        elif result.get("skipped") == "claimed":
            holder = result.get("holder") or {}
            log.warning("shard %s/%s is being worked on by another run (%s, pid %s): skipped", self.corpus,
                        result["shard"], holder.get("machine", "?"), holder.get("pid", "?"))
            c["claimed_elsewhere"].append(result["shard"])
        elif "failed" in result:
            log.error("shard %s/%s failed, left for the next run: %s", self.corpus, result["shard"], result["failed"])
            c["failed"].append({"shard": result["shard"], "error": result["failed"]})
        else:
            c["done"] += 1
            for k in self.summed:
                value = result.get(k, 0)
                if isinstance(value, dict):  # a counter (img2dataset statuses): added key by key
                    c[k] = {**c[k]} if isinstance(c[k], dict) else {}
                    for name, n in value.items():
                        c[k][name] = c[k].get(name, 0) + n
                else:
                    c[k] += value
        if self.progress:
            self.progress(result)

    def as_dict(self) -> dict[str, Any]:
        return {"corpus": self.corpus, **self.extra, **self.counts,
                "seconds": round(time.perf_counter() - self.started, 3)}


def finish_run(store: Store, stage: str, corpus: str, committed: int) -> None:
    """A run's last step: remove what killed runs left (claims, staged files), and when this run committed many
    shards, bring the stage's manifest index up to date, so the next plan or `ttd sql` reads one object, not a
    manifest per new shard. Fewer than INDEX_REWRITE_AFTER would not rewrite it (the next plan reads those few
    manifests itself): re-listing every manifest for them would cost a nightly run that found 10 new shards among
    10,000 as much as its plan (10 listing pages on S3). Never raises: both only save work."""
    clear_leftovers(store, stage)
    if committed >= INDEX_REWRITE_AFTER:
        try:
            store.committed(stage, corpus)
        except Exception as exc:  # noqa: BLE001 - the manifests stay the truth; the next plan retries
            log.warning("could not update the %s manifest index: %s", stage, exc)


# ---------------------------------------------------------------- workers

class ShardWorker(Protocol):
    """A stage's worker: built once per process or actor, then given planned shards."""

    def process(self, jobs: list[PlannedShard], on_result: Callable[[dict], None] | None = None) -> list[dict]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerSpec:
    """How to build a stage's worker where it runs (this process, a pool process, a Ray actor): a class and its
    picklable arguments."""

    cls: type
    args: tuple = ()

    def build(self) -> ShardWorker:
        return self.cls(*self.args)


@dataclass
class Held:
    """A shard this run holds the claim of, as `run_claimed` found it."""

    had_manifest: bool  # committed before, under another fingerprint
    claim_state: dict[str, Any]  # claims.claim's: taken_over

    @property
    def fresh(self) -> bool:
        """No earlier attempt can have left this stage's files in the shard's folders: `Store.commit(fresh=...)`
        may skip its orphan listing. Read at commit time: another run may take the claim over meanwhile."""
        return not self.had_manifest and not self.claim_state.get("taken_over")


def held_unless_done(store: Store, stage: str, partition: Mapping[str, str], fp: str,
                     claim_state: dict[str, Any]) -> Held | None:
    """Once the shard's claim is held: None when it was committed under fingerprint `fp` since planning, else what
    the commit needs to know of it."""
    manifest = store.manifest(stage, partition)
    if manifest is not None and manifest.get("fingerprint") == fp:
        return None
    return Held(manifest is not None, claim_state)


def run_claimed(store: Store, stage: str, job: PlannedShard,
                work: Callable[[Held], dict[str, Any]]) -> dict[str, Any]:
    """One shard's work under its claim: skipped when another run holds the shard or committed it since planning.
    A shard's own failure becomes a `failed` result; a setup problem (TTDError: schema version, store) is raised."""
    name, state = job.shard.name, {}
    try:
        with claim(store, stage, job.shard.partition, state=state) as holder:
            if holder is not None:
                return {"shard": name, "skipped": "claimed", "holder": holder}
            held = held_unless_done(store, stage, job.shard.partition, job.fingerprint, state)
            if held is None:
                return {"shard": name, "skipped": "done"}
            return {"shard": name, **work(held)}
    except TTDError:
        raise
    except Exception as exc:  # noqa: BLE001 - this shard's problem (an unreadable file, a failed claim or write)
        return {"shard": name, "failed": f"{type(exc).__name__}: {exc}"[:500]}


class SerialWorker:
    """Base of a worker that does one shard at a time (`process_one`); `threads` > 1 runs that many shards at once
    so their store and corpus requests overlap (on S3, most of a small shard's time). A subclass's compute that is
    not thread-safe holds `self.compute_lock`."""

    threads: int = 1

    def __init__(self) -> None:
        self.compute_lock = threading.Lock()

    def process_one(self, job: PlannedShard) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, jobs: list[PlannedShard], on_result: Callable[[dict], None] | None = None) -> list[dict]:
        results = []

        def deliver(result: dict) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        if self.threads <= 1 or len(jobs) <= 1:
            for job in jobs:
                deliver(self.process_one(job))
            return results
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ttd-shard") as pool:
            pending = {pool.submit(self.process_one, job) for job in jobs}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        deliver(fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        return results

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- distributors

def run_here(spec: WorkerSpec, todo: list[PlannedShard], on_result: Callable[[dict], None],
             on_start: Callable[[int], None] | None = None) -> None:
    """Every shard in this process, by one worker (built only when there is a shard to do)."""
    worker = spec.build()
    try:
        if on_start:
            on_start(len(todo))  # after the model or parser has loaded: the rate a user sees is the work's
        worker.process(todo, on_result)
    finally:
        worker.close()


_POOL_WORKER: dict[str, Any] = {}


def _init_pool_worker(spec: WorkerSpec) -> None:
    _POOL_WORKER["worker"] = spec.build()


def _pool_process(job: PlannedShard) -> list[dict]:
    return _POOL_WORKER["worker"].process([job])


def process_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """Not fork: the parent may hold threads (s3fs's event loop, Arrow's pools) that a fork would copy broken.
    A fork server that has imported the heavy modules once forks clean workers at no import cost; spawn, where
    there is no fork server, pays the import in every worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)  # only effective before the fork server first starts
    return ctx


def run_processes(spec: WorkerSpec, todo: list[PlannedShard], workers: int, on_result: Callable[[dict], None],
                  on_start: Callable[[int], None] | None = None, preload: list[str] | None = None) -> None:
    """Shards over a pool of `workers` processes, each building its worker (and loading its model) once."""
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=process_context(preload or []),
                             initializer=_init_pool_worker, initargs=(spec,)) as pool:
        if on_start:
            on_start(len(todo))
        pending = {pool.submit(_pool_process, job) for job in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:  # not one shard's problem (those come back as `failed`): stop, one line
                        raise exc
                    for result in fut.result():
                        on_result(result)
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise TTDError("a worker process died (out of memory, or killed); shards committed so far are kept, "
                           "re-run to finish. Calling a stage with workers > 1 from a script needs the "
                           "`if __name__ == '__main__':` guard") from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


class RayFleet(Protocol):
    """How many actors the cluster should hold now, and what each asks for (a stage's resource policy)."""

    gpus: float
    cpus: int

    def wanted(self) -> int: ...


ACTOR_RETRIES = 3  # restarts of a lost actor, and retries of the shards it held
SHARDS_PER_CALL = 4  # shards handed to an actor at once (its pipeline overlaps them)
GROW_EVERY_S = 5.0  # how often a running pool looks for new GPUs while it waits for results

# Actors kept for the life of this process, for the next call with the same key (a flow's next batch).
_ACTORS: dict[str, Any] = {"key": None, "job": None, "actors": []}


def _kept_actors(key: str) -> list[Any]:
    """The actors of the previous call with this key, if all are still alive."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    kept = _ACTORS["actors"] if (_ACTORS["key"], _ACTORS["job"]) == (key, job) else []
    if kept:
        try:
            ray.get([a.alive.remote() for a in kept], timeout=120)
        except Exception as exc:  # noqa: BLE001 - a dead or unreachable actor: start afresh
            log.info("actors of the previous call are gone (%s): starting new ones", type(exc).__name__)
            kept = []
    _ACTORS.update(key=key, job=job, actors=list(kept))
    return kept


class RayStageWorker:
    """A stage's worker as a Ray actor."""

    def __init__(self, spec: WorkerSpec, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = spec.build()

    def process(self, jobs: list[PlannedShard]) -> list[dict]:
        return self.worker.process(jobs)

    def alive(self) -> int:
        return os.getpid()


def run_on_ray(spec: WorkerSpec, todo: list[PlannedShard], fleet: RayFleet, on_result: Callable[[dict], None],
               key: str) -> int:
    """Shards over long-lived Ray actors that follow the cluster: a few shards per call, so an actor reads its next
    shard while it computes one; the pool grows as GPUs appear; actors are kept for the next call with the same
    `key`. A lost actor is restarted by Ray and its call retried (shards are idempotent). Returns the most actors
    that worked at once."""
    import ray

    actor_cls = ray.remote(RayStageWorker)

    def start() -> Any:
        return actor_cls.options(num_gpus=fleet.gpus, num_cpus=fleet.cpus, max_restarts=ACTOR_RETRIES,
                                 max_task_retries=ACTOR_RETRIES).remote(spec, fleet.cpus)

    # few enough shards per call that they still spread over every actor, and a lost actor redoes little
    per_call = max(1, min(SHARDS_PER_CALL, len(todo) // fleet.wanted()))
    queue = deque(todo[i:i + per_call] for i in range(0, len(todo), per_call))
    idle = deque(_kept_actors(fingerprint(key, spec.cls.__qualname__, fleet.gpus)))
    running: dict[Any, Any] = {}  # object ref -> actor
    most, looked, committed = 0, 0.0, 0
    try:
        while queue or running:
            if queue and time.monotonic() - looked >= GROW_EVERY_S or not (idle or running):
                looked = time.monotonic()
                grow = min(fleet.wanted() - len(_ACTORS["actors"]), len(queue) - len(idle))
                for _ in range(max(0, grow)):
                    _ACTORS["actors"].append(start())
                    idle.append(_ACTORS["actors"][-1])
                if grow > 0 and most:
                    log.info("%d new GPU(s) in the cluster: %d actors now", grow, len(_ACTORS["actors"]))
            while idle and queue:
                actor = idle.popleft()
                running[actor.process.remote(queue.popleft())] = actor
            most = max(most, len(running))
            done, _ = ray.wait(list(running), num_returns=1, timeout=GROW_EVERY_S)
            for ref in done:
                idle.append(running.pop(ref))
                for result in ray.get(ref):
                    committed += "skipped" not in result and "failed" not in result
                    on_result(result)
    except ray.exceptions.RayActorError as exc:
        raise TTDError(f"a Ray worker was lost and not recovered after {ACTOR_RETRIES} restarts "
                       f"({type(exc).__name__}); {committed} of {len(todo)} shard(s) were committed by this run "
                       "and a re-run does only the rest") from None
    return most
