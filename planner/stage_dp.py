"""Stage construction DP (Alpa §2.2): slice L layers into pipeline stages on submeshes.

Minimises the paper's pipeline latency T* = sum_i t_i + (B - 1) * max_i t_i over
  - contiguous layer ranges [i, j] as stages,
  - a submesh per stage from the families (1, 2^k) inside a host and (n, M) whole hosts,
    using exactly all devices,
  - a logical-mesh configuration per stage (the cheapest feasible one at that t_max),
  - memory: a stage with s stages from it to the end keeps min(s, B) micro-batches of
    activations alive under 1F1B, so it needs s <= max_inflight[i, j, m, c].

For each candidate t_max (ascending; stop once (B-1)·t_max alone exceeds the best T) a DP
F[s, i, d] = min over (k, m, c) of cost[i, k-1, m, c] + F[s-1, k, d - n_m] gives the least
sum of stage costs; candidates are all distinct stage costs, thinned geometrically (ratio
``T_MAX_RATIO``) when there are too many — the only approximation, stated in the plan notes.
Everything is numpy-vectorised over (i, k, d): the inner step is a min-plus product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

T_MAX_RATIO = 1.01
MAX_T_MAX_CANDIDATES = 400


@dataclass(frozen=True)
class StageChoice:
    start: int  # first layer
    stop: int  # one past the last layer
    submesh: int  # index into the submesh list
    config: int  # index of the logical-mesh configuration


@dataclass(frozen=True)
class DPResult:
    latency: float  # T*
    stages: tuple[StageChoice, ...]
    t_max: float


def _candidates(costs: np.ndarray) -> np.ndarray:
    values = np.unique(costs[np.isfinite(costs)])
    if len(values) <= MAX_T_MAX_CANDIDATES:
        return values
    keep, last = [], -np.inf
    for v in values:
        if v > last * T_MAX_RATIO:
            keep.append(v)
            last = v
    if keep[-1] != values[-1]:
        keep.append(values[-1])
    return np.array(keep)


def stage_dp(
    stage_cost: np.ndarray,
    sum_cost: np.ndarray,
    max_inflight: np.ndarray,
    submesh_sizes: list[int],
    num_devices: int,
    microbatches: int,
    score: Callable[[list[StageChoice]], float] | None = None,
) -> DPResult | None:
    """Best pipeline, or None when no assignment fits in memory.

    stage_cost[i, j, m, c]: per-micro-batch latency of layers i..j on submesh m with logical
    configuration c (inf where impossible); sum_cost: what the stage adds to the sum term
    (stage_cost plus its once-per-step work); max_inflight: micro-batches of activations the
    stage can hold. ``score`` re-prices each t_max's solution exactly (e.g. with the
    once-per-step work as a max over stages rather than a sum) and picks by that.
    """
    num_layers = stage_cost.shape[0]
    sizes = np.asarray(submesh_sizes)
    max_stages = min(num_layers, num_devices)
    best: DPResult | None = None
    candidates = _candidates(stage_cost)
    if (
        len(candidates) == 0
        or _min_devices(stage_cost, max_inflight, sizes, candidates[-1]) > num_devices
    ):
        return None
    # Feasibility is monotone in t_max: skip the infeasible prefix by bisection.
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _min_devices(stage_cost, max_inflight, sizes, candidates[mid]) <= num_devices:
            hi = mid
        else:
            lo = mid + 1
    for t_max in candidates[lo:]:
        if best is not None and (microbatches - 1) * t_max >= best.latency:
            break
        result = _dp_for_t_max(
            stage_cost,
            sum_cost,
            max_inflight,
            sizes,
            num_devices,
            t_max,
            max_stages,
            microbatches,
        )
        if result is None:
            continue
        total, stages = result
        real_max = max(stage_cost[s.start, s.stop - 1, s.submesh, s.config] for s in stages)
        latency = score(stages) if score else total + (microbatches - 1) * real_max
        if best is None or latency < best.latency - 1e-12:
            best = DPResult(latency=float(latency), stages=tuple(stages), t_max=float(t_max))
    return best


def _min_devices(stage_cost, max_inflight, sizes, t_max) -> float:
    """Fewest devices covering all layers with every stage cost <= t_max (a lower bound)."""
    num_layers = stage_cost.shape[0]
    usable = ((stage_cost <= t_max) & (max_inflight >= 1)).any(axis=3)  # (i, j, m)
    dev = np.where(usable, sizes[None, None, :], np.inf).min(axis=2)  # (i, j)
    need = np.full(num_layers + 1, np.inf)
    need[num_layers] = 0
    for i in range(num_layers - 1, -1, -1):
        need[i] = np.min(dev[i, i:] + need[i + 1 :])
    return need[0]


def _dp_for_t_max(
    stage_cost, sum_cost, max_inflight, sizes, num_devices, t_max, max_stages, microbatches
):
    num_layers = stage_cost.shape[0]
    allowed_t = stage_cost <= t_max
    inf = np.inf
    # F[i, d]: least sum cost for layers i.. on d devices with s stages; F_prev for s - 1.
    prev = np.full((num_layers + 1, num_devices + 1), inf)
    prev[num_layers, 0] = 0.0
    best_total, best_s = inf, None
    history = []
    for s in range(1, max_stages + 1):
        ok = allowed_t & (max_inflight >= min(s, microbatches))
        eff = np.where(ok, sum_cost, inf)  # (i, j, m, c)
        cfg = np.argmin(eff, axis=3)  # cheapest configuration per (i, j, m)
        e = np.take_along_axis(eff, cfg[..., None], axis=3)[..., 0]  # (i, j, m)
        cur = np.full_like(prev, inf)
        arg = np.full((num_layers + 1, num_devices + 1, 2), -1, dtype=np.int64)
        for m, n in enumerate(sizes):
            if n > num_devices:
                continue
            shifted = np.full_like(prev, inf)
            shifted[:, n:] = prev[:, : num_devices + 1 - n]  # F[s-1, k, d - n]
            # cand[i, k, d] = e[i, k-1, m] + shifted[k, d] for k in 1..L
            cand = e[:, :, m][:, :, None] + shifted[1:, :][None, :, :]
            k_best = np.argmin(cand, axis=1)  # (i, d) -> k - 1
            val = np.take_along_axis(cand, k_best[:, None, :], axis=1)[:, 0, :]
            better = val < cur[:num_layers] - 1e-15
            cur[:num_layers] = np.where(better, val, cur[:num_layers])
            arg[:num_layers, :, 0] = np.where(better, k_best + 1, arg[:num_layers, :, 0])
            arg[:num_layers, :, 1] = np.where(better, m, arg[:num_layers, :, 1])
        history.append((arg, cfg))
        if cur[0, num_devices] < best_total - 1e-15:
            best_total, best_s = cur[0, num_devices], s
        if not np.isfinite(cur).any():
            break
        prev = cur
    if best_s is None:
        return None
    stages, i, d = [], 0, num_devices
    for s in range(best_s, 0, -1):
        arg, cfg = history[s - 1]
        k, m = int(arg[i, d, 0]), int(arg[i, d, 1])
        stages.append(StageChoice(i, k, m, int(cfg[i, k - 1, m])))
        i, d = k, d - int(sizes[m])
    return float(best_total), stages
