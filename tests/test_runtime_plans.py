"""Executor pieces that need no MPI: pipeline schedules, transfer pieces, resharding programs.
(End-to-end tests run compiled plans: tests/test_runtime_exec.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from planner.sharding import ShardingSpec
from runtime import reshard
from runtime.mesh import RankMesh
from runtime.pipeline import schedule
from runtime.transfer import pieces


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_schedules_run_every_microbatch_once_forward_before_backward(kind):
    for stages in (1, 2, 4):
        for stage in range(stages):
            tasks = schedule(kind, stage, stages, 4)
            assert sorted(tasks) == sorted(
                [("F", m) for m in range(4)] + [("B", m) for m in range(4)]
            )
            assert all(tasks.index(("F", m)) < tasks.index(("B", m)) for m in range(4))
    assert schedule("1f1b", 0, 2, 4)[:3] == [("F", 0), ("F", 1), ("B", 0)]


def test_transfer_pieces_cover_every_destination_block_once():
    src = RankMesh((2, 2), (0, 1, 2, 3))
    dst = RankMesh((2,), (4, 5))
    shape = (4, 6)
    for s_text, d_text in [("S0,S1", "R,S0"), ("R,R", "S0,R"), ("S01,R", "R,R")]:
        ps = pieces(shape, ShardingSpec.parse(s_text), src, ShardingSpec.parse(d_text), dst)
        for receiver in dst.devices:
            box = dst.box(ShardingSpec.parse(d_text), shape, receiver)
            cover = np.zeros([b - a for a, b in box], int)
            for p in ps:
                if p.dst == receiver:
                    cover[p.dst_index] += 1
            assert (cover == 1).all()


def test_reshard_program_matches_planner_steps():
    from planner.sharding import resharding_cost

    class _Mesh:  # resharding_cost only asks the mesh for collective costs
        shape = (2, 2)

        def collective_cost(self, kind, axes, nbytes):
            return 1.0

    for src, dst in [
        ("S0,R", "R,S0"),
        ("R,S01", "S1,R"),
        ("S0,R|P1", "S0,S1"),
        ("S01,R", "S1,S0"),
        ("R,R", "R,R|P0"),
    ]:
        a, b = ShardingSpec.parse(src), ShardingSpec.parse(dst)
        _, steps = resharding_cost(a, b, (4, 4), 4, _Mesh())
        mine = reshard.program(a, b)
        assert [(s.kind, s.axis, s.dim) for s in steps] == [
            (s.kind.replace("zero", "slice"), s.axis, s.dim) for s in mine
        ]
