"""MPI collectives between 2 ranks, non-blocking (as the executor issues them) against blocking.

Why ``runtime.comm.MPICH_DEFAULTS`` exists: MPICH's default non-blocking reduce-scatter is
several times slower than its blocking twin for blocks of a few hundred KiB. Run it as
``mpiexec -n 2 python bench/mpich_collectives.py``; set
``MPIR_CVAR_IREDUCE_SCATTER_BLOCK_INTRA_ALGORITHM=auto`` to see MPICH's own default (the
script itself does not touch the environment). Median microseconds over 200 calls, each
after a barrier; non-blocking calls are polled the way the executor polls them.
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

SIZES = (256, 4096, 65536, 262144)  # float32 elements per rank
CALLS = 200


def _poll(request) -> None:
    while not request.Test():
        pass


def main() -> None:
    world = MPI.COMM_WORLD
    algorithm = os.environ.get("MPIR_CVAR_IREDUCE_SCATTER_BLOCK_INTRA_ALGORITHM", "auto")
    if world.Get_rank() == 0:
        print(f"{world.Get_size()} ranks, non-blocking reduce-scatter algorithm: {algorithm}")
        print("| KiB per rank | collective | non-blocking us | blocking us |")
        print("|---:|---|---:|---:|")
    for n in SIZES:
        for kind, (start, blocking) in _calls(world, n).items():
            medians = [_median_us(world, start, poll=True), _median_us(world, blocking)]
            if world.Get_rank() == 0:
                print(f"| {n * 4 / 1024:g} | {kind} | {medians[0]:.0f} | {medians[1]:.0f} |")


def _calls(world, n: int) -> dict:
    """(start non-blocking, blocking) of each collective on ``n`` float32 per rank."""
    x = np.ones(n, np.float32)
    rows = np.ones((world.Get_size(), n), np.float32)
    everyone = np.empty((world.Get_size(), n), np.float32)
    out = np.empty(n, np.float32)
    return {
        "all_gather": (lambda: world.Iallgather(x, everyone), lambda: world.Allgather(x, everyone)),
        "all_reduce": (
            lambda: world.Iallreduce(x, out, MPI.SUM),
            lambda: world.Allreduce(x, out, MPI.SUM),
        ),
        "reduce_scatter": (
            lambda: world.Ireduce_scatter_block(rows, out, MPI.SUM),
            lambda: world.Reduce_scatter_block(rows, out, MPI.SUM),
        ),
        "all_to_all": (
            lambda: world.Ialltoall(rows, everyone),
            lambda: world.Alltoall(rows, everyone),
        ),
    }


def _median_us(world, call, poll: bool = False) -> float:
    """Median microseconds per call (``poll``: the call starts a request, polled to the end)."""
    seconds = []
    for _ in range(CALLS):
        world.Barrier()
        t = time.perf_counter()
        request = call()
        if poll:
            _poll(request)
        seconds.append(time.perf_counter() - t)
    return float(np.median(seconds[CALLS // 10 :]) * 1e6)


if __name__ == "__main__":
    main()
