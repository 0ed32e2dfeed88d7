"""Per-step metrics and the run report: the plan's predictions next to what was measured.

A step's wall time splits into onnxruntime compute, communication (time inside the
communicator's collectives and sends/receives, waiting for peers included: the pipeline
bubble is spent there) and the executor's own overhead, everything else (Python dispatch,
slicing and concatenation around collectives, accumulation). Also measured per stage:
the instruction-level times of collectives and point-to-point transfers (copies included)
and the number of communication calls. Predicted per stage: the plan's per-iteration
compute, communication and bubble. A stage's number is the slowest of its ranks; the first
step is left out of the means when there are more (session warm-up).
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np

from planner.plan_io import canonical_json, write_atomic
from planner.plan_schema import Plan
from runtime.comm import Communicator

KINDS = ("compute", "collective", "p2p", "comm", "calls", "wall")


FIELDS = ("rank", "stage", "loss", *KINDS)


def collect_step(comm: Communicator, mine: dict) -> dict | None:
    """Every rank's metrics of one step, at rank 0 (None elsewhere). One all-gather of a few
    floats: every rank leaves it together, so reporting a step does not leave one rank
    behind the others (a straggler the next step's first collective would wait for)."""
    row = np.array([np.nan if mine[k] is None else mine[k] for k in FIELDS], np.float64)
    everyone = comm.all_gather_host(row)
    if comm.rank != 0:
        return None
    ranks = []
    for values in everyone.tolist():
        r = dict(zip(FIELDS, values, strict=True))
        r["rank"], r["stage"] = int(r["rank"]), int(r["stage"])
        r["loss"] = None if math.isnan(r["loss"]) else r["loss"]
        ranks.append(r)
    losses = [r["loss"] for r in ranks if r["loss"] is not None]
    return {
        "loss": losses[0] if losses else None,
        "wall": max(r["wall"] for r in ranks),
        "ranks": ranks,
    }


def print_step(i: int, row: dict, plan: Plan) -> None:
    loss = "n/a" if row["loss"] is None else f"{row['loss']:.6f}"
    rate = plan.options.global_batch / row["wall"]
    click.echo(f"step {i + 1}: loss {loss}  {row['wall'] * 1e3:.1f} ms  {rate:.1f} samples/s")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(plan: Plan, rows: list[dict], setup: float, backend: str) -> dict:
    timed = rows[1:] if len(rows) > 1 else rows
    stages = []
    for s in plan.stages:
        measured = {
            k: _mean([max(r[k] for r in row["ranks"] if r["stage"] == s.index) for row in timed])
            for k in KINDS
        }
        measured["communication"] = measured.pop("comm")
        measured["seconds_per_call"] = measured["communication"] / max(measured["calls"], 1)
        measured["overhead"] = _mean(
            [
                max(
                    r["wall"] - r["compute"] - r["comm"]
                    for r in row["ranks"]
                    if r["stage"] == s.index
                )
                for row in timed
            ]
        )
        pred = plan.predicted.stages[s.index] if s.index < len(plan.predicted.stages) else None
        stages.append(
            {
                "stage": s.index,
                "devices": s.submesh.devices,
                # per iteration, like the measured numbers; the stage's own compute and
                # communication fields are per micro-batch
                "predicted": {
                    **(
                        {
                            "compute": pred.compute,
                            "communication": pred.communication,
                            "bubble": pred.bubble,
                        }
                        if pred
                        else {}
                    ),
                    "microbatch_compute": s.compute,
                    "microbatch_communication": s.communication,
                },
                "measured": measured,
            }
        )
    step = _mean([row["wall"] for row in timed])
    compute = _mean([max(r["compute"] for r in row["ranks"]) for row in timed])
    overhead = max(stage["measured"]["overhead"] for stage in stages)
    communication = max(stage["measured"]["communication"] for stage in stages)
    return {
        "plan": {
            "method": plan.options.method,
            "microbatches": plan.options.microbatches,
            "schedule": plan.options.schedule,
            "global_batch": plan.options.global_batch,
            "model": plan.model.file,
        },
        "backend": backend,
        "losses": [row["loss"] for row in rows],
        "iteration_time": {
            "predicted": plan.predicted.iteration_time,
            "measured": step,
            # robust to the odd step a busy machine stalls (what a noisy host's runs share)
            "measured_median": float(np.median([row["wall"] for row in timed])),
        },
        "step_seconds": [row["wall"] for row in rows],
        "throughput_samples_per_s": plan.options.global_batch / step,
        "setup_seconds": setup,
        "runtime_overhead": {
            "seconds": overhead,
            "fraction_of_step": overhead / step,
            "wall_minus_compute": step - compute,
            "communication_fraction": communication / step,
        },
        "stages": stages,
    }


def write(plan: Plan, rows: list[dict], setup: float, path: Path | None, backend: str) -> None:
    summary = summarize(plan, rows, setup, backend)
    if path is not None:
        write_atomic(path, canonical_json(summary))
    it = summary["iteration_time"]
    click.echo(
        f"{len(rows)} steps on {backend}: {it['measured'] * 1e3:.1f} ms/step (predicted "
        f"{it['predicted'] * 1e3:.1f} ms), {summary['throughput_samples_per_s']:.1f} samples/s, "
        f"runtime overhead {summary['runtime_overhead']['fraction_of_step']:.1%}, "
        f"communication {summary['runtime_overhead']['communication_fraction']:.1%}"
        + (f"; report: {path}" if path else "")
    )
