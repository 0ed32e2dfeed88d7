"""Every VJP rule against central finite differences in float64, on one-op graphs with random
shapes (broadcasting included). Float operands with >= 2 elements are parameters; the loss is
sum(output * R) for a fixed random R, so each rule sees a non-trivial upstream gradient."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from planner.errors import UserError
from planner.flops import SUPPORTED_OPS
from planner.grad_rules import GRAD_RULES, NON_DIFFERENTIABLE
from planner.importer import import_model
from planner.training import TrainingOptions, build_training_step, initial_state
from tests.gradcheck import finite_difference_errors

RNG = np.random.default_rng(0)
NO_RULE = {"GroupNormalization", "Resize"}  # build_training_step names them when on the path
# Celu has a rule but ONNX defines it for float32 only, so no float64 check here.


def r(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def pos(*shape: int) -> np.ndarray:
    return RNG.uniform(0.5, 2.0, shape)


def i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def build(
    tmp_path,
    op: str,
    inputs: list[np.ndarray | None],
    attrs: dict | None = None,
    outputs: int = 1,
    opset: int = 18,
    frozen: tuple[int, ...] = (),
) -> str:
    """Save a one-op model: float arrays become initializers (parameters) or, at the indices
    in ``frozen``, Constant nodes; the loss is the only output."""
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    inits = [
        onnx.numpy_helper.from_array(a, n)
        for i, (n, a) in enumerate(zip(names, inputs, strict=True))
        if a is not None and i not in frozen
    ]
    outs = [f"out{i}" for i in range(outputs)]
    nodes = [
        helper.make_node("Constant", [], [names[i]], value=onnx.numpy_helper.from_array(inputs[i]))
        for i in frozen
    ]
    nodes.append(helper.make_node(op, names, outs, **(attrs or {})))
    model = helper.make_model(
        helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", 0, None)], inits),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    terms = []
    for name in outs:
        t = types[name]
        if t.elem_type != onnx.TensorProto.DOUBLE:
            continue
        shape = [d.dim_value for d in t.shape.dim]
        weight = onnx.numpy_helper.from_array(r(*shape), f"w_{name}")
        nodes += [
            helper.make_node("Constant", [], [f"w_{name}"], value=weight),
            helper.make_node("Mul", [name, f"w_{name}"], [f"m_{name}"]),
            helper.make_node("ReduceSum", [f"m_{name}"], [f"s_{name}"], keepdims=0),
        ]
        terms.append(f"s_{name}")
    nodes.append(helper.make_node("Sum", terms, ["y"]))
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [])], inits
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return str(path)


def max_error(path: str) -> float:
    model = import_model(path)
    step = build_training_step(model, TrainingOptions(optimizer="sgd", emit_gradients=True))
    feeds = initial_state(model, step)
    errors = finite_difference_errors(step, feeds, per_param=40, rng=np.random.default_rng(1))
    assert errors, "no parameter received a gradient"
    return max(errors.values())


CASES = {
    # elementwise unary
    **{
        op: (op, [r(3, 4)], {})
        for op in (
            "Relu",
            "Tanh",
            "Sigmoid",
            "Erf",
            "Exp",
            "Neg",
            "Abs",
            "Sin",
            "Cos",
            "Sinh",
            "Cosh",
            "Softplus",
            "Softsign",
            "HardSwish",
            "Mish",
            "Identity",
            "Dropout",
            "Selu",
        )
    },
    **{op: (op, [pos(3, 4)], {}) for op in ("Log", "Sqrt", "Reciprocal")},
    "Tan": ("Tan", [r(3, 4) * 0.5], {}),
    "LeakyRelu": ("LeakyRelu", [r(3, 4)], {"alpha": 0.1}),
    "Elu": ("Elu", [r(3, 4)], {"alpha": 0.7}),
    "ThresholdedRelu": ("ThresholdedRelu", [r(3, 4)], {"alpha": 0.3}),
    "HardSigmoid": ("HardSigmoid", [r(3, 4)], {}),
    "Cast": ("Cast", [r(3, 4)], {"to": onnx.TensorProto.DOUBLE}),
    "Clip": ("Clip", [r(3, 4), np.array(-0.5), np.array(0.6)], {}),
    "Gelu": ("Gelu", [r(3, 4)], {}, 1, 20),
    "Gelu-tanh": ("Gelu", [r(3, 4)], {"approximate": "tanh"}, 1, 20),
    # binary with broadcasting
    "Add": ("Add", [r(2, 3, 4), r(4)], {}),
    "Sub": ("Sub", [r(2, 1, 4), r(3, 1)], {}),
    "Mul": ("Mul", [r(2, 3, 4), r(3, 1)], {}),
    "Div": ("Div", [r(3, 4), pos(2, 1, 4)], {}),
    "Pow": ("Pow", [pos(2, 3), r(3) * 0.5], {}),
    "Pow-const": ("Pow", [pos(2, 3), np.array(2.0)], {}),
    "Max": ("Max", [r(2, 3), r(3), r(2, 1)], {}),
    "Min": ("Min", [r(2, 3), r(3)], {}),
    "Sum": ("Sum", [r(2, 3), r(3), r(2, 1)], {}),
    "Mean": ("Mean", [r(2, 3), r(3)], {}),
    "Where": ("Where", [RNG.random((2, 3)) > 0.5, r(2, 3), r(3)], {}),
    "PRelu": ("PRelu", [r(2, 3, 4), r(3, 1)], {}),
    # contractions
    "MatMul": ("MatMul", [r(2, 3, 4), r(4, 5)], {}),
    "MatMul-vec-left": ("MatMul", [r(4), r(2, 4, 5)], {}),
    "MatMul-vec-right": ("MatMul", [r(2, 3, 4), r(4)], {}),
    "MatMul-batch-bcast": ("MatMul", [r(2, 1, 3, 4), r(3, 4, 2)], {}),
    "Gemm": ("Gemm", [r(3, 4), r(4, 5), r(5)], {"alpha": 0.5, "beta": 2.0}),
    "Gemm-transA": ("Gemm", [r(4, 3), r(4, 5), r(3, 5)], {"transA": 1}),
    "Gemm-transB": ("Gemm", [r(3, 4), r(5, 4)], {"transB": 1}),
    "Gemm-transAB": ("Gemm", [r(4, 3), r(5, 4), r(3, 1)], {"transA": 1, "transB": 1}),
    "Einsum": ("Einsum", [r(2, 3, 4), r(2, 4, 5)], {"equation": "bij,bjk->bik"}),
    "Einsum-sum": ("Einsum", [r(3, 4), r(4)], {"equation": "ij,j->i"}),
    "Einsum-private": ("Einsum", [r(3, 4), r(5)], {"equation": "ij,k->ik"}),
    "Einsum-ellipsis": ("Einsum", [r(2, 3, 4), r(4, 5)], {"equation": "...j,jk->...k"}),
    # reductions and normalizations
    **{
        op: (op, [r(2, 3, 4), i64([1])], {"keepdims": 0})
        for op in (
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceSumSquare",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSumExp",
        )
    },
    **{op: (op, [pos(2, 3, 4), i64([0, 2])], {}) for op in ("ReduceLogSum", "ReduceProd")},
    "ReduceMean-all": ("ReduceMean", [r(2, 3, 4)], {}),
    "Softmax": ("Softmax", [r(2, 3, 4)], {"axis": 1}),
    "LogSoftmax": ("LogSoftmax", [r(2, 3, 4)], {}),
    "LayerNormalization": ("LayerNormalization", [r(2, 3, 4), r(4), r(4)], {}),
    "LayerNormalization-axis1": ("LayerNormalization", [r(2, 3, 4), r(3, 4)], {"axis": 1}),
    "BatchNormalization": ("BatchNormalization", [r(4, 3, 2, 2), r(3), r(3), r(3), pos(3)], {}),
    "InstanceNormalization": ("InstanceNormalization", [r(2, 3, 5), r(3), r(3)], {}),
    # data movement
    "Reshape": ("Reshape", [r(2, 3, 4), i64([4, 6])], {}),
    "Transpose": ("Transpose", [r(2, 3, 4)], {"perm": [1, 2, 0]}),
    "Flatten": ("Flatten", [r(2, 3, 4)], {"axis": 2}),
    "Squeeze": ("Squeeze", [r(2, 1, 4), i64([1])], {}),
    "Unsqueeze": ("Unsqueeze", [r(2, 4), i64([0, 2])], {}),
    "Expand": ("Expand", [r(3, 1), i64([2, 3, 4])], {}),
    "Tile": ("Tile", [r(2, 3), i64([2, 3])], {}),
    "Slice": ("Slice", [r(5, 6), i64([1, -5]), i64([4, 100]), i64([0, 1])], {}),
    "Slice-strided": ("Slice", [r(5, 6), i64([4, 0]), i64([0, 6]), i64([0, 1]), i64([-2, 2])], {}),
    "Pad": ("Pad", [r(2, 3), i64([1, 0, 2, 1])], {}),
    "Concat": ("Concat", [r(2, 3), r(2, 1), r(2, 2)], {"axis": 1}),
    "Split": ("Split", [r(5, 2), i64([2, 3])], {"axis": 0}, 2),
    "Gather": ("Gather", [r(5, 3), i64([[0, 4], [4, -1]])], {}),
    "Gather-axis1": ("Gather", [r(2, 5, 3), i64([1, 1, 3])], {"axis": 1}),
    "GatherElements": ("GatherElements", [r(3, 4), i64([[0, 1, 1, 3], [3, 3, 2, 0]])], {"axis": 1}),
    "GatherND": ("GatherND", [r(3, 4, 2), i64([[0, 1], [2, 3], [0, 1]])], {}),
    "ScatterElements": ("ScatterElements", [r(3, 4), i64([[1, 0, 2, 3]]), r(1, 4)], {"axis": 1}),
    "ScatterND": ("ScatterND", [r(4, 3), i64([[1], [3]]), r(2, 3)], {}),
    "TopK": ("TopK", [r(3, 5), i64([2])], {}, 2),
    "CumSum": ("CumSum", [r(3, 4), np.array(1)], {"reverse": 1}),
    "Trilu": ("Trilu", [r(4, 4)], {"upper": 0}),
    "DepthToSpace": ("DepthToSpace", [r(1, 8, 2, 3)], {"blocksize": 2}),
    "DepthToSpace-CRD": ("DepthToSpace", [r(1, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"}),
    "SpaceToDepth": ("SpaceToDepth", [r(1, 2, 4, 6)], {"blocksize": 2}),
    # convolution and pooling
    "Conv": (
        "Conv",
        [r(2, 2, 7, 6), r(3, 2, 3, 2), r(3)],
        {"strides": [2, 1], "pads": [1, 0, 1, 1]},
    ),
    # the reference evaluator cannot run grouped ConvTranspose: weight gradient only
    "Conv-grouped": (
        "Conv",
        [r(2, 4, 7, 6), r(6, 2, 3, 2), r(6)],
        {"strides": [2, 1], "pads": [1, 0, 1, 1], "group": 2},
        1,
        18,
        (0,),
    ),
    "Conv-dilated-same": (
        "Conv",
        [r(1, 2, 6, 6), r(3, 2, 3, 3)],
        {"dilations": [2, 1], "auto_pad": "SAME_UPPER"},
    ),
    "Conv1d": ("Conv", [r(2, 3, 9), r(4, 3, 3)], {"strides": [2]}),
    "ConvTranspose": (
        "ConvTranspose",
        [r(2, 3, 4, 4), r(3, 2, 3, 3), r(2)],
        {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    "MaxPool": (
        "MaxPool",
        [r(2, 3, 7, 7)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    "AveragePool": (
        "AveragePool",
        [r(2, 3, 6, 6)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    "AveragePool-include-pad": (
        "AveragePool",
        [r(1, 2, 5, 5)],
        {"kernel_shape": [2, 2], "pads": [1, 0, 0, 1], "count_include_pad": 1},
    ),
    "GlobalAveragePool": ("GlobalAveragePool", [r(2, 3, 4, 4)], {}),
    "GlobalMaxPool": ("GlobalMaxPool", [r(2, 3, 4, 4)], {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_finite_differences(tmp_path, case):
    op, inputs, attrs, *rest = CASES[case]
    assert max_error(build(tmp_path, op, inputs, attrs, *rest)) < 1e-5


def test_rms_norm_as_exported(tmp_path):
    """Llama's RMSNorm: x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)) * w."""
    x, w = r(2, 3, 4), r(4)
    init = [
        onnx.numpy_helper.from_array(a, n)
        for n, a in [
            ("x", x),
            ("w", w),
            ("two", np.array(2.0)),
            ("eps", np.array(1e-6)),
            ("axes", i64([-1])),
        ]
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["n"]),
        helper.make_node("Mul", ["n", "w"], ["o"]),
        helper.make_node("ReduceSumSquare", ["o"], ["y"], keepdims=0),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", 11, [])], init),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.save(model, tmp_path / "m.onnx")
    assert max_error(str(tmp_path / "m.onnx")) < 1e-5


def test_every_supported_op_has_a_rule_or_is_non_differentiable():
    assert SUPPORTED_OPS - set(GRAD_RULES) - NON_DIFFERENTIABLE == NO_RULE


def test_op_without_rule_on_the_gradient_path_is_named(tmp_path, monkeypatch):
    monkeypatch.delitem(GRAD_RULES, "Tanh")
    path = build(tmp_path, "Tanh", [r(2, 3)])
    with pytest.raises(UserError, match=r"no gradient rule .*Tanh x1 \(first node: "):
        build_training_step(import_model(path), TrainingOptions())
