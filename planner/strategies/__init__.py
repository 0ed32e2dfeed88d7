"""Per-op sharding strategies: one registry, one small module per op family.

``strategies_for(node, mesh, ctx)`` returns the node's candidate ``Strategy`` list; an op
type without a rule gets one replicated strategy flagged ``replicated_fallback=True``.
Families: ``einsum`` (MatMul, Gemm, Einsum, Conv: role-generated dot strategies),
``pointwise`` (elementwise, Softmax, LayerNormalization), ``views`` (Reshape, Flatten,
Squeeze, Unsqueeze, Transpose, Expand), ``reductions``, ``indexing`` (Gather with
vocab-parallel embedding, Slice, Split, Concat).
"""

from planner.strategies import einsum, indexing, pointwise, reductions, views  # noqa: F401
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
