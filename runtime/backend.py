"""Which backend executes a plan: onnxruntime on CPU ranks with MPI, or one GPU per rank with
onnxruntime's CUDA provider and NCCL (``runtime.cuda``).

``auto`` follows the plan's cluster (device kind ``gpu`` -> cuda); ``cpu`` and ``cuda``
override it, so a GPU plan can be smoke-run on CPU ranks and a CPU plan on GPUs. The launcher
checks what the backend needs before starting any rank; the ranks check again (a job started
by Slurm or mpiexec never went through the launcher) and agree on the first problem, so it
is reported once, as one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planner.errors import UserError
from planner.plan_schema import Plan
from runtime.comm import Communicator, MpiCommunicator

if TYPE_CHECKING:  # the CLI imports BACKENDS: keep onnxruntime out of its start-up
    from runtime.partition import Session

BACKENDS = ("auto", "cpu", "cuda")


def plan_device_kind(plan: Plan) -> str:
    """``gpu`` or ``cpu``: the kind of device the plan was compiled for (the cluster spec's
    default kind is gpu)."""
    return plan.cluster.get("device", {}).get("kind", "gpu")


def resolve(requested: str, plan: Plan) -> str:
    """``cpu`` or ``cuda``: the backend ``requested`` (auto|cpu|cuda) means for ``plan``."""
    if requested not in BACKENDS:
        raise UserError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    return "cuda" if plan_device_kind(plan) == "gpu" else "cpu"


def why_gpus(requested: str) -> str:
    """What asked for GPUs, for the first half of a missing-dependency message."""
    return "the plan targets GPUs" if requested == "auto" else "--backend cuda asks for GPUs"


def check_local(requested: str, plan: Plan, ranks: int) -> None:
    """Before ``mpiexec`` starts ``ranks`` ranks on this host: what the backend needs is here
    (onnxruntime-gpu, cupy with NCCL, one visible GPU per rank)."""
    if resolve(requested, plan) != "cuda":
        return
    from runtime.cuda import require_cuda, visible_gpus

    why = why_gpus(requested)
    gpus = visible_gpus(require_cuda(why), why)
    if ranks > gpus:
        raise UserError(
            f"the plan needs {ranks} ranks, one per GPU, but this host shows {gpus} GPU(s): "
            "run it on enough GPUs (mpiexec/srun across hosts) or with --backend cpu"
        )


@dataclass
class Backend:
    name: str  # cpu | cuda
    comm: Communicator
    make_session: Callable[[bytes], Session]  # serialized ONNX model -> session


def open_backend(requested: str, plan: Plan, mpi: MpiCommunicator) -> Backend:
    """This rank's communicator and session factory (every rank calls it)."""
    from runtime.partition import cpu_session

    if resolve(requested, plan) == "cpu":
        return Backend("cpu", mpi, cpu_session)
    devices_per_host = int(plan.cluster.get("devices_per_host", 1))
    return cuda_backend(mpi, devices_per_host, why_gpus(requested))


def cuda_backend(mpi: MpiCommunicator, devices_per_host: int, why: str) -> Backend:
    """NCCL on this rank's GPU, and CUDA sessions on the communicator's stream; ``why``: what
    asked for GPUs, for the error when they are missing."""
    from runtime.cuda import CudaSession, NcclCommunicator
    from runtime.partition import session_options

    comm = NcclCommunicator(mpi, devices_per_host, why)

    def make_session(model: bytes) -> Session:
        return CudaSession(model, comm.device, session_options(), comm.stream.ptr)

    return Backend("cuda", comm, make_session)
