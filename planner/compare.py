"""`alpa-plan compare`: every method, and the whole Megatron grid, under one cost model.

One planning session prices them all, so the layer ILPs are shared: data, ZeRO-2, ZeRO-3,
intra-op only (shard), Alpa's auto plan, and every Megatron-LM point dp x tp x pp x
micro-batches (tp inside a host, pp <= layers), of which the best feasible one is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cost_models.cluster import Cluster
from cost_models.compute import peak_flops
from planner.compiler import Candidate, CompileOptions, Session, megatron_grid
from planner.flops import node_flops
from planner.importer import ImportOptions
from planner.layers import phase_of

SINGLE_METHODS = ("data", "zero2", "zero3", "shard", "auto")


@dataclass(frozen=True)
class Row:
    method: str
    configuration: str
    iteration_time: float | None  # seconds
    peak_memory: float | None  # bytes per device
    mfu: float | None
    feasible: bool


def _mfu(cand: Candidate, cluster: Cluster, dtype: str) -> float:
    flops = sum(
        node_flops(n) * (1 if phase_of(n) == "update" else cand.microbatches) for n in cand.graph
    )
    return flops / (cand.latency * cluster.num_devices * peak_flops(cluster.device, dtype))


def _config(cand: Candidate) -> str:
    meshes = ", ".join(f"{len(p.devices)}dev {p.mesh.describe()}" for p in cand.stages)
    return f"{len(cand.stages)} stage(s) [{meshes}], {cand.microbatches} micro-batches"


def _row(
    method: str,
    cand: Candidate | None,
    need: float,
    cluster: Cluster,
    dtype: str,
    config: str | None = None,
) -> Row:
    if cand is None:
        return Row(method, f"needs {need / 2**30:.1f} GiB/device", None, need, None, False)
    return Row(
        method,
        config or _config(cand),
        cand.latency,
        cand.peak_memory,
        _mfu(cand, cluster, dtype),
        True,
    )


def compare(
    path: str, import_options: ImportOptions, cluster: Cluster, opts: CompileOptions
) -> list[Row]:
    session = Session(path, import_options, cluster, opts)
    rows = [_row(m, *session.best(m), cluster, opts.dtype) for m in SINGLE_METHODS]
    best: tuple[float, Candidate, tuple] | None = None
    points = 0
    for point in megatron_grid(cluster, len(session.prepared(session.counts[0]).layers)):
        for count in session.counts:
            cand = session.plan("megatron", count, point)
            points += 1
            if cand.peak_memory > cluster.device.memory_bytes:
                continue
            if best is None or cand.latency < best[0] - 1e-15:
                best = (cand.latency, cand, point)
    if best is None:
        rows.append(
            Row(f"megatron (best of {points})", "no grid point fits", None, None, None, False)
        )
    else:
        _, cand, (dp, tp, pp) = best
        config = f"dp={dp} tp={tp} pp={pp}, {cand.microbatches} micro-batches"
        rows.append(_row(f"megatron (best of {points})", cand, 0.0, cluster, opts.dtype, config))
    return rows


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
