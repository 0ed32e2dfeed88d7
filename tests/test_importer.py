"""The importer: real exports become static graphs with torch's parameters; bad input is refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from planner.errors import UnsupportedModelError, UserError
from planner.flops import node_flops
from planner.graph import parameters, shape_of, values_of
from planner.importer import ImportOptions, import_model, structure_hash
from planner.summary import model_summary
from tests.conftest import DEFAULT_DIMS, FIXTURES, manifest

# The exporter itself folded BatchNorm's affine parameters into the convolutions, so the
# torch parameter count is not recoverable from these files.
EXPORTER_FOLDED_BN = {"wrn.ts.onnx", "wrn.dynamo.onnx"}
TINY = [f for f in manifest() if f["kind"] == "tiny"]


@pytest.mark.parametrize("entry", TINY, ids=[f["file"] for f in TINY])
def test_fixture_imports_static_with_torch_parameter_count(entry):
    model = import_model(FIXTURES / entry["file"], ImportOptions(dims=DEFAULT_DIMS))
    for value in values_of(model.graph):
        assert all(d > 0 for d in shape_of(value)) or shape_of(value) == ()
    summary = model_summary(model)
    if entry["file"] in EXPORTER_FOLDED_BN:
        assert "BatchNormalization" not in summary["op_counts"]
        assert summary["num_parameters"] < entry["torch_params"]
    else:
        assert summary["num_parameters"] == entry["torch_params"]
    assert summary["forward_flops"] > 0


def test_tied_weights_are_tied_once():
    """TorchScript stores GPT-2's tied embedding twice (once transposed); import re-ties it."""
    model = import_model(FIXTURES / "gpt2.ts.onnx", ImportOptions(dims=DEFAULT_DIMS))
    names = [p.name for p in parameters(model.graph)]
    assert not any(n.startswith("onnx::MatMul") and "wte" not in n for n in names[-1:])
    tie_nodes = [n for n in model.graph if n.name.startswith("alpa_tie/")]
    assert len(tie_nodes) == 1 and tie_nodes[0].op_type == "Transpose"


def test_symbolic_dims_bound_and_folded():
    model = import_model(FIXTURES / "llama.ts.onnx", ImportOptions(dims={"batch": 3, "seq": 8}))
    assert shape_of(model.graph.inputs[0]) == (3, 8)
    assert shape_of(model.graph.outputs[0])[:2] == (3, 8)
    # Shape arithmetic is gone: no Shape node survives folding.
    assert not [n for n in model.graph if n.op_type == "Shape"]


def test_input_shape_binding_and_structure_hash_is_stable():
    opts = ImportOptions(input_shapes={"input_ids": (2, 16), "attention_mask": (2, 16)})
    a = import_model(FIXTURES / "gpt2.ts.onnx", opts)
    b = import_model(FIXTURES / "gpt2.ts.onnx", opts)
    assert structure_hash(a) == structure_hash(b)
    c = import_model(FIXTURES / "gpt2.ts.onnx", ImportOptions(dims={"batch": 4, "seq": 16}))
    assert structure_hash(a) != structure_hash(c)


def test_gpt_forward_flops_match_megatron_formula():
    """L·(24·B·s·h² + 4·B·s²·h) + 2·B·s·h·V (LM head) within 1% on the GPT-3 2.6B graph."""
    path = FIXTURES / "gpt3-2.6b.graph.onnx"
    model = import_model(path)
    b, s, h, layers, vocab = 1, 1024, 2560, 32, 51200
    expected = layers * (24 * b * s * h * h + 4 * b * s * s * h) + 2 * b * s * h * vocab
    total = sum(node_flops(n) for n in model.graph)
    assert abs(total - expected) / expected < 0.01


def test_graph_only_39b_imports_without_weights():
    start = time.perf_counter()
    model = import_model(
        FIXTURES / "gpt3-39b.graph.onnx",
        ImportOptions(dims=DEFAULT_DIMS | {"batch": 1, "seq": 1024}),
    )
    elapsed = time.perf_counter() - start
    summary = model_summary(model)
    assert 38e9 < summary["num_parameters"] < 41e9
    assert elapsed < 120  # the real figure is measured by `make bench`; this only catches hangs


def _model(nodes, inputs, outputs, path: Path, opset: int = 18) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_unsupported_ops_listed_at_once(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("Hardmax", ["x"], ["a"], name="hm0"),
        helper.make_node("Hardmax", ["a"], ["b"], name="hm1"),
        helper.make_node("MyOp", ["b"], ["y"], name="custom", domain="my.domain"),
    ]
    path = _model(nodes, [x], [y], tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedModelError) as err:
        import_model(path)
    msg = str(err.value)
    assert "'Hardmax' x2 (first node: hm0)" in msg and "my.domain::MyOp" in msg


def test_control_flow_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])],
        "b",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if0")
    path = _model([node], [x, cond], [y], tmp_path / "if.onnx")
    with pytest.raises(UnsupportedModelError, match="control flow op 'If'"):
        import_model(path)


def test_unbound_dim_names_the_flag():
    with pytest.raises(UserError, match=r"--dim batch=N"):
        import_model(FIXTURES / "gpt2.ts.onnx")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(b"this is not onnx at all", "not a readable ONNX model"), (None, "not found")],
)
def test_bad_files_exit_2_with_one_line(tmp_path, content, pattern):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "inspect-model", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 2
    assert pattern in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
