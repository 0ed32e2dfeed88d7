"""Cross-stage transfers: which rank sends which region of a tensor to which rank.

A tensor leaves stage A under ``src_spec`` on A's mesh and arrives under ``dst_spec`` on B's
mesh. Every receiver needs the region its destination block covers; it takes each piece from
one holder of the source block, choosing among replicas round-robin by its own position so
that replicated sources share the sending (Alpa's load-balanced send/recv). Sender and
receiver derive the same list from the plan, so no metadata travels with the data.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.sharding import ShardingSpec
from runtime.mesh import Box, RankMesh, intersect, relative


@dataclass(frozen=True)
class Piece:
    src: int
    dst: int
    src_index: tuple[slice, ...]  # in the sender's local block
    dst_index: tuple[slice, ...]  # in the receiver's local block


def pieces(
    shape: tuple[int, ...],
    src_spec: ShardingSpec,
    src_mesh: RankMesh,
    dst_spec: ShardingSpec,
    dst_mesh: RankMesh,
) -> list[Piece]:
    """Every (sender, receiver, region) of one transfer, in a fixed order."""
    holders: dict[Box, list[int]] = {}
    for device in src_mesh.devices:
        holders.setdefault(src_mesh.box(src_spec, shape, device), []).append(device)
    out = []
    for k, receiver in enumerate(dst_mesh.devices):
        want = dst_mesh.box(dst_spec, shape, receiver)
        for box, devices in holders.items():
            common = intersect(box, want)
            if common is None:
                continue
            sender = devices[k % len(devices)]
            out.append(Piece(sender, receiver, relative(common, box), relative(common, want)))
    return out
