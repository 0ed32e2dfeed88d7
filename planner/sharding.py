"""Sharding specs and the cost of converting between them.

A ``ShardingSpec`` says, per tensor dim, which mesh axes split it (``()`` = replicated,
``(0,)`` = split over axis 0, ``(0, 1)`` = split over both, axis 0 major), and over which
axes the tensor is a *partial sum* (each rank holds an addend). Text form, used in plans and
logs: dims joined by ",", each ``R`` or ``S`` + axis digits; a partial sum appends ``|P`` +
axes. ``"S0,R"``, ``"R,S01"``, ``"S1,R|P0"``; a scalar is ``""``.

``resharding_cost(src, dst, shape, dtype_bytes, mesh)`` models every conversion (Alpa charged
"infinity" for the ones it did not model) as a short program of collectives, simulated on
the spec so every step is one a rank can execute on its local block:

1. partial axes: reduce-scatter when ``dst`` splits a dim on that axis next, else all-reduce;
2. per dim, axes that ``dst`` does not keep as a prefix are removed innermost first: an
   all-to-all when the same axis is the next one ``dst`` adds to another dim, else an
   all-gather;
3. axes ``dst`` adds are slices of local data (free).

The cost constants shared by strategies and the ILP live here (``TIE_BREAK``,
``GRAD_BUCKET_BYTES``), so no cost code carries literals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from planner.mesh import LogicalMesh

# Seconds added per collective so that, among equal-byte programs, the one with fewer and
# cheaper-to-schedule collectives wins (Alpa: +0.1 all-gather, +0.01 all-reduce, +0.001 rest).
TIE_BREAK = {
    "all_gather": 1e-8,
    "all_reduce": 1e-9,
    "reduce_scatter": 1e-10,
    "all_to_all": 1e-10,
}

# Gradient synchronisation is bucketed (PyTorch DDP's default bucket): a gradient collective
# pays its bandwidth, and the latency of one collective per bucket shared by bytes.
GRAD_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class ShardingSpec:
    """Per-dim mesh axes (empty = replicated) and the axes holding a partial sum."""

    dims: tuple[tuple[int, ...], ...]
    partial: tuple[int, ...] = ()

    @staticmethod
    def replicated(rank: int) -> ShardingSpec:
        return ShardingSpec(((),) * rank)

    @staticmethod
    def parse(text: str) -> ShardingSpec:
        body, _, part = text.partition("|")
        dims: list[tuple[int, ...]] = []
        for item in body.split(",") if body else []:
            if item == "R":
                dims.append(())
            elif item.startswith("S") and item[1:].isdigit():
                dims.append(tuple(int(c) for c in item[1:]))
            else:
                raise ValueError(f"bad sharding spec {text!r}: dim {item!r} is not R or S<axes>")
        partial = tuple(int(c) for c in part[1:]) if part.startswith("P") else ()
        if part and not (part.startswith("P") and part[1:].isdigit()):
            raise ValueError(f"bad sharding spec {text!r}: partial part must be P<axes>")
        return ShardingSpec(tuple(dims), partial)

    def __str__(self) -> str:
        return _spec_text(self.dims, self.partial)

    @property
    def rank(self) -> int:
        return len(self.dims)

    def used_axes(self) -> frozenset[int]:
        return frozenset(a for d in self.dims for a in d) | frozenset(self.partial)

    def is_replicated(self) -> bool:
        return not self.partial and not any(self.dims)

    def shards(self, mesh_shape: Sequence[int]) -> int:
        """Into how many distinct blocks the tensor is cut (partial axes do not cut)."""
        return math.prod(mesh_shape[a] for d in self.dims for a in d)

    def valid_for(self, shape: Sequence[int], mesh_shape: Sequence[int]) -> bool:
        """Each axis used once, sizes divisible; the executor never pads."""
        axes = [a for d in self.dims for a in d] + list(self.partial)
        if len(axes) != len(set(axes)) or len(self.dims) != len(shape):
            return False
        return all(
            n % math.prod(mesh_shape[a] for a in d) == 0
            for n, d in zip(shape, self.dims, strict=True)
        )


@lru_cache(maxsize=1 << 14)
def _spec_text(dims: tuple[tuple[int, ...], ...], partial: tuple[int, ...]) -> str:
    body = ",".join("S" + "".join(map(str, d)) if d else "R" for d in dims)
    return body + ("|P" + "".join(map(str, partial)) if partial else "")


def local_shape(
    global_shape: Sequence[int], spec: ShardingSpec, mesh_shape: Sequence[int]
) -> tuple[int, ...]:
    """The block one rank holds."""
    if not spec.valid_for(global_shape, mesh_shape):
        raise ValueError(f"spec {spec} does not fit shape {tuple(global_shape)} on {mesh_shape}")
    return tuple(
        n // math.prod(mesh_shape[a] for a in d)
        for n, d in zip(global_shape, spec.dims, strict=True)
    )


@dataclass(frozen=True)
class ReshardStep:
    """One step of a resharding program: a collective along ``axis`` (or a free ``slice``).

    ``dim`` is the tensor dim gathered / scattered / sliced; ``to_dim`` the dim an all-to-all
    splits into; ``nbytes`` the per-rank bytes in the ``cost_models.collectives`` convention.
    """

    kind: str
    axis: int
    dim: int | None
    to_dim: int | None
    nbytes: float
    seconds: float


def collective_seconds(kind: str, axes: Sequence[int], nbytes: float, mesh: LogicalMesh) -> float:
    """Alpha-beta time plus the tie-break of one collective (0 when nothing moves)."""
    t = mesh.collective_cost(kind, axes, nbytes)
    return t + TIE_BREAK[kind] if t > 0 else 0.0


def bucketed_collective_seconds(
    kind: str, axes: Sequence[int], nbytes: float, mesh: LogicalMesh
) -> float:
    """A gradient collective fused into buckets: bandwidth time, plus the latency part in
    proportion ``nbytes / GRAD_BUCKET_BYTES`` (plus the tie-break)."""
    t = mesh.collective_cost(kind, axes, nbytes)
    if t <= 0:
        return 0.0
    bandwidth = mesh.without_latency().collective_cost(kind, axes, nbytes)
    return bandwidth + (t - bandwidth) * nbytes / GRAD_BUCKET_BYTES + TIE_BREAK[kind]


def resharding_cost(
    src: ShardingSpec,
    dst: ShardingSpec,
    shape: Sequence[int],
    dtype_bytes: int,
    mesh: LogicalMesh,
) -> tuple[float, list[ReshardStep]]:
    """Seconds and the collective program turning a ``src``-sharded tensor into ``dst``."""
    if src == dst:
        return 0.0, []
    state = [list(d) for d in src.dims]
    partial = list(src.partial)
    total = math.prod(shape) * dtype_bytes
    steps: list[ReshardStep] = []

    def local_bytes() -> float:
        return total / math.prod(mesh.shape[a] for d in state for a in d)

    def add(kind: str, axis: int, dim: int | None, to_dim: int | None, nbytes: float) -> None:
        seconds = collective_seconds(kind, [axis], nbytes, mesh) if kind != "slice" else 0.0
        steps.append(ReshardStep(kind, axis, dim, to_dim, nbytes, seconds))

    def next_wanted(dim: int) -> int | None:
        """The axis ``dst`` adds next to ``dim``, if ``state[dim]`` is a prefix of it."""
        want = dst.dims[dim]
        have = state[dim]
        if len(have) < len(want) and list(want[: len(have)]) == have:
            return want[len(have)]
        return None

    for axis in list(partial):
        if axis in dst.partial:
            continue
        partial.remove(axis)
        target = next((d for d in range(len(state)) if next_wanted(d) == axis), None)
        if target is not None and axis not in [a for d in state for a in d]:
            add("reduce_scatter", axis, target, None, local_bytes())
            state[target].append(axis)
        else:
            add("all_reduce", axis, None, None, local_bytes())
    for dim in range(len(state)):
        while list(dst.dims[dim][: len(state[dim])]) != state[dim]:
            axis = state[dim].pop()
            target = next(
                (d for d in range(len(state)) if d != dim and next_wanted(d) == axis), None
            )
            if target is not None:
                state[dim].append(axis)  # bytes held before the exchange
                nbytes = local_bytes()
                state[dim].pop()
                add("all_to_all", axis, dim, target, nbytes)
                state[target].append(axis)
            else:
                add("all_gather", axis, dim, None, local_bytes())
    for dim in range(len(state)):
        for axis in dst.dims[dim][len(state[dim]) :]:
            state[dim].append(axis)
            add("slice", axis, dim, None, local_bytes())
    for axis in dst.partial:
        if axis not in partial:  # R -> P: keep the value on one rank, zeros elsewhere (free)
            add("slice", axis, None, None, 0.0)
    return sum(s.seconds for s in steps), steps
