"""What `alpa-plan inspect-model` reports about an imported model."""

from __future__ import annotations

import onnx_ir as ir

from planner.flops import node_flops
from planner.graph import itemsize, numel, op_counts, parameters, shape_of


def _io(values) -> list[dict]:
    return [
        {"name": v.name, "shape": list(shape_of(v)), "dtype": v.dtype.name if v.dtype else None}
        for v in values
    ]


def model_summary(model: ir.Model) -> dict:
    """Op counts, parameter count and bytes, forward FLOPs, inputs and outputs."""
    graph = model.graph
    params = parameters(graph)
    return {
        "num_parameters": sum(numel(p) for p in params),
        "parameter_bytes": sum(numel(p) * itemsize(p.dtype) for p in params),
        "num_parameter_tensors": len(params),
        "forward_flops": sum(node_flops(n) for n in graph),
        "num_nodes": len(graph),
        "op_counts": op_counts(graph),
        "inputs": _io(graph.inputs),
        "outputs": _io(graph.outputs),
        "unsupported_ops": [],
    }
