"""`make bench`: the figures the issues ask for, written as one markdown table file.

1. Import: the graph-only GPT-3 39B model imports in seconds (weights never read).
2. Intra-op: every layer ILP of the GPT-2.6B training graph on one 8-GPU p3.16xlarge host.
3. Planning (Alpa's GPT and GShard-MoE suites on p3.16xlarge, graph-only exports in
   bench/models/): wall time of `compile --method auto`, auto vs the best point of the full
   Megatron grid under the same cost model, peak memory vs device memory.
4. Runtime overhead and 5. calibration come from their own scripts, appended when present.

Machines here are small and noisy: each figure is one run, ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cost_models.cluster import Cluster, resolve_cluster  # noqa: E402
from planner.compare import compare  # noqa: E402
from planner.compiler import CompileOptions, compile_plan  # noqa: E402
from planner.importer import ImportOptions, import_model  # noqa: E402
from planner.training import TrainingOptions  # noqa: E402

TRAIN = TrainingOptions(loss="cross_entropy", labels="labels", optimizer="adam")
MODELS = ROOT / "bench" / "models"
FIXTURES = ROOT / "tests" / "fixtures"
GLOBAL_BATCH = 1024


def p3_cluster(gpus: int) -> Cluster:
    """Alpa's testbed sized for `gpus`: one partial host below 8, whole hosts above."""
    base = resolve_cluster("p3.16xlarge").model_dump()
    if gpus < 8:
        base["devices_per_host"], base["hosts"] = gpus, 1
    else:
        base["hosts"] = gpus // 8
    base["name"] = f"p3.16xlarge x{gpus} GPUs"
    return Cluster.model_validate(base)


def import_section() -> list[str]:
    rows = [
        "## 1. Import (issue 2)",
        "",
        "| model | nodes | parameters | wall |",
        "|---|---|---|---|",
    ]
    for name in ("gpt3-2.6b.graph.onnx", "gpt3-39b.graph.onnx"):
        start = time.perf_counter()
        model = import_model(FIXTURES / name)
        wall = time.perf_counter() - start
        from planner.summary import model_summary

        s = model_summary(model)
        rows.append(f"| {name} | {s['num_nodes']} | {s['num_parameters']:,} | {wall:.2f} s |")
    return rows + [""]


def intra_op_section() -> list[str]:
    cluster = p3_cluster(8)
    opts = CompileOptions(method="shard", training=TRAIN, global_batch=1)
    start = time.perf_counter()
    result = compile_plan(str(FIXTURES / "gpt3-2.6b.graph.onnx"), ImportOptions(), cluster, opts)
    wall = time.perf_counter() - start
    rows = [
        "## 2. Intra-op ILPs: GPT-2.6B training graph, one 8-GPU p3.16xlarge host (issue 4)",
        "",
        f"`compile --method shard` planned in {wall:.1f} s with {result.solves} layer "
        "ILPs (distinct layer signatures x logical meshes). Per ILP of the chosen mesh:",
        "",
        "| ILP | variables | constraints | objective (s) | bound (s) | MIP gap | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, st in enumerate(result.plan.solver.ilps):
        rows.append(
            f"| {i} | {st.variables} | {st.constraints} | {st.objective:.4g} | "
            f"{st.bound:.4g} | {st.gap:.3%} | {st.status} |"
        )
    worst = max((st.gap for st in result.plan.solver.ilps), default=0.0)
    return rows + ["", f"Worst MIP gap: {worst:.3%}.", ""]


def _suite() -> list[tuple[str, int, int]]:
    """(file, GPUs, global batch) of the suite models in bench/models/manifest.json."""
    models = [
        m
        for m in json.loads((MODELS / "manifest.json").read_text())["models"].values()
        if m.get("suite") in ("gpt", "moe")
    ]
    return sorted(
        ((m["file"], int(m["num_gpus"]), int(m.get("global_batch", GLOBAL_BATCH))) for m in models),
        key=lambda row: (row[0].split("-")[0], row[1]),
    )


def _path(name: str) -> Path:
    return MODELS / name if (MODELS / name).exists() else FIXTURES / name


def planning_section(only: set[str] | None) -> list[str]:
    rows = [
        "## 3. Planning the Alpa suites on p3.16xlarge (issue 5)",
        "",
        f"Global batch {GLOBAL_BATCH} (graph-only exports with batch 1, i.e. "
        f"{GLOBAL_BATCH} micro-batches of 1), Adam, mixed precision (`--dtype float16`, as "
        "Alpa ran them). `auto` wall time is one "
        "`compile_plan` call (import, training graph, layer ILPs, stage DP, plan). "
        "Megatron = best feasible point of dp x tp x pp (tp inside a host, pp <= layers) "
        "under the same cost model.",
        "",
        "| model | GPUs | auto plan time | auto stages | auto iter | best Megatron | "
        "Megatron iter | auto / Megatron | peak mem (auto) | device mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, gpus, global_batch in _suite():
        if only and not any(o in name for o in only):
            continue
        cluster = p3_cluster(gpus)
        opts = CompileOptions(
            method="auto", training=TRAIN, global_batch=global_batch, dtype="float16"
        )
        path = str(_path(name))
        start = time.perf_counter()
        try:
            result = compile_plan(path, ImportOptions(), cluster, opts)
        except Exception as exc:  # report and continue with the suite
            rows.append(f"| {name} | {gpus} | failed: {type(exc).__name__}: {exc} |")
            continue
        wall = time.perf_counter() - start
        plan = result.plan
        stages = ", ".join(
            f"{len(s.layers)}L/{len(s.submesh.devices)}dev "
            + "x".join(map(str, s.logical_mesh.shape))
            for s in plan.stages
        )
        table = compare(path, ImportOptions(), cluster, opts)
        meg = next(r for r in table if r.method.startswith("megatron"))
        ratio = (
            plan.predicted.iteration_time / meg.iteration_time
            if meg.iteration_time
            else float("nan")
        )
        rows.append(
            f"| {name} | {gpus} | {wall:.1f} s | {len(plan.stages)}: {stages} | "
            f"{plan.predicted.iteration_time:.3f} s | {meg.configuration} | "
            f"{meg.iteration_time or float('nan'):.3f} s | {ratio:.3f} | "
            f"{plan.predicted.peak_memory_per_device / 2**30:.2f} GiB | "
            f"{cluster.device.memory_bytes / 2**30:.0f} GiB |"
        )
    return rows + [""]


def _script_section(script: str, title: str) -> list[str]:
    path = ROOT / "bench" / script
    if not path.exists():
        return []
    out = ROOT / "bench" / f".{script}.md"
    proc = subprocess.run(
        [sys.executable, str(path), "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0 or not out.exists():
        return [f"## {title}", "", f"`{script}` failed: {proc.stderr.strip()[-500:]}", ""]
    text = out.read_text()
    out.unlink()
    return [f"## {title}", "", text, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--only", nargs="*", help="substrings of suite model names to plan")
    parser.add_argument(
        "--skip-scripts",
        action="store_true",
        help="skip the runtime-overhead and calibration scripts",
    )
    args = parser.parse_args()
    lines = [
        "# alpa-plan benchmark results",
        "",
        f"Written by `make bench` ({time.strftime('%Y-%m-%d')}) on this machine: 2 cores, 24 GiB.",
        "",
    ]
    lines += import_section()
    lines += intra_op_section()
    lines += planning_section(set(args.only) if args.only else None)
    if not args.skip_scripts:
        lines += _script_section("runtime_overhead.py", "4. Runtime overhead (issue 7)")
        lines += _script_section(
            "calibration.py", "5. Calibration: predicted vs measured (issue 8)"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
