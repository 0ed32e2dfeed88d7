"""From plan + training graph to one rank's program: local subgraphs split at communication.

For the rank's stage, the nodes of each phase (forward, backward, update) are walked in plan
order. Each node becomes its *local* version: shape-carrying constant inputs (Reshape/Expand
shape, ConstantOfShape, Split sizes) are rewritten to the block shapes the specs imply,
other constants are sliced to the spec the node wants, and ``vocab_parallel`` lookups and
scatter-adds get the offset-and-mask program. Consecutive nodes without communication between
them form one onnxruntime session; a session ends where an input needs resharding, where the
node's strategy performs collectives, and at phase boundaries, except that where the
schedule runs every micro-batch's backward right after its forward (a single stage, 1F1B's
last stage) the forward program carries the backward and their sessions meet in one.

Final gradients whose collectives are linear (sum/mean all-reduce, reduce-scatter,
all-gather) and that only the update phase reads are accumulated *before* those collectives,
which then run once per step on the accumulated sum (Alpa's skipped grad-sync channels). So
do the all-reduces and reduce-scatters of a partial sum that a reshape alone turns into such a
gradient (restated for the reshape's dims), and the loss's all-reduces (the loss is only
reported: they run on the micro-batches' mean, in the gradients' buckets).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from planner.errors import UserError
from planner.graph import (
    LOSS_SEED,
    PHASE_KEY,
    UPDATES_KEY,
    Role,
    const_array,
    gradient_reshape,
    is_zeros,
    loss_chain,
    passes_sums,
    role_of,
    shape_of,
    summed_into_gradient,
)
from planner.plan_schema import Collective, NodePlan, Plan, StagePlan
from planner.sharding import ShardingSpec, local_shape
from runtime import reshard
from runtime.mesh import RankMesh, check_fits, shard
from runtime.pipeline import schedule
from runtime.precision import HALF, half_precision
from runtime.transfer import Piece, pieces

PHASES = ("forward", "backward", "update")
# (op, input index) whose constant holds the node's output shape (or split sizes).
SHAPE_INPUTS = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Split", 1)}
LINEAR = {"sum", "mean", None}
VOCAB_OPS = {"Gather": 0, "ScatterND": 0, "ScatterElements": 0}  # op -> table input


def parse(text: str) -> ShardingSpec:
    try:
        return ShardingSpec.parse(text)
    except ValueError as exc:
        raise UserError(f"plan has a bad sharding spec: {exc}") from None


def same(a: ShardingSpec, b: ShardingSpec) -> bool:
    return a.dims == b.dims and set(a.partial) == set(b.partial)


class Session(Protocol):
    """What the executor needs of a session: ``ort.InferenceSession`` on CPU ranks,
    ``runtime.cuda.CudaSession`` (arrays stay on the GPU) on GPUs."""

    def run(self, outputs: Sequence[str], feeds: Mapping[str, Any]) -> list[Any]: ...


@dataclass
class Segment:
    """Consecutive local nodes run as one onnxruntime session."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    produced: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    session: Session | None = None


@dataclass
class Run:
    segment: Segment


@dataclass
class Reshard:
    src: str
    dst: str
    steps: list[reshard.Step]


@dataclass
class CollectiveOp:
    kind: str
    group: tuple[int, ...]
    reduce: str
    dim: int | None


@dataclass
class Collect:
    key: str
    ops: list[CollectiveOp]


@dataclass
class Send:
    key: str
    tag: int
    pieces: list[Piece]


@dataclass
class Recv:
    key: str
    tag: int
    pieces: list[Piece]
    shape: tuple[int, ...]
    dtype: np.dtype
    zero: list[reshard.Step]  # partial axes of the destination spec


Instr = Run | Reshard | Collect | Send | Recv


@dataclass
class GradAccumulator:
    key: str
    deferred: list[CollectiveOp]
    spec: ShardingSpec  # after the deferred collectives


@dataclass
class StageProgram:
    """Everything one rank executes; built identically on every rank of the stage."""

    stage: int
    mesh: RankMesh
    device: int
    programs: dict[str, list[Instr]]
    state_specs: dict[str, ShardingSpec]
    data_specs: dict[str, ShardingSpec]
    grads: list[GradAccumulator]
    loss: str | None
    assigns: list[tuple[str, str]]  # (key after the update, state input it replaces)
    segments: list[Segment]
    # the loss's all-reduces, run once per step on the micro-batches' mean (as sums, then
    # divided by ``loss_divisor``: they share the gradients' buckets)
    loss_sync: list[CollectiveOp] = field(default_factory=list)
    loss_divisor: int = 1
    half: bool = False  # float16 sessions and loss scaling (``runtime.precision``)
    loss_seed: np.ndarray | None = None  # fed as LOSS_SEED times the loss scale, when half

    @property
    def owned_specs(self) -> dict[str, ShardingSpec]:
        """The state this stage keeps and updates; the rest is a per-step copy of another
        stage's (see ``StageBuilder._borrowed``), so only these are saved or compared."""
        borrowed = {i.key for i in self.programs["prologue"] if isinstance(i, Recv)}
        return {k: v for k, v in self.state_specs.items() if k not in borrowed}


def kept_dim(before: Sequence[int], after: Sequence[int], d: int | None) -> int | None:
    """The dim of a reshape's result that holds dim ``d`` of its input whole (the same
    elements before it and the same size), if any: a split along it survives the reshape."""
    if d is None:
        return None
    lead, seen = math.prod(before[:d]), 1
    for j, n in enumerate(after):
        if seen == lead and n == before[d]:
            return j
        seen *= n
    return None


def unscattered(spec: ShardingSpec, cs: Sequence[Collective]) -> ShardingSpec:
    """``spec`` before its reduce-scatters: their dims unsplit on their axes (local shapes
    only; the partial sum they complete is the deferred collectives' business)."""
    dims = [list(d) for d in spec.dims]
    for c in cs:
        if c.kind == "reduce_scatter" and c.dim is not None:
            dims[c.dim] = [a for a in dims[c.dim] if a not in c.axes]
    return ShardingSpec(tuple(tuple(d) for d in dims), spec.partial)


def _without(spec: ShardingSpec, axes: frozenset[int]) -> ShardingSpec:
    """``spec`` with no dim split over ``axes``."""
    return ShardingSpec(
        tuple(tuple(a for a in d if a not in axes) for d in spec.dims), spec.partial
    )


def stage_of_device(plan: Plan, device: int) -> StagePlan | None:
    for stage in plan.stages:
        if device in stage.submesh.devices:
            return stage
    return None


def node_phases(graph: ir.Graph) -> dict[str, str]:
    phases = {}
    for node in graph:
        phase = node.metadata_props.get(PHASE_KEY)
        if phase not in PHASES:
            raise UserError(
                f"training graph node {node.name!r} has no alpa.phase: rebuild it "
                "with this alpa-plan"
            )
        phases[node.name or ""] = phase
    return phases


def check_coverage(plan: Plan, graph: ir.Graph) -> None:
    """Every non-Constant node in exactly one stage, every planned node in the graph."""
    names = {n.name for n in graph}
    owner: dict[str, int] = {}
    for stage in plan.stages:
        for name in stage.nodes:
            if name not in names:
                raise UserError(
                    f"plan stage {stage.index} names node {name!r}, which the "
                    "rebuilt training graph lacks: recompile the plan"
                )
            if name in owner:
                raise UserError(
                    f"node {name!r} is planned in stages {owner[name]} and "
                    f"{stage.index}: recompile the plan"
                )
            owner[name] = stage.index
    missing = [n.name for n in graph if n.name not in owner and n.op_type != "Constant"]
    if missing:
        raise UserError(
            f"plan does not place {len(missing)} training-graph nodes, first "
            f"{missing[0]!r}: recompile the plan"
        )


def _constant_node_value(node: ir.Node) -> np.ndarray:
    for key, attr in node.attributes.items():
        if key == "value":
            return attr.value.numpy()
        if key in ("value_float", "value_int", "value_floats", "value_ints"):
            dtype = np.float32 if "float" in key else np.int64
            return np.array(attr.value, dtype=dtype)
    raise UserError(f"Constant node {node.name!r} has no numeric value")


def session_options() -> ort.SessionOptions:
    """The ranks of one host share its cores: each gets its fair share of intra-op threads
    (``ALPA_ORT_THREADS`` overrides), and threads sleep instead of spinning, because a
    spinning pool steals the cores of the ranks it waits for."""
    opts = ort.SessionOptions()
    local_ranks = int(os.environ.get("MPI_LOCALNRANKS", "1"))
    fair = max(1, (os.cpu_count() or 1) // max(local_ranks, 1))
    opts.intra_op_num_threads = int(os.environ.get("ALPA_ORT_THREADS", str(fair)))
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def cpu_session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


class StageBuilder:
    """Builds the ``StageProgram`` of one rank (see the module docstring)."""

    def __init__(
        self,
        model: ir.Model,
        plan: Plan,
        device: int,
        make_session: Callable[[bytes], Session],
    ):
        self.model = model
        self.plan = plan
        self.device = device
        self.make_session = make_session
        self.half = plan.options.dtype == HALF
        stage = stage_of_device(plan, device)
        assert stage is not None
        self.stage = stage
        self.mesh = RankMesh.from_plan(stage.logical_mesh)
        graph = model.graph
        self.phase = node_phases(graph)
        self.nodes = {n.name: n for n in graph}
        self.values: dict[str, ir.Value] = {}
        for node in graph:
            for v in node.outputs:
                if v.name:
                    self.values[v.name] = v
        for v in graph.inputs:
            self.values[v.name or ""] = v
        self.consts: dict[str, np.ndarray] = {}
        for name, v in graph.initializers.items():
            array = const_array(v)
            if array is None:
                raise UserError(f"constant {name!r} of the training graph has no data")
            self.consts[name] = array
            self.values[name] = v
        for node in graph:
            if node.op_type == "Constant":
                self.consts[node.outputs[0].name or ""] = _constant_node_value(node)
        self.updates = {
            v.metadata_props[UPDATES_KEY]: v.name or ""
            for v in graph.outputs
            if v.metadata_props.get(UPDATES_KEY)
        }
        self.inputs = [v.name or "" for v in graph.inputs]  # ordered: ranks iterate alike
        self.state_names = {
            v.name or ""
            for v in graph.inputs
            if role_of(v) in (Role.PARAM, Role.OPT_STATE) or v.name in self.updates
        }
        self.spec: dict[str, ShardingSpec] = {}
        self.segments: list[Segment] = []
        self.graph_outputs = {v.name for v in graph.outputs}
        self._carried: dict[str, list[Collective]] = {}  # reshape -> deferred collectives
        self._partial: dict[str, tuple[CollectiveOp, ...]] = {}  # see _summed_partials
        self._unscattered: dict[str, tuple[list, ShardingSpec]] = {}  # and there
        self.loss_sync: list[CollectiveOp] = []
        self.loss_divisor = 1

    # -- tensor facts -------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        return shape_of(self.values[name])

    def dtype(self, name: str) -> ir.DataType:
        dtype = self.values[name].dtype
        if dtype is None:
            raise UserError(f"tensor {name!r} of the training graph has no dtype")
        return dtype

    def local(self, name: str, spec: ShardingSpec) -> tuple[int, ...]:
        check_fits(spec, self.shape(name), self.mesh.shape)
        return local_shape(self.shape(name), spec, self.mesh.shape)

    def group(self, axes: list[int]) -> tuple[int, ...]:
        return tuple(self.mesh.group(self.device, axes))

    # -- build ----------------------------------------------------------------------------

    def _first_use(self, stage: StagePlan) -> dict[str, tuple[str, ShardingSpec]]:
        """Phase and wanted spec of the first read of each tensor ``stage``'s nodes read."""
        first_use: dict[str, tuple[str, ShardingSpec]] = {}
        for name in self._planned(stage):
            node, np_ = self.nodes[name], stage.nodes[name]
            for v, want in zip(node.inputs, np_.inputs, strict=False):
                if v is not None and v.name not in first_use and want is not None:
                    first_use[v.name or ""] = (self.phase[name], parse(want))
        return first_use

    def _planned(self, stage: StagePlan) -> list[str]:
        # graph order, not the plan's: canonical plan JSON sorts the keys of ``nodes``
        return [
            n.name or ""
            for n in self.model.graph
            if n.name in stage.nodes and n.op_type != "Constant"
        ]

    def _input_specs(self, stage: StagePlan) -> dict[str, ShardingSpec]:
        """Spec of every graph input ``stage`` reads: stored (params) or first wanted."""
        first_use = self._first_use(stage)
        out = {}
        for name in self.inputs:
            if name in first_use:
                given = (
                    stage.params.get(name) if name in self.state_names else stage.inputs.get(name)
                )
                out[name] = parse(given) if given is not None else first_use[name][1]
        return out

    def _owners(self) -> dict[str, int]:
        """State name -> the stage that updates it (where the tensor lives)."""
        stage_of = {n: s.index for s in self.plan.stages for n in s.nodes}
        out = {}
        for state, new in self.updates.items():
            producer = self.values[new].producer() if new in self.values else None
            if producer is not None and producer.name in stage_of:
                out[state] = stage_of[producer.name or ""]
        return out

    def _borrowed(self) -> list[Instr]:
        """Step prologue for state a stage reads but another stage updates (a tied weight
        whose consumers landed on two stages): the owner sends its current value, the reader
        receives it into its state, once per step. Every rank derives the same list."""
        owners = self._owners()
        me = self.stage.index
        out: list[Instr] = []
        tag = len(self.plan.transfers)
        for stage in self.plan.stages:
            specs = self._input_specs(stage)
            for name in self.inputs:
                owner = owners.get(name)
                if name not in self.state_names or name not in specs:
                    continue
                if owner is None or owner == stage.index:
                    continue
                tag += 1
                if me not in (owner, stage.index):
                    continue
                src = self.plan.stages[owner]
                ps = pieces(
                    self.shape(name),
                    self._input_specs(src)[name],
                    RankMesh.from_plan(src.logical_mesh),
                    specs[name],
                    RankMesh.from_plan(stage.logical_mesh),
                )
                if me == owner:
                    out.append(Send(name, tag, [p for p in ps if p.src == self.device]))
                else:
                    out.append(
                        Recv(
                            name,
                            tag,
                            [p for p in ps if p.dst == self.device],
                            self.local(name, specs[name]),
                            self.dtype(name).numpy(),
                            [],
                        )
                    )
        return out

    def build(self) -> StageProgram:
        stage = self.stage
        planned = self._planned(stage)
        first_use = self._first_use(stage)
        state_specs: dict[str, ShardingSpec] = {}
        data_specs: dict[str, ShardingSpec] = {}
        for name, spec in self._input_specs(stage).items():
            check_fits(spec, self.shape(name), self.mesh.shape)
            (state_specs if name in self.state_names else data_specs)[name] = spec
            self.spec[name] = spec
        for name, spec in state_specs.items():
            if spec.partial:
                raise UserError(
                    f"parameter/state {name!r} has partial spec {spec} in stage "
                    f"{stage.index}: recompile the plan"
                )
        recvs = self._receives(first_use)
        sends = self._sends()
        self._partial = self._summed_partials(planned, sends)
        programs: dict[str, list[Instr]] = {"prologue": self._borrowed()}
        grads: list[GradAccumulator] = []
        for phase in PHASES:
            if phase == "update":  # a new scope: microbatch reshards are gone
                self._done = set()
            else:
                self._done = getattr(self, "_done", set()) if phase == "backward" else set()
            instrs: list[Instr] = [r for r in recvs if first_use[r.key][0] == phase]
            for r in instrs:
                self._done.add(r.key)
            nodes = [n for n in planned if self.phase[n] == phase]
            instrs += self._phase(nodes, sends, grads)
            programs[phase] = instrs
        loss = self.model.graph.outputs[0].name or ""
        loss_here = loss in self.spec
        assigns = []
        for state, out in self.updates.items():
            if out in self.spec and state in state_specs:
                key = self._convert(out, state_specs[state], programs["update"])
                assigns.append((key, state))
        if self._backward_follows_forward():
            programs["forward"] += programs["backward"]
            programs["backward"] = []
        programs = {phase: self._fuse(instrs) for phase, instrs in programs.items()}
        self.segments = [i.segment for p in programs.values() for i in p if isinstance(i, Run)]
        self._finish(programs, grads, loss if loss_here else None, assigns)
        return StageProgram(
            stage.index,
            self.mesh,
            self.device,
            programs,
            state_specs,
            data_specs,
            grads,
            loss if loss_here else None,
            assigns,
            self.segments,
            self.loss_sync,
            self.loss_divisor,
            self.half,
            self._seed(),
        )

    def _seed(self) -> np.ndarray | None:
        """The backward seed's value on this rank, when a session reads it as an input."""
        if not any(LOSS_SEED in seg.inputs for seg in self.segments):
            return None
        return self.consts[LOSS_SEED]

    def _backward_follows_forward(self) -> bool:
        """Whether this stage's schedule runs every micro-batch's backward right after its
        forward (a single stage, the last stage of 1F1B, or one micro-batch): then the forward
        program carries the backward too and its last session fuses with the backward's
        first, so the activations between them stay inside onnxruntime instead of being
        returned to Python and fed back."""
        tasks = schedule(
            self.plan.options.schedule,
            self.stage.index,
            len(self.plan.stages),
            self.plan.options.microbatches,
        )
        return all(tasks[i + 1] == ("B", m) for i, (task, m) in enumerate(tasks) if task == "F")

    def _fuse(self, instrs: list[Instr]) -> list[Instr]:
        """Adjacent segments (nothing runs between them, e.g. a node whose gradient
        collective is deferred to the step's end closed the first) become one session: every
        session call costs a fixed dispatch the step pays per micro-batch."""
        out: list[Instr] = []
        for ins in instrs:
            if isinstance(ins, Run) and out and isinstance(out[-1], Run):
                into, seg = out[-1].segment, ins.segment
                into.nodes += seg.nodes
                into.initializers.update(seg.initializers)
                into.produced += seg.produced
            else:
                out.append(ins)
        return out

    def _convert(self, name: str, want: ShardingSpec, out: list[Instr]) -> str:
        """Key of ``name`` under ``want``, appending a Reshard to ``out`` when needed."""
        return self._reshard(name, want, out, in_session=False)[0]

    def _reshard(
        self, name: str, want: ShardingSpec, out: list[Instr], in_session: bool
    ) -> tuple[str, Segment | None]:
        """Key of ``name`` under ``want``: a Reshard appended to ``out`` runs its collectives;
        ``in_session``: its local steps (slices, zeros) come back as nodes for the session
        that reads the key, instead of numpy calls between sessions."""
        have = self.spec[name]
        if same(have, want):
            return name, None
        key = f"{name}@{want}"
        if key in self._done:
            return key, None
        self._done.add(key)
        shape = self.local(name, want)
        steps = reshard.program(have, want)
        collective, local = reshard.split(steps) if in_session else (steps, [])
        if not local:
            out.append(Reshard(name, key, steps))
            return key, None
        src = name
        if collective:
            src = f"{key}/collectives"
            out.append(Reshard(name, src, collective))
        nodes, consts = reshard.local_nodes(
            local, src, key, shape, self.dtype(name).numpy(), self.mesh, self.device
        )
        return key, Segment(nodes, consts, produced=[key])

    def _receives(self, first_use) -> list[Recv]:
        out = []
        for index, t in enumerate(self.plan.transfers):
            if t.dst_stage != self.stage.index or t.tensor not in first_use:
                continue
            src = self.plan.stages[t.src_stage]
            src_spec, dst_spec = parse(t.src_spec), parse(t.dst_spec)
            plain = ShardingSpec(dst_spec.dims)
            shape = self.shape(t.tensor)
            ps = pieces(
                shape,
                ShardingSpec(src_spec.dims),
                RankMesh.from_plan(src.logical_mesh),
                plain,
                self.mesh,
            )
            self.spec[t.tensor] = dst_spec
            out.append(
                Recv(
                    t.tensor,
                    index,
                    [p for p in ps if p.dst == self.device],
                    self.local(t.tensor, plain),
                    self.dtype(t.tensor).numpy(),
                    reshard.program(plain, dst_spec),
                )
            )
        return out

    def _sends(self) -> dict[str, list[tuple[int, ShardingSpec, list[Piece]]]]:
        out: dict[str, list[tuple[int, ShardingSpec, list[Piece]]]] = {}
        for index, t in enumerate(self.plan.transfers):
            if t.src_stage != self.stage.index:
                continue
            dst = self.plan.stages[t.dst_stage]
            src_spec, dst_spec = parse(t.src_spec), parse(t.dst_spec)
            ps = pieces(
                self.shape(t.tensor),
                ShardingSpec(src_spec.dims),
                self.mesh,
                ShardingSpec(dst_spec.dims),
                RankMesh.from_plan(dst.logical_mesh),
            )
            mine = [p for p in ps if p.src == self.device]
            out.setdefault(t.tensor, []).append((index, ShardingSpec(src_spec.dims), mine))
        return out

    def _phase(self, names: list[str], sends, grads: list[GradAccumulator]) -> list[Instr]:
        instrs: list[Instr] = []
        seg = Segment()
        pre: list[Instr] = []
        pending_sends: list[str] = []

        def close(then: list[Instr] | None = None) -> None:
            """End the segment; ``then`` (a node's collectives) runs before the sends, which
            must carry the collectives' results."""
            nonlocal seg, pre
            instrs.extend(pre)
            if seg.nodes:
                instrs.append(Run(seg))
                self.segments.append(seg)
            instrs.extend(then or [])
            for tensor in pending_sends:
                instrs.extend(self._send_instrs(tensor, sends[tensor]))
            pending_sends.clear()
            seg, pre = Segment(), []

        for name in names:
            node, np_ = self.nodes[name], self.stage.nodes[name]
            final = None  # a carried reshape's gradient spec, after its deferred collectives
            if name in self._carried:
                final = parse(np_.outputs[0])
                before = unscattered(final, self._carried[name])
                src = self.spec[node.inputs[0].name or ""]
                inputs = [str(src), *np_.inputs[1:]]
                np_ = np_.model_copy(update={"inputs": inputs, "outputs": [str(before)]})
            elif name in self._unscattered:  # its partial sum is reduce-scattered at the end
                final = parse(np_.outputs[0])
                inputs, before = self._unscattered[name]
                np_ = np_.model_copy(update={"inputs": inputs, "outputs": [str(before)]})
            if len(np_.outputs) != len(node.outputs):
                raise UserError(
                    f"plan for node {name!r} lists {len(np_.outputs)} output specs, "
                    f"the node has {len(node.outputs)}: recompile the plan"
                )
            keys: list[str] = []
            reshards: list[Instr] = []
            consts: dict[str, np.ndarray] = {}  # added once the node's segment is known
            for i, v in enumerate(node.inputs):
                if v is None:
                    keys.append("")
                    continue
                vname = v.name or ""
                want = np_.inputs[i] if i < len(np_.inputs) else None
                if self.half and vname == LOSS_SEED:  # fed, times the loss scale
                    keys.append(LOSS_SEED)
                    continue
                if vname in self.consts and vname not in self.spec:
                    key = f"{node.name}/const{i}"
                    consts[key] = self._constant(node, np_, i, vname)
                    keys.append(key)
                    continue
                if vname not in self.spec:
                    raise UserError(
                        f"node {name!r} of stage {self.stage.index} reads {vname!r}, which no "
                        "earlier node, stage input or transfer provides: recompile the plan"
                    )
                if want is None:
                    keys.append(vname)
                    continue
                before = len(reshards)
                key, part = self._reshard(vname, parse(want), reshards, in_session=True)
                if len(reshards) > before and vname in seg.produced:
                    close()
                if part is not None:
                    seg.nodes += part.nodes
                    seg.initializers.update(part.initializers)
                    seg.produced += part.produced
                keys.append(key)
            pre.extend(reshards)
            seg.initializers.update(consts)
            for v, out_spec in zip(node.outputs, np_.outputs, strict=True):
                if v.name:
                    self.spec[v.name] = parse(out_spec)
            seg.nodes.extend(self._local_nodes(seg, node, np_, keys))
            seg.produced.extend(v.name for v in node.outputs if v.name)
            for v in node.outputs:
                if v.name in sends:
                    pending_sends.append(v.name)
            if np_.collectives:
                close(self._collects(node, np_, grads, sends))
            else:
                for v in node.outputs:
                    if v.name and role_of(v) is Role.GRAD and self.phase[name] == "backward":
                        ops = [self._collective_op(node, c) for c in self._carried.pop(name, [])]
                        ops = ops or list(self._partial.get(v.name, ()))
                        if final is not None:  # what the update reads, once synchronised
                            self.spec[v.name] = final
                        grads.append(GradAccumulator(v.name, ops, self.spec[v.name]))
        close()
        return instrs

    def _summed_partials(self, planned: list[str], sends) -> dict[str, tuple[CollectiveOp, ...]]:
        """Backward values whose planned all-reduces wait for the step's end, in the
        gradients' bucketed sync, as the planner prices them (``summed_into_gradient``): the
        ops between run on this rank's partial sums and pass them on. Every op such a value
        reaches must take the same partial sums in every input that sums (a scatter-add's
        base may be zeros instead), arrive without resharding, split nothing over the sums'
        mesh axes, run its plain local program and no collectives of its own, up to
        gradients that only the update reads. Value -> the collectives it still needs; the
        nodes of gradients reduce-scattered instead go to ``_unscattered``."""
        # value -> (collectives, their mesh axes, the unsplit spec a reduce-scattered
        # gradient's node computes instead of its planned one)
        partial: dict[
            str, tuple[tuple[CollectiveOp, ...], frozenset[int], ShardingSpec | None]
        ] = {}
        for name in planned:
            node, np_ = self.nodes[name], self.stage.nodes[name]
            if self.phase[name] != "backward":
                continue
            if np_.collectives:
                for j, v in enumerate(node.outputs):
                    cs = [c for c in np_.collectives if c.output == j]
                    if (
                        cs
                        and all(c.kind == "all_reduce" and c.reduce == "sum" for c in cs)
                        and role_of(v) is not Role.GRAD
                        and summed_into_gradient(v)
                    ):
                        ops = tuple(self._collective_op(node, c) for c in cs)
                        axes = frozenset(a for c in cs for a in c.axes)
                        partial[v.name or ""] = (ops, axes, None)
            elif len(node.outputs) == 1 and (carried := self._passed_on(node, np_, partial)):
                partial[node.outputs[0].name or ""] = carried
        changed = True
        while changed:  # drop what a non-summing reader, a send or a dropped addend would see
            changed = False
            for key in list(partial):
                v = self.values[key]
                readers = [u for u, _ in v.uses()]
                if role_of(v) is Role.GRAD:
                    keep = all(self.phase.get(u.name or "") == "update" for u in readers)
                else:
                    keep = all(u.outputs[0].name in partial for u in readers)
                producer = v.producer()
                if (
                    keep
                    and producer is not None
                    and not self.stage.nodes[producer.name or ""].collectives
                ):
                    np_ = self.stage.nodes[producer.name or ""]
                    keep = self._passed_on(producer, np_, partial) == partial[key]
                if not keep or key in sends:
                    del partial[key]
                    changed = True
        self._unscattered = {
            self.values[key].producer().name or "": before
            for key, (_, _, before) in partial.items()
            if before is not None
        }
        return {key: ops for key, (ops, _, _) in partial.items()}

    def _passed_on(self, node: ir.Node, np_: NodePlan, partial):
        """What ``node``'s output carries (as the values of ``partial``) when the partial sums
        ``partial`` pass through it (see ``_summed_partials``), or None. A gradient split over
        the sums' mesh axes (ZeRO) is computed unsplit there and reduce-scattered at the end."""
        carried, specs = None, [parse(t) if t else None for t in np_.inputs]
        for i, x in enumerate(node.inputs):
            if x is None:
                continue
            mine = partial.get(x.name or "")
            summing = passes_sums(node, i)
            if mine is None:
                if summing and not (i == 0 and node.op_type.startswith("Scatter") and is_zeros(x)):
                    return None
                continue
            if not summing or (carried is not None and mine[:2] != carried[:2]):
                return None
            carried = mine
        if carried is None or np_.local is not None:
            return None
        ops, axes, _ = carried
        out = parse(np_.outputs[0])
        scatter = bool(out.used_axes() & axes)
        if scatter:
            split = [d for d, on in enumerate(out.dims) if set(on) & axes]
            if role_of(node.outputs[0]) is not Role.GRAD or len(ops) != 1 or len(split) != 1:
                return None
            if out.partial or out.dims[split[0]] != tuple(sorted(axes)):
                return None
            specs = [None if t is None else _without(t, axes) for t in specs]
        for i, x in enumerate(node.inputs):
            spec = specs[i] if i < len(specs) else None
            if x is None or spec is None:
                continue
            if spec.used_axes() & axes:
                return None
            if (x.name or "") in partial:
                src = x.producer()
                assert src is not None  # partial sums are made by this stage's nodes
                have = self.stage.nodes[src.name or ""].outputs[x.index() or 0]
                if not same(parse(have), spec):
                    return None
        if not scatter:
            return ops, axes, None
        # the gradient's node computes it unsplit; its sum is reduce-scattered at the end
        rs = (CollectiveOp("reduce_scatter", ops[0].group, "sum", split[0]),)
        return rs, axes, ([None if t is None else str(t) for t in specs], _without(out, axes))

    def _send_instrs(self, tensor: str, items) -> list[Instr]:
        out: list[Instr] = []
        for index, src_plain, mine in items:
            key = self._convert(tensor, src_plain, out)
            out.append(Send(key, index, mine))
        return out

    def _reshaped_grad(
        self, v: ir.Value, cs: list[Collective], sends
    ) -> tuple[ir.Node, list[Collective]] | None:
        """The reshape that turns ``v`` into a gradient only the update reads, and ``v``'s
        collectives restated for that gradient, when they may as well run on it: a reshape
        commutes with a sum, and with a reduce-scatter along a dim it keeps whole, so they
        join the deferred, bucketed gradient sync instead of running every micro-batch
        (typically a bias or norm gradient: a ReduceSum's partial sum, reshaped)."""
        user = gradient_reshape(v)
        if user is None or v.name in sends:
            return None
        if not all(c.kind in ("all_reduce", "reduce_scatter") and c.reduce in LINEAR for c in cs):
            return None
        plan = self.stage.nodes.get(user.name or "")
        if plan is None or plan.collectives:
            return None
        if self.phase[user.name or ""] != "backward" or not plan.inputs or not plan.inputs[0]:
            return None
        if not same(parse(plan.inputs[0]), self.spec[v.name or ""]):
            return None  # a reshard in between would see the partial sums
        grad = user.outputs[0]
        if grad.name in sends or any(self.phase[u.name or ""] != "update" for u, _ in grad.uses()):
            return None
        mapped = []
        for c in cs:
            dim = c.dim
            if c.kind == "reduce_scatter":
                dim = kept_dim(self.shape(v.name or ""), self.shape(grad.name or ""), c.dim)
                if dim is None:
                    return None
            mapped.append(c.model_copy(update={"dim": dim}))
        return user, mapped

    def _collects(
        self, node: ir.Node, np_: NodePlan, grads: list[GradAccumulator], sends
    ) -> list[Instr]:
        by_output: dict[int, list[Collective]] = {}
        for c in np_.collectives:
            if c.output >= len(node.outputs):
                raise UserError(
                    f"plan for node {node.name!r} has a collective on output "
                    f"{c.output}, the node has {len(node.outputs)}"
                )
            by_output.setdefault(c.output, []).append(c)
        instrs: list[Instr] = []
        for j, cs in sorted(by_output.items()):
            v = node.outputs[j]
            ops = [self._collective_op(node, c) for c in cs]
            deferred = (
                role_of(v) is Role.GRAD
                and self.phase[node.name or ""] == "backward"
                and all(self.phase[u.name or ""] == "update" for u, _ in v.uses())
                and all(c.kind != "all_to_all" and c.reduce in LINEAR for c in cs)
            )
            if role_of(v) is Role.GRAD and self.phase[node.name or ""] == "backward":
                grads.append(
                    GradAccumulator(v.name or "", ops if deferred else [], self.spec[v.name or ""])
                )
            if deferred or self._defers_loss(node, v, ops, sends):
                continue
            through = self._reshaped_grad(v, cs, sends) if role_of(v) is not Role.GRAD else None
            if through is not None and self.phase[node.name or ""] == "backward":
                user, mapped = through
                self._carried[user.name or ""] = mapped
                # the reshape now runs on the partial sums, before any scatter
                self.spec[v.name or ""] = unscattered(self.spec[v.name or ""], cs)
            elif (v.name or "") not in self._partial:  # else they run with its gradients'
                instrs.append(Collect(v.name or "", ops))
        return instrs

    def _defers_loss(self, node: ir.Node, v: ir.Value, ops: list[CollectiveOp], sends) -> bool:
        """Whether ``v``'s all-reduces can wait for the step's end (see ``loss_chain``): the
        ops up to the loss then run on this rank's partial loss, which they keep linear, so
        they must not reshard it, communicate or send it on."""
        chain = loss_chain(v) if self.phase[node.name or ""] == "forward" else None
        if chain is None or any(op.kind != "all_reduce" or op.reduce not in LINEAR for op in ops):
            return False
        if any(x.name in sends for x in [v, *(n.outputs[0] for n in chain)]):
            return False
        have = self.spec[v.name or ""]
        for n in chain:
            np_ = self.stage.nodes.get(n.name or "")
            if np_ is None or np_.collectives or self.phase[n.name or ""] != "forward":
                return False
            if np_.inputs and np_.inputs[0] and not same(parse(np_.inputs[0]), have):
                return False
            have = parse(np_.outputs[0])
        self.loss_sync = [CollectiveOp(op.kind, op.group, "sum", None) for op in ops]
        self.loss_divisor = math.prod(len(op.group) for op in ops if op.reduce == "mean")
        return True

    def _collective_op(self, node: ir.Node, c: Collective) -> CollectiveOp:
        if c.kind == "all_to_all":
            raise UserError(
                f"node {node.name!r}: an all_to_all strategy collective needs "
                "source and target dims, which the plan schema does not carry"
            )
        if c.kind in ("all_gather", "reduce_scatter") and c.dim is None:
            raise UserError(f"node {node.name!r}: {c.kind} without a tensor dim in the plan")
        if any(a >= len(self.mesh.shape) for a in c.axes):
            raise UserError(
                f"node {node.name!r}: collective over mesh axes {c.axes} of a "
                f"{len(self.mesh.shape)}-D mesh"
            )
        return CollectiveOp(c.kind, self.group(c.axes), c.reduce or "sum", c.dim)

    # -- local nodes ----------------------------------------------------------------------

    def _constant(self, node: ir.Node, np_: NodePlan, i: int, name: str) -> np.ndarray:
        """This rank's local value of constant input ``i``."""
        array = self.consts[name]
        if (node.op_type, i) in SHAPE_INPUTS:
            array = self._local_shape_constant(node, np_, array)
        else:
            want = np_.inputs[i] if i < len(np_.inputs) else None
            if want is not None:
                spec = parse(want)
                check_fits(spec, array.shape, self.mesh.shape)
                array = shard(array, spec, self.mesh, self.device)
        return array

    def _local_shape_constant(self, node: ir.Node, np_: NodePlan, array: np.ndarray):
        if node.op_type == "Split":
            axis = node.attributes.get_int("axis", 0)
            return np.array(
                [
                    self.local(v.name or "", parse(s))[axis]
                    for v, s in zip(node.outputs, np_.outputs, strict=True)
                ],
                np.int64,
            )
        out = node.outputs[0].name or ""
        return np.array(self.local(out, parse(np_.outputs[0])), dtype=array.dtype)

    def _local_nodes(
        self, seg: Segment, node: ir.Node, np_: NodePlan, keys: list[str]
    ) -> list[onnx.NodeProto]:
        proto = ir.serde.serialize_node(node)
        del proto.metadata_props[:]
        proto.input[:] = keys
        if node.op_type == "Slice":
            self._check_slice(node, np_)
        if np_.local is None:
            return [proto]
        if np_.local != "vocab_parallel" or node.op_type not in VOCAB_OPS:
            raise UserError(
                f"node {node.name!r}: unknown local program {np_.local!r} for {node.op_type}"
            )
        return self._vocab_parallel(seg, node, np_, proto)

    def _check_slice(self, node: ir.Node, np_: NodePlan) -> None:
        """A slice along a split dim is only local when it keeps the whole dim."""
        src = node.inputs[0]
        want = np_.inputs[0] if np_.inputs else None
        if src is None or want is None:
            return
        spec = parse(want)
        in_shape, out_shape = self.shape(src.name or ""), self.shape(node.outputs[0].name or "")
        for d, axes in enumerate(spec.dims):
            if axes and in_shape[d] != out_shape[d]:
                raise UserError(
                    f"node {node.name!r} slices dim {d}, which the plan splits "
                    f"over mesh axes {list(axes)}: the executor cannot run that"
                )

    def _vocab_parallel(
        self, seg: Segment, node: ir.Node, np_: NodePlan, proto: onnx.NodeProto
    ) -> list[onnx.NodeProto]:
        """Rows of the table live split along dim 0: shift indices by this rank's first row,
        mask rows another rank holds (looked-up rows become 0, scattered updates vanish)."""
        table = node.inputs[VOCAB_OPS[node.op_type]]
        assert table is not None
        spec = parse(np_.inputs[0] or "")
        if node.attributes.get_int("axis", 0) != 0 or not spec.dims or not spec.dims[0]:
            raise UserError(
                f"node {node.name!r}: vocab_parallel needs axis 0 split over mesh "
                f"axes, the plan gives {spec}"
            )
        rows = self.local(table.name or "", spec)[0]
        offset = self.mesh.index(self.mesh.coords(self.device), spec.dims[0]) * rows
        idx_name = node.inputs[1].name if node.inputs[1] is not None else ""
        idx_dtype = self.dtype(idx_name or "").numpy()
        p = f"{node.name}/vp"
        seg.initializers[f"{p}/offset"] = np.array(offset, idx_dtype)
        seg.initializers[f"{p}/rows"] = np.array(rows, idx_dtype)
        seg.initializers[f"{p}/zero_i"] = np.array(0, idx_dtype)
        out_name = node.outputs[0].name or ""
        value_dtype = self.dtype(out_name).numpy()
        seg.initializers[f"{p}/zero_v"] = np.array(0, value_dtype)
        idx_key = proto.input[1]
        nodes = [
            helper.make_node("Sub", [idx_key, f"{p}/offset"], [f"{p}/shifted"]),
            helper.make_node("GreaterOrEqual", [f"{p}/shifted", f"{p}/zero_i"], [f"{p}/ge"]),
            helper.make_node("Less", [f"{p}/shifted", f"{p}/rows"], [f"{p}/lt"]),
            helper.make_node("And", [f"{p}/ge", f"{p}/lt"], [f"{p}/mask"]),
            helper.make_node("Where", [f"{p}/mask", f"{p}/shifted", f"{p}/zero_i"], [f"{p}/idx"]),
        ]
        idx_rank = len(self.shape(idx_name or ""))
        trailing = len(self.shape(table.name or "")) - 1
        mask = f"{p}/mask"
        if node.op_type == "ScatterND":  # indices [..., 1]: the mask drops the last dim
            nodes.append(helper.make_node("Squeeze", [mask, f"{p}/last"], [f"{p}/mask_u"]))
            seg.initializers[f"{p}/last"] = np.array([idx_rank - 1], np.int64)
            mask, idx_rank = f"{p}/mask_u", idx_rank - 1
        if node.op_type in ("Gather", "ScatterND") and trailing:
            axes = np.arange(idx_rank, idx_rank + trailing, dtype=np.int64)
            seg.initializers[f"{p}/axes"] = axes
            nodes.append(helper.make_node("Unsqueeze", [mask, f"{p}/axes"], [f"{p}/mask_b"]))
            mask = f"{p}/mask_b"
        proto.input[1] = f"{p}/idx"
        if node.op_type == "Gather":
            proto.output[0] = f"{p}/rows_out"
            nodes += [
                proto,
                helper.make_node("Where", [mask, f"{p}/rows_out", f"{p}/zero_v"], [out_name]),
            ]
        else:
            nodes += [
                helper.make_node("Where", [mask, proto.input[2], f"{p}/zero_v"], [f"{p}/upd"]),
                proto,
            ]
            proto.input[2] = f"{p}/upd"
        return nodes

    # -- sessions -------------------------------------------------------------------------

    def _finish(self, programs, grads, loss, assigns) -> None:
        """Decide each segment's inputs/outputs from what later instructions read, then
        create its session."""
        needed: set[str] = {g.key for g in grads} | {k for k, _ in assigns}
        if loss:
            needed.add(loss)
        for instrs in programs.values():
            for ins in instrs:
                if isinstance(ins, Run):
                    seg = ins.segment
                    made = set(seg.initializers)
                    for n in seg.nodes:
                        for x in n.input:
                            if x and x not in made and x not in seg.inputs:
                                seg.inputs.append(x)
                        made.update(n.output)
                    needed.update(seg.inputs)
                elif isinstance(ins, Reshard):
                    needed.add(ins.src)
                elif isinstance(ins, Collect | Send):
                    needed.add(ins.key)
        opsets = [helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        half = {
            id(ins.segment)
            for phase in ("forward", "backward")
            for ins in programs.get(phase, [])
            if self.half and isinstance(ins, Run)
        }
        for seg in self.segments:
            seg.outputs = [k for k in dict.fromkeys(seg.produced) if k in needed]
            seg.session = self._session(seg, opsets, id(seg) in half)

    def _value_info(self, key: str) -> onnx.ValueInfoProto:
        name = key.split("@", 1)[0]
        return helper.make_tensor_value_info(key, int(self.dtype(name)), None)

    def _session(self, seg: Segment, opsets, half: bool) -> Session:
        graph = helper.make_graph(
            seg.nodes,
            f"stage{self.stage.index}",
            [self._value_info(k) for k in seg.inputs],
            [self._value_info(k) for k in seg.outputs],
            initializer=[
                numpy_helper.from_array(np.asarray(a), k) for k, a in seg.initializers.items()
            ],
        )
        model = helper.make_model(
            graph, opset_imports=opsets, ir_version=min(self.model.ir_version or 10, 10)
        )
        try:
            if half:  # resharding moves values: it stays float32, as between sessions
                keep = [n.name for n in seg.nodes if n.name.startswith(reshard.LOCAL_NODE)]
                model = half_precision(model, keep)
            return self.make_session(model.SerializeToString())
        except UserError:
            raise
        except Exception as exc:
            first = seg.nodes[0].name if seg.nodes else "?"
            raise UserError(
                f"onnxruntime refused the local subgraph starting at node "
                f"{first!r} of stage {self.stage.index}: "
                f"{str(exc).splitlines()[0]}"
            ) from None


def build_stage(
    model: ir.Model,
    plan: Plan,
    device: int,
    make_session: Callable[[bytes], Session],
) -> StageProgram:
    return StageBuilder(model, plan, device, make_session).build()
