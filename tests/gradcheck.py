"""Test helpers: float64 conversion, running a model, and central finite differences.

onnxruntime's CPU build has no float64 kernel for some ops (Erf, Conv, ConvTranspose,
AveragePool, ...); ``run`` falls back to onnx's ReferenceEvaluator for those graphs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planner.graph import Role, role_of, values_of

F32, F64 = ir.DataType.FLOAT, ir.DataType.DOUBLE


def to_float64(model: ir.Model) -> ir.Model:
    """Rewrite an imported model to float64 in place (reads the weights: tests only)."""
    for value in values_of(model.graph):
        if value.dtype == F32:
            value.type = ir.TensorType(F64)
            if value.const_value is not None:
                value.const_value = ir.tensor(
                    value.const_value.numpy().astype(np.float64), name=value.name
                )
    for node in model.graph:
        to = node.attributes.get("to")
        if node.op_type == "Cast" and to is not None and to.as_int() == F32:
            node.attributes["to"] = ir.AttrInt64("to", F64)
        for key in ("value",):
            attr = node.attributes.get(key)
            if (
                attr is not None
                and attr.type == ir.AttributeType.TENSOR
                and attr.as_tensor().dtype == F32
            ):
                array = attr.as_tensor().numpy().astype(np.float64)
                node.attributes[key] = ir.AttrTensor(key, ir.tensor(array))
    return model


class GatherElements(OpRun):
    """np.take_along_axis: the reference implementation mishandles some index shapes."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        return (np.take_along_axis(data, indices, axis=axis or 0),)


class Erf(OpRun):
    """float64 erf: the reference implementation rounds to float32."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu(OpRun):
    """float64 Gelu: the reference implementation is only float32-accurate."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return (0.5 * x * (1 + np.tanh(inner)),)
        return (0.5 * x * (1 + Erf._run(self, x / math.sqrt(2))[0]),)


class Runner:
    """Runs a model with onnxruntime, or the reference evaluator where ORT lacks a kernel."""

    def __init__(self, model: ir.Model):
        self.outputs = [v.name for v in model.graph.outputs]
        proto = ir.serde.serialize_model(model)
        try:
            session = ort.InferenceSession(
                proto.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            self._run = lambda feeds: session.run(None, feeds)
        except Exception:  # NOT_IMPLEMENTED: no float64 kernel
            evaluator = ReferenceEvaluator(proto, new_ops=[GatherElements, Erf, Gelu])
            self._run = lambda feeds: evaluator.run(None, feeds)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self._run(feeds), strict=True))


def loss_only(training: ir.Model) -> ir.Model:
    """The forward part of a training step: same inputs, only the loss output."""
    model = training.clone()
    loss = model.graph.outputs[0]
    model.graph.outputs.clear()
    model.graph.outputs.append(loss)
    RemoveUnusedNodesPass()(model)
    return model


def finite_difference_errors(
    training: ir.Model,
    feeds: dict[str, np.ndarray],
    per_param: int,
    rng: np.random.Generator,
    eps: float = 1e-6,
    floor: float = 1e-5,
) -> dict[str, float]:
    """Max relative error per parameter between the step's gradients (``emit_gradients``)
    and central differences, over ``per_param`` sampled entries with non-negligible gradient;
    ``floor`` keeps gradients that are zero up to rounding (e.g. attention key biases) from
    counting as relative errors."""
    grads = {
        v.metadata_props["alpa.grad_of"]: v.name
        for v in training.graph.outputs
        if role_of(v) is Role.GRAD
    }
    analytic = Runner(training)(feeds)
    loss = Runner(loss_only(training))
    loss_name = training.graph.outputs[0].name
    errors: dict[str, float] = {}
    for param, grad_name in grads.items():
        g = analytic[grad_name]
        flat = np.abs(g).reshape(-1)
        candidates = np.flatnonzero(flat > 1e-3 * flat.max()) if flat.max() > 0 else []
        worst = 0.0
        for index in rng.choice(candidates, size=min(per_param, len(candidates)), replace=False):
            values = []
            for sign in (1, -1):
                x = feeds[param].copy()
                x.reshape(-1)[index] += sign * eps
                values.append(float(loss({**feeds, param: x})[loss_name]))
            fd = (values[0] - values[1]) / (2 * eps)
            ad = float(g.reshape(-1)[index])
            worst = max(worst, abs(fd - ad) / max(abs(fd), abs(ad), floor))
        errors[param] = worst
    return errors
