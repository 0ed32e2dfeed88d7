"""Logical device meshes: 1-D and 2-D views of a (sub)mesh of global devices.

Alpa solves the intra-op ILP on a *logical* mesh: the devices of a physical submesh arranged
as an N-D array whose every axis has its own alpha-beta link. A 2x8 submesh (two hosts of 8)
can be viewed as 1x16, 2x8, 4x4, 8x2 or 16x1; the devices are laid out host-major, so the last
axis stays inside a host as long as it fits, and an axis that crosses hosts pays the
inter-host link (``cost_models.collectives.axis_link``).

Public API: ``LogicalMesh`` (frozen; ``shape``, ``device_ids`` as nested tuples of global
ids, ``links`` one ``AxisLink`` per axis) and ``logical_meshes(cluster, device_ids)``.
A collective over several axes at once (a tensor dim split ``S01``) is costed
hierarchically: reduce-scatter inside the inner axis, all-reduce across the outer one, then
all-gather inside the inner one (``LogicalMesh.collective_cost``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cost_models import collectives
from cost_models.cluster import Cluster
from cost_models.collectives import AxisLink


@dataclass(frozen=True)
class LogicalMesh:
    """An N-D (N = 1 or 2) arrangement of global device ids with one link per axis."""

    shape: tuple[int, ...]
    device_ids: tuple
    links: tuple[AxisLink, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    def size(self, axes: Sequence[int]) -> int:
        """Number of shards a split over ``axes`` makes."""
        return math.prod(self.shape[a] for a in axes)

    def collective_cost(self, kind: str, axes: Sequence[int], nbytes: float) -> float:
        """Seconds of collective ``kind`` over the devices spanned by ``axes``.

        ``nbytes`` follows ``cost_models.collectives``: all-gather = gathered (output) bytes,
        reduce-scatter and all-to-all = bytes each rank holds before, all-reduce = buffer.
        """
        axes = [a for a in axes if self.shape[a] > 1]
        if not axes or nbytes <= 0:
            return 0.0
        fn = collectives.COLLECTIVES[kind]
        if len(axes) == 1:
            return fn(nbytes, self.links[axes[0]])
        inner, outer = self.links[axes[-1]], self.links[axes[0]]
        if kind == "all_reduce":
            return (
                collectives.reduce_scatter(nbytes, inner)
                + collectives.all_reduce(nbytes / inner.size, outer)
                + collectives.all_gather(nbytes, inner)
            )
        if kind in ("all_gather", "reduce_scatter"):
            return fn(nbytes / inner.size, outer) + fn(nbytes, inner)
        return sum(fn(nbytes, self.links[a]) for a in axes)

    def without_latency(self) -> LogicalMesh:
        """The same mesh with zero-latency links (the bandwidth part of a collective)."""
        links = tuple(
            dataclasses.replace(lk, intra_alpha=0.0, inter_alpha=0.0, dispatch=0.0)
            for lk in self.links
        )
        return LogicalMesh(self.shape, self.device_ids, links)

    def flattened(self) -> LogicalMesh:
        """The same devices as one axis (Alpa's ``flatten()``, used by forced data parallel)."""
        ids = np.asarray(self.device_ids)
        return LogicalMesh((ids.size,), tuple(int(d) for d in ids.ravel()), (self._flat_link(),))

    def _flat_link(self) -> AxisLink:
        links = [lk for lk, n in zip(self.links, self.shape, strict=True) if n > 1]
        if not links:
            return self.links[0]
        crossing = [lk for lk in links if lk.crosses_hosts]
        base = crossing[0] if crossing else links[0]
        hosts = base.hosts
        size = self.num_devices
        return AxisLink(
            size,
            size // hosts,
            hosts,
            base.intra_alpha,
            base.intra_bw,
            base.inter_alpha,
            base.inter_bw,
            base.dispatch,
            base.intra_kinds,
            base.inter_kinds,
        )

    def describe(self) -> str:
        return "x".join(str(n) for n in self.shape)


def _nested(ids: np.ndarray) -> tuple:
    return tuple(_nested(row) for row in ids) if ids.ndim > 1 else tuple(int(d) for d in ids)


def make_mesh(cluster: Cluster, device_ids: Sequence[int], shape: tuple[int, ...]) -> LogicalMesh:
    """A mesh of ``shape`` over ``device_ids`` (host-major order), links from ``cluster``."""
    ids = np.asarray(sorted(int(d) for d in device_ids)).reshape(shape)
    links = tuple(collectives.axis_link(cluster, ids, a) for a in range(len(shape)))
    return LogicalMesh(tuple(shape), _nested(ids), links)


def mesh_from_links(shape: tuple[int, ...], links: Sequence[AxisLink]) -> LogicalMesh:
    """A mesh with explicit per-axis links (closed-form oracles, hypothetical hardware)."""
    ids = np.arange(math.prod(shape)).reshape(shape)
    return LogicalMesh(tuple(shape), _nested(ids), tuple(links))


def logical_meshes(cluster: Cluster, device_ids: Sequence[int]) -> list[LogicalMesh]:
    """Every 1-D and 2-D view of the submesh: (n,), then (a, n/a) for each divisor a."""
    n = len(device_ids)
    meshes = [make_mesh(cluster, device_ids, (n,))]
    meshes += [make_mesh(cluster, device_ids, (a, n // a)) for a in range(1, n + 1) if n % a == 0]
    return meshes
