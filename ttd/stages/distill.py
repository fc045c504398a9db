"""`ttd distill`: TTD step 2, text-tag self-distillation, from the pseudo-labels the `score` stage stored.

The stage: plan (the store's scored shards, the run's fingerprint, skip when the artefact holds it), train one
round or, with `refresh_rounds`, several (`ttd.stages.refresh` re-scores the corpus between them), checkpoint and
resume exactly, write the artefact (`ttd.models.artefact`) and the training log. The losses are in
`ttd.train.distill_losses`, the data stream and batches in `ttd.train.distill_data`, the optimiser recipe and
schedule shared with pre-training in `ttd.train.recipe`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import open_clip
import pyarrow as pa
import torch

from ttd import __version__
from ttd.configs import DistillConfig
from ttd.corpus import open_corpus
from ttd.errors import TTDError
from ttd.models import artefact
from ttd.models.loading import load_model, model_identity
from ttd.models.lora import TOWERS, add_lora, lora_state
from ttd.stages.refresh import committed_config, rescore
from ttd.store import schemas
from ttd.store.store import Store, fingerprint
from ttd.train import checkpoints
from ttd.train.checkpoints import CHECKPOINT_DIR
from ttd.train.distill_data import Batch, DistillStream, TrainItem, make_batch
from ttd.train.distill_losses import losses
from ttd.train.recipe import adamw, lr_at, param_groups

log = logging.getLogger(__name__)

STAGE = "distill"
STAGE_VERSION = 1
REFRESH_DIR = "refresh"  # inside an artefact folder: the intermediate rounds and their refreshed pseudo-labels


def _data_fingerprint(store: Store, corpus_name: str) -> tuple[str, list[str]]:
    """Fingerprint of the pseudo-labels: the committed score manifests of the corpus (fingerprint per shard)."""
    done = sorted((m["shard"], m["fingerprint"]) for m in store.manifests("score") if m.get("corpus") == corpus_name)
    if not done:
        raise TTDError(f"the store has no scored shard of corpus {corpus_name!r}: run `ttd score` first")
    return fingerprint(done), [s for s, _ in done]


def _artefact_fingerprint(out: Path) -> str | None:
    doc = artefact.manifest(out)
    return doc.get("fingerprint") if doc and doc.get("kind") in ("lora", "distill") else None


def with_scoring_settings(config: DistillConfig, store: Store, corpus_name: str) -> DistillConfig:
    """`head: scoring` and `templates: None` filled in from the score stage's manifests of this corpus (the head
    and prompts that made the pseudo-labels); refused when its shards were scored with different ones."""
    if config.head != "scoring" and config.templates is not None:
        return config
    used = committed_config(store, "score", corpus_name, ("head", "templates"), hint="give --head and templates",
                            need="distill with head 'scoring' or the scoring templates")
    return config.model_copy(update={"head": used["head"] if config.head == "scoring" else config.head,
                                     "templates": tuple(used["templates"]) if config.templates is None
                                     else config.templates})


def _scored_corpus(corpus_uri: str, store_uri: str, name: str | None) -> tuple[Any, Store]:
    """The corpus and the store its pseudo-labels are in; refused when the store knows that name as another
    corpus (training would read one corpus's images against another's labels)."""
    corpus = open_corpus(corpus_uri, name=name)
    store = Store(store_uri)
    store.check_corpus(corpus.name, corpus.uri)
    return corpus, store


def run_distill(corpus_uri: str, store_uri: str, out_uri: str, config: DistillConfig | None = None, *,
                model: str | None = None, pretrained: str | None = None, seed: int = 0, device: str | None = None,
                progress: Callable[[int, dict[str, float]], None] | None = None, rank: int = 0,
                world: int = 1, corpus_name: str | None = None) -> dict[str, Any]:
    """Fine-tune and write the artefact at `out_uri` (a local folder); returns a summary.

    With `refresh_rounds` R > 0, R + 1 rounds: each trains from the base model, the first on the store's
    pseudo-labels, every later one on the corpus re-scored by the round before (`ttd.stages.refresh`; the intermediate
    rounds' artefacts and refreshed stores are kept under `out_uri/refresh/`, the store is never written to but
    for the training logs). `progress` counts the steps of all rounds.

    Data-parallel (`world` > 1, one call per rank inside an initialised torch.distributed group, as Ray Train's
    workers are): every rank reads the same stream and trains on its share of each batch; gradients are averaged
    across ranks before each step, so the weights stay identical on every rank; rank 0 alone writes (and
    re-scores between rounds while the other ranks wait).

    Skipped when `out_uri` already holds an artefact with this run's fingerprint. A checkpoint is written every
    `checkpoint_every` steps under `out_uri/checkpoint/`; a re-run with the same inputs resumes from it exactly
    (a finished round is not trained again; a refresh continues shard by shard)."""
    t0 = time.perf_counter()
    config = config or DistillConfig()
    if out_uri.startswith("file://"):
        out_uri = out_uri[len("file://"):]
    if "://" in out_uri:
        raise TTDError("--out must be a local folder (artefacts are loaded from local paths)")
    out = Path(out_uri)
    corpus, store = _scored_corpus(corpus_uri, store_uri, corpus_name)
    config = with_scoring_settings(config, store, corpus.name)
    data_fp, shard_names = _data_fingerprint(store, corpus.name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_id = model_identity(model, pretrained)  # planning needs the identity only: the model loads if there is work
    fp = fingerprint(STAGE, STAGE_VERSION, config.result_config(), model_id, data_fp, seed)
    if _artefact_fingerprint(out) == fp:
        return {"artefact": str(out), "skipped": True, "fingerprint": fp, "seconds": round(time.perf_counter() - t0, 2)}
    if out.exists() and any(out.iterdir()) and _artefact_fingerprint(out) is None \
            and not (out / CHECKPOINT_DIR).exists() and not (out / REFRESH_DIR).exists():
        raise TTDError(f"--out {out_uri!r} exists and is not a ttd distill artefact: give an empty or new folder")
    # as given (None, None: the embedded base model), so `--lora OUT` alone reloads exactly this base
    base = {"name": model, "pretrained": str(Path(pretrained).resolve()) if pretrained and
            Path(pretrained).exists() else pretrained, "model_id": model_id}
    labels, refreshed = store, []
    one_round = config.model_copy(update={"refresh_rounds": 0})
    for r in range(1, config.refresh_rounds + 1):
        done = (r - 1) * config.steps  # steps of the rounds before, for `progress`
        teacher = out / REFRESH_DIR / f"round-{r}"
        run_distill(corpus_uri, labels.uri, str(teacher), one_round, model=model, pretrained=pretrained, seed=seed,
                    device=device, progress=(lambda n, s, d=done: progress(d + n, s)) if progress else None,
                    rank=rank, world=world, corpus_name=corpus.name)
        target = out / REFRESH_DIR / f"labels-{r}"
        if rank == 0:
            log.info("round %d of %d: re-scoring %s with %s", r, config.refresh_rounds + 1, corpus.name, teacher)
            rescore(corpus_uri, corpus.name, shard_names, store, str(teacher), str(target), model=model,
                    pretrained=pretrained, device=str(dev))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's refreshed pseudo-labels
        labels = Store(str(target))
        refreshed.append({"round": r, "teacher": str(teacher), "labels": str(target)})
    shift = config.refresh_rounds * config.steps
    result = _train_round(
        corpus, labels, shard_names, out, one_round, fp=fp, data_fp=data_fp, model=model, pretrained=pretrained,
        seed=seed, dev=dev, progress=(lambda n, s: progress(shift + n, s)) if progress else None, rank=rank,
        world=world, meta={"base": base, "config": config.model_dump(mode="json"), "corpus": corpus_uri,
                           "store": store_uri, "refreshed": refreshed},
        log_store=store, log_config=config)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _train_round(corpus, labels: Store, labelled: list[str], out: Path, config: DistillConfig, *, fp: str,
                 data_fp: str,
                 model: str | None, pretrained: str | None, seed: int, dev: torch.device,
                 progress: Callable[[int, dict[str, float]], None] | None, rank: int, world: int,
                 meta: dict[str, Any], log_store: Store, log_config: DistillConfig) -> dict[str, Any]:
    """One round: train from the base on the pseudo-labels `labels` holds for the `labelled` shards (a refreshed
    store holds all of them, or its refresh failed), write the artefact (fingerprint `fp`) at `out` and commit the
    training log to `log_store`."""
    t0 = time.perf_counter()
    labelled = set(labelled)
    shards = [s for s in corpus.shards() if s.name in labelled]
    torch.manual_seed(seed)
    bundle = load_model(model, pretrained, device=dev)

    net = bundle.model
    if config.lora:
        deltas = add_lora(net, rank=config.lora_rank, alpha=config.lora_alpha, towers=config.lora_towers,
                          targets=config.lora_targets, last_blocks=config.lora_last_blocks, seed=seed,
                          tower_ranks=_tower_ranks(config))
        trainable = {f"{n}.{k}": getattr(d, k) for n, d in deltas.items() for k in ("lora_A", "lora_B")}
        groups = _lora_groups(trainable, config)
    else:
        deltas = {}
        trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
        groups = param_groups(net, config.weight_decay)
    opt = adamw(groups, config.lr)
    resumed = checkpoints.load(out / CHECKPOINT_DIR, fp, trainable, opt)
    start, consumed, log_rows, _ = resumed or (0, 0, [], {})
    if resumed:
        log.info("resuming %s from step %d", out, start)

    stream = DistillStream(corpus, labels, shards, config, seed).items(skip=consumed)
    pool = ThreadPoolExecutor(config.decode_threads)
    clip_loss = open_clip.ClipLoss()
    micro = config.batch_size // config.grad_accum
    autocast = dev.type == "cuda" and config.amp

    def next_batch() -> tuple[Batch, int]:
        nonlocal consumed
        while True:
            items, epoch = [], 0
            while len(items) < micro:
                epoch, item = next(stream)
                consumed += 1
                items.append(item)
            batch = make_batch(items[rank::world], bundle, config, pool)
            if batch is not None:
                return batch, epoch

    net.train()
    deterministic = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:  # CPU float reductions otherwise differ run to run (1e-7): resume would not be exact
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    window_t, window_n, epoch = time.perf_counter(), 0, 0
    last: dict[str, float] = {}
    try:
        for step in range(start, config.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, config) * group.get("lr_scale", 1.0)
            opt.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "distill": 0.0, "tag": 0.0, "contrastive": 0.0}
            for _ in range(config.grad_accum):
                batch, epoch = next_batch()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    terms = losses(net, batch, config, clip_loss)
                (terms["loss"] / config.grad_accum).backward()
                for k in sums:
                    sums[k] += float(terms[k].detach()) / config.grad_accum
                window_n += batch.images.shape[0]
            if world > 1:
                sums = _average_across_ranks(trainable, sums, world)
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            opt.step()
            if not config.lora:
                with torch.no_grad():
                    net.logit_scale.clamp_(0, math.log(100))
            last = sums
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                now = time.perf_counter()
                log_rows.append({"step": step + 1, "epoch": float(epoch), "loss": sums["loss"],
                                 "loss_distill": sums["distill"], "loss_tag": sums["tag"],
                                 "loss_contrastive": sums["contrastive"], "lr": lr_at(step, config),
                                 "samples_per_s": window_n / max(now - window_t, 1e-9)})
                log.info("step %d/%d: loss %.4f (distill %.4f, tag %.4f, contrastive %.4f), %.1f samples/s", step + 1,
                         config.steps, sums["loss"], sums["distill"], sums["tag"], sums["contrastive"],
                         log_rows[-1]["samples_per_s"])
                window_t, window_n = now, 0
            if rank == 0 and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                checkpoints.save(out / CHECKPOINT_DIR, step + 1, consumed, fp, trainable, opt, log_rows)
            if progress and rank == 0:
                progress(step + 1, sums)
    finally:
        pool.shutdown(wait=False)
        torch.use_deterministic_algorithms(deterministic)
    net.eval()
    seconds = time.perf_counter() - t0
    meta = {"fingerprint": fp, **meta, "seed": seed, "corpus_name": corpus.name, "data_fingerprint": data_fp,
            "steps": config.steps, "ttd_version": __version__, "train_seconds": round(seconds, 1)}
    result = {"artefact": str(out), "skipped": False, "fingerprint": fp, "steps": config.steps,
              "resumed_from": start, "final": {k: round(v, 5) for k, v in last.items()}, "seconds": round(seconds, 1),
              "world": world}
    if rank != 0:
        return result
    out.mkdir(parents=True, exist_ok=True)
    if config.lora:
        spec = {"rank": config.lora_rank, "alpha": config.lora_alpha, "towers": list(config.lora_towers),
                "targets": list(config.lora_targets), "last_blocks": config.lora_last_blocks,
                "tower_ranks": _tower_ranks(config)}
        artefact.save_lora(out, lora_state(deltas), spec, meta)
    else:
        artefact.save_model(out, bundle, {"kind": "distill", **meta})
    table = pa.Table.from_pylist(log_rows, schema=schemas.get("train_log").arrow)
    log_store.commit(STAGE, {"run": fp}, fp, {"train_log": table}, stage_version=STAGE_VERSION,
                     config={**log_config.result_config(), "seed": seed, "artefact": str(out)},
                     model_id=bundle.model_id, input_fingerprint=data_fp)
    checkpoints.remove(out / CHECKPOINT_DIR)
    return result


def _tower_ranks(config: DistillConfig) -> dict[str, int] | None:
    return {"text": config.text_lora_rank} if config.text_lora_rank else None


def _lora_groups(trainable: dict[str, torch.nn.Parameter], config: DistillConfig) -> list[dict]:
    """One AdamW group, or one per tower when the text tower has its own lr; `lr_scale` is a group's peak lr
    relative to `lr` (the schedule multiplies it)."""
    if not config.text_lr:
        return [{"params": list(trainable.values()), "weight_decay": config.weight_decay}]
    groups = []
    for tower in TOWERS:
        params = [p for n, p in trainable.items() if n.split(".", 1)[0] == tower]
        peak = config.text_lr if tower == "text" and config.text_lr else config.lr
        if params:
            groups.append({"params": params, "weight_decay": config.weight_decay, "lr_scale": peak / config.lr})
    return groups


def _average_across_ranks(trainable: dict[str, torch.nn.Parameter], sums: dict[str, float],
                          world: int) -> dict[str, float]:
    """All-reduce (mean) every gradient and the logged loss terms over the data-parallel group."""
    import torch.distributed as dist

    for p in trainable.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    values = torch.tensor([sums[k] for k in sums], dtype=torch.float64, device=next(iter(trainable.values())).device)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(sums, values)}


@torch.no_grad()
def validation_losses(corpus_uri: str, store_uri: str, config: DistillConfig | None = None, *,
                      model: str | None = None, pretrained: str | None = None, lora: str | None = None,
                      max_samples: int = 256, device: str | None = None, corpus_name: str | None = None
                      ) -> dict[str, float]:
    """Mean loss terms of a model (base, or with a LoRA artefact) on a scored corpus, without training: a
    held-out check that distillation generalises. Samples in the stream's order for seed 0."""
    config = config or DistillConfig()
    corpus, store = _scored_corpus(corpus_uri, store_uri, corpus_name)
    config = with_scoring_settings(config, store, corpus.name)
    _, shard_names = _data_fingerprint(store, corpus.name)
    shards = [s for s in corpus.shards() if s.name in set(shard_names)]
    bundle = load_model(model, pretrained, device=torch.device(device or "cpu"), lora=lora)
    pool = ThreadPoolExecutor(config.decode_threads)
    clip_loss = open_clip.ClipLoss()
    totals: dict[str, float] = {}
    n = 0

    def flush(items: list[TrainItem]) -> int:
        batch = make_batch(items, bundle, config, pool)
        if batch is None:
            return 0
        terms = losses(bundle.model, batch, config, clip_loss)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v) * batch.images.shape[0]
        return batch.images.shape[0]

    items: list[TrainItem] = []
    for epoch, item in DistillStream(corpus, store, shards, config, 0).items():
        if epoch > 0 or n + len(items) >= max_samples:  # one pass, at most max_samples
            break
        items.append(item)
        if len(items) == config.batch_size:
            n += flush(items)
            items = []
    if items:
        n += flush(items)
    pool.shutdown()
    return {k: v / max(n, 1) for k, v in totals.items()} | {"samples": n}
