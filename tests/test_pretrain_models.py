"""Pre-training determinism, artefacts that carry their config, and refusing unsafe checkpoints."""

import hashlib
import pickle

import pytest
import torch

from ttd.configs import PretrainConfig
from ttd.errors import TTDError
from ttd.models import load_model
from ttd.train.pretrain import run_pretrain
from ttd.train.recipe import lr_at


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from ttd.synth.generate import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(str(root), train=0, eval=0, pretrain=48, seed=1)
    return str(root / "pretrain")


def test_same_seed_same_weights_and_artefact_loads(corpus, tmp_path):
    cfg = PretrainConfig(model="ttd-micro", steps=4, batch_size=16, warmup_steps=1, log_every=2)
    a = run_pretrain(corpus, str(tmp_path / "a"), cfg, seed=3, device="cpu")
    run_pretrain(corpus, str(tmp_path / "b"), cfg, seed=3, device="cpu")
    run_pretrain(corpus, str(tmp_path / "c"), cfg, seed=4, device="cpu")
    assert a["pairs"] == 48 and a["steps"] == 4
    wa, wb, wc = (digest(tmp_path / d / "model.safetensors") for d in "abc")
    assert wa == wb != wc
    bundle = load_model(pretrained=str(tmp_path / "a"))  # no --model: the artefact names it
    assert bundle.name == "ttd-micro" and bundle.model_id.startswith("ttd-micro@")
    assert (tmp_path / "a" / "train_log.parquet").is_file()


def test_a_killed_pretraining_resumes_from_its_checkpoint_to_the_same_weights(corpus, tmp_path):
    """Killed after step 5 with checkpoints every 2 steps: the re-run continues at step 4 (weights, AdamW moments
    and the data order restored) and ends with exactly the weights of a straight run, across an epoch boundary
    (48 pairs, batches of 16); the checkpoint is gone once the artefact is written."""
    cfg = PretrainConfig(model="ttd-micro", steps=7, batch_size=16, warmup_steps=1, log_every=1, checkpoint_every=2)
    run_pretrain(corpus, str(tmp_path / "straight"), cfg, seed=3, device="cpu")

    class Kill(Exception):
        pass

    def kill_at_5(stage, n, loss, seen=[]):  # noqa: B006 - counts the training steps of this one call
        if stage == "train":
            seen.append(n)
            if len(seen) == 5:
                raise Kill

    with pytest.raises(Kill):
        run_pretrain(corpus, str(tmp_path / "resumed"), cfg, seed=3, device="cpu", progress=kill_at_5)
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").exists()
    summary = run_pretrain(corpus, str(tmp_path / "resumed"), cfg, seed=3, device="cpu")
    assert summary["resumed_from"] == 4
    assert digest(tmp_path / "resumed" / "model.safetensors") == digest(tmp_path / "straight" / "model.safetensors")
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    # another recipe does not pick up a checkpoint left in its folder: it starts afresh
    kill_at_5.__defaults__[0].clear()
    with pytest.raises(Kill):
        run_pretrain(corpus, str(tmp_path / "other"), cfg, seed=3, device="cpu", progress=kill_at_5)
    other = PretrainConfig(**{**cfg.model_dump(), "lr": 5e-4})
    assert run_pretrain(corpus, str(tmp_path / "other"), other, seed=3, device="cpu")["resumed_from"] is None


def test_lr_schedule_warms_up_then_decays():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) < 1e-5


class Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"weights": Boom()}, f)
    with pytest.raises(TTDError, match="refused to load"):
        load_model("ttd-micro", str(bad))


def test_plain_tensor_checkpoint_and_unknown_model(tmp_path):
    state = load_model("ttd-micro").model.state_dict()
    torch.save(state, tmp_path / "ok.pt")
    assert load_model("ttd-micro", str(tmp_path / "ok.pt")).model_id.startswith("ttd-micro@")
    with pytest.raises(TTDError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(TTDError, match="does not exist"):
        load_model("ttd-micro", "/nonexistent/weights.safetensors")


def test_an_artefact_of_an_architecture_open_clip_does_not_know_loads_from_its_own_config(tmp_path):
    """model.json carries the architecture (`model_cfg`): registered through open_clip's public add_model_config,
    and kept when open_clip rescans its configs for the next one."""
    import json
    import shutil

    import open_clip

    from ttd.models.loading import EMBEDDED_MODEL

    for name in ("ttd-renamed-a", "ttd-renamed-b"):
        art = tmp_path / name
        shutil.copytree(EMBEDDED_MODEL, art)
        doc = json.loads((art / "model.json").read_text())
        (art / "model.json").write_text(json.dumps({**doc, "model": name}))
        assert name not in open_clip.list_models()
        bundle = load_model(pretrained=str(art))
        assert bundle.model_id.startswith(f"{name}@")
    assert {"ttd-renamed-a", "ttd-renamed-b"} <= set(open_clip.list_models())
