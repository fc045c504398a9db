"""Refreshed pseudo-labels for `ttd distill --refresh-rounds N`: the training corpus re-scored by a distilled model.

A round of TTD trains a LoRA on the store's pseudo-labels; refreshing re-scores the same corpus with that model
(the base plus its LoRA), with the same parse and score settings the store's own pseudo-labels were made with,
into a store of its own inside the artefact folder, so the store's base-model pseudo-labels are never replaced.
The next round trains from the base again on the refreshed ones. Both stages are the ordinary ones: idempotent and
resumable per shard, so a killed refresh continues where it stopped.
"""

from __future__ import annotations

from typing import Any

from ttd.configs import OUTPUT_FIELDS, ParseConfig, ScoreConfig
from ttd.errors import TTDError
from ttd.stages.parse import run_parse
from ttd.stages.score import run_score
from ttd.store.store import Store


def committed_config(store: Store, stage: str, corpus: str, fields: tuple[str, ...] | None = None, *,
                     need: str = "refreshing the pseudo-labels",
                     hint: str = "run the stage again over the corpus with one configuration") -> dict[str, Any]:
    """The output-affecting settings (`fields`, default all) `stage` committed this corpus's shards with; refused,
    saying what `need`s them, when they differ."""
    seen = {}
    for m in store.manifests(stage):
        if m.get("corpus") == corpus and m.get("config") is not None:
            config = {k: v for k, v in m["config"].items() if fields is None or k in fields}
            seen.setdefault(repr(sorted(config.items())), config)
    if len(seen) != 1:
        raise TTDError(f"{need} needs one {stage} configuration for corpus {corpus!r}; its shards were committed "
                       f"with {len(seen)}: {hint}")
    return next(iter(seen.values()))


def rescore(corpus_uri: str, corpus_name: str, shards: list[str], source: Store, teacher: str, out_store: str, *,
            model: str | None, pretrained: str | None, device: str | None) -> dict[str, Any]:
    """Parse and score the corpus's `shards` (those `source` scored) into `out_store` with the model `teacher` (a
    LoRA folder on the base), using the parse and score settings of `source`'s pseudo-labels. Returns the score
    stage's summary."""
    parse_cfg = committed_config(source, "parse", corpus_name, OUTPUT_FIELDS)  # its manifests also hold per-shard stats
    score_cfg = committed_config(source, "score", corpus_name)
    parsed = run_parse(corpus_uri, out_store, ParseConfig(**parse_cfg), name=corpus_name, shards=shards)
    scored = run_score(corpus_uri, out_store, ScoreConfig(**score_cfg), model=model, pretrained=pretrained,
                       lora=teacher, workers=0, device=device, name=corpus_name, shards=shards)
    left = [f["shard"] for f in parsed["failed"] + scored["failed"]] + scored["claimed_elsewhere"] \
        + scored["unparsed"]
    if left:
        raise TTDError(f"refreshing the pseudo-labels in {out_store} left shard(s) {', '.join(map(str, left[:5]))} "
                       f"unscored: run again to retry them")
    return scored
