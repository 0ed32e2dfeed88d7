"""Start the ranks: join an MPI/Slurm job we are already part of, or run ``mpiexec`` ourselves.

On one machine ``alpa-plan run`` prepares the training step once (so a wrong model or data
file fails before any rank starts), writes it to a temporary folder, and launches
``mpiexec -n <ranks>`` (the one next to this Python, from the MPICH wheel) on
``python -m runtime.worker``. Inside an existing job of the right size every rank runs the
worker directly and rank 0 prepares the step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from planner.errors import UserError
from planner.plan_io import load_plan

SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


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


def launch(
    plan_path: str,
    model: str | None,
    steps: int,
    data: str | None,
    report: str | None,
    verify: bool,
    step_dir: str | None = None,
) -> int:
    """Run the plan on its ranks; returns the job's exit code."""
    from runtime.worker import main, required_ranks

    plan = load_plan(plan_path)
    ranks = required_ranks(plan)
    args = [plan_path, "--steps", str(steps)]
    args += ["--data", data] if data else []
    args += ["--report", report] if report else []
    args += ["--verify"] if verify else []
    size = job_size()
    if size is not None and (size > 1 or ranks == 1):
        if size != ranks:
            raise UserError(f"this MPI job has {size} ranks; the plan needs {ranks}")
        return main([*args, *(["--step", step_dir] if step_dir else ["--model", model or ""])])
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
        cmd = [
            mpiexec(),
            "-n",
            str(ranks),
            sys.executable,
            "-m",
            "runtime.worker",
            *args,
            "--step",
            step_dir,
        ]
        return subprocess.call(cmd)
