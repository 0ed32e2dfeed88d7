"""Does the calibrated CPU cost model rank and size plans like the executor does?

Profiles this machine (``alpa-plan profile``, with the model's one-device training step as the
workload that calibrates the roofline), compiles several plans of one model for the measured
cluster, runs each with ``alpa-plan run`` and tabulates predicted vs measured
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
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ["--loss", "cross_entropy", "--labels", "auto", "--optimizer", "adam"]


def _megatron(tp: int, pp: int, microbatches: int) -> list[str]:
    dims = ["--dp", "1", "--tp", str(tp), "--pp", str(pp), "--microbatches", str(microbatches)]
    return ["--method", "megatron", *dims]


PLANS = {
    "data m1": ["--method", "data", "--microbatches", "1"],
    "data m4": ["--method", "data", "--microbatches", "4"],
    "zero2 m1": ["--method", "zero2", "--microbatches", "1"],
    "zero3 m2": ["--method", "zero3", "--microbatches", "2"],
    "shard m1": ["--method", "shard", "--microbatches", "1"],
    # (megatron dp1 tp2 on two devices is shard m1 again: megatron leaves its tp axis to the
    # ILP, so it is not a different plan)
    "megatron pp2 m1": _megatron(1, 2, 1),
    "megatron pp2 m2": _megatron(1, 2, 2),
    "megatron pp2 m4": _megatron(1, 2, 4),
    # the micro-batch count is the planner's choice too: many small ones cost per-op and
    # per-instruction time that the roofline of the same FLOPs does not show
    "data m8": ["--method", "data", "--microbatches", "8"],
    "megatron pp2 m8": _megatron(1, 2, 8),
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


def _scaled(dim: str, scale: int) -> str:
    """``batch=N`` -> ``batch=N/scale``; other arguments unchanged."""
    name, _, value = dim.partition("=")
    return f"batch={max(1, int(value) // scale)}" if name == "batch" else dim


def _steady(report: dict, warmup: int) -> float:
    """Median step seconds after the first ``warmup`` steps: onnxruntime's arenas and the
    caches settle over the first few steps (the report's own median leaves out only one)."""
    return float(np.median(report["step_seconds"][warmup:]))


def _breakdown(report: dict) -> str:
    """Slowest stage's predicted vs measured compute and communication, ms per iteration."""
    stage = max(report["stages"], key=lambda s: s["measured"]["wall"])
    p, m = stage["predicted"], stage["measured"]
    return (
        f"{p.get('compute', 0) * 1e3:.1f} / {m['compute'] * 1e3:.1f} | "
        f"{p.get('communication', 0) * 1e3 + p.get('bubble', 0) * 1e3:.1f} / "
        f"{m['communication'] * 1e3:.1f} | {m['overhead'] * 1e3:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "CALIBRATION.md")
    parser.add_argument("--model", default="tests/fixtures/gpt2.ts.onnx")
    parser.add_argument("--dim", action="append", default=None, help="NAME=N (repeatable)")
    parser.add_argument("--cluster", default="cpu:2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--warmup", type=int, default=10, help="steps left out of a run's median (warm-up)"
    )
    parser.add_argument(
        "--rounds", type=int, default=9, help="runs per plan, round-robin (median shown)"
    )
    parser.add_argument(
        "--profile-budget",
        default="0.2",
        help="profile's seconds per measurement (its default is 0.05; longer windows steady "
        "the estimate of the wait for the slowest rank, which prices multi-device stages)",
    )
    parser.add_argument("--keep", type=Path, help="keep the profile, plans and reports here")
    args = parser.parse_args()
    dims = [x for d in (args.dim or ["batch=16", "seq=32"]) for x in ("--dim", d)]
    env = {"ALPA_ORT_THREADS": "1"}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="alpa-calibration-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        measured = folder / "measured.yaml"
        # The model's one-device training step at three batch sizes (the range a plan's
        # micro-batches span) calibrates the roofline's rates and per-op cost (see
        # `alpa-plan profile --workload`).
        workloads = []
        for scale in (1, 4, 16):
            path = folder / f"workload-{scale}.json"
            scaled = [_scaled(d, scale) for d in dims]
            cli("compile", args.model, *scaled, "--cluster", "cpu:1", *TRAINING, "-o", str(path))
            workloads += ["--workload", str(path)]
        profiled = cli(
            "profile",
            "--cluster",
            args.cluster,
            "-o",
            str(measured),
            *workloads,
            "--model",
            args.model,
            "--budget",
            args.profile_budget,
            env=env,
        )
        print(profiled, flush=True)
        cluster_yaml = measured.read_text()
        plans = {name: folder / f"{name.replace(' ', '-')}.json" for name in PLANS}
        for name, extra in PLANS.items():
            cli(
                "compile",
                args.model,
                *dims,
                "--cluster",
                str(measured),
                *TRAINING,
                *extra,
                "-o",
                str(plans[name]),
            )
        runs: dict[str, list[dict]] = {name: [] for name in PLANS}
        # round-robin, so a change of the machine's load hits every plan alike
        for _ in range(args.rounds):
            for name, plan in plans.items():
                cli("run", str(plan), "--model", args.model, "--steps", str(args.steps), env=env)
                runs[name].append(json.loads(plan.with_suffix(".run.json").read_text()))
        rows = []
        for name, reports in runs.items():
            steady = sorted((_steady(r, args.warmup), i) for i, r in enumerate(reports))
            measured, i = steady[len(steady) // 2]
            predicted = reports[i]["iteration_time"]["predicted"]
            rows.append((name, predicted, measured, _breakdown(reports[i])))
            print(
                f"{name}: predicted {predicted * 1e3:.2f} ms, measured {measured * 1e3:.2f} ms "
                "(runs: " + ", ".join(f"{t * 1e3:.1f}" for t, _ in steady) + ")",
                flush=True,
            )
    load.append(os.getloadavg()[0])
    pred = np.array([r[1] for r in rows])
    meas = np.array([r[2] for r in rows])
    rho = float(spearmanr(pred, meas).statistic)
    rel = np.abs(pred - meas) / meas
    # How far noise alone moves the ranking: each round's runs ranked on their own.
    per_round = [
        float(spearmanr(pred, [_steady(runs[n][k], args.warmup) for n in runs]).statistic)
        for k in range(args.rounds)
    ]
    spread = [
        np.subtract(*np.percentile([_steady(r, args.warmup) for r in runs[n]], [75, 25])) / m
        for n, m in zip(runs, meas, strict=True)
    ]
    lines = [
        "# Cost-model calibration on this machine",
        "",
        f"`python bench/calibration.py` — model `{args.model}` ({' '.join(dims)}), cluster "
        f"`{args.cluster}` profiled by `alpa-plan profile --budget {args.profile_budget}`, "
        f"{args.steps} steps per run "
        f"(measured = median step wall time after the first {args.warmup}, from "
        "`PLAN.run.json`), the median "
        f"of {args.rounds} runs per plan taken round-robin, `ALPA_ORT_THREADS=1`. Load "
        f"average {load[0]:.1f} before, {load[1]:.1f} after on {os.cpu_count()} CPUs.",
        "",
        f"Profile: {profiled}",
        "",
        "Compute and communication (predicted / measured, ms per iteration) are the slowest "
        "stage's; predicted communication includes its pipeline bubble, measured includes "
        "waiting for peers; overhead is the executor's own time (see `bench/runtime_overhead.py`).",
        "",
        "| plan | predicted ms/iter | measured ms/iter | relative error | compute | "
        "communication | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {n} | {p * 1e3:.2f} | {m * 1e3:.2f} | {e:.0%} | {b} |"
            for (n, p, m, b), e in zip(rows, rel, strict=True)
        ),
        "",
        f"**Spearman rank correlation {rho:.3f}** (target >= 0.9), "
        f"**median relative error {float(np.median(rel)):.1%}** (target <= 15%).",
        "",
        f"Noise: one round's runs alone rank the plans with Spearman {np.median(per_round):.3f} "
        f"(median of {args.rounds} rounds; {min(per_round):.3f} to {max(per_round):.3f}); a "
        "plan's runs spread by a median interquartile range of "
        f"{float(np.median(spread)):.1%} of its median.",
        "",
        "Measured cluster:",
        "",
        "```yaml",
        cluster_yaml.rstrip(),
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[10 : 14 + len(rows)]))


if __name__ == "__main__":
    main()
