"""Starting or joining Ray, the one way score and distill do it."""

from __future__ import annotations

import os


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` (else at $RAY_ADDRESS, Ray's own convention: `ray job submit` sets it for the
    job it runs), or start a new local Ray with `num_cpus` logical CPUs; nothing when Ray is already initialised
    in this process. Returns True when this call started or joined (so the caller may stop it). Without either the
    Ray is always a new local one (`address="local"`), never one ray.init would find on the machine: a `ray start`
    head, or the stale record of a stopped one, which refuses `num_cpus`."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return True
