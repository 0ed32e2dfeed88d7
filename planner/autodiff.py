"""Reverse-mode autodiff over the planner's ONNX graph (tinygrad's ``compute_gradient`` shape).

``differentiate`` walks the nodes that lie between the parameters and the loss in reverse
topological order, asks the VJP table in ``planner.grad_rules`` for one gradient per input,
undoes broadcasting (sum-reduces a gradient whose shape differs from its input's) in exactly
one place, and sums the gradients of values with several consumers. Only values that are both
reachable from a parameter and needed by the loss get a gradient, so nothing is built for
batch inputs, constants or integer paths.

``Emitter`` is how rules add nodes: every emitted value gets a unique name, a static shape and
a dtype at construction (planning needs shapes, and the graph is never run to learn them), and
every emitted node carries the ``alpa.*`` metadata of the phase being built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from planner.errors import UserError
from planner.graph import LOSS_SEED, PHASE_KEY, Role, set_role, shape_of

FORWARD_NODE_KEY = "alpa.forward_node"
PARAM_KEY = "alpa.param"

Shape = tuple[int, ...]
# Elementwise ops whose output shape is the broadcast of the input shapes.
BROADCASTING_OPS = frozenset(
    "Abs Add And Cos Div Equal Erf Exp Greater GreaterOrEqual Less LessOrEqual Log Max Min Mul "
    "Neg Not Or Pow Reciprocal Relu Sigmoid Sign Sin Sqrt Sub Tanh Where Identity Cast CastLike "
    "Softplus".split()
)
COMPARISONS = frozenset("Equal Greater GreaterOrEqual Less LessOrEqual And Or Not".split())


class Names:
    """Hands out value and node names that are unique in the graph being built."""

    def __init__(self, taken: Iterable[str]):
        self._taken = set(taken)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name


class Emitter:
    """Appends nodes to a graph, tagging each with the current phase's metadata."""

    def __init__(self, graph: ir.Graph, opset: int, names: Names):
        self.graph = graph
        self.opset = opset
        self.names = names
        self.meta: dict[str, str] = {}
        self._scope = "fwd"
        self._consts: dict[tuple, ir.Value] = {}

    def scope(self, phase: str, scope: str, **meta: str) -> None:
        """Tag the nodes emitted from now on with ``phase`` and the given metadata."""
        self.meta = {PHASE_KEY: phase, **meta}
        self._scope = scope

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        shapes: Sequence[Shape],
        dtypes: Sequence[ir.DataType],
        **attrs,
    ) -> list[ir.Value]:
        name = self.names.fresh(f"{self._scope}/{op_type}")
        outs = [
            ir.Value(
                name=self.names.fresh(f"{name}:{i}"), shape=ir.Shape(list(s)), type=ir.TensorType(d)
            )
            for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))
        ]
        node = ir.node(
            op_type,
            list(inputs),
            attrs or None,
            outputs=outs,
            name=name,
            metadata_props=dict(self.meta),
        )
        self.graph.append(node)
        return outs

    def op(
        self,
        op_type: str,
        *inputs: ir.Value | None,
        shape: Shape | None = None,
        dtype: ir.DataType | None = None,
        **attrs,
    ) -> ir.Value:
        """One-output node; the shape defaults to the broadcast of the inputs for elementwise
        ops and the dtype to the first input's (bool for comparisons)."""
        present = [v for v in inputs if v is not None]
        if shape is None:
            if op_type not in BROADCASTING_OPS:
                raise ValueError(f"emitting {op_type} needs an explicit shape")
            shape = tuple(np.broadcast_shapes(*(shape_of(v) for v in present)))
        if dtype is None:
            if op_type in COMPARISONS:
                dtype = ir.DataType.BOOL
            else:
                data = present[1] if op_type == "Where" else present[0]
                dtype = data.dtype
        assert dtype is not None
        return self.op_multi(op_type, inputs, [shape], [dtype], **attrs)[0]

    def const(self, array: np.ndarray | float | int | Sequence[int], dtype=None) -> ir.Value:
        """A (deduplicated) constant initializer with Role.CONST."""
        arr = np.asarray(array, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self._initializer(self.names.fresh("const"), arr)
        return self._consts[key]

    def seed(self, loss: ir.Value) -> ir.Value:
        """d loss / d loss: a 1 of its own (never shared with other constants), named
        ``LOSS_SEED`` so an executor can scale it (loss scaling)."""
        assert loss.dtype is not None
        return self._initializer(LOSS_SEED, np.ones(shape_of(loss), dtype=loss.dtype.numpy()))

    def _initializer(self, name: str, arr: np.ndarray) -> ir.Value:
        value = ir.Value(
            name=name,
            shape=ir.Shape(list(arr.shape)),
            type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
            const_value=ir.tensor(arr, name=name),
        )
        set_role(value, Role.CONST)
        self.graph.register_initializer(value)
        return value

    def scalar(self, x: float, like: ir.Value) -> ir.Value:
        assert like.dtype is not None
        return self.const(np.array(x, dtype=like.dtype.numpy()))

    def ints(self, values: Iterable[int]) -> ir.Value:
        return self.const(np.array(list(values), dtype=np.int64))

    # Ops whose form or shape needs computing; each keeps the opset differences in one place.

    def reshape(self, x: ir.Value, shape: Shape) -> ir.Value:
        if shape_of(x) == tuple(shape):
            return x
        return self.op("Reshape", x, self.ints(shape), shape=tuple(shape))

    def expand(self, x: ir.Value, shape: Shape) -> ir.Value:
        if shape_of(x) == tuple(shape):
            return x
        return self.op("Expand", x, self.ints(shape), shape=tuple(shape))

    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        shape = shape_of(x)
        return self.op("Transpose", x, shape=tuple(shape[p] for p in perm), perm=list(perm))

    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int], keepdims: bool) -> ir.Value:
        shape = shape_of(x)
        axes = sorted(a % len(shape) for a in axes)
        if not axes:
            return x
        out = tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self.op(op_type, x, self.ints(axes), shape=out, keepdims=int(keepdims))
        return self.op(op_type, x, shape=out, axes=axes, keepdims=int(keepdims))

    def zeros(self, shape: Shape, dtype: ir.DataType) -> ir.Value:
        return self.expand(self.const(np.zeros((), dtype=dtype.numpy())), shape)

    def cast(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        if x.dtype == dtype:
            return x
        return self.op("Cast", x, shape=shape_of(x), dtype=dtype, to=int(dtype))

    def matmul(self, a: ir.Value, b: ir.Value) -> ir.Value:
        sa, sb = shape_of(a), shape_of(b)
        batch = tuple(np.broadcast_shapes(sa[:-2], sb[:-2]))
        return self.op("MatMul", a, b, shape=(*batch, sa[-2], sb[-1]))

    def slice(self, x: ir.Value, axis: int, start: int, end: int) -> ir.Value:
        shape = list(shape_of(x))
        shape[axis] = end - start
        return self.op(
            "Slice", x, self.ints([start]), self.ints([end]), self.ints([axis]), shape=tuple(shape)
        )


GradRule = Callable[[Emitter, ir.Node, list[ir.Value | None], list[bool]], list[ir.Value | None]]


def unbroadcast(e: Emitter, grad: ir.Value, shape: Shape) -> ir.Value:
    """Sum a gradient over the dims that broadcasting added or stretched, down to ``shape``."""
    gshape = shape_of(grad)
    if gshape == tuple(shape):
        return grad
    lead = len(gshape) - len(shape)
    axes = [i for i, d in enumerate(gshape) if i < lead or (shape[i - lead] == 1 and d != 1)]
    return e.reshape(e.reduce("ReduceSum", grad, axes, keepdims=True), tuple(shape))


def _is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def differentiate(
    graph: ir.Graph,
    loss: ir.Value,
    wrt: Sequence[ir.Value],
    e: Emitter,
    rules: dict[str, GradRule],
    non_differentiable: frozenset[str],
) -> dict[str, ir.Value]:
    """Append the backward nodes of ``loss`` w.r.t. ``wrt``; returns the gradient per name for
    every value in ``wrt`` that the loss depends on."""
    nodes = list(graph)
    active = {id(v) for v in wrt}  # values that depend on a parameter
    for node in nodes:
        if node.op_type not in non_differentiable and any(
            id(v) in active for v in node.inputs if v is not None
        ):
            active.update(id(o) for o in node.outputs if _is_float(o))
    needed = {id(loss)} & active  # active values the loss depends on
    path: list[ir.Node] = []
    for node in reversed(nodes):
        if any(id(o) in needed for o in node.outputs):
            ins = [v for v in node.inputs if v is not None and id(v) in active]
            if ins:
                needed.update(id(v) for v in ins)
                path.append(node)
    _check_rules(path, rules)

    grads: dict[int, ir.Value] = {id(loss): e.seed(loss)}
    for node in path:
        outs = [grads.get(id(o)) for o in node.outputs]
        if all(g is None for g in outs):
            continue
        e.scope("backward", f"grad/{node.name}", **{FORWARD_NODE_KEY: node.name or ""})
        needs = [v is not None and id(v) in needed for v in node.inputs]
        in_grads = rules[node.op_type](e, node, outs, needs)
        for value, need, g in zip(node.inputs, needs, in_grads, strict=False):
            if not need or g is None or value is None:
                continue
            g = unbroadcast(e, g, shape_of(value))
            prev = grads.get(id(value))
            grads[id(value)] = g if prev is None else e.op("Add", prev, g)
    return {v.name: grads[id(v)] for v in wrt if id(v) in grads and v.name}


def _check_rules(path: list[ir.Node], rules: dict[str, GradRule]) -> None:
    missing: dict[str, list[ir.Node]] = {}
    for node in path:
        if node.op_type not in rules:
            missing.setdefault(node.op_type, []).append(node)
    if missing:
        parts = [
            f"{op} x{len(ns)} (first node: {ns[0].name})" for op, ns in sorted(missing.items())
        ]
        raise UserError(
            "no gradient rule for op(s) on the path from the parameters to the loss: "
            + "; ".join(parts)
            + ". Freeze those parameters or re-export without these ops"
        )
