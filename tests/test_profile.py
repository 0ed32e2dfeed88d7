"""`alpa-plan profile`: the alpha-beta fit, the measured cluster and its yaml (no timing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cost_models import collectives as c
from cost_models.cluster import resolve_cluster
from cost_models.profile import cluster_from_measurements, fit_link, profile, yaml_text
from planner.errors import UserError
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
ALPHA, BW = 30e-6, 2e9


def _exact(kind: str, ranks: int, nbytes: int) -> dict:
    if kind == "send_recv":
        seconds = c.send_recv(nbytes, ALPHA, BW)
    else:
        seconds = c.COLLECTIVES[kind](nbytes, c.flat_link(ranks, ALPHA, BW))
    return {"kind": kind, "ranks": ranks, "bytes": nbytes, "seconds": seconds}


SAMPLES = [
    _exact(kind, 2 if kind == "send_recv" else 4, n)
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
    for n in (64, 65536, 1 << 22)
]


def test_fit_recovers_the_formulas_parameters():
    fit = fit_link(SAMPLES + [{**SAMPLES[0], "seconds": 0.0}])  # 0 s: dropped
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert fit.bandwidth == pytest.approx(BW, rel=1e-6)
    assert fit.collective_bandwidth == pytest.approx(
        {"all_reduce": BW, "all_gather": BW, "reduce_scatter": BW}, rel=1e-6
    )
    assert fit.error < 1e-9
    with pytest.raises(UserError, match="no communication samples"):
        fit_link([])


def test_each_collective_kind_gets_its_own_bandwidth():
    """An all-reduce that moves data at a tenth of the link's speed (its reduction is the
    bottleneck) is priced by its own bandwidth, and the planner's formulas then use it."""
    slow = [
        {**s, "seconds": c.all_reduce(s["bytes"], c.flat_link(4, ALPHA, BW / 10))}
        if s["kind"] == "all_reduce"
        else s
        for s in SAMPLES
    ]
    fit = fit_link(slow)
    assert fit.bandwidth == pytest.approx(BW, rel=1e-6) and fit.error < 1e-9
    assert fit.collective_bandwidth["all_reduce"] == pytest.approx(BW / 10, rel=1e-6)
    assert fit.collective_bandwidth["all_gather"] == pytest.approx(BW, rel=1e-6)
    cluster, _ = cluster_from_measurements(
        resolve_cluster("cpu:4"), {"ranks": 4, "threads": 1, "compute": [_rank(4e10)], "comm": slow}
    )
    link = c.axis_link(cluster, np.arange(4), 0)  # measured rates, plus the executor's dispatch
    assert c.all_reduce(1 << 22, link) - link.dispatch == pytest.approx(slow[2]["seconds"])
    assert c.all_gather(1 << 22, link) - link.dispatch == pytest.approx(slow[5]["seconds"])


def _rank(flops: float) -> dict:
    return {
        "matmul_flops": {"float32": {64: flops / 2, 512: flops}, "float64": {256: flops / 2}},
        "memory_bandwidth": flops / 10,
        "kernel_latency": 2e-6,
        "session_call": 5e-6,
        "dispatch": flops * 1e-16,
    }


def test_measured_cluster_keeps_the_layout_and_round_trips(tmp_path):
    base = resolve_cluster("cpu:2x2")
    sync = {"segment_seconds": 4e-4, "lockstep_seconds": 5e-4, "jitter": 0.005}
    measured = {
        "ranks": 4,
        "threads": 1,
        "compute": [_rank(4e10), _rank(3e10)],
        "sync": sync,
        "comm": SAMPLES,
    }
    cluster, summary = cluster_from_measurements(base, measured)
    d = cluster.device
    assert (cluster.name, cluster.hosts, cluster.devices_per_host) == ("cpu:2x2", 2, 2)
    assert d.peak_flops == {"float32": 3e10, "float64": 1.5e10}  # the slowest rank's best
    # without workloads the rates are the measured ones, the jitter the MatMul segments'
    assert (d.compute_efficiency, d.memory_efficiency, d.kernel_latency) == (1.0, 1.0, 2e-6)
    assert d.sync_jitter == 0.005
    assert d.dispatch_latency == pytest.approx(4e-6)  # the slowest rank's
    assert cluster.intra_host == cluster.inter_host
    assert cluster.intra_host.latency == pytest.approx(ALPHA)
    path = tmp_path / "measured.yaml"
    path.write_text(yaml_text(cluster, "cpu:2x2", summary))
    assert resolve_cluster(str(path)) == cluster
    # real training steps' jitter, when measured, is what a plan's segments see
    steps = [
        {"segment_seconds": s, "lockstep_seconds": s + w, "jitter": w / s**0.5}
        for s, w in ((2e-3, 4e-4), (8e-3, 6e-4), (1e-2, 9e-4))
    ]
    cluster, _ = cluster_from_measurements(base, measured | {"workload_sync": steps})
    assert cluster.device.sync_jitter == pytest.approx(4e-4 / 2e-3**0.5)  # the median


def test_gpu_profile_keeps_what_one_host_cannot_measure(tmp_path):
    """A GPU spec measured on one host: its rates and the NCCL link inside the host are
    measured; the inter-host link and the dtypes not measured (float64) stay the spec's."""
    base = resolve_cluster("dgx-h100")
    rank = {
        "matmul_flops": {
            "float32": {4096: 5e13},
            "float16": {8192: 6e14},
            "bfloat16": {8192: 6.2e14},
        },
        "memory_bandwidth": 3e12,
        "kernel_latency": 4e-6,
        "session_call": 3e-5,
        "dispatch": 2e-5,
    }
    measured = {"ranks": 2, "threads": 1, "compute": [rank, rank], "comm": SAMPLES}
    cluster, summary = cluster_from_measurements(base, measured)
    assert cluster.device.peak_flops == {"float32": 5e13, "float16": 6e14, "bfloat16": 6.2e14}
    assert cluster.inter_host == base.inter_host
    assert cluster.intra_host.latency == pytest.approx(ALPHA)
    text = yaml_text(cluster, "dgx-h100", summary)
    assert "2 GPU rank(s) (CUDA provider, NCCL)" in text
    assert "kept from the spec: inter_host." in text
    one_gpu, summary = cluster_from_measurements(base, measured | {"ranks": 1, "comm": []})
    assert one_gpu.intra_host == base.intra_host
    assert "inter_host and intra_host (one GPU)" in yaml_text(one_gpu, "dgx-h100", summary)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this onnxruntime has the CUDA provider",
)
def test_gpu_profile_without_gpus_says_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="profile of the GPU cluster 'dgx-a100' needs GPUs but"):
        profile("dgx-a100", str(tmp_path / "x.yaml"))
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.slow
def test_profile_command_writes_a_cluster_compile_accepts(tmp_path):
    """End to end, with one-device training-step workloads (two sizes) calibrating the
    roofline through the executor's own StageRunner."""
    out = tmp_path / "measured.yaml"
    model = str(FIXTURES / "gpt2.ts.onnx")
    workloads = []
    for batch in (2, 8):
        plan = tmp_path / f"workload-{batch}.json"
        compiled = subprocess.run(
            [sys.executable, "-m", "cli", "compile", model, "--dim", f"batch={batch}"]
            + ["--dim", "seq=16", "--cluster", "cpu:1", "--loss", "cross_entropy"]
            + ["--labels", "labels", "-o", str(plan)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert compiled.returncode == 0, compiled.stderr
        workloads += ["--workload", str(plan)]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "profile",
            "--cluster",
            "cpu:2",
            "-o",
            str(out),
            "--budget",
            "0.005",
            *workloads,
            "--model",
            model,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    cluster = resolve_cluster(str(out))
    d = cluster.device
    assert cluster.num_devices == 2 and 0 < d.compute_efficiency <= 1
    assert d.dispatch_latency > 0
