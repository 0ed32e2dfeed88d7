"""One rank of ``alpa-plan profile``: ``mpiexec -n N python -m cost_models.profile_worker OUT``.

Every rank measures compute at the same time, because that is how the executor runs them:
N ranks on one machine share its cores, caches and memory bandwidth, so a lone process would
overstate what each rank achieves. What synchronising at collectives costs on top is measured
apart (``lockstep``), and so is what the executor pays per communication instruction
(``dispatch_seconds``, through the executor's own ``StageRunner``). Communication goes through
the executor's own communicator (``runtime.comm.MpiCommunicator``, or NCCL's on GPUs) so the
fitted alpha includes its polling and copies, not only the library's. Rank 0 writes every
sample as JSON; ``cost_models.profile`` fits the cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cost_models import profile as P

COMM_BYTES = (4, 256, 4096, 65536, 1 << 18, 1 << 20, 1 << 22)


SEGMENT_SECONDS = 5e-4  # a compute segment between two collectives, as in a training step
SYNC_ROUNDS = 7  # odd: the median round is a measured one
WORKLOAD_ROUNDS = 5


def _mean_over(
    fn: Callable[[], object], seconds: float, comm, less: Callable[[], float] = lambda: 0.0
) -> float:
    """Mean seconds per call of ``fn`` over about ``seconds``, every rank calling it the same
    number of times (the count is rank 0's, broadcast); the slowest rank's mean. ``less``: a
    running total of seconds (e.g. the communicator's) whose growth is left out."""
    comm.world.Barrier()
    start = time.perf_counter()
    fn()
    first = max(time.perf_counter() - start, 1e-7)
    reps = int(comm.world.bcast(max(5, min(10000, seconds / first)), root=0))
    comm.world.Barrier()
    start, before = time.perf_counter(), less()
    for _ in range(reps):
        fn()
    spent = time.perf_counter() - start - (less() - before)
    from mpi4py.MPI import MAX  # here: MPI starts with the communicator (its defaults)

    return float(comm.world.allreduce(spent / reps, op=MAX))


def lockstep(comm, segment: Callable[[], object], budget: float) -> dict:
    """What ranks lose waiting for each other when they synchronise after every ``segment``,
    as a training step does at each collective: alone, ranks drift; in lockstep every rank
    waits for the slowest, and each segment's time jitters independently per rank. Measured
    as the time of ``segment`` run concurrently on all ranks without synchronising, and the
    time it takes when each is followed by a 4-byte all-reduce (the all-reduce's own time,
    run back to back, subtracted). The wait grows as the square root of the segment (its
    jitter does), so it is stored as ``jitter`` = wait / sqrt(segment seconds)
    (``Device.sync_jitter``). Rounds alternate so a change of load hits both alike, and the
    median round of each counts."""
    everyone = tuple(range(comm.size))
    one = comm.to_device(np.ones(1, np.float32))

    def locked() -> None:
        segment()
        comm.all_reduce(one, everyone, "sum")

    free, together, sync = [], [], []
    for _ in range(SYNC_ROUNDS):
        free.append(_mean_over(segment, budget, comm))
        together.append(_mean_over(locked, budget, comm))
        sync.append(_mean_over(lambda: comm.all_reduce(one, everyone, "sum"), budget / 4, comm))
    # medians: a round that a burst of other work on the machine hit says nothing about sync
    alone = float(np.median(free))
    waited = max(0.0, float(np.median(together) - np.median(sync)) - alone)
    return {
        "segment_seconds": alone,
        "lockstep_seconds": alone + waited,
        "jitter": waited / math.sqrt(alone) if alone > 0 else 0.0,
    }


def matmul_segment(comm, target: P.Target) -> Callable[[], None]:
    """About SEGMENT_SECONDS of MatMuls, the same count on every rank."""
    work = P.matmul_runner(128, "float32", target)
    work()
    start = time.perf_counter()
    work()
    per = max(time.perf_counter() - start, 1e-6)
    k = int(comm.world.bcast(max(1, round(SEGMENT_SECONDS / per)), root=0))

    def segment() -> None:
        for _ in range(k):
            work()

    return segment


def dispatch_seconds(comm, target: P.Target, budget: float) -> float:
    """What the executor pays per communication instruction besides the transfer: a
    collective splits a compute segment in two, so it adds one instruction of its own and one
    more onnxruntime session call. Measured by running the executor's own ``StageRunner``
    over such a pair, a one-Add session and a 64-byte all-reduce over every rank, all ranks
    in step: the pair's time less the time inside the communicator (alpha's part)."""
    from onnx import helper

    from runtime.mesh import RankMesh
    from runtime.partition import Collect, CollectiveOp, Run, Segment, StageProgram
    from runtime.worker import StageRunner

    session = target.make_session(
        P.model_bytes(
            [helper.make_node("Add", ["x", "x"], ["y"])],
            [P._tensor("x", "float32", [16])],
            [P._tensor("y", "float32", [16])],
        )
    )
    seg = Segment(inputs=["x"], outputs=["y"], session=session)
    everyone = tuple(range(comm.size))
    collect = Collect("y", [CollectiveOp("all_reduce", everyone, "sum", None)])
    program = StageProgram(
        stage=0,
        mesh=RankMesh((comm.size,), everyone),
        device=comm.rank,
        programs={"forward": [Run(seg), collect]},
        state_specs={},
        data_specs={},
        grads=[],
        loss=None,
        assigns=[],
        segments=[seg],
    )
    runner = StageRunner(program, comm, {}, 1)
    env = {"x": target.to_device(np.ones(16, np.float32))}

    def pair() -> None:
        runner.run("forward", env, 0)
        target.sync()

    pair()
    return max(0.0, _mean_over(pair, budget, comm, less=lambda: comm.seconds))


def workload_step(folder: str, comm, target: P.Target) -> Callable[[], None]:
    """One training step of a one-device plan's workload (saved by ``cost_models.profile``),
    run by the executor's ``StageRunner`` on every rank at once: what real graphs (their
    transcendental, reduction, scatter and layout ops, not only MatMuls and Adds) and the
    executor's own work around their sessions take, against what the roofline says."""
    from planner.plan_io import load_plan
    from runtime.data import synthetic_batch
    from runtime.partition import build_stage
    from runtime.step import PreparedStep
    from runtime.worker import StageRunner

    plan = load_plan(str(Path(folder) / "plan.json"))
    step = PreparedStep.load(folder)
    stage = build_stage(step.model, plan, 0, target.make_session)
    runner = StageRunner(stage, comm, step.state, 1)
    batch = synthetic_batch(step.model.graph, set(step.state), 1, seed=0)

    def one() -> None:
        runner.step(batch, plan.options.schedule, 1)
        target.sync()

    one()
    return one


def interleaved_seconds(comm, calls: list[Callable[[], None]], budget: float) -> list[float]:
    """Seconds per call of each of ``calls`` (the slowest rank's), measured in interleaved
    rounds, the median round of each: a burst of other work on the machine then hits one
    round of every call rather than every round of one (steps of small workloads moved by
    20-30% between profiles measured in one stretch each)."""
    rounds = [
        [_mean_over(call, budget / WORKLOAD_ROUNDS, comm) for call in calls]
        for _ in range(WORKLOAD_ROUNDS)
    ]
    return [float(np.median(column)) for column in zip(*rounds, strict=True)]


def comm_samples(comm, target: P.Target, budget: float) -> list[dict]:
    """Every collective kind over all ranks, and send/recv between 0 and 1,
    back to back through the executor's communicator (waiting for a slower peer is the
    synchronisation cost ``lockstep`` measures; counting it here too would charge it
    twice)."""
    everyone = tuple(range(comm.size))
    samples = []
    for nbytes in COMM_BYTES:
        x = target.to_device(np.ones(max(1, nbytes // 4) * comm.size, np.float32))
        piece = target.to_device(np.ones(x.size // comm.size, np.float32))
        buf = target.to_device(np.empty(piece.shape, np.float32))

        def ping(piece=piece, buf=buf) -> None:
            if comm.rank == 0:
                comm.send(piece, 1, 7)
                comm.wait_sends()
            elif comm.rank == 1:
                comm.recv(buf, 0, 7)

        ops: dict[str, tuple[Callable[[], object], int, int]] = {
            "all_reduce": (lambda x=x: comm.all_reduce(x, everyone, "sum"), x.nbytes, comm.size),
            "all_gather": (lambda p=piece: comm.all_gather(p, everyone, 0), x.nbytes, comm.size),
            "reduce_scatter": (
                lambda x=x: comm.reduce_scatter(x, everyone, 0, "sum"),
                x.nbytes,
                comm.size,
            ),
            "all_to_all": (lambda x=x: comm.all_to_all(x, everyone, 0, 0), x.nbytes, comm.size),
            "broadcast": (lambda x=x: comm.broadcast(x, everyone, 0), x.nbytes, comm.size),
            "send_recv": (ping, piece.nbytes, 2),
        }
        for kind, (fn, n, ranks) in ops.items():
            fn()
            seconds = _mean_over(fn, budget, comm)
            samples.append({"kind": kind, "ranks": ranks, "bytes": n, "seconds": seconds})
    return samples


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cost_models.profile_worker")
    parser.add_argument("output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument(
        "--workload", action="append", default=[], help="folder of a one-device plan's step"
    )
    parser.add_argument("--kind", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args(argv)
    comm, target = _open(args.kind, args.threads)
    comm.add_groups([tuple(range(comm.size))])
    compute = P.measure_compute(target, args.budget, barrier=comm.world.Barrier)
    compute["dispatch"] = dispatch_seconds(comm, target, args.budget)
    everyone = comm.world.gather(compute, root=0)
    sync, samples = {}, []
    steps = [workload_step(w, comm, target) for w in args.workload]
    seconds = interleaved_seconds(comm, steps, 20 * args.budget) if steps else []
    steps_sync = []
    if comm.size > 1:
        # how much a real step's time jitters: its lockstep, a sync after each
        steps_sync = [lockstep(comm, s, 4 * args.budget) for s in steps]
        sync = lockstep(comm, matmul_segment(comm, target), args.budget)
        samples = comm_samples(comm, target, args.budget)
    if comm.rank == 0:
        result = {
            "ranks": comm.size,
            "threads": args.threads,
            "compute": everyone,
            "sync": sync,
            "workload_seconds": seconds,
            "workload_sync": steps_sync,
            "comm": samples,
        }
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


def _open(kind: str, threads: int) -> tuple[Any, P.Target]:
    """This rank's communicator and measuring target: MPI and CPU sessions, or NCCL and CUDA
    sessions on the rank's GPU and the communicator's stream (as ``run`` sets them up)."""
    from runtime.comm import MpiCommunicator

    mpi = MpiCommunicator()
    if kind == "cpu":
        return mpi, P.cpu_target(threads)
    from runtime.backend import cuda_backend

    backend = cuda_backend(mpi, mpi.size, "profile on GPUs needs them")
    comm = backend.comm
    return comm, P.Target("gpu", backend.make_session, comm.to_device, comm.stream.synchronize)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
