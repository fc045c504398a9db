"""The pipeline behind `ttd run`, without Prefect: units of work, their cache keys, what is done, how to run one.

`flows/pipeline.py` wraps these functions in Prefect tasks and decides nothing itself. Per stage:

- parse and score work in **batches of shards**: consecutive shards of the corpus (by position, so a batch keeps its
  members when new shards are appended), run by calling the stage on just those shard names. A batch's cache key is
  a hash of (stage, store, each member's stage fingerprint), so it changes exactly when the stage would redo a
  member: new input files, config, model or parse output. A shard still waiting for img2dataset's `_stats.json`
  (or, for score, not parsed yet) enters the key as "waiting": when it completes, its batch runs again and the
  stage skips the members that are done.
- synth, pretrain, distill and evaluate are one unit each, keyed by their inputs and settings.

Every unit also says whether the store already holds its output (`done`). The flow ignores a cached result for a
unit that is not done (a store emptied while the cache survived), so the cache can only ever save work, never lose
it; the stages themselves skip done shards by their manifests in any case.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ttd.configs import SCORE_PERF_FIELDS
from ttd.corpus import default_name, open_corpus
from ttd.errors import TTDError
from ttd.models import artefact
from ttd.pipeline.runconfig import RunConfig
from ttd.stages.engine import DONE, PlannedShard, plan
from ttd.store.store import Store, fingerprint
from ttd.store.uri import resolve

log = logging.getLogger(__name__)

RESULTS_DIR = "_prefect/results"
KEY_NAMESPACE = "ttd-run/1"  # bump to invalidate every cached task result at once


# ---------------------------------------------------------------- units of work

@dataclass
class Batch:
    """Consecutive shards of one stage: the unit of caching, retry and progress in the flow."""

    stage: str
    index: int
    shards: list[str]  # runnable members (complete; for score: parsed)
    waiting: list[str]  # members that cannot run yet
    done: bool  # the store holds every runnable member under its current fingerprint
    key: str
    planned: list[dict[str, Any]] = field(default_factory=list)  # the runnable members as planned (PlannedShard)

    @property
    def label(self) -> str:
        names = self.shards or self.waiting
        return f"{names[0]}-{names[-1]}" if len(names) > 1 else names[0]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Unit:
    """A stage that runs as one task (synth, pretrain, distill, evaluate)."""

    stage: str
    key: str
    done: bool
    detail: dict[str, Any] = field(default_factory=dict)


def make_batches(stage: str, store_uri: str, planned: list[PlannedShard], size: int) -> list[Batch]:
    """Consecutive planned shards in batches of `size`; each batch carries its runnable members as planned, so the
    task that runs it does not plan again."""
    batches = []
    for index, start in enumerate(range(0, len(planned), size)):
        chunk = planned[start:start + size]
        key = fingerprint(KEY_NAMESPACE, stage, store_uri, [(p.shard.name, p.fingerprint or "waiting") for p in chunk])
        runnable = [p for p in chunk if p.fingerprint is not None]
        waiting = [p.shard.name for p in chunk if p.fingerprint is None]
        done = all(p.status == DONE for p in runnable)
        batches.append(Batch(stage, index, [p.shard.name for p in runnable], waiting, done, key,
                             [p.as_dict() for p in runnable]))
    return batches


def _corpus(cfg: RunConfig):
    return open_corpus(cfg.corpus, fmt=cfg.corpus_format, name=cfg.corpus_name)


# ---------------------------------------------------------------- parse

def plan_parse(cfg: RunConfig) -> list[Batch]:
    from ttd.stages.parse import stage_spec
    from ttd.text.nlp import english_model_id

    planned = plan(_corpus(cfg), Store(cfg.store, create=True), stage_spec(cfg.parse, english_model_id()),
                   include_incomplete=cfg.include_incomplete)
    return make_batches("parse", cfg.store, planned, cfg.flow.shards_per_batch)


def run_parse_batch(cfg: RunConfig, planned: list[dict[str, Any]]) -> dict[str, Any]:
    """Parse a batch's shards as the flow planned them (no planning again)."""
    from ttd.stages.parse import run_parse

    summary = run_parse(cfg.corpus, cfg.store, cfg.parse, fmt=cfg.corpus_format, name=cfg.corpus_name,
                        planned=[PlannedShard.from_dict(p) for p in planned])
    if summary["failed"]:  # the batch's other shards are committed; a retry redoes only these
        raise ShardsFailed("parse", summary["failed"])
    return jsonable(summary)


# ---------------------------------------------------------------- score

def model_id(cfg: RunConfig) -> str:
    """The scoring model's identity (name + weights digest), as every stage fingerprints it."""
    from ttd.models import model_identity

    return model_identity(cfg.model.name, cfg.model.pretrained)


def plan_score(cfg: RunConfig, mid: str) -> list[Batch]:
    from ttd.stages.score import scoring_device_type, stage_spec

    # fingerprinted as `run_score` will: with 'auto' settings decided for the device the shards are scored on
    score = cfg.score.resolved(scoring_device_type(cfg.ray.address, cfg.ray.workers, cfg.device))
    planned = plan(_corpus(cfg), Store(cfg.store, create=True), stage_spec(score, mid),
                   include_incomplete=cfg.include_incomplete)
    return make_batches("score", cfg.store, planned, cfg.flow.shards_per_batch)


def run_score_batch(cfg: RunConfig, planned: list[dict[str, Any]]) -> dict[str, Any]:
    """Score a batch's shards as the flow planned them (no planning again)."""
    from ttd.stages.score import run_score

    return jsonable(run_score(cfg.corpus, cfg.store, cfg.score, model=cfg.model.name,
                              pretrained=cfg.model.pretrained, ray_address=cfg.ray.address, workers=cfg.ray.workers,
                              device=cfg.device, fmt=cfg.corpus_format, name=cfg.corpus_name,
                              planned=[PlannedShard.from_dict(p) for p in planned]))


BATCH_RUNNERS = {"parse": run_parse_batch, "score": run_score_batch}


# ---------------------------------------------------------------- synth and pretrain

def _read_json(uri: str) -> dict | None:
    loc = resolve(uri)
    try:
        with loc.fs.open(loc.path, "rb") as f:
            doc = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def synth_unit(cfg: RunConfig) -> Unit:
    from ttd.synth.generate import GENERATOR_VERSION

    step = cfg.synth
    assert step is not None
    settings = {"train": step.train, "eval": step.eval, "pretrain": step.pretrain, "seed": step.seed,
                "format": step.format, "config": step.config.model_dump(mode="json")}
    key = fingerprint(KEY_NAMESPACE, "synth", step.out, GENERATOR_VERSION, settings)
    return Unit("synth", key, synth_done(cfg))


def synth_done(cfg: RunConfig) -> bool:
    """`synth.out` holds a finished TagMask-Synth output of exactly these settings (synth.json is written last)."""
    from ttd.synth.generate import GENERATOR_VERSION

    step = cfg.synth
    assert step is not None
    doc = _read_json(f"{step.out.rstrip('/')}/synth.json")
    if doc is None:
        return False
    sizes = {name: doc.get("splits", {}).get(name, {}).get("samples", 0) for name in ("train", "eval", "pretrain")}
    return (doc.get("generator_version") == GENERATOR_VERSION and doc.get("seed") == step.seed
            and doc.get("output_format") == step.format
            and doc.get("config") == json.loads(json.dumps(step.config.model_dump(mode="json")))
            and sizes == {"train": step.train, "eval": step.eval, "pretrain": step.pretrain})


def run_synth(cfg: RunConfig) -> dict[str, Any]:
    """Write TagMask-Synth unless `out` already holds it (regenerating would change every shard's fingerprint)."""
    from ttd.synth.generate import synthesize

    step = cfg.synth
    assert step is not None
    if synth_done(cfg):
        log.info("TagMask-Synth at %s is already there with these settings", step.out)
        return {"out": step.out, "skipped": True}
    summary = synthesize(step.out, train=step.train, eval=step.eval, pretrain=step.pretrain, seed=step.seed,
                         config=step.config, output_format=step.format)
    return jsonable({"out": step.out, "skipped": False, **summary})


def _shard_fingerprints(uri: str) -> list[str]:
    try:
        return [s.fingerprint for s in open_corpus(uri).shards()]
    except TTDError:  # not written yet (synth runs first in the same flow): the key is computed after it
        return []


def pretrain_unit(cfg: RunConfig) -> Unit:
    step = cfg.pretrain
    assert step is not None
    key = fingerprint(KEY_NAMESPACE, "pretrain", step.out, step.corpus, _shard_fingerprints(step.corpus),
                      step.seed, step.config.model_dump(mode="json"))
    return Unit("pretrain", key, pretrain_done(cfg))


def pretrain_done(cfg: RunConfig) -> bool:
    """`pretrain.out` holds an artefact trained with this recipe, seed and corpus."""
    step = cfg.pretrain
    assert step is not None
    out = Path(step.out)
    if not (out / artefact.ARTEFACT_WEIGHTS).is_file():
        return False
    doc = artefact.manifest(out) or {}
    return (doc.get("kind") == "pretrain" and doc.get("seed") == step.seed and doc.get("corpus") == step.corpus
            and doc.get("config") == step.config.model_dump())


def run_pretrain_step(cfg: RunConfig) -> dict[str, Any]:
    from ttd.train.pretrain import run_pretrain

    step = cfg.pretrain
    assert step is not None and step.corpus is not None
    if pretrain_done(cfg):
        log.info("base model at %s is already trained with this recipe", step.out)
        return {"out": step.out, "skipped": True}
    summary = run_pretrain(step.corpus, step.out, step.config, seed=step.seed, device=cfg.device)
    return jsonable({"skipped": False, **summary})


# ---------------------------------------------------------------- evaluate

def _artefact_id(path: str | None) -> str | None:
    """Identity of a model artefact folder: its files' names, sizes and modification times."""
    if path is None:
        return None
    loc = resolve(path)
    try:
        files = sorted(loc.fs.find(loc.path, detail=True).items())
    except FileNotFoundError:
        return None
    return fingerprint([(p.rsplit("/", 1)[-1], info.get("size"), str(info.get("mtime") or info.get("ETag")))
                        for p, info in files])


def evaluate_unit(cfg: RunConfig, mid: str, lora: str | None = None) -> Unit:
    ev = cfg.evaluate
    assert ev is not None and ev.root is not None
    settings = {"dataset": ev.dataset, "bg_threshold": ev.bg_threshold, "max_samples": ev.max_samples,
                "score": cfg.score.model_dump(mode="json", exclude=set(SCORE_PERF_FIELDS))}
    key = fingerprint(KEY_NAMESPACE, "evaluate", cfg.store, ev.root, _shard_fingerprints(ev.root), mid,
                      _artefact_id(lora), settings)
    try:
        docs = Store(cfg.store).manifests("evaluate")
    except TTDError:
        docs = []
    # loose on purpose: `done` only decides whether a cached result may be used, and the key already holds the rest
    done = any(d.get("model_id", "").startswith(mid) and d.get("config", {}).get("root") == ev.root for d in docs)
    return Unit("evaluate", key, done and lora is None, {"model_id": mid, "lora": lora})


def run_evaluate(cfg: RunConfig, lora: str | None = None) -> dict[str, Any]:
    from ttd.configs import TagmaskEvalConfig
    from ttd.eval.tagmask import run_tagmask_eval

    ev = cfg.evaluate
    assert ev is not None and ev.root is not None
    config = TagmaskEvalConfig(score=cfg.score, bg_threshold=ev.bg_threshold, max_samples=ev.max_samples)
    extra: dict[str, Any] = {}
    if lora is not None:
        extra["lora"] = lora
    result = run_tagmask_eval(ev.root, cfg.store, config, model=cfg.model.name, pretrained=cfg.model.pretrained,
                              device=cfg.device, **extra)
    return jsonable({"lora": lora, **result})


# ---------------------------------------------------------------- distill

def distill_unit(cfg: RunConfig, mid: str, score_batches: list[Batch]) -> Unit:
    step = cfg.distill
    assert step is not None and step.out is not None
    key = fingerprint(KEY_NAMESPACE, "distill", cfg.store, step.out, mid, [b.key for b in score_batches],
                      step.config.result_config(), step.seed)
    done = _artefact_id(step.out) is not None
    return Unit("distill", key, done)


def run_distill_step(cfg: RunConfig) -> dict[str, Any]:
    """TTD fine-tuning on the store's pseudo-labels; the summary's `artefact` is then evaluated."""
    from ttd.stages.distill import run_distill

    step = cfg.distill
    assert step is not None and step.out is not None
    summary = run_distill(cfg.corpus, cfg.store, step.out, step.config, model=cfg.model.name,
                          pretrained=cfg.model.pretrained, seed=step.seed, device=cfg.device,
                          corpus_name=cfg.corpus_name)
    return jsonable(summary)


# ---------------------------------------------------------------- failures

class ShardsFailed(Exception):
    """Some shards of a batch failed as a whole (an unreadable file, a failed write); the rest are committed."""

    def __init__(self, stage: str, failed: list[dict[str, Any]]):
        self.failed = failed
        names = ", ".join(f["shard"] for f in failed[:5])
        super().__init__(f"{stage}: {len(failed)} shard(s) failed ({names}): {failed[0]['error']}")


class StageFailed(TTDError):
    """A stage of the flow failed after its retries; what it committed is kept and a re-run resumes from there."""

    def __init__(self, stage: str, errors: list[BaseException], report: dict[str, Any] | None = None):
        self.stage = stage
        self.errors = errors
        self.report = report  # the stage's report up to the failure, for the run's summary
        self.user_error = bool(errors) and all(isinstance(e, TTDError) for e in errors)
        first = errors[0] if errors else None
        what = f"{type(first).__name__}: {first}" if first is not None and not isinstance(first, TTDError) \
            else str(first)
        more = f" (and {len(errors) - 1} more batch(es))" if len(errors) > 1 else ""
        hint = "" if self.user_error else "; committed shards are kept: re-run to resume"
        super().__init__(f"stage {stage} failed: {what}{more}{hint}")


_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs")


def is_transient(exc: BaseException) -> bool:
    """Worth a retry: storage and network errors, a lost Ray actor or node, shards that failed as a whole. Not: a
    user mistake (TTDError: bad URI, unknown model, schema version), or a bug (ValueError, KeyError, ...)."""
    if isinstance(exc, TTDError):
        return False
    if isinstance(exc, ShardsFailed):
        return True
    if isinstance(exc, OSError):  # S3 and network errors arrive as OSError subclasses through fsspec
        return not isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError))
    for cls in type(exc).__mro__:
        module = cls.__module__ or ""
        if module.startswith(_TRANSIENT_MODULES):
            return True
        if module.startswith("ray.") and cls.__name__ in {
            "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "ObjectLostError",
            "OwnerDiedError", "NodeDiedError", "WorkerCrashedError", "RaySystemError", "GetTimeoutError",
            "ObjectFetchTimedOutError", "OutOfMemoryError", "ObjectStoreFullError", "LocalRayletDiedError",
        }:
            return True
    return False


# ---------------------------------------------------------------- reports

def batch_counts(stage: str, summary: dict[str, Any] | None) -> tuple[int, int]:
    """(shards processed, shards found already done) from a batch task's summary."""
    if not summary:
        return 0, 0
    return int(summary.get("done", 0)), int(summary.get("skipped_done", 0))


# what a batch summary counts, per stage: (items it processed, their unit in a rate)
ITEMS = {"parse": ("captions", "captions/s"), "score": ("images", "images/s")}


def stage_report(stage: str, outcomes: list[dict[str, Any]], seconds: float,
                 waiting: list[str] | None = None) -> dict[str, Any]:
    """outcomes: {"batch": Batch.as_dict(), "state": Prefect state name, "result": summary or None}."""
    processed = skipped = cached = errors = items = 0
    item_key, _ = ITEMS.get(stage, ("", ""))
    for o in outcomes:
        if o["state"] == "Cached":  # the result is an earlier run's: nothing was processed now
            p, s = 0, len(o["batch"]["shards"])
        else:
            p, s = batch_counts(stage, o["result"])
            errors += int((o["result"] or {}).get("errors", 0))
            items += int((o["result"] or {}).get(item_key, 0))
        o["processed"], o["skipped"] = p, s
        processed += p
        skipped += s
        cached += o["state"] == "Cached"
    failed = [o for o in outcomes if o["state"] not in ("Completed", "Cached")]
    if failed:
        status = "failed"
    elif all(o["state"] == "Cached" for o in outcomes) or processed == 0:
        status = "already done"
    else:
        status = "done"
    return {"stage": stage, "status": status, "batches": len(outcomes), "cached_batches": cached,
            "failed_batches": len(failed), "shards_processed": processed, "shards_already_done": skipped,
            "waiting": list(waiting or []), "errors": errors, "items": items,
            "items_per_s": round(items / seconds, 1) if processed and seconds > 0 else None,
            "seconds": round(seconds, 3), "outcomes": outcomes}


def unit_report(stage: str, state: str, result: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    skipped = bool(result and result.get("skipped"))
    if state not in ("Completed", "Cached"):
        status = "failed"
    elif state == "Cached" or skipped:
        status = "already done"
    else:
        status = "done"
    return {"stage": stage, "status": status, "state": state, "seconds": round(seconds, 3), "result": result}


def results_uri(cfg: RunConfig) -> str:
    """Where the flow's task results (its cache across runs) persist by default: under the store."""
    return f"{cfg.store.rstrip('/')}/{RESULTS_DIR}"


def jsonable(obj: Any) -> Any:
    """A summary as plain JSON types (numpy scalars and paths become numbers and strings)."""
    def default(o: Any) -> Any:
        if hasattr(o, "item"):
            return o.item()
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def run_markdown(summary: dict[str, Any]) -> str:
    """A run's summary (the flow's return value) as Markdown: what ran where, and one row per stage."""
    lines = [f"# ttd run `{summary['name']}`: {summary.get('status', 'done')}", "",
             f"- deployment: `{summary.get('deployment') or '(none: ttd run / Python)'}`",
             f"- corpus: `{summary['corpus']}`", f"- store: `{summary['store']}`",
             f"- model: `{summary.get('model_id') or '-'}`", f"- seconds: {summary.get('seconds', 0):.1f}"]
    if summary.get("error"):
        lines.append(f"- error: {summary['error']}")
    for warning in summary.get("warnings") or []:
        lines.append(f"- warning: {warning}")
    lines += ["", "| stage | status | shards processed | already done | waiting | errors | rate | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in (summary.get("stages") or {}).items():
        _, unit = ITEMS.get(r.get("stage", name), ("", ""))
        rate = f"{r['items_per_s']:,.1f} {unit}" if r.get("items_per_s") is not None else "-"
        if "shards_processed" in r:
            row = [name, r["status"], r["shards_processed"], r["shards_already_done"], len(r["waiting"]),
                   r["errors"], rate, f"{r['seconds']:.1f}"]
        else:
            row = [name, r["status"], "-", "-", "-", "-", "-", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    waiting = sorted({w for r in (summary.get("stages") or {}).values() for w in r.get("waiting") or []})
    if waiting:
        lines += ["", f"Waiting (no `_stats.json` yet, or not parsed): {', '.join(waiting[:20])}"
                      + (f" and {len(waiting) - 20} more" if len(waiting) > 20 else "")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- settings that decide what a stage recomputes

def corpus_label(cfg: RunConfig) -> str:
    """The corpus's name in the store (its `corpus` partition), as `open_corpus` derives it, without opening it."""
    assert cfg.corpus is not None
    return cfg.corpus_name or default_name(cfg.corpus)


def _same_store(a: str, b: str) -> bool:
    def norm(uri: str) -> str:
        uri = uri.removeprefix("file://").rstrip("/")
        return uri if "://" in uri else str(Path(uri).expanduser().resolve())
    return norm(a) == norm(b)


def result_settings(cfg: RunConfig, stages: set[str]) -> dict[str, Any]:
    """Every setting that enters the fingerprints of `stages` (parse, score), as {"score.threshold": 0.5, ...};
    speed settings (batch sizes, threads, workers) are left out, as the stages leave them out."""
    from ttd.stages.score import result_config

    out: dict[str, Any] = {}
    if stages & {"parse", "score"}:  # score reads the parse output, so parse settings reach its fingerprint too
        out.update({f"parse.{k}": v for k, v in cfg.parse.output_config().items()})
    if "score" in stages:
        out.update({f"score.{k}": v for k, v in result_config(cfg.score).items()})
        out.update({"model.name": cfg.model.name, "model.pretrained": cfg.model.pretrained})
    return out


def recompute_changes(scheduled: RunConfig, run: RunConfig) -> list[str]:
    """The settings in which `run` differs from a `scheduled` run over the same corpus in the same store, for the
    stages both run: after `run` commits, the scheduled run finds every such shard stale and recomputes it. [] when
    they write different corpora or stores, or agree."""
    if not _same_store(scheduled.store, run.store) or corpus_label(scheduled) != corpus_label(run):
        return []
    stages = set(scheduled.stages()) & set(run.stages()) & {"parse", "score"}
    theirs, ours = result_settings(scheduled, stages), result_settings(run, stages)
    return [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)]


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


__all__ = ["Batch", "Unit", "make_batches", "plan_parse", "plan_score", "run_parse_batch", "run_score_batch",
           "model_id", "synth_unit", "run_synth", "pretrain_unit", "run_pretrain_step", "evaluate_unit",
           "run_evaluate", "distill_unit", "run_distill_step", "is_transient", "ShardsFailed",
           "StageFailed", "stage_report", "unit_report", "results_uri", "jsonable"]
