"""GPU backend: NCCL collectives (cupy) and onnxruntime CUDA sessions that keep tensors on GPU.

One MPI rank drives one GPU. ``NcclCommunicator`` implements ``runtime.comm.Communicator``
over cupy arrays: every group the stage communicates over gets its own NCCL communicator,
whose unique id the group's first member creates and MPI distributes (NCCL needs an
out-of-band channel to bootstrap; MPI is already there). Objects, metrics and aborts stay
on MPI, the control plane. ``CudaSession`` runs a segment with IO binding so inputs and
outputs live on the device and the only host copies are the ones the executor asks for.
NCCL, onnxruntime and cupy all work on one stream per rank, so a session's inputs are ready
when it starts and a collective sees the session's outputs, without host synchronisation.

Point-to-point sends have no tags in NCCL: a send matches the peer's next receive from this
rank, so both sides must issue their transfers to each other in the same order (the
executor's schedules do; ``tag`` is accepted for the interface and not used for matching).

Nothing here imports cupy or needs a GPU until a communicator or session is built, so the
CPU-only install imports it, and ``require_cuda`` says what to install when it is missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from planner.errors import UserError
from runtime.comm import (
    Communicator,
    Group,
    MpiCommunicator,
    concat_blocks,
    contiguous,
    mean_of,
    split_blocks,
)

CPU_HINT = "(or run with --backend cpu)"
ORT_GPU_HINT = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
CUPY_HINT = "pip install 'alpa-plan[cuda]' (cupy-cuda13x; cupy-cuda12x for CUDA 12)"
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
NCCL_DTYPES = {
    "float16": "NCCL_FLOAT16",
    "bfloat16": "NCCL_BFLOAT16",
    "float32": "NCCL_FLOAT32",
    "float64": "NCCL_FLOAT64",
    "int8": "NCCL_INT8",
    "uint8": "NCCL_UINT8",
    "int32": "NCCL_INT32",
    "int64": "NCCL_INT64",
    "bool": "NCCL_UINT8",
}
NCCL_OPS = {"sum": "NCCL_SUM", "mean": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}
ORT_ELEMENT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def require_cuda(why: str, providers: Sequence[str] | None = None, fallback: str = CPU_HINT) -> Any:
    """The ``cupy`` module, after checking that onnxruntime has the CUDA execution provider
    and cupy imports with NCCL; otherwise a one-line ``UserError`` saying, after ``why`` (what
    asked for the GPU), what is missing and how to install it, then ``fallback``."""
    if providers is None:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise UserError(
            f"{why} but onnxruntime has no CUDAExecutionProvider (it has {list(providers)}): "
            f"{ORT_GPU_HINT} {fallback}"
        )
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401  (fails when cupy was built without NCCL)
    except ImportError as exc:
        raise UserError(
            f"{why} but cupy with NCCL is not importable ({exc}): {CUPY_HINT} {fallback}"
        ) from None
    return cupy


def visible_gpus(cp: Any, why: str, fallback: str = CPU_HINT) -> int:
    """How many GPUs CUDA shows this process; a ``UserError`` when none (no driver, no
    device, or CUDA_VISIBLE_DEVICES hiding them all)."""
    try:
        count = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # cupy raises CUDARuntimeError without a driver or device
        count, detail = 0, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        detail = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
    if count < 1:
        raise UserError(
            f"{why} but CUDA sees no GPU ({detail}): check nvidia-smi and "
            f"CUDA_VISIBLE_DEVICES {fallback}"
        )
    return count


def local_rank(rank: int, devices_per_host: int, env: Mapping[str, str] = os.environ) -> int:
    """This rank's index on its host: the launcher's local-rank variable when it sets one
    (MPICH, Open MPI, Slurm, torchrun), else ``rank mod devices_per_host`` (plans place
    devices host-major, so global device id = host * devices_per_host + local)."""
    for var in LOCAL_RANK_VARS:
        if env.get(var, "").isdigit():
            return int(env[var])
    return rank % devices_per_host


def gpu_for_rank(
    rank: int, devices_per_host: int, visible: int, env: Mapping[str, str] = os.environ
) -> int:
    """CUDA device ordinal of ``rank``; one rank per GPU, so more local ranks than visible
    GPUs is a launch mistake, reported rather than silently sharing a GPU."""
    local = local_rank(rank, devices_per_host, env)
    if local >= visible:
        raise UserError(
            f"rank {rank} is local rank {local} but this host shows {visible} GPU(s): "
            "launch one rank per GPU (check CUDA_VISIBLE_DEVICES and -n / --ntasks-per-node)"
        )
    return local


def ids_to_create(groups: Iterable[Group], rank: int) -> list[Group]:
    """The groups whose NCCL unique id ``rank`` creates: those it leads (first member), so
    each id's bootstrap root lives in a process of its own group."""
    return sorted({g for g in groups if len(g) > 1 and g[0] == rank})


def my_communicators(
    groups: Iterable[Group], rank: int, ids: Mapping[Group, object]
) -> list[tuple[Group, int, object]]:
    """(group, NCCL rank = position in the group, unique id) for every multi-rank group of
    ``rank``, in one global order: NCCL init blocks until the whole group joins, and with a
    shared order the smallest unfinished group always has all its members waiting on it."""
    mine = sorted({g for g in groups if len(g) > 1 and rank in g})
    missing = [g for g in mine if g not in ids]
    if missing:
        raise ValueError(f"no NCCL unique id for groups {missing}")
    return [(g, g.index(rank), ids[g]) for g in mine]


def nccl_dtype(nccl: Any, dtype: np.dtype) -> int:
    name = NCCL_DTYPES.get(np.dtype(dtype).name)
    if name is None or not hasattr(nccl, name):
        raise UserError(f"NCCL cannot communicate {np.dtype(dtype).name} tensors")
    return getattr(nccl, name)


class NcclCommunicator(Communicator):
    """NCCL data plane, MPI control plane (``mpi``, the job's communicator). Each collective
    runs on this rank's stream and is waited for (polled against ``ALPA_COMM_TIMEOUT``), so
    ``seconds`` is real time and a dead peer aborts the job instead of hanging it.

    Setup problems (no CUDA provider, no cupy, too few GPUs for this host's ranks) are
    agreed on over MPI first, so every rank raises the same ``UserError`` and none is left
    waiting in an NCCL bootstrap the others never reach."""

    def __init__(self, mpi: MpiCommunicator, devices_per_host: int, why: str):
        self.mpi = mpi
        self.rank, self.size = mpi.rank, mpi.size
        problem = None
        try:
            self.cp = self.xp = require_cuda(why)
            self.device = gpu_for_rank(self.rank, devices_per_host, visible_gpus(self.cp, why))
        except UserError as exc:
            problem = str(exc)
        first = next((p for p in mpi.world.allgather(problem) if p), None)
        if first is not None:
            raise UserError(first)
        from cupy.cuda import nccl

        self.nccl = nccl
        self.cp.cuda.Device(self.device).use()
        # Not the default stream: onnxruntime ignores stream 0 as a user stream.
        self.stream = self.cp.cuda.Stream(non_blocking=True)
        self.stream.use()
        self.seconds = 0.0
        self.calls = 0
        self._comms: dict[Group, Any] = {}
        self._pending: list[Any] = []
        world = tuple(range(self.size))
        if self.size > 1:
            self._comms.update(self._create([world]))
        else:  # NCCL still runs on one rank: lets a single GPU check the whole path
            self._comms[world] = self.nccl.NcclCommunicator(1, self.nccl.get_unique_id(), 0)
        self._world = self._comms[world]

    @property
    def world(self) -> Any:
        """The MPI world of the control plane (barriers and small objects)."""
        return self.mpi.world

    def to_device(self, x: np.ndarray) -> Any:
        return self.cp.asarray(x)

    def to_host(self, x: Any) -> np.ndarray:
        return self.cp.asnumpy(x)

    def _create(self, groups: Iterable[Group]) -> dict[Group, Any]:
        groups = list(groups)
        made = {g: self.nccl.get_unique_id() for g in ids_to_create(groups, self.rank)}
        ids: dict[Group, object] = {}
        for part in self.mpi.world.allgather(made):
            ids.update(part)
        out = {}
        for group, nccl_rank, uid in my_communicators(groups, self.rank, ids):
            out[group] = self.nccl.NcclCommunicator(len(group), uid, nccl_rank)
        return out

    def add_groups(self, groups: Iterable[Group]) -> None:
        """Create the NCCL communicators of ``groups`` (every rank passes the same list)."""
        new = [g for g in set(groups) if g not in self._comms]
        self._comms.update(self._create(new))

    def _comm(self, group: Group) -> Any:
        if self.rank not in group:
            raise ValueError(f"rank {self.rank} is not in group {group}")
        return self._comms[group]

    def _wait(self, what: str, peers: Sequence[int], comm: Any = None) -> None:
        stream = self.cp.cuda.get_current_stream()
        start = time.perf_counter()
        deadline = start + self.mpi.timeout
        while not stream.done:
            if time.perf_counter() > deadline:
                if comm is not None:
                    comm.abort()
                self.fail(
                    f"{what} timed out after {self.mpi.timeout:g}s waiting for ranks "
                    f"{sorted(set(peers) - {self.rank})}"
                )
            time.sleep(1e-5)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def _run(self, what: str, group: Group, call: Callable[[Any, int], None]) -> None:
        comm = self._comm(group)
        call(comm, self.cp.cuda.get_current_stream().ptr)
        self._wait(what, group, comm)

    def fail(self, message: str) -> None:
        self.mpi.fail(message)

    def all_reduce(self, x, group: Group, op: str, inplace: bool = False):
        if len(group) == 1:
            return x
        x = contiguous(self.cp.asarray(x))
        out = x if inplace else self.cp.empty_like(x)  # NCCL reduces in place when they match
        dtype, reduce = nccl_dtype(self.nccl, x.dtype), getattr(self.nccl, NCCL_OPS[op])
        self._run(
            "all_reduce",
            group,
            lambda c, s: c.allReduce(x.data.ptr, out.data.ptr, x.size, dtype, reduce, s),
        )
        return mean_of(out, len(group)) if op == "mean" else out

    def all_gather(self, x, group: Group, dim: int, out=None):
        if len(group) == 1:
            return x
        x = contiguous(self.cp.asarray(x))
        out = self.cp.empty((len(group), *x.shape), x.dtype) if out is None else out
        dtype = nccl_dtype(self.nccl, x.dtype)
        self._run(
            "all_gather",
            group,
            lambda c, s: c.allGather(x.data.ptr, out.data.ptr, x.size, dtype, s),
        )
        return concat_blocks(out, dim)

    def reduce_scatter(self, x, group: Group, dim: int, op: str, out=None):
        if len(group) == 1:
            return x
        send = split_blocks(self.cp.asarray(x), len(group), dim, "reduce_scatter")
        out = self.cp.empty(send.shape[1:], send.dtype) if out is None else out
        dtype, reduce = nccl_dtype(self.nccl, send.dtype), getattr(self.nccl, NCCL_OPS[op])
        self._run(
            "reduce_scatter",
            group,
            lambda c, s: c.reduceScatter(send.data.ptr, out.data.ptr, out.size, dtype, reduce, s),
        )
        return mean_of(out, len(group)) if op == "mean" else out

    def all_to_all(self, x, group: Group, split_dim: int, concat_dim: int):
        if len(group) == 1:
            return x
        send = split_blocks(self.cp.asarray(x), len(group), split_dim, "all_to_all")
        out = self.cp.empty_like(send)
        dtype, me = nccl_dtype(self.nccl, send.dtype), group.index(self.rank)
        count = send[0].size

        def exchange(c: Any, s: int) -> None:
            # Grouped sends/receives run concurrently, so no pair waits on another.
            self.nccl.groupStart()
            for peer in range(len(group)):
                if peer == me:
                    continue
                c.send(send[peer].data.ptr, count, dtype, peer, s)
                c.recv(out[peer].data.ptr, count, dtype, peer, s)
            self.nccl.groupEnd()

        self._run("all_to_all", group, exchange)
        out[me] = send[me]
        return concat_blocks(out, concat_dim)

    def broadcast(self, x, group: Group, root: int):
        if len(group) == 1:
            return x
        buf = self.cp.array(x, copy=True, order="C")
        dtype, index = nccl_dtype(self.nccl, buf.dtype), group.index(root)
        self._run(
            "broadcast",
            group,
            lambda c, s: c.broadcast(buf.data.ptr, buf.data.ptr, buf.size, dtype, index, s),
        )
        return buf

    def send(self, x, dst: int, tag: int) -> None:
        x = contiguous(self.cp.asarray(x))
        stream = self.cp.cuda.get_current_stream().ptr
        self._world.send(x.data.ptr, x.size, nccl_dtype(self.nccl, x.dtype), dst, stream)
        self._pending.append(x)

    def recv(self, out, src: int, tag: int) -> None:
        """Receive into ``out`` (a cupy array; a numpy ``out`` is filled from the device)."""
        buf = out if isinstance(out, self.cp.ndarray) else self.cp.empty(out.shape, out.dtype)
        stream = self.cp.cuda.get_current_stream().ptr
        self._world.recv(buf.data.ptr, buf.size, nccl_dtype(self.nccl, buf.dtype), src, stream)
        self._wait(f"recv from rank {src}", [src], self._world)
        if buf is not out:
            out[...] = self.cp.asnumpy(buf)

    def wait_sends(self) -> None:
        self._wait("send", range(self.size), self._world)
        self._pending.clear()

    def send_object(self, obj: object, dst: int, tag: int) -> None:
        self.mpi.send_object(obj, dst, tag)

    def recv_object(self, src: int, tag: int) -> object:
        return self.mpi.recv_object(src, tag)

    def all_gather_host(self, x: np.ndarray) -> np.ndarray:
        return self.mpi.all_gather_host(x)

    def broadcast_object(self, obj: object, root: int) -> object:
        return self.mpi.broadcast_object(obj, root)


def numpy_dtype(ort_element_type: str) -> type:
    """numpy dtype of an ``OrtValue.data_type()`` string such as ``tensor(float)``."""
    try:
        return ORT_ELEMENT_TYPES[ort_element_type]
    except KeyError:
        raise UserError(f"no numpy dtype for onnxruntime type {ort_element_type!r}") from None


def load_cuda_libraries(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries that pip's ``nvidia-*`` packages (or a matching
    PyTorch) carry, so the CUDA provider finds them without LD_LIBRARY_PATH; onnxruntime-gpu's
    own ``preload_dlls`` does it (a no-op in CPU builds and in builds that predate it)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


class CudaSession:
    """An onnxruntime session on one GPU whose inputs and outputs stay in device memory.

    It runs on ``stream`` (the communicator's), so it reads inputs that cupy and NCCL
    produced on that stream in order; TF32 is off, so float32 graphs compute in float32 as
    the plan priced them (and ``verify``'s fp32 tolerance holds on GPUs too)."""

    def __init__(self, model: bytes, device: int, options: Any = None, stream: int = 0):
        import onnxruntime as ort

        self.cp = require_cuda("a CUDA session needs the GPU", ort.get_available_providers())
        load_cuda_libraries(ort)
        self.ort = ort
        self.device = device
        cuda = {"device_id": str(device), "use_tf32": "0"}
        if stream:
            cuda["user_compute_stream"] = str(stream)
        self.session = ort.InferenceSession(
            model, options, providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        )
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise UserError(
                f"onnxruntime could not place a session on GPU {device} (CUDA or cuDNN "
                f"libraries missing?): check that onnxruntime-gpu matches the CUDA install "
                f"{CPU_HINT}"
            )

    def run(self, outputs: Sequence[str], feeds: Mapping[str, Any]) -> list[Any]:
        """Run with cupy (or numpy, copied up once) inputs; returns cupy arrays that alias
        onnxruntime's output buffers (kept alive by the arrays)."""
        binding = self.session.io_binding()
        bound = []  # bound by pointer: must outlive the run
        for name, x in feeds.items():
            if isinstance(x, self.cp.ndarray):
                bound.append(x := contiguous(x))
                binding.bind_input(name, "cuda", self.device, x.dtype, list(x.shape), x.data.ptr)
            else:
                value = self.ort.OrtValue.ortvalue_from_numpy(
                    contiguous(np.asarray(x)), "cuda", self.device
                )
                binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cuda", self.device)
        self.session.run_with_iobinding(binding)
        return [self._as_cupy(v) for v in binding.get_outputs()]

    def _as_cupy(self, value: Any) -> Any:
        dtype = np.dtype(numpy_dtype(value.data_type()))
        shape = tuple(value.shape())
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        memory = self.cp.cuda.UnownedMemory(value.data_ptr(), size, value, self.device)
        return self.cp.ndarray(shape, dtype, self.cp.cuda.MemoryPointer(memory, 0))


def self_check() -> dict[str, bool]:
    """Every collective through NCCL on this job's world group (works with one rank too,
    where NCCL still runs): result name -> matches numpy. Used by bench/device_check.sh."""
    devices = max(1, int(os.environ.get("ALPA_GPUS", "1")))
    comm = NcclCommunicator(MpiCommunicator(), devices, "the NCCL self-check needs a GPU")
    cp = comm.cp
    raw = comm._comms[tuple(range(comm.size))]
    x = cp.arange(4 * max(2, comm.size), dtype=cp.float32) + comm.rank
    dtype = nccl_dtype(comm.nccl, x.dtype)
    stream = cp.cuda.get_current_stream().ptr
    out = cp.empty_like(x)
    raw.allReduce(x.data.ptr, out.data.ptr, x.size, dtype, comm.nccl.NCCL_SUM, stream)
    gathered = cp.empty((comm.size, *x.shape), x.dtype)
    raw.allGather(x.data.ptr, gathered.data.ptr, x.size, dtype, stream)
    scattered = cp.empty(x.size // comm.size, x.dtype)
    raw.reduceScatter(
        x.data.ptr, scattered.data.ptr, scattered.size, dtype, comm.nccl.NCCL_SUM, stream
    )
    bcast = x.copy()
    raw.broadcast(bcast.data.ptr, bcast.data.ptr, bcast.size, dtype, 0, stream)
    cp.cuda.get_current_stream().synchronize()
    base = np.arange(x.size, dtype=np.float32)
    total = sum(base + r for r in range(comm.size))
    return {
        "all_reduce": bool(np.allclose(cp.asnumpy(out), total)),
        "all_gather": bool(
            all(np.allclose(cp.asnumpy(gathered[r]), base + r) for r in range(comm.size))
        ),
        "reduce_scatter": bool(
            np.allclose(cp.asnumpy(scattered), np.split(total, comm.size)[comm.rank])
        ),
        "broadcast": bool(np.allclose(cp.asnumpy(bcast), base)),
    }


if __name__ == "__main__":
    import json
    import sys

    try:
        results = self_check()
    except UserError as exc:
        print(f"error: {exc}")
        sys.exit(2)
    print(json.dumps(results))
    sys.exit(0 if all(results.values()) else 1)
