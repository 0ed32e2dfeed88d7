"""The GPU backend without a GPU: how a plan picks its backend, the one-line errors when
onnxruntime-gpu, cupy or a GPU is missing, the array-module-agnostic helpers, and the
rank/device and NCCL-id bookkeeping; the GPU tests run only where CUDA and cupy are present
(bench/device_check.sh runs this file on a GPU machine)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from cost_models.cluster import resolve_cluster
from planner.errors import UserError
from planner.plan_io import load_plan
from runtime import backend, cuda, reshard
from runtime.buckets import sync
from runtime.comm import array_module, concat_blocks, mean_of, mesh_groups, split_blocks
from runtime.mesh import RankMesh
from runtime.partition import CollectiveOp

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "tests" / "fixtures" / "gpt2.ts.onnx"


def _has_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount()) and (
            "CUDAExecutionProvider" in ort.get_available_providers()
        )
    except Exception:
        return False


gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a GPU, cupy and onnxruntime-gpu")
no_cuda_provider = pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this onnxruntime has the CUDA provider",
)


def _plan(tmp_path: Path, cluster: str, kind: str) -> Path:
    """The GPT-2 fixture planned for ``cluster`` (data parallel), relabelled as a ``kind``
    cluster: the plan's device kind is all that selects the backend."""
    out = tmp_path / f"{cluster.replace(':', '')}-{kind}.json"
    compiled = subprocess.run(
        [sys.executable, "-m", "cli", "compile", str(GPT2), "--dim", "batch=8"]
        + ["--dim", "seq=16", "--cluster", cluster, "--method", "data", "--loss"]
        + ["cross_entropy", "--labels", "labels", "--time-limit", "5", "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    plan = json.loads(out.read_text())
    plan["cluster"]["device"]["kind"] = kind
    out.write_text(json.dumps(plan))
    return out


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory) -> Path:
    return _plan(tmp_path_factory.mktemp("plans"), "cpu:1", "gpu")


def _alpa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_backend_follows_the_plan_unless_forced(gpu_plan):
    plan = load_plan(gpu_plan)
    cpu_plan = plan.model_copy(update={"cluster": {**plan.cluster, "device": {"kind": "cpu"}}})
    assert backend.resolve("auto", plan) == "cuda"
    assert backend.resolve("auto", cpu_plan) == "cpu"
    assert backend.resolve("cpu", plan) == "cpu"
    assert backend.resolve("cuda", cpu_plan) == "cuda"
    # the cluster spec's default device kind is gpu
    assert backend.resolve("auto", plan.model_copy(update={"cluster": {}})) == "cuda"
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        backend.resolve("tpu", plan)


def test_cpu_backend_needs_nothing_more(gpu_plan, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    backend.check_local("cpu", load_plan(gpu_plan), ranks=64)


def test_missing_cuda_provider_says_what_to_install(gpu_plan, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    plan = load_plan(gpu_plan)
    with pytest.raises(UserError) as auto:
        backend.check_local("auto", plan, ranks=1)
    assert str(auto.value).startswith("the plan targets GPUs but onnxruntime has no CUDAEx")
    assert "pip install onnxruntime-gpu (or run with --backend cpu)" in str(auto.value)
    with pytest.raises(UserError, match=r"^--backend cuda asks for GPUs but onnxruntime"):
        backend.check_local("cuda", plan, ranks=1)


def test_missing_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(UserError, match=r"cupy with NCCL.*pip install 'alpa-plan\[cuda\]'"):
        cuda.require_cuda("why", ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _fake_cupy(count: int | Exception) -> SimpleNamespace:
    def device_count() -> int:
        if isinstance(count, Exception):
            raise count
        return count

    runtime = SimpleNamespace(getDeviceCount=device_count)
    return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime))


def test_no_visible_gpu_and_too_few_gpus_are_user_errors(gpu_plan, monkeypatch):
    with pytest.raises(UserError, match=r"CUDA sees no GPU \(cudaErrorNoDevice\).*--backend cpu"):
        cuda.visible_gpus(_fake_cupy(RuntimeError("cudaErrorNoDevice")), "the plan targets GPUs")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=<unset>"):
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        cuda.visible_gpus(_fake_cupy(0), "the plan targets GPUs")
    monkeypatch.setattr(cuda, "require_cuda", lambda why: _fake_cupy(2))
    plan = load_plan(gpu_plan)
    backend.check_local("auto", plan, ranks=2)
    with pytest.raises(UserError, match="needs 3 ranks, one per GPU, but this host shows 2"):
        backend.check_local("auto", plan, ranks=3)


@no_cuda_provider
def test_run_of_a_gpu_plan_without_cuda_is_one_line_and_exit_2(gpu_plan):
    result = _alpa("run", str(gpu_plan), "--model", str(GPT2), "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: the plan targets GPUs but onnxruntime has no CUDA")
    assert len(result.stderr.strip().splitlines()) == 1 and "step 1" not in result.stdout


@no_cuda_provider
def test_ranks_of_a_joined_job_agree_on_the_error(tmp_path):
    """Inside an existing MPI job (srun, mpiexec) the launcher's check never ran: the ranks
    find the problem themselves and report it once, without a traceback or a hang."""
    from runtime.launch import mpiexec

    plan = _plan(tmp_path, "cpu:2", "cpu")
    result = subprocess.run(
        [mpiexec(), "-n", "2", sys.executable, "-m", "runtime.worker", str(plan)]
        + ["--model", str(GPT2), "--backend", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: --backend cuda asks for GPUs")


def test_gpu_plan_smoke_runs_on_cpu_ranks(gpu_plan, tmp_path):
    report = tmp_path / "run.json"
    result = _alpa(
        "run", str(gpu_plan), "--model", str(GPT2), "--steps", "2", "--backend", "cpu",
        "--report", str(report),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["backend"] == "cpu" and len(data["losses"]) == 2
    assert "2 steps on cpu" in result.stdout


class _Fake(np.ndarray):
    """An array of another module (as cupy's are): helpers must build results with it."""


def _fake_module() -> ModuleType:
    """numpy's functions, returning ``_Fake`` arrays and recording that they were called
    (numpy's own would keep a subclass too, e.g. zeros_like)."""
    module = ModuleType("cupy")
    module.called = []

    def wrap(name: str):
        def call(*args, **kwargs):
            module.called.append(name)
            return getattr(np, name)(*args, **kwargs).view(_Fake)

        return call

    for name in ("moveaxis", "concatenate", "zeros_like"):
        setattr(module, name, wrap(name))
    return module


class _Doubling:
    """all_reduce over two ranks that hold the same tensor."""

    def all_reduce(self, x, group, op):
        return x * 2


def test_helpers_use_the_array_module_of_their_input(monkeypatch):
    monkeypatch.setattr(_Fake, "__module__", "cupy._core.core")
    monkeypatch.setitem(sys.modules, "cupy", _fake_module())
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    fake = x.view(_Fake)
    assert array_module(x) is np and array_module(fake) is sys.modules["cupy"]
    blocks = split_blocks(fake, 2, 2, "test")
    assert type(blocks) is _Fake and type(concat_blocks(blocks, 2)) is _Fake
    mesh = RankMesh((2,), (0, 1))
    zeroed = reshard.apply(fake, [reshard.Step("zero", 0)], mesh, 1, comm=None)
    assert type(zeroed) is _Fake and not zeroed.any()
    assert sys.modules["cupy"].called == ["zeros_like"]  # split/concat: the array's methods
    ops = [CollectiveOp("all_reduce", (0, 1), "sum", None)] * 2
    synced = sync([fake[0], fake[1, :2]], [[op] for op in ops], _Doubling())
    assert [type(y) for y in synced] == [_Fake, _Fake]
    np.testing.assert_array_equal(synced[1], 2 * x[1, :2])


def test_block_helpers_match_numpy():
    x = np.arange(2 * 6 * 4, dtype=np.float64).reshape(2, 6, 4)
    for dim, n in [(0, 2), (1, 3), (2, 4)]:
        blocks = split_blocks(x, n, dim, "test")
        np.testing.assert_array_equal(blocks, np.stack(np.split(x, n, axis=dim)))
        assert blocks.flags.c_contiguous
        np.testing.assert_array_equal(concat_blocks(blocks, dim), x)
    with pytest.raises(ValueError, match="does not split into 4 parts"):
        split_blocks(x, 4, 1, "test")
    scalar = mean_of(np.array(6.0, np.float16), 4)
    assert isinstance(scalar, np.ndarray) and scalar.dtype == np.float16 and scalar == 1.5


def test_local_rank_prefers_the_launcher_and_falls_back_to_host_major():
    assert cuda.local_rank(5, 4, {"MPI_LOCALRANKID": "2"}) == 2
    assert cuda.local_rank(5, 4, {"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert cuda.local_rank(5, 4, {"SLURM_LOCALID": "x"}) == 1
    assert cuda.gpu_for_rank(6, 8, 8, {}) == 6
    with pytest.raises(UserError, match="one rank per GPU"):
        cuda.gpu_for_rank(3, 4, 2, {})


def test_every_member_of_a_group_gets_its_id_and_its_position_as_nccl_rank():
    mesh = RankMesh((2, 2), (0, 1, 2, 3))
    groups = mesh_groups(mesh.device_at, mesh.shape)
    # Each rank creates the ids of the groups it leads; MPI's allgather merges them.
    ids = {}
    for rank in range(4):
        created = cuda.ids_to_create(groups, rank)
        assert all(g[0] == rank for g in created)
        ids.update({g: f"id-{g}" for g in created})
    per_rank = {r: cuda.my_communicators(groups, r, ids) for r in range(4)}
    for rank, comms in per_rank.items():
        assert [g for g, _, _ in comms] == sorted({g for g in groups if rank in g and len(g) > 1})
        for group, nccl_rank, uid in comms:
            assert group[nccl_rank] == rank and uid == f"id-{group}"
    # The same devices in another axis order are another communicator (tensor order = rank).
    assert ids[(0, 1, 2, 3)] != ids[(0, 2, 1, 3)]
    with pytest.raises(ValueError, match="no NCCL unique id"):
        cuda.my_communicators(groups, 0, {})


def test_cuda_libraries_are_preloaded_where_onnxruntime_can():
    """onnxruntime-gpu's ``preload_dlls`` finds the CUDA/cuDNN of pip's nvidia packages (the
    CUDA provider then needs no LD_LIBRARY_PATH); builds without it are left alone."""
    calls: list[int] = []
    cuda.load_cuda_libraries(SimpleNamespace(preload_dlls=lambda: calls.append(1)))
    cuda.load_cuda_libraries(SimpleNamespace())
    assert calls == [1]


def test_dtype_maps():
    fake = SimpleNamespace(NCCL_FLOAT32=7, NCCL_INT64=4, NCCL_UINT8=1)
    assert cuda.nccl_dtype(fake, np.dtype(np.float32)) == 7
    assert cuda.nccl_dtype(fake, np.dtype(bool)) == 1
    with pytest.raises(UserError, match="complex64"):
        cuda.nccl_dtype(fake, np.dtype(np.complex64))
    assert cuda.numpy_dtype("tensor(float)") is np.float32
    with pytest.raises(UserError, match="no numpy dtype"):
        cuda.numpy_dtype("tensor(string)")


@gpu
def test_cuda_session_keeps_tensors_on_device():
    import cupy
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = cuda.CudaSession(model.SerializeToString(), 0)
    a = cupy.arange(16, dtype=cupy.float32).reshape(4, 4)
    b = np.eye(4, dtype=np.float32)
    (c,) = session.run(["c"], {"a": a, "b": b})
    assert isinstance(c, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(c), cupy.asnumpy(a))


@gpu
def test_nccl_collectives_on_one_rank():
    assert all(cuda.self_check().values())


@gpu
def test_helpers_on_cupy_match_numpy():
    import cupy

    x = np.random.default_rng(0).standard_normal((4, 6, 2)).astype(np.float32)
    for dim in range(3):
        blocks = split_blocks(cupy.asarray(x), 2, dim, "test")
        assert isinstance(blocks, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(blocks), split_blocks(x, 2, dim, "test"))
        np.testing.assert_array_equal(cupy.asnumpy(concat_blocks(blocks, dim)), x)
    scalar = mean_of(cupy.asarray(np.float32(6)), 4)
    assert isinstance(scalar, cupy.ndarray) and scalar.shape == () and float(scalar) == 1.5


@gpu
def test_gpu_plan_runs_and_verifies_on_the_gpu(gpu_plan, tmp_path):
    verified = _alpa("verify", str(gpu_plan), "--model", str(GPT2))
    assert verified.returncode == 0, verified.stderr
    assert "verify passed" in verified.stdout
    reports = {}
    for name in ("auto", "cpu"):
        reports[name] = tmp_path / f"{name}.run.json"
        result = _alpa(
            "run", str(gpu_plan), "--model", str(GPT2), "--steps", "3", "--backend", name,
            "--report", str(reports[name]), "--checkpoint-dir", str(tmp_path / name),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    on_gpu, on_cpu = (json.loads(reports[n].read_text()) for n in ("auto", "cpu"))
    assert on_gpu["backend"] == "cuda" and on_cpu["backend"] == "cpu"
    assert on_gpu["losses"] == pytest.approx(on_cpu["losses"], rel=1e-4)


@gpu
def test_profile_measures_this_hosts_gpus(tmp_path):
    """`profile` of a GPU spec measures the GPUs through the CUDA provider and NCCL: the
    tensor cores outrun float32 (TF32 off), and compile accepts the yaml."""
    out = tmp_path / "measured.yaml"
    profiled = _alpa("profile", "--cluster", "dgx-h100", "-o", str(out), "--budget", "0.02")
    assert profiled.returncode == 0, profiled.stderr
    cluster = resolve_cluster(str(out))
    flops = cluster.device.peak_flops
    assert flops["float16"] > 2 * flops["float32"] and flops["bfloat16"] > 2 * flops["float32"]
    assert cluster.device.memory_bandwidth > 1e11 and cluster.device.kernel_latency < 1e-3
    assert "GPU rank(s) (CUDA provider, NCCL)" in out.read_text()
    plan = tmp_path / "plan.json"
    compiled = _alpa(
        "compile", str(GPT2), "--dim", "batch=16", "--dim", "seq=32", "--cluster", str(out),
        "--loss", "cross_entropy", "--labels", "auto", "-o", str(plan),
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr


class _Replicas:
    """Rank ``me`` of ``p`` ranks that all hold the same tensors: every collective's result
    is known without peers, in the array module of its input (numpy or cupy)."""

    def __init__(self, p: int, me: int):
        self.p, self.me = p, me

    def all_reduce(self, x, group, op, inplace=False):
        y = x * len(group) if op == "sum" else x.copy()
        if inplace:
            x[...] = y
            return x
        return y

    def all_gather(self, x, group, dim, out=None):
        blocks = array_module(x).stack([x] * len(group))
        if out is not None:
            out[...] = blocks.reshape(out.shape)
            blocks = out.reshape(blocks.shape)
        return concat_blocks(blocks, dim)

    def reduce_scatter(self, x, group, dim, op, out=None):
        piece = split_blocks(x, len(group), dim, "test")[self.me]
        piece = piece * len(group) if op == "sum" else piece.copy()
        if out is None:
            return piece
        out[...] = piece.reshape(out.shape)
        return out

    def broadcast(self, x, group, root):
        return x


@gpu
def test_gradient_buckets_on_cupy_match_numpy():
    """The bucketed sync's packing, views and kept buffers (``reuse``) give on GPU arrays
    what they give on numpy ones: one GPU cannot run NCCL between two ranks, so replicas
    stand in for the peers."""
    import cupy

    from runtime.buckets import Synchronizer, run_collective

    g = (0, 1)
    comm = _Replicas(2, 0)
    rng = np.random.default_rng(0)
    shapes = [((4, 6), "f4"), ((2, 8), "f4"), ((6,), "f8"), ((4, 2), "f4"), ((2, 4), "f4")]
    xs = [rng.standard_normal(s).astype(t) for s, t in shapes]
    ops = [
        [CollectiveOp("all_reduce", g, "mean", None), CollectiveOp("all_gather", g, "sum", 1)],
        [CollectiveOp("reduce_scatter", g, "sum", 1)],
        [CollectiveOp("all_reduce", g, "sum", None)],
        [CollectiveOp("reduce_scatter", g, "sum", 0), CollectiveOp("broadcast", g, "sum", None)],
        [CollectiveOp("all_gather", g, "sum", 0)],
    ]
    want = []
    for x, chain in zip(xs, ops, strict=True):
        for op in chain:
            x = run_collective(op, x, comm)
        want.append(x)
    for reuse in (False, True):
        synchronize = Synchronizer(ops, comm, reuse)
        for _ in range(2):  # the second call replays the bound buckets and kept buffers
            got = synchronize([cupy.asarray(x) for x in xs])
            for y, w in zip(got, want, strict=True):
                assert isinstance(y, cupy.ndarray) and y.shape == w.shape and y.dtype == w.dtype
                np.testing.assert_allclose(cupy.asnumpy(y), w, rtol=1e-6)


_RECORD = """
import pickle
import sys

import numpy as np

from runtime import worker
from runtime.backend import Backend
from runtime.partition import cpu_session

calls = []


def recording(model):
    session = cpu_session(model)

    class First:  # keeps each session's first call: its model, feeds and outputs
        def run(self, outputs, feeds):
            got = session.run(outputs, feeds)
            if not self.seen:
                self.seen = True
                copy = {k: np.array(v) for k, v in feeds.items()}
                calls.append((model, list(outputs), copy, [np.array(y) for y in got]))
            return got

    first = First()
    first.seen = False
    return first


worker.open_backend = lambda requested, plan, mpi: Backend("cpu", mpi, recording)
code = worker.main(sys.argv[2:])
pickle.dump(calls, open(f"{sys.argv[1]}.{worker.MpiCommunicator().rank}", "wb"))
sys.exit(code)
"""


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sessions_of_a_two_rank_plan_match_on_the_gpu(tmp_path, dtype):
    """Every onnxruntime session of both ranks of GPT-2's auto plan on two devices (its
    local reshard nodes included) gives on the CUDA provider what it gave on CPU ranks, fed
    what a real step fed it: one GPU cannot run NCCL between two ranks, so this is how the
    sharded sessions meet the GPU."""
    from runtime.launch import mpiexec

    plan = tmp_path / "plan.json"
    compiled = _alpa(
        "compile", str(GPT2), "--dim", "batch=8", "--dim", "seq=16", "--cluster", "cpu:2",
        "--loss", "cross_entropy", "--labels", "labels", "--time-limit", "5",
        "--dtype", dtype, "-o", str(plan),
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    record = tmp_path / "calls"
    recorded = subprocess.run(
        [mpiexec(), "-n", "2", sys.executable, "-c", _RECORD, str(record), str(plan)]
        + ["--model", str(GPT2), "--steps", "2", "--backend", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    import pickle

    tol = 1e-4 if dtype == "float32" else 2e-2
    checked = 0
    for rank in (0, 1):
        calls = pickle.loads(Path(f"{record}.{rank}").read_bytes())
        assert len(calls) > 3
        for model, outputs, feeds, want in calls:
            got = cuda.CudaSession(model, 0).run(outputs, feeds)
            for name, y, w in zip(outputs, got, want, strict=True):
                y = y.get()
                assert y.shape == w.shape and y.dtype == w.dtype, name
                scale = max(1.0, float(np.abs(w).max(initial=0)))
                err = float(np.abs(y.astype(np.float64) - w).max(initial=0)) / scale
                assert err <= tol, (rank, name, err)
                checked += 1
    assert checked > 10
