"""Strategy records, the op registry, and the helpers every rule shares.

A ``Strategy`` is one way to run one node on a logical mesh: the spec each input must arrive
in, the spec of each output *after* the strategy's own collectives, its compute and
communication seconds, the collectives it performs and the per-device bytes of its outputs.
Rules never write cost code: ``make_strategy`` prices a (inputs, outputs, collectives) triple
with the roofline (``cost_models.compute``) and the mesh's alpha-beta model.

The registry is one dict from ONNX op type to a ``Rule`` (a function plus data traits such as
``follows``, which tells the ILP builder the node may be merged into the producer of its
followed input). Nothing outside this package switches on op types.

Rules are pure functions of what ``op_signature`` records, so ``strategies_for`` memoizes
them per (signature, mesh, context): the repeated blocks of a transformer share one list.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import onnx_ir as ir

from cost_models.cluster import Device
from cost_models.compute import op_time
from planner.flops import node_bytes, node_flops
from planner.graph import const_array, itemsize, shape_of
from planner.mesh import LogicalMesh
from planner.sharding import ShardingSpec, bucketed_collective_seconds, collective_seconds


@dataclass(frozen=True)
class Collective:
    """A collective a strategy performs on one of its tensors (``"out0"``, ``"in1"``)."""

    kind: str  # all_reduce | reduce_scatter | all_gather | all_to_all
    axes: tuple[int, ...]
    nbytes: float  # per-rank bytes, cost_models.collectives convention
    tensor: str
    reduce_op: str | None = None  # sum | mean | max | min for reductions
    dim: int | None = None  # tensor dim scattered / gathered
    seconds: float = 0.0


@dataclass(frozen=True)
class Strategy:
    """One candidate sharding of a node (Alpa's strategy vector entry)."""

    name: str
    inputs: tuple[ShardingSpec | None, ...]  # aligned with node.inputs; None = omitted input
    outputs: tuple[ShardingSpec, ...]
    compute: float  # seconds on one device
    comm: float  # seconds of this strategy's own collectives
    collectives: tuple[Collective, ...] = ()
    memory: float = 0.0  # bytes of the outputs on one device
    local_kind: str = "plain"  # how a rank computes its block (e.g. "vocab_parallel_gather")
    replicated_fallback: bool = False

    @property
    def cost(self) -> float:
        return self.compute + self.comm


@dataclass(frozen=True)
class StrategyContext:
    """What rules may read besides the node: the device, and options set by the ILP builder.

    ``reduce_scatter``: offer reduce-scatter resolutions of partial sums (gradients, ZeRO).
    ``bucketed``: outputs (``"out0"``...) that are final gradients; the all-reduce or
    reduce-scatter that completes them is bucketed (``bucketed_collective_seconds``).
    """

    device: Device
    reduce_scatter: bool = False
    bucketed: frozenset[str] = frozenset()


RuleFn = Callable[[ir.Node, LogicalMesh, StrategyContext], list[Strategy]]


@dataclass(frozen=True)
class Rule:
    fn: RuleFn
    follows: bool  # merge the node into the producer of its followed input


REGISTRY: dict[str, Rule] = {}


def register(*op_types: str, follows: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the strategy rule of ``op_types`` (explicit, greppable)."""

    def deco(fn: RuleFn) -> RuleFn:
        for op in op_types:
            if op in REGISTRY:
                raise ValueError(f"op {op} registered twice")
            REGISTRY[op] = Rule(fn, follows)
        return fn

    return deco


def is_follower(node: ir.Node) -> bool:
    rule = REGISTRY.get(node.op_type)
    return rule is not None and rule.follows


def dtype_name(value: ir.Value) -> str:
    names = {
        ir.DataType.FLOAT16: "float16",
        ir.DataType.BFLOAT16: "bfloat16",
        ir.DataType.DOUBLE: "float64",
    }
    return names.get(value.dtype, "float32")


def local_bytes(value: ir.Value, spec: ShardingSpec, mesh: LogicalMesh) -> float:
    return math.prod(shape_of(value)) * itemsize(value.dtype) / spec.shards(mesh.shape)


def make_strategy(
    node: ir.Node,
    mesh: LogicalMesh,
    ctx: StrategyContext,
    name: str,
    inputs: Sequence[ShardingSpec | None],
    outputs: Sequence[ShardingSpec],
    collectives: Sequence[Collective] = (),
    local_kind: str = "plain",
) -> Strategy:
    """Price a strategy: work divides by the mesh axes the inputs are split over."""
    axes = frozenset(a for s in inputs if s is not None for d in s.dims for a in d)
    work = mesh.size(sorted(axes))
    out0 = node.outputs[0]
    compute = op_time(
        node_flops(node) / work, node_bytes(node) / work, ctx.device, dtype_name(out0)
    )
    priced = tuple(
        Collective(
            c.kind,
            c.axes,
            c.nbytes,
            c.tensor,
            c.reduce_op,
            c.dim,
            _collective_seconds(c, mesh, ctx),
        )
        for c in collectives
    )
    memory = sum(local_bytes(v, s, mesh) for v, s in zip(node.outputs, outputs, strict=True))
    return Strategy(
        name,
        tuple(inputs),
        tuple(outputs),
        compute,
        sum(c.seconds for c in priced),
        priced,
        memory,
        local_kind,
    )


def _collective_seconds(c: Collective, mesh: LogicalMesh, ctx: StrategyContext) -> float:
    if c.tensor in ctx.bucketed and c.kind in ("all_reduce", "reduce_scatter"):
        return bucketed_collective_seconds(c.kind, c.axes, c.nbytes, mesh)
    return collective_seconds(c.kind, c.axes, c.nbytes, mesh)


def strategy_name(
    inputs: Sequence[ShardingSpec | None],
    outputs: Sequence[ShardingSpec],
    collectives: Sequence[Collective] = (),
) -> str:
    """Alpa-style readable name: ``"S0,R = S0,R x R,R (all_reduce @ {1})"``."""
    outs = " ; ".join(str(s) or "scalar" for s in outputs)
    ins = " x ".join(str(s) or "scalar" for s in inputs if s is not None)
    tail = "".join(f" ({c.kind} @ {{{','.join(map(str, c.axes))}}})" for c in collectives)
    return f"{outs} = {ins}{tail}"


def replicated_strategy(
    node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext, fallback: bool = False
) -> Strategy:
    ins = tuple(
        None if v is None else ShardingSpec.replicated(len(shape_of(v))) for v in node.inputs
    )
    outs = tuple(ShardingSpec.replicated(len(shape_of(v))) for v in node.outputs)
    s = make_strategy(node, mesh, ctx, strategy_name(ins, outs), ins, outs)
    if fallback:
        return Strategy(
            f"{s.name} (no rule for {node.op_type}: replicated)",
            s.inputs,
            s.outputs,
            s.compute,
            s.comm,
            s.collectives,
            s.memory,
            s.local_kind,
            replicated_fallback=True,
        )
    return s


def axis_assignments(
    choices: Sequence[object], mesh: LogicalMesh
) -> list[dict[object, tuple[int, ...]]]:
    """Every map choice -> mesh axes using each axis (of size > 1) for at most one choice.

    Axes given to the same choice are kept in increasing order (``S01``, never ``S10``).
    """
    axes = [a for a, n in enumerate(mesh.shape) if n > 1]
    out = []
    for combo in itertools.product([None, *choices], repeat=len(axes)):
        assign: dict[object, tuple[int, ...]] = {}
        for axis, choice in zip(axes, combo, strict=True):
            if choice is not None:
                assign[choice] = (*assign.get(choice, ()), axis)
        out.append(assign)
    return out


def all_specs(
    shape: Sequence[int], mesh: LogicalMesh, splittable: Sequence[int] | None = None
) -> list[ShardingSpec]:
    """Every valid spec of a tensor (replicated first), optionally over some dims only."""
    dims = tuple(range(len(shape)) if splittable is None else splittable)
    return list(_all_specs(tuple(shape), mesh, dims))


@functools.lru_cache(maxsize=1 << 12)
def _all_specs(
    shape: tuple[int, ...], mesh: LogicalMesh, dims: tuple[int, ...]
) -> tuple[ShardingSpec, ...]:
    specs = []
    for assign in axis_assignments([d for d in dims if shape[d] > 1], mesh):
        spec = ShardingSpec(tuple(assign.get(d, ()) for d in range(len(shape))))
        if spec.valid_for(shape, mesh.shape):
            specs.append(spec)
    return tuple(specs)


def dedupe(strategies: Sequence[Strategy]) -> list[Strategy]:
    """One strategy per (inputs, outputs), the cheapest; stable order."""
    best: dict[tuple, Strategy] = {}
    for s in strategies:
        key = (s.inputs, s.outputs)
        if key not in best or s.cost < best[key].cost:
            best[key] = s
    return list(best.values())


SMALL_CONST_ELEMENTS = 4096  # constant inputs rules may read (axes, starts, steps, shapes)
_CACHE_LIMIT = 1 << 14
_CACHE: dict[tuple, tuple[Strategy, ...]] = {}
_DEVICE_KEYS: dict[int, tuple[Device, str]] = {}  # id -> (device kept alive, its JSON)


def op_signature(node: ir.Node) -> tuple:
    """Everything a rule may read: op, attributes, each input's shape, dtype, aliasing (which
    earlier slot holds the same value) and small constant data, each output's shape, dtype."""
    first: dict[int, int] = {}
    ins: list[tuple | None] = []
    for i, v in enumerate(node.inputs):
        if v is None:
            ins.append(None)
            continue
        shape = shape_of(v)
        data = None
        if v.const_value is not None and math.prod(shape) <= SMALL_CONST_ELEMENTS:
            array = const_array(v)
            data = None if array is None else (str(array.dtype), array.tobytes())
        ins.append((shape, v.dtype, first.setdefault(id(v), i), data))
    outs = tuple((shape_of(o), o.dtype) for o in node.outputs)
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    return (node.domain, node.op_type, attrs, tuple(ins), outs)


def _context_key(ctx: StrategyContext) -> tuple:
    """A hashable stand-in for ``ctx`` (devices hold dicts, so they are keyed by content)."""
    entry = _DEVICE_KEYS.get(id(ctx.device))
    if entry is None or entry[0] is not ctx.device:
        if len(_DEVICE_KEYS) >= 64:
            _DEVICE_KEYS.clear()
        entry = _DEVICE_KEYS[id(ctx.device)] = (ctx.device, ctx.device.model_dump_json())
    return (entry[1], *(getattr(ctx, f.name) for f in fields(ctx) if f.name != "device"))


def strategies_for(node: ir.Node, mesh: LogicalMesh, ctx: StrategyContext) -> list[Strategy]:
    """The node's candidate strategies; an op without a rule runs replicated, flagged so."""
    key = (op_signature(node), mesh, _context_key(ctx))
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        rule = REGISTRY.get(node.op_type)
        made = dedupe(rule.fn(node, mesh, ctx)) if rule is not None else []
        found = _CACHE[key] = tuple(
            made or [replicated_strategy(node, mesh, ctx, fallback=rule is None)]
        )
    return list(found)
