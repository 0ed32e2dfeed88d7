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


def _bucket(members: list[int], ops: list[CollectiveOp], shapes: list[tuple[int, ...]]):
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


def run_bucket(
    b: Bucket, xs: list[np.ndarray], comm: Communicator, buffer: np.ndarray | None = None
) -> list[np.ndarray]:
    """``run_collective(b.ops[i], xs[i])`` for every member with one call. ``buffer`` (only
    for an all-reduce): where to pack its tensors (``b.spans[-1][1]`` elements), which it
    then reduces in place: the results are views of it."""
    op = b.ops[0]
    p = len(op.group)
    if len(xs) == 1 or p == 1:
        return [run_collective(o, x, comm) for o, x in zip(b.ops, xs, strict=True)]
    xp = array_module(xs[0])
    if op.kind == "reduce_scatter":
        # rank r's row holds piece r (along its dim) of every tensor, flattened, in order:
        # each tensor is copied once, straight into its columns
        send = xp.empty((p, b.spans[-1][1]), xs[0].dtype)
        for o, x, (a, e) in zip(b.ops, xs, b.spans, strict=True):
            pre = math.prod(x.shape[: o.dim])
            xp.copyto(send[:, a:e].reshape(p, pre, -1), x.reshape(pre, p, -1).transpose(1, 0, 2))
        return _unpacked(b, comm.reduce_scatter(send, op.group, 0, op.reduce).reshape(-1))
    flat = xp.concatenate([x.reshape(-1) for x in xs], out=buffer)
    if op.kind == "all_gather":
        # every tensor is copied once, from the ranks' rows straight into its gathered layout
        everyone = comm.all_gather(flat, op.group, 0).reshape(p, -1)
        out = []
        for o, x, (a, e), shape in zip(b.ops, xs, b.spans, b.results, strict=True):
            pre = math.prod(x.shape[: o.dim])
            if pre == 1:  # the ranks' pieces follow each other: one copying reshape
                out.append(everyone[:, a:e].reshape(shape))
                continue
            y = xp.empty(shape, x.dtype)
            xp.copyto(
                y.reshape(pre, p, -1), everyone[:, a:e].reshape(p, pre, -1).transpose(1, 0, 2)
            )
            out.append(y)
        return out
    if buffer is not None:
        return _unpacked(b, comm.all_reduce(flat, op.group, op.reduce, inplace=True))
    return _unpacked(b, run_collective(op, flat, comm))


def _unpacked(b: Bucket, flat: np.ndarray) -> list[np.ndarray]:
    """The members' results: views of the flat buffer the call returned."""
    return [flat[a:e].reshape(s) for (a, e), s in zip(b.spans, b.results, strict=True)]


def run(
    buckets: Sequence[Bucket],
    xs: Sequence[np.ndarray],
    comm: Communicator,
    buffers: Sequence[np.ndarray | None] | None = None,
):
    """Replay ``buckets`` (a ``layout`` of these tensors' shapes) on ``xs`` (``buffers``: one
    per bucket or None, see ``run_bucket``)."""
    xs = list(xs)
    for k, b in enumerate(buckets):
        buffer = buffers[k] if buffers is not None else None
        done = run_bucket(b, [xs[i] for i in b.members], comm, buffer)
        for i, y in zip(b.members, done, strict=True):
            xs[i] = y
    return xs


def sync(
    xs: list[np.ndarray], ops: Sequence[Sequence[CollectiveOp]], comm: Communicator
) -> list[np.ndarray]:
    """Apply each tensor's collectives ``ops[i]`` (in order) to ``xs[i]``, bucketed."""
    return run(layout(ops, [x.shape for x in xs], [x.dtype for x in xs]), xs, comm)


class Synchronizer:
    """``sync`` with fixed collectives, its layout kept for as long as the tensors' shapes
    and dtypes stay those it was made for (every step, in a training run).

    ``reuse``: all-reduce buckets are packed into buffers kept from call to call and reduced
    in place, as DDP's gradient buckets are: no fresh (page-faulting) buffer per step, no
    second one for the result. The results are views of those buffers, valid until the next
    call, so only a once-per-step sync whose results the step consumes may reuse them."""

    def __init__(
        self, ops: Sequence[Sequence[CollectiveOp]], comm: Communicator, reuse: bool = False
    ):
        self.ops, self.comm, self.reuse = ops, comm, reuse
        self._key: tuple = ()
        self._buckets: list[Bucket] = []
        self._buffers: list[np.ndarray | None] | None = None

    def __call__(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        key = tuple((x.shape, x.dtype) for x in xs)
        if key != self._key:
            self._key = key
            self._buckets = layout(self.ops, [x.shape for x in xs], [x.dtype for x in xs])
            if self.reuse and xs:
                xp = array_module(xs[0])
                self._buffers = [
                    xp.empty(b.spans[-1][1], xs[b.members[0]].dtype)
                    if b.ops[0].kind == "all_reduce" and len(b.members) > 1
                    else None
                    for b in self._buckets
                ]
        return run(self._buckets, xs, self.comm, self._buffers)
