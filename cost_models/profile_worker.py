"""One rank of ``alpa-plan profile``: ``mpiexec -n N python -m cost_models.profile_worker OUT``.

Every rank measures compute at the same time, because that is how the executor runs them:
N ranks on one machine share its cores, caches and memory bandwidth, so a lone process would
overstate what each rank achieves. Communication goes through the executor's own
``runtime.comm.MpiCommunicator`` so the fitted alpha includes its polling and copies, not
only MPICH's. Rank 0 writes every sample as JSON; ``cost_models.profile`` fits the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mpi4py.MPI import MAX

from cost_models import profile as P

COMM_BYTES = (4, 256, 4096, 65536, 1 << 18, 1 << 20, 1 << 22)


def _interleaved(
    comm, op: Callable[[], object], work: Callable[[], object], budget: float
) -> float:
    """Seconds one call of ``op`` adds when it follows a compute segment ``work``, as in the
    executor: ranks reach a collective a little apart (OS noise, other load), and what the
    late arrival and the communicator's polling cost is part of what a plan pays per call.
    Mean over blocks of calls (see ``mean_seconds``), slowest rank."""
    work()
    op()
    alone = P.mean_seconds(work, budget / 4)
    comm.world.Barrier()
    start = time.perf_counter()
    work()
    op()
    first = time.perf_counter() - start
    reps = int(comm.world.bcast(max(3, min(100, budget / 5 / max(first, 1e-7))), root=0))
    blocks = []
    for _ in range(5):
        comm.world.Barrier()
        start = time.perf_counter()
        for _ in range(reps):
            work()
            op()
        blocks.append((time.perf_counter() - start) / reps - alone)
    return max(0.0, float(comm.world.allreduce(float(np.mean(blocks)), op=MAX)))


def comm_samples(comm, threads: int, budget: float) -> list[dict]:
    """All-reduce, all-gather and reduce-scatter over all ranks, send/recv between 0 and 1,
    each after a ~0.1 ms MatMul session like the executor's compute segments."""
    everyone = tuple(range(comm.size))
    comm.add_groups([everyone])
    work = P.matmul_runner(128, "float32", threads)
    samples = []
    for nbytes in COMM_BYTES:
        x = np.ones(max(1, nbytes // 4) * comm.size, np.float32)
        piece = np.ones(x.size // comm.size, np.float32)
        buf = np.empty_like(piece)

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
            "send_recv": (ping, piece.nbytes, 2),
        }
        for kind, (fn, n, ranks) in ops.items():
            seconds = _interleaved(comm, fn, work, budget)
            samples.append({"kind": kind, "ranks": ranks, "bytes": n, "seconds": seconds})
    return samples


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cost_models.profile_worker")
    parser.add_argument("output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per measurement")
    args = parser.parse_args(argv)
    from runtime.comm import MpiCommunicator

    comm = MpiCommunicator()
    compute = P.measure_compute(args.threads, args.budget, barrier=comm.world.Barrier)
    everyone = comm.world.gather(compute, root=0)
    samples = comm_samples(comm, args.threads, args.budget) if comm.size > 1 else []
    if comm.rank == 0:
        result = {"ranks": comm.size, "threads": args.threads, "compute": everyone, "comm": samples}
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
