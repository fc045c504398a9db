"""RUN.yaml: one file that says what `ttd run` (the Prefect flow over every stage) does.

The sections reuse each stage's own config model (ParseConfig, ScoreConfig, SynthConfig, PretrainConfig), so a
setting means the same in `ttd run` as in the stage's own command. Unknown keys are refused. Every setting is also a
command-line flag named by its path: `score.threshold` is `--score-threshold`, `synth.config.image_size` is
`--synth-config-image-size` (`ttd.cli.run.run_flags` lists them; `--model` and `--pretrained` are kept short, as in
every other command). Precedence: defaults < the YAML file < flags.

Paths left out are derived where there is one obvious answer: with a `synth` section the corpus defaults to
`<synth.out>/train`, the evaluation set to `<synth.out>/eval` and the pre-training corpus to `<synth.out>/pretrain`;
with a `pretrain` section the model defaults to its artefact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from ttd.configs import PRESETS as PRETRAIN_PRESETS
from ttd.configs import DistillConfig, ParseConfig, PretrainConfig, ScoreConfig, build, deep_merge, load_yaml, read_yaml
from ttd.synth.generate import SynthConfig

STAGES = ("synth", "pretrain", "parse", "score", "distill", "evaluate")
Stage = Literal["synth", "pretrain", "parse", "score", "distill", "evaluate"]


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(_Section):
    """The CLIP model that scores tags and is evaluated (and fine-tuned by distill)."""

    name: str | None = Field(None, description="open_clip model name (ViT-B-16) or a shipped config (ttd-tiny, "
                                               "ttd-micro); optional with an artefact.")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (openai), a weights file or a ttd "
                                                     "artefact folder; default: the `pretrain` section's artefact.")


class SynthStep(_Section):
    """Generate TagMask-Synth first (skipped when `out` already holds this exact output)."""

    out: str = Field(description="Output folder: train/, eval/ and pretrain/ go under it.")
    train: int = Field(1000, ge=0, description="Samples in the corpus to label (OUT/train).")
    eval: int = Field(300, ge=0, description="Samples in the labelled eval set (OUT/eval).")
    pretrain: int = Field(0, ge=0, description="Samples in the pre-training corpus (OUT/pretrain); 0: none.")
    seed: int = Field(0, ge=0, description="Sample seed: same seed, byte-identical output.")
    format: Literal["webdataset", "parquet", "files"] = Field("webdataset", description="img2dataset layout.")
    config: SynthConfig = Field(default_factory=SynthConfig, description="SynthConfig (docs/SYNTH.md).")


class PretrainStep(_Section):
    """Pre-train the tiny base CLIP first (skipped when `out` already holds an artefact of this recipe)."""

    out: str = Field(description="Artefact folder (model.safetensors, model.json); the run's model by default.")
    corpus: str | None = Field(None, description="Image-text corpus; default: <synth.out>/pretrain.")
    preset: Literal["quick", "default"] = Field("quick", description="Recipe preset; `config` fields override it.")
    seed: int = Field(0, ge=0, description="Seed of initialisation and data order.")
    config: PretrainConfig = Field(default_factory=PretrainConfig, description="PretrainConfig over the preset.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _preset_under_config(cls, data: Any) -> Any:
        """The preset's values, then the section's own `config` keys over them."""
        if isinstance(data, dict):
            preset = data.get("preset", "quick")
            own = data.get("config") or {}
            if preset in PRETRAIN_PRESETS and isinstance(own, dict):
                data = {**data, "config": {**PRETRAIN_PRESETS[preset], **own}}
        return data


class RaySettings(_Section):
    """Where the score stage runs."""

    address: str | None = Field(None, description="Join this Ray cluster (ray://host:10001 or host:6379); "
                                                  "default: start a local Ray.")
    workers: int | None = Field(None, ge=0, description="Scorer actors (default: one per GPU, else 1); 0 scores "
                                                        "in the flow's process without Ray.")


class EvaluateStep(_Section):
    """Evaluate the base model (and the fine-tuned one, after distill) on a TagMask-style eval set."""

    dataset: Literal["tagmask"] = Field("tagmask", description="Eval set kind (TagMask-style: `ttd synth`'s "
                                                               "OUT/eval or CC3M-TagMask in that layout).")
    root: str | None = Field(None, description="Eval set root; default: <synth.out>/eval.")
    bg_threshold: float = Field(0.4, ge=0.0, le=1.0, description="Caption heatmap threshold (the paper's 0.4).")
    max_samples: int | None = Field(None, ge=1, description="Evaluate only the first N samples.")


class DistillStep(_Section):
    """TTD fine-tuning on the store's pseudo-labels; its LoRA artefact is then evaluated like the base model."""

    enabled: bool = Field(False, description="Run distill, then evaluate its artefact.")
    out: str | None = Field(None, description="LoRA artefact folder (local); default: <store>/models/ttd-lora, or "
                                              "out/<name>/ttd-lora with a remote store.")
    seed: int = Field(0, ge=0, description="Seed of LoRA initialisation and data order.")
    config: DistillConfig = Field(default_factory=DistillConfig, description="DistillConfig (docs/METHOD.md).")


class FlowSettings(_Section):
    """How the Prefect flow runs the stages: batches, retries, caching."""

    stages: list[Stage] | None = Field(None, description="Stages to run, of " + ", ".join(STAGES) + "; default: "
                                                         "every stage the config has a section for.")
    shards_per_batch: int = Field(8, ge=1, le=100_000, description="Shards per task: the unit of caching, retry "
                                                                   "and progress in Prefect.")
    concurrency: int = Field(1, ge=1, le=256, description="Batch tasks of one stage in flight at once.")
    retries: int = Field(3, ge=0, le=50, description="Retries of a batch after a transient failure (S3, network, "
                                                     "a lost Ray actor); user errors are not retried.")
    retry_delay_seconds: float = Field(10.0, ge=0, description="First retry delay; doubles on each retry.")
    result_storage: str | None = Field(None, description="Where task results (the cross-run cache) persist: "
                                                         "default <store>/_prefect/results; a path or fsspec URL; "
                                                         "a saved Prefect block slug (s3-bucket/name); or "
                                                         "'prefect' for Prefect's own default storage.")
    refresh_cache: bool = Field(False, description="Ignore cached task results; the store's manifests still skip "
                                                   "done shards.")


class RunConfig(_Section):
    """Everything `ttd run` needs: corpus, store, model and one section per stage."""

    name: str = Field("ttd", description="Name of the run (prefix of the Prefect flow-run name).")
    corpus: str | None = Field(None, description="Corpus URI (img2dataset output or JSONL/CSV manifest); default: "
                                                 "<synth.out>/train.")
    store: str = Field(description="Store URI (local path or s3://bucket/prefix).")
    corpus_format: Literal["auto", "webdataset", "parquet", "files", "manifest"] = "auto"
    corpus_name: str | None = Field(None, description="Name of the corpus in the store (default: folder name).")
    include_incomplete: bool = Field(False, description="Also read shards without img2dataset's _stats.json.")
    device: str | None = Field(None, description="cpu or cuda (default: cuda when available).")
    model: ModelSettings = Field(default_factory=ModelSettings)
    synth: SynthStep | None = None
    pretrain: PretrainStep | None = None
    parse: ParseConfig = Field(default_factory=ParseConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    ray: RaySettings = Field(default_factory=RaySettings)
    evaluate: EvaluateStep | None = None
    distill: DistillStep | None = None
    flow: FlowSettings = Field(default_factory=FlowSettings)

    @pydantic.model_validator(mode="after")
    def _derived_paths(self) -> RunConfig:
        if self.synth is not None:
            self.corpus = self.corpus or _join(self.synth.out, "train")
            if self.evaluate is not None and self.evaluate.root is None:
                self.evaluate.root = _join(self.synth.out, "eval")
            if self.pretrain is not None and self.pretrain.corpus is None:
                self.pretrain.corpus = _join(self.synth.out, "pretrain")
        if self.corpus is None:
            raise ValueError("give a corpus URI (corpus:), or a synth section that generates one")
        if self.evaluate is not None and self.evaluate.root is None:
            raise ValueError("evaluate needs root: the eval set to evaluate on")
        if self.pretrain is not None:
            if self.pretrain.corpus is None:
                raise ValueError("pretrain needs corpus: the image-text pairs to pre-train on")
            if self.synth is not None and self.pretrain.corpus == _join(self.synth.out, "pretrain") \
                    and not self.synth.pretrain:
                raise ValueError("pretrain reads <synth.out>/pretrain but synth.pretrain is 0: set synth.pretrain "
                                 "to a number of samples")
            self.model.pretrained = self.model.pretrained or self.pretrain.out
        if self.distill is not None and self.distill.out is None:  # a local folder (run_distill writes one)
            local_store = "://" not in self.store or self.store.startswith("file://")
            self.distill.out = _join(self.store, "models/ttd-lora") if local_store else f"out/{self.name}/ttd-lora"
        return self

    def stages(self) -> list[str]:
        """The stages this run executes, in pipeline order."""
        configured = {"synth": self.synth is not None, "pretrain": self.pretrain is not None, "parse": True,
                      "score": True, "distill": self.distill is not None and self.distill.enabled,
                      "evaluate": self.evaluate is not None}
        wanted = set(self.flow.stages) if self.flow.stages is not None else set(STAGES)
        return [s for s in STAGES if configured[s] and s in wanted]


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RUN.yaml (optional) with `overrides` (nested, e.g. from flags) over it; one clear line on any mistake."""
    return load_yaml(RunConfig, path, overrides)


def resolve_run_config(config: dict[str, Any] | None = None, config_path: str | Path | None = None,
                       overrides: dict[str, Any] | None = None, *, corpus: str | None = None,
                       store: str | None = None) -> RunConfig:
    """The flow's parameters -> RunConfig. Precedence, each deep-merged over the one before: the file
    `config_path`, the mapping `config`, `overrides`, then `corpus` and `store` (a deployment's own parameters)."""
    data = read_yaml(config_path) if config_path is not None else {}
    data = deep_merge(deep_merge(data, config or {}), overrides or {})
    data = deep_merge(data, {k: v for k, v in (("corpus", corpus), ("store", store)) if v is not None})
    source = str(config_path) if config_path is not None else "config"
    return build(RunConfig, data, source)


__all__ = ["RunConfig", "load_run_config", "resolve_run_config", "STAGES"]
