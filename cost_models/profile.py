"""Calibrate a CPU cluster spec on this machine (``alpa-plan profile``).

The preset numbers in ``clusters/cpu.yaml`` are guesses; plans are only as good as the costs
they are ranked by. This module measures what the executor actually gets and writes a cluster
yaml that ``compile --cluster FILE`` accepts:

- compute: onnxruntime MatMul sessions at a few sizes, on every rank at once with the
  executor's thread count; peak = best achieved FLOP/s per dtype;
- memory bandwidth: a large elementwise Add (3 x n x 4 bytes moved);
- kernel latency: the slope of session time over a chain of tiny Adds (cost per extra op);
- links: all-reduce / all-gather / reduce-scatter / send-recv at several sizes through the
  executor's MPI communicator, alpha and bandwidth fitted by least squares on relative error
  to the very formulas of ``cost_models.collectives``.

Measured rates are stored as the peak with efficiency 1.0: the yaml then says what this
machine achieves, and ``peak * efficiency`` in the roofline is the measured rate unchanged.
Simulated hosts (``cpu:HxN``) share one machine's transport, so both links get the fitted one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cost_models import collectives
from cost_models.cluster import Cluster, cluster_from_dict, resolve_cluster
from planner.errors import UserError

MATMUL_SIZES = {"float32": (64, 128, 256, 512), "float64": (128, 256)}
ADD_ELEMENTS = 1 << 22
CHAIN_OPS = 64


def _no_barrier() -> None:
    return None


def mean_seconds(fn: Callable[[], object], budget: float) -> float:
    """Mean wall time of ``fn`` over as many calls as fit ``budget`` seconds (at least 5),
    after two warm-up calls (onnxruntime allocates its arena on the first run). The mean, not
    the median: a training step pays for preemption and cache misses too, so the rate a plan
    sees is the sustained one on a shared machine, not the best-case call."""
    fn()
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < 5 or (spent < budget and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return float(np.mean(times))


def _session(nodes, inputs, outputs, threads: int):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "profile", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _tensor(name: str, dtype: str, shape: Sequence[int]):
    from onnx import helper
    from onnx.helper import np_dtype_to_tensor_dtype

    return helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def matmul_runner(n: int, dtype: str, threads: int) -> Callable[[], object]:
    """A call that runs one n x n MatMul session (random inputs, fixed seed)."""
    from onnx import helper

    session = _session(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [_tensor("a", dtype, [n, n]), _tensor("b", dtype, [n, n])],
        [_tensor("c", dtype, [n, n])],
        threads,
    )
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((n, n)).astype(dtype) for k in ("a", "b")}
    return lambda: session.run(None, feeds)


def add_chain_seconds(ops: int, elements: int, threads: int, budget: float) -> float:
    """One session of ``ops`` chained float32 Adds on ``elements`` elements."""
    from onnx import helper

    nodes = [
        helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", "x"], [f"y{i}"])
        for i in range(ops)
    ]
    session = _session(
        nodes,
        [_tensor("x", "float32", [elements])],
        [_tensor(f"y{ops - 1}", "float32", [elements])],
        threads,
    )
    feeds = {"x": np.ones(elements, np.float32)}
    return mean_seconds(lambda: session.run(None, feeds), budget)


def measure_compute(
    threads: int, budget: float, barrier: Callable[[], object] = _no_barrier
) -> dict:
    """Achieved FLOP/s per dtype and matrix size, bytes/s, per-op and per-session seconds.
    ``barrier`` lines the ranks up before each measurement so they contend as in a run."""
    flops: dict[str, dict[int, float]] = {}
    for dtype, sizes in MATMUL_SIZES.items():
        flops[dtype] = {}
        for n in sizes:
            barrier()
            flops[dtype][n] = 2 * n**3 / mean_seconds(matmul_runner(n, dtype, threads), budget)
    barrier()
    bandwidth = 3 * ADD_ELEMENTS * 4 / add_chain_seconds(1, ADD_ELEMENTS, threads, budget)
    barrier()
    one = add_chain_seconds(1, 16, threads, budget)
    barrier()
    chain = add_chain_seconds(CHAIN_OPS + 1, 16, threads, budget)
    return {
        "matmul_flops": flops,
        "memory_bandwidth": bandwidth,
        "kernel_latency": max(0.0, (chain - one) / CHAIN_OPS),
        "session_call": one,
    }


def _coefficients(kind: str, ranks: int, nbytes: float) -> tuple[float, float]:
    """(alpha, 1/bandwidth) multipliers of ``kind`` in ``cost_models.collectives``."""
    if kind == "send_recv":
        return 1.0, float(nbytes)
    fn = collectives.COLLECTIVES[kind]
    return (
        fn(nbytes, collectives.flat_link(ranks, 1.0, math.inf)),
        fn(nbytes, collectives.flat_link(ranks, 0.0, 1.0)),
    )


def fit_link(samples: Sequence[dict]) -> tuple[float, float, float]:
    """Least-squares alpha (s) and bandwidth (bytes/s) over samples ``{kind, ranks, bytes,
    seconds}``, minimising relative error so microsecond latencies weigh as much as
    millisecond transfers; also returns the median relative error of the fit."""
    from scipy.optimize import nnls

    # A call lost in the noise of the compute it follows measures nothing: leave it out.
    samples = [s for s in samples if s["seconds"] > 0]
    if not samples:
        raise UserError("no communication samples to fit (profile needs at least 2 ranks)")
    a = np.array([_coefficients(s["kind"], s["ranks"], s["bytes"]) for s in samples])
    t = np.array([s["seconds"] for s in samples])
    (alpha, inv_bw), _ = nnls(a / t[:, None], np.ones_like(t))
    if inv_bw <= 0:
        raise UserError("communication time did not grow with message size: rerun profile")
    error = float(np.median(np.abs(a @ [alpha, inv_bw] - t) / t))
    return float(alpha), float(1.0 / inv_bw), error


def cluster_from_measurements(base: Cluster, measured: dict) -> tuple[Cluster, dict]:
    """The base cluster with measured device rates and links; also a summary for the yaml."""
    ranks = measured["compute"]
    # The slowest rank sets the pace of a synchronous step.
    peak = {
        dtype: min(max(r["matmul_flops"][dtype].values()) for r in ranks) for dtype in MATMUL_SIZES
    }
    bandwidth = min(r["memory_bandwidth"] for r in ranks)
    latency = max(float(np.median([r["kernel_latency"] for r in ranks])), 1e-7)
    data = base.model_dump()
    data["device"] |= {
        "peak_flops": peak,
        "memory_bandwidth": bandwidth,
        "compute_efficiency": 1.0,
        "memory_efficiency": 1.0,
        "kernel_latency": latency,
    }
    summary = {
        "ranks": measured["ranks"],
        "threads_per_rank": measured["threads"],
        "session_call_seconds": float(np.median([r["session_call"] for r in ranks])),
    }
    if measured["comm"]:
        alpha, link_bw, error = fit_link(measured["comm"])
        data["intra_host"] = data["inter_host"] = {"bandwidth": link_bw, "latency": alpha}
        summary["link_fit_median_relative_error"] = error
    return cluster_from_dict(data, source="measured cluster"), summary


def run_workers(ranks: int, threads: int, budget: float) -> dict:
    """Launch the profile worker on ``ranks`` MPI ranks and return rank 0's measurements."""
    from runtime.launch import mpiexec

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="alpa-profile-") as tmp:
        out = Path(tmp) / "measured.json"
        cmd = [
            mpiexec(),
            "-n",
            str(ranks),
            sys.executable,
            "-m",
            "cost_models.profile_worker",
            str(out),
            "--threads",
            str(threads),
            "--budget",
            str(budget),
        ]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"profile ranks failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(out.read_text())


def yaml_text(cluster: Cluster, base_spec: str, summary: dict) -> str:
    """The cluster as yaml, headed by how it was measured (comments: the schema forbids extra
    fields, and the numbers below it are what the planner reads)."""
    import yaml

    head = [
        f"# Measured by `alpa-plan profile --cluster {base_spec}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {summary['ranks']} MPI ranks x "
        f"{summary['threads_per_rank']} onnxruntime thread(s).",
        "# peak_* are achieved rates (efficiencies 1.0); kernel_latency = cost per extra op in",
        f"# a session; one session.run call costs {summary['session_call_seconds'] * 1e6:.1f} us.",
    ]
    if "link_fit_median_relative_error" in summary:
        head.append(
            "# Links: alpha-beta least squares over the executor's MPI collectives, median "
            f"relative error {summary['link_fit_median_relative_error']:.1%}."
        )
    body = yaml.safe_dump(cluster.model_dump(), sort_keys=False)
    return "\n".join(head) + "\n" + body


def profile(base_spec: str, output: str, threads: int = 1, budget: float = 0.05) -> Cluster:
    """Measure this machine as ``base_spec``'s ranks and write the calibrated yaml."""
    base = resolve_cluster(base_spec)
    if base.device.kind != "cpu":
        raise UserError(
            f"profile measures CPU ranks on this machine; {base_spec!r} is a "
            f"{base.device.kind} cluster (use cpu, cpu:N or cpu:HxN)"
        )
    if threads < 1 or budget <= 0:
        raise UserError("--threads must be >= 1 and --budget > 0")
    cluster, summary = cluster_from_measurements(
        base, run_workers(base.num_devices, threads, budget)
    )
    Path(output).write_text(yaml_text(cluster, base_spec, summary))
    return cluster
