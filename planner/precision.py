"""Mixed-precision planning: price a float32 training graph as it runs in fp16/bf16.

Large models train in mixed precision (Megatron, DeepSpeed, Alpa's benchmarks): activations
and their gradients in half precision, an fp32 master copy of the parameters, fp32 gradients
for the update and fp32 Adam moments — 16 bytes per parameter, half-size activations, and
half-precision FLOP rates. Planning re-types the activations of the (float32) training graph
to the half type so every cost and memory figure follows; parameters, gradients and optimizer
state stay float32. The executor keeps running the graph as exported.
"""

from __future__ import annotations

import onnx_ir as ir

from planner.graph import Role, role_of, values_of

HALF_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


def retype_activations(graph: ir.Graph, dtype: str) -> None:
    """Activations of dtype float32 become ``dtype`` (no-op for float32)."""
    if dtype == "float32":
        return
    half = HALF_TYPES[dtype]
    for value in values_of(graph):
        if value.dtype == ir.DataType.FLOAT and role_of(value) is Role.ACTIVATION:
            value.type = ir.TensorType(half)
