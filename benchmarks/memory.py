"""Peak memory of `ttd parse` and `ttd score` on CPU: the demo's corpus size against 10x that, same shard size.

    .venv/bin/python benchmarks/memory.py               # 800 and 8,000 TagMask-Synth train samples, embedded model
    .venv/bin/python benchmarks/memory.py --quick       # 100 and 1,000 samples, ttd-micro: the test's size

Each stage runs as its own process (the CLI, as a user runs it) into a fresh store; its peak resident set size is
read from the kernel's accounting of that process (`os.wait4`), so imports, the model and every shard count. Both
stages hold one shard's rows at a time, so the peak depends on the shard size and the model, not on the corpus:
the bound checked is peak(10x corpus) <= 1.10 x peak(demo corpus) + 32 MiB. (The parse stage also remembers up to
`cache_size` distinct captions across shards, 100,000 by default: a fixed ceiling, reached only on large corpora.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TTD = [sys.executable, "-m", "ttd.cli.main"]
SLACK, FIXED_MIB = 1.10, 32.0


def peak_mib(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one command run to completion."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def measure(samples: list[int], shard_size: int, model: str, work: Path) -> list[dict]:
    from ttd.synth.generate import SynthConfig, synthesize

    rows = []
    for n in samples:
        corpus = work / f"synth-{n}"
        synthesize(str(corpus), train=n, eval=0, seed=0, config=SynthConfig(shard_size=shard_size))
        store = str(work / f"store-{n}")
        train = str(corpus / "train")
        parse_mib, parse_s = peak_mib([*TTD, "parse", "--corpus", train, "--store", store])
        named = ["--model", model] if model else []  # none: the embedded base model, as the demo uses
        score_mib, score_s = peak_mib([*TTD, "score", "--corpus", train, "--store", store, *named,
                                       "--workers", "0", "--device", "cpu"])
        rows.append({"samples": n, "shards": -(-n // shard_size), "parse_mib": round(parse_mib, 1),
                     "parse_s": round(parse_s, 1), "score_mib": round(score_mib, 1), "score_s": round(score_s, 1)})
        print(f"{n:>7,} samples ({rows[-1]['shards']} shards of {shard_size}): parse peak {parse_mib:7.1f} MiB "
              f"({parse_s:.0f} s), score peak {score_mib:7.1f} MiB ({score_s:.0f} s)", flush=True)
    return rows


def within_bound(small: dict, large: dict) -> dict[str, bool]:
    return {stage: large[f"{stage}_mib"] <= SLACK * small[f"{stage}_mib"] + FIXED_MIB for stage in ("parse", "score")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 vs 1,000 samples with ttd-micro")
    ap.add_argument("--samples", type=int, default=800, help="the small corpus (the demo's train split: 800)")
    ap.add_argument("--shard-size", type=int, default=200, help="samples per shard (the demo's: 200)")
    ap.add_argument("--model", default="", help="model for score (default: the embedded base model, as the demo)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n, shard, model = (100, 100, "ttd-micro") if args.quick else (args.samples, args.shard_size, args.model)
    work = Path(tempfile.mkdtemp(prefix="ttd-memory-"))
    try:
        small, large = measure([n, 10 * n], shard, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = within_bound(small, large)
    for stage in ("parse", "score"):
        print(f"{stage}: 10x corpus peak {large[f'{stage}_mib']:.1f} MiB vs {small[f'{stage}_mib']:.1f} MiB = "
              f"{large[f'{stage}_mib'] / small[f'{stage}_mib']:.3f}x; bound {SLACK:.2f}x + {FIXED_MIB:.0f} MiB: "
              f"{'holds' if ok[stage] else 'EXCEEDED'}")
    if args.json:
        print(json.dumps({"small": small, "large": large, "within_bound": ok}))
    if not all(ok.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
