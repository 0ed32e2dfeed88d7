"""Optimizer updates as ONNX nodes: SGD, Adam (L2 weight decay) and AdamW (decoupled decay).

The update phase reads only final gradients, parameters and optimizer state, so the executor
can run it once on gradients accumulated over microbatches. Adam keeps per-parameter ``m`` and
``v`` (the parameter's shape and dtype) and one shared int64 step counter; bias correction
follows torch.optim.Adam: p -= lr/(1-β1ᵗ) · m / (sqrt(v)/sqrt(1-β2ᵗ) + eps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from planner.autodiff import PARAM_KEY, Emitter
from planner.graph import UPDATES_KEY, Role, set_role, shape_of

OPTIMIZERS = ("sgd", "adam", "adamw")
STATE_OF_KEY = "alpa.state_of"
STEP_NAME = "optimizer.step"


@dataclass(frozen=True)
class Hyper:
    optimizer: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass
class Update:
    """What the update phase adds: new state inputs, and (updated value, replaced input) pairs
    for parameters and for states."""

    states: list[ir.Value]
    new_params: list[ir.Value]
    new_states: list[ir.Value]


def _state(e: Emitter, name: str, like: ir.Value | None, param: str) -> ir.Value:
    if like is None:  # the step counter
        value = ir.Value(
            name=e.names.fresh(name), shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64)
        )
    else:
        value = ir.Value(
            name=e.names.fresh(name),
            shape=ir.Shape(list(shape_of(like))),
            type=ir.TensorType(like.dtype),
        )
    set_role(value, Role.OPT_STATE)
    value.metadata_props[STATE_OF_KEY] = param
    return value


def _mark_update(e: Emitter, new: ir.Value, old: ir.Value, role: Role) -> None:
    new.name = e.names.fresh(f"{old.name}.next")
    set_role(new, role)
    new.metadata_props[UPDATES_KEY] = old.name or ""


def add_update(e: Emitter, params: list[ir.Value], grads: dict[str, ir.Value], hp: Hyper) -> Update:
    """Append the update nodes for every parameter in ``params`` (all have a gradient)."""
    out = Update([], [], [])
    step = new_step = None
    corrections: dict[ir.DataType, tuple[ir.Value, ir.Value]] = {}
    if hp.optimizer != "sgd":
        step = _state(e, STEP_NAME, None, "")
        e.scope("update", "update/step", **{PARAM_KEY: ""})
        new_step = e.op("Add", step, e.const(np.array(1, dtype=np.int64)))
        for p in params:
            assert p.dtype is not None
            if p.dtype not in corrections:
                t = e.cast(new_step, p.dtype)
                bc1 = e.op("Sub", e.scalar(1.0, p), e.op("Pow", e.scalar(hp.beta1, p), t))
                bc2 = e.op("Sub", e.scalar(1.0, p), e.op("Pow", e.scalar(hp.beta2, p), t))
                corrections[p.dtype] = (e.op("Div", e.scalar(hp.lr, p), bc1), e.op("Sqrt", bc2))
    for p in params:
        name = p.name or ""
        e.scope("update", f"update/{name}", **{PARAM_KEY: name})
        g = grads[name]
        decay = hp.weight_decay
        if decay and hp.optimizer != "adamw":  # L2 regularisation folded into the gradient
            g = e.op("Add", g, e.op("Mul", p, e.scalar(decay, p)))
        if hp.optimizer == "sgd":
            new = e.op("Sub", p, e.op("Mul", g, e.scalar(hp.lr, p)))
        else:
            m, v = _state(e, f"{name}.adam_m", p, name), _state(e, f"{name}.adam_v", p, name)
            new_m = e.op(
                "Add",
                e.op("Mul", m, e.scalar(hp.beta1, p)),
                e.op("Mul", g, e.scalar(1.0 - hp.beta1, p)),
            )
            new_v = e.op(
                "Add",
                e.op("Mul", v, e.scalar(hp.beta2, p)),
                e.op("Mul", e.op("Mul", g, g), e.scalar(1.0 - hp.beta2, p)),
            )
            step_size, sqrt_bc2 = corrections[p.dtype]
            denom = e.op("Add", e.op("Div", e.op("Sqrt", new_v), sqrt_bc2), e.scalar(hp.eps, p))
            base = p
            if decay and hp.optimizer == "adamw":
                base = e.op("Mul", p, e.scalar(1.0 - hp.lr * decay, p))
            new = e.op("Sub", base, e.op("Mul", step_size, e.op("Div", new_m, denom)))
            for state, updated in ((m, new_m), (v, new_v)):
                _mark_update(e, updated, state, Role.OPT_STATE)
                updated.metadata_props[STATE_OF_KEY] = name
                out.states.append(state)
                out.new_states.append(updated)
        _mark_update(e, new, p, Role.PARAM)
        out.new_params.append(new)
    if step is not None and new_step is not None:
        _mark_update(e, new_step, step, Role.OPT_STATE)
        new_step.metadata_props[STATE_OF_KEY] = ""
        out.states.append(step)
        out.new_states.append(new_step)
    return out
