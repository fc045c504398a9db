"""`ttd demo`: its config is configs/demo.yaml with its paths moved; the base-vs-TTD table comes from both runs."""

from pathlib import Path

import yaml

from ttd.cli.demo import comparison_rows, comparison_text, demo_config
from ttd.pipeline.runconfig import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_is_the_documented_yaml_with_its_paths_moved():
    cfg = demo_config("/tmp/elsewhere/")
    twin = RunConfig.model_validate(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    assert cfg.store == "/tmp/elsewhere/store" and cfg.synth.out == "/tmp/elsewhere/synth"
    assert cfg.distill.out == "/tmp/elsewhere/ttd-lora"
    assert demo_config("out/demo").model_dump(mode="json") == twin.model_dump(mode="json")
    assert cfg.stages() == ["synth", "parse", "score", "distill", "evaluate"]
    assert cfg.model.name is None and cfg.model.pretrained is None  # the embedded base model


def test_comparison_is_ttd_minus_base():
    base = {"pixel": {"f1": 50.0, "precision": 60.0}, "caption": {"caption_miou": 40.0}}
    tuned = {"pixel": {"f1": 54.5, "precision": 58.0}, "caption": {"caption_miou": 43.25}}
    rows = {r["metric"]: r for r in comparison_rows(base, tuned)}
    assert rows["pixel-tag F1"]["delta"] == 4.5 and rows["pixel-tag precision"]["delta"] == -2.0
    assert rows["caption mIoU"]["delta"] == 3.25 and rows["image-tag F1"]["delta"] is None
    text = comparison_text(base, tuned)
    assert "+4.5" in text and "-2.0" in text and text.count("\n") == len(rows)
