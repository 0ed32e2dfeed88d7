"""Training batches: synthetic ones derived from the graph, or a user's ``.npz``.

Data inputs are the training graph's inputs that are neither parameters nor optimizer state
(model inputs plus the labels the loss added). The graph's shapes are those of one
microbatch; a step feeds ``microbatches`` of them, split along dim 0 of the global batch.
Synthetic integer inputs that index something (embedding rows, label classes) get values in
range of what they index; other integers (attention masks) are ones; floats are normal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from planner.errors import UserError
from planner.graph import shape_of

# ops an index tensor passes through unchanged in value
PASS_THROUGH = frozenset(
    "Reshape Flatten Unsqueeze Squeeze Cast Identity Transpose Expand Slice Concat Split".split()
)
INDEXING = {"Gather": 1, "GatherElements": 1, "GatherND": 1}


def index_bound(value: ir.Value, depth: int = 0) -> int | None:
    """Exclusive upper bound of the values an integer tensor may hold, from what it indexes."""
    if depth > 16:
        return None
    bounds = []
    for user, slot in value.uses():
        if user.op_type in INDEXING and slot == INDEXING[user.op_type]:
            data = user.inputs[0]
            assert data is not None
            axis = user.attributes.get_int("axis", 0)
            bounds.append(shape_of(data)[axis])
        elif user.op_type == "OneHot" and slot == 0:
            depth_value = user.inputs[1]
            const = depth_value.const_value if depth_value is not None else None
            if const is not None:
                bounds.append(int(np.ravel(const.numpy())[0]))
        elif user.op_type in PASS_THROUGH and slot == 0:
            for out in user.outputs:
                b = index_bound(out, depth + 1)
                if b is not None:
                    bounds.append(b)
    return min(bounds) if bounds else None


def data_inputs(graph: ir.Graph, state: set[str]) -> list[ir.Value]:
    return [v for v in graph.inputs if v.name not in state]


def global_shape(value: ir.Value, microbatches: int) -> tuple[int, ...]:
    shape = shape_of(value)
    if not shape:
        raise UserError(f"data input {value.name!r} is a scalar: microbatching needs a batch dim")
    return (shape[0] * microbatches, *shape[1:])


def synthetic_batch(
    graph: ir.Graph, state: set[str], microbatches: int, seed: int
) -> dict[str, np.ndarray]:
    """A deterministic global batch: the same on every rank for the same seed."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in data_inputs(graph, state):
        assert v.dtype is not None
        dtype = v.dtype.numpy()
        shape = global_shape(v, microbatches)
        if np.issubdtype(dtype, np.integer):
            bound = index_bound(v)
            out[v.name or ""] = (
                rng.integers(0, bound, shape).astype(dtype) if bound else np.ones(shape, dtype)
            )
        elif dtype == np.bool_:
            out[v.name or ""] = np.ones(shape, dtype)
        else:
            out[v.name or ""] = rng.standard_normal(shape).astype(dtype)
    return out


def load_batch(
    path: str | Path, graph: ir.Graph, state: set[str], microbatches: int
) -> dict[str, np.ndarray]:
    """Read and check a global batch before any compute: names, shapes and dtypes."""
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --data {str(path)!r}: {exc}") from None
    wanted = {v.name or "": v for v in data_inputs(graph, state)}
    missing, extra = sorted(set(wanted) - set(arrays)), sorted(set(arrays) - set(wanted))
    if missing or extra:
        raise UserError(
            f"--data {str(path)!r}: missing arrays {missing}, unexpected arrays "
            f"{extra}; the step's data inputs are {sorted(wanted)}"
        )
    for name, v in wanted.items():
        assert v.dtype is not None
        shape, dtype = global_shape(v, microbatches), v.dtype.numpy()
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            raise UserError(
                f"--data {str(path)!r}: array {name!r} is {arrays[name].dtype}"
                f"{list(arrays[name].shape)}, the plan needs {np.dtype(dtype)}{list(shape)} "
                f"(global batch = {microbatches} microbatches of {shape_of(v)[0]})"
            )
    return arrays


def microbatch(batch: dict[str, np.ndarray], m: int, microbatches: int) -> dict[str, np.ndarray]:
    """Micro-batch ``m`` of ``microbatches`` equal slices along dim 0 (views)."""
    out = {}
    for k, a in batch.items():
        n, rest = divmod(a.shape[0], microbatches)
        if rest:
            raise ValueError(f"{k}: dim 0 of {a.shape} does not split into {microbatches}")
        out[k] = a[m * n : (m + 1) * n]
    return out
