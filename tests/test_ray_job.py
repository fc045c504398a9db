"""README's `ray job submit` path: a pipeline run submitted to a real Ray head (`ray start --head` with its
dashboard, as on a cluster) runs to the end on the cluster, whoever is connected, and its job status says so."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, ray_node

from ttd.store.store import Store

BIN = Path(sys.executable).parent


def ray_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_a_pipeline_run_submitted_as_a_ray_job_runs_on_the_cluster(tmp_path):
    subprocess.run([str(BIN / "ttd"), "synth", str(tmp_path / "synth"), "--train", "40", "--eval", "2", "--seed", "5",
                    "--shard-size", "20"], check=True, capture_output=True, timeout=300)
    work = tmp_path / "job"  # what --working-dir uploads: here only the run's config
    work.mkdir()
    store = tmp_path / "store"
    (work / "run.yaml").write_text(yaml.safe_dump({
        "name": "ray-job", "corpus": str(tmp_path / "synth" / "train"), "store": str(store),
        "model": {"name": "ttd-micro"}, "parse": {"tagger": False}, "ray": {"workers": 1},
        "flow": {"shards_per_batch": 1, "retries": 0, "retry_delay_seconds": 0}}))
    port, dashboard = free_port(), free_port()
    node_env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "OMP_NUM_THREADS": "1"}
    with ray_node("--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={dashboard}", "--num-cpus=2", env=node_env) as head:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 180
        while ray_cli("job", "list", "--address", url, timeout=60).returncode != 0:  # the job server is up
            assert head.poll() is None and time.monotonic() < deadline, "the head's job server never came up"
            time.sleep(2)
        submit = ray_cli("job", "submit", "--address", url, "--submission-id", "ttd-run", "--working-dir",
                         str(work), "--", "ttd", "run", "--config", "run.yaml")
        status = ray_cli("job", "status", "--address", url, "ttd-run", timeout=60)
        logs = ray_cli("job", "logs", "--address", url, "ttd-run", timeout=60)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "Job 'ttd-run' succeeded" in status.stdout
    assert "score" in logs.stdout, logs.stdout[-2000:]  # the run's own output, kept by the cluster
    s = Store(str(store))
    assert sorted(m["shard"] for m in s.manifests("score")) == ["00000", "00001"]  # scored by the cluster's actor
    assert s.read("relevancy").num_rows == s.read("tags").num_rows > 0
    assert len(s.manifests("parse")) == 2
