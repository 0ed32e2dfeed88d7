"""End-to-end time of one per-layer intra-op solve, as the inter-op pass calls it.

    .venv/bin/python bench/intra_op_speed.py [--repeat 3]

For each case a training graph is derived, cut into layers (``planner.layers``) and a middle
layer's nodes are solved on each logical mesh with ``method="shard"``. The table reports the
best of ``--repeat`` wall times of ``solve_intra_op`` (the first call, with cold caches, is
shown separately) and the best process CPU time (robust on a loaded machine) next to the
time HiGHS itself took, and the target per case.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from cost_models.cluster import resolve_cluster
from planner.importer import ImportOptions, import_model
from planner.intra_op import IntraOpOptions, solve_intra_op
from planner.layers import assign_layers
from planner.mesh import LogicalMesh, logical_meshes
from planner.training import TrainingOptions, build_training_step


@dataclass(frozen=True)
class Case:
    name: str
    fixture: str
    dims: dict[str, int] | None
    cluster: str
    devices: int
    meshes: tuple[tuple[int, ...], ...]
    target: float  # seconds per solve


CASES = (
    Case(
        "gpt2 tiny",
        "tests/fixtures/gpt2.ts.onnx",
        {"batch": 8, "seq": 16},
        "cpu:4",
        4,
        ((4,), (2, 2)),
        0.05,
    ),
    Case(
        "gpt3 2.6B",
        "tests/fixtures/gpt3-2.6b.graph.onnx",
        None,
        "p3.16xlarge",
        8,
        ((8,), (2, 4), (4, 2)),
        0.3,
    ),
    Case(
        "gpt3 39B",
        "tests/fixtures/gpt3-39b.graph.onnx",
        None,
        "p3.16xlarge:8",
        64,
        ((8,), (8, 8), (16, 4)),
        0.5,
    ),
)


def middle_layer(case: Case) -> list:
    """The nodes of the middle layer of the case's training graph."""
    model = import_model(case.fixture, ImportOptions(dims=case.dims) if case.dims else None)
    graph = build_training_step(model, TrainingOptions(loss="cross_entropy", labels="labels")).graph
    layers = assign_layers(graph, None)
    names = set(layers[len(layers) // 2].nodes)
    return [n for n in graph if n.name in names]


def mesh_of(case: Case, shape: tuple[int, ...]) -> LogicalMesh:
    cluster = resolve_cluster(case.cluster)
    devices = range(shape[0] * (shape[1] if len(shape) > 1 else 1))
    return next(m for m in logical_meshes(cluster, devices) if m.shape == shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(
        f"{'case':<10} {'mesh':<6} {'nodes':>5} {'vars':>6} {'first s':>8} {'best s':>8} "
        f"{'highs s':>8} {'target':>7}  ok"
    )
    for case in CASES:
        nodes = middle_layer(case)
        cluster = resolve_cluster(case.cluster)
        for shape in case.meshes:
            mesh = mesh_of(case, shape)
            times, cpu, sol = [], [], None
            for _ in range(args.repeat + 1):
                t, c = time.perf_counter(), time.process_time()
                sol = solve_intra_op(nodes, mesh, cluster, IntraOpOptions(method="shard"))
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            best, best_cpu = min(times[1:]), min(cpu[1:])
            print(
                f"{case.name:<10} {mesh.describe():<6} {len(nodes):>5} {sol.stats.num_vars:>6} "
                f"{times[0]:>8.3f} {best:>8.3f} {best_cpu:>8.3f} {sol.stats.solve_seconds:>8.3f} "
                f"{case.target:>7.2f}  {'yes' if min(best, best_cpu) <= case.target else 'NO'}"
            )


if __name__ == "__main__":
    main()
