"""Executor end to end on CPU ranks (mpiexec): comm ops vs numpy, resharding on a 2x2 mesh,
a dead rank, and ``verify`` of hand-built plans on the GPT-2 fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from planner.importer import ImportOptions, import_model
from planner.plan_io import write_plan
from planner.training import TrainingOptions, build_training_step, initial_state
from runtime.launch import mpiexec
from runtime.step import PreparedStep, _materialize
from tests.test_runtime_plans import hand_plan

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def _mpi(n: int, script: str, timeout: float = 60, env: dict | None = None):
    return subprocess.run(
        [mpiexec(), "-n", str(n), sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_collectives_and_reshard_on_2x2_mesh_match_numpy():
    script = """
    import itertools
    import numpy as np
    from planner.sharding import ShardingSpec
    from runtime import reshard
    from runtime.comm import MpiCommunicator, mesh_groups
    from runtime.mesh import RankMesh, shard

    comm = MpiCommunicator()
    mesh = RankMesh((2, 2), (0, 1, 2, 3))
    comm.add_groups(mesh_groups(mesh.device_at, mesh.shape))
    r = comm.rank
    rng = np.random.default_rng(0)
    full = rng.standard_normal((4, 8)).astype(np.float32)
    g0, g01 = tuple(mesh.group(r, (0,))), tuple(mesh.group(r, (0, 1)))
    x = full + r
    assert np.allclose(comm.all_reduce(x, g01, "sum"), 4 * full + 6)
    assert np.allclose(comm.all_reduce(x, g0, "max"), full + max(g0))
    blocks = np.split(full, 4, axis=1)
    got = comm.all_gather(blocks[g01.index(r)], g01, 1)
    assert np.array_equal(got, full)
    rs = comm.reduce_scatter(full, g0, 0, "mean")
    assert np.allclose(rs, np.split(full, 2)[g0.index(r)])
    a2a = comm.all_to_all(np.split(full, 2, axis=0)[g0.index(r)], g0, 1, 0)
    assert np.array_equal(a2a, np.split(full, 2, axis=1)[g0.index(r)])
    assert np.array_equal(comm.broadcast(x, g01, 0), full)
    specs = ["R,R", "S0,R", "R,S1", "S01,R", "S1,S0", "R,S10", "S0,R|P1", "R,R|P01"]
    for src, dst in itertools.product(specs, specs):
        a, b = ShardingSpec.parse(src), ShardingSpec.parse(dst)
        out = reshard.apply(shard(full, a, mesh, r), reshard.program(a, b), mesh, r, comm)
        want = shard(full, b, mesh, r)
        if b.partial:  # compare the sum over the partial axes
            group = tuple(mesh.group(r, b.partial))
            out, want = comm.all_reduce(out, group, "sum"), comm.all_reduce(want, group, "sum")
        assert np.allclose(out, want), (src, dst)
    print("ok", r)
    """
    result = _mpi(4, script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 4


@pytest.mark.parametrize("fate", ["time.sleep(60)", "os._exit(1)"])
def test_stuck_or_dead_rank_ends_the_job_fast(fate):
    script = f"""
    import os, time, numpy as np
    from runtime.comm import MpiCommunicator
    comm = MpiCommunicator()
    comm.add_groups([(0, 1)])
    if comm.rank == 1:
        {fate}
    comm.all_reduce(np.ones(4, np.float32), (0, 1), "sum")
    """
    start = time.monotonic()
    result = _mpi(2, script, timeout=60, env={"ALPA_COMM_TIMEOUT": "3"})
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    if "sleep" in fate:
        assert "rank 0: all_reduce timed out after 3s waiting for ranks [1]" in result.stderr


def _prepare(tmp: Path, fixture: str, batch: int, seq: int, **plan_args) -> Path:
    imported = import_model(FIXTURES / fixture, ImportOptions(dims={"batch": batch, "seq": seq}))
    training = build_training_step(
        imported, TrainingOptions(loss="cross_entropy", labels="labels", optimizer="adam")
    )
    state = initial_state(imported, training)
    _materialize(training)
    tmp.mkdir(parents=True, exist_ok=True)
    PreparedStep(training, state).save(tmp)
    write_plan(
        hand_plan(training, batch_sizes={batch, batch * seq}, **plan_args), tmp / "plan.json"
    )
    return tmp


def _launch(folder: Path, steps: int, verify: bool) -> subprocess.CompletedProcess:
    code = (
        f"import sys; from runtime.launch import launch; sys.exit(launch("
        f"{str(folder / 'plan.json')!r}, None, {steps}, None, "
        f"{str(folder / 'run.json')!r}, {verify}, step_dir={str(folder)!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "method, devices, microbatches, stages",
    [
        ("data", 2, 1, 1),
        ("zero2", 2, 2, 1),
        ("zero3", 2, 1, 1),
        ("data", 1, 4, 2),  # 2-stage 1F1B pipeline, 4 microbatches
    ],
)
def test_verify_gpt2_hand_plans(tmp_path, method, devices, microbatches, stages):
    folder = _prepare(
        tmp_path,
        "gpt2.ts.onnx",
        2,
        16,
        devices_per_stage=devices,
        microbatches=microbatches,
        method=method,
        stages=stages,
    )
    result = _launch(folder, 1, True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verify passed" in result.stdout


def test_loss_curves_sharded_and_single_rank_agree_over_10_steps(tmp_path):
    sharded = _prepare(
        tmp_path / "s", "gpt2.ts.onnx", 2, 16, devices_per_stage=2, microbatches=2, method="zero2"
    )
    single = _prepare(
        tmp_path / "1", "gpt2.ts.onnx", 2, 16, devices_per_stage=1, microbatches=2, method="data"
    )
    for folder in (sharded, single):
        result = _launch(folder, 10, False)
        assert result.returncode == 0, result.stderr[-3000:]
    a = json.loads((sharded / "run.json").read_text())
    b = json.loads((single / "run.json").read_text())
    assert len(a["losses"]) == 10
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    assert a["losses"][-1] < a["losses"][0]
    assert {"predicted", "measured"} <= set(a["stages"][0])
