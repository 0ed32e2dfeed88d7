"""Strategies from einsum-style dimension roles (DTensor's einsum strategy, Alpa's dot handler).

An op is described by one index string per input and per output (``"bmk,bkn->bmn"``). Per
mesh axis a strategy either replicates, or splits one index letter:

- a letter kept in an output (batch, lhs-free, rhs-free) splits every operand that has it and
  the output: no communication (Alpa's ``SS = SR x RS``, ``Sb = Sb x Sb``);
- a contracted letter splits the operands that have it and leaves the output a partial sum
  over that axis (``SR = SS x SR``), resolved by the strategy's own all-reduce, or, when the
  context allows, by a reduce-scatter onto a free output dim (ZeRO-style gradients).

Strategies are the product of the per-axis choices. A letter an operand holds with size 1
(broadcast) leaves that operand's dim replicated; letters in ``unsplittable`` (convolution
windows, normalised axes) are never split. ``addends`` are inputs summed into the result
(Gemm's C, Conv's bias): under a partial output they arrive partial too (one rank adds them).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import onnx_ir as ir

from planner.graph import shape_of
from planner.mesh import LogicalMesh
from planner.sharding import ShardingSpec
from planner.strategies.base import (
    Collective,
    Strategy,
    StrategyContext,
    axis_assignments,
    local_bytes,
    make_strategy,
    register,
    strategy_name,
)


def _letter_sizes(terms: Sequence[str | None], values: Sequence[ir.Value | None]) -> dict:
    sizes: dict[str, int] = {}
    for term, value in zip(terms, values, strict=True):
        if term is None or value is None:
            continue
        for letter, n in zip(term, shape_of(value), strict=True):
            sizes[letter] = max(sizes.get(letter, 1), n)
    return sizes


def _spec(
    term: str, shape: Sequence[int], sizes: dict, assign: dict, partial: tuple[int, ...] = ()
) -> ShardingSpec:
    return ShardingSpec(
        tuple(assign.get(c, ()) if n == sizes[c] else () for c, n in zip(term, shape, strict=True)),
        partial,
    )


def einsum_strategies(
    node: ir.Node,
    mesh: LogicalMesh,
    ctx: StrategyContext,
    in_terms: Sequence[str | None],
    out_terms: Sequence[str],
    *,
    unsplittable: Collection[str] = (),
    addends: Collection[int] = (),
    reduce_op: str = "sum",
    contract_ok: bool = True,
) -> list[Strategy]:
    """All per-axis products of role-based splits, partial sums resolved in the strategy."""
    ins = list(node.inputs)
    sizes = _letter_sizes([*in_terms, *out_terms], [*ins, *node.outputs])
    out_shapes = [shape_of(v) for v in node.outputs]
    kept = {
        c
        for t, s in zip(out_terms, out_shapes, strict=True)
        for c, n in zip(t, s, strict=True)
        if n == sizes[c]
    }
    letters = sorted(
        c for c in sizes if sizes[c] > 1 and c not in unsplittable and (c in kept or contract_ok)
    )
    strategies: list[Strategy] = []
    for assign in axis_assignments(letters, mesh):
        if any(sizes[c] % mesh.size(axes) for c, axes in assign.items()):
            continue
        partial = tuple(sorted(a for c, axes in assign.items() if c not in kept for a in axes))
        in_specs = [
            None
            if v is None
            else ShardingSpec.replicated(len(shape_of(v)))
            if t is None
            else _spec(t, shape_of(v), sizes, assign, partial if i in addends else ())
            for i, (t, v) in enumerate(zip(in_terms, ins, strict=True))
        ]
        outs = [_spec(t, s, sizes, assign) for t, s in zip(out_terms, out_shapes, strict=True)]
        for out_specs, colls in _resolutions(node, mesh, ctx, outs, partial, reduce_op):
            name = strategy_name(in_specs, out_specs, colls)
            strategies.append(make_strategy(node, mesh, ctx, name, in_specs, out_specs, colls))
    return strategies


def _resolutions(
    node: ir.Node,
    mesh: LogicalMesh,
    ctx: StrategyContext,
    outs: list[ShardingSpec],
    partial: tuple[int, ...],
    reduce_op: str,
):
    """(output specs, collectives) ways to turn partial outputs into complete ones."""
    if not partial:
        yield outs, []
        return
    ar = [
        Collective("all_reduce", partial, local_bytes(v, s, mesh), f"out{i}", reduce_op)
        for i, (v, s) in enumerate(zip(node.outputs, outs, strict=True))
    ]
    yield outs, ar
    if not ctx.reduce_scatter or reduce_op != "sum" or len(outs) != 1:
        return
    shape = shape_of(node.outputs[0])
    for d, axes in enumerate(outs[0].dims):
        dims = list(outs[0].dims)
        dims[d] = (*axes, *partial)
        spec = ShardingSpec(tuple(dims))
        if not spec.valid_for(shape, mesh.shape):
            continue
        rs = Collective(
            "reduce_scatter", partial, local_bytes(node.outputs[0], outs[0], mesh), "out0", "sum", d
        )
        yield [spec], [rs]


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _batch_letters(n: int) -> str:
    return _LETTERS[:n]


@register("MatMul")
def matmul(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """``...mk,...kn->...mn`` with numpy broadcasting of the batch dims and 1-D operands."""
    a, b = (len(shape_of(v)) for v in node.inputs)
    out_rank = len(shape_of(node.outputs[0]))
    batch = _batch_letters(max(out_rank - 2, 0))
    ta = (batch[len(batch) - (a - 2) :] + "MK") if a >= 2 else "K"
    tb = (batch[len(batch) - (b - 2) :] + "KN") if b >= 2 else "K"
    out = batch + ("M" if a >= 2 else "") + ("N" if b >= 2 else "")
    return einsum_strategies(node, mesh, ctx, [ta, tb], [out])


@register("Gemm")
def gemm(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """``alpha·op(A)·op(B) + beta·C``; C broadcasts to (M, N) and is an addend."""
    ta = "KM" if node.attributes.get_int("transA", 0) else "MK"
    tb = "NK" if node.attributes.get_int("transB", 0) else "KN"
    terms: list[str | None] = [ta, tb]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        terms.append("MN"[2 - len(shape_of(node.inputs[2])) :])
    return einsum_strategies(node, mesh, ctx, terms, ["MN"], addends={2})


@register("Einsum")
def einsum(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """Any explicit-output equation; ellipses become fresh upper-case batch letters."""
    eq = node.attributes.get_string("equation", "").replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not rhs or any(t.count("...") > 1 for t in [*terms, rhs]):
        return []
    ell = max(
        (
            len(shape_of(v)) - len(t.replace("...", ""))
            for t, v in zip(terms, node.inputs, strict=True)
            if "..." in t
        ),
        default=0,
    )
    fresh = "".join(c for c in _LETTERS.upper() if c not in eq)[:ell]

    def expand(term: str, rank: int) -> str:
        n = rank - len(term.replace("...", ""))
        return term.replace("...", fresh[ell - n :])

    in_terms = [expand(t, len(shape_of(v))) for t, v in zip(terms, node.inputs, strict=True)]
    return einsum_strategies(
        node, mesh, ctx, in_terms, [expand(rhs, len(shape_of(node.outputs[0])))]
    )


def reduced_terms(rank: int, axes: Collection[int], keepdims: bool) -> tuple[str, str]:
    """Index strings of a reduction over ``axes`` (kept dims as size-1 in the output)."""
    term = _LETTERS[:rank]
    out = "".join(c for i, c in enumerate(term) if keepdims or i not in axes)
    return term, out


def elementwise_terms(node: ir.Node) -> tuple[list[str | None], str]:
    """Numpy broadcasting as einsum roles: inputs right-aligned on the output's letters."""
    rank = len(shape_of(node.outputs[0]))
    out = _LETTERS[:rank]
    terms = [None if v is None else out[rank - len(shape_of(v)) :] for v in node.inputs]
    return terms, out
