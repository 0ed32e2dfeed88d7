"""Mixed precision on the executor: float16 compute, float32 everything else.

A plan compiled with ``--dtype float16`` is priced for half-precision activations and FLOP
rates with float32 master state (``planner.precision``). The executor runs it that way: each
forward and backward session is converted by onnxruntime's own float16 converter with its
inputs and outputs kept float32, so what crosses sessions (communication, gradient
accumulation, the optimizer update, checkpoints) stays float32 and only the compute inside
runs in half precision. float16's range is narrow, so the backward pass is seeded with a loss
scale instead of 1 and the step's gradients are divided by it before the update: dynamic
loss scaling as in PyTorch's ``GradScaler`` (halve and skip the update when a gradient is
not finite on any rank, double after 2000 clean steps), starting at and capped at 2^15: the
seed enters float16 itself here, whose largest value is 65504, so GradScaler's 2^16 would
overflow it (and growing past it would cost a skipped step every 2000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from runtime.comm import Communicator, array_module

HALF = "float16"  # the plan dtype the executor computes in half precision
MAX_SCALE = 2.0**15  # the largest power of two float16 holds: the seed is float16


# Kept in float32 besides the converter's own list, as PyTorch's autocast keeps them: ops that
# sum many addends (reductions, normalisations, softmax, scatter-adds of embedding and
# cross-entropy gradients) lose too much in float16's 11-bit mantissa (a batch-norm weight's
# gradient came out 1.6% off), and onnxruntime's CPU kernels have no float16 scatter-add.
FLOAT32_OPS = (
    "ScatterElements",
    "ScatterND",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "CumSum",
    "Softmax",
    "LogSoftmax",
    "SoftmaxCrossEntropyLoss",
    "LayerNormalization",
    "BatchNormalization",
)


def half_precision(model: onnx.ModelProto, keep: Sequence[str] = ()) -> onnx.ModelProto:
    """``model`` computing in float16, its inputs and outputs and the nodes named ``keep``
    still float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    half = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FLOAT32_OPS],
        node_block_list=list(keep),
    )
    return without_repeated_casts(half)


def without_repeated_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each repeated node and value_info kept once: onnxruntime-gpu 1.31's
    converter (1.32 fixed it) adds one identical Cast, same name and output, per float32 op
    that reads a float16 tensor, which onnxruntime then refuses as an invalid model."""
    graph = model.graph
    for field in (graph.node, graph.value_info):
        unique = list({item.SerializeToString(deterministic=True): item for item in field}.values())
        del field[:]
        field.extend(unique)
    return model


@dataclass
class LossScaler:
    scale: float = MAX_SCALE
    growth_interval: int = 2000
    clean_steps: int = 0

    def unscale(self, grads: Sequence, comm: Communicator) -> bool:
        """Divide the step's gradients by the scale in place; True when every rank's are
        finite (then the update may run). Moves the scale for the next step."""
        finite = True
        for g in grads:
            g *= g.dtype.type(1.0 / self.scale)
            finite = finite and bool(array_module(g).isfinite(g).all())
        everyone = comm.all_gather_host(np.array([1.0 if finite else 0.0], np.float32))
        ok = bool(everyone.min() > 0)
        if not ok:
            self.scale, self.clean_steps = self.scale / 2, 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale, self.clean_steps = min(self.scale * 2, MAX_SCALE), 0
        return ok
