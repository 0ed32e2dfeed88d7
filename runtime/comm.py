"""Communication behind one interface: collectives over device groups and point-to-point.

The executor only talks to ``Communicator``; the CPU backend is MPI (mpi4py + the MPICH
wheel), a GPU backend implements the same methods with NCCL. Groups are tuples of global
device ids in the order a spec's axes enumerate them (first axis major), so a gather along a
split dim concatenates blocks in tensor order.

Every MPI operation is non-blocking and polled (without sleeping) against a deadline
(``ALPA_COMM_TIMEOUT`` seconds, default 120): a dead or stuck peer ends the whole job with a
message naming this rank, the operation and the peers it waited for; it never hangs.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, MutableMapping, Sequence
from types import ModuleType

import numpy as np

Group = tuple[int, ...]
REDUCE_OPS = ("sum", "mean", "max", "min")
_CHECK = 256  # polls between deadline checks
_SPIN = 64  # polls before each further one yields the core


# Seconds between reporting a failure and aborting the job (see MpiCommunicator.fail).
ABORT_GRACE_SECONDS = 0.5

# MPICH settings the ranks start with unless the environment sets them. Its default
# non-blocking reduce-scatter is pathological for blocks of a few hundred KiB: 2 ranks on one
# machine (MPICH 4, mpi4py) took 578 us for a 256 KiB block where the blocking call and the
# pairwise algorithm take 77 us; every other collective the executor uses matched its
# blocking twin from 1 KiB to 1 MiB (``bench/mpich_collectives.py``). The executor only
# issues non-blocking calls (see ``_wait``), so a gradient bucket's reduce-scatter paid it
# every step. Read by MPI at init.
MPICH_DEFAULTS = {"MPIR_CVAR_IREDUCE_SCATTER_BLOCK_INTRA_ALGORITHM": "sched_pairwise"}


def apply_mpich_defaults(env: MutableMapping[str, str]) -> None:
    """``MPICH_DEFAULTS`` into ``env`` where it sets nothing: the rank's own environment,
    before MPI starts (launched by ``run``, by ``profile`` or joining a user's job alike)."""
    for key, value in MPICH_DEFAULTS.items():
        env.setdefault(key, value)


class Communicator(ABC):
    """Collectives over groups of global device ids, point-to-point sends, timing. Tensors
    live in ``xp`` arrays (numpy here, cupy on GPUs); ``to_device``/``to_host`` move host data
    in and out, so the executor copies only where it needs host data."""

    rank: int
    size: int
    seconds: float  # wall time spent inside communication since the last reset
    calls: int  # operations completed since the last reset
    xp: ModuleType = np

    def to_device(self, x: np.ndarray):
        return x

    def to_host(self, x) -> np.ndarray:
        return x

    @abstractmethod
    def add_groups(self, groups: Iterable[Group]) -> None:
        """Set up the groups this rank communicates over (every rank calls it once)."""

    @abstractmethod
    def all_reduce(self, x: np.ndarray, group: Group, op: str, inplace: bool = False) -> np.ndarray:
        """``inplace``: the result may overwrite ``x`` (a contiguous buffer the caller owns)."""

    @abstractmethod
    def all_gather(
        self, x: np.ndarray, group: Group, dim: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """``out``: where the ranks' blocks are received (shape ``(len(group), *x.shape)``)."""

    @abstractmethod
    def reduce_scatter(
        self, x: np.ndarray, group: Group, dim: int, op: str, out: np.ndarray | None = None
    ) -> np.ndarray:
        """``out``: where this rank's reduced block is received."""

    @abstractmethod
    def all_to_all(
        self, x: np.ndarray, group: Group, split_dim: int, concat_dim: int
    ) -> np.ndarray: ...

    @abstractmethod
    def broadcast(self, x: np.ndarray, group: Group, root: int) -> np.ndarray: ...

    @abstractmethod
    def send(self, x: np.ndarray, dst: int, tag: int) -> None:
        """Start sending; the buffer is kept alive until ``wait_sends``."""

    @abstractmethod
    def recv(self, out: np.ndarray, src: int, tag: int) -> None:
        """Receive into ``out`` (its shape and dtype are the message's)."""

    @abstractmethod
    def wait_sends(self) -> None: ...

    @abstractmethod
    def send_object(self, obj: object, dst: int, tag: int) -> None: ...

    @abstractmethod
    def recv_object(self, src: int, tag: int) -> object: ...

    @abstractmethod
    def all_gather_host(self, x: np.ndarray) -> np.ndarray:
        """Every rank's small host array, stacked in rank order, on every rank (the control
        plane: per-step metrics). Not counted in ``seconds``/``calls``."""

    @abstractmethod
    def broadcast_object(self, obj: object, root: int) -> object:
        """World-wide broadcast of a picklable object from ``root``."""

    @abstractmethod
    def fail(self, message: str) -> None:
        """Print ``message`` naming this rank and end every rank of the job."""


def array_module(x) -> ModuleType:
    """numpy, or cupy for a cupy array: the helpers here and in reshard/buckets serve both
    backends, and a CPU-only install never imports cupy."""
    if type(x).__module__.partition(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def contiguous(x: np.ndarray) -> np.ndarray:
    """C-contiguous without promoting 0-d arrays to 1-d (as np.ascontiguousarray does)."""
    return x if x.flags.c_contiguous else x.copy(order="C")


def split_blocks(x: np.ndarray, n: int, dim: int, what: str) -> np.ndarray:
    """``np.stack(np.split(x, n, dim))`` as one reshape and (for dim > 0) one transposed copy
    (no ``np.moveaxis``: its axis normalisation costs more than a small copy)."""
    shape = x.shape
    if shape[dim] % n:
        raise ValueError(f"{what}: dim {dim} of shape {shape} does not split into {n} parts")
    part = (*shape[:dim], shape[dim] // n, *shape[dim + 1 :])
    if dim == 0:
        return contiguous(x).reshape(n, *part)
    rows = x.reshape(math.prod(shape[:dim]), n, -1)
    return rows.transpose(1, 0, 2).copy().reshape(n, *part)


def concat_blocks(blocks: np.ndarray, dim: int) -> np.ndarray:
    """``np.concatenate(list(blocks), dim)`` as one copy (none for dim 0)."""
    p, shape = blocks.shape[0], blocks.shape[1:]
    joined = (*shape[:dim], p * shape[dim], *shape[dim + 1 :])
    if dim == 0:
        return blocks.reshape(joined)
    rows = blocks.reshape(p, math.prod(shape[:dim]), -1)
    return rows.transpose(1, 0, 2).copy().reshape(joined)


def mean_of(total: np.ndarray, n: int) -> np.ndarray:
    """``total / n`` in place, so a 0-d array stays an array (numpy would return a scalar)
    and the dtype stays (a scalar of it works for numpy and cupy alike)."""
    total /= total.dtype.type(n)
    return total


class MpiCommunicator(Communicator):
    """MPI backend: one sub-communicator per group, created up front with ``add_groups``."""

    def __init__(self, timeout: float | None = None):
        apply_mpich_defaults(os.environ)  # read by MPI_Init, which the import runs
        from mpi4py import MPI

        self._mpi = MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self.timeout = timeout or float(os.environ.get("ALPA_COMM_TIMEOUT", "120"))
        self.seconds = 0.0
        self.calls = 0
        self._groups: dict[Group, object] = {}
        self._sends: list[tuple[object, np.ndarray, int]] = []
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def add_groups(self, groups: Iterable[Group]) -> None:
        """Create the sub-communicators of ``groups`` that contain this rank. Every member of a
        group must list the groups it belongs to in the same order (sorted here)."""
        world_group = self.world.Get_group()
        for group in sorted(set(groups)):
            if self.rank not in group or len(group) == 1 or group in self._groups:
                continue
            sub = world_group.Incl(list(group))
            self._groups[group] = self.world.Create_group(sub)
            sub.Free()
        world_group.Free()

    def _comm(self, group: Group):
        if self.rank not in group:
            raise ValueError(f"rank {self.rank} is not in group {group}")
        return self._groups[group]

    def _wait(
        self, request, what: str, peers: Sequence[int], start: float, count: bool = True
    ) -> None:
        """Poll ``request`` until done (MPICH progresses only while a rank polls). No sleeps:
        a sleep's wake-up latency (50 us to 1 ms) would dwarf a small collective. The first
        ``_SPIN`` polls spin (a peer arriving within microseconds is served at once), later
        ones yield the core so a peer sharing it still runs; the deadline is checked every
        ``_CHECK`` polls. ``start`` is when the operation was issued; ``count``: add it to
        ``seconds``/``calls`` (the data plane's, not the control plane's)."""
        deadline = start + self.timeout
        test = request.Test
        spins = 0
        while not test():
            spins += 1
            if spins % _CHECK == 0 and time.perf_counter() > deadline:
                self.fail(
                    f"{what} timed out after {self.timeout:g}s waiting for ranks "
                    f"{sorted(set(peers) - {self.rank})}"
                )
            if spins > _SPIN:
                os.sched_yield()
        if count:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def fail(self, message: str) -> None:
        sys.stderr.write(f"alpa-plan: rank {self.rank}: {message}; aborting the job\n")
        sys.stderr.flush()
        # The launcher forwards rank output asynchronously and Abort kills every rank at once:
        # give it a moment so the message naming the culprit reaches the user.
        time.sleep(ABORT_GRACE_SECONDS)
        self.world.Abort(1)

    def all_reduce(self, x: np.ndarray, group: Group, op: str, inplace: bool = False) -> np.ndarray:
        if len(group) == 1:
            return x
        x = contiguous(x)
        out = x if inplace else np.empty_like(x)
        start = time.perf_counter()
        request = self._comm(group).Iallreduce(
            self._mpi.IN_PLACE if inplace else x, out, self._ops[op]
        )
        self._wait(request, "all_reduce", group, start)
        return mean_of(out, len(group)) if op == "mean" else out

    def all_gather(
        self, x: np.ndarray, group: Group, dim: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        if len(group) == 1:
            return x
        x = contiguous(x)
        out = np.empty((len(group), *x.shape), x.dtype) if out is None else out
        start = time.perf_counter()
        self._wait(self._comm(group).Iallgather(x, out), "all_gather", group, start)
        return concat_blocks(out, dim)

    def reduce_scatter(
        self, x: np.ndarray, group: Group, dim: int, op: str, out: np.ndarray | None = None
    ) -> np.ndarray:
        if len(group) == 1:
            return x
        send = split_blocks(x, len(group), dim, "reduce_scatter")
        out = np.empty(send.shape[1:], x.dtype) if out is None else out
        start = time.perf_counter()
        request = self._comm(group).Ireduce_scatter_block(send, out, self._ops[op])
        self._wait(request, "reduce_scatter", group, start)
        return mean_of(out, len(group)) if op == "mean" else out

    def all_to_all(
        self, x: np.ndarray, group: Group, split_dim: int, concat_dim: int
    ) -> np.ndarray:
        if len(group) == 1:
            return x
        send = split_blocks(x, len(group), split_dim, "all_to_all")
        out = np.empty_like(send)
        start = time.perf_counter()
        self._wait(self._comm(group).Ialltoall(send, out), "all_to_all", group, start)
        return concat_blocks(out, concat_dim)

    def broadcast(self, x: np.ndarray, group: Group, root: int) -> np.ndarray:
        if len(group) == 1:
            return x
        out = contiguous(x).copy()
        start = time.perf_counter()
        request = self._comm(group).Ibcast(out, root=group.index(root))
        self._wait(request, "broadcast", group, start)
        return out

    def send(self, x: np.ndarray, dst: int, tag: int) -> None:
        x = contiguous(x)
        start = time.perf_counter()
        self._sends.append((self.world.Isend(x, dst, tag), x, dst))
        self.seconds += time.perf_counter() - start

    def recv(self, out: np.ndarray, src: int, tag: int) -> None:
        start = time.perf_counter()
        request = self.world.Irecv(out, src, tag)
        self._wait(request, f"recv from rank {src} (tag {tag})", [src], start)

    def wait_sends(self) -> None:
        for request, _, dst in self._sends:
            self._wait(request, f"send to rank {dst}", [dst], time.perf_counter())
        self._sends.clear()

    def send_object(self, obj: object, dst: int, tag: int) -> None:
        payload = np.frombuffer(pickle.dumps(obj, protocol=5), np.uint8)
        self.send(np.array([payload.size], np.int64), dst, tag)
        self.send(payload, dst, tag)

    def recv_object(self, src: int, tag: int) -> object:
        size = np.empty(1, np.int64)
        self.recv(size, src, tag)
        payload = np.empty(int(size[0]), np.uint8)
        self.recv(payload, src, tag)
        return pickle.loads(payload.tobytes())

    def all_gather_host(self, x: np.ndarray) -> np.ndarray:
        x = contiguous(x)
        out = np.empty((self.size, *x.shape), x.dtype)
        start = time.perf_counter()
        request = self.world.Iallgather(x, out)
        self._wait(request, "all_gather", range(self.size), start, count=False)
        return out

    def broadcast_object(self, obj: object, root: int) -> object:
        everyone = tuple(range(self.size))
        if self.size == 1:
            return obj
        if everyone not in self._groups:
            self._groups[everyone] = self.world
        payload = np.frombuffer(pickle.dumps(obj, protocol=5), np.uint8)
        size = self.broadcast(np.array([payload.size], np.int64), everyone, root)
        buf = payload if self.rank == root else np.empty(int(size[0]), np.uint8)
        return pickle.loads(self.broadcast(buf, everyone, root).tobytes())


def mesh_groups(devices_by_coords, shape: Sequence[int]) -> list[Group]:
    """Every group a stage can communicate over: for each ordered tuple of distinct axes, the
    device sets that vary only along them. ``devices_by_coords(coords)`` -> device id."""
    groups: list[Group] = []
    axes_all = range(len(shape))
    for r in range(1, len(shape) + 1):
        for axes in itertools.permutations(axes_all, r):
            fixed = [a for a in axes_all if a not in axes]
            for base in itertools.product(*(range(shape[a]) for a in fixed)):
                members = []
                for moving in itertools.product(*(range(shape[a]) for a in axes)):
                    coords = [0] * len(shape)
                    for a, c in zip(fixed, base, strict=True):
                        coords[a] = c
                    for a, c in zip(axes, moving, strict=True):
                        coords[a] = c
                    members.append(devices_by_coords(coords))
                groups.append(tuple(members))
    return groups
