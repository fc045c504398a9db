"""Score's resource policy on a Ray cluster (the actor pool itself is `ttd.stages.engine.run_on_ray`).

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

from ttd.configs import ScoreConfig

log = logging.getLogger(__name__)


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
