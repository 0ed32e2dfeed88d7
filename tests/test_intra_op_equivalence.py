"""Determinism / equivalence harness for ``solve_intra_op``: speed work must not change plans.

Each case solves one layer of a training graph and is compared with the record in
``tests/intra_op_golden.json`` (objective, cost totals, memory, and a digest of every node's
chosen strategy name). A deliberate change of the cost model re-records with

    ALPA_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_intra_op_equivalence.py
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import pytest

from cost_models.cluster import resolve_cluster
from planner.importer import ImportOptions, import_model
from planner.intra_op import IntraOpOptions, IntraOpSolution, solve_intra_op
from planner.layers import assign_layers
from planner.mesh import logical_meshes
from planner.training import TrainingOptions, build_training_step
from tests.conftest import FIXTURES

GOLDEN = Path(__file__).parent / "intra_op_golden.json"
REGEN = os.environ.get("ALPA_REGEN_GOLDEN") == "1"
METHODS = ("shard", "data", "zero2", "zero3")
TINY = {"batch": 8, "seq": 16}


@functools.cache
def layers_of(fixture: str, dims: tuple | None) -> list[list]:
    options = ImportOptions(dims=dict(dims)) if dims else None
    step = build_training_step(
        import_model(FIXTURES / fixture, options),
        TrainingOptions(loss="cross_entropy", labels="labels"),
    )
    by_name = {n.name: n for n in step.graph}
    return [[by_name[n] for n in layer.nodes] for layer in assign_layers(step.graph, None)]


def record(sol: IntraOpSolution) -> dict:
    names = "\n".join(f"{k}={s.name}" for k, s in sorted(sol.strategies.items()))
    return {
        "objective": sol.stats.objective,
        "compute": sol.compute,
        "communication": sol.communication,
        "resharding": sol.resharding,
        "memory": sol.memory,
        "strategies": hashlib.sha256(names.encode()).hexdigest()[:16],
    }


def tiny_cases() -> list:
    out = []
    for model in ("gpt2.ts.onnx", "llama.ts.onnx"):
        for mesh in ((1, 4), (2, 2)):
            out += [(model, 1, mesh, m, None) for m in METHODS]
        out += [(model, 0, (2, 2), m, None) for m in ("shard", "zero3")]  # embedding layer
    out.append(("gpt2.ts.onnx", 1, (2, 2), "shard", 1.4e6))  # binding budget
    return out


def solve_case(fixture, layer, shape, method, budget, cluster_name, dims):
    nodes = layers_of(fixture, dims)[layer]
    cluster = resolve_cluster(cluster_name)
    count = shape[0] * shape[1]
    mesh = next(m for m in logical_meshes(cluster, range(count)) if m.shape == shape)
    return solve_intra_op(nodes, mesh, cluster, IntraOpOptions(method=method, memory_budget=budget))


def check(key: str, got: dict) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if REGEN:
        golden[key] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    want = golden[key]
    assert got["strategies"] == want["strategies"], key
    for k in ("objective", "compute", "communication", "resharding"):
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-15), (key, k)
    assert got["memory"] == pytest.approx(want["memory"], rel=1e-9), key


@pytest.mark.parametrize("fixture,layer,shape,method,budget", tiny_cases())
def test_tiny_layers_unchanged(fixture, layer, shape, method, budget):
    sol = solve_case(fixture, layer, shape, method, budget, "p3.16xlarge", tuple(TINY.items()))
    suffix = f"/budget={budget:g}" if budget else ""
    check(f"{fixture}/L{layer}/{shape[0]}x{shape[1]}/{method}{suffix}", record(sol))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_gpt3_2_6b_block_unchanged(method):
    sol = solve_case("gpt3-2.6b.graph.onnx", 16, (1, 8), method, None, "p3.16xlarge", None)
    check(f"gpt3-2.6b/L16/1x8/{method}", record(sol))
