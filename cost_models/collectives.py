"""Alpha-beta costs of collectives along one axis of a logical device mesh.

Formulas (p ranks on the axis, n bytes, alpha latency, B per-rank bandwidth; peers.md §6.2):

- ring all-reduce:      2(p-1)·alpha + 2(p-1)/p · n/B
- ring all-gather:       (p-1)·alpha +  (p-1)/p · n/B   (n = gathered, i.e. output, bytes)
- ring reduce-scatter:   (p-1)·alpha +  (p-1)/p · n/B   (n = input bytes)
- all-to-all:            (p-1)·alpha +  (p-1)/p · n/B   (n = bytes each rank holds)
- send/recv:                   alpha +            n/B
- broadcast:        ceil(log2 p)·alpha +          n/B

A link may measure a kind's bandwidth apart (``Link.collective_bandwidth``: on CPU ranks an
all-reduce's reduction runs at memory speed, far below what a plain copy between ranks gets);
that kind's formula then uses it as B. Every collective and send also costs the link's
``dispatch`` once per call: what the executor spends on the instruction besides the transfer
(``Device.dispatch_latency``, see there). Bucketed gradient collectives pay it once per
bucket, like alpha.

An axis whose ranks sit on several hosts is *hierarchical*: g ranks per host on k hosts. Its
collectives run the intra-host part on the host link and the inter-host part on the network,
where all ranks of a host that talk across hosts at once share the host's bandwidth
(``concurrent`` of them). E.g. all-reduce = intra reduce-scatter + inter all-reduce of n/g +
intra all-gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cost_models.cluster import Cluster


@dataclass(frozen=True)
class AxisLink:
    """Where the ranks of one mesh axis sit, and the links they use."""

    size: int  # p: ranks per group along the axis
    per_host: int  # g: ranks of one group inside one host
    hosts: int  # k: hosts one group spans
    intra_alpha: float
    intra_bw: float  # bytes/s per rank
    inter_alpha: float
    inter_bw: float  # bytes/s per rank when all concurrent cross-host ranks of a host talk
    dispatch: float = 0.0  # seconds per call on the executor's side (Device.dispatch_latency)
    # (kind, bytes/s) where a collective kind's measured bandwidth differs from intra_bw/inter_bw
    intra_kinds: tuple[tuple[str, float], ...] = ()
    inter_kinds: tuple[tuple[str, float], ...] = ()

    @property
    def crosses_hosts(self) -> bool:
        return self.hosts > 1

    def bandwidths(self, kind: str) -> tuple[float, float]:
        """(intra, inter) bytes/s per rank that collectives of ``kind`` get."""
        intra = next((b for k, b in self.intra_kinds if k == kind), self.intra_bw)
        inter = next((b for k, b in self.inter_kinds if k == kind), self.inter_bw)
        return intra, inter


def axis_link(cluster: Cluster, device_ids: np.ndarray, axis: int) -> AxisLink:
    """The link of ``axis`` of a logical mesh given as an array of global device ids."""
    ids = np.asarray(device_ids)
    groups = np.moveaxis(ids, axis, -1).reshape(-1, ids.shape[axis])
    group = groups[0]
    host_ids = [cluster.host_of(int(d)) for d in group]
    hosts = len(set(host_ids))
    per_host = len(group) // hosts
    # Ranks of one host that cross hosts at the same time: every device of the mesh on that host.
    on_host = sum(1 for d in ids.ravel() if cluster.host_of(int(d)) == host_ids[0])
    concurrent = max(1, on_host // per_host) if hosts > 1 else 1
    return AxisLink(
        size=len(group),
        per_host=per_host,
        hosts=hosts,
        intra_alpha=cluster.intra_host.latency,
        intra_bw=cluster.intra_host.bandwidth,
        inter_alpha=cluster.inter_host.latency,
        inter_bw=cluster.inter_host.bandwidth / concurrent,
        dispatch=cluster.device.dispatch_latency,
        intra_kinds=tuple(sorted(cluster.intra_host.collective_bandwidth.items())),
        inter_kinds=tuple(
            (k, b / concurrent) for k, b in sorted(cluster.inter_host.collective_bandwidth.items())
        ),
    )


def flat_link(size: int, alpha: float, bandwidth: float, dispatch: float = 0.0) -> AxisLink:
    """A single-host axis: the textbook ring (used by tests and closed-form oracles)."""
    return AxisLink(size, size, 1, alpha, bandwidth, alpha, bandwidth, dispatch)


def _ring(p: int, n: float, alpha: float, bw: float, factor: float) -> float:
    if p <= 1 or n <= 0:
        return 0.0
    return factor * ((p - 1) * alpha + (p - 1) / p * n / bw)


def all_reduce(n: float, link: AxisLink) -> float:
    if link.size <= 1 or n <= 0:
        return 0.0
    intra_bw, inter_bw = link.bandwidths("all_reduce")
    if not link.crosses_hosts:
        return link.dispatch + _ring(link.size, n, link.intra_alpha, intra_bw, 2.0)
    g, k = link.per_host, link.hosts
    return (
        link.dispatch
        + _ring(g, n, link.intra_alpha, intra_bw, 2.0)
        + _ring(k, n / g, link.inter_alpha, inter_bw, 2.0)
    )


def _gather_like(kind: str, n: float, link: AxisLink) -> float:
    if link.size <= 1 or n <= 0:
        return 0.0
    intra_bw, inter_bw = link.bandwidths(kind)
    if not link.crosses_hosts:
        return link.dispatch + _ring(link.size, n, link.intra_alpha, intra_bw, 1.0)
    g, k = link.per_host, link.hosts
    return (
        link.dispatch
        + _ring(k, n / g, link.inter_alpha, inter_bw, 1.0)
        + _ring(g, n, link.intra_alpha, intra_bw, 1.0)
    )


def all_gather(n: float, link: AxisLink) -> float:
    """n = bytes of the gathered (full) tensor."""
    return _gather_like("all_gather", n, link)


def reduce_scatter(n: float, link: AxisLink) -> float:
    """n = bytes of the full input; each rank keeps n/p reduced."""
    return _gather_like("reduce_scatter", n, link)


def all_to_all(n: float, link: AxisLink) -> float:
    """n = bytes each rank holds before the exchange; (p-1)/p of it leaves the rank."""
    if link.size <= 1 or n <= 0:
        return 0.0
    intra_bw, inter_bw = link.bandwidths("all_to_all")
    alpha = link.inter_alpha if link.crosses_hosts else link.intra_alpha
    # Off-host traffic share is (k-1)/k of what leaves; it is bound by the shared NIC.
    if link.crosses_hosts:
        off = (link.hosts - 1) / link.hosts
        t = n * (1 - off) * (link.size - 1) / link.size / intra_bw
        t = max(t, n * off / inter_bw)
        return link.dispatch + (link.size - 1) * alpha + t
    return link.dispatch + _ring(link.size, n, alpha, intra_bw, 1.0)


def sync_wait(jitter: float, syncs: float, seconds: float) -> float:
    """Seconds ranks spend waiting for the slowest at ``syncs`` collectives spread over
    ``seconds`` of work: each ends a segment of seconds / syncs whose length jitters
    independently per rank, by about sqrt(its length) (``Device.sync_jitter``), so
    syncs * jitter * sqrt(seconds / syncs) = jitter * sqrt(syncs * seconds)."""
    if syncs <= 0 or seconds <= 0:
        return 0.0
    return jitter * math.sqrt(syncs * seconds)


def send_recv(n: float, alpha: float, bandwidth: float, dispatch: float = 0.0) -> float:
    return dispatch + alpha + n / bandwidth if n > 0 else 0.0


def broadcast(n: float, link: AxisLink) -> float:
    if link.size <= 1 or n <= 0:
        return 0.0
    alpha = link.inter_alpha if link.crosses_hosts else link.intra_alpha
    intra_bw, inter_bw = link.bandwidths("broadcast")
    bw = min(intra_bw, inter_bw) if link.crosses_hosts else intra_bw
    return link.dispatch + math.ceil(math.log2(link.size)) * alpha + n / bw


COLLECTIVES = {
    "all_reduce": all_reduce,
    "all_gather": all_gather,
    "reduce_scatter": reduce_scatter,
    "all_to_all": all_to_all,
    "broadcast": broadcast,
}
