"""Bucketed gradient synchronisation, as DDP does it.

Every gradient's deferred collectives run once per step, after accumulation, so they need not
run one tensor at a time: gradients whose next collective is the same (kind, group, reduce
op) and dtype are flattened into one buffer of up to ``BUCKET_BYTES`` and synchronised with
one call. That pays the collective's fixed latency once per bucket instead of once per
tensor, which dominates for the many small gradients (biases, norms) of a model. Buffers are
built with the tensors' own array module, so GPU gradients are bucketed on the GPU.

The bucket layout depends only on the tensors' shapes, dtypes and collectives, which are the
same every step: ``layout`` works it out once (members, offsets, result shapes) and ``run``
replays it, so a step pays the copies and the calls, not the bookkeeping. Buckets are formed
and issued in tensor order, which every rank of a stage shares, so the ranks of a group issue
the same buckets in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import is_
from types import ModuleType

import numpy as np

from runtime.comm import Communicator, array_module
from runtime.partition import CollectiveOp

BUCKET_BYTES = 25 << 20
BUCKETED = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def bind(op: CollectiveOp, comm: Communicator) -> Callable[[np.ndarray], np.ndarray]:
    """``op`` as a callable on one tensor (resolved once, called every micro-batch)."""
    if op.kind == "all_reduce":
        return lambda x: comm.all_reduce(x, op.group, op.reduce)
    if op.kind == "all_gather":
        return lambda x: comm.all_gather(x, op.group, op.dim)
    if op.kind == "reduce_scatter":
        return lambda x: comm.reduce_scatter(x, op.group, op.dim, op.reduce)
    return lambda x: comm.broadcast(x, op.group, op.group[0])


def run_collective(op: CollectiveOp, x: np.ndarray, comm: Communicator) -> np.ndarray:
    return bind(op, comm)(x)


def result_shape(op: CollectiveOp, shape: tuple[int, ...]) -> tuple[int, ...]:
    p = len(op.group)
    if p == 1 or op.kind not in ("all_gather", "reduce_scatter"):
        return shape
    d = op.dim
    assert d is not None
    n = shape[d] * p if op.kind == "all_gather" else shape[d] // p
    return (*shape[:d], n, *shape[d + 1 :])


def _spans(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    ends = np.cumsum(sizes, dtype=np.int64).tolist()
    return tuple((end - n, end) for n, end in zip(sizes, ends, strict=True))


@dataclass(frozen=True)
class Bucket:
    """One call: tensors ``members`` (indices into the synced list) whose next collectives
    ``ops`` share kind, group and reduce op, and that share a dtype."""

    members: tuple[int, ...]
    ops: tuple[CollectiveOp, ...]
    shapes: tuple[tuple[int, ...], ...]  # the members' shapes before the call
    spans: tuple[tuple[int, int], ...]  # each member's part of the flat buffer the call moves
    results: tuple[tuple[int, ...], ...]  # and after


def _leading(op: CollectiveOp, shape: tuple[int, ...]) -> int:
    """The size of ``shape``'s dims before the one ``op`` splits or joins (1: none)."""
    return math.prod(shape[: op.dim]) if op.dim else 1


def _bucket(members: list[int], ops: list[CollectiveOp], shapes: list[tuple[int, ...]]):
    # tensors split along their first dim first: a reduce-scatter packs those in one call;
    # then by shape, so that tensors of one shape lie side by side and an all-gather unpacks
    # them with one copy (``_runs``)
    order = sorted(
        range(len(members)),
        key=lambda j: (_leading(ops[j], shapes[j]) != 1, ops[j].dim or 0, shapes[j]),
    )
    members, ops, shapes = ([x[j] for j in order] for x in (members, ops, shapes))
    p = len(ops[0].group)
    # reduce_scatter packs piece r of every tensor into row r: spans are per row
    sizes = [math.prod(s) // (p if ops[0].kind == "reduce_scatter" else 1) for s in shapes]
    results = tuple(result_shape(o, s) for o, s in zip(ops, shapes, strict=True))
    return Bucket(tuple(members), tuple(ops), tuple(shapes), _spans(sizes), results)


def layout(
    ops: Sequence[Sequence[CollectiveOp]],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[np.dtype],
) -> list[Bucket]:
    """The buckets that apply each tensor's collectives ``ops[i]`` (in order): the k-th
    collectives of all tensors run before any (k+1)-th; a bucket is issued once it holds
    ``BUCKET_BYTES``, the rest in order of their first tensor."""
    shapes = [tuple(s) for s in shapes]
    itemsize = [np.dtype(t).itemsize for t in dtypes]
    out: list[Bucket] = []
    for k in range(max((len(chain) for chain in ops), default=0)):
        ready: list[list[int]] = []
        filling: dict[tuple, tuple[list[int], int]] = {}
        for i, chain in enumerate(ops):
            if k >= len(chain):
                continue
            key = (chain[k].kind, chain[k].group, chain[k].reduce, np.dtype(dtypes[i]).str)
            members, size = filling.get(key, ([], 0))
            members.append(i)
            filling[key] = (members, size + math.prod(shapes[i]) * itemsize[i])
            if filling[key][1] >= BUCKET_BYTES:
                ready.append(filling.pop(key)[0])
        ready.extend(members for members, _ in filling.values())
        for members in ready:
            bucket = _bucket(members, [ops[i][k] for i in members], [shapes[i] for i in members])
            out.append(bucket)
            for i, shape in zip(members, bucket.results, strict=True):
                shapes[i] = shape
    return out


Packed = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Placed:
    """A bound bucket whose members' producers may write them straight into ``places``
    (views of the buffer the call sends, in the members' shapes): a call whose tensors are
    those very arrays packs nothing, as DDP's gradients are views of its buckets."""

    call: Packed
    places: list[np.ndarray]

    def __call__(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        return self.call(xs)


def bind_bucket(
    b: Bucket, dtype: np.dtype, xp: ModuleType, comm: Communicator, reuse: bool = False
) -> Packed:
    """``run_collective(b.ops[i], xs[i])`` for every member of ``b`` as one call, every
    offset, view and reshape worked out here, once. The buffers a call packs into (and an
    all-gather's receive buffer) are used up within the call and kept from call to call.
    ``reuse``: so are the results, or the buffers they are views of, valid until the next
    call (see ``Synchronizer``); otherwise each call allocates them."""
    op = b.ops[0]
    p = len(op.group)
    # under ``reuse`` a lone tensor is all-gathered or all-reduced through kept buffers too
    # (e.g. the loss, when the gradients are reduce-scattered), so its result is kept
    kept = reuse and op.kind in ("all_gather", "all_reduce")
    if p == 1 or (len(b.members) == 1 and not kept):
        ops = b.ops
        return lambda xs: [run_collective(o, x, comm) for o, x in zip(ops, xs, strict=True)]
    total = b.spans[-1][1]
    # each member's (leading size, chunk) so that x.reshape(pre, p, -1) splits it along its dim
    pres = [_leading(o, s) for o, s in zip(b.ops, b.shapes, strict=True)]
    if op.kind == "reduce_scatter":
        # rank r's row holds piece r (along its dim) of every tensor, flattened, in order:
        # each tensor is copied once, straight into its columns; those split along their
        # first dim (``_bucket`` puts them first) with one call
        ones = pres.count(1)
        width = b.spans[ones - 1][1] if ones else 0
        splits = [(pre, p, -1) for pre in pres[ones:]]

        def rows(send: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
            return send[:, :width], [
                send[:, a:e].reshape(p, pre, -1)
                for (a, e), pre in zip(b.spans[ones:], pres[ones:], strict=True)
            ]

        def scatter(send: np.ndarray, dsts, xs: list[np.ndarray], out=None) -> np.ndarray:
            first, rest = dsts
            if ones:
                xp.concatenate([x.reshape(p, -1) for x in xs[:ones]], axis=1, out=first)
            for x, split, dst in zip(xs[ones:], splits, rest, strict=True):
                xp.copyto(dst, x.reshape(split).transpose(1, 0, 2))
            return comm.reduce_scatter(send, op.group, 0, op.reduce, out=out)

        send = xp.empty((p, total), dtype)  # used up within each call: kept either way
        dsts = rows(send)
        if reuse:
            recv = xp.empty(total, dtype)
            results = _unpacked(b, recv)

            def scatter_into(xs: list[np.ndarray]) -> list[np.ndarray]:
                scatter(send, dsts, xs, recv)
                return results

            return scatter_into
        return lambda xs: _unpacked(b, scatter(send, dsts, xs).reshape(-1))
    if op.kind == "all_gather":
        # one copy per run of same-shape tensors, from the ranks' rows straight into their
        # gathered layout (the ranks' pieces of a tensor split along its first dim follow each
        # other); the send and receive buffers are used up within each call: kept either way
        flat, everyone = xp.empty(total, dtype), xp.empty((p, total), dtype)
        runs = _runs(b)
        srcs = [
            everyone[:, b.spans[j][0] : b.spans[j + k - 1][1]]
            .reshape(p, k, pres[j], -1)
            .transpose(1, 2, 0, 3)
            for j, k in runs
        ]

        def gathered() -> tuple[list[np.ndarray], list[np.ndarray]]:
            """Each run's (k, *result) buffer as (k, pre, p, chunk), and the results."""
            bufs = [xp.empty((k, *b.results[j]), dtype) for j, k in runs]
            dsts = [buf.reshape(k, pres[j], p, -1) for buf, (j, k) in zip(bufs, runs, strict=True)]
            return dsts, [y for buf in bufs for y in buf]

        places = _unpacked(b, flat, b.shapes)

        def gather(xs: list[np.ndarray], dsts: list[np.ndarray]) -> None:
            send = flat
            if len(xs) == 1 and xs[0].flags.c_contiguous:
                send = xs[0].reshape(-1)  # nothing to pack
            elif not all(map(is_, xs, places)):  # else written in place by their producer
                xp.concatenate([x.reshape(-1) for x in xs], out=flat)
            comm.all_gather(send, op.group, 0, out=everyone)
            for dst, src in zip(dsts, srcs, strict=True):
                xp.copyto(dst, src)

        if reuse:
            kept, results = gathered()

            def gather_into(xs: list[np.ndarray]) -> list[np.ndarray]:
                gather(xs, kept)
                return results

            return Placed(gather_into, places)

        def gather_fresh(xs: list[np.ndarray]) -> list[np.ndarray]:
            dsts, ys = gathered()
            gather(xs, dsts)
            return ys

        return gather_fresh
    if reuse and op.kind == "all_reduce":
        # packed into a kept buffer and reduced in place: the results are views of it
        buffer = xp.empty(total, dtype)
        results = _unpacked(b, buffer)

        def reduce_in_place(xs: list[np.ndarray]) -> list[np.ndarray]:
            if not all(map(is_, xs, results)):  # else written in place by their producer
                xp.concatenate([x.reshape(-1) for x in xs], out=buffer)
            comm.all_reduce(buffer, op.group, op.reduce, inplace=True)
            return results

        return Placed(reduce_in_place, results)

    def packed(xs: list[np.ndarray]) -> list[np.ndarray]:
        flat = xp.concatenate([x.reshape(-1) for x in xs])
        return _unpacked(b, run_collective(op, flat, comm))

    return packed


def _runs(b: Bucket) -> list[tuple[int, int]]:
    """(first member, count) of each run of adjacent members with the same shape and dim."""
    runs: list[tuple[int, int]] = []
    for j, (shape, op) in enumerate(zip(b.shapes, b.ops, strict=True)):
        if runs and (b.shapes[runs[-1][0]], b.ops[runs[-1][0]].dim) == (shape, op.dim):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def _unpacked(
    b: Bucket, flat: np.ndarray, shapes: Sequence[tuple[int, ...]] | None = None
) -> list[np.ndarray]:
    """The members' results (or other ``shapes``): views of the flat buffer of a call."""
    shapes = b.results if shapes is None else shapes
    return [flat[a:e].reshape(s) for (a, e), s in zip(b.spans, shapes, strict=True)]


def sync(
    xs: list[np.ndarray], ops: Sequence[Sequence[CollectiveOp]], comm: Communicator
) -> list[np.ndarray]:
    """Apply each tensor's collectives ``ops[i]`` (in order) to ``xs[i]``, bucketed."""
    return Synchronizer(ops, comm)(xs)


class Synchronizer:
    """``sync`` with fixed collectives, its buckets laid out and bound (``bind_bucket``) on
    the first call, for the shapes and dtypes of that call's tensors: the executor's are the
    same every step (the plan fixes them), so a step pays the copies and the calls, not the
    bookkeeping.

    ``reuse``: every bucket packs into and receives into buffers kept from call to call, as
    DDP's gradient buckets are: no fresh (page-faulting) buffers per step, and the results
    are views of them worked out once. They are valid until the next call, so only a
    once-per-step sync whose results the step consumes may reuse them."""

    def __init__(
        self, ops: Sequence[Sequence[CollectiveOp]], comm: Communicator, reuse: bool = False
    ):
        self.ops, self.comm, self.reuse = ops, comm, reuse
        self._bound: list[tuple[tuple[int, ...], Packed]] | None = None
        # with ``reuse``, the first call's tensors: which of them were their producers' own
        # outputs decides where producers may write (``places``); the caller drops them
        self.first_inputs: list[np.ndarray] = []

    def _bind(self, xs: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], Packed]]:
        shapes, dtypes = [x.shape for x in xs], [x.dtype for x in xs]
        xp = array_module(xs[0]) if xs else np
        return [
            (b.members, bind_bucket(b, dtypes[b.members[0]], xp, self.comm, self.reuse))
            for b in layout(self.ops, shapes, dtypes)
        ]

    def places(self) -> dict[int, np.ndarray]:
        """Where each tensor (by index) may be written by its producer so that its first
        bucket packs nothing (``Placed``); empty until the first call lays them out."""
        out: dict[int, np.ndarray] = {}
        seen: set[int] = set()
        for members, bound in self._bound or []:
            if isinstance(bound, Placed) and not seen.intersection(members):
                out.update(zip(members, bound.places, strict=True))
            seen.update(members)
        return out

    def __call__(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._bound is None:
            self._bound = self._bind(xs)
            if self.reuse:
                self.first_inputs = list(xs)
        out = list(xs)
        for members, bound in self._bound:
            for i, y in zip(members, bound([out[i] for i in members]), strict=True):
                out[i] = y
        return out
