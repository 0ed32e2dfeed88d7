"""The training step a plan executes, rebuilt from the model file and the plan's options.

The executor never reads planner internals: it re-imports the model with the plan's dims,
refuses it unless the imported structure hashes to the plan's ``structure_sha256``, and builds
the training step with the public ``planner.training`` API. The result (graph with constants,
initial parameters and optimizer state) is a ``PreparedStep``: prepared once, then shipped to
every rank as bytes so ranks never import the model themselves.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from planner.errors import UserError
from planner.plan_schema import Plan


@dataclass
class PreparedStep:
    model: ir.Model
    state: dict[str, np.ndarray]

    def to_bytes(self) -> tuple[bytes, bytes]:
        buf = io.BytesIO()
        np.savez(buf, **self.state)
        return ir.serde.serialize_model(self.model).SerializeToString(), buf.getvalue()

    @staticmethod
    def from_bytes(model: bytes, state: bytes) -> PreparedStep:
        with np.load(io.BytesIO(state)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return PreparedStep(ir.serde.deserialize_model(onnx.load_from_string(model)), arrays)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        model, state = self.to_bytes()
        (folder / "step.onnx").write_bytes(model)
        (folder / "state.npz").write_bytes(state)

    @staticmethod
    def load(folder: str | Path) -> PreparedStep:
        folder = Path(folder)
        return PreparedStep.from_bytes(
            (folder / "step.onnx").read_bytes(), (folder / "state.npz").read_bytes()
        )


def _materialize(model: ir.Model) -> None:
    """Load every constant's data (external or lazy) so the graph travels as one proto."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and not isinstance(tensor, ir.Tensor):
            value.const_value = ir.tensor(tensor.numpy(), name=value.name)


def prepare_step(plan: Plan, model_path: str | Path) -> PreparedStep:
    from planner.importer import ImportOptions, import_model, structure_hash
    from planner.training import TrainingOptions, build_training_step, initial_state

    if plan.options.mode != "train" or plan.options.training is None:
        raise UserError(
            "this plan is an inference plan: run executes training plans "
            "(compile with --mode train)"
        )
    options = ImportOptions(
        dims=dict(plan.model.dims),
        input_shapes={k: tuple(v) for k, v in plan.model.input_shapes.items()},
    )
    imported = import_model(model_path, options)
    digest = structure_hash(imported)
    if digest != plan.model.structure_sha256:
        raise UserError(
            f"model {str(model_path)!r} does not match the plan (structure sha256 "
            f"{digest[:12]}..., the plan was compiled for {plan.model.file!r} with "
            f"{plan.model.structure_sha256[:12]}...): pass the model the plan was compiled from"
        )
    training = build_training_step(imported, TrainingOptions(**plan.options.training.model_dump()))
    state = initial_state(imported, training)
    _materialize(training)
    return PreparedStep(training, state)
