"""Resharding inside one mesh: turn a local block under ``src`` into the block under ``dst``.

The program is the one ``planner.sharding.resharding_cost`` prices, so what runs is what was
costed: (1) partial axes are reduce-scattered when ``dst`` splits a dim on that axis next,
else all-reduced; (2) per dim, axes ``dst`` does not keep as a prefix are removed innermost
first, by an all-to-all when ``dst`` adds that axis to another dim next, else an all-gather;
(3) axes ``dst`` adds are local slices; a partial axis ``dst`` adds keeps the value on the
first rank of that axis and zeros elsewhere. Every collective runs over one mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planner.sharding import ShardingSpec
from runtime.comm import Communicator, array_module, contiguous
from runtime.mesh import RankMesh


@dataclass(frozen=True)
class Step:
    kind: str  # all_reduce | reduce_scatter | all_gather | all_to_all | slice | zero
    axis: int
    dim: int | None = None
    to_dim: int | None = None


def program(src: ShardingSpec, dst: ShardingSpec) -> list[Step]:
    """The single-axis steps from ``src`` to ``dst`` (empty when they are equal)."""
    if src.dims == dst.dims and set(src.partial) == set(dst.partial):
        return []
    if src.rank != dst.rank:
        raise ValueError(f"cannot reshard {src} to {dst}: different ranks")
    state = [list(d) for d in src.dims]
    steps: list[Step] = []

    def next_wanted(dim: int) -> int | None:
        want, have = dst.dims[dim], state[dim]
        if len(have) < len(want) and list(want[: len(have)]) == have:
            return want[len(have)]
        return None

    for axis in src.partial:
        if axis in dst.partial:
            continue
        target = next((d for d in range(len(state)) if next_wanted(d) == axis), None)
        if target is not None and axis not in [a for d in state for a in d]:
            steps.append(Step("reduce_scatter", axis, target))
            state[target].append(axis)
        else:
            steps.append(Step("all_reduce", axis))
    for dim in range(len(state)):
        while list(dst.dims[dim][: len(state[dim])]) != state[dim]:
            axis = state[dim].pop()
            target = next(
                (d for d in range(len(state)) if d != dim and next_wanted(d) == axis), None
            )
            if target is not None:
                steps.append(Step("all_to_all", axis, dim, target))
                state[target].append(axis)
            else:
                steps.append(Step("all_gather", axis, dim))
    for dim in range(len(state)):
        for axis in dst.dims[dim][len(state[dim]) :]:
            state[dim].append(axis)
            steps.append(Step("slice", axis, dim))
    steps += [Step("zero", axis) for axis in dst.partial if axis not in src.partial]
    return steps


Fn = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _step_fn(s: Step, mesh: RankMesh, device: int, comm: Communicator) -> Fn | None:
    """One step bound to this rank's group and coords (None: nothing to do here)."""
    group = tuple(mesh.group(device, (s.axis,)))
    if s.kind == "all_reduce":
        return lambda x: comm.all_reduce(x, group, "sum")
    if s.kind == "reduce_scatter":
        return lambda x: comm.reduce_scatter(x, group, s.dim, "sum")
    if s.kind == "all_gather":
        return lambda x: comm.all_gather(x, group, s.dim)
    if s.kind == "all_to_all":
        # the block splits along the dim that gains the axis and joins along the one that
        # loses it
        return lambda x: comm.all_to_all(x, group, s.to_dim, s.dim)
    coord = mesh.coords(device)[s.axis]
    if s.kind == "slice":
        n, lead = mesh.shape[s.axis], (slice(None),) * s.dim

        def take(x: np.ndarray) -> np.ndarray:
            size = x.shape[s.dim] // n
            return contiguous(x[(*lead, slice(coord * size, (coord + 1) * size))])

        return take
    # "zero": only the first rank of the axis keeps the addend
    return (lambda x: array_module(x).zeros_like(x)) if coord else None


def bind(steps: list[Step], mesh: RankMesh, device: int, comm: Communicator) -> Fn:
    """A resharding program as one callable on this rank's block, every group, index and
    coordinate resolved once (the executor calls it every micro-batch)."""
    return compose([f for f in (_step_fn(s, mesh, device, comm) for s in steps) if f])


def compose(fns: list[Fn]) -> Fn:
    """``fns`` applied in order, as one callable."""
    if not fns:
        return _identity
    if len(fns) == 1:
        return fns[0]

    def chain(x: np.ndarray) -> np.ndarray:
        for f in fns:
            x = f(x)
        return x

    return chain


def apply(
    x: np.ndarray, steps: list[Step], mesh: RankMesh, device: int, comm: Communicator
) -> np.ndarray:
    """Run a resharding program on this rank's block."""
    return bind(steps, mesh, device, comm)(x)
