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
from onnx import NodeProto, helper

from planner.sharding import ShardingSpec
from runtime.comm import Communicator, array_module, contiguous
from runtime.mesh import RankMesh

LOCAL = ("slice", "zero")  # steps without communication: always a program's suffix
LOCAL_NODE = "reshard/"  # name prefix of the nodes ``local_nodes`` makes


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


def split(steps: list[Step]) -> tuple[list[Step], list[Step]]:
    """(collective prefix, local suffix) of a program."""
    k = len(steps)
    while k and steps[k - 1].kind in LOCAL:
        k -= 1
    return steps[:k], steps[k:]


def local_nodes(
    steps: list[Step],
    src: str,
    dst: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    mesh: RankMesh,
    device: int,
) -> tuple[list[NodeProto], dict[str, np.ndarray]]:
    """The local ``steps`` (slices, zeros) from ``src`` to ``dst`` as ONNX nodes and their
    constants, for this rank: run inside the session that reads ``dst``, they cost no Python
    dispatch, no numpy copy and no session boundary. ``shape``: ``dst``'s block shape."""
    shape = list(shape)
    for s in steps:
        if s.kind == "slice":
            assert s.dim is not None
            shape[s.dim] *= mesh.shape[s.axis]
    nodes: list[NodeProto] = []
    consts: dict[str, np.ndarray] = {}
    x = src
    coords = mesh.coords(device)
    for k, s in enumerate(steps):
        name = f"{LOCAL_NODE}{dst}/{k}"
        if s.kind == "slice":
            assert s.dim is not None
            size = shape[s.dim] // mesh.shape[s.axis]
            shape[s.dim] = size
            start = coords[s.axis] * size
            for part, value in (("starts", start), ("ends", start + size), ("axes", s.dim)):
                consts[f"{name}/{part}"] = np.array([value], np.int64)
            inputs = [x, f"{name}/starts", f"{name}/ends", f"{name}/axes"]
            nodes.append(helper.make_node("Slice", inputs, [f"{name}/out"], name=name))
        elif coords[s.axis]:  # "zero": only the first rank of the axis keeps the addend
            zero = helper.make_tensor("zero", helper.np_dtype_to_tensor_dtype(dtype), [1], [0])
            shaped = f"{name}/shape"
            nodes.append(helper.make_node("Shape", [x], [shaped], name=f"{name}/Shape"))
            nodes.append(
                helper.make_node("ConstantOfShape", [shaped], [f"{name}/out"], name, value=zero)
            )
        else:
            continue
        x = f"{name}/out"
    if nodes:
        nodes[-1].output[0] = dst
    else:  # nothing to do on this rank
        nodes.append(helper.make_node("Identity", [src], [dst], name=f"{LOCAL_NODE}{dst}"))
    return nodes, consts


def apply(
    x: np.ndarray, steps: list[Step], mesh: RankMesh, device: int, comm: Communicator
) -> np.ndarray:
    """Run a resharding program on this rank's block."""
    return bind(steps, mesh, device, comm)(x)
