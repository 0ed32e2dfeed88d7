"""Per-op sharding strategies: one registry, one small module per op family.

``strategies_for(node, mesh, ctx)`` returns the node's candidate ``Strategy`` list; an op
type without a rule gets one replicated strategy flagged ``replicated_fallback=True``.
Families: ``einsum`` (MatMul, Gemm, Einsum: role-generated dot strategies),
``pointwise`` (elementwise, Softmax, LayerNormalization), ``views`` (Reshape, Flatten,
Squeeze, Unsqueeze, Transpose, Expand, Pad, Tile), ``reductions``, ``indexing`` (Gather with
vocab-parallel embedding and its scatter-add gradient, GatherElements, GatherND, TopK, Slice,
Split, Concat), ``spatial`` (Conv, ConvTranspose, pooling, batch/instance normalization).
"""

from planner.strategies import (  # noqa: F401
    einsum,
    indexing,
    pointwise,
    reductions,
    spatial,
    views,
)
from planner.strategies.base import (
    REGISTRY,
    Collective,
    Rule,
    Strategy,
    StrategyContext,
    is_follower,
    register,
    strategies_for,
)

__all__ = [
    "REGISTRY",
    "Collective",
    "Rule",
    "Strategy",
    "StrategyContext",
    "is_follower",
    "register",
    "strategies_for",
]
