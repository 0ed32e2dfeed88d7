"""Gather-, scatter- and selection-style ops, Slice, Split and Concat.

Gather is an einsum whose gathered axis is contracted: splitting the table's gathered axis 0
over mesh axes gives the vocab-parallel embedding (each rank looks up the rows it owns, masks
the others to zero, and an all-reduce sums the partial outputs) and is marked with the local
program ``vocab_parallel`` so the executor offsets and masks the indices. Its gradient, a
scatter-add (ScatterElements, reduction add), is the same program run backwards: indices
split over the scattered rows leave a partial sum, the table's rows split is vocab-parallel.
Element-wise gathers/scatters and TopK split every dim but their axis where operands agree.
Slice, Split and Concat follow their operand but never split the axis they cut or join.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.graph import const_array, shape_of
from planner.mesh import LogicalMesh
from planner.strategies.base import Strategy, StrategyContext, register
from planner.strategies.einsum import einsum_strategies

_LETTERS = "abcdefghijklmnop"
_INDEX = "uvwxyz"
VOCAB_PARALLEL = "vocab_parallel"  # plan_schema.NodePlan.local


def _vocab_parallel(found: list[Strategy], axis: int) -> list[Strategy]:
    """Mark strategies that split the table's indexed axis 0 with the executor's program."""
    if axis:
        return found
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
        if s.inputs[0] is not None and s.inputs[0].dims[0]
        else s
        for s in found
    ]


@register("Gather")
def gather(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Rows split over axis 0 = vocab-parallel; another gathered axis is never split."""
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", 0) % rank
    data = _LETTERS[:rank]
    idx = _INDEX[: len(shape_of(node.inputs[1]))]
    out = data[:axis] + idx + data[axis + 1 :]
    blocked = {data[axis]} if axis else set()
    return _vocab_parallel(
        einsum_strategies(node, mesh, ctx, [data, idx], [out], unsplittable=blocked), axis
    )


def _elementwise_axis_terms(node: ir.Node, axis: int, count: int) -> tuple[list[str], set[str]]:
    """Terms of ``count`` same-rank operands (data first, then index-shaped ones): dims other
    than ``axis`` share a letter where the operands agree in size, else stay whole."""
    shapes = [shape_of(v) for v in node.inputs[:count]]
    data = _LETTERS[: len(shapes[0])]
    index = data[:axis] + "u" + data[axis + 1 :]
    blocked = {data[axis], "u"}
    for d in range(len(data)):
        if d != axis and any(s[d] != shapes[0][d] for s in shapes[1:]):
            blocked.add(data[d])
    return [data, *[index] * (count - 1)], blocked


@register("GatherElements")
def gather_elements(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """out[i][j] = data[index[i][j]][j] on axis 0: every other dim splits with the index."""
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", 0) % rank
    (data, index), blocked = _elementwise_axis_terms(node, axis, 2)
    return einsum_strategies(node, mesh, ctx, [data, index], [index], unsplittable=blocked)


@register("ScatterElements")
def scatter_elements(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Scatter-add: updates split over the scattered axis give a partial sum (the base arrives
    partial: one rank holds it); the base's rows split on axis 0 is vocab-parallel. Without
    a reduction, later writes win, so the axis stays whole everywhere."""
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", 0) % rank
    (data, index, updates), blocked = _elementwise_axis_terms(node, axis, 3)
    add = node.attributes.get_string("reduction", "none") == "add"
    if add:
        blocked -= {"u"} | ({data[axis]} if axis == 0 else set())
    found = einsum_strategies(
        node,
        mesh,
        ctx,
        [data, index, updates],
        [data],
        unsplittable=blocked,
        addends={0} if add else (),
    )
    return _vocab_parallel(found, axis)


@register("GatherND")
def gather_nd(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """``batch_dims=0``: index rows split with the output's leading dims, the gathered slices'
    trailing dims split with the data (tensor-parallel per gathered expert weight); the
    indexed dims themselves stay whole."""
    if node.attributes.get_int("batch_dims", 0):
        return []
    data, idx = (shape_of(v) for v in node.inputs[:2])
    depth = idx[-1]
    d = _LETTERS[: len(data)]
    i = _INDEX[: len(idx) - 1]
    return einsum_strategies(
        node, mesh, ctx, [d, i + "z"], [i + d[depth:]], unsplittable={*d[:depth], "z"}
    )


@register("TopK")
def top_k(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Values and indices follow the input; the selection axis stays whole."""
    rank = len(shape_of(node.inputs[0]))
    axis = node.attributes.get_int("axis", -1) % rank
    x = _LETTERS[:rank]
    out = x[:axis] + "u" + x[axis + 1 :]
    return einsum_strategies(node, mesh, ctx, [x, None], [out, out], unsplittable={x[axis], "u"})


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
