"""Per-device memory of a training step, from tensor sizes and how they are sharded.

Bytes of a tensor on one device = bytes / (number of shards). Optimizer state is counted per
parameter: SGD keeps nothing, Adam/AdamW keep two moments (m, v) of the parameter's size.
"""

from __future__ import annotations

OPTIMIZER_STATES = {"sgd": 0, "adam": 2, "adamw": 2}


def sharded_bytes(total_bytes: float, shards: int) -> float:
    return total_bytes / max(1, shards)


def optimizer_state_bytes(param_bytes: float, optimizer: str) -> float:
    """Bytes of optimizer state for ``param_bytes`` of parameters."""
    return OPTIMIZER_STATES[optimizer] * param_bytes


def one_f_one_b_inflight(stage: int, num_stages: int, microbatches: int) -> int:
    """Micro-batches of activations stage ``stage`` (0-based) keeps alive under 1F1B."""
    return min(num_stages - stage, microbatches)
