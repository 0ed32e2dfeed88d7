"""View ops (Reshape, Flatten, Squeeze, Unsqueeze, Transpose) by a dim-map algebra.

As DTensor's ``view_groups``: a reshape is cut into groups of input dims and output dims with
equal products (size-1 dims stand alone). A rank's block stays a contiguous block of a group
only when the split is on the group's leftmost input dim and lands on its leftmost output
dim, which must divide by the shard count; any other split is not a view and is not offered.
Transpose permutes the spec; Expand is pointwise broadcasting; Pad and Tile follow on the
dims they leave alone. All are followers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir

from planner.graph import const_array, shape_of
from planner.mesh import LogicalMesh
from planner.sharding import ShardingSpec
from planner.strategies.base import (
    Strategy,
    StrategyContext,
    all_specs,
    make_strategy,
    register,
    strategy_name,
)
from planner.strategies.einsum import einsum_strategies, elementwise_terms


def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs (input dims, output dims) of equal element count, in order; [] if sizes differ."""
    if math.prod(src) != math.prod(dst):
        return []
    ins = [i for i, n in enumerate(src) if n != 1]
    outs = [o for o, n in enumerate(dst) if n != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = o = 0
    while i < len(ins) and o < len(outs):
        gi, go = [ins[i]], [outs[o]]
        pi, po = src[ins[i]], dst[outs[o]]
        i, o = i + 1, o + 1
        while pi != po:
            if pi < po:
                gi.append(ins[i])
                pi *= src[ins[i]]
                i += 1
            else:
                go.append(outs[o])
                po *= dst[outs[o]]
                o += 1
        groups.append((gi, go))
    return groups


def map_view_spec(
    spec: ShardingSpec, src: Sequence[int], dst: Sequence[int], mesh_shape: Sequence[int]
) -> ShardingSpec | None:
    """The output spec of a view of a ``spec``-sharded input, or None if it is not a view."""
    out: list[tuple[int, ...]] = [()] * len(dst)
    mapped = set()
    for gi, go in view_groups(src, dst):
        axes = spec.dims[gi[0]]
        if any(spec.dims[d] for d in gi[1:]):
            return None
        if axes:
            if dst[go[0]] % math.prod(mesh_shape[a] for a in axes):
                return None
            out[go[0]] = axes
        mapped.update(gi)
    if any(spec.dims[d] for d in range(len(src)) if d not in mapped):
        return None
    return ShardingSpec(tuple(out), spec.partial)


def view_strategies(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    src, dst = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    extra = [
        None if v is None else ShardingSpec.replicated(len(shape_of(v))) for v in node.inputs[1:]
    ]
    strategies = []
    for spec in all_specs(src, mesh):
        out = map_view_spec(spec, src, dst, mesh.shape)
        if out is None:
            continue
        ins = [spec, *extra]
        strategies.append(make_strategy(node, mesh, ctx, strategy_name(ins, [out]), ins, [out]))
    return strategies


register("Reshape", "Flatten", "Squeeze", "Unsqueeze", follows=True)(view_strategies)


@register("Transpose", follows=True)
def transpose(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    rank = len(shape_of(node.inputs[0]))
    perm = node.attributes.get_ints("perm", list(reversed(range(rank))))
    strategies = []
    for spec in all_specs(shape_of(node.inputs[0]), mesh):
        out = ShardingSpec(tuple(spec.dims[p] for p in perm))
        strategies.append(
            make_strategy(node, mesh, ctx, strategy_name([spec], [out]), [spec], [out])
        )
    return strategies


@register("Expand", follows=True)
def expand(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Broadcasting; the executor rewrites the target shape input to the local shape."""
    terms, out = elementwise_terms(node)
    return einsum_strategies(node, mesh, ctx, [terms[0], None], [out])


def _grown_dims(node: ir.Node) -> set[int]:
    """Dims whose size the op changes (by its constant pads or repeats); all when unknown."""
    src, dst = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    known = all(v is None or const_array(v) is not None for v in node.inputs[1:])
    return {d for d in range(len(src)) if not known or src[d] != dst[d]}


@register("Pad", "Tile", follows=True)
def pad_or_tile(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Follow the input on the dims the op leaves alone; padded or tiled dims stay whole."""
    terms, out = elementwise_terms(node)
    grown = {out[d] for d in _grown_dims(node)}
    ins = [terms[0], *[None] * (len(node.inputs) - 1)]
    return einsum_strategies(node, mesh, ctx, ins, [out], unsplittable=grown)
