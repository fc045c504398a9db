"""The README's "Deployments" section, end to end with real parts and nothing else.

A Prefect server on 127.0.0.1 (its own PREFECT_HOME and SQLite database), the process work pool `ttd-pool`,
`prefect deploy` of the nightly deployment from prefect.yaml with a short interval schedule added (the README's
quick check), and a worker started outside the checkout (the pull step must find the project by itself). The
server's scheduler must create runs and the worker complete one over a 2-shard corpus; after 2 more shards (and a
third still downloading) arrive, the next scheduled runs must process exactly those. Fails without the
SQLAlchemy pin (constraints.txt): the scheduler then creates no run at all.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INTERVAL_S = 30  # the schedule the test deploys beside the nightly cron


# ---------------------------------------------------------------- helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prefect:
    """What the test started (server, worker) and how to reach the server's API."""

    def __init__(self, home: Path, logs: Path):
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.logs = logs
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TTD_"))}
        self.env = {**keep, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "PREFECT_WORKER_HEARTBEAT_SECONDS": "10", "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str, cwd: Path) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process group
        proc = subprocess.Popen([str(BIN / "prefect"), *args], cwd=cwd, env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    def post(self, path: str, body: dict) -> list[dict]:
        r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def flow_runs(self) -> list[dict]:
        return self.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 200})

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else ["(not started)"]
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue


def wait_for(what: str, check, timeout: float, prefect: Prefect, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- server log ---\n"
                f"{prefect.log_tail('server')}\n--- worker log ---\n{prefect.log_tail('worker')}")


def manifests(store: Path, stage: str) -> dict[str, bytes]:
    """{shard: manifest bytes} of a stage's committed shards (store/manifests/STAGE/corpus=C/shard=S.json)."""
    return {p.stem.removeprefix("shard="): p.read_bytes() for p in (store / "manifests" / stage).rglob("shard=*.json")}


def artefact_of(prefect: Prefect, run_id: str) -> dict | None:
    found = prefect.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return found[0] if found else None


def add_shards(synth: Path, corpus: Path, names: list[str], *, stats: bool = True) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".tar", ".parquet") + (("_stats.json",) if stats else ()):
            shutil.copy2(synth / f"{name}{suffix}", corpus / f"{name}{suffix}")


# ---------------------------------------------------------------- the test

@pytest.fixture
def prefect(tmp_path):
    p = Prefect(tmp_path / "prefect-home", tmp_path)
    yield p
    p.stop()


def test_nightly_deployment_is_scheduled_and_runs_only_new_shards(prefect, tmp_path):
    from ttd.synth.generate import SynthConfig, synthesize

    synth = tmp_path / "synth"
    synthesize(str(synth), train=40, eval=0, seed=5, config=SynthConfig(shard_size=8))
    corpus, store = tmp_path / "corpus", tmp_path / "store"
    add_shards(synth / "train", corpus, ["00000", "00001"])

    # 1. the server (README: `prefect server start`), a process pool, the nightly deployment, a worker
    prefect.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(prefect.port), cwd=tmp_path)
    wait_for("the Prefect server's health check", lambda: _healthy(prefect.api), 180, prefect)
    prefect.cli("work-pool", "create", "ttd-pool", "--type", "process", cwd=ROOT)
    prefect.cli("deploy", "--no-prompt", "--name", "nightly-new-shards", "--interval", str(INTERVAL_S), cwd=ROOT,
                env={"TTD_CORPUS": str(corpus), "TTD_STORE": str(store)})
    (deployment,) = prefect.post("/deployments/filter", {})
    assert deployment["name"] == "nightly-new-shards"
    assert deployment["parameters"]["corpus"] == str(corpus) and deployment["parameters"]["store"] == str(store)
    assert deployment["parameters"]["overrides"] == {"flow": {"stages": ["parse", "score"]}}

    # the scheduler creates runs on its own: what SQLAlchemy 2.1 broke (no run ever appears)
    scheduled = wait_for("the scheduler to create a scheduled run (none: is SQLAlchemy pinned?)",
                         lambda: [r for r in prefect.flow_runs() if r["auto_scheduled"]], 90, prefect)
    assert all(r["deployment_id"] == deployment["id"] for r in scheduled)

    worker_cwd = tmp_path / "elsewhere"  # not the checkout: the pull step finds the project itself
    worker_cwd.mkdir()
    prefect.start("worker", "worker", "start", "--pool", "ttd-pool", cwd=worker_cwd)

    def finished() -> list[dict]:
        runs = prefect.flow_runs()
        bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        assert not bad, f"run {bad[0]['name']} ended {bad[0]['state_type']}: {bad[0]['state']['message']}\n" \
                        f"{prefect.log_tail('worker', 80)}"
        return [r for r in runs if r["state_type"] == "COMPLETED"]

    first = wait_for("a scheduled run to complete", finished, 300, prefect)[0]
    assert first["auto_scheduled"]
    assert first["name"].startswith("nightly-new-shards-corpus-"), first["name"]  # deployment and corpus
    committed = {stage: manifests(store, stage) for stage in ("parse", "score")}
    assert set(committed["parse"]) == set(committed["score"]) == {"00000", "00001"}, committed

    # what the run shows: planning tasks named by stage, ttd's own INFO lines, a Markdown artifact
    tasks = {t["name"] for t in prefect.post("/task_runs/filter",
                                              {"task_runs": {"flow_run_id": {"any_": [first["id"]]}}})}
    assert {"plan-parse", "plan-score"} <= tasks, tasks
    def logged() -> list[str]:  # the run's log lines reach the API in batches, up to its process's exit
        lines = [log["message"] for log in prefect.post("/logs/filter", {
            "logs": {"flow_run_id": {"any_": [first["id"]]}}, "limit": 200})]
        return lines if any(m.startswith("score corpus: 2 shard(s) committed") for m in lines) else []

    wait_for("the `ttd.stages.score` logger's INFO line in the run's logs", logged, 30, prefect)
    table = artefact_of(prefect, first["id"])
    assert table is not None and table["type"] == "markdown" and table["key"] == "ttd-nightly-new-shards-corpus"
    assert "| score | done | 2 | 0 | 0 | 0 |" in table["data"], table["data"]

    # 2. new shards arrive (and one still downloading: no _stats.json); later runs process exactly those
    add_shards(synth / "train", corpus, ["00004"], stats=False)
    add_shards(synth / "train", corpus, ["00002", "00003"])
    arrived = time.time()
    done_before = len(finished())

    def new_shards_scored() -> list[dict]:
        runs = finished()
        return runs if len(runs) > done_before and set(manifests(store, "score")) >= {"00002", "00003"} else []

    runs = wait_for("a scheduled run to score the new shards", new_shards_scored, 300, prefect)
    later = [r for r in runs if _epoch(r["start_time"]) > _epoch(first["end_time"])]
    after = {stage: manifests(store, stage) for stage in ("parse", "score")}
    for stage in ("parse", "score"):
        assert set(after[stage]) == {"00000", "00001", "00002", "00003"}  # 00004 waits for its _stats.json
        for shard in ("00000", "00001"):  # not recomputed: the very same manifest
            assert after[stage][shard] == committed[stage][shard], (stage, shard)
    tables = [artefact_of(prefect, r["id"])["data"] for r in later]
    processed = [_score_row(t) for t in tables]
    assert sum(p[0] for p in processed) == 2, tables  # exactly the two new shards, over the later runs
    busy = tables[[p[0] for p in processed].index(2)] if 2 in [p[0] for p in processed] else None
    if busy is not None:  # the run that found both new shards: 2 done, 2 already done, 1 waiting
        assert _score_row(busy) == (2, 2, 1), busy
    assert all(_epoch(r["start_time"]) > arrived - INTERVAL_S * 4 for r in later)

    # 3. the README's one-run override: deep-merged over the nightly's own (its stages stay parse and score), and
    # the run warns that the schedule will recompute what it commits with another threshold
    out = prefect.cli("deployment", "run", "ttd-pipeline/nightly-new-shards", "--param",
                      'overrides={"score": {"threshold": 0.6}}', cwd=ROOT)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    manual = wait_for("the overridden run to complete",
                      lambda: [r for r in finished() if r["id"] == run_id], 300, prefect)[0]
    assert manual["parameters"]["overrides"] == {"score": {"threshold": 0.6}}  # what Prefect hands the flow
    table = artefact_of(prefect, run_id)["data"]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["stage", "parse", "score"], table  # no distill, no evaluation: the nightly's stages were kept
    assert _score_row(table)[0] == 4, table  # a new threshold is a new fingerprint: every shard re-scored
    assert "scheduled deployment 'ttd-pipeline/nightly-new-shards'" in table and "0.4 -> 0.6" in table, table


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _epoch(stamp: str | None) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0


def _score_row(markdown: str) -> tuple[int, int, int]:
    """(processed, already done, waiting) of the score row of a run's stage table."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == "score":
            return int(cells[2]), int(cells[3]), int(cells[4])
    raise AssertionError(f"no score row in:\n{markdown}")
