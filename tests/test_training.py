"""The training step on real exports: gradients vs finite differences (float64), 20 Adam steps
lower the loss (float32, onnxruntime), the train-graph CLI, the contract metadata, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from planner.errors import UserError
from planner.graph import Role, parameters, role_of
from planner.importer import ImportOptions, import_model
from planner.training import TrainingOptions, build_training_step, initial_state
from tests.conftest import DEFAULT_DIMS, FIXTURES
from tests.gradcheck import finite_difference_errors, to_float64

ROOT = Path(__file__).resolve().parents[1]
# One export per architecture: decoder LMs, MoE, encoder, encoder-decoder, ViT, CNN with
# BatchNorm (the un-fused export) and the TorchScript CNN (GlobalAveragePool, Flatten).
MODELS = [
    "gpt2.ts",
    "gpt2.dynamo",
    "llama.ts",
    "llama.dynamo",
    "mixtral.ts",
    "mixtral.dynamo",
    "bert.dynamo",
    "t5.ts",
    "vit.dynamo",
    "wrn.dynamo_noopt",
    "wrn.ts",
]
CE = TrainingOptions(loss="cross_entropy", labels="labels", optimizer="adam", lr=1e-2)


def load(name: str, float64: bool = False) -> ir.Model:
    model = import_model(FIXTURES / f"{name}.onnx", ImportOptions(dims=DEFAULT_DIMS))
    return to_float64(model) if float64 else model


def feeds_for(name: str, model: ir.Model, step: ir.Model) -> dict[str, np.ndarray]:
    """The fixture's batch, random labels, the weights and zero optimizer state."""
    wanted = {v.name: v for v in step.graph.inputs}
    batch = np.load(FIXTURES / f"{name.split('.')[0]}.inputs.npz")
    feeds = {k: batch[k].astype(wanted[k].dtype.numpy()) for k in batch.files if k in wanted}
    labels = wanted["labels"]
    classes = model.graph.outputs[0].shape[-1]
    rng = np.random.default_rng(0)
    feeds["labels"] = rng.integers(0, classes, size=tuple(labels.shape)).astype(np.int64)
    feeds.update(initial_state(model, step))
    return feeds


# float64 Conv runs in the reference evaluator (no onnxruntime kernel): slow, so the CNNs
# sample one entry per parameter and the TorchScript CNN runs only in the slow suite.
FD_MODELS = [pytest.param(m, marks=pytest.mark.slow) if m == "wrn.ts" else m for m in MODELS]


@pytest.mark.parametrize("name", FD_MODELS)
def test_gradients_match_finite_differences(name):
    model = load(name, float64=True)
    step = build_training_step(
        model, TrainingOptions(loss="cross_entropy", labels="labels", emit_gradients=True)
    )
    errors = finite_difference_errors(
        step,
        feeds_for(name, model, step),
        per_param=1 if name.startswith("wrn") else 2,
        rng=np.random.default_rng(1),
    )
    assert len(errors) == len([v for v in step.graph.inputs if role_of(v) is Role.PARAM])
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


def run_adam(name: str, steps: int) -> list[float]:
    model = load(name)
    step = build_training_step(model, CE)
    feeds = feeds_for(name, model, step)
    proto = ir.serde.serialize_model(step)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = step.graph.outputs
    losses = []
    for _ in range(steps):
        results = session.run(None, feeds)
        losses.append(float(results[0]))
        for value, array in zip(outs[1:], results[1:], strict=True):
            feeds[value.metadata_props["alpa.updates"]] = array
    return losses


@pytest.mark.parametrize("name", MODELS)
def test_twenty_adam_steps_lower_the_loss(name):
    losses = run_adam(name, 20)
    assert losses[-1] < 0.7 * losses[0], losses


def test_training_graph_contract():
    model = load("gpt2.ts")
    before = ir.serde.serialize_model(model).SerializeToString()
    step = build_training_step(
        model,
        TrainingOptions(
            loss="cross_entropy",
            labels="labels",
            optimizer="adamw",
            weight_decay=0.1,
            emit_gradients=True,
        ),
    )
    assert ir.serde.serialize_model(model).SerializeToString() == before  # input untouched
    graph = step.graph
    params = [v for v in graph.inputs if role_of(v) is Role.PARAM]
    states = [v for v in graph.inputs if role_of(v) is Role.OPT_STATE]
    assert [v.name for v in graph.inputs] == [
        "input_ids",
        "attention_mask",
        "labels",
        *(p.name for p in params),
        *(s.name for s in states),
    ]
    assert [p.name for p in params] == [
        p.name for p in parameters(load("gpt2.ts").graph) if p.name in {q.name for q in params}
    ]
    assert not set(graph.initializers) & {p.name for p in params}
    assert len(states) == 2 * len(params) + 1
    assert states[-1].metadata_props["alpa.state_of"] == ""
    outs = graph.outputs
    assert outs[0].shape == ir.Shape([]) and outs[0].name == "loss"
    n = len(params)
    assert [o.metadata_props["alpa.updates"] for o in outs[1 : 1 + n]] == [p.name for p in params]
    assert [o.metadata_props["alpa.updates"] for o in outs[1 + n : 1 + n + len(states)]] == [
        s.name for s in states
    ]
    grads = outs[1 + n + len(states) :]
    assert [g.metadata_props["alpa.grad_of"] for g in grads] == [p.name for p in params]
    assert all(
        role_of(g) is Role.GRAD and g.dtype == p.dtype and g.shape == p.shape
        for g, p in zip(grads, params, strict=True)
    )
    names = [node.name for node in graph]
    assert all(names) and len(set(names)) == len(names)
    forward = {node.name for node in graph if node.metadata_props["alpa.phase"] == "forward"}
    for node in graph:
        phase = node.metadata_props["alpa.phase"]
        if phase == "backward":
            assert node.metadata_props["alpa.forward_node"] in forward
        elif phase == "update":
            assert "alpa.param" in node.metadata_props
            assert all(
                role_of(v) in (Role.PARAM, Role.GRAD, Role.OPT_STATE, Role.CONST)
                or v.producer() is not None
                and v.producer().metadata_props["alpa.phase"] == "update"
                for v in node.inputs
                if v is not None
            )
    for value in graph.initializers.values():
        assert role_of(value) is Role.CONST
    assert all(
        v.shape is not None and all(isinstance(d, int) for d in v.shape)
        for node in graph
        for v in node.outputs
    )


def test_batchnorm_running_stats_are_frozen():
    step = build_training_step(load("wrn.dynamo_noopt"), CE)
    stats = [v for v in step.graph.initializers.values() if "running" in (v.name or "")]
    assert stats and all(role_of(v) is Role.CONST for v in stats)
    bns = [n for n in step.graph if n.op_type == "BatchNormalization"]
    assert bns and all(n.attributes.get_int("training_mode", 0) == 1 for n in bns)


def test_graph_only_model_builds(tmp_path):
    """Planning needs structure and shapes only: weights whose data file is missing are fine."""
    proto = onnx.load(FIXTURES / "llama.ts.onnx")
    onnx.save(
        proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0
    )
    os.remove(tmp_path / "m.data")
    model = import_model(tmp_path / "m.onnx", ImportOptions(dims=DEFAULT_DIMS))
    step = build_training_step(model, CE)
    assert len([v for v in step.graph.inputs if role_of(v) is Role.PARAM]) == 21
    with pytest.raises(UserError, match="no weights"):
        initial_state(model, step)


@pytest.mark.parametrize(
    "options, message",
    [
        (TrainingOptions(), "no scalar float output"),
        (TrainingOptions(loss="mse"), "needs --labels"),
        (TrainingOptions(loss="cross_entropy", labels="input_ids"), "existing tensor"),
        (TrainingOptions(loss="cross_entropy", labels="labels", optimizer="lamb"), "--optimizer"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_training_step(load("gpt2.ts"), options)


def test_mse_and_sgd():
    model = load("vit.ts")
    step = build_training_step(
        model, TrainingOptions(loss="mse", labels="target", optimizer="sgd", lr=0.1)
    )
    assert not [v for v in step.graph.inputs if role_of(v) is Role.OPT_STATE]
    assert step.graph.inputs[1].shape == model.graph.outputs[0].shape


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


def test_train_graph_cli(tmp_path):
    out = tmp_path / "step.onnx"
    result = cli(
        "train-graph",
        str(FIXTURES / "llama.dynamo.onnx"),
        "--dim",
        "batch=2",
        "--dim",
        "seq=16",
        "--loss",
        "cross_entropy",
        "--labels",
        "auto",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.01",
        "--emit-gradients",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][:3] == ["input_ids", "attention_mask", "labels"]
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_train_graph_cli_errors(tmp_path):
    out = tmp_path / "step.onnx"
    result = cli(
        "train-graph",
        str(FIXTURES / "gpt2.ts.onnx"),
        "--dim",
        "batch=2",
        "--dim",
        "seq=16",
        "-o",
        str(out),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists()
    result = cli(
        "train-graph",
        str(FIXTURES / "gpt2.ts.onnx"),
        "--dim",
        "batch=2",
        "--dim",
        "seq=16",
        "--loss",
        "mse",
        "--labels",
        "y",
        "--lr",
        "-1",
        "-o",
        str(out),
    )
    assert result.returncode == 2 and "--lr" in result.stderr
