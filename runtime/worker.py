"""Per-rank main: build this rank's stage program, run the pipeline schedule, report.

Rank 0 prepares the training step (import, structure-hash check, training graph, initial
state, the ``--data`` batch) and broadcasts it, so the model is read once and every problem
is reported once, before any compute. Every rank then opens the backend (``runtime.backend``:
MPI on CPU ranks, or NCCL and CUDA sessions on its GPU), runs its stage's schedule with
tensors on the backend's device, and copies to the host only what the host needs (the loss,
checkpoints, verify's tensors). After every step all ranks send their timings (and the loss
stage its loss) to rank 0, which prints one line per step and writes the run report.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from planner.errors import UserError
from planner.graph import LOSS_SEED
from planner.plan_io import load_plan
from planner.plan_schema import Plan
from planner.sharding import ShardingSpec
from runtime import checkpoint, reshard
from runtime.backend import BACKENDS, Backend, open_backend
from runtime.bound_run import BoundRun
from runtime.buckets import BUCKETED, Synchronizer, bind
from runtime.comm import Communicator, MpiCommunicator, contiguous, mean_of, mesh_groups
from runtime.data import load_batch, synthetic_batch
from runtime.launch import PID_DIR
from runtime.mesh import RankMesh, block_index, shard
from runtime.partition import (
    Collect,
    CollectiveOp,
    Instr,
    Recv,
    Reshard,
    Run,
    Send,
    StageProgram,
    build_stage,
    stage_of_device,
)
from runtime.pipeline import schedule
from runtime.precision import HALF, LossScaler
from runtime.replay import Recorder, Replay, Traced
from runtime.step import PreparedStep, prepare_step

VERIFY_TAG = (1 << 20) + 1
CHECKPOINT_TAG = (1 << 20) + 2
PROFILE = "ALPA_PROFILE"
DIE_HOOK = "ALPA_TEST_DIE_AFTER_STEP"  # "rank:step": SIGKILL that rank after that step (tests)


@dataclass
class Timers:
    """Per instruction kind; the communicator's own ``seconds`` is the time inside MPI."""

    compute: float = 0.0  # inside onnxruntime
    collective: float = 0.0  # resharding and strategy collectives, incl. gradient sync+copies
    p2p: float = 0.0  # cross-stage sends/receives, incl. waiting for the other stage

    def as_dict(self) -> dict[str, float]:
        return {"compute": self.compute, "collective": self.collective, "p2p": self.p2p}


@dataclass
class Checkpointing:
    root: Path
    every: int  # 0: only after the last step
    run_id: str  # names this run's temporary folders
    resume: checkpoint.Found | None


@dataclass
class Job:
    plan: Plan
    plan_path: str
    step: PreparedStep
    steps: int
    batch: dict[str, np.ndarray] | None  # None: synthetic
    report: Path | None
    verify: bool
    checkpoints: Checkpointing | None = None


Op = Callable[[dict[str, np.ndarray], int], None]  # (env, micro-batch) -> None
Feed = tuple[str, list[tuple], bool, np.ndarray | None]  # see ``StageRunner._feeds``


def _session_call(session) -> Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]:
    """``session.run`` without the Python wrapper's per-call checks of the feed names (the
    executor built the feeds from the session's own inputs): the pybind call itself."""
    inner = getattr(session, "_sess", None)
    if inner is None or not hasattr(inner, "run"):
        return session.run
    return lambda outputs, feeds: inner.run(outputs, feeds, None)


def _values(keys: Sequence[str]) -> Callable[[dict[str, np.ndarray]], tuple]:
    """``env -> (env[k] for k in keys)`` as a tuple, in one C call for several keys
    (``itemgetter`` of a single key returns the bare value, of none raises)."""
    if len(keys) > 1:
        return itemgetter(*keys)
    return lambda env: tuple(env[k] for k in keys)


class StageRunner:
    """Executes one rank's ``StageProgram``: microbatch tasks, accumulation, the update.

    Each instruction is bound once, here, to a callable on (env, micro-batch) with its
    session, groups, keys and indices resolved, so a step is a flat walk over callables: the
    step loop pays Python dispatch per instruction, not per lookup. An env starts as a copy of
    the state dict (a shallow copy of references), so every key is one dict lookup. Once every
    buffer is kept, even that walk is replaced by recorded calls (``runtime.replay``).
    """

    def __init__(
        self,
        program: StageProgram,
        comm: Communicator,
        state: dict[str, np.ndarray],
        microbatches: int,
    ):
        self.p = program
        self.comm = comm
        self.m = microbatches
        self.state = {
            name: comm.to_device(shard(state[name], spec, program.mesh, program.device))
            for name, spec in program.state_specs.items()
        }
        self.timers = Timers()
        # the once-per-step sessions' outputs (``BoundRun``) and the once-per-step buckets
        # that read them (``_place``)
        self.producers: dict[str, BoundRun] = {}
        self.consumers: list[tuple[list[str], Synchronizer]] = []
        self.placed = False
        self.traced: dict[Op, Traced] = {}  # what ``Recorder`` can replay, by callable
        self.programs = {
            phase: [self._bind(ins, self._once_per_step(phase)) for ins in self._batched(instrs)]
            for phase, instrs in program.programs.items()
        }
        # the gradients' deferred collectives, and the loss's (see ``StageProgram.loss_sync``)
        chains = [g.deferred for g in program.grads]
        if program.loss is not None:
            chains.append(program.loss_sync)
        self.grad_sync = Synchronizer(chains, comm, reuse=True)
        self.grad_keys = [g.key for g in program.grads]
        sync_keys = self.grad_keys + ([program.loss] if program.loss is not None else [])
        if microbatches == 1:  # the gradients are the backward's outputs themselves
            self.consumers.append((sync_keys, self.grad_sync))
        self.grad_values = _values(self.grad_keys)
        # the state the update replaces, and (one C call) the update's results that replace it
        self.assigned = [state for _, state in program.assigns]
        keys = [key for key, _ in program.assigns]
        self.assign_from = _values(keys)
        self.scaler = LossScaler() if program.half else None
        self.skipped = False  # the last step's update, skipped for non-finite gradients
        self._feed_shapes: tuple | None = None  # the batch shapes ``_feed`` is worked out for
        self._feed: list[Feed] = []
        # with one micro-batch, once every buffer is kept, the step is replayed (see
        # ``runtime.replay``) while the data lands in the same buffers (``_replay_feed``)
        self.recorder = None
        if microbatches == 1 and not self.programs["prologue"] and self.scaler is None:
            phases = {
                phase: [(kind, self.traced.get(fn)) for kind, fn in ops]
                for phase, ops in self.programs.items()
            }
            self.recorder = Recorder(phases, self.assigned, program.loss is not None)
        self._replay_feed: list[Feed] | None = None

    def _place(self) -> None:
        """After the first step, when every bucket is laid out: the once-per-step sessions
        write the tensors that such a bucket packs straight into its buffer (see
        ``runtime.buckets.Placed``), where the first step's bucket packed that session's
        very output (not a value a later instruction made under its key) and it does not
        become state (read again next step)."""
        self.placed = True
        kept = {key for key, _ in self.p.assigns}
        for keys, synchronize in self.consumers:
            places, first = synchronize.places(), synchronize.first_inputs
            for i, key in enumerate(keys):
                producer = self.producers.get(key)
                if i not in places or producer is None or key in kept:
                    continue
                if first[i] is producer.first_outputs.get(key):
                    producer.place({key: places[i]})
            synchronize.first_inputs = []
        self.grad_sync.first_inputs = []  # a consumer only with one micro-batch
        for producer in self.producers.values():
            producer.first_outputs = {}

    def _feeds(self, batch: dict[str, np.ndarray]) -> list[Feed]:
        """Per data input: (name, this rank's block of each micro-batch as an index into the
        whole batch, whether it is a zero addend, a kept buffer to copy it into or None),
        i.e. ``microbatch`` then ``shard``, worked out once for the batch's shapes. With one
        micro-batch the block lands in a buffer kept from step to step (a zero addend: kept
        zeros), which a kept binding (``BoundRun``) keeps reading."""
        shapes = tuple(batch[name].shape for name in self.p.data_specs)
        if self._feed_shapes != shapes:
            self._feed = []
            for name, spec in self.p.data_specs.items():
                rows, *rest = batch[name].shape
                n, left = divmod(rows, self.m)
                if left:
                    raise UserError(
                        f"{name}: dim 0 of the batch ({rows}) does not split into {self.m} "
                        "micro-batches: pass a batch divisible by the plan's micro-batches"
                    )
                (first, *index), zero = block_index(spec, (n, *rest), self.p.mesh, self.p.device)
                blocks = [
                    (slice(m * n + first.start, m * n + first.stop), *index) for m in range(self.m)
                ]
                kept = None
                if self.m == 1:
                    block = batch[name][blocks[0]]
                    kept = np.zeros(block.shape, block.dtype) if zero else np.empty_like(block)
                self._feed.append((name, blocks, zero, kept))
            self._feed_shapes = shapes
        return self._feed

    def _batched(self, instrs: list[Instr]) -> list[Instr | list[Reshard]]:
        """Runs of consecutive, independent one-collective reshards (e.g. the all-gathers of
        every updated weight after a sharded update) become one list, run bucketed (see
        ``runtime.buckets``): one call per bucket instead of one per tensor."""
        out: list[Instr | list[Reshard]] = []
        for ins in instrs:
            if not (
                isinstance(ins, Reshard) and len(ins.steps) == 1 and ins.steps[0].kind in BUCKETED
            ):
                out.append(ins)
                continue
            run = out[-1] if out and isinstance(out[-1], list) else None
            if run is None or ins.src in {r.dst for r in run}:
                out.append([ins])
            else:
                run.append(ins)
        return out

    def _op(self, step: reshard.Step) -> CollectiveOp:
        group = tuple(self.p.mesh.group(self.p.device, (step.axis,)))
        return CollectiveOp(step.kind, group, "sum", step.dim)

    def _once_per_step(self, phase: str) -> bool:
        """Whether ``phase``'s instructions run once per step: the update's, and with one
        micro-batch the forward's and backward's (not the prologue's, kept as it is: its
        results become state, which its next run reads)."""
        return phase == "update" or (self.m == 1 and phase in ("forward", "backward"))

    def _bind(self, ins: Instr | list[Reshard], once_per_step: bool) -> tuple[str, Op]:
        """(timer, callable) of one instruction; "compute" callables time themselves (only
        the onnxruntime call), the others are timed whole by ``run``. ``once_per_step``
        (``_once_per_step``): its results may live in buffers kept from step to step, as a
        framework updates its state in place, since every reader of the last step's values
        is done by then: sessions run through kept bindings (``BoundRun``), bucketed
        collectives and all-gathers land in kept buffers."""
        comm = self.comm
        if isinstance(ins, Run):
            return "compute", self._bind_run(ins, once_per_step)
        if isinstance(ins, list) and len(ins) == 1:
            ins = ins[0]
        if isinstance(ins, list):
            ops = [[self._op(r.steps[0])] for r in ins]
            srcs, dsts = [r.src for r in ins], [r.dst for r in ins]
            return self._bind_bucketed(srcs, dsts, ops, once_per_step)
        if isinstance(ins, Reshard | Collect):
            steps = ins.steps if isinstance(ins, Reshard) else []
            single = len(steps) == 1 and steps[0].kind == "all_gather"
            chain = ins.ops if isinstance(ins, Collect) else [self._op(steps[0])] if single else []
            src, dst = (ins.src, ins.dst) if isinstance(ins, Reshard) else (ins.key, ins.key)
            if once_per_step and len(chain) == 1 and chain[0].kind == "all_gather":
                # a bucket of one, into kept buffers: a result a kept binding can keep reading
                return self._bind_bucketed([src], [dst], [chain], True)
            if isinstance(ins, Reshard):
                fn = reshard.bind(ins.steps, self.p.mesh, self.p.device, comm)
            else:
                fn = reshard.compose([bind(op, comm) for op in ins.ops])

            def convert(env: dict[str, np.ndarray], m: int) -> None:
                env[dst] = fn(env[src])

            return "collective", convert
        if isinstance(ins, Send):
            key, tag, m_count = ins.key, ins.tag, self.m
            sends = [(p.src_index, p.dst) for p in ins.pieces]

            def send(env: dict[str, np.ndarray], m: int) -> None:
                x = env[key]
                for index, dst in sends:
                    comm.send(x[index], dst, tag * m_count + m)

            return "p2p", send
        return "p2p", self._bind_recv(ins)

    def _bind_bucketed(
        self, srcs: list[str], dsts: list[str], ops: list[list[CollectiveOp]], kept: bool
    ) -> tuple[str, Op]:
        """Collectives ``ops[i]`` of ``env[srcs[i]]`` into ``env[dsts[i]]``, bucketed;
        ``kept``: into buffers kept from call to call, which producers may write into
        (``_place``)."""
        synchronize = Synchronizer(ops, self.comm, reuse=kept)
        if not kept:

            def bucketed(env: dict[str, np.ndarray], m: int) -> None:
                env.update(zip(dsts, synchronize([env[k] for k in srcs]), strict=True))

            return "collective", bucketed
        self.consumers.append((srcs, synchronize))
        traced = Traced(bucket=synchronize)

        def bucketed_kept(env: dict[str, np.ndarray], m: int) -> None:
            xs = traced.last = [env[k] for k in srcs]
            env.update(zip(dsts, synchronize(xs), strict=True))

        self.traced[bucketed_kept] = traced
        return "collective", bucketed_kept

    def _bind_run(self, ins: Run, once_per_step: bool) -> Op:
        seg = ins.segment
        assert seg.session is not None
        inputs, outputs, t = tuple(seg.inputs), list(seg.outputs), self.timers
        session_run = _session_call(seg.session)
        clock = time.perf_counter
        take = _values(inputs)
        if once_per_step and isinstance(seg.session, ort.InferenceSession):
            bound = BoundRun(seg.session, inputs, outputs)
            self.producers.update(dict.fromkeys(outputs, bound))

            def run_bound(env: dict[str, np.ndarray], m: int) -> None:
                bound.bind(take(env))
                start = clock()
                values = bound.run()
                t.compute += clock() - start
                env.update(values)

            self.traced[run_bound] = Traced(run=bound)
            return run_bound

        def run(env: dict[str, np.ndarray], m: int) -> None:
            feeds = dict(zip(inputs, take(env), strict=True))
            start = clock()
            values = session_run(outputs, feeds)
            t.compute += clock() - start
            env.update(zip(outputs, values, strict=True))

        return run

    def _bind_recv(self, ins: Recv) -> Op:
        comm, key, tag, m_count = self.comm, ins.key, ins.tag, self.m
        shape, dtype, xp = ins.shape, ins.dtype, self.comm.xp
        zero = reshard.bind(ins.zero, self.p.mesh, self.p.device, comm)
        whole = tuple(slice(0, n) for n in shape)
        if len(ins.pieces) == 1 and ins.pieces[0].dst_index == whole:
            src = ins.pieces[0].src

            def recv_whole(env: dict[str, np.ndarray], m: int) -> None:
                buf = xp.empty(shape, dtype)
                comm.recv(buf, src, tag * m_count + m)
                env[key] = zero(buf)

            return recv_whole
        parts = [(p.src, p.dst_index) for p in ins.pieces]

        def recv(env: dict[str, np.ndarray], m: int) -> None:
            buf = xp.empty(shape, dtype)
            for src, index in parts:
                part = xp.empty(buf[index].shape, dtype)
                comm.recv(part, src, tag * m_count + m)
                buf[index] = part
            env[key] = zero(buf)

        return recv

    def run(self, phase: str, env: dict[str, np.ndarray], m: int) -> None:
        t = self.timers
        clock = time.perf_counter
        for kind, fn in self.programs[phase]:
            if kind == "compute":
                fn(env, m)
                continue
            start = clock()
            fn(env, m)
            if kind == "p2p":
                t.p2p += clock() - start
            else:
                t.collective += clock() - start

    def _calls(self, calls: list[tuple[str, Callable[[], object]]]) -> None:
        t = self.timers
        clock = time.perf_counter
        for kind, call in calls:
            start = clock()
            call()
            if kind == "compute":
                t.compute += clock() - start
            else:
                t.collective += clock() - start

    def _replayed(self, r: Replay, batch: dict[str, np.ndarray]) -> tuple[float | None, dict]:
        """The step recorded by ``runtime.replay``: the data into its kept buffers, then
        the recorded calls, as ``step`` would make them."""
        for name, blocks, zero, kept in self._feed:
            if not zero:
                np.copyto(kept, batch[name][blocks[0]])
        self._calls(r.forward)
        start = time.perf_counter()
        self.grad_sync(r.tensors)
        self.timers.collective += time.perf_counter() - start
        self._calls(r.update)
        self.state.update(r.assign)
        return (float(r.loss) / self.p.loss_divisor if r.loss is not None else None), r.env

    def step(self, batch: dict[str, np.ndarray], kind: str, stages: int):
        """One training step; returns (mean loss or None, final grads by key)."""
        rec = self.recorder
        if rec is not None and rec.replays is not None:
            if self._feeds(batch) is self._replay_feed:
                return self._replayed(rec.next(), batch)
            rec.replays = None  # the data would need other buffers: step the plain way
        if self.programs["prologue"]:
            borrowed = dict(self.state)
            self.run("prologue", borrowed, 0)
            self.state.update(borrowed)
        envs: dict[int, dict[str, np.ndarray]] = {}
        acc: dict[str, np.ndarray] = {}
        losses = []
        p = self.p
        seed = None
        if p.loss_seed is not None and self.scaler is not None:
            seed = self.comm.to_device(
                np.asarray(p.loss_seed * self.scaler.scale, p.loss_seed.dtype)
            )
        feeds, to_device = self._feeds(batch), self.comm.to_device
        for task, m in schedule(kind, p.stage, stages, self.m):
            if task == "F":
                env = envs[m] = dict(self.state)
                for name, blocks, zero, kept in feeds:
                    if kept is None:
                        x = contiguous(batch[name][blocks[m]])
                        x = np.zeros_like(x) if zero else x
                    elif not zero:
                        np.copyto(kept, batch[name][blocks[m]])
                    env[name] = to_device(x if kept is None else kept)
                if seed is not None:
                    env[LOSS_SEED] = seed
                self.run("forward", env, m)
                if p.loss is not None:
                    losses.append(env[p.loss])  # reduced with the gradients, at the end
            else:
                env = envs.pop(m)
                self.run("backward", env, m)
                if self.m == 1:
                    acc = env
                    continue
                for g in p.grads:  # summed in place, into a copy of the first (a send may
                    if g.key in acc:  # still read that one)
                        acc[g.key] += env[g.key]
                    else:
                        acc[g.key] = env[g.key].copy()
        # the update's env: the state and the synced gradients (with one micro-batch, the
        # micro-batch's own env, which holds the same state)
        step_env = acc if self.m == 1 else dict(self.state)
        start = time.perf_counter()
        grads = p.grads
        if self.m > 1:
            for g in grads:
                acc[g.key] = mean_of(acc[g.key], self.m)
        tensors = list(self.grad_values(acc))
        if len(losses) == 1:
            tensors.append(losses[0])
        elif losses:
            tensors.append(sum(losses[1:], losses[0]) / losses[0].dtype.type(len(losses)))
        synced = self.grad_sync(tensors)
        step_env.update(zip(self.grad_keys, synced, strict=False))  # then the loss
        self.timers.collective += time.perf_counter() - start
        self.skipped = self.scaler is not None and not self.scaler.unscale(
            synced[: len(grads)], self.comm
        )
        assigned = ()
        if not self.skipped:
            self.run("update", step_env, 0)
            assigned = self.assign_from(step_env)
            self.state.update(zip(self.assigned, assigned, strict=True))
        start = time.perf_counter()
        self.comm.wait_sends()
        self.timers.p2p += time.perf_counter() - start
        loss = float(synced[-1]) / p.loss_divisor if p.loss is not None else None
        if not self.placed:
            self._place()
        elif rec is not None and rec.watching:
            rec.observe(tensors, synced, assigned, step_env)
            self._replay_feed = self._feed
        return loss, step_env

    def gather(self, x: np.ndarray, spec: ShardingSpec) -> np.ndarray:
        """The global tensor (every rank of the stage takes part)."""
        return reshard.apply(
            x,
            reshard.program(spec, ShardingSpec(((),) * len(spec.dims))),
            self.p.mesh,
            self.p.device,
            self.comm,
        )


def _prepare(
    plan_path: str, model: str | None, step_dir: str | None, data: str | None, args
) -> tuple[bytes, bytes, dict | None, Checkpointing | None]:
    """Rank 0: everything that can be wrong with the inputs is found here, before compute."""
    plan = load_plan(plan_path)
    ckpt = None
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume needs --checkpoint-dir")
    if args.checkpoint_dir:
        root = Path(args.checkpoint_dir)
        found = checkpoint.find(root, plan_path, args.reshard) if args.resume else None
        checkpoint.remove_stale(root)
        ckpt = Checkpointing(root, args.checkpoint_every, os.urandom(6).hex(), found)
    if step_dir:
        step = PreparedStep.load(step_dir)
    elif model:
        step = prepare_step(plan, model)
    else:
        raise UserError("pass --model (the ONNX file the plan was compiled from)")
    batch = None
    if data:
        batch = load_batch(data, step.model.graph, set(step.state), plan.options.microbatches)
    model_bytes, state_bytes = step.to_bytes()
    return model_bytes, state_bytes, batch, ckpt


def main(argv: list[str]) -> int:
    """``python -m runtime.worker PLAN [--model M | --step DIR] [--steps N] [--data F]
    [--report R] [--verify] [--backend auto|cpu|cuda]``: one rank's entry point (the
    launcher passes these)."""
    import argparse

    parser = argparse.ArgumentParser(prog="runtime.worker")
    parser.add_argument("plan")
    parser.add_argument("--model")
    parser.add_argument("--step")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--data")
    parser.add_argument("--report")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--reshard", action="store_true")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    args = parser.parse_args(argv)
    comm = MpiCommunicator()
    pid_file = Path(os.environ.get(PID_DIR, ".")) / f"{os.getpid()}.rank"
    if PID_DIR in os.environ:
        pid_file.write_text(str(comm.rank))
    try:
        code = _profiled(comm, args)
    except UserError as exc:
        if comm.rank == 0:
            sys.stderr.write(f"error: {exc}\n")
        code = 2
    except Exception:
        sys.stderr.write(traceback.format_exc())
        comm.fail("the executor raised an exception (traceback above)")
        return 1
    if PID_DIR in os.environ:  # ended by itself, whatever the code: not a dead rank
        pid_file.unlink()
    return code


def _profiled(comm: MpiCommunicator, args) -> int:
    """``ALPA_PROFILE=rank:file``: run that rank under cProfile and dump its stats to file."""
    who, _, path = os.environ.get(PROFILE, "").partition(":")
    if not (who.isdigit() and int(who) == comm.rank and path):
        return _main(comm, args)
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(_main, comm, args)
    finally:
        profiler.dump_stats(path)


def _main(comm: MpiCommunicator, args) -> int:
    payload: object = None
    if comm.rank == 0:
        try:
            payload = _prepare(args.plan, args.model, args.step, args.data, args)
        except UserError as exc:
            payload = str(exc)
    payload = comm.broadcast_object(payload, 0)
    if isinstance(payload, str):
        raise UserError(payload)
    assert isinstance(payload, tuple)
    model_bytes, state_bytes, batch, ckpt = payload
    plan = load_plan(args.plan)
    backend = open_backend(args.backend, plan, comm)
    job = Job(
        plan,
        args.plan,
        PreparedStep.from_bytes(model_bytes, state_bytes),
        1 if args.verify else args.steps,
        batch,
        Path(args.report) if args.report else None,
        args.verify,
        ckpt,
    )
    return execute(backend, job)


def required_ranks(plan: Plan) -> int:
    return max(d for s in plan.stages for d in s.submesh.devices) + 1


def _die_after(rank: int) -> int | None:
    """The step after which this rank kills itself (fault-tolerance tests), if any."""
    hook = os.environ.get(DIE_HOOK, "")
    who, _, step = hook.partition(":")
    return int(step) if who.isdigit() and int(who) == rank and step.isdigit() else None


def _shapes(job: Job, names: dict[str, ShardingSpec]) -> dict[str, tuple[int, ...]]:
    return {name: job.step.state[name].shape for name in names}


def _save(comm: Communicator, job: Job, ckpt: Checkpointing, runner: StageRunner, step: int):
    """Every rank writes its shards; rank 0 publishes once all of them are done."""
    owned = runner.p.owned_specs
    tmp = checkpoint.write_shards(
        ckpt.root,
        ckpt.run_id,
        step,
        comm.rank,
        {name: comm.to_host(runner.state[name]) for name in owned},
        owned,
        _shapes(job, owned),
        runner.p.mesh,
    )
    if comm.rank != 0:
        comm.send_object(step, 0, CHECKPOINT_TAG)
        comm.wait_sends()
        return
    for r in range(1, comm.size):
        comm.recv_object(r, CHECKPOINT_TAG)
    scaler = dataclasses.asdict(runner.scaler) if runner.scaler is not None else None
    final = checkpoint.publish(ckpt.root, tmp, ckpt.run_id, step, comm.size, job.plan_path, scaler)
    click.echo(f"checkpoint: {final}")


def execute(backend: Backend, job: Job) -> int:
    from runtime import report

    comm = backend.comm
    plan = job.plan
    if comm.size != required_ranks(plan):
        raise UserError(
            f"this job has {comm.size} ranks; the plan needs "
            f"{required_ranks(plan)} (one per device)"
        )
    from runtime.partition import check_coverage

    check_coverage(plan, job.step.model.graph)
    stage = stage_of_device(plan, comm.rank)
    if stage is None:
        raise UserError(f"device {comm.rank} is in no stage of the plan: recompile the plan")
    if comm.rank == 0 and plan.options.dtype not in ("float32", HALF):
        click.echo(
            f"note: the plan is priced for {plan.options.dtype} mixed precision; the executor "
            "computes it in float32 (it runs float16 plans in float16)"
        )
    setup = time.perf_counter()
    program = build_stage(job.step.model, plan, comm.rank, backend.make_session)
    comm.add_groups(mesh_groups(program.mesh.device_at, program.mesh.shape))
    runner = StageRunner(program, comm, job.step.state, plan.options.microbatches)
    first = 0
    ckpt = job.checkpoints
    if ckpt is not None and ckpt.resume is not None:
        owned = program.owned_specs
        loaded = (
            checkpoint.load_own(ckpt.resume, comm.rank, owned)
            if ckpt.resume.same_plan
            else checkpoint.load_resharded(
                ckpt.resume, owned, _shapes(job, owned), program.mesh, comm.rank
            )
        )
        runner.state.update({name: comm.to_device(x) for name, x in loaded.items()})
        if runner.scaler is not None and ckpt.resume.loss_scale is not None:
            runner.scaler = LossScaler(**ckpt.resume.loss_scale)
        first = ckpt.resume.step
    setup = time.perf_counter() - setup
    state_names = set(job.step.state)
    rows = []
    die = _die_after(comm.rank)
    for i in range(first, first + job.steps):
        batch = (
            job.batch
            if job.batch is not None
            else synthetic_batch(
                job.step.model.graph, state_names, plan.options.microbatches, seed=i
            )
        )
        before = runner.timers.as_dict()
        comm.seconds, comm.calls = 0.0, 0
        start = time.perf_counter()
        loss, grads = runner.step(batch, plan.options.schedule, len(plan.stages))
        wall = time.perf_counter() - start
        after = runner.timers.as_dict()
        mine = {
            "rank": comm.rank,
            "stage": program.stage,
            "loss": loss,
            "wall": wall,
            **{k: after[k] - before[k] for k in after},
            "comm": comm.seconds,
            "calls": comm.calls,
        }
        row = report.collect_step(comm, mine)
        if comm.rank == 0:
            rows.append(row)
            report.print_step(i, row, plan)
            if runner.skipped:
                click.echo(
                    f"step {i}: a float16 gradient overflowed; update skipped, loss scale now "
                    f"{runner.scaler.scale:g}"
                )
        if ckpt is not None and (
            i + 1 == first + job.steps or (ckpt.every and (i + 1) % ckpt.every == 0)
        ):
            _save(comm, job, ckpt, runner, i + 1)
        if die == i + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    if job.verify:
        from runtime.verify import compare, sharded_tensors

        if runner.skipped:
            if comm.rank == 0:
                click.echo(
                    "verify FAILED: the float16 gradients overflowed at loss scale "
                    f"{2 * runner.scaler.scale:g} and the update was skipped",
                    err=True,
                )
            return 1

        leaders = [RankMesh.from_plan(s.logical_mesh).devices[0] for s in plan.stages]
        tensors = sharded_tensors(runner, grads, comm, VERIFY_TAG, leaders)
        if comm.rank == 0:
            return compare(
                job.step,
                tensors,
                job.batch
                if job.batch is not None
                else synthetic_batch(
                    job.step.model.graph, state_names, plan.options.microbatches, seed=0
                ),
                plan.options.microbatches,
                rows[0]["loss"],
                plan.options.dtype == HALF,
            )
        return 0
    if comm.rank == 0:
        report.write(plan, rows, setup, job.report, backend.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
