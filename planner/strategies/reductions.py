"""Reductions: split kept axes freely; a split reduced axis leaves a partial result.

Sum-like reductions (sum, mean, max, min, sum of squares) combine partial results with one
all-reduce of that reduce op (Alpa's reduce rule); the others (L1/L2 norms, log-sum-exp,
products, arg-max/min) are not decomposable that way, so their reduced axes stay whole.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.graph import const_array, shape_of
from planner.mesh import LogicalMesh
from planner.strategies.base import Strategy, StrategyContext, register
from planner.strategies.einsum import einsum_strategies, reduced_terms

COMBINE = {
    "ReduceSum": "sum",
    "ReduceMean": "mean",
    "ReduceMax": "max",
    "ReduceMin": "min",
    "ReduceSumSquare": "sum",
}
WHOLE = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "ArgMax",
    "ArgMin",
)


def reduced_axes(node: ir.Node) -> list[int]:
    rank = len(shape_of(node.inputs[0]))
    if node.op_type in ("ArgMax", "ArgMin"):
        return [node.attributes.get_int("axis", 0) % rank]
    attr = node.attributes.get("axes")
    axes = list(attr.value) if attr is not None else None
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        data = const_array(node.inputs[1])
        axes = None if data is None else [int(a) for a in data.ravel()]
    if not axes:
        noop = node.attributes.get_int("noop_with_empty_axes", 0)
        return [] if noop else list(range(rank))
    return [a % rank for a in axes]


@register(*COMBINE, *WHOLE, follows=True)
def reduce(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    axes = reduced_axes(node)
    keep = bool(node.attributes.get_int("keepdims", 1))
    term, out = reduced_terms(len(shape_of(node.inputs[0])), axes, keep)
    terms: list[str | None] = [term] + [None] * (len(node.inputs) - 1)
    blocked = set() if node.op_type in COMBINE else {term[a] for a in axes}
    return einsum_strategies(
        node,
        mesh,
        ctx,
        terms,
        [out],
        unsplittable=blocked,
        reduce_op=COMBINE.get(node.op_type, "sum"),
    )
