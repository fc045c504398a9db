"""`ttd report`: Markdown + HTML + PNGs from a real store (synth corpus, ttd-micro scores, two TagMask runs)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_simple_tags
from PIL import Image

from ttd.configs import TagmaskEvalConfig
from ttd.eval.tagmask import run_tagmask_eval, store_metrics
from ttd.report.report import MAX_CURVE_POINTS, _connect, build_report, training_curves
from ttd.store import schemas
from ttd.store.sql import query
from ttd.store.store import Store

TTD = [sys.executable, "-m", "ttd.cli.main"]


@pytest.fixture(scope="module")
def store_two_runs(tmp_path_factory):
    """Scored train shard, two TagMask evaluations (maskclip vs sclip head), a training log and an error row."""
    from ttd.stages.score import run_score
    from ttd.synth.generate import synthesize

    base = tmp_path_factory.mktemp("report")
    synthesize(str(base / "synth"), train=6, eval=12, seed=5)
    store = str(base / "store")
    write_simple_tags(store, str(base / "synth" / "train"))
    run_score(str(base / "synth" / "train"), store, model="ttd-micro", workers=0)
    eval_root = str(base / "synth" / "eval")
    a = run_tagmask_eval(eval_root, store, model="ttd-micro")
    b = run_tagmask_eval(eval_root, store, TagmaskEvalConfig(bg_threshold=0.6, score={"head": "sclip"}),
                         model="ttd-micro")
    assert a["run"] != b["run"] and a["metrics"] != b["metrics"]
    s = Store(store)
    log_rows = [{"step": i, "epoch": i / 10, "loss": 3.0 - 0.1 * i, "loss_distill": 1.0 / i, "loss_tag": None,
                 "loss_contrastive": None, "lr": 1e-4, "samples_per_s": 50.0} for i in range(1, 21)]
    s.commit("distill", {"run": "lora-1"}, "fp1",
             {"train_log": pa.Table.from_pylist(log_rows, schema=schemas.get("train_log").arrow)})
    long_rows = [{**log_rows[0], "step": i, "loss": 5.0 - i / 1000, "loss_distill": None} for i in range(1, 1201)]
    s.commit("distill", {"run": "lora-2"}, "fp2",
             {"train_log": pa.Table.from_pylist(long_rows, schema=schemas.get("train_log").arrow)})
    err = [{"key": "000000099", "stage": "score", "error_type": "corrupt_image", "message": "bad bytes",
            "severity": "error", "source": None}] * 2
    s.commit("index", {"corpus": "train", "shard": "99999"}, "fp1",
             {"errors": pa.Table.from_pylist(err, schema=schemas.get("errors").arrow)})
    return store, a["run"], b["run"]


def md_table_rows(md: str, first_header: str) -> list[list[str]]:
    """Rows (cells, stripped) of the first Markdown table whose header starts with `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1]


@pytest.mark.slow
def test_report_numbers_plots_and_samples(store_two_runs, tmp_path):
    store, run_a, run_b = store_two_runs
    result = build_report(store, tmp_path / "rep", samples=3)
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    assert result["markdown"].endswith("report.md") and page.startswith("<!DOCTYPE html>")
    assert [r["run"] for r in result["runs"]] == [run_a, run_b]  # oldest first
    assert "<link" not in page and "<script" not in page and 'src="http' not in page  # self-contained

    # each run's table holds exactly the numbers store_metrics returns
    s = Store(store)
    for label, run in (("A", run_a), ("B", run_b)):
        m = store_metrics(s, run)
        part = section(md, f"### Run {label} base model ({run[:8]})")  # what the run is, and its id
        rows = {r[0]: r for r in md_table_rows(part, "tag selection")}
        for method, name in (("image", "image-tag"), ("text", "text-tag"), ("pixel", "pixel-tag"),
                             ("noun", "noun parsing")):
            for col, metric in enumerate(("precision", "recall", "f1", "accuracy", "map", "single_tag_share"), 1):
                cell = rows[name][col]
                if metric in m[method]:
                    assert float(cell) == pytest.approx(m[method][metric], abs=0.006), (run, method, metric)
                else:
                    assert cell == "-"
        cap = md_table_rows(part, "caption heatmap")[0]
        for col, metric in enumerate(("caption_miou", "caption_mfpr", "caption_mfnr", "coverage_best",
                                      "coverage_second"), 1):
            assert float(cap[col]) == pytest.approx(m["caption"][metric], abs=0.006)
        union = md_table_rows(part, "caption heatmap")[1]  # L_distill's target, scored like the caption
        assert union[0].startswith("selected tags' union")
        for col, metric in enumerate(("caption_miou", "caption_mfpr", "caption_mfnr"), 1):
            assert float(union[col]) == pytest.approx(m["selected_union"][metric], abs=0.006)
        assert f"{m['pixel']['f1']:.2f}" in page  # the HTML page says the same

    # the comparison: columns A, B and B - A, for every row
    comp = section(md, "## TagMask comparison")
    ma, mb = store_metrics(s, run_a), store_metrics(s, run_b)
    tag_rows = md_table_rows(comp, "scoring")
    assert {(r[0], r[1]) for r in tag_rows} >= {("pixel-tag", "F1"), ("image-tag", "mAP"), ("noun parsing", "R")}
    for r in tag_rows:
        a, b, d = float(r[2]), float(r[3]), float(r[4])
        assert d == pytest.approx(b - a, abs=0.011)
    pixel_f1 = next(r for r in tag_rows if r[:2] == ["pixel-tag", "F1"])
    assert float(pixel_f1[4]) == pytest.approx(mb["pixel"]["f1"] - ma["pixel"]["f1"], abs=0.006)
    assert float(pixel_f1[4]) != 0  # the heads differ, so the pixel-tag scores do
    cap_rows = {r[0]: r for r in md_table_rows(comp, "metric")}
    assert float(cap_rows["mIoU"][3]) == pytest.approx(mb["caption"]["caption_miou"] - ma["caption"]["caption_miou"],
                                                       abs=0.006)
    union_miou = cap_rows["mIoU, selected tags' union (L_distill target)"]
    assert float(union_miou[3]) == pytest.approx(mb["selected_union"]["caption_miou"]
                                                 - ma["selected_union"]["caption_miou"], abs=0.006)
    bias = {r[0]: r for r in md_table_rows(comp, "diagnostic")}
    for key, metric in (("coverage of best tag", "coverage_best"), ("coverage of second tag", "coverage_second")):
        assert float(bias[key][3]) == pytest.approx(mb["caption"][metric] - ma["caption"][metric], abs=0.006)
    assert float(bias["single-tag share, pixel-tag"][1]) == pytest.approx(ma["pixel"]["single_tag_share"], abs=0.006)

    # the runs table says what each model is as well as its id
    listed = md_table_rows(section(md, "## Evaluation runs"), "run")
    assert [r[:3] for r in listed] == [["A", "base model", run_a], ["B", "base model", run_b]]

    # header: stages and errors, aggregated
    stages = {r[0]: r for r in md_table_rows(md, "stage")}
    assert {"parse", "score", "evaluate", "distill", "index"} <= set(stages)
    assert stages["evaluate"][1] == "2"
    errors = md_table_rows(section(md, "## Errors"), "stage")
    assert errors == [["score", "corrupt_image", "error", "2", "1"]]
    train = md_table_rows(section(md, "## Training"), "run")
    assert train[0][:3] == ["lora-1", "20", "20"] and float(train[0][4]) == pytest.approx(1.0)
    assert train[1][:3] == ["lora-2", "1200", "1200"] and float(train[1][4]) == pytest.approx(3.8)
    con = _connect(s, ["train_log"])
    _, curves = training_curves(con)
    assert curves["lora-1"]["step"] == list(range(1, 21))
    assert len(curves["lora-2"]["step"]) == MAX_CURVE_POINTS and curves["lora-2"]["step"][-1] < 1200
    assert curves["lora-2"]["loss"][0] == pytest.approx(5.0 - 1.5 / 1000, abs=1e-3)  # a bucket averages 2-3 steps

    # tags and pseudo-labels, from the tables parse and score wrote (no eval split needed)
    tags = section(md, "## Tags and pseudo-labels")
    n_tags = query(store, "SELECT count(*) AS n FROM tags").to_pylist()[0]["n"]
    assert f"{n_tags:,} candidate tags" in tags
    by_pos = md_table_rows(tags, "part of speech")
    assert sum(int(r[2].replace(",", "")) for r in by_pos) == n_tags
    rates = query(store, "SELECT t.pos, t.is_stop, 100 * avg(r.selected::INT) AS rate FROM tags t JOIN relevancy r "
                         "USING (corpus, shard, key, tag_index) GROUP BY 1, 2").to_pylist()
    shown = {(r[0], r[1]): r[3] for r in by_pos}
    for r in rates:
        assert float(shown[(r["pos"] or "-", "yes" if r["is_stop"] else "no")]) == pytest.approx(r["rate"], abs=0.006)
    assert md_table_rows(tags, "lemma") and "masks for" in tags

    # charts and samples: real PNGs of a useful size, referenced relatively from report.md and embedded in the page
    names = {p.rsplit("/", 1)[1] for p in result["plots"]}
    assert names == {"f1.png", "coverage.png", "training.png", "pixel_scores.png"}
    assert len(result["samples"]) == 3
    assert page.count('src="data:image/png;base64,') == len(result["plots"]) + 3  # one file holds every image
    for path in result["plots"] + result["samples"]:
        rel = Path(path).relative_to(tmp_path / "rep").as_posix()
        assert f"]({rel})" in md and f'src="{rel}"' not in page
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn
    assert [re.sub(r"^\d+-", "", p.rsplit("/", 1)[1]) for p in result["samples"]] == \
        ["000000000.png", "000000001.png", "000000002.png"]


@pytest.mark.slow
def test_runs_are_labelled_by_what_the_model_is(tmp_path):
    """The base model, TTD or the contrastive-only control, read from the LoRA artefact the evaluation loaded."""
    from ttd.models.loading import model_role
    from ttd.report.report import EvalRun

    def artefact(name: str, **weights: float) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "lora.json").write_text(json.dumps({"kind": "lora", "config": weights}))
        return str(tmp_path / name)

    assert model_role(None) == "base model"
    assert model_role(artefact("ttd", w_distill=1.0, w_tag=1.0, w_contrastive=0.1)) == "TTD"
    assert model_role(artefact("control", w_distill=0.0, w_tag=0.0, w_contrastive=1.0)) == \
        "contrastive-only fine-tune"
    run = EvalRun(run="0123456789", dataset="tagmask", model_id="m", head=None, committed_at="", metrics={},
                  label="B", role="TTD")
    assert run.name == "B TTD (01234567)"


def test_run_order_can_be_chosen_and_the_difference_follows(store_two_runs, tmp_path):
    store, run_a, run_b = store_two_runs
    result = build_report(store, tmp_path / "rep", samples=0, runs=[run_b[:6], run_a])
    assert [r["run"] for r in result["runs"]] == [run_b, run_a] and not result["samples"]
    md = (tmp_path / "rep" / "report.md").read_text()
    s = Store(store)
    ma, mb = store_metrics(s, run_a), store_metrics(s, run_b)
    row = next(r for r in md_table_rows(section(md, "## TagMask comparison"), "scoring") if r[:2] == ["pixel-tag",
                                                                                                      "F1"])
    assert float(row[4]) == pytest.approx(ma["pixel"]["f1"] - mb["pixel"]["f1"], abs=0.006)  # now A - B
    with pytest.raises(Exception, match="matches no run"):
        build_report(store, tmp_path / "rep2", runs=["zzzz"])


def test_segmentation_runs_get_their_own_table(tmp_path):
    store = str(tmp_path / "store")
    s = Store(store, create=True)
    for run, miou in (("seg-a", 40.0), ("seg-b", 47.5)):
        rows = [{"dataset": "voc", "metric": k, "method": "maskclip", "value": v, "fingerprint": run,
                 "model_id": "m"} for k, v in (("miou", miou), ("mfpr", 30.0), ("mfnr", 100 - miou - 30),
                                               ("aacc", 80.0), ("macc", 55.0), ("images", 9.0))]
        s.commit("evaluate", {"run": run}, run, {"metrics": pa.Table.from_pylist(rows,
                                                                                 schema=schemas.get("metrics").arrow)})
    result = build_report(store, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = md_table_rows(section(md, "### voc"), "run")
    assert [r[3] for r in rows[:2]] == ["9", "9"]
    assert rows[2][0].startswith("Δ B − A") and float(rows[2][4]) == pytest.approx(7.5)
    assert {p.rsplit("/", 1)[1] for p in result["plots"]} == {"segmentation.png"}
    assert "TagMask comparison" not in md


def test_empty_store_says_there_are_no_metrics(tmp_path):
    store = str(tmp_path / "empty")
    Store(store, create=True)
    result = build_report(store, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "there are no metrics in this store yet" in md.lower()
    assert "nothing has been committed" in md.lower() and "no errors recorded" in md.lower()
    assert result["runs"] == [] and result["plots"] == [] and result["samples"] == []
    assert "no metrics" in (tmp_path / "rep" / "report.html").read_text().lower()


@pytest.mark.slow
def test_cli_report_json_and_missing_store(store_two_runs, tmp_path):
    store, run_a, run_b = store_two_runs
    proc = subprocess.run([*TTD, "report", "--store", store, "--out", str(tmp_path / "r"), "--samples", "1",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["markdown"] == str(tmp_path / "r" / "report.md") and len(doc["samples"]) == 1
    assert [r["run"] for r in doc["runs"]] == [run_a, run_b] and doc["runs"][0]["label"] == "A"
    missing = subprocess.run([*TTD, "report", "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300)
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
    assert not (tmp_path / "x").exists()


def test_show_draws_every_candidate_one_scale_and_says_what_it_left_out():
    """`ttd show`'s figure: every candidate in the table, selected maps on one colour scale with a colour bar, and
    a visible "+N more" past max_tiles."""
    import io

    from ttd.corpus import Sample
    from ttd.report.show import draw_figure

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    sample = Sample("c", "00000", "000000001", "a strawberry and a duck", buf.getvalue())
    words = ["a", "strawberry", "and", "a", "duck"]
    rel = [{"tag_index": i, "text": w, "pixel_score": s, "image_score": 0.1, "text_score": 0.2, "selected": s > 0.4}
           for i, (w, s) in enumerate(zip(words, [0.1, 1.0, 0.0, 0.5, 0.9]))]
    maps = [(r, np.full((4, 4), 0.1 * (i + 1), np.float32)) for i, r in enumerate(rel) if r["selected"]]
    fig = draw_figure(sample, rel, maps, max_tiles=2)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
    assert "+1 more\nselected" in texts
    tables = [ax.tables[0] for ax in fig.axes if ax.tables]
    cells = {c.get_text().get_text() for c in tables[0].get_celld().values()}
    assert set(words) <= cells and "selected" in cells
    layers = [im for ax in fig.axes for im in ax.images if im.get_alpha() is not None]
    assert len(layers) == 2 and len({im.get_clim() for im in layers}) == 1  # one scale for every map
    assert any(ax.get_title() == "heat" for ax in fig.axes)  # the colour bar
