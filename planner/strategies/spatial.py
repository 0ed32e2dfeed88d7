"""Convolution-family ops: convolution and transposed convolution, pooling, batch and
instance normalization.

Batch and channel dims split; windows and spatial dims never do, so a rank runs the op
unchanged on its block. Two exceptions keep the executor exact: batch normalization in
training mode computes statistics over the batch (only channels split), and a MaxPool that
also returns Indices numbers them over the whole input (the gradient scatters by them), so it
stays replicated.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.graph import shape_of
from planner.mesh import LogicalMesh
from planner.strategies.base import Strategy, StrategyContext, register
from planner.strategies.einsum import einsum_strategies

_SPATIAL_IN, _SPATIAL_W, _SPATIAL_OUT = "klmn", "pqrs", "uvwx"


def _spatial(node: ir.Node) -> tuple[str, str, str]:
    rank = len(shape_of(node.inputs[0])) - 2
    return _SPATIAL_IN[:rank], _SPATIAL_W[:rank], _SPATIAL_OUT[:rank]


@register("Conv", "ConvTranspose")
def conv(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Batch, out-channel and (ungrouped) in-channel splits, the in-channel one leaving a
    partial sum; spatial windows never split. The weight is (C_out, C_in/group, k...) for
    Conv and (C_in, C_out/group, k...) for ConvTranspose."""
    xs, ws, ys = _spatial(node)
    weight = "oc" if node.op_type == "Conv" else "co"
    terms: list[str | None] = ["nc" + xs, weight + ws]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        terms.append("o")
    grouped = node.attributes.get_int("group", 1) != 1
    blocked = set(xs + ws + ys) | ({"c", "o"} if grouped else set())
    return einsum_strategies(node, mesh, ctx, terms, ["no" + ys], unsplittable=blocked, addends={2})


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    xs, _, ys = _spatial(node)
    if len(node.outputs) > 1:  # MaxPool Indices: flat positions in the whole input
        return []
    return einsum_strategies(node, mesh, ctx, ["bc" + xs], ["bc" + ys], unsplittable=set(xs + ys))


@register("BatchNormalization", "InstanceNormalization", follows=True)
def normalization(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Per-channel parameters and running statistics split with the channels."""
    xs, _, _ = _spatial(node)
    batch_stats = node.op_type == "BatchNormalization" and node.attributes.get_int(
        "training_mode", 0
    )
    per_sample = node.op_type == "InstanceNormalization"
    blocked = set(xs) if per_sample or batch_stats else set()
    if batch_stats:
        blocked.add("b")
    terms = ["bc" + xs] + ["c" if v is not None else None for v in node.inputs[1:]]
    outs = ["bc" + xs] + ["c"] * (len(node.outputs) - 1)
    return einsum_strategies(node, mesh, ctx, terms, outs, unsplittable=blocked)
