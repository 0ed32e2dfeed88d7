"""Where a rank sits on its stage's logical mesh, and which block of a tensor it holds.

A spec splits a tensor dim over mesh axes, the first axis major (``S01``: 2x2 mesh, block
index = coord0 * 2 + coord1). Everything here is pure index arithmetic shared by resharding,
cross-stage transfers and the slicing of parameters and data, so every rank derives the same
layout from the plan alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.errors import UserError
from planner.plan_schema import LogicalMeshPlan
from planner.sharding import ShardingSpec
from runtime.comm import contiguous

Box = tuple[tuple[int, int], ...]  # per dim [start, stop) in global coordinates


@dataclass(frozen=True)
class RankMesh:
    """A logical mesh: shape and global device ids in row-major order."""

    shape: tuple[int, ...]
    devices: tuple[int, ...]

    @staticmethod
    def from_plan(mesh: LogicalMeshPlan) -> RankMesh:
        devices = tuple(d for row in mesh.device_ids for d in row)
        shape = tuple(mesh.shape)
        if math.prod(shape) != len(devices) or len(set(devices)) != len(devices):
            raise UserError(
                f"logical mesh shape {list(shape)} does not match its device ids "
                f"{mesh.device_ids}: recompile the plan"
            )
        return RankMesh(shape, devices)

    @functools.cache  # noqa: B019 - meshes are few, immutable and live for the whole run
    def coords(self, device: int) -> tuple[int, ...]:
        """Cached, as resharding asks for it per collective every step."""
        return tuple(int(c) for c in np.unravel_index(self.devices.index(device), self.shape))

    def device_at(self, coords: Sequence[int]) -> int:
        return self.devices[int(np.ravel_multi_index(tuple(coords), self.shape))]

    def size(self, axes: Sequence[int]) -> int:
        return math.prod(self.shape[a] for a in axes)

    def index(self, coords: Sequence[int], axes: Sequence[int]) -> int:
        """Combined index of ``coords`` over ``axes`` (first axis major)."""
        i = 0
        for a in axes:
            i = i * self.shape[a] + coords[a]
        return i

    def group(self, device: int, axes: Sequence[int]) -> list[int]:
        """Devices that share ``device``'s coords off ``axes``, ordered by combined index."""
        return list(self._group(device, tuple(axes)))

    @functools.cache  # noqa: B019 - see coords
    def _group(self, device: int, axes: tuple[int, ...]) -> tuple[int, ...]:
        base = list(self.coords(device))
        out = []
        for k in range(self.size(axes)):
            coords = list(base)
            for a, c in zip(axes, np.unravel_index(k, [self.shape[a] for a in axes]), strict=True):
                coords[a] = int(c)
            out.append(self.device_at(coords))
        return tuple(out)

    def box(self, spec: ShardingSpec, shape: Sequence[int], device: int) -> Box:
        """The global region ``device`` holds of a tensor of ``shape`` under ``spec``."""
        check_fits(spec, shape, self.shape)
        coords = self.coords(device)
        out = []
        for n, axes in zip(shape, spec.dims, strict=True):
            parts = self.size(axes)
            k = self.index(coords, axes)
            out.append((k * n // parts, (k + 1) * n // parts))
        return tuple(out)


def check_fits(spec: ShardingSpec, shape: Sequence[int], mesh_shape: Sequence[int]) -> None:
    if not spec.valid_for(shape, mesh_shape):
        raise UserError(
            f"sharding spec {str(spec)!r} does not fit a tensor of shape {list(shape)} on mesh "
            f"{list(mesh_shape)} (rank, divisibility or axis reuse): recompile the plan"
        )


def shard(array: np.ndarray, spec: ShardingSpec, mesh: RankMesh, device: int) -> np.ndarray:
    """The block of a global array that ``device`` holds (a partial sum: the value on the
    first rank of the partial axes, zeros elsewhere)."""
    index, zero = block_index(spec, array.shape, mesh, device)
    block = contiguous(np.asarray(array[index]))
    return np.zeros_like(block) if zero else block


@functools.cache
def block_index(
    spec: ShardingSpec, shape: tuple[int, ...], mesh: RankMesh, device: int
) -> tuple[tuple[slice, ...], bool]:
    """Where ``device``'s block of a ``shape`` tensor under ``spec`` lies, and whether it is a
    zero addend of a partial sum (cached: the executor shards every micro-batch alike)."""
    box = mesh.box(spec, shape, device)
    coords = mesh.coords(device)
    return tuple(slice(a, b) for a, b in box), any(coords[a] for a in spec.partial)


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def relative(box: Box, within: Box) -> tuple[slice, ...]:
    """Slices of ``box`` in the local coordinates of a block that covers ``within``."""
    return tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(box, within, strict=True))
