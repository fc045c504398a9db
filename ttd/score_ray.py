"""Scoring shards on a Ray cluster: a pool of `ShardScorer` actors that follows the cluster.

- One actor per GPU, each asking for its decode workers' CPUs plus one. A cluster that autoscales from zero GPU
  nodes (both shipped cluster configs do) with `device="cuda"` gets one GPU actor that waits for the first GPU node,
  instead of scoring on CPUs.
- The pool grows while the run goes on: between calls it looks at the cluster again and starts an actor for each
  GPU that has appeared, up to the work left.
- Actors are kept for the life of the driver process: the next call with the same corpus, store, model and settings
  (the Prefect flow's next batch of shards) reuses them and their loaded models.
- A lost actor (preempted node, OOM kill) is restarted by Ray and its call retried: shards are idempotent, and those
  it committed before are skipped as done.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import TTDError
from .ray_local import ensure_ray
from .relevancy import ScoreConfig
from .store import fingerprint

log = logging.getLogger(__name__)

ACTOR_RETRIES = 3  # restarts of a lost scoring actor, and retries of the shards it held
SHARDS_PER_CALL = 4  # shards handed to an actor at once (its pipeline overlaps them)
GROW_EVERY_S = 5.0  # how often a running pool looks for new GPUs while it waits for results

# Actors kept for the life of this process, for the next call with the same key.
_ACTORS: dict[str, Any] = {"key": None, "job": None, "actors": []}


class Fleet:
    """How many scoring actors the cluster holds now, and what each asks for."""

    def __init__(self, workers: int | None, device: str | None, config: ScoreConfig):
        import ray

        res = ray.cluster_resources()
        self.fixed = workers  # the user's count: never grown
        self.on_gpu = res.get("GPU", 0) > 0 or device == "cuda"
        self.gpus = 1.0 if self.on_gpu else 0.0
        n = self.wanted()
        cpus = int(res.get("CPU", 1))
        want = (config.decode_processes or config.decode_threads) + 1
        # decode CPUs within the cluster's share per actor: a 2-CPU cluster must still place one
        self.cpus = max(1, min(want, cpus // n)) if cpus >= n else 1
        if self.on_gpu and not res.get("GPU", 0):
            log.warning("no GPU in the Ray cluster yet: %d scoring actor(s) wait for GPU nodes (autoscaling)", n)

    def wanted(self) -> int:
        """Actors for the cluster as it is now: the user's count, else one per GPU (at least one)."""
        if self.fixed:
            return self.fixed
        if not self.on_gpu:
            return 1
        import ray

        return max(1, int(ray.cluster_resources().get("GPU", 0)))


def _kept_actors(key: str) -> list[Any]:
    """The actors of the previous call with this key, if all are still alive."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    kept = _ACTORS["actors"] if (_ACTORS["key"], _ACTORS["job"]) == (key, job) else []
    if kept:
        try:
            ray.get([a.alive.remote() for a in kept], timeout=120)
        except Exception as exc:  # noqa: BLE001 - a dead or unreachable actor: start afresh
            log.info("scoring actors of the previous call are gone (%s): starting new ones", type(exc).__name__)
            kept = []
    _ACTORS.update(key=key, job=job, actors=list(kept))
    return kept


def score_on_ray(todo: list[tuple], scorer_args: tuple, *, ray_address: str | None, workers: int | None,
                 device: str | None, config: ScoreConfig, account: Callable[[dict], None]) -> int:
    """Score `todo` (shard, fingerprint, input fingerprint) on Ray actors, handing each shard's result to `account`
    as its call returns. Returns the most actors that worked at once."""
    import ray

    from .score import ShardScorer

    ensure_ray(ray_address)
    fleet = Fleet(workers, device, config)
    key = fingerprint(ray_address, scorer_args, fleet.gpus)
    actor_cls = ray.remote(ShardScorer)

    def start() -> Any:
        return actor_cls.options(num_gpus=fleet.gpus, num_cpus=fleet.cpus, max_restarts=ACTOR_RETRIES,
                                 max_task_retries=ACTOR_RETRIES).remote(*scorer_args, fleet.cpus)

    # a few shards per call, so an actor reads its next shard while it computes one; few enough that shards still
    # spread over every actor, and a lost actor redoes little
    per_call = max(1, min(SHARDS_PER_CALL, len(todo) // fleet.wanted()))
    queue = deque(todo[i:i + per_call] for i in range(0, len(todo), per_call))
    idle = deque(_kept_actors(key))
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
                    log.info("%d new GPU(s) in the cluster: %d scoring actors now", grow, len(_ACTORS["actors"]))
            while idle and queue:
                actor = idle.popleft()
                running[actor.score_shards.remote(queue.popleft())] = actor
            most = max(most, len(running))
            done, _ = ray.wait(list(running), num_returns=1, timeout=GROW_EVERY_S)
            for ref in done:
                idle.append(running.pop(ref))
                for result in ray.get(ref):
                    committed += "skipped" not in result
                    account(result)
    except ray.exceptions.RayActorError as exc:
        raise TTDError(f"a Ray scoring worker was lost and not recovered after {ACTOR_RETRIES} restarts "
                       f"({type(exc).__name__}); {committed} of {len(todo)} shard(s) were committed by this run "
                       "and a re-run scores only the rest") from None
    return most
