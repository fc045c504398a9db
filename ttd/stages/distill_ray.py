"""`ttd distill --num-workers K`: data-parallel TTD fine-tuning through Ray Train.

Each Ray Train worker runs `run_distill` as one rank of the torch.distributed group that `TorchTrainer` sets up
(gloo on CPU, NCCL on GPUs); ranks average their gradients every step, so all of them hold the same weights and
rank 0 writes the checkpoints, the artefact and the training log. `--out` must be a folder every worker can reach
(local Ray: any local folder; a cluster: shared storage), and so must the corpus and the store (S3 works).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ttd.configs import DistillConfig
from ttd.errors import TTDError
from ttd.models import artefact
from ttd.ray_local import ensure_ray
from ttd.stages.distill import run_distill


def _worker(args: dict[str, Any]) -> None:
    import ray.train
    import torch

    ctx = ray.train.get_context()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args["threads"])
    summary = run_distill(args["corpus"], args["store"], args["out"], DistillConfig(**args["config"]),
                          model=args["model"], pretrained=args["pretrained"], seed=args["seed"], device=device,
                          rank=ctx.get_world_rank(), world=ctx.get_world_size(), corpus_name=args["corpus_name"])
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})


def run_distill_ray(corpus_uri: str, store_uri: str, out_uri: str, config: DistillConfig | None = None, *,
                    model: str | None = None, pretrained: str | None = None, seed: int = 0, num_workers: int = 2,
                    ray_address: str | None = None, corpus_name: str | None = None) -> dict[str, Any]:
    """Train with `num_workers` data-parallel ranks; returns rank 0's summary (as `run_distill`)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = config or DistillConfig()
    if config.batch_size % (config.grad_accum * num_workers):
        raise TTDError(f"batch_size {config.batch_size} must be a multiple of grad_accum x num_workers "
                       f"({config.grad_accum} x {num_workers})")
    out = os.path.abspath(out_uri)
    # logical CPUs: one per worker plus Ray Train's controller, or its workers wait for a free slot
    started = ensure_ray(ray_address, max(os.cpu_count() or 1, num_workers + 1))  # stopped below: no stray cluster
    storage = tempfile.mkdtemp(prefix="ttd-ray-")  # Ray Train's own run state; ours is the checkpoint in `out`
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)
        args = {"corpus": corpus_uri, "store": store_uri, "out": out, "config": config.model_dump(mode="json"),
                "model": model, "pretrained": pretrained, "seed": seed, "threads": threads,
                "corpus_name": corpus_name}
        trainer = TorchTrainer(_worker, train_loop_config=args,
                               scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus >= num_workers,
                                                            resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name="ttd-distill", storage_path=storage))
        result = trainer.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()
    if result.error:
        raise TTDError(f"distributed distillation failed: {result.error}")
    manifest = artefact.manifest(Path(out)) or {}
    return {"artefact": out, "skipped": False, "fingerprint": manifest["fingerprint"], "steps": config.steps,
            "num_workers": num_workers, "seconds": manifest.get("train_seconds"), "final": {}}
