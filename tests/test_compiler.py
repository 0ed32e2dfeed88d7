"""compile / compare end to end: determinism, methods, memory refusal, auto vs baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from cost_models.cluster import resolve_cluster
from cost_models.compute import op_time
from planner.compare import compare
from planner.compiler import (
    CompileOptions,
    Session,
    megatron_grid,
    place_stages,
    submesh_shapes,
)
from planner.graph import Role, nbytes, role_of, values_of
from planner.importer import ImportOptions
from planner.layers import phase_of
from planner.mesh import make_mesh
from planner.plan_io import load_plan
from planner.stage_costs import range_costs
from planner.strategies.base import local_bytes
from planner.training import TrainingOptions
from tests.conftest import FIXTURES

ROOT = Path(__file__).parents[1]
GPT2 = str(FIXTURES / "gpt2.ts.onnx")
TRAIN = ["--loss", "cross_entropy", "--labels", "labels"]
DIMS = ["--dim", "batch=8", "--dim", "seq=16"]


def alpa(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_plans_are_byte_identical_across_hash_seeds(tmp_path):
    outs = []
    for seed in ("0", "1", "12345"):
        out = tmp_path / f"plan{seed}.json"
        proc = alpa(
            "compile",
            GPT2,
            *DIMS,
            "--cluster",
            "cpu:2x2",
            "--microbatches",
            "4",
            *TRAIN,
            "-o",
            str(out),
            env={"PYTHONHASHSEED": seed},
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("method", ["data", "zero2", "zero3", "shard", "auto"])
def test_methods_cover_every_node_and_device(method, tmp_path):
    out = tmp_path / "p.json"
    proc = alpa(
        "compile", GPT2, *DIMS, "--cluster", "cpu:4", "--method", method, *TRAIN, "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(out)
    devices = sorted(d for s in plan.stages for d in s.submesh.devices)
    assert devices == [0, 1, 2, 3]
    nodes = [n for s in plan.stages for n in s.nodes]
    assert len(nodes) == len(set(nodes)) > 100
    for stage in plan.stages:
        assert stage.params and all("|" not in spec for spec in stage.params.values())
    assert plan.predicted.iteration_time > 0 and 0 < plan.predicted.mfu < 1
    assert plan.predicted.ratio_to_lower_bound >= 1


def test_data_parallel_keeps_parameters_replicated(tmp_path):
    out = tmp_path / "p.json"
    assert (
        alpa(
            "compile", GPT2, *DIMS, "--cluster", "cpu:4", "--method", "data", *TRAIN, "-o", str(out)
        ).returncode
        == 0
    )
    plan = load_plan(out)
    specs = plan.stages[0].params
    weights = [k for k in specs if k.endswith(".weight")]
    assert weights and all(set(specs[k].split(",")) == {"R"} for k in weights)
    # The tied weight's transpose is made from weights alone: it leaves the embedding's layer
    # replicated, like the weights, so the lm_head reads it without an all-gather.
    nodes = plan.stages[0].nodes
    (tie,) = [n for name, n in nodes.items() if name.startswith("alpa_tie/")]
    assert tie.outputs == ["R,R"] and nodes["/model/lm_head/MatMul"].resharding == 0
    # The tied gradient is DDP's: the lm_head part and the embedding's scatter-add are partial
    # sums over the batch split, all-reduced with the gradients' bucket (``summed_into_
    # gradient``), so no activation is gathered to compute either.
    for name in (
        "grad//model/lm_head/MatMul/MatMul_1",
        "grad//model/transformer/wte/Gather/ScatterElements",
    ):
        assert [c.kind for c in nodes[name].collectives] == ["all_reduce"], name
        assert nodes[name].resharding == 0, name


@pytest.mark.parametrize(
    "cluster_spec, dims",
    [
        ("cpu:2x2", {"batch": 8, "seq": 16}),
        # the shard ILP's follower merging misses the data-parallel plan here
        ("cpu:4", {"batch": 16, "seq": 32}),
    ],
)
def test_auto_is_no_worse_than_every_baseline(cluster_spec, dims):
    cluster = resolve_cluster(cluster_spec)
    opts = CompileOptions(training=TrainingOptions(loss="cross_entropy", labels="labels"))
    rows = compare(GPT2, ImportOptions(dims=dims), cluster, opts)
    auto = next(r for r in rows if r.method == "auto")
    for row in rows:
        if row.feasible:
            assert auto.iteration_time <= row.iteration_time * (1 + 1e-9), row


def test_too_large_model_is_refused_with_the_numbers(tmp_path):
    tiny = tmp_path / "tiny.yaml"
    text = (ROOT / "cost_models" / "clusters" / "cpu.yaml").read_text()
    tiny.write_text(text.replace("memory_bytes: 4294967296", "memory_bytes: 100000"))
    proc = alpa(
        "compile", GPT2, *DIMS, "--cluster", str(tiny), *TRAIN, "-o", str(tmp_path / "p.json")
    )
    assert proc.returncode == 2
    assert "does not fit: needs" in proc.stderr and "GiB per device, has 0.0 GiB" in proc.stderr
    assert not (tmp_path / "p.json").exists()


def test_megatron_configuration_errors():
    proc = alpa(
        "compile",
        GPT2,
        *DIMS,
        "--cluster",
        "cpu:4",
        "--method",
        "megatron",
        "--dp",
        "3",
        "--tp",
        "1",
        "--pp",
        "1",
        *TRAIN,
        "-o",
        "/dev/null",
    )
    assert proc.returncode == 2 and "--dp 3 x --tp 1 x --pp 1 = 3" in proc.stderr
    proc = alpa(
        "compile",
        GPT2,
        *DIMS,
        "--cluster",
        "cpu:4",
        "--method",
        "megatron",
        *TRAIN,
        "-o",
        "/dev/null",
    )
    assert proc.returncode == 2 and "needs --dp A --tp B --pp C" in proc.stderr


def test_pipeline_plan_has_transfers_and_bubble(tmp_path):
    out = tmp_path / "p.json"
    proc = alpa(
        "compile",
        GPT2,
        *DIMS,
        "--cluster",
        "cpu:2x2",
        "--method",
        "megatron",
        "--dp",
        "1",
        "--tp",
        "2",
        "--pp",
        "2",
        "--microbatches",
        "4",
        *TRAIN,
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(out)
    assert len(plan.stages) == 2 and plan.options.microbatches == 4
    assert {(t.src_stage, t.dst_stage) for t in plan.transfers} >= {(0, 1), (1, 0)}
    assert plan.predicted.stages[1].bubble > 0


def test_emit_onnx_passes_checker(tmp_path):
    out, annotated = tmp_path / "p.json", tmp_path / "a.onnx"
    proc = alpa(
        "compile",
        GPT2,
        *DIMS,
        "--cluster",
        "cpu:4",
        "--mode",
        "infer",
        "-o",
        str(out),
        "--emit-onnx",
        str(annotated),
    )
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(annotated), full_check=True)


def test_inference_plan_has_no_update_nodes(tmp_path):
    out = tmp_path / "p.json"
    assert (
        alpa(
            "compile", GPT2, *DIMS, "--cluster", "cpu:4", "--mode", "infer", "-o", str(out)
        ).returncode
        == 0
    )
    plan = json.loads(out.read_text())
    assert plan["options"]["mode"] == "infer" and plan["options"]["training"] is None
    assert not any("Adam" in n or "update" in n for s in plan["stages"] for n in s["nodes"])


def test_submeshes_tile_the_cluster():
    cluster = resolve_cluster("p3.16xlarge:4")
    assert submesh_shapes(cluster) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8)]
    assert submesh_shapes(resolve_cluster("dgx-a100:3"))[-2:] == [(2, 8), (3, 8)]
    shapes = [(2, 8), (1, 4), (1, 2), (1, 2), (1, 8)]
    placed = place_stages(cluster, shapes)
    flat = sorted(d for p in placed for d in p)
    assert flat == list(range(32))
    assert all(len(p) == a * b for p, (a, b) in zip(placed, shapes, strict=True))
    assert (4, 8, 1) in megatron_grid(cluster, 48) and all(
        dp * tp * pp == 32 and tp <= 8 for dp, tp, pp in megatron_grid(cluster, 48)
    )


def test_static_batch_graph_is_one_microbatch():
    cluster = resolve_cluster("p3.16xlarge")
    opts = CompileOptions(
        global_batch=16, training=TrainingOptions(loss="cross_entropy", labels="labels")
    )
    session = Session(str(FIXTURES / "gpt2-tiny.graph.onnx"), ImportOptions(), cluster, opts)
    assert session.counts == [16]


def test_megatron_pattern_emerges_on_gpt3_2_6b_layers():
    """Batch 1, hidden 2560, a 1x8 mesh of one p3.16xlarge host, solved layer by layer as
    compile does: column-split QKV / MLP-in, row-split attention-out / MLP-out with one
    all-reduce each in the forward (Megatron-LM), found by the ILP."""
    cluster = resolve_cluster("p3.16xlarge")
    opts = CompileOptions(
        method="shard",
        global_batch=1,
        training=TrainingOptions(loss="cross_entropy", labels="labels"),
    )
    session = Session(str(FIXTURES / "gpt3-2.6b.graph.onnx"), ImportOptions(), cluster, opts)
    prep = session.prepared(1)
    costs = session.costs(prep, "shard")
    mesh = make_mesh(cluster, range(8), (1, 8))
    gemms = [n for n in prep.graph if n.op_type == "Gemm" and phase_of(n) == "forward"]
    assert len(gemms) == 4 * 32
    for node in gemms:
        k_in, k_out = node.inputs[1].shape  # (in, out): c_attn h->3h, c_fc h->4h, c_proj ->h
        chosen = costs.strategy(node.name, mesh)
        weight = chosen.inputs[1]
        if k_out > k_in:  # column parallel, no communication
            assert str(weight) == "R,S1" and not chosen.collectives, (node.name, chosen.name)
        else:  # row parallel, one all-reduce
            assert str(weight) == "S1,R", (node.name, chosen.name)
            assert [c.kind for c in chosen.collectives] == ["all_reduce"], chosen.name


@pytest.mark.parametrize(("flag", "shape"), [("2x2", [2, 2]), ("1x4", [4]), ("4", [4])])
def test_shard_plans_on_the_logical_mesh_asked_for(flag, shape, tmp_path):
    out = tmp_path / "p.json"
    args = ["--cluster", "cpu:4", "--method", "shard", "--logical-mesh", flag, *TRAIN]
    proc = alpa("compile", GPT2, *DIMS, *args, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [s.logical_mesh.shape for s in load_plan(out).stages] == [shape]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "shard", "--logical-mesh", "3x2"], "does not cover the cluster's 4"),
        (["--method", "shard", "--logical-mesh", "2by2"], "takes a shape like 8, 1x8 or 4x2"),
        (["--method", "auto", "--logical-mesh", "2x2"], "applies to --method shard"),
    ],
)
def test_bad_logical_mesh_is_one_line_exit_2(args, message, tmp_path):
    out = tmp_path / "p.json"
    proc = alpa("compile", GPT2, *DIMS, "--cluster", "cpu:4", *args, *TRAIN, "-o", str(out))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("method", ["data", "zero2"])
def test_gradient_accumulation_is_priced_per_extra_microbatch(method):
    """Each micro-batch after the first adds its gradients into the step's sums: 3 x their
    bytes of memory traffic and a kernel per gradient. Data parallelism sums them whole;
    ZeRO-2 sums a gradient its strategy reduce-scatters whole too (the executor sums before
    the once-per-step sync), so it pays more than its sharded gradients' bytes."""
    cluster = resolve_cluster("cpu:2")
    opts = CompileOptions(
        method=method, training=TrainingOptions(loss="cross_entropy", labels="labels")
    )
    session = Session(GPT2, ImportOptions(dims={"batch": 8, "seq": 16}), cluster, opts)
    prep = session.prepared(2)
    mesh = make_mesh(cluster, (0, 1), (2,))
    costs = session.costs(prep, method)
    rc = range_costs(costs, mesh, prep.cut)
    last = len(prep.layers) - 1
    grads = [v for v in values_of(prep.graph) if role_of(v) is Role.GRAD]
    assert len(grads) > 20
    whole = sum(op_time(0.0, 3 * nbytes(g), cluster.device) for g in grads)
    if method == "data":
        assert rc.accumulate[0, last] == pytest.approx(whole, rel=1e-9)
    else:
        specs = {
            k: v for i in range(last + 1) for k, v in costs.layer(i, mesh).solution.specs.items()
        }
        sharded = sum(
            op_time(0.0, 3 * local_bytes(g, specs[g.name], mesh), cluster.device) for g in grads
        )
        assert sharded < rc.accumulate[0, last] <= whole
    # two micro-batches, one step: one addition
    plan = session.plan(method, 2)
    t, u, a = rc.per_microbatch[0, last], rc.per_step[0, last], rc.accumulate[0, last]
    assert plan.latency == pytest.approx(2 * t + a + u, rel=1e-9)


def test_waiting_for_the_slowest_rank_is_charged_to_multi_device_stages_only():
    """At each collective the ranks of a sharded stage wait for the slowest, whose segment of
    work jittered longest (``Device.sync_jitter``); a pipeline stage on one device never
    waits inside itself."""
    base = resolve_cluster("cpu:2")
    shaky = base.model_copy(update={"device": base.device.model_copy(update={"sync_jitter": 0.01})})
    opts = CompileOptions(
        method="data", training=TrainingOptions(loss="cross_entropy", labels="labels")
    )
    ranges = {}
    for name, cluster in (("base", base), ("shaky", shaky)):
        session = Session(GPT2, ImportOptions(dims={"batch": 8, "seq": 16}), cluster, opts)
        prep = session.prepared(1)
        costs = session.costs(prep, "data")
        for devices in ((0,), (0, 1)):
            mesh = make_mesh(cluster, devices, (len(devices),))
            ranges[name, len(devices)] = (range_costs(costs, mesh, prep.cut), costs, mesh)
    last = ranges["base", 1][0].per_microbatch.shape[0] - 1
    one, shaky_one = ranges["base", 1][0], ranges["shaky", 1][0]
    assert shaky_one.per_microbatch[0, last] == one.per_microbatch[0, last]
    two, costs, mesh = ranges["base", 2]
    syncs = sum(costs.layer(i, mesh).cost.syncs for i in range(last + 1))
    assert syncs > 0
    waited = ranges["shaky", 2][0].per_microbatch[0, last] - two.per_microbatch[0, last]
    assert waited == pytest.approx(0.01 * (syncs * two.per_microbatch[0, last]) ** 0.5)
    assert ranges["shaky", 2][0].per_step[0, last] > two.per_step[0, last]
