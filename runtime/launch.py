"""Start the ranks: join an MPI/Slurm job we are already part of, or run ``mpiexec`` ourselves.

On one machine ``alpa-plan run`` prepares the training step once (so a wrong model or data
file fails before any rank starts), checks what the backend needs (a GPU plan: onnxruntime-gpu,
cupy, one GPU per rank), writes the step to a temporary folder, and launches
``mpiexec -n <ranks>`` (the one next to this Python, from the MPICH wheel) on
``python -m runtime.worker``, each rank pinned to its share of the cores (``binding``).
Inside an existing job of the right size every rank runs the worker directly, rank 0
prepares the step and the ranks check the backend together.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from planner.errors import UserError
from planner.plan_io import load_plan

SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
BIND = "ALPA_BIND"  # "none": leave rank placement to the OS scheduler
PID_DIR = "ALPA_PID_DIR"  # each rank's <pid>.rank, removed when it ends by itself
DEAD_PID = re.compile(r"PID (\d+) RUNNING AT")  # MPICH hydra's bad-termination banner


def binding(ranks: int) -> list[str]:
    """``mpiexec`` options pinning each rank to its own ``cpus // ranks`` logical CPUs (as
    Open MPI does by default and MPICH does not): a rank the scheduler moves onto a busy CPU
    stalls every rank at the next collective (the same plan ran 8.7-12.9 ms per step
    unpinned, 9.2-10.2 ms pinned). None when the ranks outnumber the CPUs, or with
    ALPA_BIND=none."""
    cpus = _cpus()
    if os.environ.get(BIND) == "none" or not cpus or ranks > cpus:
        return []
    return ["-bind-to", f"hwthread:{cpus // ranks}"]


def _cpus() -> int | None:
    """Logical CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def oversubscription_note(ranks: int) -> str | None:
    """A note when ``ranks`` CPU ranks outnumber this machine's CPUs: unless its cluster was
    profiled here, the plan priced every rank with a core of its own, so its steps will run
    slower than it predicts."""
    cpus = _cpus()
    if not cpus or ranks <= cpus:
        return None
    return (
        f"note: the plan's {ranks} ranks share {cpus} CPUs here; unless its cluster was "
        "profiled on this machine, each rank was priced with a core of its own and steps will "
        f"run slower than predicted (compile for cpu:{cpus} to match this machine)"
    )


def job_size() -> int | None:
    """World size of the MPI or Slurm job this process belongs to, if any."""
    for var in SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if os.environ.get("SLURM_PROCID") and os.environ.get("SLURM_NTASKS", "").isdigit():
        return int(os.environ["SLURM_NTASKS"])
    return None


def mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        raise UserError(
            "mpiexec not found: install the project (pip install -e .) which "
            "brings the MPICH wheel, or run inside mpiexec/srun yourself"
        )
    return found


@dataclass(frozen=True)
class CheckpointArgs:
    folder: str
    every: int = 0  # 0: only after the last step
    resume: bool = False
    reshard: bool = False

    def argv(self) -> list[str]:
        return [
            "--checkpoint-dir",
            self.folder,
            "--checkpoint-every",
            str(self.every),
            *(["--resume"] if self.resume else []),
            *(["--reshard"] if self.reshard else []),
        ]


def run_mpiexec(cmd: list[str], pid_dir: str) -> int:
    """Run ``cmd``, passing its output through; when a rank dies, mpiexec ends every other
    rank and names only the pid (in a banner on stdout): say which rank it was, on stderr."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, PID_DIR: pid_dir},
    )
    dead: list[str] = []

    def forward(stream: IO[str], to: IO[str]) -> None:
        for line in stream:
            to.write(line)
            to.flush()
            found = DEAD_PID.search(line)
            if found:
                dead.append(found.group(1))

    assert proc.stdout is not None and proc.stderr is not None
    threads = [
        threading.Thread(target=forward, args=(proc.stdout, sys.stdout)),
        threading.Thread(target=forward, args=(proc.stderr, sys.stderr)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    code = proc.wait()
    rank_files = [Path(pid_dir) / f"{pid}.rank" for pid in dead]
    if code != 0 and rank_files and rank_files[0].exists():
        sys.stderr.write(
            f"alpa-plan: rank {rank_files[0].read_text()} (pid {dead[0]}) died; mpiexec ended "
            "every other rank\n"
        )
    return code


def launch(
    plan_path: str,
    model: str | None,
    steps: int,
    data: str | None,
    report: str | None,
    verify: bool,
    step_dir: str | None = None,
    checkpoints: CheckpointArgs | None = None,
    backend: str = "auto",
) -> int:
    """Run the plan on its ranks with ``backend`` (auto|cpu|cuda, see ``runtime.backend``);
    returns the job's exit code."""
    from runtime.backend import check_local, resolve
    from runtime.worker import main, required_ranks

    plan = load_plan(plan_path)
    ranks = required_ranks(plan)
    args = [plan_path, "--steps", str(steps), "--backend", backend]
    args += ["--data", data] if data else []
    args += ["--report", report] if report else []
    args += ["--verify"] if verify else []
    args += checkpoints.argv() if checkpoints else []
    size = job_size()
    if size is not None and (size > 1 or ranks == 1):
        if size != ranks:
            raise UserError(f"this MPI job has {size} ranks; the plan needs {ranks}")
        return main([*args, *(["--step", step_dir] if step_dir else ["--model", model or ""])])
    check_local(backend, plan, ranks)
    with tempfile.TemporaryDirectory(prefix="alpa-step-") as tmp:
        if step_dir is None:
            from runtime.data import load_batch
            from runtime.step import prepare_step

            if model is None:
                raise UserError("pass --model (the ONNX file the plan was compiled from)")
            step = prepare_step(plan, model)
            if data:
                load_batch(data, step.model.graph, set(step.state), plan.options.microbatches)
            step.save(tmp)
            step_dir = tmp
        timed = not verify and resolve(backend, plan) == "cpu"  # verify times nothing
        note = oversubscription_note(ranks) if timed else None
        if note:  # after every check: an error stays the one line
            sys.stderr.write(note + "\n")
        cmd = [
            mpiexec(),
            *binding(ranks),
            "-n",
            str(ranks),
            sys.executable,
            "-m",
            "runtime.worker",
            *args,
            "--step",
            step_dir,
        ]
        with tempfile.TemporaryDirectory(prefix="alpa-pids-") as pid_dir:
            return run_mpiexec(cmd, pid_dir)
