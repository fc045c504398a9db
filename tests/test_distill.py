"""`ttd distill`: the losses by hand, LoRA, a short fine-tune on real pseudo-labels, exact resume, refusals."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from ttd.configs import DistillConfig
from ttd.errors import TTDError
from ttd.models import load_model
from ttd.models.lora import add_lora, merge_lora
from ttd.stages.distill import run_distill, validation_losses
from ttd.store.store import Store
from ttd.train.distill_losses import (
    distill_loss,
    raw_tag_loss,
    scaled_target,
    tag_loss,
    teacher_tag_targets,
    union_of_selected,
)

# ---------------------------------------------------------------- losses by hand


def test_scaled_target_places_the_target_in_the_predictions_own_range():
    pred = torch.tensor([[[0.1, 0.3], [0.2, 0.5]]])
    target = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])
    got = scaled_target(pred, target)
    assert torch.allclose(got, torch.tensor([[[0.1, 0.5], [0.3, 0.1]]]))


def test_tag_loss_by_hand_and_a_zero_target_can_be_met():
    pred = torch.tensor([[[0.1, 0.3], [0.2, 0.5]], [[0.2, 0.2], [0.2, 0.4]]], requires_grad=True)
    targets = torch.tensor([[[0.0, 1.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # map 0: target 0.1 + t * 0.4 = [0.1, 0.5, 0.3, 0.1]; squared differences x 10^2: [0, 4, 1, 16]
    # map 1: unselected, target its minimum 0.2: differences [0, 0, 0, 0.2] -> x 10^2 squared: [0, 0, 0, 4]
    expected = (0 + 4 + 1 + 16 + 0 + 0 + 0 + 4) / 8
    loss = tag_loss(pred, targets, scale=10.0)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # the zero-target map is pushed down only where it is above its minimum: flat maps meet a zero target
    assert pred.grad[1, 1, 1] > 0 and pred.grad[1, 0, 0] == 0
    flat = torch.full((1, 2, 2), 0.3)
    assert tag_loss(flat, torch.zeros(1, 2, 2), scale=10.0).item() == 0.0
    l1 = tag_loss(pred.detach(), targets, scale=10.0, form="l1").item()
    assert l1 == pytest.approx((0 + 2 + 1 + 4 + 0 + 0 + 0 + 2) / 8)


def test_a_flat_map_cannot_meet_a_peaked_target_when_contrast_is_kept():
    """Collapse guard: with the target's span floored at the teacher's range, flattening every heatmap (which
    makes range-relative targets trivially met) leaves a loss."""
    flat = torch.full((1, 2, 2), 0.2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert tag_loss(flat, target, scale=10.0).item() == 0.0  # the collapse: met by a flat map
    kept = tag_loss(flat, target, scale=10.0, contrast=torch.tensor([0.3])).item()
    assert kept == pytest.approx((0.3 * 10) ** 2 / 4)  # the peak pixel must rise by the teacher's 0.3
    # an unselected tag (contrast 0, zero target) is still met by a flat map
    assert tag_loss(flat, torch.zeros(1, 2, 2), scale=10.0, contrast=torch.tensor([0.0])).item() == 0.0
    has = torch.tensor([True])
    assert distill_loss(flat, target, has, scale=10.0, contrast=torch.tensor([0.3])).item() == pytest.approx(
        kept)


def test_teacher_tag_targets_pin_absolute_levels():
    """Selected: the teacher's raw map (lo + t * range); unselected: flat at the sample's background level (the
    lowest lo of its selected tags); a sample without selected tags: no target (inf), not counted."""
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    raw = teacher_tag_targets(targets, lo=torch.tensor([-0.1, 0.0, 0.0]), contrast=torch.tensor([0.4, 0.0, 0.0]),
                              selected=torch.tensor([True, False, False]), sample_of_tag=torch.tensor([0, 0, 1]),
                              batch=2)
    assert torch.allclose(raw[0], torch.tensor([[0.3, -0.1], [-0.1, 0.1]]))
    assert torch.allclose(raw[1], torch.full((2, 2), -0.1)) and torch.isinf(raw[2]).all()
    pred = torch.zeros(3, 2, 2)
    # map 0: (0.3, 0.1, 0.1, 0.1) off -> x10 squared (9, 1, 1, 1); map 1: 0.1 off everywhere -> 4 x 1; map 2 skipped
    assert raw_tag_loss(pred, raw, scale=10.0).item() == pytest.approx((9 + 1 + 1 + 1 + 4) / 8)


def test_union_and_distill_loss_by_hand():
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]],
                            [[0.5, 0.5], [0.5, 0.5]]])
    sample_of_tag = torch.tensor([0, 0, 0, 1])
    selected = torch.tensor([True, True, False, False])
    union, has = union_of_selected(targets, sample_of_tag, selected, batch=2)
    assert union[0].tolist() == [[1.0, 0.0], [0.0, 1.0]] and has.tolist() == [True, False]
    assert union[1].abs().sum() == 0  # no selected tag: no union, and the sample does not count
    soft = targets.clone()
    soft[1, 1, 1] = 0.3  # the second selected map, weaker: the binarised union drops it below 0.4
    hard, _ = union_of_selected(soft, sample_of_tag, selected, batch=2, threshold=0.4)
    assert hard[0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and hard[1].abs().sum() == 0
    caption = torch.tensor([[[0.4, 0.2], [0.2, 0.2]], [[9.0, 9.0], [9.0, 0.0]]])
    # sample 0: range [0.2, 0.4], target [0.4, 0.2, 0.2, 0.4]: only the last pixel is off by 0.2 -> (2)^2 / 4
    assert distill_loss(caption, union, has, scale=10.0).item() == pytest.approx(4 / 4)
    assert distill_loss(caption, union, torch.tensor([False, False]), scale=10.0).item() == 0.0


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError):
        DistillConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError):
        DistillConfig(w_distill=0, w_tag=0, w_contrastive=0)
    with pytest.raises(ValueError):
        DistillConfig(unknown_key=1)


def test_lora_starts_at_the_base_model_and_merges_exactly():
    bundle = load_model("ttd-micro")
    net = bundle.model
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = net.encode_image(x)
    deltas = add_lora(net, rank=4, alpha=8, towers=("visual", "text"), targets=("attn_in", "mlp_fc"), seed=1)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == sum(
        d.lora_A.numel() + d.lora_B.numel() for d in deltas.values())
    with torch.no_grad():
        assert torch.allclose(net.encode_image(x), before)
        for d in deltas.values():
            d.lora_B.normal_(std=0.05)
        adapted = net.encode_image(x)
        merge_lora(net)
        assert torch.allclose(net.encode_image(x), adapted, atol=1e-5)
        assert not torch.allclose(adapted, before)


# ---------------------------------------------------------------- on real pseudo-labels


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A TagMask-Synth train and held-out split, parsed and scored by ttd-micro (random weights) in one store."""
    from ttd.configs import ParseConfig
    from ttd.stages.parse import run_parse
    from ttd.stages.score import run_score
    from ttd.synth.generate import synthesize

    base = tmp_path_factory.mktemp("distill")
    synthesize(str(base / "synth"), train=48, eval=24, seed=3)
    store = str(base / "store")
    for split in ("train", "eval"):
        run_parse(str(base / "synth" / split), store, ParseConfig(tagger=False))
        run_score(str(base / "synth" / split), store, model="ttd-micro", workers=0)
    return base, store


QUICK = dict(steps=6, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1, lr=5e-3, refresh_rounds=0)


def test_short_fine_tune_lowers_l_distill_on_held_out_pairs(scored):
    base, store = scored
    # the soft union: at this test's 30x learning rate the random micro model's caption maps go flat under the
    # binarised default target (L_distill 5.5 -> 20.0), which the embedded base at the default lr does not
    # (docs/METHOD.md, "Union form")
    cfg = DistillConfig(**{**QUICK, "steps": 24, "lr": 3e-3, "w_contrastive": 0.0, "union_threshold": None})
    summary = run_distill(str(base / "synth" / "train"), store, str(base / "lora"), cfg, model="ttd-micro")
    assert not summary["skipped"] and (base / "lora" / "lora.json").exists()
    assert not (base / "lora" / "checkpoint").exists()  # removed once the artefact is committed
    held_out = str(base / "synth" / "eval")
    before = validation_losses(held_out, store, cfg, model="ttd-micro")
    after = validation_losses(held_out, store, cfg, lora=str(base / "lora"))
    assert before["samples"] == after["samples"] == 24
    assert after["distill"] < 0.9 * before["distill"], (before, after)
    # a second run with the same inputs is skipped; the training log is in the store
    again = run_distill(str(base / "synth" / "train"), store, str(base / "lora"), cfg, model="ttd-micro")
    assert again["skipped"] and again["fingerprint"] == summary["fingerprint"]
    from ttd.store.sql import query

    rows = query(store, "SELECT count(*) AS n, min(loss_distill) AS lo FROM train_log").to_pylist()
    assert rows[0]["n"] == 24 and rows[0]["lo"] is not None


def test_resume_after_a_crash_gives_the_same_weights(scored, tmp_path):
    base, store = scored
    corpus = str(base / "synth" / "train")
    cfg = DistillConfig(**QUICK)
    run_distill(corpus, store, str(tmp_path / "straight"), cfg, model="ttd-micro", seed=7)

    class Crash(Exception):
        pass

    def crash_at_5(step, _losses):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        run_distill(corpus, store, str(tmp_path / "resumed"), cfg, model="ttd-micro", seed=7, progress=crash_at_5)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (tmp_path / "resumed" / "lora.json").exists()
    summary = run_distill(corpus, store, str(tmp_path / "resumed"), cfg, model="ttd-micro", seed=7)
    assert summary["resumed_from"] == 4
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = run_distill(corpus, store, str(tmp_path / "seed8"), cfg, model="ttd-micro", seed=8)
    c = load_file(str(tmp_path / "seed8" / "lora.safetensors"))
    assert other["fingerprint"] != summary["fingerprint"] and not all(torch.equal(a[k], c[k]) for k in a)


def test_lora_artefact_is_used_by_score_and_evaluate(scored, tmp_path):
    from ttd.configs import TagmaskEvalConfig
    from ttd.eval.tagmask import run_tagmask_eval
    from ttd.stages.score import run_score

    base, store = scored
    out = str(tmp_path / "lora")
    run_distill(str(base / "synth" / "train"), store, out, DistillConfig(**{**QUICK, "steps": 2}),
                model="ttd-micro")
    tuned = load_model(lora=out)  # the manifest names the base
    assert tuned.model_id.startswith(load_model("ttd-micro").model_id + "+lora-")
    s = run_score(str(base / "synth" / "train"), str(tmp_path / "store2"), lora=out, workers=0)
    assert s["model_id"] == tuned.model_id
    r = run_tagmask_eval(str(base / "synth" / "eval"), str(tmp_path / "store2"), TagmaskEvalConfig(max_samples=8),
                         lora=out)
    assert r["model_id"] == tuned.model_id and "pixel" in r["metrics"]
    with pytest.raises(TTDError, match="trained on base model"):
        load_model("ttd-tiny", lora=out)


def test_the_text_tower_can_have_its_own_rank_and_learning_rate(scored, tmp_path):
    base, store = scored
    corpus = str(base / "synth" / "train")
    assert "text_lora_rank" not in DistillConfig().result_config()  # unset: old artefacts keep their fingerprint
    cfg = DistillConfig(**{**QUICK, "steps": 3, "lora_rank": 2, "text_lora_rank": 6, "text_lr": 1e-12})
    out = tmp_path / "tower"
    run_distill(corpus, store, str(out), cfg, model="ttd-micro")
    weights = load_file(str(out / "lora.safetensors"))
    ranks = {k.split(".", 1)[0]: v.shape[0] for k, v in weights.items() if k.endswith("lora_A")}
    assert ranks == {"visual": 2, "text": 6}
    moved = {t: max(v.abs().max().item() for k, v in weights.items() if k.startswith(t) and k.endswith("lora_B"))
             for t in ("visual", "text")}
    assert moved["visual"] > 1e-4 and moved["text"] < 1e-8, moved  # B starts at zero; the text lr is ~0
    tuned = load_model(lora=str(out))  # the artefact records the per-tower rank and loads
    assert "+lora-" in tuned.model_id


def test_distill_text_only_keeps_l_distill_out_of_the_image_tower(scored, tmp_path):
    """With L_distill alone, the image tower's LoRA moves by default and stays at zero with distill_text_only: the
    caption maps' patch features are detached, so the caption embedding alone learns to draw the union."""
    base, store = scored
    corpus = str(base / "synth" / "train")
    assert "distill_text_only" not in DistillConfig().result_config()  # unset: old artefacts keep their fingerprint
    moved = {}
    for text_only in (False, True):
        cfg = DistillConfig(**{**QUICK, "steps": 3, "w_tag": 0.0, "w_contrastive": 0.0, "union_threshold": None,
                               "distill_text_only": text_only})
        out = tmp_path / f"text-only-{text_only}"
        run_distill(corpus, store, str(out), cfg, model="ttd-micro")
        weights = load_file(str(out / "lora.safetensors"))
        moved[text_only] = {t: max(v.abs().max().item() for k, v in weights.items()
                                   if k.startswith(t) and k.endswith("lora_B")) for t in ("visual", "text")}
    assert moved[False]["visual"] > 1e-4 and moved[False]["text"] > 1e-4, moved
    assert moved[True]["visual"] == 0.0 and moved[True]["text"] > 1e-4, moved


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """A 32-image train split in two shards, parsed (with the tagger: per-shard stats differ) and scored."""
    from ttd.stages.parse import run_parse
    from ttd.stages.score import run_score
    from ttd.synth.generate import SynthConfig, synthesize

    base = tmp_path_factory.mktemp("refresh")
    synthesize(str(base / "synth"), train=32, eval=0, seed=4, config=SynthConfig(shard_size=16))
    store = str(base / "store")
    run_parse(str(base / "synth" / "train"), store)
    run_score(str(base / "synth" / "train"), store, model="ttd-micro", workers=0)
    return base, store


def test_a_refresh_round_trains_again_from_the_base_on_pseudo_labels_rescored_by_the_round_before(two_shards,
                                                                                                    tmp_path):
    base, store = two_shards
    corpus = str(base / "synth" / "train")
    assert len(Store(store).manifests("parse")) == 2
    before = sorted((m["shard"], m["fingerprint"]) for m in Store(store).manifests("score"))
    one = DistillConfig(**{**QUICK, "steps": 3, "batch_size": 4})
    plain = run_distill(corpus, store, str(tmp_path / "plain"), one, model="ttd-micro", seed=5)
    cfg = one.model_copy(update={"refresh_rounds": 1})

    class Crash(Exception):
        pass

    seen = []

    def crash_in_round_two(step, _losses):
        seen.append(step)
        if step == 5:  # round 2's second step: its checkpoint at step 2 is written
            raise Crash

    out = tmp_path / "refreshed"
    with pytest.raises(Crash):
        run_distill(corpus, store, str(out), cfg, model="ttd-micro", seed=5, progress=crash_in_round_two)
    assert seen == [1, 2, 3, 4, 5]  # progress counts the steps of both rounds
    summary = run_distill(corpus, store, str(out), cfg, model="ttd-micro", seed=5)
    assert summary["resumed_from"] == 2 and summary["fingerprint"] != plain["fingerprint"]
    # round 1 is the plain run: same fingerprint, same weights
    teacher = out / "refresh" / "round-1"
    first = json.loads((teacher / "lora.json").read_text())
    assert first["fingerprint"] == plain["fingerprint"]
    a, b = load_file(str(tmp_path / "plain" / "lora.safetensors")), load_file(str(teacher / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the refreshed pseudo-labels: the same candidates, scored by round 1's model, in a store of their own
    refreshed = str(out / "refresh" / "labels-1")
    tuned_id = load_model(lora=str(teacher)).model_id
    assert {m["model_id"] for m in Store(refreshed).manifests("score")} == {tuned_id}
    from ttd.store.sql import query

    q = "SELECT key, tag_index, text, pixel_score FROM relevancy WHERE corpus = 'train' ORDER BY key, tag_index"
    old, new = query(store, q).to_pylist(), query(refreshed, q).to_pylist()
    assert [(r["key"], r["text"]) for r in old] == [(r["key"], r["text"]) for r in new]
    assert any(abs(x["pixel_score"] - y["pixel_score"]) > 1e-4 for x, y in zip(old, new))
    # the store's own pseudo-labels are untouched; the artefact says where its targets came from
    assert sorted((m["shard"], m["fingerprint"]) for m in Store(store).manifests("score")) == before
    final = json.loads((out / "lora.json").read_text())
    assert final["refreshed"] == [{"round": 1, "teacher": str(teacher), "labels": refreshed}]
    assert final["config"]["refresh_rounds"] == 1 and final["fingerprint"] == summary["fingerprint"]
    # an uninterrupted run gives the same weights; a second run is skipped
    straight = run_distill(corpus, store, str(tmp_path / "straight"), cfg, model="ttd-micro", seed=5)
    c, d = load_file(str(out / "lora.safetensors")), load_file(str(tmp_path / "straight" / "lora.safetensors"))
    assert straight["fingerprint"] == summary["fingerprint"] and all(torch.equal(c[k], d[k]) for k in c)
    assert run_distill(corpus, store, str(out), cfg, model="ttd-micro", seed=5)["skipped"]


def test_a_refresh_refuses_a_corpus_parsed_with_two_configurations(two_shards, tmp_path):
    from ttd.configs import OUTPUT_FIELDS, ParseConfig
    from ttd.corpus import open_corpus
    from ttd.stages.parse import run_parse
    from ttd.stages.refresh import committed_config

    base, _ = two_shards
    corpus, store = str(base / "synth" / "train"), str(tmp_path / "mixed")
    first, second = (s.name for s in open_corpus(corpus).shards())
    run_parse(corpus, store, ParseConfig(), shards=[first])
    assert committed_config(Store(store), "parse", "train", OUTPUT_FIELDS)["tagger"] is True
    run_parse(corpus, store, ParseConfig(tagger=False), shards=[second])
    with pytest.raises(TTDError, match="needs one parse configuration for corpus 'train'; its shards were committed "
                                       "with 2"):
        committed_config(Store(store), "parse", "train", OUTPUT_FIELDS)


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_checkpoints_and_artefacts_that_are_pickles_with_code_are_refused(scored, tmp_path, monkeypatch):
    base, store = scored
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "lora"
    run_distill(str(base / "synth" / "train"), store, str(out), DistillConfig(**{**QUICK, "steps": 2}),
                model="ttd-micro")
    (out / "lora.safetensors").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(TTDError, match="safetensors"):
        load_model(lora=str(out))
    fp = json.loads((out / "lora.json").read_text())["fingerprint"]  # same inputs, same fingerprint
    deltas = add_lora(load_model("ttd-micro").model, rank=8, alpha=16, towers=("visual", "text"),
                      targets=("attn_in", "attn_out", "mlp_fc", "mlp_proj"))
    names = [f"{n}.{k}" for n in deltas for k in ("lora_A", "lora_B")]
    ckpt = tmp_path / "crashed" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.safetensors").write_bytes(pickle.dumps({"w": Payload()}))
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "consumed": 8, "fingerprint": fp, "params": names,
                                                 "log": []}))
    cfg = DistillConfig(**{**QUICK, "steps": 2})
    with pytest.raises(TTDError, match="checkpoint .* unreadable"):
        run_distill(str(base / "synth" / "train"), store, str(tmp_path / "crashed"), cfg, model="ttd-micro")
    assert not (tmp_path / "PWNED").exists()  # never unpickled


def test_bad_inputs_are_clear_errors(scored, tmp_path):
    base, store = scored
    with pytest.raises(TTDError, match="does not exist"):
        run_distill(str(base / "synth" / "train"), str(tmp_path / "no-store"), str(tmp_path / "o"), model="ttd-micro")
    Store(str(tmp_path / "empty-store"), create=True)
    with pytest.raises(TTDError, match="no scored shard"):
        run_distill(str(base / "synth" / "train"), str(tmp_path / "empty-store"), str(tmp_path / "o"),
                    model="ttd-micro")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TTDError, match="not a ttd distill artefact"):
        run_distill(str(base / "synth" / "train"), store, str(tmp_path / "busy"), model="ttd-micro")
    with pytest.raises(TTDError, match="local folder"):
        run_distill(str(base / "synth" / "train"), store, "s3://bucket/lora", model="ttd-micro")
    with pytest.raises(TTDError, match="not a ttd LoRA artefact"):
        load_model(lora=str(tmp_path / "busy"))


@pytest.mark.slow
def test_ray_train_data_parallel_matches_one_worker(scored, tmp_path):
    """Two Ray Train ranks, gradients averaged every step: the weights match one worker's up to float summation
    order (amplified by Adam's normalisation: a few learning rates at most) and the contrastive term's smaller
    per-rank batch of negatives."""
    from ttd.stages.distill_ray import run_distill_ray

    base, store = scored
    corpus = str(base / "synth" / "train")
    cfg = DistillConfig(**{**QUICK, "steps": 3, "w_contrastive": 0.0})
    run_distill(corpus, store, str(tmp_path / "one"), cfg, model="ttd-micro", seed=3)
    summary = run_distill_ray(corpus, store, str(tmp_path / "two"), cfg, model="ttd-micro", seed=3, num_workers=2)
    assert summary["num_workers"] == 2 and (tmp_path / "two" / "lora.json").exists()
    a = load_file(str(tmp_path / "one" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3 * cfg.steps * cfg.lr
    assert max(b[k].abs().max().item() for k in b if k.endswith("lora_B")) > 0  # it did train
    # a refreshed run: rank 0 re-scores between the rounds while the other rank waits, then both train round two
    refreshed = cfg.model_copy(update={"steps": 2, "refresh_rounds": 1})
    run_distill_ray(corpus, store, str(tmp_path / "refreshed"), refreshed, model="ttd-micro", seed=3, num_workers=2)
    doc = json.loads((tmp_path / "refreshed" / "lora.json").read_text())
    assert [r["round"] for r in doc["refreshed"]] == [1] and doc["config"]["refresh_rounds"] == 1
    assert Store(doc["refreshed"][0]["labels"]).manifests("score")


def test_paper_mode_trains_through_the_head_and_prompts_that_made_the_pseudo_labels(scored, tmp_path):
    """`head: scoring` and `templates: None` come from the score stage's manifests (maskclip and its 4-prompt
    ensemble here), so the student's tag maps are the same function as the teacher's; the artefact records them."""
    from ttd.configs import DEFAULT_TEMPLATES
    from ttd.stages.distill import with_scoring_settings

    base, store = scored
    cfg = DistillConfig(head="scoring", templates=None, tag_target="paper")
    resolved = with_scoring_settings(cfg, Store(store), "train")
    assert resolved.head == "maskclip" and resolved.templates == DEFAULT_TEMPLATES
    assert with_scoring_settings(DistillConfig(), Store(store), "train") == DistillConfig()  # nothing to fill
    summary = run_distill(str(base / "synth" / "train"), store, str(tmp_path / "paper"),
                          DistillConfig(**{**QUICK, "steps": 2}, head="scoring", templates=None, tag_target="paper"),
                          model="ttd-micro")
    written = json.loads((tmp_path / "paper" / "lora.json").read_text())
    assert not summary["skipped"] and written["config"]["head"] == "maskclip"
    assert tuple(written["config"]["templates"]) == DEFAULT_TEMPLATES
