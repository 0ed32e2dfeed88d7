"""Calibrate a cluster spec on this machine (``alpa-plan profile``).

The preset numbers in ``clusters/*.yaml`` are guesses; plans are only as good as the costs
they are ranked by. This module measures what the executor actually gets and writes a cluster
yaml that ``compile --cluster FILE`` accepts. A CPU spec is measured on MPI ranks sharing this
machine's cores; a GPU spec on one rank per visible GPU of this host (at most the spec's
devices per host), with onnxruntime's CUDA provider and NCCL, as ``run`` executes it (a
``Target`` holds the difference: sizes, sessions, where inputs live, and waiting for the
device). What one host cannot show stays the spec's: a GPU spec's inter-host link, and its
links altogether when this host has one GPU.

- compute: onnxruntime MatMul sessions at a few sizes, on every rank at once with the
  executor's thread count; peak = best achieved FLOP/s per dtype (on GPUs float32 without
  TF32, as the executor runs it, float16, and bfloat16 cast from float16 inputs);
- memory bandwidth: the slope of session time over a chain of Adds of 512 KiB tensors
  (64 MiB on GPUs; 3 x n x 4 bytes moved per Add; the per-call cost left out);
- kernel latency: the slope of session time over a chain of tiny Adds (cost per extra op);
- dispatch latency: what the executor (its own ``StageRunner``) pays per communication
  instruction besides the transfer: the instruction, and the session call it splits off;
- synchronisation: how long ranks wait for the slowest when they synchronise after every
  segment of work, per square root of the segment's seconds (stored as ``sync_jitter``; the
  planner charges it at every collective of a stage of several devices, see
  ``cost_models.collectives.sync_wait``). Measured on the workloads' real training steps
  when given (their jitter is what a plan's segments see), else on MatMul segments;
- workloads (optional): one-device training steps of the model to plan, run by the executor
  (in interleaved rounds, the median round of each);
  their measured time against the roofline's gives the share of the rates real graphs get
  (stored as the compute and memory efficiencies) and, from two or more sizes, what every op
  pays (stored as ``kernel_latency``: real ops cost more than a tiny Add);
- links: every collective kind and send/recv at several sizes through the executor's
  communicator (MPI, or NCCL on GPUs); one alpha and a bandwidth per kind fitted by least
  squares on relative error to the very formulas of ``cost_models.collectives`` (send/recv's
  is the link's bandwidth, the others go to ``collective_bandwidth``).

Measured rates are stored as the peak and the share as the efficiency: the yaml then says
what this machine achieves, and ``peak * efficiency`` in the roofline is the rate a rank
keeps in a step.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cost_models import collectives
from cost_models.cluster import Cluster, cluster_from_dict, resolve_cluster
from planner.errors import UserError

CHAIN_OPS = 64


@dataclass(frozen=True)
class Target:
    """Where measured sessions run: ``make_session`` builds one from a serialized model,
    ``to_device`` places an input where the executor keeps it, ``sync`` waits until submitted
    work is done (on a GPU the wall clock would otherwise time kernel launches only)."""

    kind: str  # cpu | gpu
    make_session: Callable[[bytes], Any]
    to_device: Callable[[np.ndarray], Any] = lambda x: x
    sync: Callable[[], None] = lambda: None

    @property
    def matmul_sizes(self) -> dict[str, tuple[int, ...]]:
        if self.kind == "gpu":  # large enough to reach the tensor cores' rate
            return {"float32": (1024, 2048, 4096), "float16": (2048, 4096, 8192),
                    "bfloat16": (2048, 4096, 8192)}  # fmt: skip
        return {"float32": (64, 128, 256, 512), "float64": (128, 256)}

    @property
    def add_elements(self) -> int:
        """Elements per tensor of the bandwidth chain: activations of the size a step's ops
        touch (512 KiB on CPUs), past the last-level cache on GPUs (64 MiB)."""
        return 1 << (24 if self.kind == "gpu" else 17)

    def runner(self, nodes, inputs, outputs, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        """A call that runs the graph once on ``feeds`` (placed once) and waits for it."""
        session = self.make_session(model_bytes(nodes, inputs, outputs))
        placed = {k: self.to_device(v) for k, v in feeds.items()}
        names = [o.name for o in outputs]

        def call() -> None:
            session.run(names, placed)
            self.sync()

        return call


def model_bytes(nodes, inputs, outputs) -> bytes:
    """A serialized one-graph model of ``nodes`` (opset 17)."""
    from onnx import helper

    graph = helper.make_graph(nodes, "profile", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def cpu_target(threads: int) -> Target:
    """onnxruntime CPU sessions with ``threads`` intra-op threads."""
    return Target("cpu", lambda model: _cpu_session(model, threads))


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


def _cpu_session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _tensor(name: str, dtype: str, shape: Sequence[int]):
    from onnx import helper
    from onnx.helper import np_dtype_to_tensor_dtype

    return helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def matmul_runner(n: int, dtype: str, target: Target) -> Callable[[], object]:
    """A call that runs one n x n MatMul session (random inputs, fixed seed). bfloat16,
    which numpy and cupy lack, is fed as float16 and cast inside (n^2 work beside n^3)."""
    from onnx import TensorProto, helper

    fed = "float16" if dtype == "bfloat16" else dtype
    nodes = [helper.make_node("MatMul", ["a", "b"], ["c"])]
    if dtype == "bfloat16":
        bf16 = TensorProto.BFLOAT16
        nodes = [
            helper.make_node("Cast", ["a"], ["a16"], to=bf16),
            helper.make_node("Cast", ["b"], ["b16"], to=bf16),
            helper.make_node("MatMul", ["a16", "b16"], ["c16"]),
            helper.make_node("Cast", ["c16"], ["c"], to=TensorProto.FLOAT16),
        ]
    rng = np.random.default_rng(0)
    return target.runner(
        nodes,
        [_tensor("a", fed, [n, n]), _tensor("b", fed, [n, n])],
        [_tensor("c", fed, [n, n])],
        {k: rng.standard_normal((n, n)).astype(fed) for k in ("a", "b")},
    )


def add_chain_seconds(ops: int, elements: int, target: Target, budget: float) -> float:
    """One session of ``ops`` chained float32 Adds on ``elements`` elements."""
    from onnx import helper

    nodes = [
        helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", "x"], [f"y{i}"])
        for i in range(ops)
    ]
    call = target.runner(
        nodes,
        [_tensor("x", "float32", [elements])],
        [_tensor(f"y{ops - 1}", "float32", [elements])],
        {"x": np.ones(elements, np.float32)},
    )
    return mean_seconds(call, budget)


def measure_compute(
    target: Target, budget: float, barrier: Callable[[], object] = _no_barrier
) -> dict:
    """Achieved FLOP/s per dtype and matrix size, bytes/s, per-op and per-session seconds.
    ``barrier`` lines the ranks up before each measurement so they contend as in a run."""
    flops: dict[str, dict[int, float]] = {}
    for dtype, sizes in target.matmul_sizes.items():
        flops[dtype] = {}
        for n in sizes:
            barrier()
            flops[dtype][n] = 2 * n**3 / mean_seconds(matmul_runner(n, dtype, target), budget)
    elements = target.add_elements
    barrier()
    chained = add_chain_seconds(CHAIN_OPS // 4 + 1, elements, target, budget)
    barrier()
    single = add_chain_seconds(1, elements, target, budget)
    bandwidth = 3 * elements * 4 * (CHAIN_OPS // 4) / max(chained - single, 1e-9)
    barrier()
    one = add_chain_seconds(1, 16, target, budget)
    barrier()
    chain = add_chain_seconds(CHAIN_OPS + 1, 16, target, budget)
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


@dataclass(frozen=True)
class LinkFit:
    alpha: float  # seconds per message, shared by every kind
    bandwidth: float  # bytes/s of send/recv: the link's own
    collective_bandwidth: dict[str, float]  # bytes/s each measured collective kind gets
    error: float  # median relative error of the fit


def fit_link(samples: Sequence[dict]) -> LinkFit:
    """Least-squares alpha (s) and a bandwidth (bytes/s) per kind over samples ``{kind,
    ranks, bytes, seconds}``, minimising relative error so microsecond latencies weigh as
    much as millisecond transfers. Each kind gets its own B in its formula: MPI's collectives
    on CPU ranks run at very different speeds (an all-reduce adds up what it moves), and one B
    for all of them misprices every kind but the average one."""
    from scipy.optimize import nnls

    # A call lost in the noise of the compute it follows measures nothing: leave it out.
    samples = [s for s in samples if s["seconds"] > 0]
    if not samples:
        raise UserError("no communication samples to fit (profile needs at least 2 ranks)")
    kinds = sorted({s["kind"] for s in samples})
    a = np.zeros((len(samples), 1 + len(kinds)))
    for row, s in enumerate(samples):
        alpha_part, byte_part = _coefficients(s["kind"], s["ranks"], s["bytes"])
        a[row, 0], a[row, 1 + kinds.index(s["kind"])] = alpha_part, byte_part
    t = np.array([s["seconds"] for s in samples])
    x, _ = nnls(a / t[:, None], np.ones_like(t))
    if (x[1:] <= 0).any():
        raise UserError("communication time did not grow with message size: rerun profile")
    error = float(np.median(np.abs(a @ x - t) / t))
    bandwidth = {k: float(1.0 / inv) for k, inv in zip(kinds, x[1:], strict=True)}
    link = bandwidth.pop("send_recv", None)
    if link is None:  # no point-to-point samples: the fastest collective stands for the link
        link = max(bandwidth.values())
    return LinkFit(float(x[0]), link, bandwidth, error)


def roofline_parts(graph, device) -> tuple[float, int]:
    """(sum of the roofline's rate-bound terms at efficiency 1, number of ops that do work)
    over the nodes of one training step, each node once."""
    from cost_models.compute import op_time
    from planner.flops import node_bytes, node_flops

    ideal = device.model_copy(
        update={"compute_efficiency": 1.0, "memory_efficiency": 1.0, "kernel_latency": 0.0}
    )
    bound, ops = 0.0, 0
    for node in graph:
        if node.op_type == "Constant":
            continue
        t = op_time(node_flops(node), node_bytes(node), ideal)
        bound += t
        ops += t > 0
    return bound, ops


def fit_workloads(parts: Sequence[tuple[float, int]], seconds: Sequence[float], latency: float):
    """(share of the roofline's rates real graphs get, seconds per op) so that each workload's
    ``seconds = bound / share + ops * per_op``, least squares on relative error. One workload
    fixes the share only (per-op cost = the measured ``latency``); two or more sizes of a
    model separate what scales with tensor size from what every op pays."""
    from scipy.optimize import nnls

    a = np.array([[b, n] for b, n in parts], float)
    t = np.array(seconds, float)
    if len(t) > 1:
        (inv_share, per_op), _ = nnls(a / t[:, None], np.ones_like(t))
        if inv_share >= 1.0 and per_op >= latency:
            return 1.0 / inv_share, float(per_op)
    # faster than the roofline, or a per-op cost below the tiny-op one: keep that, fit the share
    rest = np.maximum(t - a[:, 1] * latency, 1e-12)
    inv_share = float(np.sum(a[:, 0] * rest / t**2) / np.sum((a[:, 0] / t) ** 2))
    return min(1.0, 1.0 / max(inv_share, 1e-12)), latency


def cluster_from_measurements(
    base: Cluster, measured: dict, workloads: Sequence = ()
) -> tuple[Cluster, dict]:
    """The base cluster with measured device rates and links; also a summary for the yaml.
    ``workloads``: the training graphs whose measured step times (``workload_seconds``) set
    how much of the roofline's rates real graphs achieve and what each op costs."""
    ranks = measured["compute"]
    # The slowest rank sets the pace of a synchronous step; dtypes not measured keep the spec's.
    peak = base.device.peak_flops | {
        dtype: min(max(r["matmul_flops"][dtype].values()) for r in ranks)
        for dtype in ranks[0]["matmul_flops"]
    }
    bandwidth = min(r["memory_bandwidth"] for r in ranks)
    latency = max(float(np.median([r["kernel_latency"] for r in ranks])), 1e-7)
    sync = measured.get("sync") or {}
    steps = measured.get("workload_sync") or []
    # real steps' jitter when measured (what a plan's segments see), else the MatMuls'
    jitter = float(np.median([w["jitter"] for w in steps])) if steps else sync.get("jitter", 0.0)
    data = base.model_dump()
    data["device"] |= {
        "peak_flops": peak,
        "memory_bandwidth": bandwidth,
        "compute_efficiency": 1.0,
        "memory_efficiency": 1.0,
        "sync_jitter": jitter,
        "kernel_latency": latency,
        "dispatch_latency": max(r["dispatch"] for r in ranks),
    }
    summary = {
        "kind": base.device.kind,
        "ranks": measured["ranks"],
        "threads_per_rank": measured["threads"],
        "session_call_seconds": float(np.median([r["session_call"] for r in ranks])),
        "sync": sync,
        "workload_sync": steps,
    }
    seconds = measured.get("workload_seconds") or []
    if workloads and seconds:
        device = cluster_from_dict(data, source="measured cluster").device
        parts = [roofline_parts(g, device) for g in workloads]
        share, per_op = fit_workloads(parts, seconds, latency)
        summary["workload"] = {
            "seconds": list(seconds),
            "roofline": [b + n * latency for b, n in parts],
            "share": share,
            "per_op": per_op,
            "tiny_op": latency,
        }
        data["device"] |= {
            "compute_efficiency": share,
            "memory_efficiency": share,
            "kernel_latency": per_op,
        }
    if measured["comm"]:
        fit = fit_link(measured["comm"])
        link = {
            "bandwidth": fit.bandwidth,
            "latency": fit.alpha,
            "collective_bandwidth": fit.collective_bandwidth,
        }
        data["intra_host"] = link
        if base.device.kind == "cpu":  # simulated hosts (cpu:HxN) share one transport
            data["inter_host"] = link
        summary["link_fit_median_relative_error"] = fit.error
    return cluster_from_dict(data, source="measured cluster"), summary


def run_workers(
    ranks: int, threads: int, budget: float, workloads: Sequence[str] = (), kind: str = "cpu"
) -> dict:
    """Launch the profile worker on ``ranks`` MPI ranks (one per GPU when ``kind`` is gpu)
    and return rank 0's measurements."""
    from runtime.launch import binding, mpiexec

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="alpa-profile-") as tmp:
        out = Path(tmp) / "measured.json"
        extra = [x for w in workloads for x in ("--workload", w)]
        cmd = [
            mpiexec(),
            *binding(ranks),  # measured as `run` places its ranks
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
            "--kind",
            kind,
            *extra,
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

    ranks = (
        f"{summary['ranks']} GPU rank(s) (CUDA provider, NCCL)"
        if summary.get("kind") == "gpu"
        else f"{summary['ranks']} MPI ranks x {summary['threads_per_rank']} onnxruntime thread(s)"
    )
    head = [
        f"# Measured by `alpa-plan profile --cluster {base_spec}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {ranks}.",
        "# peak_* are the rates a rank achieves while every rank computes; kernel_latency = cost",
        "# per extra op in a session (one session.run call of one op costs "
        f"{summary['session_call_seconds'] * 1e6:.1f} us); dispatch_latency = the executor's",
        "# cost per communication instruction (its dispatch and the session call it splits off).",
    ]
    segments = [summary["sync"]] if summary.get("sync") else []
    segments += summary.get("workload_sync") or []
    if segments:
        took = ", ".join(
            f"{s['segment_seconds'] * 1e3:.2f} -> {s['lockstep_seconds'] * 1e3:.2f} ms"
            for s in segments
        )
        head.append(
            "# sync_jitter: segments synchronised after each (MatMuls, then the workloads) "
            f"took {took} (waiting for the slowest)."
        )
    work = summary.get("workload")
    if work:
        took = ", ".join(f"{t * 1e3:.2f}" for t in work["seconds"])
        says = ", ".join(f"{t * 1e3:.2f}" for t in work["roofline"])
        head += [
            f"# Workload training steps took {took} ms where the roofline at these rates says "
            f"{says} ms:",
            f"# real graphs get {work['share']:.0%} of the rates (the efficiencies) and pay "
            f"{work['per_op'] * 1e6:.2f} us per op",
            f"# (kernel_latency; {work['tiny_op'] * 1e6:.2f} us for a tiny Add).",
        ]
    if "link_fit_median_relative_error" in summary:
        head.append(
            "# Links: alpha-beta least squares over the executor's collectives (one alpha, "
            "a bandwidth per kind), median"
            f" relative error {summary['link_fit_median_relative_error']:.1%}."
        )
    if summary.get("kind") == "gpu":
        head.append(
            "# Not measurable on one host, kept from the spec: inter_host"
            + ("" if "link_fit_median_relative_error" in summary else " and intra_host (one GPU)")
            + "."
        )
    body = yaml.safe_dump(cluster.model_dump(), sort_keys=False)
    return "\n".join(head) + "\n" + body


def profile(
    base_spec: str,
    output: str,
    threads: int = 1,
    budget: float = 0.05,
    workloads: Sequence[str] = (),
    model: str | None = None,
) -> Cluster:
    """Measure this machine as ``base_spec``'s ranks and write the calibrated yaml.
    ``workloads``: one-device plans of ``model`` whose training steps calibrate the roofline."""
    base = resolve_cluster(base_spec)
    ranks = base.num_devices if base.device.kind == "cpu" else _gpu_ranks(base, base_spec)
    if threads < 1 or budget <= 0:
        raise UserError("--threads must be >= 1 and --budget > 0")
    if bool(workloads) != bool(model):
        raise UserError("--workload and --model go together")
    with tempfile.TemporaryDirectory(prefix="alpa-workload-") as tmp:
        folders = [str(Path(tmp) / str(i)) for i in range(len(workloads))]
        graphs = [
            _save_workload(w, model or "", f) for w, f in zip(workloads, folders, strict=True)
        ]
        measured = run_workers(ranks, threads, budget, folders, base.device.kind)
    cluster, summary = cluster_from_measurements(base, measured, graphs)
    Path(output).write_text(yaml_text(cluster, base_spec, summary))
    return cluster


def _gpu_ranks(base: Cluster, base_spec: str) -> int:
    """One rank per GPU this host shows, at most the spec's devices per host; a one-line
    ``UserError`` when onnxruntime-gpu, cupy or a GPU is missing."""
    from runtime.cuda import require_cuda, visible_gpus

    why = f"profile of the GPU cluster {base_spec!r} needs GPUs"
    fallback = "(or profile CPU ranks: --cluster cpu:N)"
    cp = require_cuda(why, fallback=fallback)
    return min(base.devices_per_host, visible_gpus(cp, why, fallback))


def _save_workload(plan_path: str, model: str, folder: str):
    """The training step of a one-device, one-micro-batch plan, saved for the ranks."""
    import shutil

    from planner.plan_io import load_plan
    from runtime.step import prepare_step

    plan = load_plan(plan_path)
    devices = {d for s in plan.stages for d in s.submesh.devices}
    if devices != {0} or plan.options.microbatches != 1:
        raise UserError(
            f"--workload {plan_path!r} must be a one-device, one-micro-batch plan "
            "(compile it with --cluster cpu:1 --microbatches 1)"
        )
    step = prepare_step(plan, model)
    Path(folder).mkdir(parents=True)
    step.save(folder)
    shutil.copyfile(plan_path, Path(folder) / "plan.json")
    return step.model.graph
