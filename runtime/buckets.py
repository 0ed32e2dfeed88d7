"""Bucketed gradient synchronisation, as DDP does it.

Every gradient's deferred collectives run once per step, after accumulation, so they need not
run one tensor at a time: gradients whose next collective is the same (kind, group, reduce
op) and dtype are flattened into one buffer of up to ``BUCKET_BYTES`` and synchronised with
one call. That pays the collective's fixed latency once per bucket instead of once per
tensor, which dominates for the many small gradients (biases, norms) of a model. Buffers are
built with the tensors' own array module, so GPU gradients are bucketed on the GPU.

Buckets are formed and issued in gradient order, which every rank of a stage shares, so the
ranks of a group issue the same buckets in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(sizes, dtype=np.int64).tolist()
    return [(end - n, end) for n, end in zip(sizes, ends, strict=True)]


def _unflatten(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    spans = _offsets([math.prod(s) for s in shapes])
    return [flat[a:b].reshape(s) for s, (a, b) in zip(shapes, spans, strict=True)]


def run_bucket(
    ops: list[CollectiveOp], xs: list[np.ndarray], comm: Communicator
) -> list[np.ndarray]:
    """``run_collective(ops[i], xs[i])`` for every i with one call; the ops share kind, group
    and reduce op (their tensor dims may differ)."""
    op = ops[0]
    p = len(op.group)
    if len(xs) == 1 or p == 1:
        return [run_collective(o, x, comm) for o, x in zip(ops, xs, strict=True)]
    xp = array_module(xs[0])
    if op.kind == "reduce_scatter":
        # rank r's row holds piece r (along its dim) of every tensor, flattened, in order:
        # each tensor is copied once, straight into its columns
        spans = _offsets([x.size // p for x in xs])
        send = xp.empty((p, spans[-1][1]), xs[0].dtype)
        for o, x, (a, b) in zip(ops, xs, spans, strict=True):
            pre = math.prod(x.shape[: o.dim])
            xp.copyto(send[:, a:b].reshape(p, pre, -1), x.reshape(pre, p, -1).transpose(1, 0, 2))
        mine = comm.reduce_scatter(send, op.group, 0, op.reduce)
        pieces = [
            tuple(n // p if d == o.dim else n for d, n in enumerate(x.shape))
            for o, x in zip(ops, xs, strict=True)
        ]
        return _unflatten(mine.reshape(-1), pieces)
    flat = xp.concatenate([x.reshape(-1) for x in xs])
    if op.kind == "all_gather":
        # every tensor is copied once, from the ranks' rows straight into its gathered layout
        everyone = comm.all_gather(flat, op.group, 0).reshape(p, -1)
        out = []
        for o, x, (a, b) in zip(ops, xs, _offsets([x.size for x in xs]), strict=True):
            d, shape, pre = o.dim, x.shape, math.prod(x.shape[: o.dim])
            y = xp.empty((*shape[:d], p * shape[d], *shape[d + 1 :]), x.dtype)
            xp.copyto(
                y.reshape(pre, p, -1), everyone[:, a:b].reshape(p, pre, -1).transpose(1, 0, 2)
            )
            out.append(y)
        return out
    return _unflatten(run_collective(op, flat, comm), [x.shape for x in xs])


def sync(
    xs: list[np.ndarray], ops: list[list[CollectiveOp]], comm: Communicator
) -> list[np.ndarray]:
    """Apply each tensor's collectives ``ops[i]`` (in order) to ``xs[i]``, bucketed: the k-th
    collectives of all tensors run before any (k+1)-th; a bucket is issued once it holds
    ``BUCKET_BYTES``, the rest in order of their first tensor."""
    xs = list(xs)
    for k in range(max((len(chain) for chain in ops), default=0)):
        ready: list[list[int]] = []
        filling: dict[tuple, tuple[list[int], int]] = {}
        for i, chain in enumerate(ops):
            if k >= len(chain):
                continue
            key = (chain[k].kind, chain[k].group, chain[k].reduce, xs[i].dtype.str)
            members, size = filling.get(key, ([], 0))
            members.append(i)
            filling[key] = (members, size + xs[i].nbytes)
            if filling[key][1] >= BUCKET_BYTES:
                ready.append(filling.pop(key)[0])
        ready.extend(members for members, _ in filling.values())
        for members in ready:
            done = run_bucket([ops[i][k] for i in members], [xs[i] for i in members], comm)
            for i, y in zip(members, done, strict=True):
                xs[i] = y
    return xs
