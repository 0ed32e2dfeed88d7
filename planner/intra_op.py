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
also shards parameters (consumers pay the all-gather as resharding); ``megatron`` (Alpa's
3-D method) keeps a 2-D mesh, splits graph inputs' batch dim over axis 0 and never splits
parameters or optimizer state over it, leaving axis 1 to the ILP (on a 1-D mesh it is
``data``). A filter that would leave a vertex without strategies is skipped for it and noted
in ``solution.notes``.

Costs paid once per training step (update nodes, the communication of nodes producing final
gradients, resharding into update nodes and sinks) are weighted by ``step_weight`` in the
objective and reported unweighted, as ``per_step``, in the solution.

Speed: strategies are memoized per op signature, resharding per (specs, shape, mesh), edges
are costed per distinct spec pair with numpy, and ``_build_ilp`` applies exact reductions
before HiGHS (parallel edge families combined, single-neighbour groups folded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from cost_models.cluster import Cluster
from planner.flops import is_heavy
from planner.graph import (
    PHASE_KEY,
    UPDATES_KEY,
    Role,
    itemsize,
    role_of,
    shape_of,
    summed_into_gradient,
    synced_as_gradient,
    weight_only,
)
from planner.ilp import Column, Ilp, IlpStats
from planner.mesh import LogicalMesh
from planner.sharding import ReshardStep, ShardingSpec, resharding_cost
from planner.strategies import Strategy, StrategyContext, is_follower, strategies_for
from planner.strategies.base import all_specs

METHODS = ("shard", "data", "zero2", "zero3", "megatron")


@dataclass(frozen=True)
class IntraOpOptions:
    method: str = "shard"
    memory_budget: float | None = None  # bytes per device
    time_limit: float | None = 60.0  # seconds; the best solution found is returned
    # Objective weight of once-per-step costs (update nodes, gradient synchronisation) against
    # per-micro-batch ones: 1 / micro-batches under gradient accumulation.
    step_weight: float = 1.0
    # Solving one layer of a longer chain: activations entering or leaving the node subset
    # may only be split along dim 0 (the batch), so a layer cannot hand its neighbours a
    # layout whose resharding its own ILP never paid for.
    boundary: bool = False
    # Objective seconds per byte of parameters / optimizer state stored per device (never in
    # reported times). Like Alpa's replicated-parameter penalty it makes the ILP keep state
    # sharded when memory is scarce; the compiler sets it from the model's memory pressure.
    memory_price: float = 0.0


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
    """Chosen strategies and their unweighted seconds: ``total`` = one micro-batch plus one
    step's ``per_step`` part (update nodes, gradient synchronisation, resharding into them)."""

    mesh: LogicalMesh
    method: str
    strategies: dict[str, Strategy]  # node name -> chosen strategy
    alternatives: dict[str, list[Strategy]]  # node name -> every candidate (for explain)
    specs: dict[str, ShardingSpec]  # value name -> spec
    reshards: list[EdgeReshard]
    compute: float
    communication: float
    resharding: float
    per_step: float  # the part of compute + communication + resharding paid once per step
    syncs: int  # collective calls per micro-batch (each a point where the ranks wait)
    step_syncs: frozenset[str]  # kinds of the once-per-step collectives (a bucket each)
    memory: dict[str, float]  # params, grads, opt_state, activations: bytes per device
    stats: IlpStats
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.compute + self.communication + self.resharding

    @property
    def per_microbatch(self) -> float:
        return self.total - self.per_step


@dataclass
class _Vertex:
    name: str
    kind: str  # node | source | sink
    strategies: list[Strategy]
    node: ir.Node | None = None
    value: ir.Value | None = None
    inputs: list[tuple[int, int] | None] = field(default_factory=list)  # (vertex, output)
    # Which of (compute, comm, resharding into it) happen once per step, not per micro-batch.
    once: tuple[bool, bool, bool] = (False, False, False)

    def input_values(self) -> list[ir.Value | None]:
        if self.node is not None:
            return list(self.node.inputs)
        return [self.value] if self.kind == "sink" else []


class _ReshardTable:
    """Memoized resharding programs on one mesh: a pure function of (src, dst, shape, bytes)."""

    LIMIT = 1 << 18

    def __init__(self, mesh: LogicalMesh) -> None:
        self.mesh = mesh
        self.programs: dict[tuple, tuple[float, tuple[ReshardStep, ...]]] = {}

    def program(
        self, src: ShardingSpec, dst: ShardingSpec, shape: tuple[int, ...], nbytes: int
    ) -> tuple[float, tuple[ReshardStep, ...]]:
        key = (src, dst, shape, nbytes)
        hit = self.programs.get(key)
        if hit is None:
            if len(self.programs) >= self.LIMIT:
                self.programs.clear()
            seconds, steps = resharding_cost(src, dst, shape, nbytes, self.mesh)
            hit = self.programs[key] = (seconds, tuple(steps))
        return hit

    def matrix(self, srcs: Sequence, dsts: Sequence, tensor: tuple) -> np.ndarray:
        """[i, j] = seconds turning ``srcs[i]`` into ``dsts[j]``."""
        out = np.empty((len(srcs), len(dsts)))
        for i, a in enumerate(srcs):
            for j, b in enumerate(dsts):
                out[i, j] = self.program(a, b, *tensor)[0]
        return out

    def pairs(
        self, srcs: Sequence, a: np.ndarray, dsts: Sequence, b: np.ndarray, tensor: tuple
    ) -> np.ndarray:
        """Seconds of ``srcs[a[k]] -> dsts[b[k]]`` for every k, each distinct pair once."""
        flat = a * len(dsts) + b
        uniq, inverse = np.unique(flat, return_inverse=True)
        cost = np.array(
            [self.program(srcs[f // len(dsts)], dsts[f % len(dsts)], *tensor)[0] for f in uniq]
        )
        return cost[inverse.reshape(-1)]


_TABLES: dict[LogicalMesh, _ReshardTable] = {}


def _table(mesh: LogicalMesh) -> _ReshardTable:
    table = _TABLES.get(mesh)
    if table is None:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        table = _TABLES[mesh] = _ReshardTable(mesh)
    return table


def _index(specs: Sequence) -> tuple[list, np.ndarray]:
    """Distinct specs in first-seen order, and each entry's position among them."""
    keys: dict = {}
    idx = [keys.setdefault(s, len(keys)) for s in specs]
    return list(keys), np.array(idx, dtype=np.intp)


class _Builder:
    def __init__(
        self, nodes: list[ir.Node], mesh: LogicalMesh, cluster: Cluster, options: IntraOpOptions
    ) -> None:
        self.mesh, self.options, self.notes = mesh, options, []
        self.method = "data" if options.method == "megatron" and mesh.ndim == 1 else options.method
        self.table = _table(mesh)
        self.facts: dict[int, tuple[tuple[int, ...], int]] = {}
        self.vertices: list[_Vertex] = []
        self.producer: dict[int, tuple[int, int]] = {}  # id(value) -> (vertex, output)
        self.source_of: dict[str, int] = {}
        self.weights: dict[int, bool] = {}  # weight_only's memo
        inside = {id(n) for n in nodes}
        self.leaving = (
            {
                id(o)
                for n in nodes
                for o in n.outputs
                if any(id(u.node) not in inside for u in o.uses())
            }
            if options.boundary
            else set()
        )
        for node in nodes:
            for v in node.inputs:
                if v is not None and (v.producer() is None or id(v.producer()) not in inside):
                    self._source(v)
        for i, node in enumerate(nodes):
            grads = [role_of(o) is Role.GRAD for o in node.outputs]
            synced = [synced_as_gradient(o) for o in node.outputs]
            # the executor defers a summed partial's all-reduce, not a reduce-scatter (its
            # dim would have to be restated through the ops between): none is offered
            summed = any(summed_into_gradient(o) for o in node.outputs)
            update = node.metadata_props.get(PHASE_KEY) == "update"
            ctx = StrategyContext(
                cluster.device,
                reduce_scatter=self._wants_rs(node, any(grads)) and not summed,
                bucketed=frozenset(f"out{j}" for j, g in enumerate(synced) if g),
            )
            vid = self._add(
                _Vertex(
                    node.name or f"{node.op_type}_{i}",
                    "node",
                    self._filter_node(node, grads, strategies_for(node, mesh, ctx)),
                    node,
                    once=(update, update or any(synced), update),
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
                            [self._spec_strategy(s.outputs[0], out, True) for s in sv.strategies],
                            value=out,
                            once=(False, False, True),
                        )
                    )
        for vx in self.vertices:
            vx.inputs = [None if v is None else self.producer.get(id(v)) for v in vx.input_values()]
        self._tabulate()

    def tensor(self, value: ir.Value) -> tuple[tuple[int, ...], int]:
        """(shape, bytes per element) of a value, looked up once per solve."""
        hit = self.facts.get(id(value))
        if hit is None:
            hit = self.facts[id(value)] = (shape_of(value), itemsize(value.dtype))
        return hit

    def local_bytes(self, value: ir.Value, spec: ShardingSpec) -> float:
        shape, size = self.tensor(value)
        return math.prod(shape) * size / spec.shards(self.mesh.shape)

    def _tabulate(self) -> None:
        """Per vertex: cost arrays over its strategies and, per input / output, the distinct
        specs and each strategy's index into them (edges are costed per distinct pair)."""
        self.compute, self.comm, self.cost = [], [], []
        self.in_keys, self.in_idx, self.out_keys, self.out_idx = [], [], [], []
        for vx in self.vertices:
            compute = np.array([s.compute for s in vx.strategies])
            comm = np.array([s.comm for s in vx.strategies])
            self.compute.append(compute)
            self.comm.append(comm)
            self.cost.append(compute + comm)
            ins = [_index([s.inputs[i] for s in vx.strategies]) for i in range(len(vx.inputs))]
            n_out = len(vx.strategies[0].outputs)
            outs = [_index([s.outputs[j] for s in vx.strategies]) for j in range(n_out)]
            self.in_keys.append([k for k, _ in ins])
            self.in_idx.append([i for _, i in ins])
            self.out_keys.append([k for k, _ in outs])
            self.out_idx.append([i for _, i in outs])

    # -- vertices -------------------------------------------------------------------------
    def _add(self, vertex: _Vertex) -> int:
        self.vertices.append(vertex)
        return len(self.vertices) - 1

    def _spec_strategy(self, spec: ShardingSpec, value: ir.Value, sink: bool = False) -> Strategy:
        mem = 0.0 if sink else self.local_bytes(value, spec)
        return Strategy(
            str(spec) or "scalar",
            (spec,) if sink else (),
            () if sink else (spec,),
            0.0,
            0.0,
            memory=mem,
        )

    def _source(self, value: ir.Value) -> None:
        if id(value) in self.producer:
            return
        role = role_of(value)
        shape = self.tensor(value)[0]
        if role is Role.CONST or value.const_value is not None and role is not Role.PARAM:
            specs = [ShardingSpec.replicated(len(shape))]
        else:
            specs = self._filter_source(value, role, all_specs(shape, self.mesh))
        vid = self._add(
            _Vertex(
                f"input:{value.name}",
                "source",
                [self._spec_strategy(s, value) for s in specs],
                value=value,
            )
        )
        self.producer[id(value)] = (vid, 0)
        self.source_of[value.name] = vid

    def _wants_rs(self, node: ir.Node, grads: bool) -> bool:
        """Reduce-scatter resolutions where gradients are made (backward phase)."""
        if self.method == "data":
            return False
        return node.metadata_props.get(PHASE_KEY) == "backward" or grads

    # -- method filters (forcing on the same ILP) ---------------------------------------------
    def _fully_split(self, spec: ShardingSpec) -> bool:
        return any(len(d) == self.mesh.ndim for d in spec.dims)

    def _keep(self, name: str, found: list, kept: list) -> list:
        if kept:
            return kept
        self.notes.append(f"{self.options.method}: no forced strategy for {name}; left free")
        return found

    def _crossing(self, value: ir.Value) -> Callable[[ShardingSpec], bool]:
        """Which specs ``value`` may have where it enters or leaves the layer being solved:
        replicated or split along dim 0 (the batch), so that a neighbour's ILP never meets a
        layout its own never paid for. Where parameters are replicated (data, zero2), a value
        made from weights alone has no batch dim and crosses replicated, like the weights."""
        if self.method in ("data", "zero2") and weight_only(value, self.weights):
            return ShardingSpec.is_replicated
        return _batch_only

    def _filter_source(self, value: ir.Value, role: Role, specs: list[ShardingSpec]):
        if self.options.boundary and role is Role.ACTIVATION:
            crossing = self._crossing(value)
            specs = self._keep(value.name or "?", specs, [s for s in specs if crossing(s)])
        method = self.method
        if method == "shard":
            return specs
        if method == "megatron":
            return self._keep(value.name or "?", specs, self._megatron(role, specs))
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

    def _megatron(self, role: Role, specs: list[ShardingSpec]) -> list[ShardingSpec]:
        """Axis 0 is data parallel: state replicated over it, the batch split over it."""
        if role in (Role.PARAM, Role.OPT_STATE):
            return [s for s in specs if 0 not in s.used_axes()]
        if role is Role.INPUT and specs[0].rank and self.mesh.shape[0] > 1:
            return [s for s in specs if s.dims[0][:1] == (0,)]
        return specs

    def _filter_node(self, node: ir.Node, grads: list[bool], found: list[Strategy]):
        leaving = [
            j
            for j, o in enumerate(node.outputs)
            if id(o) in self.leaving and role_of(o) is Role.ACTIVATION
        ]
        if leaving:
            crossing = [(j, self._crossing(node.outputs[j])) for j in leaving]
            found = self._keep(
                node.name or node.op_type,
                found,
                [s for s in found if all(ok(s.outputs[j]) for j, ok in crossing)],
            )
        if self.method == "data" and node.metadata_props.get(PHASE_KEY) == "update":
            # DDP: every rank runs the whole update on its replica (slicing it would be ZeRO)
            kept = [s for s in found if all(o.is_replicated() for o in s.outputs)]
            return self._keep(node.name or node.op_type, found, kept)
        if self.method not in ("zero2", "zero3") or not any(grads):
            return found
        outs = [j for j, g in enumerate(grads) if g]
        kept = [s for s in found if all(self._fully_split(s.outputs[j]) for j in outs)]
        return self._keep(node.name or node.op_type, found, kept)


def _batch_only(spec: ShardingSpec) -> bool:
    """Replicated, or split along dim 0 only, with no partial sum."""
    return not spec.partial and not any(spec.dims[1:])


def _follow_slot(builder: _Builder, v: int) -> int | None:
    """The input a follower merges into: the largest tensor, the latest producer on ties."""
    vx = builder.vertices[v]
    best, key = None, None
    for i, p in enumerate(vx.inputs):
        if p is None or len(builder.vertices[p[0]].strategies) < 2:
            continue
        k = (math.prod(builder.tensor(vx.node.inputs[i])[0]), p[0])
        if key is None or k > key:
            best, key = i, k
    return best


class _Groups:
    """Merged vertices: group -> members, member -> strategy index per group strategy."""

    def __init__(self, builder: _Builder) -> None:
        self.b = builder
        self.group: list[int] = list(range(len(builder.vertices)))
        self.maps: list[np.ndarray] = [np.arange(len(vx.strategies)) for vx in builder.vertices]
        self.size: dict[int, int] = {v: len(vx.strategies) for v, vx in enumerate(builder.vertices)}
        self.members: dict[int, int] = dict.fromkeys(self.size, 1)

    def out_index(self, v: int, out: int) -> np.ndarray:
        """Per strategy of v's group: the index of output ``out``'s spec among v's keys."""
        return self.b.out_idx[v][out][self.maps[v]]

    def in_index(self, v: int, slot: int) -> np.ndarray:
        return self.b.in_idx[v][slot][self.maps[v]]

    def merge_follower(self, v: int, slot: int) -> None:
        # Follow exactly (Alpa copies the operand's spec); convert only when no strategy
        # takes the spec as it is. Splitting further for cheaper compute would ignore
        # what the follower's consumers pay, which the ILP cannot see after merging.
        b = self.b
        u, out = b.vertices[v].inputs[slot]
        srcs, dsts = b.out_keys[u][out], b.in_keys[v][slot]
        want = b.in_idx[v][slot]
        cost = (
            b.cost[v][None, :]
            + b.table.matrix(srcs, dsts, b.tensor(b.vertices[v].node.inputs[slot]))[:, want]
        )
        same = np.array([[a == d for d in dsts] for a in srcs], dtype=bool)[:, want]
        exact = np.where(same, cost, np.inf)
        best = np.where(same.any(axis=1), exact.argmin(axis=1), cost.argmin(axis=1))
        self._join(v, self.group[u], best[self.out_index(u, out)])

    def merge_into_reader(self, src: int, reader: int, slot: int) -> None:
        b = self.b
        cost = (
            b.cost[src][:, None]
            + b.table.matrix(
                b.out_keys[src][0], b.in_keys[reader][slot], b.tensor(b.vertices[src].value)
            )[b.out_idx[src][0]]
        )
        best = cost.argmin(axis=0)
        self._join(src, self.group[reader], best[self.in_index(reader, slot)])

    def merge_alias(self, sink: int, src: int) -> None:
        self._join(sink, self.group[src], self.maps[src].copy())

    def _join(self, v: int, g: int, mapping: np.ndarray) -> None:
        old = self.group[v]
        del self.size[old]
        self.members[g] += self.members.pop(old)
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
        alone = groups.group[src] == src and groups.members[src] == 1
        if len(uses) == 1 and alone and len(verts[src].strategies) > 1:
            groups.merge_into_reader(src, *uses[0])
    return groups


def _weights(vx: _Vertex, step_weight: float) -> tuple[float, float, float]:
    return tuple(step_weight if once else 1.0 for once in vx.once)  # type: ignore[return-value]


@dataclass
class _Family:
    """Edges between two groups as one cost matrix over their distinct spec keys."""

    name: str
    gu: int
    gv: int
    a: np.ndarray  # per strategy of gu: its key (row of ``cost``)
    b: np.ndarray  # per strategy of gv: its key (column of ``cost``)
    atext: list[str]
    btext: list[str]
    cost: np.ndarray

    @property
    def size(self) -> int:
        return self.cost.size

    def flipped(self) -> _Family:
        return _Family(
            self.name, self.gv, self.gu, self.b, self.a, self.btext, self.atext, self.cost.T
        )

    def combined(self, other: _Family) -> _Family:
        """Both families' edges as one (same groups, same orientation): key = key pair."""
        a, ai, ax = _pair_keys(self.a, other.a, self.atext, other.atext)
        b, bi, bx = _pair_keys(self.b, other.b, self.btext, other.btext)
        cost = self.cost[np.ix_(ai[0], bi[0])] + other.cost[np.ix_(ai[1], bi[1])]
        return _Family(f"{self.name}+{other.name}", self.gu, self.gv, a, b, ax, bx, cost)


def _pair_keys(x: np.ndarray, y: np.ndarray, xt: list[str], yt: list[str]):
    """Keys of the pairs (x[k], y[k]) in first-seen order, their components, their text."""
    pairs = list(zip(x.tolist(), y.tolist(), strict=True))
    keys = list(dict.fromkeys(pairs))
    where = {p: i for i, p in enumerate(keys)}
    idx = np.array([where[p] for p in pairs], dtype=np.intp)
    parts = (np.array([p[0] for p in keys]), np.array([p[1] for p in keys]))
    return idx, parts, [f"{xt[i]}&{yt[j]}" for i, j in keys]


@dataclass
class _Eliminated:
    """A leaf group folded into its only neighbour: its strategy per neighbour key."""

    group: int
    neighbour: int
    keys: np.ndarray  # per strategy of the neighbour: its key in the family
    best: np.ndarray  # per key: the leaf's cheapest strategy


def _build_ilp(
    builder: _Builder, groups: _Groups, options: IntraOpOptions
) -> tuple[Ilp, dict[int, list[int]], list[_Eliminated]]:
    """Columns per group strategy and per edge-family spec pair (see ``planner.ilp``);
    once-per-step costs are weighted by ``options.step_weight``. Exact reductions first:
    parallel families between two groups become one when that has fewer edge columns, and
    (without a memory budget) groups with a single neighbour are folded into it."""
    node_cost, families = _costs(builder, groups, options)
    families = _merge_parallel(families)
    eliminated = [] if options.memory_budget is not None else _fold_leaves(node_cost, families)
    verts = builder.vertices
    ilp = Ilp()
    cols: dict[int, list[int]] = {}
    for g in sorted(node_cost):
        name = verts[g].name
        if groups.size[g] == 1:
            ilp.constant += float(node_cost[g][0].sum())
            continue
        cols[g] = [
            ilp.add_column(Column(f"s[{name}][{k}]", *map(float, node_cost[g][k])))
            for k in range(groups.size[g])
        ]
        ilp.add_unique_choice(name, cols[g])
    for f in families:
        _add_family(ilp, f, cols[f.gu], cols[f.gv])
    if options.memory_budget is not None:
        _add_memory_rows(ilp, builder, groups, cols, options.memory_budget)
    return ilp, cols, eliminated


def _costs(
    builder: _Builder, groups: _Groups, options: IntraOpOptions
) -> tuple[dict[int, np.ndarray], list[_Family]]:
    """(compute, comm, resharding) per group strategy, and the edges between groups."""
    b, verts = builder, builder.vertices
    node_cost: dict[int, np.ndarray] = {g: np.zeros((k, 3)) for g, k in groups.size.items()}
    weights = [_weights(vx, options.step_weight) for vx in verts]
    for v, vx in enumerate(verts):
        cost, m = node_cost[groups.group[v]], groups.maps[v]
        cost[:, 0] += b.compute[v][m] * weights[v][0]
        cost[:, 1] += b.comm[v][m] * weights[v][1]
        if vx.kind == "source" and role_of(vx.value) in (Role.PARAM, Role.OPT_STATE):
            # Stored state has a price (options.memory_price): the ILP's only view of memory
            # pressure; the stage DP enforces the actual limit.
            memory = np.array([s.memory for s in vx.strategies])
            cost[:, 0] += options.memory_price * memory[m]
    families = []
    for v, vx in enumerate(verts):
        values = vx.input_values()
        for slot, p in enumerate(vx.inputs):
            if p is None:
                continue
            u, out = p
            gu, gv = groups.group[u], groups.group[v]
            srcs, dsts, tensor = b.out_keys[u][out], b.in_keys[v][slot], b.tensor(values[slot])
            a, d = groups.out_index(u, out), groups.in_index(v, slot)
            w = weights[v][2]
            if gu == gv:
                node_cost[gu][:, 2] += b.table.pairs(srcs, a, dsts, d, tensor) * w
            elif groups.size[gu] == 1:
                node_cost[gv][:, 2] += b.table.pairs(srcs, a[[0] * len(d)], dsts, d, tensor) * w
            elif groups.size[gv] == 1:
                node_cost[gu][:, 2] += b.table.pairs(srcs, a, dsts, d[[0] * len(a)], tensor) * w
            else:
                akeys, ai = _index(a.tolist())
                bkeys, bi = _index(d.tolist())
                cost = b.table.matrix([srcs[i] for i in akeys], [dsts[j] for j in bkeys], tensor)
                families.append(
                    _Family(
                        f"{values[slot].name}->{vx.name}",
                        gu,
                        gv,
                        ai,
                        bi,
                        [str(srcs[i]) for i in akeys],
                        [str(dsts[j]) for j in bkeys],
                        cost * w,
                    )
                )
    return node_cost, families


def _merge_parallel(families: list[_Family]) -> list[_Family]:
    """Families between the same two groups combined while that shrinks the edge columns."""
    merged: dict[tuple[int, int], list[_Family]] = {}
    for f in families:
        bucket = merged.setdefault((min(f.gu, f.gv), max(f.gu, f.gv)), [])
        for i, g in enumerate(bucket):
            both = g.combined(f if f.gu == g.gu else f.flipped())
            if both.size <= g.size + f.size:
                bucket[i] = both
                break
        else:
            bucket.append(f)
    return [f for bucket in merged.values() for f in bucket]


def _fold_leaves(node_cost: dict[int, np.ndarray], families: list[_Family]) -> list[_Eliminated]:
    """Fold every group whose edges all go to one other group into that group (repeatedly):
    the neighbour's strategy l then pays the leaf's cheapest strategy given l's spec key."""
    incident: dict[int, list[_Family]] = {}
    for f in families:
        incident.setdefault(f.gu, []).append(f)
        incident.setdefault(f.gv, []).append(f)

    def neighbours(g: int) -> set[int]:
        return {f.gv if f.gu == g else f.gu for f in incident.get(g, ())}

    eliminated = []
    queue = [g for g in sorted(incident) if len(neighbours(g)) == 1]
    while queue:
        g = queue.pop()
        if len(neighbours(g)) != 1:
            continue
        edges = incident.pop(g)
        oriented = [f if f.gu == g else f.flipped() for f in edges]
        f = oriented[0]
        for other in oriented[1:]:
            f = f.combined(other)
        h = f.gv
        per_key = node_cost[g].sum(axis=1)[:, None] + f.cost[f.a]  # leaf strategy x h key
        best = per_key.argmin(axis=0)
        fold = node_cost[g][best]
        fold[:, 2] += f.cost[f.a[best], np.arange(len(best))]
        node_cost[h] += fold[f.b]
        del node_cost[g]
        gone = {id(e) for e in edges}
        families[:] = [e for e in families if id(e) not in gone]
        incident[h] = [e for e in incident[h] if id(e) not in gone]
        if len(neighbours(h)) == 1:
            queue.append(h)
        eliminated.append(_Eliminated(g, h, f.b, best))
    return eliminated


def _add_family(ilp: Ilp, f: _Family, ucols: list[int], vcols: list[int]) -> None:
    """One edge column per (producer key, consumer key) pair, and the marginals."""
    first = len(ilp.columns)
    for i, sa in enumerate(f.atext):
        for j, sb in enumerate(f.btext):
            ilp.add_column(
                Column(f"e[{f.name}][{sa}->{sb}]", reshard=float(f.cost[i, j]), integer=False)
            )
    na, nb = f.cost.shape
    a, b = f.a.tolist(), f.b.tolist()
    for i in range(na):
        ilp.add_edge_marginal(
            f"edge_src[{f.name}][{f.atext[i]}]",
            list(range(first + i * nb, first + (i + 1) * nb)),
            [c for c, x in zip(ucols, a, strict=True) if x == i],
        )
    for j in range(nb):
        ilp.add_edge_marginal(
            f"edge_dst[{f.name}][{f.btext[j]}]",
            list(range(first + j, first + na * nb, nb)),
            [c for c, x in zip(vcols, b, strict=True) if x == j],
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
    sizes: dict[int, list[float]] = {}  # value id -> bytes per strategy of its group
    for t, v in enumerate(steps):
        if not is_heavy(builder.vertices[v].node):
            continue
        coef: dict[int, float] = {}
        const = 0.0
        for vid, (born, death, u, j) in life.items():
            if not born <= t <= death:
                continue
            if vid not in sizes:
                per_key = [builder.local_bytes(values[vid], s) for s in builder.out_keys[u][j]]
                sizes[vid] = [per_key[i] for i in groups.out_index(u, j).tolist()]
            g = groups.group[u]
            for k, nbytes in enumerate(sizes[vid]):
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
    + resharding on ``mesh``, under ``options`` (method, memory budget, time limit, weight of
    once-per-step costs)."""
    options = options or IntraOpOptions()
    if options.method not in METHODS:
        raise ValueError(f"unknown method {options.method!r}; use one of {METHODS}")
    if options.method not in ("shard", "megatron"):
        mesh = mesh.flattened()
    nodes = list(graph)
    builder = _Builder(nodes, mesh, cluster, options)
    groups = _merge(builder)
    ilp, cols, eliminated = _build_ilp(builder, groups, options)
    x, stats = ilp.solve(options.time_limit)
    choice = {g: int(np.argmax(x[c])) if c else 0 for g, c in cols.items()}
    for e in reversed(eliminated):
        choice[e.group] = int(e.best[e.keys[choice[e.neighbour]]])
    choice.update((g, 0) for g in groups.size if g not in choice)
    return _solution(builder, groups, choice, stats, options)


def _solution(
    builder: _Builder,
    groups: _Groups,
    choice: dict[int, int],
    stats: IlpStats,
    options: IntraOpOptions,
) -> IntraOpSolution:
    verts = builder.vertices
    chosen = [vx.strategies[groups.maps[v][choice[groups.group[v]]]] for v, vx in enumerate(verts)]
    specs: dict[str, ShardingSpec] = {}
    for v, vx in enumerate(verts):
        for out, spec in zip(_outputs(vx), chosen[v].outputs, strict=True):
            specs[out.name] = spec
    reshards = []
    per_step = 0.0
    syncs = 0
    gathers_state = False  # the executor buckets the reshards of state it reads: one call
    step_kinds: set[str] = set()  # once-per-step collectives, bucketed by kind
    for v, vx in enumerate(verts):
        values = vx.input_values()
        for slot, p in enumerate(vx.inputs):
            if p is None:
                continue
            src, dst = chosen[p[0]].outputs[p[1]], chosen[v].inputs[slot]
            value = values[slot]
            seconds, steps = builder.table.program(src, dst, *builder.tensor(value))
            if src != dst:
                reshards.append(EdgeReshard(value.name, vx.name, src, dst, seconds, steps))
                per_step += seconds if vx.once[2] else 0.0
                calls = [step.kind for step in steps if step.kind != "slice"]
                if vx.once[2]:
                    step_kinds.update(calls)
                elif calls and verts[p[0]].kind == "source":
                    gathers_state = True
                else:
                    syncs += len(calls)
    node_ids = [v for v, vx in enumerate(verts) if vx.kind == "node"]
    for v in node_ids:
        once = verts[v].once
        per_step += (chosen[v].compute if once[0] else 0.0) + (chosen[v].comm if once[1] else 0.0)
        calls = [c.kind for c in chosen[v].collectives]
        if once[1]:
            step_kinds.update(calls)
        else:
            syncs += len(calls)
    syncs += gathers_state
    return IntraOpSolution(
        mesh=builder.mesh,
        method=options.method,
        strategies={verts[v].name: chosen[v] for v in node_ids},
        alternatives={verts[v].name: verts[v].strategies for v in node_ids},
        specs=specs,
        reshards=reshards,
        compute=sum(chosen[v].compute for v in node_ids),
        communication=sum(chosen[v].comm for v in node_ids),
        resharding=sum(r.seconds for r in reshards),
        per_step=per_step,
        syncs=syncs,
        step_syncs=frozenset(step_kinds),
        memory=_memory(builder, specs),
        stats=stats,
        notes=builder.notes,
    )


def _memory(builder: _Builder, specs: dict) -> dict[str, float]:
    """Per-device bytes: persistent tensors by role, activations at their live peak."""
    out = {"params": 0.0, "grads": 0.0, "opt_state": 0.0, "activations": 0.0}
    key = {Role.PARAM: "params", Role.GRAD: "grads", Role.OPT_STATE: "opt_state"}
    steps, life = _lifetimes(builder)
    live = np.zeros(len(steps) + 1)
    seen: set[int] = set()
    for vx in builder.vertices:
        for o in _outputs(vx):
            if id(o) in seen:
                continue
            seen.add(id(o))
            nbytes = builder.local_bytes(o, specs[o.name])
            role = role_of(o)
            if UPDATES_KEY in o.metadata_props:
                continue  # written into the buffer of the parameter / state it replaces
            if role in key:
                out[key[role]] += nbytes
            elif vx.kind == "node":
                born, death, _, _ = life[id(o)]
                live[born : death + 1] += nbytes
    out["activations"] = float(live.max()) if len(live) else 0.0
    return out
