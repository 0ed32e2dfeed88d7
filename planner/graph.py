"""The planner's graph IR: onnx_ir's Model/Graph/Node/Value plus the facts the passes read.

We build on onnx_ir rather than a home-grown graph: weights stay lazy (ExternalTensor), the
same objects carry forward, backward and optimizer nodes, and serialization back to ONNX is
free. What this module adds is the planner's vocabulary on top of it:

- every Value carries a *role* (``param``, ``input``, ``const``, ``activation``, ``grad``,
  ``opt_state``), stored in ``metadata_props`` so it survives a round trip through ONNX;
- every Value has a static shape once imported (``shape_of`` refuses anything else);
- nodes have FLOPs and bytes moved (``planner.flops``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator

import onnx_ir as ir

ROLE_KEY = "alpa.role"
# Node metadata: forward | backward | update (planner.training writes it, every pass reads it).
PHASE_KEY = "alpa.phase"
# Value metadata: the graph input an output replaces in place (updated parameter / state).
UPDATES_KEY = "alpa.updates"
# The initializer that seeds the backward pass (d loss / d loss = 1): an executor running in
# half precision scales it, and the gradients with it, so small gradients do not underflow.
LOSS_SEED = "alpa.loss_seed"


class Role(str, enum.Enum):
    """What a tensor is to the training step; decides memory accounting and sharding aliases."""

    PARAM = "param"
    INPUT = "input"
    CONST = "const"
    ACTIVATION = "activation"
    GRAD = "grad"
    OPT_STATE = "opt_state"


def role_of(value: ir.Value) -> Role:
    """The value's role; values without a recorded role are activations."""
    return Role(value.metadata_props.get(ROLE_KEY, Role.ACTIVATION.value))


SHAPE_ONLY_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# One-input ops that commute with a sum: partial sums may pass through them.
LINEAR_UNARY_OPS = SHAPE_ONLY_OPS | {"Neg", "Identity"}


def gradient_reshape(value: ir.Value) -> ir.Node | None:
    """The shape-only op that is ``value``'s one use and turns it into a gradient (a bias
    gradient is a ReduceSum, reshaped), if there is one."""
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    user, slot = uses[0]
    if slot != 0 or user.op_type not in SHAPE_ONLY_OPS or role_of(user.outputs[0]) is not Role.GRAD:
        return None
    return user


def loss_chain(value: ir.Value) -> list[ir.Node] | None:
    """The one-input linear ops that take ``value`` to the step's loss (graph output 0), if
    the loss is all it reaches (a mean cross-entropy's ReduceMean -> Neg). The loss is only
    reported, never read by the backward pass (that starts from a constant seed), so partial
    sums of ``value`` may be reduced once per step, on the micro-batches' mean loss."""
    graph = value.graph
    if graph is None or not graph.outputs:
        return None
    loss, chain = graph.outputs[0], []
    while value is not loss:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        user, slot = uses[0]
        if slot != 0 or user.op_type not in LINEAR_UNARY_OPS or len(user.outputs) != 1:
            return None
        chain.append(user)
        value = user.outputs[0]
    return None if list(value.uses()) else chain


# Ops a sum over ranks passes through, by the inputs it may arrive in (None: any). An Add or
# Sum needs it in all of its inputs, a scatter-add in its updates and in its base (or a base
# of zeros): the executor checks that (``runtime.partition``); the planner prices by shape.
SUM_PASSING_SLOTS: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in LINEAR_UNARY_OPS | {"Transpose"}},
    "Add": None,
    "Sum": None,
    "ScatterElements": (0, 2),
    "ScatterND": (0, 2),
}


def passes_sums(node: ir.Node, slot: int) -> bool:
    """Whether a sum over ranks arriving in input ``slot`` of ``node`` passes on to its output."""
    if node.op_type not in SUM_PASSING_SLOTS or len(node.outputs) != 1:
        return False
    if node.op_type.startswith("Scatter") and node.attributes.get_string("reduction", "") != "add":
        return False
    slots = SUM_PASSING_SLOTS[node.op_type]
    return slots is None or slot in slots


def summed_into_gradient(value: ir.Value) -> bool:
    """Every use of ``value`` passes sums on (``passes_sums``), in the backward pass, into
    parameter gradients and nothing else (a tied embedding's transposed lm_head gradient, a
    position embedding's scatter-add of a batch sum): a partial sum of it may be completed
    once per step, by the gradients' bucketed all-reduce. Not a lone reshape into a gradient
    (``gradient_reshape``), through which a reduce-scatter is restated as well."""
    if gradient_reshape(value) is not None:
        return False
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if role_of(v) is Role.GRAD and v is not value:
            continue
        uses = list(v.uses())
        if not uses or v.is_graph_output() or role_of(v) is Role.GRAD:
            return False
        for user, slot in uses:
            if user.metadata_props.get(PHASE_KEY) != "backward" or not passes_sums(user, slot):
                return False
            stack.extend(user.outputs)
    return True


def is_zeros(value: ir.Value) -> bool:
    """A constant all-zero tensor, or one expanded, cast or shaped from such a constant
    (ConstantOfShape's default value is zero)."""
    array = const_array(value)
    if array is not None:
        return not array.any()
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr is None or not attr.as_tensor().numpy().any()
    return node.op_type in ("Expand", "Cast", "Identity") and is_zeros(node.inputs[0])


def synced_as_gradient(value: ir.Value) -> bool:
    """A final gradient, a gradient before its reshape, a partial sum summed into gradients
    alone, or the loss before its linear ops: their partial sums are synchronised once per
    step, bucketed with the gradients, as the executor does."""
    return (
        role_of(value) is Role.GRAD
        or gradient_reshape(value) is not None
        or summed_into_gradient(value)
        or loss_chain(value) is not None
    )


def weight_only(value: ir.Value, memo: dict[int, bool]) -> bool:
    """Computed from parameters, optimizer state and constants alone: no batch data reaches
    it, so none of its dims is a batch (a tied weight's transpose, say). ``memo`` caches by
    value id across calls on one graph."""
    stack = [value]
    while stack:
        v = stack[-1]
        if id(v) in memo:
            stack.pop()
            continue
        producer = v.producer()
        if producer is None:
            role = role_of(v)
            memo[id(v)] = role in (Role.PARAM, Role.OPT_STATE, Role.CONST) or (
                v.const_value is not None and role is not Role.INPUT
            )
            stack.pop()
            continue
        pending = [i for i in producer.inputs if i is not None and id(i) not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[id(v)] = all(memo[id(i)] for i in producer.inputs if i is not None)
        stack.pop()
    return memo[id(value)]


def set_role(value: ir.Value, role: Role) -> None:
    value.metadata_props[ROLE_KEY] = role.value


def shape_of(value: ir.Value) -> tuple[int, ...]:
    """The static shape of a value; the importer guarantees every value has one."""
    shape = value.shape
    if shape is None:
        raise ValueError(f"tensor {value.name!r} has no shape")
    dims = []
    for d in shape:
        if not isinstance(d, int):
            raise ValueError(f"tensor {value.name!r} has a symbolic dim {d}")
        dims.append(d)
    return tuple(dims)


def numel(value: ir.Value) -> int:
    return math.prod(shape_of(value))


def itemsize(dtype: ir.DataType | None) -> int:
    """Bytes per element; sub-byte types round up to one byte."""
    if dtype is None:
        return 4
    return max(1, math.ceil(dtype.itemsize))


def nbytes(value: ir.Value) -> int:
    return numel(value) * itemsize(value.dtype)


def tensor_inputs(node: ir.Node) -> list[ir.Value]:
    """The node's present inputs (ONNX marks omitted optional inputs with None)."""
    return [v for v in node.inputs if v is not None]


def parameters(graph: ir.Graph) -> list[ir.Value]:
    """Trainable parameters in a stable order (graph inputs first, then initializers)."""
    seen: dict[str, ir.Value] = {}
    for v in [*graph.inputs, *graph.initializers.values()]:
        if role_of(v) is Role.PARAM and v.name not in seen:
            seen[v.name] = v
    return list(seen.values())


def values_of(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the graph once: inputs, initializers, then node outputs in order."""
    seen: set[int] = set()
    for v in [*graph.inputs, *graph.initializers.values()]:
        if id(v) not in seen:
            seen.add(id(v))
            yield v
    for node in graph:
        for v in node.outputs:
            if id(v) not in seen:
                seen.add(id(v))
                yield v


def op_counts(nodes: Iterable[ir.Node]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def const_array(value: ir.Value):
    """The value's constant numpy data, or None when it is not a (loaded) constant."""
    tensor = value.const_value
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # external data that was never written (graph-only models)
        return None
