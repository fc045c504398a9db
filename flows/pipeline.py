"""`ttd_pipeline`: the Prefect 3 flow over every stage. Thin: what to run, what is done and how to run it all live
in `ttd.pipeline.units` (the library never imports Prefect); this module only turns those units into tasks.

    synth? -> pretrain? -> parse (batches of shards) -> score (batches) -> distill? -> evaluate (base[, fine-tuned])

- Caching across runs: every task's cache key is the unit's key from `ttd.pipeline.units` (a hash of the stage
  fingerprints of its shards, or of a single-unit stage's inputs and settings); results persist as JSON under
  `<store>/_prefect/results` (or `flow.result_storage`), so a re-run over the same corpus restores every task from
  the cache, and a re-run after new shards arrive runs only the batches that hold them. A unit whose output the
  store does not hold is run even when a cached result exists.
- Retries: transient failures (S3 and network errors, a lost Ray actor, shards that failed as a whole) are retried
  with exponential backoff; user mistakes and bugs fail at once.
- Failure: a failed task does not fail a Prefect 3 flow by itself, so after each stage the flow checks its tasks
  and raises `StageFailed` if any failed; later stages do not start and the flow run ends Failed. Committed shards
  are kept, so the next run resumes.

- Deployments (prefect.yaml): a run's `overrides` (and `config`) deep-merge over the deployment's own, so
  `--param overrides='{"score": {"threshold": 0.6}}'` changes that setting and keeps the nightly's stages. A run
  whose settings would make a scheduled deployment over the same store recompute its shards says so in a warning.
- What a run shows: its name carries the deployment (or the config's name) and the corpus; the library's INFO lines
  reach the flow's logs; a Markdown artifact (key `ttd-<deployment or name>-<corpus>`) holds the stage table.

Run it with `ttd run --config RUN.yaml`, from Python with `run_pipeline(config)`, or as a deployment
(prefect.yaml): `ttd_pipeline(config_path="configs/local.yaml", corpus=..., store=..., overrides={...})`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from ttd.configs import deep_merge
from ttd.errors import TTDError
from ttd.pipeline import units as lib
from ttd.pipeline.runconfig import RunConfig, resolve_run_config

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

@task(name="plan", task_run_name="plan-{stage}", cache_policy=NO_CACHE)
def plan_task(stage: str, cfg: RunConfig, model_id: str | None = None) -> list[dict[str, Any]]:
    batches = lib.plan_parse(cfg) if stage == "parse" else lib.plan_score(cfg, model_id or "")
    return [b.as_dict() for b in batches]


@task(name="model-id", cache_policy=NO_CACHE)
def model_id_task(cfg: RunConfig) -> str:
    return lib.model_id(cfg)


@task(name="parse-batch")
def parse_batch(cfg: RunConfig, planned: list[dict[str, Any]], cache_key: str) -> dict[str, Any]:
    return lib.run_parse_batch(cfg, planned)


@task(name="score-batch")
def score_batch(cfg: RunConfig, planned: list[dict[str, Any]], cache_key: str) -> dict[str, Any]:
    return lib.run_score_batch(cfg, planned)


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
                               name=f"{stage}-{b.label}").submit(cfg, b.planned, b.key) for b in window]
        wait(futures)
        for b, fut in zip(window, futures):
            state_name, result, exc = _outcome(fut.state)
            outcomes.append({"batch": b.as_dict(), "state": state_name, "result": result})
            if exc is not None:
                errors.append(exc)
    report = lib.stage_report(stage, outcomes, clock(), waiting)
    rate = f", {report['items_per_s']:.1f} {lib.ITEMS[stage][1]}" if report["items_per_s"] is not None else ""
    logger.info("%s: %s (%d batch(es), %d cached; %d shard(s) processed, %d already done, %d waiting; %d error "
                "row(s)%s)", stage, report["status"], report["batches"], report["cached_batches"],
                report["shards_processed"], report["shards_already_done"], len(waiting), report["errors"], rate)
    if errors:
        raise lib.StageFailed(stage, errors, report)
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
        raise lib.StageFailed(unit.stage, [exc], report)
    return report


# ---------------------------------------------------------------- parameters, names, logs

_PLACEHOLDER = re.compile(r"^\{\{\s*\$(\w+)\s*\}\}$")  # prefect.yaml's "{{ $TTD_CORPUS }}", left unresolved


def _unset_placeholders(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Parameters with env placeholders that `prefect deploy` could not fill (the variable was unset) taken out, and
    {parameter: variable} of those, for the error that says which variable to set."""
    out, unset = dict(params), {}
    for name, value in params.items():
        m = _PLACEHOLDER.match(value) if isinstance(value, str) else None
        if m:
            out[name] = None
            unset[name] = m.group(1)
    return out, unset


def _deployment() -> tuple[str | None, dict[str, Any]]:
    """(name, parameters) of the deployment this flow run belongs to; (None, {}) outside a deployment."""
    from prefect.runtime import deployment

    if not deployment.id:
        return None, {}
    return deployment.name, dict(deployment.parameters or {})


def _resolve(params: dict[str, Any], deployed: dict[str, Any]) -> RunConfig:
    """The run's RunConfig: the run's `config` and `overrides` deep-merged over the deployment's own (Prefect
    replaces a top-level parameter whole), then resolved like `ttd run`."""
    merged = dict(params)
    for name in ("config", "overrides"):
        if isinstance(deployed.get(name), dict) and isinstance(params.get(name), dict):
            merged[name] = deep_merge(deployed[name], params[name])
    merged, unset = _unset_placeholders(merged)
    try:
        return resolve_run_config(merged.get("config"), merged.get("config_path"), merged.get("overrides"),
                                  corpus=merged.get("corpus"), store=merged.get("store"))
    except TTDError as exc:
        if unset:
            hint = "; ".join(f"{name} came from ${var}, unset when the deployment was created: re-deploy with "
                             f"{var}=... prefect deploy, or pass --param {name}=... to the run"
                             for name, var in unset.items())
            raise TTDError(f"{exc} ({hint})") from None
        raise


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _flow_run_name() -> str:
    """<deployment, or the config's name>-<corpus>-<UTC time>: nightly, full and hand-started runs tell apart."""
    from prefect.runtime import flow_run

    params = dict(flow_run.parameters or {})
    deployment_name, deployed = _deployment()
    try:
        cfg = _resolve(params, deployed)
        parts = [deployment_name or cfg.name, lib.corpus_label(cfg)]
    except Exception:  # noqa: BLE001 - a bad config fails inside the run, with its message; the name stays plain
        parts = [deployment_name or "ttd"]
    return "-".join([*parts, _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")])


# Prefect's loggers (console and API handlers) and ours: their handlers mask credentials. Done when this module is
# imported too, since the engine logs the flow run's start before the flow's body runs.
MASKED_LOGGERS = ("prefect", "prefect.flow_runs", "prefect.task_runs", "ttd", "")


def _mask_prefect_handlers() -> None:
    from ttd.pipeline.redact import mask_handlers

    mask_handlers(*(logging.getLogger(name) for name in MASKED_LOGGERS))


@contextmanager
def _library_logs_in_prefect() -> Iterator[None]:
    """ttd's INFO lines into the flow run's logs (Prefect sends its own loggers only; the `ttd` logger sits at
    WARNING in a worker's process). PREFECT_LOGGING_EXTRA_LOGGERS=ttd, where set, already added the handler.
    Every handler of Prefect's loggers and ours masks credentials, as the CLI's does: what reaches the console,
    the worker's log and the Prefect server is the same masked line."""
    from prefect.logging.handlers import APILogHandler

    from ttd.pipeline.redact import mask_handlers

    logger = logging.getLogger("ttd")
    level, added = logger.level, None
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        added = APILogHandler()
        logger.addHandler(added)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    masked = mask_handlers(*(logging.getLogger(name) for name in MASKED_LOGGERS))
    try:
        yield
    finally:
        for undo in reversed(masked):
            undo()
        logger.setLevel(level)
        if added is not None:
            logger.removeHandler(added)


def _schedule_warnings(cfg: RunConfig) -> list[str]:
    """One line per scheduled deployment of this flow over the same corpus and store whose settings this run
    changes: its next run will find the shards this run commits stale and recompute them."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=["ttd-pipeline"])))
    warnings = []
    for d in deployments:
        if d.paused or not any(s.active for s in d.schedules):
            continue
        try:
            theirs = _resolve(d.parameters or {}, {})
        except TTDError:
            continue
        changes = lib.recompute_changes(theirs, cfg)
        if changes:
            warnings.append(f"this run's settings differ from scheduled deployment 'ttd-pipeline/{d.name}' on the "
                            f"same store and corpus ({'; '.join(changes[:6])}): its next run will recompute every "
                            "shard this run commits")
    return warnings


def _publish(summary: dict[str, Any], deployment_name: str | None) -> None:
    key = f"ttd-{_slug(deployment_name or summary['name'])}-{_slug(summary['corpus_name'])}"[:250]
    create_markdown_artifact(markdown=lib.run_markdown(summary), key=key,
                             description=f"ttd run over {summary['corpus']}: stage table")


# ---------------------------------------------------------------- the flow

_mask_prefect_handlers()


@flow(name="ttd-pipeline", flow_run_name=_flow_run_name, log_prints=False)
def ttd_pipeline(config: dict[str, Any] | None = None, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None, corpus: str | None = None,
                 store: str | None = None) -> dict[str, Any]:
    """Every configured stage of TTD over a corpus; done work is skipped (Prefect cache + the store's manifests).

    `config_path`: a RUN.yaml file (relative to the working directory); `config`: a RUN.yaml document as a
    mapping, deep-merged over the file; `overrides`: settings laid over both (e.g. {"score": {"threshold": 0.6}});
    `corpus`, `store`: the corpus and store URIs, over everything. In a deployment, a run's `config` and
    `overrides` deep-merge over the deployment's own."""
    with _library_logs_in_prefect():
        return _run_flow({"config": config, "config_path": config_path, "overrides": overrides, "corpus": corpus,
                          "store": store})


def _run_flow(params: dict[str, Any]) -> dict[str, Any]:
    from prefect.runtime import flow_run

    clock = lib.Stopwatch()
    deployment_name, deployed = _deployment()
    cfg = _resolve(params, deployed)
    logger = get_run_logger()
    stages = cfg.stages()
    logger.info("ttd run %r%s: %s; corpus %s, store %s", cfg.name,
                f" (deployment {deployment_name})" if deployment_name else "", " -> ".join(stages), cfg.corpus,
                cfg.store)
    warnings = []
    try:
        warnings = _schedule_warnings(cfg)
    except Exception as exc:  # noqa: BLE001 - advice only: never fail a run for it
        logger.debug("could not compare with scheduled deployments: %s", exc)
    for line in warnings:
        logger.warning(line)
    storage = _result_storage(cfg)
    reports: dict[str, Any] = {}
    summary = {"name": cfg.name, "deployment": deployment_name, "flow_run_id": str(flow_run.id),
               "flow_run_name": flow_run.name, "corpus": cfg.corpus, "corpus_name": lib.corpus_label(cfg),
               "store": cfg.store, "model_id": None, "stages": reports, "warnings": warnings}
    try:
        _run_stages(cfg, stages, storage, reports, summary)
    except BaseException as exc:
        if isinstance(exc, lib.StageFailed) and exc.report is not None:
            reports[exc.stage] = exc.report
        summary.update(status="failed", error=str(exc)[:500], seconds=round(clock(), 3))
        _publish(summary, deployment_name)
        raise
    summary.update(status="done", seconds=round(clock(), 3),
                   all_done_before=all(r["status"] == "already done" for r in reports.values()))
    _publish(summary, deployment_name)
    logger.info("ttd run %r finished in %.1f s: %s", cfg.name, summary["seconds"],
                ", ".join(f"{k} {r['status']}" for k, r in reports.items()))
    return summary


def _run_stages(cfg: RunConfig, stages: list[str], storage: Any, reports: dict[str, Any],
                summary: dict[str, Any]) -> None:
    if "synth" in stages:
        reports["synth"] = _run_unit(synth_task, cfg, storage, lib.synth_unit(cfg))
    if "pretrain" in stages:
        reports["pretrain"] = _run_unit(pretrain_task, cfg, storage, lib.pretrain_unit(cfg))
    if "parse" in stages:
        batches = [lib.Batch(**b) for b in plan_task("parse", cfg)]
        reports["parse"] = _run_batches("parse", cfg, storage, batches)
    mid = model_id_task(cfg) if {"score", "distill", "evaluate"} & set(stages) else None
    summary["model_id"] = mid
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


def run_pipeline(config: RunConfig | dict[str, Any], *, return_state: bool = False) -> Any:
    """Run the flow in this process (against PREFECT_API_URL, or Prefect's temporary local server)."""
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json")
    return ttd_pipeline(config=config, return_state=return_state)


__all__ = ["ttd_pipeline", "run_pipeline"]
