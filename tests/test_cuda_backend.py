"""The GPU backend without a GPU: it imports, says what to install, and its rank/device and
NCCL-id bookkeeping is right; the GPU tests run only where CUDA and cupy are present."""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from planner.errors import UserError
from runtime import cuda
from runtime.comm import mesh_groups
from runtime.mesh import RankMesh


def _has_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import onnxruntime as ort

    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount()) and (
            "CUDAExecutionProvider" in ort.get_available_providers()
        )
    except Exception:
        return False


gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a GPU, cupy and onnxruntime-gpu")


def test_missing_cuda_provider_names_the_install():
    with pytest.raises(UserError, match=r"CUDAExecutionProvider.*pip install alpa-plan\[cuda\]"):
        cuda.require_cuda(["CPUExecutionProvider"])


def test_missing_cupy_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(UserError, match=r"cupy.*pip install alpa-plan\[cuda\]"):
        cuda.require_cuda(["CUDAExecutionProvider", "CPUExecutionProvider"])


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
