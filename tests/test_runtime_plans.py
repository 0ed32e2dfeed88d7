"""Hand-built plans for executor tests (the plan compiler is developed separately), and tests of
the pieces that need no MPI: schedules, transfer pieces, resharding programs.

``hand_plan`` turns any training graph into a data-parallel (``data``/``zero2``/``zero3``) and
optionally pipelined plan by propagating "batch-major" from the data inputs: a value computed
from batched inputs whose dim 0 is a batch size is split along dim 0; a node that turns
batched inputs into a non-batched value (a contraction over the batch: weight and bias
gradients, the loss) all-reduces it (mean for ReduceMean, else sum).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from planner.graph import Role, role_of, shape_of
from planner.plan_schema import (
    Collective,
    LogicalMeshPlan,
    ModelIdentity,
    NodePlan,
    Options,
    Plan,
    Predicted,
    Producer,
    SolverStats,
    StageMemory,
    StagePlan,
    StagePrediction,
    Submesh,
    Transfer,
)
from planner.sharding import ShardingSpec
from runtime import reshard
from runtime.mesh import RankMesh
from runtime.pipeline import schedule
from runtime.transfer import pieces

CPU_CLUSTER = {
    "name": "cpu",
    "hosts": 1,
    "devices_per_host": 4,
    "device": {
        "name": "cpu",
        "kind": "cpu",
        "peak_flops": {"float32": 1e11},
        "memory_bytes": 8e9,
        "memory_bandwidth": 2e10,
    },
    "intra_host": {"bandwidth": 1e10, "latency": 1e-6},
    "inter_host": {"bandwidth": 1e9, "latency": 1e-5},
}


def _spec(shape, split_dim: int | None) -> str:
    return ",".join("S0" if d == split_dim else "R" for d in range(len(shape)))


def _shards(shape, n: int) -> bool:
    return bool(shape) and shape[0] % n == 0


def hand_plan(
    model: ir.Model,
    devices_per_stage: int,
    batch_sizes: set[int],
    microbatches: int = 1,
    method: str = "data",
    stages: int = 1,
    schedule_kind: str = "1f1b",
) -> Plan:
    """A valid plan for ``model`` (a training graph) without the planner (see module doc)."""
    g = model.graph
    n = devices_per_stage
    state = {v.name for v in g.inputs if role_of(v) in (Role.PARAM, Role.OPT_STATE)}
    data_dep = {v.name for v in g.inputs if v.name not in state}
    bdim = dict.fromkeys(data_dep, 0)  # value -> its batch dim
    forward = [node for node in g if node.metadata_props["alpa.phase"] == "forward"]
    stage_of: dict[str, int] = {}
    for i, node in enumerate(forward):
        stage_of[node.name] = min(i * stages // len(forward), stages - 1)
    param_stage: dict[str, int] = {}
    for node in forward:
        for v in node.inputs:
            if v is not None and v.name in state:
                param_stage.setdefault(v.name, stage_of[node.name])
    for node in g:
        phase = node.metadata_props["alpa.phase"]
        if phase == "backward":
            stage_of[node.name] = stage_of.get(
                node.metadata_props.get("alpa.forward_node", ""), stages - 1
            )
        elif phase == "update":
            stage_of[node.name] = param_stage.get(node.metadata_props.get("alpa.param", ""), 0)
    sharded_update = method in ("zero2", "zero3")
    grads = {
        v.name: v.metadata_props["alpa.grad_of"]
        for node in g
        for v in node.outputs
        if role_of(v) is Role.GRAD
    }
    stage_nodes: list[dict[str, NodePlan]] = [{} for _ in range(stages)]
    spec_of: dict[str, str] = {}
    for v in g.inputs:
        shape = shape_of(v)
        shard_state = method == "zero3" or (sharded_update and role_of(v) is Role.OPT_STATE)
        split_state = v.name in state and shard_state and _shards(shape, n)
        spec_of[v.name] = _spec(shape, bdim.get(v.name, 0 if split_state else None))
    for node in g:
        ins = [v for v in node.inputs if v is not None]
        dep = any(v.name in data_dep for v in ins)
        phase = node.metadata_props["alpa.phase"]
        out0 = shape_of(node.outputs[0])
        split = {
            i: bdim[v.name]
            for i, v in enumerate(node.inputs)
            if v is not None and v.name in bdim and not (node.op_type == "Gather" and i == 0)
        }  # indices are global
        out_bdim = None
        if split and node.op_type == "Transpose":
            out_bdim = list(node.attributes["perm"].value).index(next(iter(split.values())))
        elif split:
            out_bdim = next((d for d, size in enumerate(out0) if size in batch_sizes), None)
        if out_bdim is not None:
            for i, v in enumerate(node.inputs):  # batch-major operands that are not data
                if (
                    v is not None
                    and i not in split
                    and len(shape_of(v)) == len(out0)
                    and shape_of(v)[out_bdim] == out0[out_bdim]
                    and not (node.op_type == "Gather" and i == 0)
                ):
                    split[i] = out_bdim
        in_specs: list[str | None] = []
        for i, v in enumerate(node.inputs):
            if v is None:
                in_specs.append(None)
            elif i in split:
                in_specs.append(_spec(shape_of(v), split[i]))
            elif (
                phase == "update"
                and sharded_update
                and _shards(shape_of(v), n)
                and shape_of(v) == out0
            ):
                in_specs.append(_spec(shape_of(v), 0))
            else:
                in_specs.append(_spec(shape_of(v), None))
        outs, collectives = [], []
        for j, v in enumerate(node.outputs):
            shape = shape_of(v)
            if dep:
                data_dep.add(v.name)
            d = (
                out_bdim
                if phase != "update"
                and out_bdim is not None
                and out_bdim < len(shape)
                and shape[out_bdim] in batch_sizes
                else None
            )
            if d is not None:
                bdim[v.name] = d
            split_update = (
                phase == "update"
                and sharded_update
                and _shards(shape, n)
                and any(s and s.startswith("S") for s in in_specs)
            )
            grad_scatter = v.name in grads and sharded_update and _shards(shape, n)
            if split and d is None:
                reduce = "mean" if node.op_type == "ReduceMean" else "sum"
                if grad_scatter:
                    collectives.append(
                        Collective(kind="reduce_scatter", axes=[0], dim=0, reduce=reduce, output=j)
                    )
                else:
                    collectives.append(
                        Collective(kind="all_reduce", axes=[0], reduce=reduce, output=j)
                    )
            outs.append(
                _spec(
                    shape,
                    d
                    if d is not None
                    else (0 if split_update or (grad_scatter and split) else None),
                )
            )
            spec_of[v.name] = outs[-1]
        stage_nodes[stage_of[node.name]][node.name] = NodePlan(
            op=node.op_type, strategy="hand", inputs=in_specs, outputs=outs, collectives=collectives
        )
    transfers = []
    for node in g:
        for v in node.inputs:
            if v is None or v.producer() is None:
                continue
            src = stage_of[v.producer().name]
            dst = stage_of[node.name]
            key = (v.name, src, dst)
            if src != dst and key not in {(t.tensor, t.src_stage, t.dst_stage) for t in transfers}:
                transfers.append(
                    Transfer(
                        tensor=v.name,
                        src_stage=src,
                        dst_stage=dst,
                        src_spec=spec_of[v.name],
                        dst_spec=spec_of[v.name],
                        bytes=0,
                        seconds=0.0,
                    )
                )
    stage_plans = []
    for s in range(stages):
        devices = list(range(s * n, (s + 1) * n))
        params = {v.name: spec_of[v.name] for v in g.inputs if v.name in state}
        stage_plans.append(
            StagePlan(
                index=s,
                layers=[s],
                submesh=Submesh(hosts=[0], devices=devices),
                logical_mesh=LogicalMeshPlan(shape=[n], device_ids=[devices]),
                nodes=stage_nodes[s],
                params=params,
                inputs={},
                outputs={},
                compute=1e-3,
                communication=1e-4,
                memory=StageMemory(params=0, grads=0, optimizer_state=0, activations=0, peak=0),
            )
        )
    batch = shape_of(next(v for v in g.inputs if v.name not in state))[0]
    return Plan(
        producer=Producer(version="test"),
        model=ModelIdentity(file="hand", structure_sha256="", input_shapes={}),
        cluster=CPU_CLUSTER,
        options=Options(
            method=method,
            global_batch=batch * microbatches,
            microbatches=microbatches,
            schedule=schedule_kind,
        ),
        solver=SolverStats(),
        stages=stage_plans,
        transfers=transfers,
        predicted=Predicted(
            iteration_time=1e-2,
            stages=[StagePrediction(compute=1e-3, communication=1e-4, bubble=0.0)] * stages,
            peak_memory_per_device=0,
            device_memory=8e9,
            mfu=0.1,
            compute_lower_bound=1e-3,
            ratio_to_lower_bound=1.0,
        ),
    )


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_schedules_run_every_microbatch_once_forward_before_backward(kind):
    for stages in (1, 2, 4):
        for stage in range(stages):
            tasks = schedule(kind, stage, stages, 4)
            assert sorted(tasks) == sorted(
                [("F", m) for m in range(4)] + [("B", m) for m in range(4)]
            )
            assert all(tasks.index(("F", m)) < tasks.index(("B", m)) for m in range(4))
    assert schedule("1f1b", 0, 2, 4)[:3] == [("F", 0), ("F", 1), ("B", 0)]


def test_transfer_pieces_cover_every_destination_block_once():
    src = RankMesh((2, 2), (0, 1, 2, 3))
    dst = RankMesh((2,), (4, 5))
    shape = (4, 6)
    for s_text, d_text in [("S0,S1", "R,S0"), ("R,R", "S0,R"), ("S01,R", "R,R")]:
        ps = pieces(shape, ShardingSpec.parse(s_text), src, ShardingSpec.parse(d_text), dst)
        for receiver in dst.devices:
            box = dst.box(ShardingSpec.parse(d_text), shape, receiver)
            cover = np.zeros([b - a for a, b in box], int)
            for p in ps:
                if p.dst == receiver:
                    cover[p.dst_index] += 1
            assert (cover == 1).all()


def test_reshard_program_matches_planner_steps():
    from planner.sharding import resharding_cost

    class _Mesh:  # resharding_cost only asks the mesh for collective costs
        shape = (2, 2)

        def collective_cost(self, kind, axes, nbytes):
            return 1.0

    for src, dst in [
        ("S0,R", "R,S0"),
        ("R,S01", "S1,R"),
        ("S0,R|P1", "S0,S1"),
        ("S01,R", "S1,S0"),
        ("R,R", "R,R|P0"),
    ]:
        a, b = ShardingSpec.parse(src), ShardingSpec.parse(dst)
        _, steps = resharding_cost(a, b, (4, 4), 4, _Mesh())
        mine = reshard.program(a, b)
        assert [(s.kind, s.axis, s.dim) for s in steps] == [
            (s.kind.replace("zero", "slice"), s.axis, s.dim) for s in mine
        ]
