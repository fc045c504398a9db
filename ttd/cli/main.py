"""The `ttd` command line. User mistakes print one clear line and exit 2; `--json` prints one JSON document."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.logging import RichHandler

from ttd import __version__
from ttd.cli.options import overrides, settings_command
from ttd.cli.output import ShardProgress, emit, emit_json, err, out, progress
from ttd.configs import SEGMENTATION_DATASETS
from ttd.errors import TTDError, storage_problem
from ttd.pipeline.redact import RedactingFilter

app = typer.Typer(
    help="TTD (Text-Tag Self-Distillation) as a pipeline: synthesise or read image-text corpora, parse tags, score "
    "them against pixels, distill, evaluate, and query everything with SQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=err, show_path=False, show_time=False)
    handler.addFilter(RedactingFilter())  # credentials are masked even in libraries' debug output
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    # our own messages at INFO; libraries (open_clip logs through the root logger) only when they warn
    logging.getLogger("ttd").setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"ttd {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
          _version: Annotated[bool, typer.Option("--version", help="Print the ttd version and exit.",
                                                 callback=_print_version, is_eager=True)] = False) -> None:
    _setup_logging(verbose)


@app.command()
def version() -> None:
    """Print the ttd version."""
    out.print(__version__)


@app.command()
def synth(
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="Output folder or URI (train/, val/, eval/, "
                                                               "pretrain/).")],
    train: Annotated[int, typer.Option(help="Samples in the corpus to label (OUT/train, multi-object captions).")]
    = 2000,
    val: Annotated[int, typer.Option("--val", help="Samples in the labelled validation set (OUT/val): choose "
                                      "thresholds and settings on it, report on OUT/eval.")] = 500,
    eval: Annotated[int, typer.Option("--eval", help="Samples in the labelled eval set (OUT/eval).")] = 500,
    pretrain: Annotated[int, typer.Option(help="Samples in the pre-training corpus (OUT/pretrain, alt-text captions); "
                                          "0 writes none.")] = 0,
    seed: Annotated[int, typer.Option(help="Sample seed: same seed, byte-identical output.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="img2dataset layout: webdataset, parquet or files.")]
    = "webdataset",
    config: Annotated[Path | None, typer.Option(help="YAML with SynthConfig fields (vocabulary, scenes, caption "
                                                   "styles); see docs/SYNTH.md.")] = None,
    classes: Annotated[int | None, typer.Option(help="Number of thing classes (overrides the config).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side in pixels (overrides the config).")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Samples per shard (overrides the config).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Write TagMask-Synth: a deterministic image-text corpus with exact ground-truth tags and masks."""
    from ttd.configs import load_yaml
    from ttd.synth.generate import SynthConfig, synthesize

    overrides = {k: v for k, v in {"n_thing_classes": classes, "image_size": image_size,
                                   "shard_size": shard_size}.items() if v is not None}
    cfg = load_yaml(SynthConfig, config, overrides)
    for name, n in (("train", train), ("val", val), ("eval", eval), ("pretrain", pretrain)):
        if n < 0:
            raise TTDError(f"--{name} must be >= 0, got {n}")
    with progress(not as_json) as bar:
        tasks = {s: bar.add_task(s, total=n, rate="") for s, n in (("train", train), ("val", val), ("eval", eval),
                                                                    ("pretrain", pretrain)) if n}
        summary = synthesize(out_dir, train=train, val=val, eval=eval, pretrain=pretrain, seed=seed, config=cfg,
                             output_format=fmt, progress=lambda split, n: bar.advance(tasks[split], n))
    emit(summary, as_json, f"wrote TagMask-Synth to {out_dir}: " + ", ".join(
        f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str))))


@app.command()
def index(
    corpus: Annotated[str, typer.Option(help="Corpus URI: img2dataset output folder or a JSONL/CSV manifest.")],
    store: Annotated[str, typer.Option(help="Store URI (local path or s3://bucket/prefix); created if absent.")],
    corpus_format: Annotated[str, typer.Option(help="auto, webdataset, parquet, files or manifest.")] = "auto",
    corpus_name: Annotated[str | None, typer.Option(help="Name of the corpus in the store (default: the "
                                                       "folder name).")] = None,
    decode: Annotated[bool, typer.Option(help="Decode every image to find corrupt ones.")] = True,
    include_incomplete: Annotated[bool, typer.Option(help="Also read shards without img2dataset's _stats.json.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Register a corpus in a store and check every shard; bad samples become rows of the `errors` table."""
    from ttd.stages.index import run_index

    with progress(not as_json) as bar:
        shards = ShardProgress(bar, "index", "samples")
        summary = run_index(corpus, store, fmt=corpus_format, name=corpus_name, decode=decode,
                            include_incomplete=include_incomplete, on_start=shards.start,
                            progress=lambda result: shards.shard(result.get("samples", 0)))
    emit(summary, as_json, f"indexed {summary['done']} shard(s), {summary['skipped_done']} already done, "
          f"{len(summary['waiting'])} waiting; {summary['samples']} samples, {summary['errors']} errors, "
          f"{summary['warnings']} warnings")
    _exit_if_shards_failed(summary)


def _exit_if_shards_failed(summary: dict) -> None:
    """Exit 1 naming the shards that failed as a whole; the others are committed, and the next run retries these."""
    if summary.get("failed"):
        err.print(f"{len(summary['failed'])} shard(s) failed and were left for the next run: "
                  + ", ".join(f"{f['shard']} ({f['error']})" for f in summary["failed"][:10]))
        raise typer.Exit(1)


@app.command(cls=settings_command("ttd.configs:ScoreConfig", panel="Scoring settings (ScoreConfig)"))
def score(
    ctx: typer.Context,
    corpus: Annotated[str, typer.Option(help="Corpus URI (the one `ttd parse` read).")],
    store: Annotated[str, typer.Option(help="Store URI holding the corpus's `tags`.")],
    model: Annotated[str | None, typer.Option(help="open_clip model name (e.g. ViT-B-16) or a shipped config "
                                                 "(ttd-tiny, ttd-micro); optional with an artefact.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag, a weights file, or a ttd "
                                                      "artefact folder (carries its own model config).")] = None,
    lora: Annotated[str | None, typer.Option(help="LoRA artefact written by `ttd distill`: merged into the base "
                                             "model (the one its manifest names unless --model/--pretrained).")]
    = None,
    config: Annotated[Path | None, typer.Option(help="YAML with ScoreConfig fields (docs/METHOD.md); the "
                                                "settings' flags override it.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")]
    = None,
    workers: Annotated[int | None, typer.Option(help="Scorer actors (default: one per GPU, else 1); 0 scores "
                                                   "in this process without Ray.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    corpus_format: Annotated[str, typer.Option(help="auto, webdataset, parquet, files or manifest.")] = "auto",
    corpus_name: Annotated[str | None, typer.Option(help="Name of the corpus in the store.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Score every candidate tag against its image (pixel, image and text relevancy), select the image-relevant
    tags and store their heatmaps as pseudo-labels (`relevancy`, `masks`). Done shards are skipped."""
    from ttd.configs import ScoreConfig, load_yaml
    from ttd.stages.score import run_score

    cfg = load_yaml(ScoreConfig, config, overrides(ctx))
    if workers is not None and workers < 0:
        raise TTDError("--workers must be >= 0")
    with progress(not as_json) as bar:
        shards = ShardProgress(bar, "score", "images")
        summary = run_score(corpus, store, cfg, model=model, pretrained=pretrained, lora=lora, ray_address=ray_address,
                            workers=workers, device=device, fmt=corpus_format, name=corpus_name,
                            on_start=shards.start, progress=lambda result: shards.shard(result.get("images", 0)))
    if summary["shards"] and len(summary["unparsed"]) == summary["shards"]:
        raise TTDError(f"none of the {summary['shards']} shard(s) of {corpus!r} has tags in {store!r} yet: run "
                       f"`ttd parse --corpus {corpus} --store {store}` first")
    emit(summary, as_json, f"scored {summary['done']} shard(s), {summary['skipped_done']} already done, "
          f"{len(summary['claimed_elsewhere'])} held by another run, "
          f"{len(summary['unparsed'])} not parsed yet, {len(summary['waiting'])} waiting; "
          f"{summary['images']} images ({summary['images_per_s']} images/s), {summary['tags']} tags, "
          f"{summary['masks']} masks, {summary['errors']} errors")
    _exit_if_shards_failed(summary)


@app.command(cls=settings_command("ttd.configs:PretrainConfig", panel="Training settings (PretrainConfig)"))
def pretrain(
    ctx: typer.Context,
    corpus: Annotated[str, typer.Option(help="Image-text corpus (e.g. TagMask-Synth's OUT/pretrain).")],
    out: Annotated[str, typer.Option(help="Output folder: model.safetensors, model.json, train_log.parquet.")],
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order: same seed, same weights.")] = 0,
    preset: Annotated[str, typer.Option(help="quick (minutes, for tests and smoke runs) or default (the embedded "
                                        "base model's recipe).")] = "default",
    config: Annotated[Path | None, typer.Option(help="YAML with PretrainConfig fields, over the preset; the "
                                                "settings' flags override both.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Contrastive pre-training of a tiny open_clip ViT: the embedded base model, trained offline."""
    from ttd.configs import PRESETS, PretrainConfig, load_yaml
    from ttd.train.pretrain import run_pretrain

    if preset not in PRESETS:
        raise TTDError(f"unknown --preset {preset!r}: use one of {', '.join(PRESETS)}")
    cfg = load_yaml(PretrainConfig, config, overrides(ctx), defaults=PRESETS[preset])
    with progress(not as_json) as bar:
        tasks = {"load": bar.add_task("load", total=cfg.max_samples, rate=""),
                 "train": bar.add_task("train", total=cfg.steps, rate="")}

        def step(phase, n, loss):
            bar.update(tasks[phase], advance=n, rate=f"loss {loss:.3f}" if phase == "train" else "")

        summary = run_pretrain(corpus, out, cfg, seed=seed, device=device, progress=step)
    emit(summary, as_json, f"pre-trained {cfg.model} on {summary['pairs']} pairs, {summary['steps']} steps in "
          f"{summary['seconds']} s (final loss {summary['final_loss']:.3f}): --pretrained {summary['out']}")


@app.command(cls=settings_command("ttd.configs:DistillConfig", panel="Training settings (DistillConfig)"))
def distill(
    ctx: typer.Context,
    corpus: Annotated[str, typer.Option(help="Corpus URI: the images that `ttd score` pseudo-labelled.")],
    store: Annotated[str, typer.Option(help="Store URI holding the corpus's `relevancy` and `masks`.")],
    out: Annotated[str, typer.Option(help="Output folder: lora.safetensors + lora.json (or a full model with "
                                          "--no-lora), usable as `--lora OUT` (or `--pretrained OUT`).")],
    corpus_name: Annotated[str | None, typer.Option(help="Name of the corpus in the store, as parse and score "
                                                    "were given it (default: the folder name).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model name (optional with an artefact).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Base weights: pretrained tag, file or ttd artefact (the "
                                                      "model that scored the pseudo-labels).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of LoRA initialisation and data order.")] = 0,
    config: Annotated[Path | None, typer.Option(help="YAML with DistillConfig fields (docs/METHOD.md); flags "
                                                "override it.")] = None,
    num_workers: Annotated[int, typer.Option(help="Data-parallel training workers through Ray Train (1: in "
                                             "this process).")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster for --num-workers > 1 (default: a local "
                                                    "one).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """TTD fine-tuning: the caption's heatmap is pulled toward the union of its selected tags' heatmaps
    (L_distill), each tag's heatmap toward its own or a zero map (L_tag). Resumes from its last checkpoint;
    skipped when OUT already holds this exact run."""
    from ttd.configs import DistillConfig, load_yaml
    from ttd.stages.distill import run_distill

    cfg = load_yaml(DistillConfig, config, overrides(ctx))
    if num_workers < 1:
        raise TTDError("--num-workers must be >= 1")
    with progress(not as_json) as bar:
        task = bar.add_task("distill", total=cfg.steps * (cfg.refresh_rounds + 1), rate="")

        def step(n, losses):
            bar.update(task, completed=n, rate=f"loss {losses['loss']:.4f} (distill {losses['distill']:.4f}, "
                                               f"tag {losses['tag']:.4f})")

        if num_workers > 1:
            from ttd.stages.distill_ray import run_distill_ray

            summary = run_distill_ray(corpus, store, out, cfg, model=model, pretrained=pretrained, seed=seed,
                                      num_workers=num_workers, ray_address=ray_address, corpus_name=corpus_name)
        else:
            summary = run_distill(corpus, store, out, cfg, model=model, pretrained=pretrained, seed=seed,
                                  device=device, progress=step, corpus_name=corpus_name)
    if as_json:
        emit_json(summary)
    elif summary["skipped"]:
        err.print(f"already distilled: {summary['artefact']} holds this run ({summary['fingerprint']})")
    else:
        rounds = f" x {cfg.refresh_rounds + 1} rounds" if cfg.refresh_rounds else ""
        err.print(f"distilled {summary['steps']} steps{rounds} in {summary['seconds']} s (final losses "
                  f"{summary['final']}): use --lora {summary['artefact']}")




@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option(help="tagmask (TagMask-style eval set, e.g. `ttd synth`'s OUT/eval), or "
                                         "a segmentation benchmark: " + ", ".join(SEGMENTATION_DATASETS) + ".")],
    root: Annotated[str, typer.Option(help="Dataset root in its official layout (docs/SEGEVAL.md).")],
    store: Annotated[str, typer.Option(help="Store URI: eval_predictions, eval_counts and metrics go here.")],
    model: Annotated[str | None, typer.Option(help="open_clip model name or shipped config.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag, weights file or ttd artefact folder.")]
    = None,
    lora: Annotated[str | None, typer.Option(help="LoRA artefact written by `ttd distill`: merged into the base "
                                             "model (the one its manifest names unless --model/--pretrained).")]
    = None,
    head: Annotated[str | None, typer.Option(help="Dense head: maskclip, sclip, clearclip or naclip.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with the evaluation config fields.")] = None,
    max_samples: Annotated[int | None, typer.Option(help="Evaluate only the first N samples.")] = None,
    caption: Annotated[str | None, typer.Option(help="tagmask: how the caption heatmap is made, 'single' (one "
                                                "forward, the default) or 'paper' (448, 4 scales, flip, PAMR).")]
    = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Evaluate a model: tag selection (P/R/F1/accuracy/mAP by image-, text-, pixel-tag scoring and the noun
    baseline) and caption segmentation on TagMask-style data, or open-vocabulary segmentation (mIoU, mFPR, mFNR)."""
    if dataset == "tagmask":
        from ttd.configs import TagmaskEvalConfig, load_yaml
        from ttd.eval.tagmask import run_tagmask_eval, table_text

        overrides: dict[str, Any] = {"max_samples": max_samples} if max_samples else {}
        if head:
            overrides["score"] = {"head": head}
        if caption:
            overrides["caption"] = caption
        cfg = load_yaml(TagmaskEvalConfig, config, overrides)
        with progress(not as_json) as bar:
            task = bar.add_task("evaluate", total=cfg.max_samples, rate="")
            result = run_tagmask_eval(root, store, cfg, model=model, pretrained=pretrained, lora=lora, device=device,
                                      progress=lambda n: bar.advance(task, n))
        if as_json:
            emit_json(result)
        else:
            note = " (already evaluated: stored metrics)" if result["skipped"] else ""
            err.print(f"TagMask evaluation of {result['model_id']}, run {result['run']}{note}")
            out.print(table_text(result["metrics"]))
        return
    if dataset not in SEGMENTATION_DATASETS:
        raise TTDError(f"unknown --dataset {dataset!r}: use tagmask or one of {', '.join(SEGMENTATION_DATASETS)}")
    from ttd.cli.segmentation import evaluate_segmentation_command

    evaluate_segmentation_command(dataset, root, store, model, pretrained, head, config, max_samples, device,
                                  as_json, lora=lora)


@app.command(cls=settings_command("ttd.configs:ParseConfig", panel="Parsing settings (ParseConfig)"))
def parse(
    ctx: typer.Context,
    corpus: Annotated[str, typer.Option(help="Corpus URI: img2dataset output folder or a JSONL/CSV manifest.")],
    store: Annotated[str, typer.Option(help="Store URI (local path or s3://bucket/prefix); created if absent.")],
    config: Annotated[Path | None, typer.Option(help="YAML with ParseConfig fields; flags override it.")] = None,
    corpus_format: Annotated[str, typer.Option(help="auto, webdataset, parquet, files or manifest.")] = "auto",
    corpus_name: Annotated[str | None, typer.Option(help="Name of the corpus in the store (default: the "
                                                       "folder name).")] = None,
    include_incomplete: Annotated[bool, typer.Option(help="Also read shards without img2dataset's _stats.json.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Parse every shard's captions into candidate tags (tables `tags`, `captions`, `errors`); done shards are
    skipped, new ones parsed."""
    from ttd.configs import ParseConfig, load_yaml
    from ttd.stages.parse import run_parse

    cfg = load_yaml(ParseConfig, config, overrides(ctx))
    with progress(not as_json) as bar:
        shards = ShardProgress(bar, "parse", "captions")
        summary = run_parse(corpus, store, cfg, fmt=corpus_format, name=corpus_name,
                            include_incomplete=include_incomplete, on_start=shards.start,
                            progress=lambda result: shards.shard(result.get("captions", 0)))
    emit(summary, as_json, f"parsed {summary['done']} shard(s), {summary['skipped_done']} already done, "
          f"{len(summary['claimed_elsewhere'])} held by another run, {len(summary['waiting'])} waiting; "
          f"{summary['captions']} captions ({summary['parsed']} "
          f"distinct parsed), {summary['tags']} tags, {summary['errors']} errors, "
          f"{summary['warnings']} warnings; {summary['captions_per_s']:,.0f} captions/s")
    _exit_if_shards_failed(summary)


@app.command()
def compact(
    store: Annotated[str, typer.Option(help="Store URI.")],
    rows_per_file: Annotated[int, typer.Option(help="Rows per compacted part file.", min=1)] = 1_000_000,
    min_rows: Annotated[int, typer.Option(help="Leave a table alone while fewer rows than this are not yet "
                                               "compacted.", min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Copy the committed rows of many shards into large Parquet parts, so `ttd sql` over thousands of shards
    reads a few files instead of one per shard. The per-shard files stay the truth; a part is used only while its
    shards keep the fingerprints it was made from (docs/FORMATS.md). Run one compaction at a time, e.g. after a
    nightly run."""
    from ttd.store.compact import compact as run_compact

    summary = run_compact(store, rows_per_file=rows_per_file, min_rows=min_rows)
    emit(summary, as_json, f"compacted: {summary['parts_written']} part(s) written "
          f"({summary['rows_written']:,} rows), {summary['parts_dropped']} stale part(s) dropped, in "
          f"{summary['seconds']:.1f} s")


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One read-only statement over the store's views: SELECT, WITH, "
                                              "PIVOT, SUMMARIZE, DESCRIBE, EXPLAIN.")],
    store: Annotated[str, typer.Option(help="Store URI.")],
    fmt: Annotated[str, typer.Option("--format", help="table (DuckDB's rendering), csv or json (BLOBs as hex).")]
    = "table",
    max_rows: Annotated[int, typer.Option(help="Rows a table shows (first and last ones; the footer says how many "
                                               "there are).", min=1)] = 40,
    show_all: Annotated[bool, typer.Option("--all", help="Show every row in the table format.")] = False,
    out_file: Annotated[str | None, typer.Option("--out", help="Write the result to FILE.parquet, .csv or .json "
                                                               "(DuckDB's writers) instead of printing it.")] = None,
    corpus: Annotated[list[str] | None, typer.Option(help="Extra corpus URI for the `samples` view "
                                                        "(repeatable); corpora the stages read are included.")]
    = None,
) -> None:
    """Query the store with DuckDB, read-only. Views: one per table (tags, relevancy, masks, errors, ...),
    `manifests`, `samples` (successful corpus rows) and `samples_all`."""
    from ttd.store.sql import plain, render, write
    from ttd.store.sql import query as run_query

    if fmt not in ("table", "csv", "json"):
        raise TTDError(f"--format must be table, csv or json, not {fmt!r}")
    result = run_query(store, query, corpus or [])
    if out_file:
        err.print(f"wrote {result.num_rows} rows to {write(result, out_file, store)}", highlight=False)
    elif fmt == "json":
        emit_json(plain(result).to_pylist())
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        sink = sys.stdout.buffer
        pacsv.write_csv(plain(result), sink)
        sink.flush()
    else:
        width = out.width if out.is_terminal else 160
        sys.stdout.write(render(result, None if show_all else max_rows, width) + "\n")


@app.command()
def show(
    store: Annotated[str, typer.Option(help="Store URI with `relevancy` and `masks` for the sample.")],
    key: Annotated[str, typer.Option(help="Sample key.")],
    out: Annotated[str, typer.Option(help="PNG file to write.")],
) -> None:
    """Draw one sample: its image, caption, candidate tags with pixel/image/text scores, and tag heatmaps."""
    from ttd.report.show import render

    err.print(f"wrote {render(store, key, out)}")


@app.command()
def report(
    store: Annotated[str, typer.Option(help="Store URI to report on.")],
    out_dir: Annotated[str, typer.Option("--out", help="Local folder for report.md, report.html and their PNGs.")]
    = "ttd-report",
    samples: Annotated[int, typer.Option(help="Scored samples to draw as heatmap overlays (first keys in order).")]
    = 4,
    runs: Annotated[str | None, typer.Option(help="Comma-separated evaluation run ids (or unique prefixes) to "
                                             "show, in this order; the first is the comparison baseline "
                                             "(default: every run, oldest first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the written paths and runs as JSON on stdout.")]
    = False,
) -> None:
    """Report what a store holds: stages, errors, evaluation metrics with a run-against-run comparison, charts,
    training curves and sample heatmaps, as Markdown and a self-contained HTML page."""
    from ttd.report.report import build_report

    wanted = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    result = build_report(store, out_dir, samples=samples, runs=wanted)
    emit(result, as_json, f"wrote {result['markdown']} and {result['html']}: {len(result['runs'])} evaluation "
          f"run(s), {len(result['plots'])} chart(s), {len(result['samples'])} sample(s)")


from ttd.cli.run import RunCommand  # noqa: E402  (light: the flow and its configs load only when `ttd run` runs)


@app.command(cls=RunCommand)
def run(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="RUN.yaml: corpus, store, model and one section per stage "
                                                   "(configs/demo.yaml, configs/cc3m-gpu-s3.yaml).")] = None,
    print_config: Annotated[bool, typer.Option(help="Print the resolved settings as YAML and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")] = False,
) -> None:
    """Run the pipeline as a Prefect flow: synth and pretrain when configured, then parse, score, distill and
    evaluate. Done work is skipped (cached task results + the store's manifests); new shards are processed. Uses
    Prefect's temporary local server, or the server at PREFECT_API_URL. Every RUN.yaml setting is also a flag named
    by its path, e.g. score.threshold is --score-threshold."""
    from ttd.cli.run import run_command

    run_command(ctx, config, as_json, print_config)


@app.command()
def demo(
    out_dir: Annotated[str, typer.Option("--out", help="Folder for everything the demo makes (synth corpus, store, "
                                                       "LoRA artefact, report); re-running reuses it.")] = "out/demo",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary (flow stages, both models' metrics, "
                                                         "report path) as JSON on stdout.")] = False,
) -> None:
    """Everything on TagMask-Synth, offline, on a CPU in minutes: synthesise, parse, score (local Ray), distill
    (TTD, LoRA) and evaluate the embedded base model against its TTD fine-tune through the Prefect flow, then write
    the report. Ends with the base-vs-TTD table and the report's path."""
    import time

    from ttd.cli.demo import comparison_rows, comparison_text, demo_config
    from ttd.cli.run import run_flow
    from ttd.report.report import build_report

    t0 = time.perf_counter()
    cfg = demo_config(out_dir)
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        # the demo's temporary Prefect server keeps its database beside the demo's output: a ~/.prefect left by
        # another Prefect version cannot break it (its migrations fail on a foreign database)
        home = os.path.abspath(f"{out_dir.rstrip('/')}/.prefect")
        os.makedirs(home, exist_ok=True)  # Prefect's SQLite cannot create its file in a missing folder
        os.environ["PREFECT_HOME"] = home
    summary = run_flow(cfg)
    stages = summary["stages"]
    base = (stages.get("evaluate", {}).get("result") or {}).get("metrics") or {}
    tuned = (stages.get("evaluate_distilled", {}).get("result") or {}).get("metrics") or {}
    if not base or not tuned:
        raise TTDError("the demo flow finished without both evaluations; see the log above")
    report = build_report(cfg.store, f"{out_dir.rstrip('/')}/report", samples=4)
    seconds = round(time.perf_counter() - t0, 1)
    if as_json:
        emit_json({"seconds": seconds, "store": cfg.store, "report": report["html"], "flow": summary,
                    "comparison": comparison_rows(base, tuned)})
        return
    out.print(comparison_text(base, tuned), markup=False, highlight=False)
    err.print(f"demo finished in {seconds:.0f} s; report: {report['html']} (and report.md); store: {cfg.store} "
              "(try `ttd sql --store " + cfg.store + " \"SELECT lemma, count(*) FROM tags GROUP BY 1 ORDER BY 2 DESC "
              "LIMIT 10\"`)")


def main() -> None:
    """The `ttd` entry point: run the command, then leave through `_leave`."""
    try:
        _main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): printed, status 1, as Python does
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    _leave(code)


def _leave(code: int) -> None:
    """Python's own exit steps (finish non-daemon threads and executors, then the atexit handlers: Ray, logging,
    multiprocessing), then os._exit. Skipped is only the C++ static teardown, where a native thread pool (Arrow's,
    DuckDB's) now and then aborts the process ('terminate called without an active exception', exit -6) after the
    command's work is committed."""
    threading._shutdown()  # what the interpreter runs first at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _main() -> None:
    try:
        # without standalone mode click returns a command's typer.Exit(code) instead of raising it
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except TTDError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code and message
        if (problem := storage_problem(exc)) is not None:
            err.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
            sys.exit(2)
        if isinstance(exc, _click_exceptions()):
            # one line, the form of every other error; where to look for the right usage after it
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
            err.print(f"[bold red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        raise


def _click_exceptions() -> tuple[type, ...]:
    """click's ClickException, and the copy of it that newer typer releases vendor (typer._click)."""
    import click

    kinds: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        kinds.append(VendoredClickException)
    except ImportError:
        pass
    return tuple(kinds)


if __name__ == "__main__":
    main()
