"""Sharding specs: text form, local shapes, and resharding programs priced by the
alpha-beta collectives of each mesh axis."""

import pytest

from cost_models import collectives
from cost_models.cluster import resolve_cluster
from cost_models.collectives import flat_link
from planner.mesh import logical_meshes, mesh_from_links
from planner.sharding import TIE_BREAK, ShardingSpec, local_shape, resharding_cost

MESH = mesh_from_links((2, 4), [flat_link(2, 1e-6, 1e9), flat_link(4, 1e-6, 1e10)])
SHAPE, NBYTES = (8, 16), 8 * 16 * 4


@pytest.mark.parametrize("text", ["S0,R", "R,S01", "", "S1,R|P0", "R,R", "S10,R"])
def test_parse_round_trip(text):
    assert str(ShardingSpec.parse(text)) == text
    assert ShardingSpec.parse(text) == ShardingSpec.parse(text)  # hashable value


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        ShardingSpec.parse("X0,R")


def test_local_shape():
    assert local_shape(SHAPE, ShardingSpec.parse("S0,S1"), (2, 4)) == (4, 4)
    assert local_shape(SHAPE, ShardingSpec.parse("R,S01"), (2, 4)) == (8, 2)
    with pytest.raises(ValueError):
        local_shape((3, 16), ShardingSpec.parse("S0,R"), (2, 4))


def _cost(src, dst):
    return resharding_cost(ShardingSpec.parse(src), ShardingSpec.parse(dst), SHAPE, 4, MESH)


def test_slice_is_free_and_gather_costs_all_gather():
    assert _cost("R,R", "S0,S1")[0] == 0.0
    seconds, steps = _cost("S1,R", "R,R")
    assert [s.kind for s in steps] == ["all_gather"]
    assert seconds == pytest.approx(
        collectives.all_gather(NBYTES, MESH.links[1]) + TIE_BREAK["all_gather"]
    )


def test_partial_resolves_by_all_reduce_or_reduce_scatter():
    seconds, steps = _cost("R,R|P1", "R,R")
    assert [s.kind for s in steps] == ["all_reduce"]
    assert seconds == pytest.approx(
        collectives.all_reduce(NBYTES, MESH.links[1]) + TIE_BREAK["all_reduce"]
    )
    _, steps = _cost("R,R|P1", "S1,R")
    assert [s.kind for s in steps] == ["reduce_scatter"]


def test_dim_move_is_all_to_all_not_infinity():
    seconds, steps = _cost("S1,R", "R,S1")
    assert [s.kind for s in steps] == ["all_to_all"]
    assert seconds == pytest.approx(
        collectives.all_to_all(NBYTES / 4, MESH.links[1]) + TIE_BREAK["all_to_all"]
    )
    seconds, steps = _cost("S01,R", "R,S10")  # every conversion gets a finite program
    assert 0 < seconds < 1 and steps


def test_logical_meshes_of_two_hosts():
    cluster = resolve_cluster("p3.16xlarge:2")
    meshes = {m.shape: m for m in logical_meshes(cluster, range(16))}
    assert {(16,), (1, 16), (2, 8), (4, 4), (16, 1)} <= set(meshes)
    assert meshes[(2, 8)].links[0].crosses_hosts and not meshes[(2, 8)].links[1].crosses_hosts
    assert meshes[(4, 4)].links[0].crosses_hosts
