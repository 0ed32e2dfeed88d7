"""FLOPs and bytes moved per ONNX node, and the set of op types alpa-plan accepts.

FLOPs are counted the way Megatron and Alpa count them: 2·M·N·K for a contraction (one multiply
and one add), one per output element for elementwise math, a small constant per element for the
normalizations. Data-movement ops (Reshape, Transpose, Gather, ...) cost 0 FLOPs but move bytes,
which the roofline in ``cost_models.compute`` charges against memory bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir

from planner.graph import nbytes, numel, shape_of, tensor_inputs

FlopsFn = Callable[[ir.Node], float]


def _out(node: ir.Node) -> int:
    return numel(node.outputs[0])


def _matmul(node: ir.Node) -> float:
    a = shape_of(node.inputs[0])
    return 2.0 * _out(node) * (a[-1] if a else 1)


def _gemm(node: ir.Node) -> float:
    a = shape_of(node.inputs[0])
    trans_a = node.attributes.get_int("transA", 0)
    k = a[0] if trans_a else a[1]
    return 2.0 * _out(node) * k + (_out(node) if len(tensor_inputs(node)) > 2 else 0)


def _einsum(node: ir.Node) -> float:
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    lhs = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, value in zip(lhs, node.inputs, strict=False):
        shape = shape_of(value)
        letters = term.replace("...", "")
        for letter, dim in zip(letters, shape[len(shape) - len(letters) :], strict=False):
            sizes[letter] = dim
        if "..." in term:
            sizes["..."] = max(sizes.get("...", 1), math.prod(shape[: len(shape) - len(letters)]))
    return 2.0 * math.prod(sizes.values())


def _conv(node: ir.Node) -> float:
    w = shape_of(node.inputs[1])  # (C_out, C_in/group, k...)
    return 2.0 * _out(node) * math.prod(w[1:])


def _conv_transpose(node: ir.Node) -> float:
    w = shape_of(node.inputs[1])  # (C_in, C_out/group, k...): each input element fans out
    return 2.0 * numel(node.inputs[0]) * math.prod(w[1:])


def _per_input(factor: float) -> FlopsFn:
    return lambda node: factor * numel(node.inputs[0])


def _per_output(factor: float) -> FlopsFn:
    return lambda node: factor * _out(node)


def _zero(node: ir.Node) -> float:
    return 0.0


ELEMENTWISE = (
    "Abs Add And BitShift Ceil Celu Clip Cos Cosh Div Elu Equal Erf Exp Floor Gelu Greater "
    "GreaterOrEqual HardSigmoid HardSwish IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Mean "
    "Min Mish Mod Mul Neg Not Or PRelu Pow Reciprocal Relu Round Selu Sigmoid Sign Sin Sinh "
    "Softplus Softsign Sqrt Sub Sum Tan Tanh ThresholdedRelu Where Xor"
).split()
REDUCTIONS = (
    "ArgMax ArgMin ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin "
    "ReduceProd ReduceSum ReduceSumSquare"
).split()
DATA_MOVEMENT = (
    "Cast CastLike Concat Constant ConstantOfShape CumSum DepthToSpace Dropout Expand EyeLike "
    "Flatten Gather GatherElements GatherND Identity NonZero OneHot Pad Range Reshape Resize "
    "ScatterElements ScatterND Shape Size Slice SpaceToDepth Split Squeeze Tile TopK Transpose "
    "Trilu Unsqueeze"
).split()

OP_FLOPS: dict[str, FlopsFn] = {
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Einsum": _einsum,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,  # convolution input gradients (planner.grad_rules)
    "Softmax": _per_input(5),
    "LogSoftmax": _per_input(5),
    "LayerNormalization": _per_input(8),
    "BatchNormalization": _per_input(4),
    "InstanceNormalization": _per_input(8),
    "GroupNormalization": _per_input(8),
    "MaxPool": _per_output(9),
    "AveragePool": _per_output(9),
    "GlobalAveragePool": _per_input(1),
    "GlobalMaxPool": _per_input(1),
    **{op: _per_output(1) for op in ELEMENTWISE},
    **{op: _per_input(1) for op in REDUCTIONS},
    **{op: _zero for op in DATA_MOVEMENT},
}

# Ops alpa-plan accepts in an imported model: everything it can count, shard and differentiate.
SUPPORTED_OPS = frozenset(OP_FLOPS)
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def node_flops(node: ir.Node) -> float:
    """Floating-point operations of one execution of the node (0 for unknown ops)."""
    fn = OP_FLOPS.get(node.op_type)
    return fn(node) if fn is not None else 0.0


def node_bytes(node: ir.Node) -> int:
    """Bytes the node reads and writes (each distinct input once)."""
    ins = {id(v): v for v in tensor_inputs(node)}
    return sum(nbytes(v) for v in ins.values()) + sum(nbytes(v) for v in node.outputs)


def is_heavy(node: ir.Node) -> bool:
    """Contractions: the ops Alpa's layer clustering balances and its memory rows watch."""
    return node.op_type in ("MatMul", "Gemm", "Einsum", "Conv")
