"""The stage DP against brute-force enumeration, and its memory rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from planner.stage_dp import stage_dp


def brute_force(stage_cost, sum_cost, inflight, sizes, devices, b):
    layers = stage_cost.shape[0]
    best = np.inf
    for cuts in range(layers):
        for bounds in itertools.combinations(range(1, layers), cuts):
            ranges = list(zip((0, *bounds), (*bounds, layers), strict=True))
            s_count = len(ranges)
            for meshes in itertools.product(range(len(sizes)), repeat=s_count):
                if sum(sizes[m] for m in meshes) != devices:
                    continue
                for cfgs in itertools.product(range(stage_cost.shape[3]), repeat=s_count):
                    total, tmax, ok = 0.0, 0.0, True
                    for pos, ((i, k), m, c) in enumerate(zip(ranges, meshes, cfgs, strict=True)):
                        remaining = s_count - pos
                        if inflight[i, k - 1, m, c] < min(remaining, b):
                            ok = False
                        total += sum_cost[i, k - 1, m, c]
                        tmax = max(tmax, stage_cost[i, k - 1, m, c])
                    if ok:
                        best = min(best, total + (b - 1) * tmax)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers, sizes, devices, configs = 4, [1, 2, 4], 4, 2
    b = int(rng.integers(1, 6))
    cost = rng.uniform(1, 10, (layers, layers, len(sizes), configs))
    for i, j in itertools.product(range(layers), repeat=2):
        if j < i:
            cost[i, j] = np.inf
        else:  # more layers cost more, more devices less (roughly)
            cost[i, j] *= (j - i + 1) / np.asarray(sizes)[:, None]
    extra = rng.uniform(0, 1, cost.shape)
    inflight = rng.integers(0, 5, cost.shape)
    got = stage_dp(cost, cost + extra, inflight, sizes, devices, b)
    want = brute_force(cost, cost + extra, inflight, sizes, devices, b)
    if not np.isfinite(want):
        assert got is None
    else:
        assert got is not None and got.latency == pytest.approx(want)
        assert sum(sizes[s.submesh] for s in got.stages) == devices
        assert [s.start for s in got.stages][0] == 0 and got.stages[-1].stop == layers


def test_memory_forces_more_stages():
    """Under 1F1B the first of s stages holds min(s, B) micro-batches of activations."""
    layers, sizes, b = 2, [1, 2], 4
    cost = np.full((layers, layers, 2, 1), np.inf)
    cost[0, 0, 0, 0] = cost[1, 1, 0, 0] = 1.0
    cost[0, 1, 1, 0] = 0.6  # cheaper as one 2-device stage ...
    inflight = np.full(cost.shape, 4)
    inflight[0, 1, 1, 0] = 0  # ... but does not fit even one micro-batch
    got = stage_dp(cost, cost, inflight, sizes, 2, b)
    assert [(s.start, s.stop) for s in got.stages] == [(0, 1), (1, 2)]
    inflight[0, 0, 0, 0] = 1  # now the first of two stages cannot hold its 2 micro-batches
    assert stage_dp(cost, cost, inflight, sizes, 2, b) is None
    inflight[0, 1, 1, 0] = 1  # a single stage only ever holds one
    got = stage_dp(cost, cost, inflight, sizes, 2, b)
    assert [(s.start, s.stop) for s in got.stages] == [(0, 2)]
