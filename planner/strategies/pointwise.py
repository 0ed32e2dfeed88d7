"""Elementwise, broadcasting, normalization and scan-like ops: follow their operand.

Pointwise ops are einsums whose letters all survive to the output (numpy broadcasting aligns
inputs right; a size-1 input dim stays replicated). Normalizations are pointwise with their
normalized axes unsplittable, so a rank computes complete statistics locally and the executor
runs the op unchanged. All of them are *followers*: the ILP builder merges them into the
producer of their largest input, as Alpa does.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.flops import ELEMENTWISE
from planner.graph import const_array, shape_of
from planner.mesh import LogicalMesh
from planner.strategies.base import Strategy, StrategyContext, register
from planner.strategies.einsum import einsum_strategies, elementwise_terms

POINTWISE = tuple(sorted({*ELEMENTWISE, "Identity", "Cast", "CastLike", "Dropout"}))


@register(*POINTWISE, follows=True)
def pointwise(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    terms, out = elementwise_terms(node)
    outs = [out[len(out) - len(shape_of(v)) :] for v in node.outputs]
    return einsum_strategies(node, mesh, ctx, terms, outs)


@register("Softmax", "LogSoftmax", follows=True)
def softmax(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Split any axis but the normalized one (opset >= 13: a single axis, default -1)."""
    terms, out = elementwise_terms(node)
    axis = node.attributes.get_int("axis", -1) % len(out)
    return einsum_strategies(node, mesh, ctx, terms, [out], unsplittable={out[axis]})


@register("LayerNormalization", follows=True)
def layer_norm(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Split leading axes only; scale/bias (and the stats outputs' size-1 dims) replicated."""
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", -1) % rank
    x = "abcdefgh"[:rank]
    norm = x[axis:]
    terms: list[str | None] = [x] + [None if v is None else norm for v in node.inputs[1:]]
    return einsum_strategies(
        node, mesh, ctx, terms, [x] * len(node.outputs), unsplittable=set(norm)
    )


@register("CumSum", "Trilu", follows=True)
def along_axes(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Pointwise except along the scanned axis (CumSum) or the matrix dims (Trilu)."""
    rank = len(shape_of(node.inputs[0]))
    x = "abcdefgh"[:rank]
    if node.op_type == "Trilu":
        whole = set(x[-2:])
    else:
        axis = const_array(node.inputs[1])
        whole = set(x) if axis is None else {x[int(axis.reshape(-1)[0]) % rank]}
    terms = [x, *[None] * (len(node.inputs) - 1)]
    return einsum_strategies(node, mesh, ctx, terms, [x], unsplittable=whole)


@register("DepthToSpace", "SpaceToDepth", follows=True)
def depth_space(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Channels and pixels are reshuffled together: only the batch splits."""
    return einsum_strategies(node, mesh, ctx, ["bcde"], ["bfgh"], unsplittable=set("cdefgh"))


@register("OneHot")
def one_hot(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """The output follows the indices; the new class axis stays whole."""
    rank = len(shape_of(node.inputs[0]))
    x = "abcdefgh"[:rank]
    axis = node.attributes.get_int("axis", -1) % (rank + 1)
    out = x[:axis] + "z" + x[axis:]
    return einsum_strategies(node, mesh, ctx, [x, None, None], [out], unsplittable={"z"})
