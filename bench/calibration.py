"""Does the calibrated CPU cost model rank and size plans like the executor does?

Profiles this machine (``alpa-plan profile``), compiles several plans of one model for the
measured cluster, runs each with ``alpa-plan run`` and tabulates predicted vs measured
iteration time: Spearman rank correlation (does the planner order plans right?) and median
relative error (are its seconds right?). Ranks run one onnxruntime thread each
(``ALPA_ORT_THREADS=1``), as profiled.

    python bench/calibration.py --out bench/CALIBRATION.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ["--loss", "cross_entropy", "--labels", "auto", "--optimizer", "adam"]
PLANS = {
    "data m1": ["--method", "data", "--microbatches", "1"],
    "data m4": ["--method", "data", "--microbatches", "4"],
    "zero2 m1": ["--method", "zero2", "--microbatches", "1"],
    "zero3 m2": ["--method", "zero3", "--microbatches", "2"],
    "shard m1": ["--method", "shard", "--microbatches", "1"],
    "megatron tp2 m1": [
        "--method",
        "megatron",
        "--dp",
        "1",
        "--tp",
        "2",
        "--pp",
        "1",
        "--microbatches",
        "1",
    ],
    "megatron pp2 m2": [
        "--method",
        "megatron",
        "--dp",
        "1",
        "--tp",
        "1",
        "--pp",
        "2",
        "--microbatches",
        "2",
    ],
    "megatron pp2 m4": [
        "--method",
        "megatron",
        "--dp",
        "1",
        "--tp",
        "1",
        "--pp",
        "2",
        "--microbatches",
        "4",
    ],
}


def cli(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise SystemExit(f"alpa-plan {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "CALIBRATION.md")
    parser.add_argument("--model", default="tests/fixtures/gpt2.ts.onnx")
    parser.add_argument("--dim", action="append", default=None, help="NAME=N (repeatable)")
    parser.add_argument("--cluster", default="cpu:2")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    dims = [x for d in (args.dim or ["batch=16", "seq=32"]) for x in ("--dim", d)]
    env = {"ALPA_ORT_THREADS": "1"}
    load = [os.getloadavg()[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="alpa-calibration-") as tmp:
        measured = Path(tmp) / "measured.yaml"
        profiled = cli("profile", "--cluster", args.cluster, "-o", str(measured), env=env)
        print(profiled, flush=True)
        cluster_yaml = measured.read_text()
        for name, extra in PLANS.items():
            plan = Path(tmp) / f"{name.replace(' ', '-')}.json"
            cli(
                "compile",
                args.model,
                *dims,
                "--cluster",
                str(measured),
                *TRAINING,
                *extra,
                "-o",
                str(plan),
            )
            start = time.perf_counter()
            cli("run", str(plan), "--model", args.model, "--steps", str(args.steps), env=env)
            report = json.loads(plan.with_suffix(".run.json").read_text())
            it = report["iteration_time"]
            rows.append((name, it["predicted"], it["measured"], time.perf_counter() - start))
            print(
                f"{name}: predicted {it['predicted'] * 1e3:.2f} ms, measured "
                f"{it['measured'] * 1e3:.2f} ms",
                flush=True,
            )
    load.append(os.getloadavg()[0])
    pred = np.array([r[1] for r in rows])
    meas = np.array([r[2] for r in rows])
    rho = float(spearmanr(pred, meas).statistic)
    rel = np.abs(pred - meas) / meas
    lines = [
        "# Cost-model calibration on this machine",
        "",
        f"`python bench/calibration.py` — model `{args.model}` ({' '.join(dims)}), cluster "
        f"`{args.cluster}` profiled by `alpa-plan profile`, {args.steps} steps per plan "
        "(measured = mean step wall time after the first, from `PLAN.run.json`), "
        f"`ALPA_ORT_THREADS=1`. Load average {load[0]:.1f} before, {load[1]:.1f} after "
        f"on {os.cpu_count()} CPUs.",
        "",
        f"Profile: {profiled}",
        "",
        "| plan | predicted ms/iter | measured ms/iter | relative error |",
        "|---|---:|---:|---:|",
        *(
            f"| {n} | {p * 1e3:.2f} | {m * 1e3:.2f} | {e:.0%} |"
            for (n, p, m, _), e in zip(rows, rel, strict=True)
        ),
        "",
        f"**Spearman rank correlation {rho:.3f}** (target >= 0.9), "
        f"**median relative error {float(np.median(rel)):.1%}** (target <= 15%).",
        "",
        "Measured cluster:",
        "",
        "```yaml",
        cluster_yaml.rstrip(),
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[6 : 10 + len(rows)]))


if __name__ == "__main__":
    main()
