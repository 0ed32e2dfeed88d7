"""Intra-operator pass: choose every op's sharding on one logical mesh with an ILP.

``solve_intra_op(graph_or_nodes, mesh, cluster, options) -> IntraOpSolution``.

Vertices of the problem are the nodes, one *source* per tensor entering from outside
(graph inputs, initializers, values produced outside a node subset) whose strategies are the
tensor's candidate specs, and one *sink* per output that replaces an input in place
(``alpa.updates``: updated parameters and optimizer state), which must match its input's spec.

Shrinking, as Alpa does (``_merge``):

- followers (registry trait: elementwise, views, normalizations, reductions, slicing) merge
  into the producer of their largest input (deepest on ties): for each strategy of that
  group the follower takes its cheapest strategy given the group's output spec;
- sinks merge into the source they alias, so the alias constraint costs nothing;
- a source read by one vertex only merges into its reader's group;
- groups with one strategy are constants and edges with a constant end are folded into the
  other end's costs; edge costs between groups go to ``planner.ilp``.

Methods are filters on the same machinery: ``data`` flattens the mesh, keeps parameters and
optimizer state replicated and splits the batch dim (dim 0) of every graph input;
``zero2`` also shards optimizer state and requires gradients reduce-scattered; ``zero3``
also shards parameters (consumers pay the all-gather as resharding). A filter that would
leave a vertex without strategies is skipped for it and noted in ``solution.notes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import onnx_ir as ir

from cost_models.cluster import Cluster
from planner.flops import is_heavy
from planner.graph import Role, itemsize, role_of, shape_of
from planner.ilp import Column, Ilp, IlpStats
from planner.mesh import LogicalMesh
from planner.sharding import ReshardStep, ShardingSpec, resharding_cost
from planner.strategies import Strategy, StrategyContext, is_follower, strategies_for
from planner.strategies.base import all_specs, local_bytes

METHODS = ("shard", "data", "zero2", "zero3")
PHASE_KEY = "alpa.phase"
UPDATES_KEY = "alpa.updates"


@dataclass(frozen=True)
class IntraOpOptions:
    method: str = "shard"
    memory_budget: float | None = None  # bytes per device
    time_limit: float | None = 60.0  # seconds; the best solution found is returned


@dataclass(frozen=True)
class EdgeReshard:
    """A conversion the executor performs between a producer and one consumer input."""

    value: str
    consumer: str
    src: ShardingSpec
    dst: ShardingSpec
    seconds: float
    steps: tuple[ReshardStep, ...]


@dataclass
class IntraOpSolution:
    mesh: LogicalMesh
    method: str
    strategies: dict[str, Strategy]  # node name -> chosen strategy
    alternatives: dict[str, list[Strategy]]  # node name -> every candidate (for explain)
    specs: dict[str, ShardingSpec]  # value name -> spec
    reshards: list[EdgeReshard]
    compute: float
    communication: float
    resharding: float
    memory: dict[str, float]  # params, grads, opt_state, activations: bytes per device
    stats: IlpStats
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.compute + self.communication + self.resharding


@dataclass
class _Vertex:
    name: str
    kind: str  # node | source | sink
    strategies: list[Strategy]
    node: ir.Node | None = None
    value: ir.Value | None = None
    inputs: list[tuple[int, int] | None] = field(default_factory=list)  # (vertex, output)


@lru_cache(maxsize=1 << 16)
def _reshard(
    src: ShardingSpec, dst: ShardingSpec, shape: tuple[int, ...], nbytes: int, mesh: LogicalMesh
) -> tuple[float, tuple[ReshardStep, ...]]:
    seconds, steps = resharding_cost(src, dst, shape, nbytes, mesh)
    return seconds, tuple(steps)


def _edge_cost(value: ir.Value, src: ShardingSpec, dst: ShardingSpec, mesh: LogicalMesh) -> float:
    return _reshard(src, dst, shape_of(value), itemsize(value.dtype), mesh)[0]


def _spec_strategy(
    spec: ShardingSpec, value: ir.Value, mesh: LogicalMesh, sink: bool = False
) -> Strategy:
    mem = 0.0 if sink else local_bytes(value, spec, mesh)
    return Strategy(
        str(spec) or "scalar",
        (spec,) if sink else (),
        () if sink else (spec,),
        0.0,
        0.0,
        memory=mem,
    )


class _Builder:
    def __init__(
        self, nodes: list[ir.Node], mesh: LogicalMesh, cluster: Cluster, options: IntraOpOptions
    ) -> None:
        self.mesh, self.options, self.notes = mesh, options, []
        self.vertices: list[_Vertex] = []
        self.producer: dict[int, tuple[int, int]] = {}  # id(value) -> (vertex, output)
        self.source_of: dict[str, int] = {}
        inside = {id(n) for n in nodes}
        for node in nodes:
            for v in node.inputs:
                if v is not None and (v.producer() is None or id(v.producer()) not in inside):
                    self._source(v)
        for i, node in enumerate(nodes):
            ctx = StrategyContext(cluster.device, reduce_scatter=self._wants_rs(node))
            vid = self._add(
                _Vertex(
                    node.name or f"{node.op_type}_{i}",
                    "node",
                    self._filter_node(node, strategies_for(node, mesh, ctx)),
                    node,
                )
            )
            for j, out in enumerate(node.outputs):
                self.producer[id(out)] = (vid, j)
        for node in nodes:
            for out in node.outputs:
                target = out.metadata_props.get(UPDATES_KEY)
                if out.is_graph_output() and target in self.source_of:
                    sv = self.vertices[self.source_of[target]]
                    self._add(
                        _Vertex(
                            f"output:{out.name}",
                            "sink",
                            [
                                _spec_strategy(s.outputs[0], out, mesh, sink=True)
                                for s in sv.strategies
                            ],
                            value=out,
                        )
                    )
        for vx in self.vertices:
            ins = (
                [vx.node.inputs[i] for i in range(len(vx.node.inputs))]
                if vx.node
                else ([vx.value] if vx.kind == "sink" else [])
            )
            vx.inputs = [None if v is None else self.producer.get(id(v)) for v in ins]

    # -- vertices -------------------------------------------------------------------------
    def _add(self, vertex: _Vertex) -> int:
        self.vertices.append(vertex)
        return len(self.vertices) - 1

    def _source(self, value: ir.Value) -> None:
        if id(value) in self.producer:
            return
        role = role_of(value)
        shape = shape_of(value)
        if role is Role.CONST or value.const_value is not None and role is not Role.PARAM:
            specs = [ShardingSpec.replicated(len(shape))]
        else:
            specs = self._filter_source(value, role, all_specs(shape, self.mesh))
        vid = self._add(
            _Vertex(
                f"input:{value.name}",
                "source",
                [_spec_strategy(s, value, self.mesh) for s in specs],
                value=value,
            )
        )
        self.producer[id(value)] = (vid, 0)
        self.source_of[value.name] = vid

    def _wants_rs(self, node: ir.Node) -> bool:
        """Reduce-scatter resolutions where gradients are made (backward phase)."""
        if self.options.method == "data":
            return False
        return node.metadata_props.get(PHASE_KEY) == "backward" or any(
            role_of(o) is Role.GRAD for o in node.outputs
        )

    # -- method filters (forcing on the same ILP) ---------------------------------------------
    def _fully_split(self, spec: ShardingSpec) -> bool:
        return any(len(d) == self.mesh.ndim for d in spec.dims)

    def _keep(self, name: str, found: list, kept: list) -> list:
        if kept:
            return kept
        self.notes.append(f"{self.options.method}: no forced strategy for {name}; left free")
        return found

    def _filter_source(self, value: ir.Value, role: Role, specs: list[ShardingSpec]):
        method = self.options.method
        if method == "shard":
            return specs
        sharded_roles = {
            "data": (),
            "zero2": (Role.OPT_STATE,),
            "zero3": (Role.OPT_STATE, Role.PARAM),
        }[method]
        if role in sharded_roles:
            kept = [s for s in specs if self._fully_split(s)][:1]
        elif role in (Role.PARAM, Role.OPT_STATE, Role.CONST):
            kept = [s for s in specs if s.is_replicated()]
        elif role is Role.INPUT:
            kept = [
                s
                for s in specs
                if len(s.dims) and len(s.dims[0]) == self.mesh.ndim and not any(s.dims[1:])
            ] or [s for s in specs if s.is_replicated()]
        else:
            kept = specs
        return self._keep(value.name or "?", specs, kept)

    def _filter_node(self, node: ir.Node, found: list[Strategy]) -> list[Strategy]:
        if self.options.method not in ("zero2", "zero3"):
            return found
        grads = [j for j, o in enumerate(node.outputs) if role_of(o) is Role.GRAD]
        if not grads:
            return found
        kept = [s for s in found if all(self._fully_split(s.outputs[j]) for j in grads)]
        return self._keep(node.name or node.op_type, found, kept)


def _follow_slot(builder: _Builder, v: int) -> int | None:
    """The input a follower merges into: the largest tensor, the latest producer on ties."""
    vx = builder.vertices[v]
    best, key = None, None
    for i, p in enumerate(vx.inputs):
        if p is None or len(builder.vertices[p[0]].strategies) < 2:
            continue
        k = (math.prod(shape_of(vx.node.inputs[i])), p[0])
        if key is None or k > key:
            best, key = i, k
    return best


class _Groups:
    """Merged vertices: group -> members, member -> strategy index per group strategy."""

    def __init__(self, builder: _Builder) -> None:
        self.b = builder
        self.group: list[int] = []
        self.maps: list[np.ndarray] = []
        self.size: dict[int, int] = {}
        for v, vx in enumerate(builder.vertices):
            self.group.append(v)
            self.maps.append(np.arange(len(vx.strategies)))
            self.size[v] = len(vx.strategies)

    def out_spec(self, v: int, out: int, k: int) -> ShardingSpec:
        return self.b.vertices[v].strategies[self.maps[v][k]].outputs[out]

    def merge_follower(self, v: int, slot: int) -> None:
        b = self.b
        vx = b.vertices[v]
        u, out = vx.inputs[slot]
        g = self.group[u]
        value = vx.node.inputs[slot]
        choice = []
        for k in range(self.size[g]):
            src = self.out_spec(u, out, k)
            # Follow exactly (Alpa copies the operand's spec); convert only when no strategy
            # takes the spec as it is. Splitting further for cheaper compute would ignore
            # what the follower's consumers pay, which the ILP cannot see after merging.
            costs = [
                (s.inputs[slot] != src, s.cost + _edge_cost(value, src, s.inputs[slot], b.mesh))
                for s in vx.strategies
            ]
            choice.append(min(range(len(costs)), key=costs.__getitem__))
        self._join(v, g, np.array(choice))

    def merge_into_reader(self, src: int, reader: int, slot: int) -> None:
        b = self.b
        sx = b.vertices[src]
        g = self.group[reader]
        want = [b.vertices[reader].strategies[m].inputs[slot] for m in self.maps[reader]]
        choice = [
            int(
                np.argmin(
                    [_edge_cost(sx.value, s.outputs[0], w, b.mesh) + s.cost for s in sx.strategies]
                )
            )
            for w in want
        ]
        self._join(src, g, np.array(choice))

    def merge_alias(self, sink: int, src: int) -> None:
        self._join(sink, self.group[src], self.maps[src].copy())

    def _join(self, v: int, g: int, mapping: np.ndarray) -> None:
        old = self.group[v]
        del self.size[old]
        self.group[v] = g
        self.maps[v] = mapping


def _merge(builder: _Builder) -> _Groups:
    groups = _Groups(builder)
    verts = builder.vertices
    for v, vx in enumerate(verts):
        if vx.kind == "node" and is_follower(vx.node):
            slot = _follow_slot(builder, v)
            if slot is not None:
                groups.merge_follower(v, slot)
        elif vx.kind == "sink":
            groups.merge_alias(v, builder.source_of[vx.value.metadata_props[UPDATES_KEY]])
    readers: dict[int, list[tuple[int, int]]] = {}
    for v, vx in enumerate(verts):
        for slot, p in enumerate(vx.inputs):
            if p is not None and verts[p[0]].kind == "source":
                readers.setdefault(p[0], []).append((v, slot))
    for src, uses in readers.items():
        alone = [m for m in range(len(verts)) if groups.group[m] == groups.group[src]] == [src]
        if len(uses) == 1 and alone and len(verts[src].strategies) > 1:
            groups.merge_into_reader(src, *uses[0])
    return groups


def _build_ilp(builder: _Builder, groups: _Groups, options: IntraOpOptions) -> tuple[Ilp, dict]:
    """Columns per group strategy and per edge-family spec pair (see ``planner.ilp``)."""
    verts, mesh = builder.vertices, builder.mesh
    ilp = Ilp()
    node_cost: dict[int, np.ndarray] = {g: np.zeros((k, 3)) for g, k in groups.size.items()}
    for v, vx in enumerate(verts):
        g = groups.group[v]
        for k, m in enumerate(groups.maps[v]):
            node_cost[g][k, 0] += vx.strategies[m].compute
            node_cost[g][k, 1] += vx.strategies[m].comm
    families = []
    for v, vx in enumerate(verts):
        values = vx.node.inputs if vx.node is not None else [vx.value] * len(vx.inputs)
        for slot, p in enumerate(vx.inputs):
            if p is None:
                continue
            u, out = p
            value = values[slot]
            gu, gv = groups.group[u], groups.group[v]
            src = [groups.out_spec(u, out, k) for k in range(groups.size[gu])]
            dst = [verts[v].strategies[m].inputs[slot] for m in groups.maps[v]]
            if gu == gv:
                for k in range(groups.size[gu]):
                    node_cost[gu][k, 2] += _edge_cost(value, src[k], dst[k], mesh)
            elif groups.size[gu] == 1:
                for k in range(groups.size[gv]):
                    node_cost[gv][k, 2] += _edge_cost(value, src[0], dst[k], mesh)
            elif groups.size[gv] == 1:
                for k in range(groups.size[gu]):
                    node_cost[gu][k, 2] += _edge_cost(value, src[k], dst[0], mesh)
            else:
                families.append((value, vx.name, gu, gv, src, dst))
    cols: dict[int, list[int]] = {}
    for g in sorted(groups.size):
        name = verts[g].name
        if groups.size[g] == 1:
            ilp.constant += float(node_cost[g][0].sum())
            continue
        cols[g] = [
            ilp.add_column(Column(f"s[{name}][{k}]", *map(float, node_cost[g][k])))
            for k in range(groups.size[g])
        ]
        ilp.add_unique_choice(name, cols[g])
    for value, consumer, gu, gv, src, dst in families:
        _add_family(ilp, f"{value.name}->{consumer}", value, src, dst, cols[gu], cols[gv], mesh)
    if options.memory_budget is not None:
        _add_memory_rows(ilp, builder, groups, cols, options.memory_budget)
    return ilp, cols


def _add_family(
    ilp: Ilp,
    name: str,
    value: ir.Value,
    src: list,
    dst: list,
    ucols: list[int],
    vcols: list[int],
    mesh: LogicalMesh,
) -> None:
    akeys = list(dict.fromkeys(src))
    bkeys = list(dict.fromkeys(dst))
    pair = {}
    for a, sa in enumerate(akeys):
        for b, sb in enumerate(bkeys):
            pair[a, b] = ilp.add_column(
                Column(
                    f"e[{name}][{sa}->{sb}]", reshard=_edge_cost(value, sa, sb, mesh), integer=False
                )
            )
    for a, sa in enumerate(akeys):
        ilp.add_edge_marginal(
            f"edge_src[{name}][{sa}]",
            [pair[a, b] for b in range(len(bkeys))],
            [c for c, s in zip(ucols, src, strict=True) if s == sa],
        )
    for b, sb in enumerate(bkeys):
        ilp.add_edge_marginal(
            f"edge_dst[{name}][{sb}]",
            [pair[a, b] for a in range(len(akeys))],
            [c for c, s in zip(vcols, dst, strict=True) if s == sb],
        )


def _lifetimes(builder: _Builder) -> tuple[list[int], dict[int, tuple[int, int, int, int]]]:
    """Node-vertex steps, and per produced value id: (birth, death, vertex, output)."""
    steps = [v for v, vx in enumerate(builder.vertices) if vx.kind == "node"]
    order = {v: t for t, v in enumerate(steps)}
    last: dict[tuple[int, int], int] = {}
    for c, vx in enumerate(builder.vertices):
        for p in vx.inputs:
            if p is not None and c in order:
                last[p] = max(last.get(p, 0), order[c])
    life: dict[int, tuple[int, int, int, int]] = {}
    for v, vx in enumerate(builder.vertices):
        for j, out in enumerate(_outputs(vx)):
            born = order.get(v, 0)
            persistent = vx.kind == "source" or out.is_graph_output()
            life[id(out)] = (
                born,
                len(steps) if persistent else max(born, last.get((v, j), 0)),
                v,
                j,
            )
    return steps, life


def _outputs(vx: _Vertex) -> list[ir.Value]:
    if vx.node is not None:
        return list(vx.node.outputs)
    return [vx.value] if vx.kind == "source" else []


def _add_memory_rows(
    ilp: Ilp, builder: _Builder, groups: _Groups, cols: dict, budget: float
) -> None:
    """(memory) one row per heavy-op step (Alpa builds rows only where dot/conv run)."""
    steps, life = _lifetimes(builder)
    values = {id(o): o for vx in builder.vertices for o in _outputs(vx)}
    for t, v in enumerate(steps):
        if not is_heavy(builder.vertices[v].node):
            continue
        coef: dict[int, float] = {}
        const = 0.0
        for vid, (born, death, u, j) in life.items():
            if not born <= t <= death:
                continue
            g = groups.group[u]
            for k in range(groups.size[g]):
                nbytes = local_bytes(values[vid], groups.out_spec(u, j, k), builder.mesh)
                if g in cols:
                    coef[cols[g][k]] = coef.get(cols[g][k], 0.0) + nbytes
                else:
                    const += nbytes
        ilp.add_memory_budget(
            f"memory[{builder.vertices[v].name}]", list(coef), list(coef.values()), budget - const
        )


def solve_intra_op(
    graph: ir.Graph | Sequence[ir.Node],
    mesh: LogicalMesh,
    cluster: Cluster,
    options: IntraOpOptions | None = None,
) -> IntraOpSolution:
    """Choose a strategy per node (and a spec per value) minimising compute + communication
    + resharding on ``mesh``, under ``options`` (method, memory budget, time limit)."""
    options = options or IntraOpOptions()
    if options.method not in METHODS:
        raise ValueError(f"unknown method {options.method!r}; use one of {METHODS}")
    if options.method != "shard":
        mesh = mesh.flattened()
    nodes = list(graph)
    builder = _Builder(nodes, mesh, cluster, options)
    groups = _merge(builder)
    ilp, cols = _build_ilp(builder, groups, options)
    x, stats = ilp.solve(options.time_limit)
    choice = {
        g: (int(np.argmax(x[c])) if c else 0) for g, c in ((g, cols.get(g)) for g in groups.size)
    }
    return _solution(builder, groups, choice, stats, options)


def _solution(
    builder: _Builder,
    groups: _Groups,
    choice: dict[int, int],
    stats: IlpStats,
    options: IntraOpOptions,
) -> IntraOpSolution:
    verts, mesh = builder.vertices, builder.mesh
    chosen = [vx.strategies[groups.maps[v][choice[groups.group[v]]]] for v, vx in enumerate(verts)]
    specs: dict[str, ShardingSpec] = {}
    for v, vx in enumerate(verts):
        for out, spec in zip(_outputs(vx), chosen[v].outputs, strict=True):
            specs[out.name] = spec
    reshards = []
    for v, vx in enumerate(verts):
        values = vx.node.inputs if vx.node is not None else [vx.value] * len(vx.inputs)
        for slot, p in enumerate(vx.inputs):
            if p is None:
                continue
            src, dst = chosen[p[0]].outputs[p[1]], chosen[v].inputs[slot]
            value = values[slot]
            seconds, steps = _reshard(src, dst, shape_of(value), itemsize(value.dtype), mesh)
            if src != dst:
                reshards.append(EdgeReshard(value.name, vx.name, src, dst, seconds, steps))
    node_ids = [v for v, vx in enumerate(verts) if vx.kind == "node"]
    return IntraOpSolution(
        mesh=mesh,
        method=options.method,
        strategies={verts[v].name: chosen[v] for v in node_ids},
        alternatives={verts[v].name: verts[v].strategies for v in node_ids},
        specs=specs,
        reshards=reshards,
        compute=sum(chosen[v].compute for v in node_ids),
        communication=sum(chosen[v].comm for v in node_ids),
        resharding=sum(r.seconds for r in reshards),
        memory=_memory(builder, chosen, specs),
        stats=stats,
        notes=builder.notes,
    )


def _memory(builder: _Builder, chosen: list[Strategy], specs: dict) -> dict[str, float]:
    """Per-device bytes: persistent tensors by role, activations at their live peak."""
    mesh = builder.mesh
    out = {"params": 0.0, "grads": 0.0, "opt_state": 0.0, "activations": 0.0}
    key = {Role.PARAM: "params", Role.GRAD: "grads", Role.OPT_STATE: "opt_state"}
    steps, life = _lifetimes(builder)
    live = np.zeros(len(steps) + 1)
    for vx in builder.vertices:
        for o in _outputs(vx):
            nbytes = local_bytes(o, specs[o.name], mesh)
            role = role_of(o)
            if role in key:
                out[key[role]] += nbytes
            elif vx.kind == "node":
                born, death, _, _ = life[id(o)]
                live[born : death + 1] += nbytes
    out["activations"] = float(live.max()) if len(live) else 0.0
    return out
