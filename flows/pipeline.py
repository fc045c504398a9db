"""`ttd_pipeline`: the Prefect 3 flow over every stage. Thin: what to run, what is done and how to run it all live
in `ttd.pipeline` (the library never imports Prefect); this module only turns those units into tasks.

    synth? -> pretrain? -> parse (batches of shards) -> score (batches) -> distill? -> evaluate (base[, fine-tuned])

- Caching across runs: every task's cache key is the unit's key from `ttd.pipeline` (a hash of the stage
  fingerprints of its shards, or of a single-unit stage's inputs and settings); results persist as JSON under
  `<store>/_prefect/results` (or `flow.result_storage`), so a re-run over the same corpus restores every task from
  the cache, and a re-run after new shards arrive runs only the batches that hold them. A unit whose output the
  store does not hold is run even when a cached result exists.
- Retries: transient failures (S3 and network errors, a lost Ray actor, shards that failed as a whole) are retried
  with exponential backoff; user mistakes and bugs fail at once.
- Failure: a failed task does not fail a Prefect 3 flow by itself, so after each stage the flow checks its tasks
  and raises `StageFailed` if any failed; later stages do not start and the flow run ends Failed. Committed shards
  are kept, so the next run resumes.

Run it with `ttd run --config RUN.yaml`, from Python with `run_pipeline(config)`, or as a deployment
(prefect.yaml): `ttd_pipeline(config_path="configs/cc3m-gpu-s3.yaml", overrides={...})`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from ttd import pipeline as lib
from ttd.runconfig import RunConfig, resolve_run_config

# ---------------------------------------------------------------- task options


def _key_from_parameters(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and lib.is_transient(exc)


def _result_storage(cfg: RunConfig) -> Any:
    """A local folder (a Path), a saved Prefect block for an fsspec URL, a block slug, or None (Prefect's own)."""
    target = cfg.flow.result_storage
    if target == "prefect":
        return None
    if target and target.startswith("block:"):
        return target.removeprefix("block:")
    target = target or lib.results_uri(cfg)
    if "://" not in target or target.startswith("file://"):
        path = Path(target.removeprefix("file://")).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(basepath=target)
    block.save(f"ttd-results-{hashlib.sha256(target.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def _configured(t: Any, cfg: RunConfig, storage: Any, *, cached: bool = True, refresh: bool = False,
                name: str | None = None) -> Any:
    options: dict[str, Any] = {
        "retries": cfg.flow.retries,
        "retry_delay_seconds": exponential_backoff(cfg.flow.retry_delay_seconds) if cfg.flow.retries else 0,
        "retry_jitter_factor": 0.2,
        "retry_condition_fn": _retry_if_transient,
    }
    if cached:
        options.update(cache_key_fn=_key_from_parameters, persist_result=True, result_serializer="json",
                       refresh_cache=refresh or cfg.flow.refresh_cache)
        if storage is not None:
            options["result_storage"] = storage
    if name:
        options["task_run_name"] = name
    return t.with_options(**options)


# ---------------------------------------------------------------- tasks (each one call into the library)

@task(name="plan", cache_policy=NO_CACHE)
def plan_task(stage: str, cfg: RunConfig, model_id: str | None = None) -> list[dict[str, Any]]:
    batches = lib.plan_parse(cfg) if stage == "parse" else lib.plan_score(cfg, model_id or "")
    return [b.as_dict() for b in batches]


@task(name="model-id", cache_policy=NO_CACHE)
def model_id_task(cfg: RunConfig) -> str:
    return lib.model_id(cfg)


@task(name="parse-batch")
def parse_batch(cfg: RunConfig, shards: list[str], cache_key: str) -> dict[str, Any]:
    return lib.run_parse_batch(cfg, shards)


@task(name="score-batch")
def score_batch(cfg: RunConfig, shards: list[str], cache_key: str) -> dict[str, Any]:
    return lib.run_score_batch(cfg, shards)


@task(name="synth")
def synth_task(cfg: RunConfig, cache_key: str) -> dict[str, Any]:
    return lib.run_synth(cfg)


@task(name="pretrain")
def pretrain_task(cfg: RunConfig, cache_key: str) -> dict[str, Any]:
    return lib.run_pretrain_step(cfg)


@task(name="distill")
def distill_task(cfg: RunConfig, cache_key: str) -> dict[str, Any]:
    return lib.run_distill_step(cfg)


@task(name="evaluate")
def evaluate_task(cfg: RunConfig, cache_key: str, lora: str | None = None) -> dict[str, Any]:
    return lib.run_evaluate(cfg, lora)


BATCH_TASKS = {"parse": parse_batch, "score": score_batch}


# ---------------------------------------------------------------- stage drivers

def _outcome(state: Any) -> tuple[str, Any, BaseException | None]:
    if state.is_completed():
        return state.name, state.result(raise_on_failure=False), None
    exc = state.result(raise_on_failure=False)
    return state.name, None, exc if isinstance(exc, BaseException) else RuntimeError(state.message or state.name)


def _run_batches(stage: str, cfg: RunConfig, storage: Any, batches: list[lib.Batch]) -> dict[str, Any]:
    clock = lib.Stopwatch()
    logger = get_run_logger()
    runnable = [b for b in batches if b.shards]
    waiting = [name for b in batches for name in b.waiting]
    if waiting:
        logger.warning("%s: %d shard(s) cannot run yet (no _stats.json, or not parsed): %s", stage, len(waiting),
                       ", ".join(waiting[:5]))
    outcomes, errors = [], []
    for start in range(0, len(runnable), cfg.flow.concurrency):
        window = runnable[start:start + cfg.flow.concurrency]
        futures = [_configured(BATCH_TASKS[stage], cfg, storage, refresh=not b.done,
                               name=f"{stage}-{b.label}").submit(cfg, b.shards, b.key) for b in window]
        wait(futures)
        for b, fut in zip(window, futures):
            state_name, result, exc = _outcome(fut.state)
            outcomes.append({"batch": b.as_dict(), "state": state_name, "result": result})
            if exc is not None:
                errors.append(exc)
    report = lib.stage_report(stage, outcomes, clock(), waiting)
    logger.info("%s: %s (%d batch(es), %d cached; %d shard(s) processed, %d already done)", stage, report["status"],
                report["batches"], report["cached_batches"], report["shards_processed"],
                report["shards_already_done"])
    if errors:
        raise lib.StageFailed(stage, errors)
    return report


def _run_unit(t: Any, cfg: RunConfig, storage: Any, unit: lib.Unit, *args: Any, name: str | None = None
              ) -> dict[str, Any]:
    clock = lib.Stopwatch()
    state = _configured(t, cfg, storage, refresh=not unit.done, name=name or unit.stage)(cfg, unit.key, *args,
                                                                                         return_state=True)
    state_name, result, exc = _outcome(state)
    report = lib.unit_report(unit.stage, state_name, result, clock())
    get_run_logger().info("%s: %s", name or unit.stage, report["status"])
    if exc is not None:
        raise lib.StageFailed(unit.stage, [exc])
    return report


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    name = (params.get("config") or {}).get("name") or (Path(params["config_path"]).stem
                                                         if params.get("config_path") else "ttd")
    return f"{name}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- the flow

@flow(name="ttd-pipeline", flow_run_name=_flow_run_name, log_prints=False)
def ttd_pipeline(config: dict[str, Any] | None = None, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every configured stage of TTD over a corpus; done work is skipped (Prefect cache + the store's manifests).

    `config`: a RUN.yaml document as a mapping; or `config_path`: a RUN.yaml file (relative to the working
    directory); `overrides`: settings laid over either (e.g. {"flow": {"stages": ["parse", "score"]}})."""
    from prefect.runtime import flow_run

    clock = lib.Stopwatch()
    cfg = resolve_run_config(config, config_path, overrides)
    logger = get_run_logger()
    stages = cfg.stages()
    logger.info("ttd run %r: %s; corpus %s, store %s", cfg.name, " -> ".join(stages), cfg.corpus, cfg.store)
    storage = _result_storage(cfg)
    reports: dict[str, Any] = {}

    if "synth" in stages:
        reports["synth"] = _run_unit(synth_task, cfg, storage, lib.synth_unit(cfg))
    if "pretrain" in stages:
        reports["pretrain"] = _run_unit(pretrain_task, cfg, storage, lib.pretrain_unit(cfg))
    if "parse" in stages:
        batches = [lib.Batch(**b) for b in plan_task("parse", cfg)]
        reports["parse"] = _run_batches("parse", cfg, storage, batches)
    mid = model_id_task(cfg) if {"score", "distill", "evaluate"} & set(stages) else None
    score_batches: list[lib.Batch] = []
    if "score" in stages or "distill" in stages:
        score_batches = [lib.Batch(**b) for b in plan_task("score", cfg, mid)]
    if "score" in stages:
        reports["score"] = _run_batches("score", cfg, storage, score_batches)
    if "evaluate" in stages:
        reports["evaluate"] = _run_unit(evaluate_task, cfg, storage, lib.evaluate_unit(cfg, mid),
                                        name="evaluate-base")
    if "distill" in stages:
        reports["distill"] = _run_unit(distill_task, cfg, storage, lib.distill_unit(cfg, mid, score_batches))
        artefact = (reports["distill"]["result"] or {}).get("artefact") or cfg.distill.out
        if "evaluate" in stages:  # the fine-tuned model, beside the base model's evaluation
            reports["evaluate_distilled"] = _run_unit(evaluate_task, cfg, storage,
                                                      lib.evaluate_unit(cfg, mid, artefact), artefact,
                                                      name="evaluate-distilled")
    summary = {"name": cfg.name, "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name,
               "corpus": cfg.corpus, "store": cfg.store, "model_id": mid, "stages": reports,
               "all_done_before": all(r["status"] == "already done" for r in reports.values()),
               "seconds": round(clock(), 3)}
    logger.info("ttd run %r finished in %.1f s: %s", cfg.name, summary["seconds"],
                ", ".join(f"{k} {r['status']}" for k, r in reports.items()))
    return summary


def run_pipeline(config: RunConfig | dict[str, Any], *, return_state: bool = False) -> Any:
    """Run the flow in this process (against PREFECT_API_URL, or Prefect's temporary local server)."""
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json")
    return ttd_pipeline(config=config, return_state=return_state)


__all__ = ["ttd_pipeline", "run_pipeline"]
