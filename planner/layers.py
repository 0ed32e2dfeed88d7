"""Layer clustering (Alpa §2.1): forward ops -> L layers, and every other op to its layer.

The DP (the paper's G(k, r) = min_i max{G(i, r-1), C(i)}) walks the forward nodes in
topological order and cuts them into L contiguous layers whose FLOPs stay within (1+eps) of
total/L, minimising the largest number of activation bytes that cross a cut. Backward nodes
follow the forward node whose gradient rule made them (``alpa.forward_node``), update nodes
follow their parameter's first forward consumer.

``--layers auto`` picks L from the model's repetition: the heavy-op sequence of a transformer
repeats once per block, so L is the block count (or the largest divisor of it under a cap);
identical layers then share one intra-op solve by their structural signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from planner.flops import is_heavy, node_flops
from planner.graph import PHASE_KEY, Role, nbytes, role_of, shape_of

MAX_AUTO_LAYERS = 64
MIN_HEAVY_PER_LAYER = 3  # Alpa's LAYER_HEAVY_OP_LOWER_BOUND


@dataclass(frozen=True)
class Layer:
    index: int
    nodes: tuple[str, ...]  # every node of the layer (forward, backward, update) in graph order
    forward_nodes: tuple[str, ...]
    flops: float  # forward FLOPs
    signature: str  # equal signatures <=> isomorphic layers (same ops, shapes, wiring)


def phase_of(node: ir.Node) -> str:
    return node.metadata_props.get(PHASE_KEY, "forward")


def forward_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if phase_of(n) == "forward"]


def _cut_bytes(nodes: list[ir.Node]) -> np.ndarray:
    """cut[p] = activation bytes produced before position p and consumed at or after p."""
    pos = {id(n): i for i, n in enumerate(nodes)}
    diff = np.zeros(len(nodes) + 1)
    for i, node in enumerate(nodes):
        for out in node.outputs:
            last = max((pos.get(id(u.node), -1) for u in out.uses()), default=-1)
            if last > i:
                diff[i + 1] += nbytes(out)
                diff[last + 1] -= nbytes(out)
    return np.cumsum(diff)[: len(nodes) + 1]


def cluster_forward(nodes: list[ir.Node], num_layers: int, eps: float = 0.5) -> list[int]:
    """Boundaries b_0=0 < b_1 < ... < b_L=n of the DP clustering (positions into ``nodes``)."""
    n = len(nodes)
    num_layers = max(1, min(num_layers, n))
    flops = np.concatenate([[0.0], np.cumsum([node_flops(x) for x in nodes])])
    heavy = np.concatenate([[0], np.cumsum([is_heavy(x) for x in nodes])])
    cut = _cut_bytes(nodes)
    min_heavy = min(MIN_HEAVY_PER_LAYER, int(heavy[-1]) // num_layers)
    idx = np.arange(n + 1)
    while True:
        cap = (1 + eps) * flops[-1] / num_layers
        span_ok = (
            (idx[:, None] < idx[None, :])
            & (flops[None, :] - flops[:, None] <= cap * (1 + 1e-9))
            & (heavy[None, :] - heavy[:, None] >= min_heavy)
        )
        g = np.full(n + 1, np.inf)
        g[0] = 0.0
        choice = np.zeros((num_layers + 1, n + 1), dtype=np.int64)
        for r in range(1, num_layers + 1):
            h = np.maximum(g, np.where(idx > 0, cut, 0.0))  # entering layer r at i costs cut[i]
            cand = np.where(span_ok, h[:, None], np.inf)
            choice[r] = np.argmin(cand, axis=0)  # first (smallest) i on ties: deterministic
            g = cand[choice[r], idx]
        if np.isfinite(g[n]):
            break
        eps = eps * 2 + 0.5  # one op heavier than the cap: relax the balance, as Alpa does
        if eps > 1e6:
            raise ValueError("layer clustering found no feasible split")
    bounds = [n]
    for r in range(num_layers, 0, -1):
        bounds.append(int(choice[r][bounds[-1]]))
    return bounds[::-1]


def _heavy_signature(node: ir.Node) -> tuple:
    return (node.op_type, tuple(shape_of(v) for v in node.inputs if v is not None))


def repeat_count(nodes: list[ir.Node]) -> int:
    """How many times the heavy-op sequence repeats (transformer blocks), 1 if it does not."""
    seq = [_heavy_signature(n) for n in nodes if is_heavy(n)]
    best_cover, best_r = 0, 1
    for period in range(1, len(seq) // 2 + 1):
        for offset in range(period):
            r = 1
            while offset + (r + 1) * period <= len(seq) and (
                seq[offset + r * period : offset + (r + 1) * period]
                == seq[offset : offset + period]
            ):
                r += 1
            if r >= 2 and r * period > best_cover:
                best_cover, best_r = r * period, r
    return best_r if best_cover * 2 >= len(seq) else 1


def auto_layer_count(nodes: list[ir.Node], cap: int = MAX_AUTO_LAYERS) -> int:
    repeats = repeat_count(nodes)
    if repeats >= 2:
        return max(d for d in range(1, min(repeats, cap) + 1) if repeats % d == 0)
    heavy = sum(1 for n in nodes if is_heavy(n))
    return int(np.clip(heavy // MIN_HEAVY_PER_LAYER, 1, 16))


def assign_layers(graph: ir.Graph, num_layers: int | None) -> list[Layer]:
    """Cluster the forward nodes and give every node of the graph a layer."""
    fwd = forward_nodes(graph)
    count = num_layers or auto_layer_count(fwd)
    bounds = cluster_forward(fwd, count)
    layer_of: dict[str, int] = {}
    for li in range(len(bounds) - 1):
        for node in fwd[bounds[li] : bounds[li + 1]]:
            layer_of[node.name] = li
    first_use_layer = _param_layers(graph, layer_of)
    for node in graph:
        if node.name in layer_of:
            continue
        phase = phase_of(node)
        if phase == "backward" and node.metadata_props.get("alpa.forward_node") in layer_of:
            layer_of[node.name] = layer_of[node.metadata_props["alpa.forward_node"]]
        elif phase == "update" and node.metadata_props.get("alpa.param") in first_use_layer:
            layer_of[node.name] = first_use_layer[node.metadata_props["alpa.param"]]
        else:  # no provenance: the latest layer among its producers
            producers = [v.producer() for v in node.inputs if v is not None and v.producer()]
            layer_of[node.name] = max(
                (layer_of.get(p.name, 0) for p in producers), default=len(bounds) - 2
            )
    members: dict[int, list[ir.Node]] = {i: [] for i in range(len(bounds) - 1)}
    for node in graph:
        members[layer_of[node.name]].append(node)
    return [
        Layer(
            index=i,
            nodes=tuple(n.name for n in members[i]),
            forward_nodes=tuple(n.name for n in fwd[bounds[i] : bounds[i + 1]]),
            flops=float(sum(node_flops(n) for n in fwd[bounds[i] : bounds[i + 1]])),
            signature=layer_signature(members[i]),
        )
        for i in range(len(bounds) - 1)
    ]


def _param_layers(graph: ir.Graph, layer_of: dict[str, int]) -> dict[str, int]:
    """Parameter name -> layer of its first forward consumer."""
    out: dict[str, int] = {}
    params = [v for v in [*graph.inputs, *graph.initializers.values()] if role_of(v) is Role.PARAM]
    for p in params:
        layers = [layer_of[u.node.name] for u in p.uses() if u.node.name in layer_of]
        out[p.name] = min(layers) if layers else 0
    return out


def layer_signature(nodes: list[ir.Node]) -> str:
    """Structural hash: ops, attributes, shapes, dtypes and wiring relative to the layer."""
    local = {id(out): (i, j) for i, n in enumerate(nodes) for j, out in enumerate(n.outputs)}
    h = hashlib.sha256()
    for node in nodes:
        ins = []
        for v in node.inputs:
            if v is None:
                ins.append("-")
            elif id(v) in local:
                ins.append(f"L{local[id(v)]}")
            else:
                ins.append(f"X{role_of(v).value}{shape_of(v)}{v.dtype}")
        attrs = sorted(
            (k, repr(a.value))
            for k, a in node.attributes.items()
            if a.type != ir.AttributeType.TENSOR
        )
        outs = [f"{shape_of(o)}{o.dtype}" for o in node.outputs]
        h.update(f"{node.op_type}|{phase_of(node)}|{ins}|{outs}|{attrs}\n".encode())
    return h.hexdigest()[:16]
