"""Gather (incl. Megatron's vocab-parallel embedding), Slice, Split and Concat.

Gather is an einsum whose gathered axis is contracted: splitting the table's gathered axis
over mesh axes gives the vocab-parallel embedding (each rank looks up the rows it owns, masks
the others to zero, and an all-reduce sums the partial outputs) and is marked with the local
kind ``vocab_parallel_gather`` so the executor offsets and masks the indices. Slice, Split
and Concat follow their operand but never split the axis they cut or join.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.graph import const_array, shape_of
from planner.mesh import LogicalMesh
from planner.strategies.base import Strategy, StrategyContext, register
from planner.strategies.einsum import einsum_strategies

_LETTERS = "abcdefghijklmnop"
_INDEX = "uvwxyz"
VOCAB_PARALLEL = "vocab_parallel_gather"


@register("Gather")
def gather(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", 0) % rank
    data = _LETTERS[:rank]
    idx = _INDEX[: len(shape_of(node.inputs[1]))]
    out = data[:axis] + idx + data[axis + 1 :]
    found = einsum_strategies(node, mesh, ctx, [data, idx], [out])
    return [
        Strategy(
            f"{s.name} [{VOCAB_PARALLEL}]",
            s.inputs,
            s.outputs,
            s.compute,
            s.comm,
            s.collectives,
            s.memory,
            VOCAB_PARALLEL,
        )
        if s.inputs[0] is not None and s.inputs[0].dims[axis]
        else s
        for s in found
    ]


def _same_letters(node: ir.Node, blocked_dims: set[int]) -> tuple[list, str, set[str]]:
    rank = len(shape_of(node.outputs[0]))
    term = _LETTERS[:rank]
    terms = [
        term if v is not None and len(shape_of(v)) == rank and i == 0 else None
        for i, v in enumerate(node.inputs)
    ]
    return terms, term, {term[d] for d in blocked_dims}


@register("Slice", follows=True)
def slice_(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Split only dims the slice keeps whole (same size, no reversal)."""
    src, dst = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    cut = {d for d in range(len(src)) if src[d] != dst[d]}
    if steps is not None and (steps < 0).any():
        cut = set(range(len(src)))
    terms, term, blocked = _same_letters(node, cut)
    return einsum_strategies(node, mesh, ctx, terms, [term], unsplittable=blocked)


@register("Split", follows=True)
def split(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", 0) % rank
    terms, term, blocked = _same_letters(node, {axis})
    return einsum_strategies(
        node, mesh, ctx, terms, [term] * len(node.outputs), unsplittable=blocked
    )


@register("Concat", follows=True)
def concat(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    rank = len(shape_of(node.outputs[0]))
    axis = node.attributes.get_int("axis", 0) % rank
    term = _LETTERS[:rank]
    return einsum_strategies(
        node, mesh, ctx, [term] * len(node.inputs), [term], unsplittable={term[axis]}
    )


@register("ScatterND")
def scatter_nd_add(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Scatter-add (embedding gradients): updates split over index dims scatter locally into
    a partial sum (the base tensor arrives partial: one rank holds it), then an all-reduce or
    reduce-scatter; other reductions keep the scattered dims whole."""
    data, idx = (len(shape_of(v)) for v in node.inputs[:2])
    depth = shape_of(node.inputs[1])[-1]
    d = _LETTERS[:data]
    i = _INDEX[: idx - 1]
    terms = [d, i + "z", i + d[depth:]]
    add = node.attributes.get_string("reduction", "none") == "add"
    return einsum_strategies(
        node,
        mesh,
        ctx,
        terms,
        [d],
        addends={0} if add else (),
        unsplittable=set(d[:depth]) | ({"z"} if add else set(i + "z")),
    )
