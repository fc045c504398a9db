"""The prepared benchmark scripts keep running (smoke sizes); their figures are recorded in docs/BENCHMARKS.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_score_smoke_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_score.py"), "--device", "cpu", "--smoke",
                           "--model", "ttd-tiny"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_only"]["224"]["images_per_s"] > 0
    runs = result["end_to_end"]  # 8 JPEGs in 8 shards of 1, the first warms up: 7 timed per run
    assert [(r["decoder"], r.get("decode_threads"), r.get("decode_processes"), r["pipelined"], r["images"])
            for r in runs] == [("device", 2, None, True, 7), ("pil", 1, None, True, 7), ("pil", 2, None, True, 7),
                               ("pil", None, 2, True, 7), ("device", 2, None, False, 7)]
    assert all(set(r["stage_seconds"]) == {"read", "decode", "device", "host", "write", "batches"} for r in runs)


def test_vit_b16_flops_match_the_published_cost():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_score import vit_gflops

    assert vit_gflops(224, extra_last=False) == pytest.approx(35.1, abs=0.1)


def test_gpu_distill_smoke_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_distill.py"), "--device", "cpu", "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1].replace("NaN", "null"))
    assert result["naive"]["samples_per_s"] > 0 and result["ours"]["samples_per_s"] > 0 and result["ratio"] > 0


def test_pretrain_benchmark_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/pretrain.py"), "--smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    assert [r["batch"] for r in runs] == [4, 8] and all(r["fp32"] > 0 and r["bf16"] > 0 for r in runs)


@pytest.mark.slow
def test_scale_benchmark_smoke_locally_and_on_s3(tmp_path):
    """benchmarks/scale.py at a smoke size: every row it prints for the docs' table, on disk and on the S3 server."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/scale.py"), "--shards", "12", "--s3",
                           "--latency-ms", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local, s3 = json.loads(out.read_text())
    for row in (local, s3):
        assert row["noop_parse_cold_s"] > 0 and row["noop_score_cold_s"] > 0 and row["new10_run_s"] > 0
    assert s3["where"] == "S3 +2 ms" and s3["new10_run_requests"] > 10  # at least a request per new shard
