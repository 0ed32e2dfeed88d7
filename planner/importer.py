"""ONNX importer: load without weights, bind symbolic dims, inline, fold shape math, check.

Exporters leave graphs that are dynamic in ways planning cannot use: symbolic batch/sequence
dims, Shape->Gather->Concat chains feeding Reshape/Expand, attention masks built at run time,
local functions (the dynamo exporter). The importer turns such a graph into one where every
tensor has a static shape and every op is one alpa-plan knows, or it refuses the model with a
single message that lists every problem at once.

Weights are never read: ``onnx_ir.load`` keeps external tensors lazy, and folding only touches
constants that carry their data and are not parameters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import (
    InlinePass,
    RemoveInitializersFromInputsPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)

from planner.errors import UnsupportedModelError, UserError
from planner.flops import CONTROL_FLOW_OPS, SUPPORTED_OPS
from planner.graph import Role, const_array, role_of, set_role, values_of

# Buffers that torch registers on modules and exporters keep as float initializers, but that
# are not trained (rotary frequencies, position ids, causal-mask buffers).
FROZEN_NAME_PATTERNS = (r"inv_freq", r"position_ids", r"masked_bias", r"\.attn\.bias$")
FOLD_SIZE_LIMIT = 1 << 22  # elements; bigger constants stay computed at run time
NON_FOLDABLE = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
        "Dropout",
    }
)


@dataclass(frozen=True)
class ImportOptions:
    """How to make the graph static: ``dims`` binds symbolic dim names, ``input_shapes`` whole
    inputs (``--dim batch=8``, ``--input-shape input_ids=8x1024``)."""

    dims: Mapping[str, int] = field(default_factory=dict)
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def parse_dim_bindings(items: tuple[str, ...] | list[str]) -> dict[str, int]:
    """``["batch=8", "seq=1024"]`` -> ``{"batch": 8, "seq": 1024}``."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit() or int(value) <= 0:
            raise UserError(f"bad --dim {item!r}: write NAME=POSITIVE_INT, e.g. --dim batch=8")
        out[name] = int(value)
    return out


def parse_input_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """``["input_ids=8x1024"]`` -> ``{"input_ids": (8, 1024)}``."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        dims = value.split("x") if value else []
        if not sep or not name or not dims or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise UserError(
                f"bad --input-shape {item!r}: write NAME=D1xD2..., e.g. input_ids=8x1024"
            )
        out[name] = tuple(int(d) for d in dims)
    return out


def load_model(path: str | Path) -> ir.Model:
    """Read an ONNX file without its weights (external data stays lazy, may even be absent)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} not found: pass the path of an .onnx file")
    try:
        model = ir.from_proto(_read_proto(path))
    except Exception as exc:  # protobuf decode errors come in several types
        raise UserError(
            f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}): "
            "pass a file written by onnx.save or torch.onnx.export"
        ) from None
    if len(model.graph) == 0:
        raise UserError(f"{str(path)!r} has an empty graph: pass an ONNX model with nodes")
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    """The model proto without weights; graph-only exports write external-data lengths as
    floats ("10485760.0"), which onnx's reader rejects, so normalise them to integers."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in ("offset", "length") and "." in entry.value:
                entry.value = str(int(float(entry.value)))
    return proto


def import_model(path: str | Path, options: ImportOptions | None = None) -> ir.Model:
    """Load, bind, inline, fold and check a model; every value ends with a static shape."""
    options = options or ImportOptions()
    model = load_model(path)
    InlinePass()(model)
    RemoveInitializersFromInputsPass()(model)
    _sequence_splits_to_split(model.graph)
    _cast_like_to_cast(model.graph)
    _check_ops(model.graph)
    _bind_inputs(model.graph, options)
    _assign_roles(model.graph)
    _tie_duplicated_parameters(model.graph)
    _make_static(model)
    return model


def _cast_like_to_cast(graph: ir.Graph) -> None:
    """``CastLike(x, like)`` reads only the dtype of ``like``, which is static: make it a
    ``Cast`` so that sharding never has to move ``like`` to where ``x`` is."""
    for node in list(graph):
        like = node.inputs[1] if node.op_type == "CastLike" and len(node.inputs) > 1 else None
        if like is None or like.dtype is None:
            continue
        cast = ir.Node(
            "",
            "Cast",
            [node.inputs[0]],
            attributes=[ir.AttrInt64("to", like.dtype)],
            name=node.name,
        )
        graph.insert_before(node, cast)
        out = cast.outputs[0]
        out.name, out.type = node.outputs[0].name, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    """The integer data of an initializer or Constant-node output, else None."""
    if value is None:
        return None
    array = const_array(value)
    producer = value.producer()
    if array is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        array = attr.value.numpy() if attr is not None else None
    return None if array is None else [int(x) for x in np.ravel(array)]


def _sequence_splits_to_split(graph: ir.Graph) -> None:
    """``SplitToSequence`` read back only by ``SequenceAt`` with constant indices (how the
    dynamo exporter writes ``torch.split``) is a plain ``Split``; rewrite it so that the rest
    of the planner never sees sequence types."""
    for node in list(graph):
        if node.op_type != "SplitToSequence" or node.attributes.get_int("keepdims", 1) != 1:
            continue
        uses = [user for user, _ in node.outputs[0].uses()]
        indices = [_constant_ints(user.inputs[1]) for user in uses]
        shape = node.inputs[0].shape
        sizes = _constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = node.attributes.get_int("axis", 0)
        if (
            not uses
            or any(u.op_type != "SequenceAt" for u in uses)
            or None in indices
            or sizes is None
            or shape is None
            or not isinstance(shape[axis], int)
        ):
            continue
        if len(sizes) == 1:  # a scalar chunk size: equal chunks, the last one may be short
            full, rest = divmod(shape[axis], sizes[0])
            sizes = [sizes[0]] * full + ([rest] if rest else [])
        split = ir.Node(
            "",
            "Split",
            [node.inputs[0], _int64_const(graph, sizes, node.name)],
            attributes=[ir.AttrInt64("axis", axis)],
            num_outputs=len(sizes),
            name=node.name,
        )
        graph.insert_before(node, split)
        for user, index in zip(uses, indices, strict=True):
            out = split.outputs[index[0] % len(sizes)]
            name = user.outputs[0].name
            user.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(user, safe=True)
            out.name = out.name or name
        graph.remove(node, safe=True)


def _int64_const(graph: ir.Graph, data: list[int], name: str | None) -> ir.Value:
    value = ir.Value(
        name=f"{name or 'split'}_sizes", const_value=ir.tensor(np.array(data, np.int64))
    )
    value.shape = ir.Shape([len(data)])
    value.type = ir.TensorType(ir.DataType.INT64)
    set_role(value, Role.CONST)
    graph.register_initializer(value)
    return value


def _check_ops(graph: ir.Graph) -> None:
    problems: dict[str, list[ir.Node]] = {}
    for node in graph:
        if node.op_type in CONTROL_FLOW_OPS:
            key = f"control flow op '{node.op_type}' (not plannable; export the loop unrolled)"
        elif node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
            key = f"unsupported op '{domain}{node.op_type}'"
        else:
            continue
        problems.setdefault(key, []).append(node)
    if problems:
        parts = [
            f"{key} x{len(nodes)} (first node: {nodes[0].name or '<unnamed>'})"
            for key, nodes in sorted(problems.items())
        ]
        raise UnsupportedModelError(
            "model cannot be planned: "
            + "; ".join(parts)
            + ". See README 'Supported ops' for the list"
        )


def _bind_inputs(graph: ir.Graph, options: ImportOptions) -> None:
    names = {v.name for v in graph.inputs}
    unknown = sorted(set(options.input_shapes) - names)
    if unknown:
        raise UserError(
            f"--input-shape names unknown input(s) {unknown}; the inputs are {sorted(names)}"
        )
    unbound: list[str] = []
    for value in graph.inputs:
        shape = value.shape
        if value.name in options.input_shapes:
            new = options.input_shapes[value.name]
            if shape is not None and len(shape) != len(new):
                raise UserError(
                    f"--input-shape {value.name} has rank {len(new)}, the model's input has "
                    f"rank {len(shape)}: give {len(shape)} dims"
                )
            value.shape = ir.Shape(list(new))
            continue
        if shape is None:
            unbound.append(f"{value.name} (no shape: use --input-shape {value.name}=D1xD2...)")
            continue
        dims = []
        for d in shape:
            if isinstance(d, int):
                dims.append(d)
            elif d.value is not None and d.value in options.dims:
                dims.append(options.dims[d.value])
            else:
                dims.append(None)
                unbound.append(f"{value.name} dim '{d.value}' (use --dim {d.value}=N)")
        if None not in dims:
            value.shape = ir.Shape(dims)
    if unbound:
        raise UserError("unbound symbolic dims: " + "; ".join(unbound))
    # Intermediate shapes recorded by the exporter may still be symbolic: infer them afresh.
    for node in graph:
        for out in node.outputs:
            out.shape = None


def _is_frozen_name(name: str) -> bool:
    return any(re.search(p, name) for p in FROZEN_NAME_PATTERNS)


# Inputs that hold statistics, not weights: BatchNormalization's running mean and variance.
STATISTIC_INPUTS = {"BatchNormalization": (3, 4)}


def _assign_roles(graph: ir.Graph) -> None:
    statistics = {
        id(node.inputs[i])
        for node in graph
        for i in STATISTIC_INPUTS.get(node.op_type, ())
        if i < len(node.inputs) and node.inputs[i] is not None
    }
    for value in graph.inputs:
        set_role(value, Role.INPUT)
    for value in graph.initializers.values():
        trainable = (
            id(value) not in statistics
            and value.dtype is not None
            and value.dtype.is_floating_point()
            and value.shape is not None
            and len(value.shape) >= 1
            and np.prod([d for d in value.shape if isinstance(d, int)]) >= 2
            and not _is_frozen_name(value.name or "")
        )
        set_role(value, Role.PARAM if trainable else Role.CONST)


TIE_CHECK_LIMIT = 1 << 26  # elements; larger tensors are never read to look for copies


def _tie_duplicated_parameters(graph: ir.Graph) -> None:
    """Re-tie weights an exporter stored twice (TorchScript: embedding and its transposed
    LM-head copy), so the training step has torch's parameters and updates them as one.

    Only 2-D parameters whose shapes match (equal or transposed) are compared, and only when
    their data is present and small enough: planning a graph-only model never reads weights.
    """
    params = [v for v in graph.initializers.values() if role_of(v) is Role.PARAM]
    by_shape: dict[tuple[int, ...], list[ir.Value]] = {}
    for v in params:
        dims = tuple(d for d in v.shape if isinstance(d, int)) if v.shape else ()
        if len(dims) == 2 and v.shape is not None and len(v.shape) == 2:
            by_shape.setdefault(dims, []).append(v)
    first_node = next(iter(graph))
    tied: set[int] = set()
    for shape, group in sorted(by_shape.items()):
        for dup in group:
            if id(dup) in tied or not dup.uses():
                continue
            candidates = [(c, False) for c in group if c is not dup]
            if shape[0] != shape[1]:
                candidates += [(c, True) for c in by_shape.get(shape[::-1], [])]
            for canon, transposed in candidates:
                if id(canon) in tied or params.index(canon) > params.index(dup):
                    continue
                a, b = _small_data(dup), _small_data(canon)
                if a is None or b is None or not np.array_equal(a, b.T if transposed else b):
                    continue
                source = canon
                if transposed:
                    node = ir.node(
                        "Transpose", [canon], {"perm": [1, 0]}, name=f"alpa_tie/{dup.name}"
                    )
                    source = node.outputs[0]
                    source.name, source.shape, source.type = (
                        f"{dup.name}.tied",
                        ir.Shape(list(shape)),
                        dup.type,
                    )
                    graph.insert_before(first_node, node)
                dup.replace_all_uses_with(source)
                tied.add(id(dup))
                break
    for v in params:
        if id(v) in tied:
            graph.initializers.pop(v.name)


def _small_data(value: ir.Value) -> np.ndarray | None:
    if value.shape is None or np.prod(list(value.shape)) > TIE_CHECK_LIMIT:
        return None
    return const_array(value)


def _make_static(model: ir.Model) -> None:
    """Alternate shape inference and constant folding until nothing changes."""
    for _ in range(8):
        ShapeInferencePass(data_prop=True)(model)
        if not _fold_constants(model):
            break
    RemoveUnusedNodesPass()(model)
    missing: list[str] = []
    for value in values_of(model.graph):
        shape = value.shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            producer = value.producer()
            where = f"output of {producer.op_type} '{producer.name}'" if producer else "input"
            missing.append(f"{value.name} ({where}, shape {shape})")
    if missing:
        raise UnsupportedModelError(
            f"{len(missing)} tensors have no static shape after binding and folding, first: "
            + "; ".join(missing[:5])
            + ". Bind every symbolic input dim (--dim / --input-shape)"
        )


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", 17)


def _fold_constants(model: ir.Model) -> bool:
    """Replace nodes whose inputs are all known constants (or static shapes) by initializers."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in NON_FOLDABLE:
            continue
        results = _evaluate(node, _opset(model))
        if results is None:
            continue
        for out, array in zip(node.outputs, results, strict=True):
            const = ir.Value(name=out.name, const_value=ir.tensor(array, name=out.name))
            const.shape = ir.Shape(list(array.shape))
            const.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
            set_role(const, Role.CONST)
            out.replace_all_uses_with(const, replace_graph_outputs=True)
            out.name = None
            graph.register_initializer(const)
        graph.remove(node, safe=True)
        changed = True
    return changed


def _evaluate(node: ir.Node, opset: int) -> list[np.ndarray] | None:
    if node.op_type == "Shape":
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        dims = list(shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return [np.array(dims[start:end], dtype=np.int64)]
    if node.op_type == "Size":
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return [np.array(int(np.prod(list(shape))), dtype=np.int64)]
    arrays = []
    for value in node.inputs:
        if value is None:
            arrays.append(None)
            continue
        if role_of(value) is Role.PARAM:
            return None
        array = const_array(value)
        if array is None or array.size > FOLD_SIZE_LIMIT:
            return None
        arrays.append(array)
    if node.op_type != "Constant" and not [a for a in arrays if a is not None]:
        return None
    proto = ir.serde.serialize_node(node)
    names = [v.name if v is not None else "" for v in node.inputs]
    feeds = {n: a for n, a in zip(names, arrays, strict=True) if n}
    try:
        graph_proto = onnx.helper.make_graph(
            [proto],
            "fold",
            [
                onnx.helper.make_tensor_value_info(
                    n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape
                )
                for n, a in feeds.items()
            ],
            [
                onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                for o in proto.output
            ],
        )
        model = onnx.helper.make_model(
            graph_proto, opset_imports=[onnx.helper.make_opsetid("", opset)]
        )
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception:
        return None
    results = [np.asarray(r) for r in results]
    if any(r.size > FOLD_SIZE_LIMIT for r in results):
        return None
    return results


def structure_hash(model: ir.Model) -> str:
    """sha256 of the graph's structure (ops, wiring, attributes, tensor types), never weights."""
    h = hashlib.sha256()
    g = model.graph
    for v in g.inputs:
        h.update(f"in {v.name} {v.dtype} {v.shape}\n".encode())
    for name in sorted(g.initializers):
        v = g.initializers[name]
        h.update(f"init {name} {v.dtype} {v.shape} {role_of(v).value}\n".encode())
    for node in g:
        attrs = sorted((k, repr(a.value)) for k, a in node.attributes.items())
        ins = [v.name if v is not None else "" for v in node.inputs]
        outs = [v.name for v in node.outputs]
        h.update(f"{node.domain}::{node.op_type} {ins} {outs} {attrs}\n".encode())
    for v in g.outputs:
        h.update(f"out {v.name}\n".encode())
    return h.hexdigest()
