"""Stage costs composed from per-layer intra-op solves (solver-notes: decompose by layer).

A whole training graph is far too large for one ILP to plan in seconds, but transformer
blocks repeat: each distinct layer signature is solved once per logical mesh and the solution
is reused, node by node, for every layer with that signature. A stage (layers i..j on a mesh)
then costs the sum of its layers plus the resharding on edges between its layers, and the
transfer of the activations entering it from the previous stage.

Costs are split by when they happen: per micro-batch (forward/backward compute, their
collectives, resharding; and apart, adding the micro-batch's gradients into the step's sums,
which the first micro-batch skips) and per step (the optimizer update, and the gradient
synchronisation that gradient accumulation performs once per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from cost_models.cluster import Cluster
from cost_models.collectives import send_recv, sync_wait
from cost_models.compute import op_time
from planner.graph import Role, itemsize, nbytes, role_of, shape_of
from planner.intra_op import IntraOpOptions, IntraOpSolution, solve_intra_op
from planner.layers import Layer, phase_of
from planner.mesh import LogicalMesh
from planner.sharding import ShardingSpec, resharding_cost
from planner.strategies import Strategy
from planner.strategies.base import local_bytes


@dataclass(frozen=True)
class LayerCost:
    """One layer on one logical mesh (seconds; bytes per device)."""

    per_microbatch: float
    per_step: float
    compute: float
    communication: float
    accumulate: float  # adding one micro-batch's gradients into the step's sums
    syncs: int  # collective calls per micro-batch
    step_syncs: frozenset[str]  # kinds of once-per-step collectives (bucketed by kind)
    static_memory: float  # params + grads + optimizer state
    stash_memory: float  # forward activations the backward pass reads, per micro-batch
    transient_memory: float  # peak working set beyond the stash


@dataclass
class LayerSolution:
    """A representative solve and the map from this layer's nodes to it."""

    solution: IntraOpSolution
    node_map: dict[str, str]  # this layer's node name -> representative node name
    cost: LayerCost


@dataclass
class StageCostModel:
    """Layer solutions per logical-mesh configuration, cached by layer signature."""

    graph: ir.Graph
    layers: list[Layer]
    cluster: Cluster
    method: str = "shard"
    time_limit: float = 20.0
    step_weight: float = 1.0  # 1 / micro-batches: the update and gradient sync run once a step
    memory_price: float = 0.0  # see IntraOpOptions.memory_price
    progress: Callable[[], None] | None = None
    _cache: dict[tuple, LayerSolution] = field(default_factory=dict)
    _ranges: dict[tuple, RangeCosts] = field(default_factory=dict)
    solves: int = 0

    def __post_init__(self) -> None:
        self.nodes = {n.name: n for n in self.graph}
        self.layer_of = {name: layer.index for layer in self.layers for name in layer.nodes}

    def layer(self, index: int, mesh: LogicalMesh) -> LayerSolution:
        layer = self.layers[index]
        key = (layer.signature, mesh.shape, mesh.links, self.method)
        rep = self._cache.get(key)
        if rep is None:
            nodes = [self.nodes[n] for n in layer.nodes]
            solution = solve_intra_op(
                nodes,
                mesh,
                self.cluster,
                IntraOpOptions(
                    method=self.method,
                    time_limit=self.time_limit,
                    step_weight=self.step_weight,
                    boundary=True,
                    memory_price=self.memory_price,
                ),
            )
            self.solves += 1
            if self.progress:
                self.progress()
            rep = LayerSolution(solution, {n: n for n in layer.nodes}, self._cost(nodes, solution))
            self._cache[key] = rep
        if rep.node_map and next(iter(rep.node_map)) == layer.nodes[0]:
            return rep
        rep_names = list(rep.node_map)
        return LayerSolution(rep.solution, dict(zip(layer.nodes, rep_names, strict=True)), rep.cost)

    def strategy(self, node: str, mesh: LogicalMesh) -> Strategy:
        sol = self.layer(self.layer_of[node], mesh)
        return sol.solution.strategies[sol.node_map[node]]

    def output_spec(self, value: ir.Value, mesh: LogicalMesh) -> ShardingSpec | None:
        producer = value.producer()
        if producer is None:
            return None
        return self.strategy(producer.name, mesh).outputs[value.index()]

    def _cost(self, nodes: list[ir.Node], sol: IntraOpSolution) -> LayerCost:
        stash = 0.0
        for node in nodes:
            if phase_of(node) != "forward":
                continue
            for out in node.outputs:
                if any(phase_of(u.node) == "backward" for u in out.uses()):
                    stash += local_bytes(out, sol.specs[out.name], sol.mesh)
        memory = sol.memory
        return LayerCost(
            per_microbatch=sol.per_microbatch,
            per_step=sol.per_step,
            compute=sol.compute,
            communication=sol.communication + sol.resharding,
            accumulate=self._accumulate_seconds(nodes, sol),
            syncs=sol.syncs,
            step_syncs=sol.step_syncs,
            static_memory=memory["params"] + memory["grads"] + memory["opt_state"],
            stash_memory=stash,
            transient_memory=max(0.0, memory["activations"] - stash),
        )

    def _accumulate_seconds(self, nodes: list[ir.Node], sol: IntraOpSolution) -> float:
        """Gradient accumulation adds each micro-batch's gradients, as the backward pass
        leaves them (before their deferred all-reduce or reduce-scatter, so a gradient
        reduce-scattered once per step is summed whole), into the step's sums: read two
        tensors, write one, one kernel per gradient. Real memory traffic that grows with the
        micro-batch count, which Alpa's cost model leaves out."""
        total = 0.0
        for node in nodes:
            for j, out in enumerate(node.outputs):
                if role_of(out) is not Role.GRAD:
                    continue
                size = local_bytes(out, sol.specs[out.name], sol.mesh)
                for c in sol.strategies[node.name].collectives:
                    if c.kind == "reduce_scatter" and c.tensor == f"out{j}":
                        size *= math.prod(sol.mesh.shape[a] for a in c.axes)
                total += op_time(0.0, 3 * size, self.cluster.device)
        return total

    def edges(self, mesh: LogicalMesh) -> np.ndarray:
        """edges[a, b]: resharding on the edges from layer a into layer b on ``mesh``."""
        num = len(self.layers)
        out = np.zeros((num, num))
        for b, layer in enumerate(self.layers):
            for name in layer.nodes:
                node = self.nodes[name]
                consumer = None
                for slot, value in enumerate(node.inputs):
                    producer = value.producer() if value is not None else None
                    a = self.layer_of.get(producer.name) if producer is not None else None
                    if a is None or a == b:
                        continue
                    consumer = consumer or self.strategy(name, mesh)
                    src, dst = self.output_spec(value, mesh), consumer.inputs[slot]
                    if src is not None and dst is not None and src != dst:
                        out[a, b] += resharding_cost(
                            src, dst, shape_of(value), itemsize(value.dtype), mesh
                        )[0]
        return out


def crossing_bytes(graph: ir.Graph, layers: list[Layer]) -> np.ndarray:
    """cut[i] = bytes of activations produced in layers < i and read in layers >= i."""
    layer_of = {name: layer.index for layer in layers for name in layer.nodes}
    num = len(layers)
    diff = np.zeros(num + 1)
    for node in graph:
        a = layer_of[node.name]
        for out in node.outputs:
            if role_of(out) in (Role.PARAM, Role.CONST):
                continue
            last = max((layer_of[u.node.name] for u in out.uses()), default=a)
            if last > a:
                diff[a + 1] += nbytes(out)
                diff[last + 1] -= nbytes(out)
    return np.cumsum(diff)[:num]


def transfer_seconds(cluster: Cluster, nbytes_in: float, stage_devices: int) -> float:
    """Activations in and their gradients out of a stage, per micro-batch, each rank moving
    its share (Alpa's local all-gather trick keeps the inter-mesh traffic at 1/n)."""
    if nbytes_in <= 0:
        return 0.0
    link = cluster.inter_host if cluster.hosts > 1 else cluster.intra_host
    dispatch = cluster.device.dispatch_latency
    return 2 * send_recv(nbytes_in / stage_devices, link.latency, link.bandwidth, dispatch)


@dataclass(frozen=True)
class RangeCosts:
    """Costs of every layer range [i, j] on one logical mesh, from prefix sums.

    ``accumulate`` is adding one micro-batch's gradients into the step's sums, paid B - 1
    times a step (the first micro-batch's gradients start the sums): not in
    ``per_microbatch`` (see ``planner.compiler.pipeline_time``).

    On a mesh of several devices, ranks wait for the slowest at each collective: per
    micro-batch ``sync_wait`` over the range's collectives and work, per step one more wait
    per kind of once-per-step collective (the executor buckets them by kind), each after a
    segment of average length. Not additive over layers (it grows as a square root), so it
    is added per range, not per layer.
    """

    per_microbatch: np.ndarray  # (L, L)
    per_step: np.ndarray
    compute: np.ndarray
    communication: np.ndarray
    accumulate: np.ndarray  # one addition of a micro-batch's gradients
    static_memory: np.ndarray
    stash_memory: np.ndarray
    transient_memory: np.ndarray


def range_costs(model: StageCostModel, mesh: LogicalMesh, cut: np.ndarray) -> RangeCosts:
    """Costs of every layer range [i, j] on ``mesh`` (cached per mesh on the model)."""
    key = (mesh.shape, mesh.links)
    if key in model._ranges:
        return model._ranges[key]
    num = len(model.layers)
    costs = [model.layer(i, mesh).cost for i in range(num)]
    edge = model.edges(mesh)
    shape = (num, num)
    out = {k: np.full(shape, np.inf) for k in RangeCosts.__dataclass_fields__}
    jitter = model.cluster.device.sync_jitter if mesh.num_devices > 1 else 0.0
    for i in range(num):
        acc = dict.fromkeys(out, 0.0)
        inner = syncs = 0.0
        step_kinds: set[str] = set()
        transfer = transfer_seconds(model.cluster, cut[i], mesh.num_devices) if i else 0.0
        for j in range(i, num):
            c = costs[j]
            syncs += c.syncs
            step_kinds |= c.step_syncs
            inner += edge[i:j, j].sum()
            acc["per_microbatch"] += c.per_microbatch
            acc["per_step"] += c.per_step
            acc["compute"] += c.compute
            acc["communication"] += c.communication
            acc["accumulate"] += c.accumulate
            acc["static_memory"] += c.static_memory
            acc["stash_memory"] += c.stash_memory
            acc["transient_memory"] = max(acc["transient_memory"], c.transient_memory)
            for k in out:
                out[k][i, j] = acc[k]
            work = acc["per_microbatch"] + inner
            wait = sync_wait(jitter, syncs, work)
            out["per_microbatch"][i, j] += inner + transfer + wait
            out["communication"][i, j] += inner + transfer + wait
            segment = work / (syncs + 1)
            out["per_step"][i, j] += len(step_kinds) * sync_wait(jitter, 1, segment)
    model._ranges[key] = RangeCosts(**out)
    return model._ranges[key]
