"""Every stage's settings as pydantic models, free of torch (the CLI and the flow build options and RUN.yaml from
them without loading a model), and their loading from YAML with command-line overrides.

Defaults are ours unless docs/METHOD.md says they come from the paper. `*_PERF_FIELDS` change speed, not results:
they never enter a fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import Field

from ttd.errors import TTDError

M = TypeVar("M", bound=pydantic.BaseModel)


def _every_template_has_a_slot(templates: tuple[str, ...]) -> tuple[str, ...]:
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every template needs one '{}' slot for the tag or class name")
    return templates


# prompt templates ("a photo of a {}."), as the score, distill and segmentation configs take them
Templates = Annotated[tuple[str, ...], pydantic.AfterValidator(_every_template_has_a_slot)]


def deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`: nested mappings merge key by key (a nested setting changes only that setting); any
    other value, lists included, replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate `data`; unknown keys and bad values become one line naming the field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise TTDError(f"{source}: {problems}") from None


def load_yaml(model: type[M], path: str | Path | None, overrides: dict[str, Any] | None = None,
              defaults: dict[str, Any] | None = None) -> M:
    """`defaults` (e.g. a preset) < the YAML file < `overrides` (command-line flags)."""
    data = read_yaml(path) if path is not None else {}
    return build(model, deep_merge(deep_merge(defaults or {}, data), overrides or {}), str(path or "options"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of settings as a mapping; one clear line if it is missing, invalid or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise TTDError(f"config file {str(p)!r} does not exist (relative paths start at {str(Path.cwd())!r})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TTDError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TTDError(f"config file {str(p)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data


# ---------------------------------------------------------------- shared names

# dense heads (ttd.models.dense): how a ViT's last block gives per-patch features
HEADS = ("maskclip", "sclip", "clearclip", "naclip")
# the segmentation benchmarks `ttd evaluate` reads (ttd.eval.segmentation.datasets: their layouts)
SEGMENTATION_DATASETS = ("voc", "context", "coco-object", "coco-stuff", "cityscapes", "ade")
# LoRA placement (ttd.models.lora)
LORA_TOWERS = ("visual", "text")
LORA_TARGETS = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")


# ---------------------------------------------------------------- parse

OUTPUT_FIELDS = ("policy", "tagger", "compounds", "noun_pairs", "max_caption_chars")


class ParseConfig(pydantic.BaseModel):
    """How candidates are made. Only OUTPUT_FIELDS change the output (and so the fingerprint); the rest is speed."""

    model_config = pydantic.ConfigDict(extra="forbid")

    policy: Literal["words", "content", "nouns"] = Field(
        "words", description="words: every word (stop words flagged, not dropped), as in the paper; content: no "
                             "stop words; nouns: nouns and proper nouns only (the paper's noun-parsing baseline).")
    tagger: bool = Field(True, description="Run spaCy's tagger and lemmatizer (POS, lemmas). False: tokenizer only, "
                                           "pos null and lemma = lower-case form; about 10x faster.")
    compounds: bool = Field(False, description="Also merge the multi-word nouns listed in "
                            "ttd/data/compound_nouns.txt ('hot dog', 'teddy bear'). Off by default: the list was "
                            "written alongside TagMask-Synth and holds every multi-word name of its vocabulary, which "
                            "flatters the noun baseline there.")
    noun_pairs: bool = Field(True, description="With the tagger: merge two adjacent nouns into one candidate ('fire "
                                               "truck', 'dog bed'), the general compound rule, no list needed.")
    max_caption_chars: int = Field(1000, ge=16, le=1_000_000,
                                   description="Longer captions are cut at a word boundary and flagged.")
    batch_size: int = Field(256, ge=1, le=100_000, description="Captions per spaCy batch (nlp.pipe).")
    workers: int = Field(1, ge=1, le=512, description="Processes across shards; each loads the model once.")
    dedupe: bool | None = Field(None, description="Parse each distinct caption once per shard (and recent ones "
                                                  "across shards). Default: on with the tagger; off without it, "
                                                  "where finding duplicates costs more than tokenising them "
                                                  "(measured: 17,000 vs 19,700 captions/s).")
    cache_size: int = Field(100_000, ge=0, description="Distinct captions remembered across shards per process.")

    @pydantic.model_validator(mode="after")
    def _nouns_need_the_tagger(self) -> ParseConfig:
        if self.policy == "nouns" and not self.tagger:
            raise ValueError("policy 'nouns' needs POS tags: run with the tagger (drop --no-tagger), or use policy "
                             "words or content")
        return self

    @property
    def deduplicate(self) -> bool:
        return self.tagger if self.dedupe is None else self.dedupe

    def output_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in OUTPUT_FIELDS}


# ---------------------------------------------------------------- score

# A small prompt ensemble in the style of CLIP's zero-shot templates; configurable per run.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of the {}.", "{}")


# Settings that change speed, not results: left out of every fingerprint so tuning them never re-scores.
SCORE_PERF_FIELDS = frozenset({"batch_size", "decode_threads", "decode_processes", "pipelined"})


class ScoreConfig(pydantic.BaseModel):
    """How tags are scored and selected. Defaults marked 'ours' in docs/METHOD.md: the paper leaves them open."""

    model_config = pydantic.ConfigDict(extra="forbid")

    head: Literal[HEADS] = "maskclip"
    templates: Templates = DEFAULT_TEMPLATES
    normalisation: Literal["minmax", "softmax", "none"] = pydantic.Field(
        "minmax", description="Pixel-tag scores across a caption's candidates.")
    baseline_normalisation: Literal["softmax", "minmax", "none"] = pydantic.Field(
        "softmax", description="Image-tag and text-tag scores across a caption's candidates: 'softmax' (the paper's "
        "baselines: a distribution over the tags at CLIP's temperature), or 'minmax' as pixel-tag.")
    logit_scale: float | None = pydantic.Field(
        100.0, gt=0, description="Inverse temperature of 'softmax': CLIP's logit scale, 100, as in the paper's models "
        "(CLIP, TCL); None: the model's own learned scale (14 for the embedded base model, too flat to select).")
    selection: Literal["pixel", "image", "text"] = "pixel"
    threshold: float = pydantic.Field(0.4, ge=0.0, le=1.0, description="Selection threshold on the normalised "
                                      "score; 0.4 chosen on TagMask-Synth's validation split (docs/BENCHMARKS.md).")
    masks_for: Literal["selected", "all"] = "selected"
    batch_size: int = pydantic.Field(64, ge=1, le=4096)
    decode_threads: int = pydantic.Field(2, ge=1, le=64)
    decode_processes: int = pydantic.Field(0, ge=0, le=256, description="Decode and resize in this many forked "
                                           "processes instead of `decode_threads` threads (0: threads). On a GPU "
                                           "node: about one per 300 images/s wanted.")
    pipelined: bool = pydantic.Field(True, description="Overlap reading/decoding, the device and writing (threads "
                                                       "joined by two-deep queues); false runs them in series.")
    max_pixels: int = pydantic.Field(64_000_000, ge=1)
    flip: bool = pydantic.Field(False, description="Average each image's dense features with its mirror image's "
                                "(mirrored back), as the paper's scoring command does with --hflip; 2x the forwards.")
    decoder: Literal["auto", "pil", "device"] = pydantic.Field(
        "auto", description="Where JPEGs are decoded and resized: 'device' on the model's device (nvJPEG on CUDA), "
        "PIL for what it cannot take (PNG, CMYK, 16-bit); 'pil' all on the host; 'auto' device on CUDA, else pil. "
        "Scores differ in the last digits between the two, so the choice is part of the fingerprint.")
    precision: Literal["auto", "fp32", "bf16"] = pydantic.Field(
        "auto", description="The model's weights and activations: bf16 halves the bytes and doubles the GPU's "
        "throughput, changing scores slightly (part of the fingerprint); 'auto' bf16 on CUDA, else fp32.")

    def resolved(self, device_type: str) -> ScoreConfig:
        """The settings with 'auto' decided for a model on `device_type` ("cuda", "cpu", ...): what a shard's
        fingerprint records, so a store scored on a CPU is re-scored, not mixed, when the run moves to GPUs."""
        cuda = device_type == "cuda"
        return self.model_copy(update={
            "decoder": ("device" if cuda else "pil") if self.decoder == "auto" else self.decoder,
            "precision": ("bf16" if cuda else "fp32") if self.precision == "auto" else self.precision})


# ---------------------------------------------------------------- distill

DISTILL_PERF_FIELDS = {"checkpoint_every", "log_every", "decode_threads"}
# fields added after artefacts existed: they enter the fingerprint only when set, so older artefacts keep theirs
DISTILL_WHEN_SET_FIELDS = ("text_lora_rank", "text_lr", "refresh_rounds", "distill_text_only")


class DistillConfig(pydantic.BaseModel):
    """Every choice of the fine-tune. Defaults are ours unless docs/METHOD.md says they come from the paper."""

    model_config = pydantic.ConfigDict(extra="forbid")

    steps: int = pydantic.Field(300, ge=1, description="Optimiser steps.")
    batch_size: int = pydantic.Field(32, ge=1, description="Samples per optimiser step (over all accumulations).")
    grad_accum: int = pydantic.Field(1, ge=1, description="Micro-batches per step (batch_size / grad_accum each).")
    lr: float = pydantic.Field(1e-4, gt=0, description="Peak learning rate (5e-4 degraded pixel-tag F1 by 5 points "
                                                       "on TagMask-Synth, docs/BENCHMARKS.md).")
    weight_decay: float = pydantic.Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = pydantic.Field(30, ge=0, description="Linear warm-up steps, then cosine decay.")
    max_grad_norm: float = pydantic.Field(1.0, gt=0, description="Gradient norm clip.")
    lora: bool = pydantic.Field(True, description="LoRA on both towers; False: full fine-tuning.")
    lora_rank: int = pydantic.Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = pydantic.Field(16.0, gt=0, description="LoRA scale numerator (update x alpha / rank).")
    lora_towers: tuple[Literal[LORA_TOWERS], ...] = ("visual", "text")
    lora_targets: tuple[Literal[LORA_TARGETS], ...] = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")
    lora_last_blocks: int | None = pydantic.Field(None, ge=1, description="Only the last N blocks of each tower.")
    text_lora_rank: int | None = pydantic.Field(None, ge=1, description="The text tower's own LoRA rank (its alpha "
                                                "scaled to keep alpha / rank); None: lora_rank.")
    text_lr: float | None = pydantic.Field(None, gt=0, description="The text tower's own peak learning rate; "
                                           "None: lr.")
    head: Literal[HEADS + ("scoring",)] = pydantic.Field(
        "maskclip", description="Dense head the heatmaps are trained through (maskclip: the one that scores and "
        "evaluates by default; chosen on val, docs/METHOD.md); 'scoring': the head that made the pseudo-labels "
        "(from the score stage's manifests), so student and teacher maps are the same function.")
    refresh_rounds: int = pydantic.Field(
        1, ge=0, le=5, description="Refresh the targets this many times: after a round of training, re-score the "
        "corpus with the fine-tuned model and train again from the base on the refreshed pseudo-labels (chosen on "
        "val, docs/METHOD.md); each round costs one training and one scoring of the corpus.")
    w_distill: float = pydantic.Field(1.0, ge=0, description="Weight of L_distill.")
    distill_text_only: bool = pydantic.Field(
        False, description="L_distill reaches the text tower only (the image's patch features detached from it): "
        "the caption embedding learns to draw the union on the patch features that L_tag and the contrastive term "
        "train; false: both towers, as in the paper.")
    w_tag: float = pydantic.Field(2.0, ge=0, description="Weight of L_tag (2: chosen on val with the union at 0.6, "
                                  "docs/METHOD.md).")
    w_contrastive: float = pydantic.Field(0.1, ge=0, description="Weight of the contrastive term; with the other two "
                                          "at 0: the contrastive-only control.")
    loss: Literal["mse", "l1"] = "mse"
    heatmap_scale: float = pydantic.Field(10.0, gt=0, description="Raw cosine differences are multiplied by this.")
    tag_target: Literal["teacher", "paper"] = pydantic.Field(
        "teacher", description="paper: L_tag pulls each tag's heatmap toward its own min-max-normalised pseudo-label "
                               "map (selected) or a zero map (unselected), both placed in the predicted map's own "
                               "range, every sample counted; teacher: toward the teacher's raw map (selected) or a "
                               "flat map at the sample's background level, the lowest value of its selected tags' "
                               "teacher maps (unselected), samples without a selected tag left out.")
    keep_contrast: bool = pydantic.Field(True, description="A range-relative target with a peak spans at least the "
                                         "least range of the sample's selected tags' teacher maps: flat maps cannot "
                                         "meet it (no collapse).")
    threshold: float | None = pydantic.Field(None, ge=0, le=1, description="Re-select tags by pixel_score >= this "
                                             "(only tags with a stored mask can be selected); None: the score "
                                             "stage's decisions.")
    union_threshold: float | None = pydantic.Field(
        0.6, ge=0, le=1, description="Binarise the union of the selected tags' maps at this value before L_distill "
                                     "(chosen on val, docs/METHOD.md); None: the soft union, as in the paper.")
    templates: Templates | None = pydantic.Field(
        ("a photo of a {}.",), description="Prompts of the tag embeddings; None: the score stage's (its manifests).")
    max_tags: int = pydantic.Field(24, ge=1, description="Candidates per caption used by L_tag (the first N).")
    shuffle_buffer: int = pydantic.Field(1000, ge=1)
    checkpoint_every: int = pydantic.Field(50, ge=1)
    log_every: int = pydantic.Field(10, ge=1, description="Steps between train_log rows and progress log lines.")
    decode_threads: int = pydantic.Field(2, ge=1)
    amp: bool = pydantic.Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    deterministic: bool = pydantic.Field(True, description="torch deterministic algorithms: same seed, same "
                                         "weights, and a resumed run equals an uninterrupted one.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.w_distill + self.w_tag + self.w_contrastive == 0:
            raise ValueError("all loss weights are zero: nothing to train")
        return self

    def result_config(self) -> dict[str, Any]:
        unset = {f for f in DISTILL_WHEN_SET_FIELDS if not getattr(self, f)}
        return self.model_dump(mode="json", exclude=DISTILL_PERF_FIELDS | unset)


# ---------------------------------------------------------------- pretrain

class PretrainConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "ttd-tiny"
    pretrained: str | None = pydantic.Field(None, description="Start from these weights (a ttd model artefact "
                                            "folder or a weights file for `model`) instead of random ones.")
    steps: int = pydantic.Field(4000, ge=1)
    batch_size: int = pydantic.Field(128, ge=2)
    lr: float = pydantic.Field(1e-3, gt=0)
    weight_decay: float = pydantic.Field(0.1, ge=0)
    warmup_steps: int = pydantic.Field(200, ge=0)
    max_samples: int | None = pydantic.Field(None, ge=2)
    log_every: int = pydantic.Field(50, ge=1)
    checkpoint_every: int = pydantic.Field(200, ge=1, description="Steps between checkpoints (resume after a kill).")
    fp16_weights: bool = False  # store weights in fp16 (halves the artefact; the shipped default model uses it)


PRETRAIN_PERF_FIELDS = {"log_every", "checkpoint_every"}  # leave the weights as they are: not part of a run's identity


PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on a 2-core CPU: enough for tests and a demo to have a model that is better than random
    "quick": {"steps": 300, "batch_size": 64, "warmup_steps": 30},
    # the embedded default base model shipped in the package (ttd/models/embedded): 2,000 steps of 128 (about
    # 50 min on 2 idle CPU cores; a 4,000-step schedule already passed issue 16's targets at step 1,600) at a peak
    # lr of 3e-4, stored in fp16. At 1e-3 the dense (patch) features, which pixel-tag scoring reads, collapsed
    # after ~1,000 steps while the contrastive loss kept falling (docs/BENCHMARKS.md, "Base model (issue 16)").
    "embedded": {"steps": 2000, "lr": 3e-4, "fp16_weights": True},
    # the same recipe without fp16 storage
    "default": {"lr": 3e-4},
}


def preset(name: str, **overrides: Any) -> PretrainConfig:
    if name not in PRESETS:
        raise TTDError(f"unknown pretrain preset {name!r}: use one of {', '.join(PRESETS)}")
    return PretrainConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------- evaluate

class CaptionProtocol(pydantic.BaseModel):
    """How the caption heatmap is made: one pass at the model's input size (`short_side` None, the default), or
    windows over a resized image at several scales, flipped, refined by PAMR (the paper's: `paper()`)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    short_side: int | None = pydantic.Field(None, ge=1, description="Resize the image's short side to this; None: "
                                            "the model's own preprocessing, one forward.")
    window: int = pydantic.Field(448, ge=1)
    stride: int = pydantic.Field(224, ge=1)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    pamr: bool = pydantic.Field(False, description="Refine [1 - h, h] (h the normalised heatmap) by PAMR before the "
                                                   "threshold (our reading for a single caption class).")
    pamr_iterations: int = pydantic.Field(10, ge=0)
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    pamr_sigma: float = pydantic.Field(0.1, gt=0)
    batch_size: int = pydantic.Field(16, ge=1, description="Windows per forward (speed only).")

    @classmethod
    def paper(cls) -> CaptionProtocol:
        return cls(short_side=448, scales=(1.0, 0.5, 1.5, 2.0), flip=True, pamr=True)


CAPTION_PROTOCOLS = {"single": CaptionProtocol, "paper": CaptionProtocol.paper}


class TagmaskEvalConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    score: ScoreConfig = ScoreConfig()
    bg_threshold: float = pydantic.Field(0.4, ge=0.0, le=1.0)  # the paper's value for captions
    caption: CaptionProtocol = CaptionProtocol()
    max_samples: int | None = pydantic.Field(None, ge=1)

    @pydantic.field_validator("caption", mode="before")
    @classmethod
    def _named_protocol(cls, v):
        if isinstance(v, str):
            if v not in CAPTION_PROTOCOLS:
                raise ValueError(f"unknown caption protocol {v!r}: use {', '.join(CAPTION_PROTOCOLS)} or its fields")
            return CAPTION_PROTOCOLS[v]()
        return v


# Settings that change speed or memory, not results: left out of the run fingerprint.
SEGEVAL_PERF_FIELDS = {"batch_size", "images_per_step"}


class SegEvalConfig(pydantic.BaseModel):
    """The evaluation protocol. Defaults are the paper's (TTD README): short side 448, window 448 / stride 224,
    scales {1.0, 0.5, 1.5, 2.0}, flip, PAMR, background 0.40 or 0.45 by dataset (None = the dataset's value).
    Temperature, PAMR's parameters and the templates are ours (docs/SEGEVAL.md)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    head: Literal[HEADS] = "maskclip"
    templates: Templates = DEFAULT_TEMPLATES
    short_side: int | None = pydantic.Field(448, ge=1)  # None keeps the image's own size
    window: int = pydantic.Field(448, ge=1)
    stride: int = pydantic.Field(224, ge=1)
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    pamr: bool = True
    pamr_iterations: int = pydantic.Field(10, ge=0)
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    pamr_sigma: float = pydantic.Field(0.1, gt=0)  # affinity = -|dI| / (pamr_sigma * local std)
    temperature: float = pydantic.Field(0.01, gt=0)  # CLIP's logit scale 100
    bg_threshold: float | None = pydantic.Field(None, ge=0.0, le=1.0)
    amp: bool = True  # float16 autocast for the image tower on CUDA; no effect on CPU
    batch_size: int = pydantic.Field(32, ge=1, le=4096)  # windows per forward
    images_per_step: int = pydantic.Field(4, ge=1, le=1024)  # images whose windows share the forwards
    max_images: int | None = pydantic.Field(None, ge=1)


    @pydantic.field_validator("scales")
    @classmethod
    def _scales_positive(cls, v):
        if not v or any(s <= 0 for s in v):
            raise ValueError("give at least one scale, each > 0")
        return v

    @pydantic.field_validator("pamr_dilations")
    @classmethod
    def _dilations_positive(cls, v):
        if not v or any(d < 1 for d in v):
            raise ValueError("give at least one dilation, each >= 1")
        return v

    @pydantic.model_validator(mode="after")
    def _stride_fits(self):
        if self.stride > self.window:
            raise ValueError(f"stride {self.stride} is larger than the window {self.window}: pixels would be skipped")
        return self
