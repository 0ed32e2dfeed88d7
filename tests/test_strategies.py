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
from planner.importer import ImportOptions, import_model
from planner.mesh import mesh_from_links
from planner.sharding import ShardingSpec, local_shape
from planner.strategies import REGISTRY, StrategyContext, strategies_for
from planner.strategies.indexing import VOCAB_PARALLEL
from planner.training import TrainingOptions, build_training_step
from tests.conftest import FIXTURES

MESH = mesh_from_links((2, 2), [flat_link(2, 1e-6, 1e9), flat_link(2, 1e-6, 1e10)])
CTX = StrategyContext(resolve_cluster("p3.16xlarge").device, reduce_scatter=True)
RNG = np.random.default_rng(0)
CONST_INPUT_OPS = (
    "Reshape",
    "ReduceSum",
    "ReduceMean",
    "Split",
    "Pad",
    "Tile",
    "TopK",
    "CumSum",
    "OneHot",
)


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
    "gather_elements": (
        "GatherElements",
        [_f(4, 8, 6), _i(*RNG.integers(0, 8, (4, 2, 6)).flat).reshape(4, 2, 6)],
        {"axis": 1},
    ),
    "scatter_add_rows": (
        "ScatterElements",
        [_f(8, 4), _i(*RNG.integers(0, 8, 16)).reshape(4, 4), _f(4, 4)],
        {"axis": 0, "reduction": "add"},
    ),
    "scatter_add_last": (
        "ScatterElements",
        [_f(4, 2, 8), _i(*RNG.integers(0, 8, 8)).reshape(4, 2, 1), _f(4, 2, 1)],
        {"axis": 2, "reduction": "add"},
    ),
    "scatter_set": (
        "ScatterElements",
        [_f(4, 8), _i(*range(0, 8, 2), *range(1, 8, 2)).reshape(2, 4).T.copy(), _f(4, 2)],
        {"axis": 1},
    ),
    "gather_nd_experts": ("GatherND", [_f(4, 6, 4), _i(3, 0, 2, 2, 1, 0, 3, 1).reshape(8, 1)], {}),
    "top_k": ("TopK", [_f(4, 2, 8), _i(3)], {"axis": -1}),
    "pad": ("Pad", [_f(4, 2, 8), _i(0, 0, 1, 0, 0, 2)], {}),
    "tile": ("Tile", [_f(4, 2, 8), _i(1, 2, 1)], {}),
    "conv_transpose": ("ConvTranspose", [_f(2, 4, 3, 3), _f(4, 2, 3, 3), _f(2)], {}),
    "max_pool": ("MaxPool", [_f(2, 4, 6, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "average_pool": (
        "AveragePool",
        [_f(2, 4, 6, 6)],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    ),
    "global_average_pool": ("GlobalAveragePool", [_f(2, 4, 3, 3)], {}),
    "batch_norm_train": (
        "BatchNormalization",
        [_f(4, 4, 3, 3), _f(4), _f(4), _f(4), np.abs(_f(4))],
        {"training_mode": 1},
    ),
    "batch_norm_infer": (
        "BatchNormalization",
        [_f(4, 4, 3, 3), _f(4), _f(4), _f(4), np.abs(_f(4))],
        {},
    ),
    "one_hot": ("OneHot", [_i(*RNG.integers(0, 8, 8)).reshape(4, 2), _i(8), _f(2)], {"axis": 1}),
    "cumsum": ("CumSum", [_f(4, 2, 8), _i(2)], {}),
    "trilu": ("Trilu", [_f(4, 4, 4)], {"upper": 0}),
    "depth_to_space": ("DepthToSpace", [_f(4, 8, 2, 2)], {"blocksize": 2}),
    "instance_norm": ("InstanceNormalization", [_f(2, 4, 3, 3), _f(4), _f(4)], {}),
}
OUTPUT_TYPES = {"Split": 2, "TopK": (TensorProto.FLOAT, TensorProto.INT64)}


def _model(op, arrays, attrs, local_shapes=None):
    names = [f"x{i}" for i in range(len(arrays))]
    const = {
        n: a
        for n, a in zip(names, arrays, strict=True)
        if a.dtype == np.int64 and op in CONST_INPUT_OPS
    }
    types = OUTPUT_TYPES.get(op, 3 if attrs.get("training_mode") else 1)
    types = (TensorProto.FLOAT,) * types if isinstance(types, int) else types
    n_out = len(types)
    node = helper.make_node(op, names, [f"y{j}" for j in range(n_out)], **attrs)
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in zip(names, arrays, strict=True)
        if n not in const
    ]
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in const.items()]
    outs = [helper.make_tensor_value_info(f"y{j}", t, None) for j, t in enumerate(types)]
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


def _vocab_parallel_blocks(strat, arrays, blocks, coord):
    """The executor's vocab-parallel program: indices shifted to this rank's first row, rows
    held elsewhere masked (looked up as 0, their scattered updates dropped)."""
    rows = blocks[0].shape[0]
    offset = _block(np.arange(arrays[0].shape[0]), ShardingSpec((strat.inputs[0].dims[0],)), coord)
    idx = blocks[1] - offset[0]
    mask = (idx < 0) | (idx >= rows)
    blocks = list(blocks)
    blocks[1] = np.where(mask, 0, idx)
    if len(blocks) > 2:
        blocks[2] = np.where(mask, 0, blocks[2]).astype(blocks[2].dtype)
    return blocks, mask


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
            blocks = [_block(a, s, coord) for a, s in zip(local, strat.inputs, strict=True)]
            if strat.local_kind == VOCAB_PARALLEL:
                blocks, mask = _vocab_parallel_blocks(strat, arrays, blocks, coord)
                if op == "Gather":
                    out = blocks[0][blocks[1]]
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


def _strategies(case, **override):
    op, arrays, attrs = CASES[case]
    return strategies_for(_ir_node(_model(op, arrays, {**attrs, **override})), MESH, CTX)


def test_scatter_add_rows_offers_vocab_parallel_and_partial_sums():
    """The embedding gradient: rows split is vocab-parallel, index split is a partial sum."""
    found = _strategies("scatter_add_rows")
    assert any(s.local_kind == VOCAB_PARALLEL and s.inputs[0].dims[0] for s in found)
    assert any(s.inputs[1].dims[0] and s.collectives for s in found)
    set_only = _strategies("scatter_set")
    assert all(not s.inputs[0].dims[1] and not s.inputs[1].dims[1] for s in set_only)


def test_batch_statistics_and_pool_indices_keep_the_batch_whole():
    train = _strategies("batch_norm_train")
    assert all(not s.inputs[0].dims[0] for s in train)
    assert any(s.inputs[0].dims[1] for s in train)
    assert any(s.inputs[0].dims[0] for s in _strategies("batch_norm_infer"))
    op, arrays, attrs = CASES["max_pool"]
    proto = _model(op, arrays, attrs)
    proto.graph.node[0].output.append("indices")
    (only,) = strategies_for(_ir_node(proto), MESH, CTX)
    assert only.outputs[0] == ShardingSpec.replicated(4) and not only.replicated_fallback


def test_every_op_of_the_fixture_training_graphs_has_a_rule():
    """No fixture (GPT-2, Llama, Mixtral, BERT, T5, ViT, WRN with BatchNorm) falls back to a
    replicated op in its training step."""
    dims = {"batch": 2, "seq": 8, "dec_seq": 8}
    missing = {}
    for name in (
        "gpt2.ts",
        "llama.dynamo",
        "mixtral.dynamo",
        "mixtral.ts",
        "bert.ts",
        "t5.ts",
        "vit.dynamo",
        "wrn.dynamo",
        "wrn.dynamo_noopt",
    ):
        model = import_model(FIXTURES / f"{name}.onnx", ImportOptions(dims=dims))
        step = build_training_step(model, TrainingOptions(loss="cross_entropy", labels="labels"))
        ops = {n.op_type for n in step.graph if n.op_type != "Constant"}
        missing[name] = sorted(ops - set(REGISTRY))
    assert missing == {name: [] for name in missing}
