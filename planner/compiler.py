"""compile: model + cluster + options -> Plan (importer -> training -> layers -> intra-op ->
inter-op -> plan).

Methods share one pipeline:

- ``auto``: Alpa's two levels — per-layer ILPs on every (submesh, logical mesh), the stage DP
  over layer ranges and submeshes, micro-batch count searched when ``auto``;
- ``shard`` / ``data`` / ``zero2`` / ``zero3``: one stage on the whole cluster (``shard`` takes
  the best logical mesh shape; the others force their strategies in the same ILP);
- ``megatron``: dp x tp x pp fixed by hand — pp FLOP-balanced stages of equal submeshes, each
  a (dp, tp) logical mesh with tp inside a host.

The batch the model is bound with (``--dim batch=N``) is the global batch unless
``--global-batch`` says otherwise; the planner plans one micro-batch graph (batch / B).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from cost_models.cluster import Cluster
from cost_models.compute import op_time, peak_flops
from planner import __version__
from planner.errors import UserError
from planner.flops import node_bytes, node_flops
from planner.graph import UPDATES_KEY, Role, itemsize, nbytes, role_of, shape_of, values_of
from planner.importer import ImportOptions, import_model, load_model, structure_hash
from planner.intra_op import IntraOpSolution
from planner.layers import Layer, assign_layers, phase_of
from planner.mesh import LogicalMesh, make_mesh
from planner.plan_schema import (
    Alternative,
    Collective,
    IlpStats,
    LogicalMeshPlan,
    ModelIdentity,
    NodePlan,
    Options,
    Plan,
    Predicted,
    Producer,
    SolverStats,
    StageMemory,
    StagePlan,
    StagePrediction,
    Submesh,
    TrainingConfig,
    Transfer,
)
from planner.precision import retype_activations
from planner.sharding import ShardingSpec, resharding_cost
from planner.stage_costs import RangeCosts, StageCostModel, crossing_bytes, range_costs
from planner.stage_dp import StageChoice, stage_dp
from planner.strategies import Strategy
from planner.training import TrainingOptions, build_training_step

METHODS = ("auto", "shard", "data", "zero2", "zero3", "megatron")
BASELINES = ("data", "zero2", "zero3")  # single-stage methods auto also prices
MAX_MICROBATCH_CANDIDATES = 4
ALTERNATIVES_KEPT = 3


@dataclass(frozen=True)
class CompileOptions:
    method: str = "auto"
    mode: str = "train"
    dtype: str = "float32"  # compute precision planned for (planner.precision)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    global_batch: int | None = None
    microbatches: int | None = None  # None = auto
    schedule: str = "1f1b"
    layers: int | None = None  # None = auto
    megatron: tuple[int, int, int] | None = None  # dp, tp, pp
    time_limit: float = 20.0
    logical_mesh: tuple[int, ...] | None = None  # shard: force this view of the cluster


@dataclass(frozen=True)
class StagePick:
    """A stage as chosen: layer range, device ids and logical mesh."""

    start: int
    stop: int
    devices: tuple[int, ...]
    mesh: LogicalMesh


@dataclass
class Candidate:
    """One micro-batch count, fully planned."""

    microbatches: int
    graph: ir.Graph
    model: ir.Model
    import_options: ImportOptions
    layers: list[Layer]
    costs: StageCostModel
    stages: list[StagePick]
    latency: float
    dp_optimum: float | None
    peak_memory: float


@dataclass
class CompileResult:
    plan: Plan
    timings: dict[str, float]
    solves: int


# ---------------------------------------------------------------------------------------------
# Batch and micro-batches


def _batch_binding(path: str, options: ImportOptions) -> tuple[int, str | None]:
    """(bound batch, symbolic name of the batch dim or None when it is static)."""
    graph = load_model(path).graph
    first = graph.inputs[0]
    if first.name in options.input_shapes:
        return options.input_shapes[first.name][0], None
    dim = first.shape[0] if first.shape is not None and len(first.shape) else None
    if isinstance(dim, int):
        return dim, None
    name = dim.value if dim is not None else None
    if name is None or name not in options.dims:
        raise UserError(f"bind the batch dim of input {first.name!r}: --dim {name or 'batch'}=N")
    return options.dims[name], name


def _microbatch_candidates(
    global_batch: int, bound: int, symbolic: bool, requested: int | None
) -> list[int]:
    if not symbolic:  # the exported graph is one micro-batch; its batch cannot change
        if global_batch % bound:
            raise UserError(
                f"--global-batch {global_batch} is not a multiple of the model's "
                f"static batch {bound}: export with a dynamic batch dim"
            )
        count = global_batch // bound
        if requested not in (None, count):
            raise UserError(
                f"the model's batch dim is static ({bound}), so --global-batch "
                f"{global_batch} means {count} micro-batches, not {requested}"
            )
        return [count]
    if requested is not None:
        if requested < 1 or global_batch % requested:
            raise UserError(
                f"--microbatches {requested} must divide the global batch {global_batch}"
            )
        return [requested]
    powers = [m for m in (2**k for k in range(20)) if m <= global_batch and global_batch % m == 0]
    if len(powers) <= MAX_MICROBATCH_CANDIDATES:
        return powers
    picks = np.unique(np.round(np.linspace(0, len(powers) - 1, MAX_MICROBATCH_CANDIDATES)))
    return [powers[int(i)] for i in picks]


def _microbatch_import(
    path: str, options: ImportOptions, batch_name: str | None, micro: int
) -> ImportOptions:
    if batch_name is None:
        return options
    return ImportOptions(
        dims={**options.dims, batch_name: micro}, input_shapes=dict(options.input_shapes)
    )


# ---------------------------------------------------------------------------------------------
# Submeshes and logical meshes


def submesh_shapes(cluster: Cluster) -> list[tuple[int, int]]:
    """(1, 2^k) inside a host and (2^k, M) whole hosts plus the whole cluster (Alpa §2.3,
    "power_of_two"): any exact cover of these tiles the cluster."""
    m = cluster.devices_per_host
    inside = sorted({*(2**k for k in range(int(math.log2(m)) + 1)), m})
    shapes = [(1, d) for d in inside if d <= m]
    hosts = sorted({*(2**k for k in range(1, int(math.log2(cluster.hosts)) + 1)), cluster.hosts})
    shapes += [(n, m) for n in hosts if n > 1]
    return shapes


def canonical_devices(cluster: Cluster, shape: tuple[int, int]) -> tuple[int, ...]:
    hosts, per_host = shape
    return tuple(h * cluster.devices_per_host + d for h in range(hosts) for d in range(per_host))


def mesh_configs(cluster: Cluster, devices: tuple[int, ...]) -> list[LogicalMesh]:
    """1-D view plus 2-D (dp, mp) views with the model-parallel axis inside a host."""
    n = len(devices)
    meshes = [make_mesh(cluster, devices, (n,))]
    for a in range(2, n):
        if n % a == 0 and n // a <= cluster.devices_per_host:
            meshes.append(make_mesh(cluster, devices, (a, n // a)))
    return meshes


def place_stages(cluster: Cluster, shapes: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    """Concrete device ids for stage submeshes: whole hosts first, then packed inside hosts."""
    free = {h: list(range(cluster.devices_per_host)) for h in range(cluster.hosts)}
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0], -shapes[i][1], i))
    placed: dict[int, tuple[int, ...]] = {}
    for i in order:
        hosts, per_host = shapes[i]
        if hosts > 1 or per_host == cluster.devices_per_host:
            chosen = [h for h in sorted(free) if len(free[h]) == cluster.devices_per_host][:hosts]
            placed[i] = tuple(h * cluster.devices_per_host + d for h in chosen for d in free.pop(h))
        else:
            host = min(
                (h for h in sorted(free) if len(free[h]) >= per_host),
                key=lambda h: (len(free[h]), h),
            )
            take, free[host] = free[host][:per_host], free[host][per_host:]
            placed[i] = tuple(host * cluster.devices_per_host + d for d in take)
            if not free[host]:
                free.pop(host)
    return [placed[i] for i in range(len(shapes))]


# ---------------------------------------------------------------------------------------------
# Planning one micro-batch count


def _memory_limit(cluster: Cluster) -> float:
    return cluster.device.memory_bytes


def _max_inflight(rc: RangeCosts, limit: float) -> np.ndarray:
    free = limit - rc.static_memory - rc.transient_memory
    with np.errstate(divide="ignore", invalid="ignore"):
        count = np.where(rc.stash_memory > 0, np.floor(free / rc.stash_memory), 1e6)
    count = np.where(free >= 0, count, -1)
    return np.where(np.isfinite(rc.per_microbatch), count, -1).astype(np.int64)


def _plan_auto(
    costs: StageCostModel, cluster: Cluster, cut: np.ndarray, microbatches: int
) -> tuple[list[StagePick], float] | None:
    num = len(costs.layers)
    shapes = submesh_shapes(cluster)
    flops = np.array([layer.flops for layer in costs.layers])
    total = flops.sum() or 1.0
    configs = [mesh_configs(cluster, canonical_devices(cluster, s)) for s in shapes]
    width = max(len(c) for c in configs)
    stage = np.full((num, num, len(shapes), width), np.inf)
    summed = np.full_like(stage, np.inf)
    step = np.full_like(stage, np.inf)
    added = np.full_like(stage, np.inf)
    inflight = np.full(stage.shape, -1, dtype=np.int64)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    part = (prefix[None, 1:] - prefix[:-1, None]) / total  # FLOP share of layers i..j
    whole = np.zeros((num, num), dtype=bool)
    whole[0, num - 1] = True
    for m, (shape, meshes) in enumerate(zip(shapes, configs, strict=True)):
        share = shape[0] * shape[1] / cluster.num_devices
        # Alpa's stage-imbalance pruning: a stage's FLOP share within 4x of its device share;
        # the whole cluster only ever runs the whole model.
        keep = whole if share == 1.0 else ((part >= share / 4) & (part <= share * 4) | (num <= 2))
        for c, mesh in enumerate(meshes):
            rc = range_costs(costs, mesh, cut)
            # the DP's t_max term is the steady state's: a micro-batch and its gradient addition
            stage[:, :, m, c] = np.where(keep, rc.per_microbatch + rc.accumulate, np.inf)
            summed[:, :, m, c] = np.where(keep, rc.per_microbatch + rc.per_step, np.inf)
            step[:, :, m, c] = np.where(keep, rc.per_step, np.inf)
            added[:, :, m, c] = np.where(keep, rc.accumulate, np.inf)
            inflight[:, :, m, c] = np.where(keep, _max_inflight(rc, _memory_limit(cluster)), -1)

    def exact(choices: list[StageChoice]) -> float:
        at = [(c.start, c.stop - 1, c.submesh, c.config) for c in choices]
        return pipeline_time([(stage[k] - added[k], step[k], added[k]) for k in at], microbatches)

    result = stage_dp(
        stage,
        summed,
        inflight,
        [a * b for a, b in shapes],
        cluster.num_devices,
        microbatches,
        score=exact,
    )
    if result is None:
        return None
    devices = place_stages(cluster, [shapes[s.submesh] for s in result.stages])
    picks = [
        _pick(s, devs, configs[s.submesh][s.config], cluster)
        for s, devs in zip(result.stages, devices, strict=True)
    ]
    return picks, result.latency


def _pick(
    choice: StageChoice, devices: tuple[int, ...], canonical: LogicalMesh, cluster: Cluster
) -> StagePick:
    mesh = make_mesh(cluster, devices, canonical.shape)
    return StagePick(choice.start, choice.stop, devices, mesh)


def _single_stage(
    costs: StageCostModel,
    cluster: Cluster,
    cut: np.ndarray,
    microbatches: int,
    method: str,
    shape: tuple[int, ...] | None = None,
) -> tuple[list[StagePick], float]:
    """The whole cluster as one stage: ``shape`` when given, else the best logical mesh
    (``shard``) or the 1-D view (data, zero2, zero3)."""
    devices = tuple(range(cluster.num_devices))
    if shape is not None:
        meshes = [make_mesh(cluster, devices, shape)]
    elif method == "shard":
        meshes = mesh_configs(cluster, devices)
    else:
        meshes = [make_mesh(cluster, devices, (len(devices),))]
    num = len(costs.layers)
    best = None
    for mesh in meshes:
        rc = range_costs(costs, mesh, cut)
        last = (0, num - 1)
        t = pipeline_time(
            [(rc.per_microbatch[last], rc.per_step[last], rc.accumulate[last])], microbatches
        )
        if best is None or t < best[1] - 1e-15:
            best = (mesh, t)
    mesh, t = best
    return [StagePick(0, num, devices, mesh)], t


def _uniform_stages(layers: list[Layer], pp: int) -> list[tuple[int, int]]:
    flops = np.cumsum([layer.flops for layer in layers])
    bounds = [0]
    for k in range(1, pp):
        target = flops[-1] * k / pp
        b = int(np.searchsorted(flops, target)) + 1
        bounds.append(min(max(b, bounds[-1] + 1), len(layers) - (pp - k)))
    bounds.append(len(layers))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _megatron_stages(
    costs: StageCostModel, cluster: Cluster, dp: int, tp: int, pp: int, free: bool = False
) -> list[StagePick]:
    """pp FLOP-balanced stages of dp x tp devices. ``free``: the stage meshes are solved
    without Megatron's forcing (auto's own candidates), so a trivial axis is dropped."""
    d = cluster.num_devices
    if dp * tp * pp != d:
        raise UserError(
            f"--dp {dp} x --tp {tp} x --pp {pp} = {dp * tp * pp}, but the cluster has {d} devices"
        )
    if tp > cluster.devices_per_host or cluster.devices_per_host % tp:
        raise UserError(f"--tp {tp} must divide the {cluster.devices_per_host} devices of a host")
    if pp > len(costs.layers):
        raise UserError(f"--pp {pp} exceeds the {len(costs.layers)} layers: pass --layers {pp}")
    per_stage = d // pp
    picks = []
    for s, (start, stop) in enumerate(_uniform_stages(costs.layers, pp)):
        devices = tuple(range(s * per_stage, (s + 1) * per_stage))
        shape = (dp, tp)  # axis 0 data parallel, axis 1 tensor parallel (either may be 1)
        if free and 1 in shape:
            shape = (dp * tp,)
        picks.append(StagePick(start, stop, devices, make_mesh(cluster, devices, shape)))
    return picks


def megatron_grid(cluster: Cluster, num_layers: int) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with dp*tp*pp = devices, tp dividing a host, pp <= layers."""
    grid = []
    for tp in range(1, cluster.devices_per_host + 1):
        if cluster.devices_per_host % tp:
            continue
        for pp in range(1, min(num_layers, cluster.num_devices // tp) + 1):
            if (cluster.num_devices // tp) % pp == 0:
                grid.append((cluster.num_devices // (tp * pp), tp, pp))
    return grid


def pipeline_time(times: list[tuple[float, float, float]], microbatches: int) -> float:
    """T = sum t + (B-1) max (t + a) + max u over stages of (t per micro-batch, u per step,
    a per gradient addition): the first micro-batch crosses every stage, the other B - 1
    pass the slowest one at its steady rate (each adding its gradients), and the updates
    run once per step, in parallel."""
    steady = max(t + a for t, _, a in times)
    return sum(t for t, _, _ in times) + (microbatches - 1) * steady + max(u for _, u, _ in times)


def _pipeline_latency(
    costs: StageCostModel, picks: list[StagePick], cut: np.ndarray, microbatches: int
) -> tuple[float, list[tuple[float, float, float]]]:
    """Iteration seconds, and (per micro-batch, per step, gradient addition) of each stage."""
    times = []
    for p in picks:
        rc = range_costs(costs, p.mesh, cut)
        i, j = p.start, p.stop - 1
        times.append((rc.per_microbatch[i, j], rc.per_step[i, j], rc.accumulate[i, j]))
    return pipeline_time(times, microbatches), times


def stage_peaks(
    costs: StageCostModel, picks: list[StagePick], cut: np.ndarray, microbatches: int
) -> list[float]:
    """Per-device peak bytes of each stage: state + in-flight stashes (1F1B) + working set."""
    peaks = []
    for s, p in enumerate(picks):
        rc = range_costs(costs, p.mesh, cut)
        i, j = p.start, p.stop - 1
        inflight = min(len(picks) - s, microbatches)
        peaks.append(
            float(
                rc.static_memory[i, j]
                + inflight * rc.stash_memory[i, j]
                + rc.transient_memory[i, j]
            )
        )
    return peaks


# ---------------------------------------------------------------------------------------------
# A planning session: graphs and layer solves shared by every method and grid point


@dataclass
class Prepared:
    """The micro-batch graph for one micro-batch count, clustered into layers."""

    microbatches: int
    import_options: ImportOptions
    model: ir.Model
    graph: ir.Graph
    layers: list[Layer]
    cut: np.ndarray
    costs: dict[str, StageCostModel] = field(default_factory=dict)


class Session:
    """Plans one model on one cluster; caches graphs per micro-batch count and layer solves
    per intra-op method, so `compare` prices dozens of configurations for a few ILPs."""

    def __init__(
        self,
        path: str,
        import_options: ImportOptions,
        cluster: Cluster,
        opts: CompileOptions,
        progress: Callable[[], None] | None = None,
    ) -> None:
        if opts.method not in METHODS:
            raise UserError(f"unknown --method {opts.method!r}: use one of {', '.join(METHODS)}")
        _check_logical_mesh(opts, cluster)
        self.path, self.cluster, self.opts, self.progress = path, cluster, opts, progress
        self.import_options = import_options
        bound, self.batch_name = _batch_binding(path, import_options)
        self.bound = bound
        self.global_batch = opts.global_batch or bound
        self.counts = _microbatch_candidates(
            self.global_batch, bound, self.batch_name is not None, opts.microbatches
        )
        self._prepared: dict[int, Prepared] = {}

    def prepared(self, count: int) -> Prepared:
        if count not in self._prepared:
            micro = self.global_batch // count if self.batch_name else self.bound
            options = _microbatch_import(self.path, self.import_options, self.batch_name, micro)
            model = import_model(self.path, options)
            graph = (
                build_training_step(model, self.opts.training)
                if self.opts.mode == "train"
                else model
            ).graph
            retype_activations(graph, self.opts.dtype)
            layers = assign_layers(graph, self.opts.layers)
            self._prepared[count] = Prepared(
                count, options, model, graph, layers, crossing_bytes(graph, layers)
            )
        return self._prepared[count]

    def costs(self, prep: Prepared, method: str) -> StageCostModel:
        if method not in prep.costs:
            prep.costs[method] = StageCostModel(
                prep.graph,
                prep.layers,
                self.cluster,
                method=method,
                time_limit=self.opts.time_limit,
                progress=self.progress,
                step_weight=1.0 / prep.microbatches,
                memory_price=memory_price(prep.graph, self.cluster),
            )
        return prep.costs[method]

    def solves(self) -> int:
        return sum(c.solves for p in self._prepared.values() for c in p.costs.values())

    def plan(
        self, method: str, count: int, megatron: tuple[int, int, int] | None = None
    ) -> Candidate | None:
        """The best plan for one method and micro-batch count; None if nothing fits."""
        prep = self.prepared(count)
        intra = {"auto": "shard"}.get(method, method)
        costs = self.costs(prep, intra)
        dp_optimum = None
        if method == "auto":
            found = _plan_auto(costs, self.cluster, prep.cut, count)
            if found is None:
                return None
            picks, dp_optimum = found
        elif method == "megatron":
            picks = _megatron_stages(costs, self.cluster, *megatron)
        else:
            shape = self.opts.logical_mesh
            picks, _ = _single_stage(costs, self.cluster, prep.cut, count, method, shape)
        latency, _ = _pipeline_latency(costs, picks, prep.cut, count)
        peak = max(stage_peaks(costs, picks, prep.cut, count))
        if method == "auto":  # uniform (Megatron-shaped) stagings are in auto's space too
            for point in megatron_grid(self.cluster, len(prep.layers)):
                grid = _megatron_stages(costs, self.cluster, *point, free=True)
                t, _ = _pipeline_latency(costs, grid, prep.cut, count)
                if t < latency - 1e-15:
                    grid_peak = max(stage_peaks(costs, grid, prep.cut, count))
                    if grid_peak <= self.cluster.device.memory_bytes:
                        picks, latency, peak = grid, t, grid_peak
            # and so are the hand-written methods' plans, which the shard ILP can miss: it
            # merges followers into their operand's group (as Alpa does), a heuristic that
            # the methods' filters change the outcome of
            for base in BASELINES:
                other = self.plan(base, count)
                if (
                    other is not None
                    and other.latency < latency - 1e-15
                    and other.peak_memory <= self.cluster.device.memory_bytes
                ):
                    costs, picks, latency, peak = (
                        other.costs,
                        other.stages,
                        other.latency,
                        other.peak_memory,
                    )
        return Candidate(
            count,
            prep.graph,
            prep.model,
            prep.import_options,
            prep.layers,
            costs,
            picks,
            latency,
            dp_optimum,
            peak,
        )

    def best(
        self, method: str, megatron: tuple[int, int, int] | None = None
    ) -> tuple[Candidate | None, float]:
        """Best feasible candidate over the micro-batch counts, and the least memory any
        candidate needed (for the does-not-fit message)."""
        best, need = None, math.inf
        for count in self.counts:
            cand = self.plan(method, count, megatron)
            if cand is None:
                need = min(need, self._least_memory(count))
                continue
            need = min(need, cand.peak_memory)
            if cand.peak_memory > self.cluster.device.memory_bytes:
                continue
            if best is None or cand.latency < best.latency - 1e-15:
                best = cand
        return best, need

    def _least_memory(self, count: int) -> float:
        """Memory of the whole model fully sharded (zero3) over the whole cluster."""
        prep = self.prepared(count)
        costs = self.costs(prep, "zero3")
        picks, _ = _single_stage(costs, self.cluster, prep.cut, count, "zero3")
        return max(stage_peaks(costs, picks, prep.cut, count))


def _check_logical_mesh(opts: CompileOptions, cluster: Cluster) -> None:
    shape = opts.logical_mesh
    if shape is None:
        return
    if opts.method != "shard":
        raise UserError(
            f"--logical-mesh applies to --method shard (one stage on the whole cluster), not "
            f"--method {opts.method}: drop --logical-mesh or use --method shard"
        )
    if math.prod(shape) != cluster.num_devices or len(shape) > 2:
        raise UserError(
            f"--logical-mesh {'x'.join(map(str, shape))} does not cover the cluster's "
            f"{cluster.num_devices} devices: use a 1-D or 2-D shape whose product is "
            f"{cluster.num_devices}"
        )


def memory_price(graph: ir.Graph, cluster: Cluster) -> float:
    """Objective seconds per stored byte: the fraction of the whole cluster's memory that the
    training state needs (parameters, gradients, optimizer state) per byte of one device.
    Negligible for models far smaller than the cluster, decisive for ones that barely fit."""
    state = sum(
        nbytes(v)
        for v in values_of(graph)
        if role_of(v) in (Role.PARAM, Role.GRAD, Role.OPT_STATE)
        and UPDATES_KEY not in v.metadata_props
    )
    pressure = state / (cluster.num_devices * cluster.device.memory_bytes)
    return pressure / cluster.device.memory_bytes


def does_not_fit(need: float, cluster: Cluster) -> UserError:
    gib = 2**30
    return UserError(
        f"does not fit: needs {need / gib:.1f} GiB per device, has "
        f"{cluster.device.memory_bytes / gib:.1f} GiB: use more or larger devices, a smaller "
        "batch, or more micro-batches"
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def compile_plan(
    path: str,
    import_options: ImportOptions,
    cluster: Cluster,
    opts: CompileOptions,
    progress: Callable[[], None] | None = None,
) -> CompileResult:
    import time

    if opts.method == "megatron" and opts.megatron is None:
        raise UserError("--method megatron needs --dp A --tp B --pp C")
    start = time.perf_counter()
    session = Session(path, import_options, cluster, opts, progress)
    best, need = session.best(opts.method, opts.megatron)
    if best is None:
        raise does_not_fit(need, cluster)
    plan = build_plan(path, best, cluster, opts, session.global_batch)
    return CompileResult(plan, {"total_s": time.perf_counter() - start}, session.solves())


# ---------------------------------------------------------------------------------------------
# Plan assembly


def _alternatives(chosen, candidates) -> list[Alternative]:
    others = sorted(
        (s for s in candidates if s.name != chosen.name), key=lambda s: (s.cost, s.name)
    )
    return [Alternative(strategy=s.name, cost=s.cost) for s in others[:ALTERNATIVES_KEPT]]


def _collectives(strategy) -> list[Collective]:
    out = []
    for c in strategy.collectives:
        index = int(c.tensor[3:]) if c.tensor.startswith("out") else 0
        out.append(
            Collective(
                kind=c.kind,
                axes=list(c.axes),
                reduce=c.reduce_op,
                dim=c.dim,
                output=index,
                bytes=int(c.nbytes),
                seconds=c.seconds,
            )
        )
    return out


def _input_resharding(
    node: ir.Node,
    strategy: Strategy,
    produced: dict[str, ShardingSpec],
    sol: IntraOpSolution,
    rep_inputs: list,
    mesh: LogicalMesh,
) -> float:
    """Seconds of the conversions the executor runs into ``node``'s inputs: from the spec a
    value is made in (by its producer in this stage, or stored, for parameters and optimizer
    state) to the one ``strategy`` reads it as. Edges inside a layer and between layers alike
    (the layer ILPs price the first, the stage costs the second); values from another stage
    arrive in the reader's spec (their transfer is priced apart)."""
    seconds = 0.0
    for slot, value in enumerate(node.inputs):
        dst = strategy.inputs[slot] if slot < len(strategy.inputs) else None
        if value is None or dst is None:
            continue
        src = produced.get(value.name)
        if src is None and role_of(value) in (Role.PARAM, Role.OPT_STATE):
            src = sol.specs[rep_inputs[slot].name]
        if src is not None and src != dst:
            seconds += resharding_cost(src, dst, shape_of(value), itemsize(value.dtype), mesh)[0]
    return seconds


def _spec_text(spec) -> str | None:
    return None if spec is None else str(spec)


def build_plan(
    path: str, cand: Candidate, cluster: Cluster, opts: CompileOptions, global_batch: int
) -> Plan:
    from pathlib import Path

    graph, costs = cand.graph, cand.costs
    stage_of_layer = {}
    for s, pick in enumerate(cand.stages):
        for layer in range(pick.start, pick.stop):
            stage_of_layer[layer] = s
    stage_of_node = {name: stage_of_layer[costs.layer_of[name]] for name in costs.layer_of}
    cut = crossing_bytes(graph, cand.layers)
    peaks = stage_peaks(costs, cand.stages, cut, cand.microbatches)
    _, times = _pipeline_latency(costs, cand.stages, cut, cand.microbatches)
    stages: list[StagePlan] = []
    ilps: list[IlpStats] = []
    seen_solutions: set[int] = set()
    for s, pick in enumerate(cand.stages):
        nodes: dict[str, NodePlan] = {}
        produced: dict[str, ShardingSpec] = {}  # this stage's values, as their producers make them
        params: dict[str, str] = {}
        inputs: dict[str, str] = {}
        outputs: dict[str, str] = {}
        for node in graph:
            if stage_of_node[node.name] != s:
                continue
            layer_sol = costs.layer(costs.layer_of[node.name], pick.mesh)
            sol = layer_sol.solution
            if id(sol) not in seen_solutions:
                seen_solutions.add(id(sol))
                st = sol.stats
                ilps.append(
                    IlpStats(
                        stage=s,
                        objective=st.objective,
                        bound=st.lp_bound,
                        gap=st.mip_gap,
                        variables=st.num_vars,
                        constraints=st.num_constraints,
                        status=st.status,
                    )
                )
            rep = layer_sol.node_map[node.name]
            strategy = sol.strategies[rep]
            rep_inputs = costs.nodes[rep].inputs
            nodes[node.name] = NodePlan(
                op=node.op_type,
                strategy=strategy.name,
                inputs=[_spec_text(x) for x in strategy.inputs],
                outputs=[str(x) for x in strategy.outputs],
                collectives=_collectives(strategy),
                local=None if strategy.local_kind == "plain" else strategy.local_kind,
                replicated_fallback=strategy.replicated_fallback,
                compute=strategy.compute,
                communication=strategy.comm,
                resharding=_input_resharding(node, strategy, produced, sol, rep_inputs, pick.mesh),
                alternatives=_alternatives(strategy, sol.alternatives[rep]),
            )
            produced.update(zip((o.name for o in node.outputs), strategy.outputs, strict=True))
            for slot, value in enumerate(node.inputs):
                if value is None:
                    continue
                producer = value.producer()
                if role_of(value) in (Role.PARAM, Role.OPT_STATE):
                    # the tensor's own (stored) spec, not what this consumer reads it as
                    params.setdefault(value.name, str(sol.specs[rep_inputs[slot].name]))
                elif producer is None or stage_of_node[producer.name] != s:
                    inputs.setdefault(value.name, str(strategy.inputs[slot]))
            for j, out in enumerate(node.outputs):
                readers = {stage_of_node[u.node.name] for u in out.uses()}
                if readers - {s} or out in graph.outputs:
                    outputs[out.name] = str(strategy.outputs[j])
        rc = range_costs(costs, pick.mesh, cut)
        i, j = pick.start, pick.stop - 1
        inflight = min(len(cand.stages) - s, cand.microbatches)
        memory = _stage_memory(costs, pick, inflight * rc.stash_memory[i, j], peaks[s])
        stages.append(
            StagePlan(
                index=s,
                layers=list(range(pick.start, pick.stop)),
                submesh=Submesh(
                    hosts=sorted({cluster.host_of(d) for d in pick.devices}),
                    devices=list(pick.devices),
                ),
                logical_mesh=LogicalMeshPlan(
                    shape=list(pick.mesh.shape), device_ids=_mesh_rows(pick.mesh)
                ),
                nodes=nodes,
                params=params,
                inputs=inputs,
                outputs=outputs,
                compute=float(rc.compute[i, j]),
                communication=float(rc.communication[i, j]),
                memory=memory,
            )
        )
    transfers = _transfers(graph, cand, stage_of_node, cluster)
    predicted = _predict(graph, cand, cluster, opts, times, stages)
    model_file = Path(path).name
    bound = {v.name: list(shape_of(v)) for v in cand.model.graph.inputs}
    return Plan(
        producer=Producer(version=__version__),
        model=ModelIdentity(
            file=model_file,
            structure_sha256=structure_hash(cand.model),
            dims=dict(cand.import_options.dims),
            input_shapes=bound,
        ),
        cluster=cluster.model_dump(mode="json"),
        options=Options(
            method=opts.method,
            mode=opts.mode,
            dtype=opts.dtype,
            training=_training_config(opts) if opts.mode == "train" else None,
            global_batch=global_batch,
            microbatches=cand.microbatches,
            schedule=opts.schedule,
            layers=len(cand.layers),
            megatron=dict(zip(("dp", "tp", "pp"), opts.megatron, strict=True))
            if opts.megatron
            else None,
        ),
        solver=SolverStats(ilps=ilps, dp_optimum=cand.dp_optimum),
        stages=stages,
        transfers=transfers,
        predicted=predicted,
    )


def _stage_memory(
    costs: StageCostModel, pick: StagePick, activations: float, peak: float
) -> StageMemory:
    """The stage's stored state split into parameters, gradients and optimizer state."""
    totals = {"params": 0.0, "grads": 0.0, "opt_state": 0.0}
    for layer in range(pick.start, pick.stop):
        mem = costs.layer(layer, pick.mesh).solution.memory
        for key in totals:
            totals[key] += mem[key]
    return StageMemory(
        params=totals["params"],
        grads=totals["grads"],
        optimizer_state=totals["opt_state"],
        activations=float(activations),
        peak=peak,
    )


def _mesh_rows(mesh: LogicalMesh) -> list[list[int]]:
    ids = np.asarray(mesh.device_ids)
    return ids.reshape(-1, mesh.shape[-1]).tolist() if ids.ndim == 1 else ids.tolist()


def _training_config(opts: CompileOptions) -> TrainingConfig:
    t = opts.training
    return TrainingConfig(
        loss=t.loss,
        labels=t.labels,
        optimizer=t.optimizer,
        lr=t.lr,
        beta1=t.beta1,
        beta2=t.beta2,
        eps=t.eps,
        weight_decay=t.weight_decay,
    )


def _transfers(
    graph: ir.Graph, cand: Candidate, stage_of_node: dict[str, int], cluster: Cluster
) -> list[Transfer]:
    from cost_models.collectives import send_recv
    from planner.graph import nbytes

    out: list[Transfer] = []
    costs = cand.costs
    for node in graph:
        src = stage_of_node[node.name]
        for j, value in enumerate(node.outputs):
            src_spec = costs.strategy(node.name, cand.stages[src].mesh).outputs[j]
            dests: dict[int, str] = {}
            for use in value.uses():
                dst = stage_of_node[use.node.name]
                if dst != src and dst not in dests:
                    spec = costs.strategy(use.node.name, cand.stages[dst].mesh).inputs[use.idx]
                    dests[dst] = str(spec)
            for dst, spec in sorted(dests.items()):
                link = cluster.inter_host if cluster.hosts > 1 else cluster.intra_host
                size = nbytes(value)
                out.append(
                    Transfer(
                        tensor=value.name,
                        src_stage=src,
                        dst_stage=dst,
                        src_spec=str(src_spec),
                        dst_spec=spec,
                        bytes=int(size),
                        seconds=send_recv(
                            size / len(cand.stages[dst].devices),
                            link.latency,
                            link.bandwidth,
                            cluster.device.dispatch_latency,
                        ),
                    )
                )
    return out


def _predict(
    graph: ir.Graph,
    cand: Candidate,
    cluster: Cluster,
    opts: CompileOptions,
    times: list[tuple[float, float, float]],
    stages: list[StagePlan],
) -> Predicted:
    b = cand.microbatches
    iteration = pipeline_time(times, b)
    flops = 0.0
    lower = 0.0
    for node in graph:
        repeat = 1 if phase_of(node) == "update" else b
        f = node_flops(node)
        flops += repeat * f
        lower += repeat * op_time(f, node_bytes(node), cluster.device, opts.dtype)
    lower /= cluster.num_devices
    updates = {node.name for node in graph if phase_of(node) == "update"}
    predictions = []
    for stage, (t, u, add) in zip(stages, times, strict=True):
        # the update's compute runs once per step (in u), the rest once per micro-batch (in t);
        # B - 1 gradient additions count as compute
        once = sum(n.compute for name, n in stage.nodes.items() if name in updates)
        compute = min(t, stage.compute - once)
        busy = b * t + (b - 1) * add + u
        predictions.append(
            StagePrediction(
                compute=b * compute + (b - 1) * add + min(u, once),
                communication=b * (t - compute) + max(0.0, u - once),
                bubble=max(0.0, iteration - busy),
            )
        )
    mfu = (
        flops / (iteration * cluster.num_devices * peak_flops(cluster.device, opts.dtype))
        if iteration > 0
        else 0.0
    )
    return Predicted(
        iteration_time=iteration,
        stages=predictions,
        peak_memory_per_device=max(s.memory.peak for s in stages),
        device_memory=cluster.device.memory_bytes,
        mfu=mfu,
        compute_lower_bound=lower,
        ratio_to_lower_bound=iteration / lower if lower > 0 else 0.0,
    )
