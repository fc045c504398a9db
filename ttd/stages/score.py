"""Stage `score`: pixel-tag relevancy for every (sample, candidate tag), selected tags, and their heatmaps.

Per shard (the unit of work everywhere): read the shard's candidates from `tags`, embed the tags the cache lacks
(one text-tower pass per distinct tag and model, cached in the store as `tag_embeddings`), then stream the shard's
images in batches through the dense head and write `relevancy`, `masks` and `errors`. Shards go to a pool of Ray
actors (one GPU each where GPUs exist, CPU actors otherwise); `workers=0` scores in this process without Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from ttd.configs import SCORE_PERF_FIELDS, ScoreConfig
from ttd.corpus import ReadIssue, Sample, ShardRef, open_corpus
from ttd.errors import TTDError
from ttd.models import load_model, model_identity, relevancy
from ttd.ray_local import ensure_ray
from ttd.stages import score_pipeline
from ttd.stages.engine import (
    PlannedShard,
    StageSpec,
    Summary,
    WorkerSpec,
    finish_run,
    held_unless_done,
    plan,
    run_here,
    run_on_ray,
)
from ttd.stages.score_batch import Candidates, ShardCandidates, batch_tables, compute, to_host
from ttd.stages.score_pipeline import (
    DeviceJpegDecoder,
    ImagePrep,
    ProcessDecoder,
    ReadBatch,
    ShardJob,
    ThreadDecoder,
    Timings,
    decode_one,
)
from ttd.store import schemas
from ttd.store.claims import claim
from ttd.store.store import Store, fingerprint

log = logging.getLogger(__name__)

STAGE = "score"
STAGE_VERSION = 1
EMBED_STAGE = "embed_tags"
PARSE_STAGE = "parse"


def result_config(config: ScoreConfig) -> dict:
    return config.model_dump(mode="json", exclude=set(SCORE_PERF_FIELDS))


def embedding_key(model_id: str, templates: tuple[str, ...], precision: str) -> str:
    return fingerprint("tag-embeddings", model_id, list(templates), precision)


class ShardScorer:
    """One worker: loads the model once, then scores shards and commits each to the store.

    The work per shard runs through `score_pipeline`: reading and decoding (host threads) overlap the device
    step (copy, normalise, forward, batched scoring: `score_batch`) and the host step (rows, write, commit).
    `forward` is the model's image pass; the benchmark swaps in a stand-in device that only holds each batch."""

    def __init__(self, corpus: dict, store_uri: str, model: dict, config: dict, device: str | None = None,
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.config = ScoreConfig.model_validate(config).resolved(self.device.type)
        self.bundle = load_model(model.get("name"), model.get("pretrained"), device=self.device,
                                 lora=model.get("lora"))
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float32
        self.bundle.model.to(dtype)  # weights in the run's precision: no autocast, no per-batch casts
        self.model_id = model.get("model_id") or self.bundle.model_id
        self.corpus = open_corpus(corpus["uri"], fmt=corpus["format"], name=corpus["name"],
                                  max_pixels=self.config.max_pixels)
        self.store = Store(store_uri)
        self.emb_key = embedding_key(self.model_id, self.config.templates, self.config.precision)
        self._emb_cache: dict[str, np.ndarray] = {}
        self.prep = ImagePrep(self.bundle.preprocess, self.device, dtype)
        self.norms = relevancy.normalisations(self.config, self.bundle.model)
        processes = self.config.decode_processes if self.prep.split else 0
        self.decoder = ProcessDecoder(self.prep.host_steps, self.config.max_pixels, processes, self._error_row) \
            if processes else ThreadDecoder(self._decode, self.config.decode_threads)
        if self.config.decoder == "device":
            if self.prep.tensor_steps is None:
                log.warning("decoder 'device': the model's preprocessing has a step without a tensor form; "
                            "decoding with PIL on the host")
            else:
                self.decoder = DeviceJpegDecoder(self.decoder, self.config.max_pixels)
        self.timings = Timings()
        # the model's two passes per batch; the benchmark swaps in a stand-in device that only holds each batch
        self.forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = self._forward
        self.encode_captions: Callable[[list[str]], torch.Tensor] = self._encode_captions

    # ---- tag embeddings ---------------------------------------------------------------------------------------
    def _tag_embeddings(self, shard: ShardRef, tags: list[str]) -> dict[str, np.ndarray]:
        need = [t for t in tags if t not in self._emb_cache]
        if need:
            cached = self.store.read("tag_embeddings", columns=["tag", "embedding"],
                                     filter=(ds.field("model") == self.emb_key) & ds.field("tag").isin(need))
            for tag, emb in zip(cached["tag"].to_pylist(), cached["embedding"].to_numpy(zero_copy_only=False)):
                self._emb_cache[tag] = np.asarray(emb, dtype=np.float32)
        missing = sorted({t for t in tags if t not in self._emb_cache})
        if missing:
            emb = relevancy.encode_tags(self.bundle, missing, self.config.templates).cpu().numpy()
            for tag, e in zip(missing, emb):
                self._emb_cache[tag] = e
            table = pa.table({"tag": missing, "embedding": pa.array(list(emb), pa.list_(pa.float32())),
                              "model_id": [self.model_id] * len(missing)})
            part = {"model": self.emb_key, **shard.partition}
            self.store.commit(EMBED_STAGE, part, fingerprint(missing), {"tag_embeddings": table},
                              model_id=self.model_id)
        return {t: self._emb_cache[t] for t in tags}

    # ---- per shard ------------------------------------------------------------------------------------------------
    def _candidates(self, shard: ShardRef) -> tuple[ShardCandidates, dict[str, str]]:
        where = (ds.field("corpus") == shard.corpus) & (ds.field("shard") == shard.name)
        tags = self.store.read("tags", columns=["key", "tag_index", "text", "lower"], filter=where)
        # the parsed (normalised) caption, which the tag offsets index into; the raw caption if parse wrote none
        t = self.store.read("captions", columns=["key", "caption"], filter=where)
        return ShardCandidates(tags), dict(zip(t["key"].to_pylist(), t["caption"].to_pylist()))

    def score_shards(self, planned: list[PlannedShard], on_result: Callable[[dict], None] | None = None,
                     pipelined: bool | None = None) -> list[dict[str, Any]]:
        """Score and commit shards in order, the next one's reads overlapping this one's work; one result each
        (also handed to `on_result` as each shard commits)."""
        jobs = [ShardJob(p.shard, p.fingerprint, p.input_fingerprint) for p in planned]

        def finish(job: ShardJob) -> dict[str, Any]:
            result = self._finish(job)
            if on_result:
                on_result(result)
            return result

        try:
            with torch.no_grad():
                return score_pipeline.run(
                    jobs, open_job=self._open, decoder=self.decoder, device_step=self._device_step,
                    host_step=self._host_step, finish_job=finish, batch_size=self.config.batch_size,
                    pin=self.device.type == "cuda", pipelined=self.config.pipelined if pipelined is None else pipelined,
                    timings=self.timings)
        finally:
            for job in jobs:  # claims still held after a failure (a shard read but not committed)
                self._release(job)

    def _open(self, job: ShardJob) -> Iterator[Sample]:
        """Claim the shard; unless it is held elsewhere or done, read its candidates and yield its samples that
        have some (read problems and samples without candidates become `errors` rows)."""
        state: dict[str, Any] = {}
        try:
            held = claim(self.store, STAGE, job.shard.partition, state=state)
            holder = held.__enter__()
            job.claim = held  # released by _finish, or after a failure
            if holder is None:
                job.held = held_unless_done(self.store, STAGE, job.shard.partition, job.fingerprint, state)
        except TTDError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store failed this shard's claim: the run goes on
            job.skipped = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            return
        if holder is not None:
            job.skipped = {"skipped": "claimed", "holder": holder}
            return
        if job.held is None:
            job.skipped = {"skipped": "done"}
            return
        job.candidates, job.captions = self._candidates(job.shard)
        for item in self.corpus.read_shard(job.shard):
            if isinstance(item, ReadIssue):
                job.errors.append(item.as_row(STAGE))
            elif item.key not in job.candidates:
                job.errors.append({"key": item.key, "stage": STAGE, "error_type": "no_candidates",
                                   "message": "caption has no candidate tags in `tags` (empty caption?); not scored",
                                   "severity": "warning", "source": item.source})
            else:
                yield item

    def _decode(self, sample: Sample) -> tuple[torch.Tensor | None, dict | None]:
        image, error = decode_one(self.prep.host, sample.image_bytes, sample.max_pixels)
        return (image, None) if error is None else (None, self._error_row(sample, error))

    @staticmethod
    def _error_row(sample: Sample, error: tuple[str, str]) -> dict:
        return {"key": sample.key, "stage": STAGE, "error_type": error[0], "message": error[1], "severity": "error",
                "source": sample.source}

    def close(self) -> None:
        """Stop the decoding threads or processes."""
        self.decoder.close()

    process = score_shards  # the stage engine's worker interface (`ttd.stages.engine.ShardWorker`)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return relevancy.dense_features(self.bundle.model, images, self.config.head, self.config.flip)

    def _encode_captions(self, captions: list[str]) -> torch.Tensor:
        return relevancy.encode_texts(self.bundle, captions)

    def _images(self, batch: ReadBatch) -> torch.Tensor | None:
        """The batch's images on the device, normalised: host-decoded ones copied, the encoded JPEGs decoded there.
        A JPEG the device decoder refuses is decoded by PIL instead, or becomes an `errors` row and leaves the batch
        (None when no image is left)."""
        parts = [] if batch.images is None else [batch.images.to(self.device, non_blocking=True)]
        if batch.encoded:
            decoded = self.prep.decode([e.data for e in batch.encoded])
            kept = batch.samples[:len(batch.samples) - len(batch.encoded)]
            for enc, image in zip(batch.encoded, decoded):
                if image is None:  # the device decoder refused it: PIL decodes it, or names its error
                    image, error = self._decode(enc.sample)
                    if error is not None:
                        batch.job.errors.append(error)
                        continue
                    image = image.to(self.device)
                parts.append(image.unsqueeze(0))
                kept.append((enc.sample.key, enc.sample.caption))
            batch.samples, batch.encoded = kept, []
        return self.prep.device(torch.cat(parts)) if parts else None

    def _device_step(self, batch: ReadBatch) -> dict[str, torch.Tensor] | None:
        """Everything that touches the device, for one batch; nothing here waits for it."""
        job, cfg = batch.job, self.config
        images = self._images(batch)
        if images is None:
            return None
        if job.context is None:  # the shard's tag-embedding matrix on the device, and each tag row's place in it
            tags = job.candidates.vocabulary()
            emb = self._tag_embeddings(job.shard, tags)
            matrix = torch.from_numpy(np.stack([emb[t] for t in tags])).to(self.device)
            rows = pc.index_in(job.candidates.table.column("lower"), value_set=pa.array(tags)).to_numpy()
            job.context = (matrix, rows.astype(np.int64))
        matrix, tag_rows = job.context
        keys = [k for k, _ in batch.samples]
        idx, counts = job.candidates.rows(keys)
        batch.rows = (idx, counts)
        global_emb, dense = self.forward(images)
        cap_emb = self.encode_captions([job.captions.get(k) or c or "" for k, c in batch.samples])
        cands = Candidates.from_flat(tag_rows[idx], counts)
        return compute(global_emb, dense, cap_emb, matrix, cands.to(self.device), normalisation=self.norms,
                       selection=cfg.selection, threshold=cfg.threshold)

    def _host_step(self, batch: ReadBatch, out: dict[str, torch.Tensor] | None) -> None:
        """One copy back, then the batch's rows as Arrow columns."""
        if out is None:  # every image of the batch failed to decode
            return
        host = to_host(out)
        idx, counts = batch.rows
        candidates = batch.job.candidates.table.select(["tag_index", "text"]).take(pa.array(idx))
        rel, masks = batch_tables(host, [k for k, _ in batch.samples], counts, candidates,
                                  threshold=self.config.threshold, model_id=self.model_id, head=self.config.head,
                                  masks_for=self.config.masks_for)
        batch.job.relevancy.append(rel)
        batch.job.masks.append(masks)
        batch.job.images += len(counts)

    def _finish(self, job: ShardJob) -> dict[str, Any]:
        """Commit the shard (its data files, then its manifest) and release its claim."""
        try:
            if job.skipped is not None:
                return {"shard": job.shard.name, **job.skipped}
            tables = {
                "relevancy": _concat(job.relevancy, "relevancy"), "masks": _concat(job.masks, "masks"),
                "errors": pa.Table.from_pylist(job.errors, schema=schemas.get("errors").arrow),
            }
            self.store.commit(STAGE, job.shard.partition, job.fingerprint, tables, stage_version=STAGE_VERSION,
                              config=result_config(self.config), model_id=self.model_id,
                              input_fingerprint=job.input_fingerprint, fresh=job.held is not None and job.held.fresh)
            return {"shard": job.shard.name, "images": job.images, "tags": tables["relevancy"].num_rows,
                    "masks": tables["masks"].num_rows, "errors": len(job.errors),
                    "seconds": time.perf_counter() - job.started}
        finally:
            self._release(job)

    @staticmethod
    def _release(job: ShardJob) -> None:
        if job.claim is not None:
            held, job.claim = job.claim, None
            held.__exit__(None, None, None)


def _concat(tables: list[pa.Table], name: str) -> pa.Table:
    return pa.concat_tables(tables) if tables else schemas.get(name).arrow.empty_table()


def stage_spec(config: ScoreConfig, model_id: str) -> StageSpec:
    """What score's fingerprint covers: the output-affecting config, the model, the shard's files and the
    fingerprint of its `parse` commit (new tags mean new scores)."""
    return StageSpec(STAGE, STAGE_VERSION, result_config(config), model_id, after=PARSE_STAGE, blocked="unparsed")


def scoring_device_type(ray_address: str | None, workers: int | None, device: str | None) -> str:
    """The device type shards will be scored on: the one asked for; else, in this process (`workers=0`), cuda
    when it sees a GPU; else (Ray actors) cuda when the cluster has GPUs. What `ScoreConfig.resolved` takes."""
    if device:
        return torch.device(device).type
    if workers == 0:
        return "cuda" if torch.cuda.is_available() else "cpu"
    import ray

    ensure_ray(ray_address)
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def run_score(
    corpus_uri: str,
    store_uri: str,
    config: ScoreConfig | None = None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    lora: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    device: str | None = None,
    fmt: str = "auto",
    name: str | None = None,
    include_incomplete: bool = False,
    shards: Collection[str] | None = None,
    planned: list[PlannedShard] | None = None,
    progress: Callable[[dict], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score every parsed shard not yet scored under this config and model. `workers=0`: no Ray. `shards` limits
    the run to those shard names; `planned` hands it shards a flow planned already (no planning here).
    `progress(result)` after each shard scored here; `on_start(n)` when the model is loaded and n shards are to
    be scored."""
    config = config or ScoreConfig()
    corpus = open_corpus(corpus_uri, fmt=fmt, name=name)
    store = Store(store_uri, create=True)
    store.register_corpus(corpus.name, corpus.uri, corpus.format)
    corpus_spec = {"uri": corpus.uri, "format": corpus.format, "name": corpus.name}
    model_spec = {"name": model, "pretrained": pretrained, "lora": lora}
    # the model's identity (part of every fingerprint) without building it: a run with nothing to do loads nothing
    model_id = model_identity(model, pretrained, lora=lora)
    model_spec["model_id"] = model_id
    # 'auto' decoder and precision decided for where the shards will be scored: they are part of the fingerprint
    config = config.resolved(scoring_device_type(ray_address, workers, device))
    summary = Summary(STAGE, corpus.name, ("images", "tags", "masks", "errors"), blocked_name="unparsed",
                      extra={"model_id": model_id}, progress=progress)
    if planned is None:
        planned = plan(corpus, store, stage_spec(config, model_id), include_incomplete=include_incomplete,
                       shards=shards)
    todo = summary.planned(planned)
    spec = WorkerSpec(ShardScorer, (corpus_spec, store_uri, model_spec, config.model_dump(mode="json"), device))
    if todo and workers == 0:
        run_here(spec, todo, summary.account, on_start)  # one pipeline: the next shard is read while one computes
    elif todo:
        from ttd.stages.score_ray import Fleet

        ensure_ray(ray_address)
        load_model(model, pretrained, device="cpu", lora=lora)  # bad weights: one clear error here, not per actor
        if on_start:
            on_start(len(todo))
        summary.extra["workers"] = run_on_ray(spec, todo, Fleet(workers, device, config), summary.account,
                                              key=fingerprint(ray_address, spec.args))
    elif on_start:
        on_start(0)
    finish_run(store, STAGE, corpus.name, summary.counts["done"])
    out = summary.as_dict()
    out["images_per_s"] = round(out["images"] / max(out["seconds"], 1e-9), 2)
    log.info("score %s: %d shard(s) committed, %d already done, %d waiting, %d unparsed; %d images, %d error "
             "row(s), %.1f images/s", corpus.name, out["done"], out["skipped_done"], len(out["waiting"]),
             len(out["unparsed"]), out["images"], out["errors"], out["images_per_s"])
    return out
