"""The scalar training loss appended to the forward graph.

``auto`` uses the model's own scalar float output (models exported with their loss).
``cross_entropy`` adds an int64 labels input shaped like the logits without the class dim and
takes mean(-log_softmax(logits)[label]); ``mse`` adds a labels input shaped like the output
and takes mean((output - labels)²). Both are built from plain ONNX ops (LogSoftmax,
GatherElements, ReduceMean, ...) so the generic autodiff differentiates them and the planner
shards them like any other node; their nodes belong to the forward phase.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.autodiff import Emitter
from planner.errors import UserError
from planner.graph import Role, set_role, shape_of

LOSSES = ("auto", "cross_entropy", "mse")
DEFAULT_LABELS = "labels"


def _is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def _prediction(graph: ir.Graph, loss: str) -> ir.Value:
    """The output the loss reads: the one named 'logits', else the only float output."""
    floats = [v for v in graph.outputs if _is_float(v)]
    named = [v for v in floats if v.name == "logits"]
    if named:
        return named[0]
    if len(floats) == 1:
        return floats[0]
    names = [v.name for v in graph.outputs]
    raise UserError(
        f"--loss {loss}: cannot tell which output to use among {names}: export the model with a "
        "single float output or name it 'logits'"
    )


def _labels_input(
    graph: ir.Graph, name: str, shape: tuple[int, ...], dtype: ir.DataType
) -> ir.Value:
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken |= {o.name for n in graph for o in n.outputs}
    if name in taken:
        raise UserError(
            f"--labels {name!r} names an existing tensor of the model: pick a new name "
            "for the labels input"
        )
    value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
    set_role(value, Role.INPUT)
    graph.inputs.append(value)
    return value


def add_loss(graph: ir.Graph, e: Emitter, loss: str, labels: str | None) -> ir.Value:
    """Append the loss nodes (forward phase) and return the scalar loss value."""
    if loss not in LOSSES:
        raise UserError(f"unknown --loss {loss!r}: use one of {', '.join(LOSSES)}")
    e.scope("forward", "loss")
    if loss == "auto":
        scalars = [
            v for v in graph.outputs if _is_float(v) and v.shape is not None and len(v.shape) == 0
        ]
        if not scalars:
            outs = ", ".join(f"{v.name}{list(v.shape or [])}" for v in graph.outputs)
            raise UserError(
                f"the model has no scalar float output to use as the loss (outputs: {outs}): "
                "pass --loss cross_entropy --labels NAME or --loss mse --labels NAME"
            )
        return scalars[0]
    pred = _prediction(graph, loss)
    name = DEFAULT_LABELS if labels in (None, "auto") else labels
    assert pred.dtype is not None
    shape = shape_of(pred)
    if loss == "mse":
        target = _labels_input(graph, name, shape, pred.dtype)
        diff = e.op("Sub", pred, target)
        return _named(
            e, e.reduce("ReduceMean", e.op("Mul", diff, diff), range(len(shape)), keepdims=False)
        )
    if len(shape) < 2:
        raise UserError(
            f"--loss cross_entropy needs logits with a class dim; {pred.name!r} has "
            f"shape {list(shape)}"
        )
    target = _labels_input(graph, name, shape[:-1], ir.DataType.INT64)
    logp = e.op("LogSoftmax", pred, shape=shape, axis=-1)
    index = e.op("Unsqueeze", target, e.ints([-1]), shape=(*shape[:-1], 1))
    picked = e.op("GatherElements", logp, index, shape=(*shape[:-1], 1), axis=-1)
    mean = e.reduce("ReduceMean", picked, range(len(shape)), keepdims=False)
    return _named(e, e.op("Neg", mean))


def _named(e: Emitter, loss: ir.Value) -> ir.Value:
    loss.name = e.names.fresh("loss")
    return loss
