"""Plan-reading tools: inspect / explain / diff / schema / report and ONNX annotations."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cli import main
from cost_models.cluster import resolve_cluster
from planner.errors import UserError
from planner.onnx_annotations import annotate_onnx
from planner.plan_io import load_plan, write_plan
from planner.plan_report import render_html, timeline, write_report
from planner.plan_schema import (
    Alternative,
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
from planner.plan_view import diff_lines, diff_plans, explain_node, explain_param, inspect_plan
from tests.conftest import FIXTURES

GiB = 2**30


def make_plan(
    cluster: str,
    stage_layers: list[list[int]],
    mesh: list[int],
    *,
    param_spec: str = "R,S1",
    strategy: str = "S0xS1",
    microbatches: int = 4,
    schedule: str = "1f1b",
    mfu: float = 0.3,
) -> Plan:
    """A plan of an 8-layer toy model: one attention and one MLP weight and MatMul per layer;
    stage k on the k-th block of ``prod(mesh)`` devices."""
    spec = resolve_cluster(cluster)
    size = int(np.prod(mesh))
    stages, preds = [], []
    for k, layers in enumerate(stage_layers):
        devices = list(range(k * size, (k + 1) * size))
        nodes, params = {}, {}
        for i in layers:
            for part in ("attn", "mlp"):
                params[f"h.{i}.{part}.weight"] = param_spec
                nodes[f"/h.{i}/{part}/MatMul"] = NodePlan(
                    op="MatMul",
                    strategy=strategy,
                    inputs=["S0,R", param_spec],
                    outputs=["S0,S1"],
                    compute=1e-3 / size,
                    communication=2e-4,
                    collectives=[
                        Collective(
                            kind="all_reduce",
                            axes=[1],
                            reduce="sum",
                            bytes=4096 * (i + 1),
                            seconds=1e-4 * (i + 1),
                        )
                    ],
                    alternatives=[
                        Alternative(strategy="RxR", cost=1e-3),
                        Alternative(strategy="S0xR", cost=5e-4),
                        Alternative(strategy="RxS1", cost=2e-3),
                    ],
                )
        compute, comm = 2e-3 * len(layers) / size * microbatches, 1e-4 * len(layers)
        stages.append(
            StagePlan(
                index=k,
                layers=layers,
                submesh=Submesh(hosts=sorted({spec.host_of(d) for d in devices}), devices=devices),
                logical_mesh=LogicalMeshPlan(
                    shape=mesh, device_ids=np.array(devices).reshape(-1, mesh[-1]).tolist()
                ),
                nodes=nodes,
                params=params,
                inputs={},
                outputs={},
                compute=compute,
                communication=comm,
                memory=StageMemory(
                    params=1e8 / size,
                    grads=1e8 / size,
                    optimizer_state=2e8 / size,
                    activations=5e7,
                    peak=4e8 / size + 5e7,
                ),
            )
        )
        preds.append((compute, comm))
    iteration = max(c + m for c, m in preds) * (1 + (len(preds) - 1) / microbatches)
    return Plan(
        producer=Producer(version="0.1.0"),
        model=ModelIdentity(
            file="toy.onnx",
            structure_sha256="0" * 64,
            dims={"batch": 8},
            input_shapes={"input_ids": [8, 16]},
        ),
        cluster=spec.model_dump(),
        options=Options(
            method="auto", global_batch=8, microbatches=microbatches, schedule=schedule
        ),
        solver=SolverStats(),
        stages=stages,
        transfers=[
            Transfer(
                tensor=f"act{k}",
                src_stage=k,
                dst_stage=k + 1,
                src_spec="S0,R",
                dst_spec="S0,R",
                bytes=1 << 20,
                seconds=3e-3,
            )
            for k in range(len(stages) - 1)
        ],
        predicted=Predicted(
            iteration_time=iteration,
            stages=[
                StagePrediction(compute=c, communication=m, bubble=iteration - c - m)
                for c, m in preds
            ],
            peak_memory_per_device=max(s.memory.peak for s in stages),
            device_memory=spec.device.memory_bytes,
            mfu=mfu,
            compute_lower_bound=iteration / 2,
            ratio_to_lower_bound=2.0,
        ),
    )


CPU_PLAN = dict(cluster="cpu:2x2", stage_layers=[[0, 1, 2, 3], [4, 5, 6, 7]], mesh=[1, 2])
GPU_PLAN = dict(
    cluster="p3.16xlarge:2",
    stage_layers=[[0, 1], [2, 3], [4, 5], [6, 7]],
    mesh=[2, 2],
    param_spec="S0,R",
    strategy="S1xS0",
    mfu=0.42,
)


@pytest.fixture
def plan_files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, kwargs in (("cpu", CPU_PLAN), ("gpu", GPU_PLAN)):
        out[name] = tmp_path / f"{name}.json"
        write_plan(make_plan(**kwargs), out[name])
    return out


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_rows_and_top_communications():
    data = inspect_plan(make_plan(**GPU_PLAN), top=10)
    assert [s["layers"] for s in data["stages"]] == ["0-1", "2-3", "4-5", "6-7"]
    assert [s["devices"] for s in data["stages"]] == ["0-3", "4-7", "8-11", "12-15"]
    assert data["stages"][3]["hosts"] == "1" and data["stages"][0]["logical_mesh"] == "2x2"
    comms = data["communications"]
    assert len(comms) == 10
    assert comms[0]["kind"] == "transfer" and comms[0]["seconds"] == 3e-3
    assert [c["seconds"] for c in comms] == sorted((c["seconds"] for c in comms), reverse=True)


def test_inspect_cli_table_and_json(plan_files):
    table = cli("inspect", plan_files["gpu"])
    assert table.exit_code == 0, table.output
    assert "costliest communications" in table.output and "p3.16xlarge:2" in table.output
    js = cli("inspect", plan_files["gpu"], "--json")
    assert js.exit_code == 0
    data = json.loads(js.output)
    assert data == json.loads(json.dumps(inspect_plan(load_plan(plan_files["gpu"]))))
    assert len(data["stages"]) == 4 and len(data["communications"]) == 10


def test_explain_node_chosen_and_alternatives():
    data = explain_node(make_plan(**CPU_PLAN), "/h.5/mlp/MatMul", top=2)
    assert data["stage"] == 1 and data["strategy"] == "S0xS1"
    assert data["cost"]["total"] == pytest.approx(5e-4 + 2e-4)
    assert [a["strategy"] for a in data["alternatives"]] == ["S0xR", "RxR"]
    assert data["alternatives"][0]["delta"] < 0 and "cost less" in data["verdict"]


def test_explain_compares_alternatives_on_their_own_cost():
    """The chosen strategy's input resharding counts in its total, not against alternatives:
    what resharding an alternative would need depends on its neighbours."""
    plan = make_plan(**CPU_PLAN)
    node = plan.stages[1].nodes["/h.5/mlp/MatMul"]
    node.resharding, node.alternatives = 3e-4, [Alternative(strategy="S0xR", cost=6e-4)]
    data = explain_node(plan, "/h.5/mlp/MatMul")
    assert data["cost"]["total"] == pytest.approx(5e-4 + 2e-4 + 3e-4)
    assert data["alternatives"][0]["delta"] == pytest.approx(-1e-4)
    assert "1 alternative(s) cost less" in data["verdict"]
    node.alternatives = [Alternative(strategy="S0xR", cost=node.compute + node.communication)]
    assert explain_node(plan, "/h.5/mlp/MatMul")["verdict"].startswith("tied: 1 alternative")


def test_explain_param_and_cli(plan_files):
    data = explain_param(make_plan(**GPU_PLAN), "h.2.attn.weight")
    (p,) = data["placements"]
    assert p["stage"] == 1 and p["spec"] == "S0,R" and p["fraction_per_device"] == 0.5
    assert p["gradient_reduced_over_axes"] == [1] and "replicated over mesh axis 1" in p["meaning"]
    res = cli("explain", plan_files["cpu"], "--node", "/h.0/attn/MatMul")
    assert res.exit_code == 0 and "S0xS1" in res.output and "RxR" in res.output


def test_explain_unknown_name_suggests(plan_files):
    res = cli("explain", plan_files["cpu"], "--node", "/h.0/attn/Matmul")
    assert res.exit_code == 2
    assert "no node '/h.0/attn/Matmul'" in res.output and "'/h.0/attn/MatMul'" in res.output
    res = cli("explain", plan_files["cpu"], "--param", "h.0.atn.weight")
    assert res.exit_code == 2 and "did you mean 'h.0.attn.weight'" in res.output
    assert cli("explain", plan_files["cpu"]).exit_code == 2


def test_diff_equal_exit_0(plan_files, tmp_path):
    other = make_plan(**CPU_PLAN).model_copy(update={"producer": Producer(version="9.9")})
    write_plan(other, tmp_path / "same.json")
    res = cli("diff", plan_files["cpu"], tmp_path / "same.json")
    assert res.exit_code == 0 and "plans are equal" in res.output


def test_diff_two_clusters(plan_files):
    d = diff_plans(make_plan(**CPU_PLAN), make_plan(**GPU_PLAN))
    assert not d["equal"] and d["stages"]["count"] == [2, 4]
    assert {(m["layers"], m["a"], m["b"]) for m in d["stages"]["layer_moves"]} == {
        ("2-3", 0, 1),
        ("4-5", 1, 2),
        ("6-7", 1, 3),
    }
    assert d["params"] == [
        {"name": f"h.[0-7].{part}.weight", "count": 8, "a": "R,S1", "b": "S0,R"}
        for part in ("attn", "mlp")
    ]
    res = cli("diff", plan_files["cpu"], plan_files["gpu"])
    assert res.exit_code == 1, res.output
    text = res.output
    for needle in (
        "cluster: cpu:2x2",
        "-> p3.16xlarge:2",
        "stages: 2 -> 4",
        "layers 6-7: stage 1 -> stage 3",
        "mesh 1x2 -> hosts 0 devices 0-3 mesh 2x2",
        "stage 3: (none) -> hosts 1 devices 12-15 mesh 2x2",
        "h.[0-7].mlp.weight: R,S1 -> S0,R  x8",
        "/h.[0-7]/attn/MatMul: S0xS1 -> S1xS0  x8",
        "iteration time:",
        "MFU: 30.0% -> 42.0% (+12.0 pp)",
        "stage-to-stage transfers: 1 (",
        "peak memory per device:",
    ):
        assert needle in text, (needle, text)
    assert "%" in text


def test_diff_groups_by_layer_and_attributes_cost():
    a = make_plan(**CPU_PLAN)
    b = make_plan(**CPU_PLAN)
    for stage in b.stages:
        for name, node in stage.nodes.items():
            if "attn" in name:
                stage.nodes[name] = node.model_copy(update={"strategy": "RxR", "compute": 1.0})
    lines = diff_lines(diff_plans(a, b))
    (row,) = [x for x in lines if "MatMul" in x]
    assert row.startswith("  /h.[0-7]/attn/MatMul: S0xS1 -> RxR  x8  (cost +")


def test_schema_prints_json_schema():
    res = cli("schema")
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "stages" in schema["properties"] and "StagePlan" in schema["$defs"]
    assert set(schema["required"]) >= {"stages", "predicted", "cluster"}


def test_timeline_1f1b_and_gpipe():
    for schedule in ("1f1b", "gpipe"):
        plan = make_plan(**GPU_PLAN, microbatches=8, schedule=schedule)
        ops = timeline(plan)
        assert len(ops) == 4 * 8 * 2
        per_stage = {}
        for o in ops:
            per_stage.setdefault(o.stage, []).append(o)
        for s, seq in per_stage.items():  # a stage runs one op at a time
            assert all(x.end <= y.start + 1e-12 for x, y in zip(seq, seq[1:], strict=False)), s
        first_b = [o.kind for o in per_stage[0]].index("bwd")
        assert first_b == (8 if schedule == "gpipe" else 4)  # 1F1B: 3 warm-up forwards
    infer = make_plan(**GPU_PLAN, microbatches=8)
    infer.options.mode, infer.options.training = "infer", None
    ops = timeline(infer)
    assert len(ops) == 4 * 8 and {o.kind for o in ops} == {"fwd"}


def test_report_html_and_png(tmp_path):
    plan = make_plan(**GPU_PLAN)
    page = render_html(plan)
    assert (
        "<svg" in page
        and "<script" not in page
        and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert page.count('class="op fwd"') == 4 * 4 and page.count('class="op bwd"') == 4 * 4
    assert page.count('class="device"') == 16
    res = cli("report", tmp_path / "plan.json", "-o", tmp_path / "r.html")
    assert res.exit_code == 2
    write_plan(plan, tmp_path / "plan.json")
    for out in ("r.html", "r.png"):
        res = cli("report", tmp_path / "plan.json", "-o", tmp_path / out)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("report", tmp_path / "plan.json", "-o", tmp_path / "r.pdf").exit_code == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (.ci/run installs it)")
def test_report_screenshot_headless_chromium(tmp_path):
    import matplotlib.image as mpimg

    page = tmp_path / "report.html"
    write_report(make_plan(**GPU_PLAN), page)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1200,900",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    img = mpimg.imread(shot)
    assert img.shape[0] >= 800 and img.shape[1] >= 1100
    colors = np.unique(img[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colors) > 20  # text, timeline bars and device map, not a blank page


def _gpt2_plan(model_path: Path, mesh_ids: list[list[int]]):
    from planner.importer import ImportOptions, import_model, structure_hash

    model = import_model(model_path, ImportOptions(dims={"batch": 2, "seq": 16}))
    base = make_plan(cluster="cpu:2x2", stage_layers=[[0]], mesh=[2, 2])

    def spec(value) -> str | None:
        if value is None:
            return None
        dims = list(value.shape)
        return ",".join("S0" if i == 0 and d % 2 == 0 else "R" for i, d in enumerate(dims))

    nodes = {}
    for i, node in enumerate(model.graph):
        outputs = [spec(v) for v in node.outputs]
        if i == 1 and outputs[0] is not None:
            outputs[0] += "|P1"  # partial sums have no ONNX spelling: skipped
        nodes[node.name] = NodePlan(
            op=node.op_type, strategy="auto", inputs=[spec(v) for v in node.inputs], outputs=outputs
        )
    nodes["grad/only/in/the/step/graph"] = NodePlan(
        op="MatMul", strategy="x", inputs=[], outputs=[]
    )
    stage = base.stages[0].model_copy(
        update={
            "nodes": nodes,
            "logical_mesh": LogicalMeshPlan(shape=[2, 2], device_ids=mesh_ids),
        }
    )
    ident = base.model.model_copy(
        update={
            "file": model_path.name,
            "structure_sha256": structure_hash(model),
            "dims": {"batch": 2, "seq": 16},
            "input_shapes": {},
        }
    )
    return model, base.model_copy(update={"stages": [stage], "model": ident})


def test_annotate_onnx_passes_checker(tmp_path):
    src = FIXTURES / "gpt2.ts.onnx"
    model, plan = _gpt2_plan(src, [[0, 1], [2, 3]])
    out = tmp_path / "annotated.onnx"
    annotate_onnx(src, plan, out)
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(out)
    assert proto.ir_version >= 11
    (config,) = proto.configuration
    assert config.num_devices == 4 and config.device[3] == "host1/cpu:1"
    annotated = [n for n in proto.graph.node if n.device_configurations]
    assert len(annotated) == len(proto.graph.node)
    for node in annotated:
        (dc,) = node.device_configurations
        assert dc.configuration_id == config.name and dc.pipeline_stage == 0
        names = set(node.input) | set(node.output)
        for spec in dc.sharding_spec:
            assert spec.tensor_name in names
            shards = int(
                np.prod([s.num_shards for d in spec.sharded_dim for s in d.simple_sharding])
            )
            assert len(spec.device) == shards
            groups = {e.key: list(e.value) for e in spec.index_to_device_group_map}
            covered = sorted(d for k in spec.device for d in groups.get(k, [k]))
            assert covered == [0, 1, 2, 3]
    matmul = next(n for n in annotated if n.op_type == "MatMul")
    (spec,) = [
        s
        for s in matmul.device_configurations[0].sharding_spec
        if s.tensor_name == matmul.output[0]
    ]
    # dim 0 split over mesh axis 0: rows of the mesh, each replicated over axis 1
    assert [list(e.value) for e in spec.index_to_device_group_map] == [[0, 1], [2, 3]]
    assert spec.sharded_dim[0].axis == 0 and spec.sharded_dim[0].simple_sharding[0].num_shards == 2
    partial = list(proto.graph.node)[1]
    assert partial.output[0] not in {
        s.tensor_name for s in partial.device_configurations[0].sharding_spec
    }
    meta = {p.key: p.value for p in matmul.metadata_props}
    assert meta["alpa_plan.strategy"] == "auto"


def test_annotate_onnx_refuses_other_model(tmp_path):
    _, plan = _gpt2_plan(FIXTURES / "gpt2.ts.onnx", [[0, 1], [2, 3]])
    with pytest.raises(UserError, match="not the one the plan was compiled from"):
        annotate_onnx(FIXTURES / "gpt2.dynamo.onnx", plan, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_annotate_onnx_keeps_external_weights_lazy(tmp_path):
    from planner.importer import ImportOptions, import_model

    src = FIXTURES / "gpt3-2.6b.graph.onnx"
    model = import_model(src, ImportOptions(dims={"batch": 2, "seq": 16}))
    plan = make_plan(cluster="cpu:2x2", stage_layers=[[0]], mesh=[2, 2])
    out = tmp_path / "sub" / "annotated.onnx"
    annotate_onnx(model, plan, out, base_dir=str(FIXTURES))
    proto = onnx.load(out, load_external_data=False)
    ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and out.stat().st_size < 10 * 2**20
    location = {e.key: e.value for e in ext[0].external_data}["location"]
    assert (out.parent / location).resolve() == (FIXTURES / "gpt3-2.6b.graph.onnx.data").resolve()
    assert proto.ir_version >= 11 and len(proto.configuration) == 1


def test_node_resharding_prices_what_the_executor_converts():
    """A node's ``resharding`` is non-zero exactly where the executor runs a collective to
    convert one of its inputs: from the spec its producer in the stage makes (or a
    parameter's stored spec) to the one the node reads. Read back from a golden plan, the
    training graph and the executor's own resharding programs."""
    from planner.sharding import ShardingSpec
    from runtime.reshard import LOCAL, program
    from runtime.step import prepare_step

    root = Path(__file__).resolve().parents[1]
    plan = load_plan(root / "plans" / "gpt2-cpu4-auto.json")
    graph = prepare_step(plan, str(FIXTURES / plan.model.file)).model.graph
    priced = 0
    for stage in plan.stages:
        made = dict(stage.params)
        for node in graph:
            np_ = stage.nodes.get(node.name)
            if np_ is None:
                continue
            needs = False
            for value, read in zip(node.inputs, np_.inputs, strict=False):
                if value is None or read is None or value.name not in made:
                    continue
                steps = program(ShardingSpec.parse(made[value.name]), ShardingSpec.parse(read))
                needs |= any(s.kind not in LOCAL for s in steps)
            assert (np_.resharding > 0) == needs, node.name
            priced += needs
            made.update({o.name: s for o, s in zip(node.outputs, np_.outputs, strict=True)})
    assert priced
