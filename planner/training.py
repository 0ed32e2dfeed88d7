"""The training step: imported forward graph + loss + backward + optimizer update, as one ONNX
graph that plain onnxruntime runs and the planner shards.

Contract (other passes and the executor rely on it):

- ``build_training_step(model, options)`` returns a NEW ``ir.Model``; ``model`` (the output of
  ``planner.importer.import_model``) is left as it was.
- Inputs: batch inputs (+ the labels input the loss adds), then the trained parameters
  (``Role.PARAM``; graph inputs, not initializers), then optimizer state (``Role.OPT_STATE``,
  ``metadata_props["alpa.state_of"]`` = parameter name, "" for Adam's shared step counter).
- Outputs: the scalar loss, the updated parameters in ``planner.graph.parameters()`` order, the
  updated states in input order, then (``emit_gradients``) the gradients. Each updated value
  has the role of what it replaces and ``metadata_props["alpa.updates"]`` = that input's name:
  Alpa's donation, so a parameter, its gradient, its state and its update share one sharding.
- Each parameter's final gradient has ``Role.GRAD`` and ``metadata_props["alpa.grad_of"]``.
- Every node has a unique name and ``metadata_props["alpa.phase"]`` in forward | backward |
  update (loss nodes are forward); backward nodes name their forward node in
  ``alpa.forward_node``, update nodes their parameter in ``alpa.param``. Update nodes read only
  final gradients, parameters and state, so the executor can run forward+backward per
  microbatch, average the gradients (the loss is a mean) and run the update once.
- Parameters that the loss does not depend on (e.g. BatchNorm running statistics, which
  training-mode BatchNorm does not read) become frozen ``Role.CONST`` initializers.
- Weights are never read here: ``initial_state`` is the one place that reads them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planner.autodiff import FORWARD_NODE_KEY, Emitter, Names, differentiate
from planner.errors import UserError
from planner.grad_rules import GRAD_RULES, NON_DIFFERENTIABLE
from planner.graph import (
    PHASE_KEY,
    Role,
    const_array,
    parameters,
    role_of,
    set_role,
    shape_of,
    values_of,
)
from planner.loss import LOSSES, add_loss
from planner.optimizers import OPTIMIZERS, Hyper, add_update

GRAD_OF_KEY = "alpa.grad_of"
MIN_OPSET = 16  # scatter-add (ScatterND/ScatterElements reduction) for embedding gradients


@dataclass(frozen=True)
class TrainingOptions:
    loss: str = "auto"
    labels: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    emit_gradients: bool = False


def build_training_step(model: ir.Model, options: TrainingOptions) -> ir.Model:
    """The training-step model of an imported forward model (see the module docstring)."""
    if options.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {options.optimizer!r}: use {', '.join(OPTIMIZERS)}")
    if options.loss != "auto" and options.labels is None:
        raise UserError(f"--loss {options.loss} needs --labels NAME (the labels input to add)")
    opset = model.opset_imports.get("", 1)
    if opset < MIN_OPSET:
        raise UserError(
            f"training needs ONNX opset >= {MIN_OPSET}, the model has {opset}: "
            "re-export it with opset_version=17 or later"
        )
    train = model.clone()
    graph = train.graph
    names = Names(
        [*(v.name for v in values_of(graph) if v.name), *(n.name for n in graph if n.name)]
    )
    _name_forward_nodes(graph, names)
    _batch_norm_training_mode(graph, names)
    e = Emitter(graph, opset, names)
    loss = add_loss(graph, e, options.loss, options.labels)
    params = parameters(graph)
    grads = differentiate(graph, loss, params, e, GRAD_RULES, NON_DIFFERENTIABLE)
    trained = [p for p in params if p.name in grads]
    for p in params:
        if p.name not in grads:
            set_role(p, Role.CONST)
    final = _final_gradients(e, trained, grads)
    hp = Hyper(
        options.optimizer,
        options.lr,
        options.beta1,
        options.beta2,
        options.eps,
        options.weight_decay,
    )
    update = add_update(e, trained, final, hp)
    for p in trained:
        graph.initializers.pop(p.name or "")
        p.const_value = None
        graph.inputs.append(p)
    graph.inputs.extend(update.states)
    graph.outputs.clear()
    graph.outputs.extend([loss, *update.new_params, *update.new_states])
    if options.emit_gradients:
        graph.outputs.extend(final[p.name or ""] for p in trained)
    RemoveUnusedNodesPass()(train)
    return train


def _name_forward_nodes(graph: ir.Graph, names: Names) -> None:
    seen: set[str] = set()
    for node in graph:
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.op_type}_{len(seen)}")
        seen.add(node.name)
        node.metadata_props[PHASE_KEY] = "forward"


def _batch_norm_training_mode(graph: ir.Graph, names: Names) -> None:
    """Training uses batch statistics: rebuild inference-mode BatchNorm with training_mode=1
    (ONNX then requires its running-statistics outputs, which nothing reads)."""
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.attributes.get_int("training_mode", 0):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        new = ir.node(
            "BatchNormalization",
            list(node.inputs),
            {**attrs, "training_mode": 1},
            num_outputs=3,
            name=node.name,
            metadata_props=dict(node.metadata_props),
        )
        old = node.outputs[0]
        new.outputs[0].shape, new.outputs[0].type = old.shape, old.type
        new.outputs[0].metadata_props.update(old.metadata_props)
        for out, stat in zip(new.outputs[1:], node.inputs[3:5], strict=True):
            assert stat is not None
            out.name = names.fresh(f"{node.name}/{'running_stat'}")
            out.shape, out.type = stat.shape, stat.type
        graph.insert_after(node, new)
        old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        name, old.name = old.name, None
        new.outputs[0].name = name
        graph.remove(node, safe=True)


def _final_gradients(
    e: Emitter, params: list[ir.Value], grads: dict[str, ir.Value]
) -> dict[str, ir.Value]:
    """One distinct, named value per parameter gradient, in the parameter's dtype."""
    final: dict[str, ir.Value] = {}
    claimed: set[int] = set()
    for p in params:
        name = p.name or ""
        g = grads[name]
        producer = g.producer()
        forward = producer.metadata_props.get(FORWARD_NODE_KEY, "") if producer else ""
        e.scope("backward", f"grad/{name}", **{FORWARD_NODE_KEY: forward})
        assert p.dtype is not None
        g = e.cast(g, p.dtype)
        if id(g) in claimed or producer is None:
            g = e.op("Identity", g)
        claimed.add(id(g))
        g.name = e.names.fresh(f"{name}.grad")
        set_role(g, Role.GRAD)
        g.metadata_props[GRAD_OF_KEY] = name
        final[name] = g
    return final


def initial_state(model_in: ir.Model, training: ir.Model) -> dict[str, np.ndarray]:
    """Feeds for the parameter and state inputs of ``training``: weights read from
    ``model_in`` (the only place weights are read) and zero-initialised optimizer state."""
    feeds: dict[str, np.ndarray] = {}
    for value in training.graph.inputs:
        role = role_of(value)
        if role is Role.PARAM:
            source = model_in.graph.initializers.get(value.name or "")
            array = const_array(source) if source is not None else None
            if array is None:
                raise UserError(
                    f"parameter {value.name!r} has no weights in the model (a "
                    "graph-only export?): pass the model file with its weights"
                )
            feeds[value.name or ""] = array
        elif role is Role.OPT_STATE:
            assert value.dtype is not None
            feeds[value.name or ""] = np.zeros(shape_of(value), dtype=value.dtype.numpy())
    return feeds


def save_model_atomic(model: ir.Model, path: str | Path) -> None:
    """Write ``model`` to ``path`` via a temp file in the same directory and os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        ir.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def add_training_options(fn):
    """--loss/--labels/--optimizer/--lr/--beta1/--beta2/--eps/--weight-decay (click)."""
    defaults = TrainingOptions()
    options = [
        click.option(
            "--loss",
            type=click.Choice(LOSSES),
            default=defaults.loss,
            show_default=True,
            help="auto = the model's scalar output; else the loss over the logits.",
        ),
        click.option(
            "--labels",
            default=None,
            metavar="NAME",
            help="Name of the labels input the loss adds ('auto' = labels).",
        ),
        click.option(
            "--optimizer",
            type=click.Choice(OPTIMIZERS),
            default=defaults.optimizer,
            show_default=True,
        ),
        click.option("--lr", type=float, default=defaults.lr, show_default=True),
        click.option("--beta1", type=float, default=defaults.beta1, show_default=True),
        click.option("--beta2", type=float, default=defaults.beta2, show_default=True),
        click.option("--eps", type=float, default=defaults.eps, show_default=True),
        click.option(
            "--weight-decay",
            "weight_decay",
            type=float,
            default=defaults.weight_decay,
            show_default=True,
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def training_options_from_cli(
    loss: str,
    labels: str | None,
    optimizer: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    emit_gradients: bool = False,
) -> TrainingOptions:
    if lr <= 0 or eps <= 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise UserError(
            "bad optimizer settings: need --lr > 0, --eps > 0, --weight-decay >= 0 "
            "and 0 <= --beta1, --beta2 < 1"
        )
    return TrainingOptions(
        loss=loss,
        labels=labels,
        optimizer=optimizer,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        emit_gradients=emit_gradients,
    )
