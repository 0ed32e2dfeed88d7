"""Where the executor's remaining overhead goes, between 2 ranks (issue 7).

Run as ``mpiexec -n 2 python bench/executor_costs.py``. Three measurements, each the median
microseconds over ``CALLS`` calls on rank 0, after a barrier:

1. One collective's Python cost outside MPI (``MpiCommunicator.reduce_scatter`` of a 4 KiB
   activation, as a plan's ``Collect`` issues it), hot and right after an onnxruntime session
   (the GPT-2 fixture's forward at batch 8 x seq 16) ran on the same core, as in a real step.
2. Packing a gradient bucket for its reduce-scatter (the GPT-2 fixture's parameters, split for
   2 ranks along their last dim): ``runtime.buckets`` in numpy against the same packing as an
   ONNX graph (Reshape / Transpose / Concat) in onnxruntime.
3. An all-gather bucket of those parameter shards: ``runtime.buckets`` (pack, ``Iallgather``,
   numpy unpack) against one ``Ialltoallw`` whose derived receive datatypes put every piece
   straight into its gathered tensor.

The three decide what the executor does: (2) and (3) keep packing in numpy, (1) is why the
overhead per instruction is several times what a hot microbenchmark of it shows.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.buckets import bind_bucket, layout  # noqa: E402
from runtime.comm import MpiCommunicator  # noqa: E402
from runtime.partition import CollectiveOp, session_options  # noqa: E402

GPT2 = ROOT / "tests" / "fixtures" / "gpt2.ts.onnx"
CALLS = 2000
P = 2


def _median_us(
    comm: MpiCommunicator, call: Callable[[], object], before=None, own: bool = False
) -> float:
    """Median over CALLS of ``call``'s wall time (``own``: of the seconds it returns), each
    after ``before`` and a barrier; the first 100 calls warm up."""
    samples = []
    for i in range(CALLS + 100):
        if before is not None:
            before()
        comm.world.Barrier()
        start = time.perf_counter()
        result = call()
        if i >= 100:
            samples.append(result if own else time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _shards(comm: MpiCommunicator) -> tuple[list[np.ndarray], list[CollectiveOp]]:
    """This rank's shards of the fixture's parameters, split along their last dim."""
    model = onnx.load(str(GPT2))
    group = tuple(range(P))
    xs, ops = [], []
    for t in model.graph.initializer:
        shape = list(t.dims)
        if t.data_type != TensorProto.FLOAT or not shape or shape[-1] % P:
            continue
        dim = len(shape) - 1
        shape[dim] //= P
        rng = np.random.default_rng(len(xs) + comm.rank)
        xs.append(rng.standard_normal(shape).astype(np.float32))
        ops.append(CollectiveOp("all_gather", group, "sum", dim))
    return xs, ops


def collective_after_session(comm: MpiCommunicator) -> tuple[float, float]:
    group = tuple(range(P))
    x = np.ones((16, 64), np.float32)
    session = ort.InferenceSession(str(GPT2), session_options())
    feeds = {
        "input_ids": np.ones((8, 16), np.int64),
        "attention_mask": np.ones((8, 16), np.int64),
    }

    def outside_mpi() -> float:
        inside, start = comm.seconds, time.perf_counter()
        comm.reduce_scatter(x, group, 0, "sum")
        return time.perf_counter() - start - (comm.seconds - inside)

    hot = _median_us(comm, outside_mpi, own=True)
    cold = _median_us(comm, outside_mpi, before=lambda: session.run(None, feeds), own=True)
    return hot, cold


def pack_numpy_vs_onnx(comm: MpiCommunicator, xs, ops) -> tuple[float, float]:
    group = tuple(range(P))
    scatter = [CollectiveOp("reduce_scatter", group, "sum", op.dim) for op in ops]
    full = [(*x.shape[:-1], x.shape[-1] * P) for x in xs]
    grads = [np.ones(s, np.float32) for s in full]
    (bucket,) = layout([[op] for op in scatter], full, [np.dtype(np.float32)] * len(full))

    class PackOnly:  # the call itself is left out: only the packing is timed
        def reduce_scatter(self, x, group, dim, op, out=None):
            return out

    packed = bind_bucket(bucket, np.dtype(np.float32), np, PackOnly(), reuse=True)
    nodes, inits, rows = [], [], []
    for j, (op, shape) in enumerate(zip(bucket.ops, bucket.shapes, strict=True)):
        pre = math.prod(shape[: op.dim])
        src = f"x{j}"
        if pre != 1:
            inits.append(helper.make_tensor(f"s{j}", TensorProto.INT64, [3], [pre, P, -1]))
            nodes += [
                helper.make_node("Reshape", [src, f"s{j}"], [f"r{j}"]),
                helper.make_node("Transpose", [f"r{j}"], [f"t{j}"], perm=[1, 0, 2]),
            ]
            src = f"t{j}"
        inits.append(helper.make_tensor(f"f{j}", TensorProto.INT64, [2], [P, -1]))
        nodes.append(helper.make_node("Reshape", [src, f"f{j}"], [f"y{j}"]))
        rows.append(f"y{j}")
    nodes.append(helper.make_node("Concat", rows, ["packed"], axis=1))
    members = [grads[i] for i in bucket.members]
    inputs = [
        helper.make_tensor_value_info(f"x{j}", TensorProto.FLOAT, list(x.shape))
        for j, x in enumerate(members)
    ]
    graph = helper.make_graph(
        nodes,
        "pack",
        inputs,
        [helper.make_tensor_value_info("packed", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), session_options())
    names = [f"x{j}" for j in range(len(members))]
    in_numpy = _median_us(comm, lambda: packed(members))
    feeds = dict(zip(names, members, strict=True))
    in_onnx = _median_us(comm, lambda: session.run(["packed"], dict(feeds)))
    return in_numpy, in_onnx


def all_gather_bucket_vs_alltoallw(comm: MpiCommunicator, xs, ops) -> tuple[float, float]:
    from mpi4py import MPI

    shapes = [x.shape for x in xs]
    (bucket,) = layout([[op] for op in ops], shapes, [np.dtype(np.float32)] * len(xs))
    members = [xs[i] for i in bucket.members]
    bucketed = bind_bucket(bucket, np.dtype(np.float32), np, comm)
    sizes = [e - a for a, e in bucket.spans]
    starts = np.cumsum([0] + [n * P for n in sizes]).tolist()  # gathered tensors, one by one
    types = []
    for r in range(P):  # where rank r's piece of every tensor goes
        parts = []
        for op, shape, n, start in zip(bucket.ops, bucket.shapes, sizes, starts[:-1], strict=True):
            pre = math.prod(shape[: op.dim])
            cols = n // pre
            vector = MPI.FLOAT.Create_vector(pre, cols, P * cols)
            parts.append((vector, (start + r * cols) * 4))
        types.append(
            MPI.Datatype.Create_struct(
                [1] * len(parts), [d for _, d in parts], [t for t, _ in parts]
            ).Commit()
        )
        for t, _ in parts:
            t.Free()
    total = bucket.spans[-1][1]
    sub = comm.world  # the 2 ranks are the whole job

    def alltoallw() -> list[np.ndarray]:
        flat = np.concatenate([x.reshape(-1) for x in members])
        out = np.empty(starts[-1], np.float32)
        sub.Alltoallw([flat, [total] * P, [0] * P, [MPI.FLOAT] * P], [out, [1] * P, [0] * P, types])
        spans = zip(starts, starts[1:], strict=False)
        return [out[a:e].reshape(s) for (a, e), s in zip(spans, bucket.results, strict=True)]

    for got, want in zip(alltoallw(), bucketed(members), strict=True):
        assert np.array_equal(got, want), "Alltoallw's layout differs from the bucket's"
    return _median_us(comm, lambda: bucketed(members)), _median_us(comm, alltoallw)


def main() -> None:
    comm = MpiCommunicator()
    if comm.size != P:
        sys.exit(f"run with mpiexec -n {P}")
    comm.add_groups([tuple(range(P))])
    xs, ops = _shards(comm)
    hot, cold = collective_after_session(comm)
    in_numpy, in_onnx = pack_numpy_vs_onnx(comm, xs, ops)
    bucketed, alltoallw = all_gather_bucket_vs_alltoallw(comm, xs, ops)
    if comm.rank == 0:
        print("| measurement | us |")
        print("|---|---:|")
        print(f"| reduce_scatter of 4 KiB, Python outside MPI, hot | {hot:.1f} |")
        print(f"| the same right after an onnxruntime session ran | {cold:.1f} |")
        print(f"| gradient bucket packed by runtime.buckets (numpy) | {in_numpy:.1f} |")
        print(f"| the same packing as an ONNX graph in onnxruntime | {in_onnx:.1f} |")
        print(f"| all-gather bucket: pack, Iallgather, numpy unpack | {bucketed:.1f} |")
        print(f"| the same as one Alltoallw with derived datatypes | {alltoallw:.1f} |")


if __name__ == "__main__":
    main()
