"""Every strategy of the main op families computes the right thing (DTensor's
strategy_validation): split numpy inputs as the strategy says, run the op per rank with
onnxruntime on its local block, apply the strategy's collectives, and compare each rank's
block with the unsharded result."""

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cost_models.cluster import resolve_cluster
from cost_models.collectives import flat_link
from planner.graph import shape_of
from planner.mesh import mesh_from_links
from planner.sharding import ShardingSpec, local_shape
from planner.strategies import REGISTRY, StrategyContext, strategies_for
from planner.strategies.indexing import VOCAB_PARALLEL

MESH = mesh_from_links((2, 2), [flat_link(2, 1e-6, 1e9), flat_link(2, 1e-6, 1e10)])
CTX = StrategyContext(resolve_cluster("p3.16xlarge").device, reduce_scatter=True)
RNG = np.random.default_rng(0)
CONST_INPUT_OPS = ("Reshape", "ReduceSum", "ReduceMean", "Split")  # int inputs as initializers


def _f(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _i(*data):
    return np.array(data, dtype=np.int64)


CASES = {
    "matmul": ("MatMul", [_f(2, 4, 8), _f(8, 4)], {}),
    "batch_matmul": ("MatMul", [_f(2, 4, 4, 2), _f(2, 4, 2, 4)], {}),
    "gemm_bias_transB": ("Gemm", [_f(4, 8), _f(4, 8), _f(4)], {"transB": 1}),
    "einsum": ("Einsum", [_f(2, 4, 8), _f(8, 4)], {"equation": "bsh,hf->bsf"}),
    "add_broadcast": ("Add", [_f(4, 2, 8), _f(8)], {}),
    "softmax": ("Softmax", [_f(4, 2, 8)], {"axis": -1}),
    "layer_norm": ("LayerNormalization", [_f(4, 2, 8), _f(8), _f(8)], {"axis": -1}),
    "reshape": ("Reshape", [_f(4, 2, 8), _i(4, 2, 2, 4)], {}),
    "transpose": ("Transpose", [_f(4, 2, 8)], {"perm": [1, 0, 2]}),
    "reduce_sum": ("ReduceSum", [_f(4, 2, 8), _i(2)], {"keepdims": 0}),
    "reduce_mean": ("ReduceMean", [_f(4, 2, 8), _i(0)], {"keepdims": 1}),
    "gather_vocab": ("Gather", [_f(8, 4), _i(0, 7, 3, 4)], {"axis": 0}),
    "conv": ("Conv", [_f(2, 4, 5, 5), _f(4, 4, 3, 3), _f(4)], {}),
    "split": ("Split", [_f(4, 6), _i(2, 4)], {"axis": 1}),
    "concat": ("Concat", [_f(4, 2), _f(4, 6)], {"axis": 1}),
}


def _model(op, arrays, attrs, local_shapes=None):
    names = [f"x{i}" for i in range(len(arrays))]
    const = {
        n: a
        for n, a in zip(names, arrays, strict=True)
        if a.dtype == np.int64 and op in CONST_INPUT_OPS
    }
    n_out = 2 if op == "Split" else 1
    node = helper.make_node(op, names, [f"y{j}" for j in range(n_out)], **attrs)
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in zip(names, arrays, strict=True)
        if n not in const
    ]
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in const.items()]
    outs = [helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, None) for j in range(n_out)]
    graph = helper.make_graph([node], "t", inputs, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _block(array, spec, coord):
    index = []
    for n, axes in zip(array.shape, spec.dims, strict=True):
        parts, pos = 1, 0
        for a in axes:
            parts, pos = parts * MESH.shape[a], pos * MESH.shape[a] + coord[a]
        index.append(slice(pos * n // parts, (pos + 1) * n // parts))
    out = array[tuple(index)]
    if spec.partial and any(coord[a] for a in spec.partial):
        out = np.zeros_like(out)
    return out


def _ir_node(proto):
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    return model.graph.node(0)


def _local_consts(node, strat, arrays):
    """Shape-carrying constants rewritten to local shapes, as the executor does."""
    local = list(arrays)
    if node.op_type == "Reshape":
        local[1] = np.array(
            local_shape(shape_of(node.outputs[0]), strat.outputs[0], MESH.shape), dtype=np.int64
        )
    if node.op_type == "Split":
        local[1] = np.array(
            [
                local_shape(shape_of(o), s, MESH.shape)[1]
                for o, s in zip(node.outputs, strat.outputs, strict=True)
            ],
            dtype=np.int64,
        )
    return local


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_matches_unsharded(case):
    op, arrays, attrs = CASES[case]
    proto = _model(op, arrays, attrs)
    expected = _run(
        proto,
        {
            f"x{i}": a
            for i, a in enumerate(arrays)
            if not (a.dtype == np.int64 and op in CONST_INPUT_OPS)
        },
    )
    node = _ir_node(proto)
    strategies = strategies_for(node, MESH, CTX)
    assert len(strategies) > 1 and not strategies[0].replicated_fallback
    coords = list(itertools.product(*(range(n) for n in MESH.shape)))
    for strat in strategies:
        outs = {}
        for coord in coords:
            local = _local_consts(node, strat, arrays)
            blocks = [
                a if a.dtype == np.int64 and op != "Gather" else _block(a, s, coord)
                for a, s in zip(local, strat.inputs, strict=True)
            ]
            if strat.local_kind == VOCAB_PARALLEL:
                rows = blocks[0].shape[0]
                offset = _block(
                    np.arange(arrays[0].shape[0]), ShardingSpec((strat.inputs[0].dims[0],)), coord
                )[0]
                idx = blocks[1] - offset
                mask = (idx < 0) | (idx >= rows)
                out = blocks[0][np.clip(idx, 0, rows - 1)]
                out[mask] = 0
                outs[coord] = [out]
                continue
            lp = _model(op, blocks, attrs)
            feeds = {
                f"x{i}": b
                for i, b in enumerate(blocks)
                if not (b.dtype == np.int64 and op in CONST_INPUT_OPS)
            }
            outs[coord] = _run(lp, feeds)
        for coll in strat.collectives:
            j = int(coll.tensor[3:])
            reduce = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}[
                coll.reduce_op or "sum"
            ]
            new = {}
            for coord in coords:
                group = [
                    c
                    for c in coords
                    if all(c[a] == coord[a] for a in range(2) if a not in coll.axes)
                ]
                total = reduce(np.stack([outs[c][j] for c in group]), axis=0)
                if coll.kind == "reduce_scatter":
                    spec = ShardingSpec(
                        tuple(coll.axes if d == coll.dim else () for d in range(total.ndim))
                    )
                    total = _block(total, spec, coord)
                new[coord] = total
            for coord in coords:
                outs[coord][j] = new[coord]
        for coord in coords:
            for j, spec in enumerate(strat.outputs):
                np.testing.assert_allclose(
                    outs[coord][j],
                    _block(expected[j], spec, coord),
                    rtol=1e-4,
                    atol=1e-4,
                    err_msg=strat.name,
                )


def test_unknown_op_runs_replicated_and_says_so():
    proto = _model("Hardmax", [_f(4, 4)], {})
    node = _ir_node(proto)
    assert "Hardmax" not in REGISTRY
    (only,) = strategies_for(node, MESH, CTX)
    assert only.replicated_fallback and "no rule" in only.name


def test_vocab_parallel_gather_is_named_and_all_reduces():
    op, arrays, attrs = CASES["gather_vocab"]
    node = _ir_node(_model(op, arrays, attrs))
    vocab = [s for s in strategies_for(node, MESH, CTX) if s.local_kind == VOCAB_PARALLEL]
    assert vocab and all(VOCAB_PARALLEL in s.name for s in vocab)
    assert {c.kind for s in vocab for c in s.collectives} <= {"all_reduce", "reduce_scatter"}
    assert any(c.kind == "all_reduce" for s in vocab for c in s.collectives)
