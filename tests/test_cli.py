"""The `ttd` command line end to end, as a user runs it (subprocesses, real files)."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

TTD = [sys.executable, "-m", "ttd.cli.main"]


def ttd(*args, check=True):
    proc = subprocess.run([*TTD, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"ttd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    for name in ("a", "b"):
        ttd("synth", str(base / name), "--train", "60", "--eval", "20", "--pretrain", "30", "--seed", "3",
            "--shard-size", "25", "--json")
    return base


def test_synth_is_byte_identical_for_one_seed(synth_pair):
    a, b = synth_pair / "a", synth_pair / "b"
    files = tree_files(a)
    assert files == tree_files(b)
    assert {"train/00000.tar", "train/00000.parquet", "train/00000_stats.json", "eval/00000.tar",
            "pretrain/00001.tar"} <= set(files)
    mismatch = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch[1] == [] and mismatch[2] == []


def test_synth_corpus_indexes_and_queries(synth_pair, tmp_path):
    store = str(tmp_path / "store")
    corpus = str(synth_pair / "a" / "train")
    summary = json.loads(ttd("index", "--corpus", corpus, "--store", store, "--json").stdout)
    assert summary["samples"] == 60 and summary["errors"] == 0 and summary["shards"] == 3
    out = ttd("sql", "--store", store, "SELECT count(*) AS n FROM samples", "--format", "json").stdout
    assert json.loads(out) == [{"n": 60}]
    again = json.loads(ttd("index", "--corpus", corpus, "--store", store, "--json").stdout)
    assert again["done"] == 0 and again["skipped_done"] == 3
    csv = ttd("sql", "--store", store, "SELECT shard, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1",
              "--format", "csv").stdout
    assert csv.splitlines() == ['"shard","n"', '"00000",25', '"00001",25', '"00002",10']


def test_sql_refuses_a_write_with_one_line(synth_pair, tmp_path):
    store = str(tmp_path / "store")
    ttd("index", "--corpus", str(synth_pair / "a" / "eval"), "--store", store, "--json")
    proc = ttd("sql", "--store", store, "INSERT INTO errors SELECT * FROM errors", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: ttd sql is read-only: INSERT statements are refused; use "
                                                "SELECT"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["index", "--corpus", "/nonexistent/corpus", "--store", "/tmp/x"], "does not exist"),
    (["sql", "--store", "/nonexistent/store", "SELECT 1"], "does not exist"),
    (["synth", "/tmp/never", "--train", "-1"], "must be >= 0"),
])
def test_user_errors_are_one_clear_line(args, needle):
    proc = ttd(*args, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_synth_config_with_unknown_key_is_refused(tmp_path):
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("image_size: 64\nno_such_setting: 3\n")
    proc = ttd("synth", str(tmp_path / "o"), "--train", "2", "--eval", "1", "--config", str(cfg), check=False)
    assert proc.returncode == 2
    assert "no_such_setting" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_every_command():
    out = ttd("--help").stdout
    for cmd in ("synth", "index", "sql"):
        assert cmd in out
    assert "--corpus" in ttd("index", "--help").stdout


def test_parse_synth_corpus_then_query_tags(synth_pair, tmp_path):
    store = str(tmp_path / "store")
    corpus = str(synth_pair / "a" / "train")
    first = json.loads(ttd("parse", "--corpus", corpus, "--store", store, "--json").stdout)
    assert first["done"] == 3 and first["captions"] == 60 and first["tags"] > 60 and first["policy"] == "words"
    again = json.loads(ttd("parse", "--corpus", corpus, "--store", store, "--json").stdout)
    assert again["done"] == 0 and again["skipped_done"] == 3
    out = ttd("sql", "--store", store, "SELECT lemma, count(*) FROM tags GROUP BY 1 ORDER BY 2 DESC LIMIT 20",
              "--format", "json").stdout
    rows = json.loads(out)
    assert len(rows) == 20 and rows[0]["count_star()"] >= rows[-1]["count_star()"]


def test_parse_user_errors_are_one_line(tmp_path):
    proc = ttd("parse", "--corpus", str(tmp_path), "--store", str(tmp_path / "s"), "--policy", "nouns",
               "--no-tagger", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "needs POS tags" in lines[0]


def test_score_synth_corpus_then_answer_the_acceptance_questions(synth_pair, tmp_path):
    store = str(tmp_path / "store")
    corpus = str(synth_pair / "a" / "train")
    unparsed = ttd("score", "--corpus", corpus, "--store", store, "--model", "ttd-micro", "--workers", "0",
                   check=False)  # a user mistake: says what to run first, and fails
    assert unparsed.returncode == 2 and "run `ttd parse" in unparsed.stderr
    ttd("parse", "--corpus", corpus, "--store", store, "--json")
    first = json.loads(ttd("score", "--corpus", corpus, "--store", store, "--model", "ttd-micro", "--workers", "0",
                           "--json").stdout)
    assert first["done"] == 3 and first["images"] == 60 and first["masks"] > 0
    again = json.loads(ttd("score", "--corpus", corpus, "--store", store, "--model", "ttd-micro", "--workers", "0",
                           "--json").stdout)
    assert again["done"] == 0 and again["skipped_done"] == 3
    top = json.loads(ttd("sql", "--store", store, "SELECT lower(text) AS tag, count(*) AS n FROM relevancy WHERE "
                         "selected GROUP BY 1 ORDER BY 2 DESC LIMIT 5", "--format", "json").stdout)
    assert top and top[0]["n"] >= top[-1]["n"]
    stop = json.loads(ttd("sql", "--store", store, "SELECT t.is_stop, avg(r.selected::INT) AS rate FROM relevancy r "
                          "JOIN tags t USING (corpus, shard, key, tag_index) GROUP BY 1", "--format", "json").stdout)
    assert {r["is_stop"] for r in stop} == {True, False}
    key = json.loads(ttd("sql", "--store", store, "SELECT key FROM masks LIMIT 1", "--format", "json").stdout)[0]
    out = tmp_path / "show.png"
    ttd("show", "--store", store, "--key", key["key"], "--out", str(out))
    assert out.stat().st_size > 1000


def test_an_unknown_flag_is_one_usage_line_not_a_traceback():
    proc = subprocess.run([*TTD, "sql", "--bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_version_short_help_and_usage_errors_in_one_line():
    from ttd import __version__

    assert ttd("--version").stdout.strip() == f"ttd {__version__}"
    assert "Usage:" in ttd("score", "-h").stdout and "--corpus" in ttd("score", "-h").stdout
    proc = ttd("score", "--store", "x", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: Missing option '--corpus'") and "score -h" in lines[0]


@pytest.mark.parametrize("env", [
    {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},  # dead
    {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",  # no credentials anywhere
     "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
], ids=["dead-endpoint", "no-credentials"])
def test_s3_problems_are_one_error_line_within_seconds(env):
    import os
    import time

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    t0 = time.perf_counter()
    proc = subprocess.run([*TTD, "sql", "--store", "s3://missing-bucket/store", "SELECT 1"], capture_output=True,
                          text=True, timeout=120, env={**clean, **env})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert ("credentials" in lines[0]) if "AWS_ACCESS_KEY_ID" not in env else ("endpoint" in lines[0])
    assert time.perf_counter() - t0 < 30  # about 2 s on an idle machine; botocore's retries alone took 10-20 s


def test_readers_of_the_store_do_not_import_torch():
    """`ttd show`, `ttd report` and `ttd sql` read Parquet and draw: torch and open_clip cost seconds to import."""
    code = ("import sys, ttd.report.show, ttd.report.report, ttd.store.sql; "
            "print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_hub_weights_that_cannot_be_fetched_fail_fast_in_one_line(synth_pair, tmp_path):
    """`--pretrained openai` with no cached weights and no reachable hub: one `error:` line in seconds, before the
    model is built (offline it used to retry for about a minute and end in a traceback)."""
    import os
    import time

    store, corpus = str(tmp_path / "store"), str(synth_pair / "a" / "train")
    ttd("parse", "--corpus", corpus, "--store", store, "--json")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens
    t0 = time.monotonic()
    proc = subprocess.run([*TTD, "score", "--corpus", corpus, "--store", store, "--model", "ViT-B-16", "--pretrained",
                           "openai", "--workers", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: cannot download weights for ViT-B-16/openai: 127.0.0.1:9 is unreachable")
    assert "Traceback" not in proc.stderr and "--pretrained /path/to/weights.safetensors" in lines[-1]
    unknown = subprocess.run([*TTD, "score", "--corpus", corpus, "--store", store, "--model", "ViT-B-16",
                              "--pretrained", "nosuch", "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert unknown.returncode != 0 and "has no pretrained tag 'nosuch' (its tags: openai" in unknown.stderr


def test_progress_is_one_line_per_stage_off_a_terminal(synth_pair, tmp_path):
    """Not on a terminal (a log, CI), each stage's bar ends as one line: shards done of the shards to do, the rate
    in the user's unit measured once the parser is loaded, and the ETA."""
    store, corpus = str(tmp_path / "store"), str(synth_pair / "a" / "train")
    line = [ln for ln in ttd("parse", "--corpus", corpus, "--store", store).stderr.splitlines()
            if ln.startswith("parse (shards)")]
    assert len(line) == 1 and " 3/3 " in line[0] and "captions/s" in line[0] and " eta " in line[0]
    again = [ln for ln in ttd("parse", "--corpus", corpus, "--store", store).stderr.splitlines()
             if ln.startswith("parse (shards)")]
    assert len(again) == 1 and " 0/0 " in again[0]  # nothing left to do: the total says so
