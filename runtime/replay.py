"""Replaying a step whose every buffer is kept: the idea of CUDA graphs, for the executor's
Python.

With one micro-batch on CPU ranks, every session runs through kept bindings (``BoundRun``)
and every collective lands in a kept bucket, so after a few steps each instruction reads and
writes the very same arrays every other step (a ``BoundRun`` alternates two output sets). The
step's Python then only finds those arrays again: the env dicts (a copy of the state, every
session's inputs looked up, its outputs stored), the gradient list, the state's update. After
onnxruntime has run, each of those lookups is a cache miss, and on the Llama fixture they cost
about 100 us of a 3-4 ms step. ``Recorder`` watches the first steps: once two steps in a row
read the very arrays the step before last read (an identity check) and no kept binding was
re-bound, it records each parity's step as a list of calls on those arrays (``Replay``),
which the runner then makes instead, with the same timers. Nothing else points those names at
other arrays in between: the state changes only through the step itself (checkpoints are
loaded before the first step), and the data is copied into the buffers the sessions are bound
to (a batch of other shapes would need others: the runner then stops replaying).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import is_

import numpy as np

from runtime.bound_run import BoundRun
from runtime.buckets import Synchronizer

WATCH_STEPS = 8  # a stage not stable by then (a re-binding every step) is not watched further


@dataclass
class Seen:
    """What one step read: identity-compared with the step before last."""

    buckets: list[list[np.ndarray]]  # each kept bucket instruction's tensors, in program order
    tensors: list[np.ndarray]  # the gradient sync's (with the loss last, if any)
    synced: list[np.ndarray]  # and what it made (the loss is read from there)
    assigned: tuple[np.ndarray, ...]  # the update's results that became state
    env: dict[str, np.ndarray]  # the step's env (what the step returns)

    def same(self, other: Seen) -> bool:
        return (
            _same(self.tensors, other.tensors)
            and _same(self.synced, other.synced)
            and _same(self.assigned, other.assigned)
            and len(self.buckets) == len(other.buckets)
            and all(map(_same, self.buckets, other.buckets))
        )


def _same(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))


Call = tuple[str, Callable[[], object]]  # (timer, call)


@dataclass
class Replay:
    """One parity's step as calls on kept arrays: the forward and backward, the gradient
    sync on ``tensors``, the update, then the state entries that change (``assign``)."""

    forward: list[Call]
    tensors: list[np.ndarray]
    update: list[Call]
    assign: dict[str, np.ndarray]
    loss: np.ndarray | None
    env: dict[str, np.ndarray]


@dataclass
class Traced:
    """A once-per-step instruction the recorder can replay: a session through kept bindings,
    or a kept bucket (``last``: the tensors of its last call)."""

    run: BoundRun | None = None
    bucket: Synchronizer | None = None
    last: list[np.ndarray] | None = None


class Recorder:
    """Watches a stage's steps (``observe``) until they can be replayed (``next``)."""

    def __init__(
        self,
        phases: dict[str, list[tuple[str, Traced | None]]],
        assigned: Sequence[str],
        loss: bool,
    ):
        ops = [op for phase in ("forward", "backward", "update") for op in phases[phase]]
        self.eligible = all(traced is not None for _, traced in ops)
        self.phases = phases
        self.runs = [t.run for _, t in ops if t is not None and t.run is not None]
        self.buckets = [t for _, t in ops if t is not None and t.bucket is not None]
        self.assigned, self.loss = list(assigned), loss
        self.steps = 0
        self.watching = self.eligible
        self.seen: list[Seen | None] = [None, None]  # the last step of each parity's
        self.stable = 0  # steps in a row that read what the step before last read
        self.replays: list[Replay] | None = None  # by step parity

    def next(self) -> Replay:
        """The coming step as a replay (once ``replays`` is recorded): it counts as made."""
        assert self.replays is not None
        self.steps += 1
        return self.replays[(self.steps - 1) % 2]

    def observe(
        self,
        tensors: list[np.ndarray],
        synced: list[np.ndarray],
        assigned: tuple[np.ndarray, ...],
        env: dict[str, np.ndarray],
    ) -> None:
        """After a step made the plain way (its gradient sync's ``tensors`` and results, the
        values that became state, its env): is it the same as the step before last?"""
        seen = Seen([t.last for t in self.buckets], tensors, synced, assigned, env)
        q = self.steps % 2
        prev = self.seen[q]
        settled = all(run.rebound == 0 for run in self.runs)
        self.stable = self.stable + 1 if settled and prev is not None and prev.same(seen) else 0
        self.seen[q] = seen
        self.steps += 1
        if self.stable >= 2:
            self.replays = [self._replay(0), self._replay(1)]
        if self.replays is not None or self.steps >= WATCH_STEPS:
            self.watching = False
            self.seen = [None, None]

    def _replay(self, q: int) -> Replay:
        seen, other = self.seen[q], self.seen[1 - q]
        assert seen is not None and other is not None
        lasts = iter(seen.buckets)

        def calls(phases: Sequence[str]) -> list[Call]:
            out: list[Call] = []
            for phase in phases:
                for kind, traced in self.phases[phase]:
                    assert traced is not None
                    if traced.run is not None:
                        out.append((kind, traced.run.replay))
                    else:
                        assert traced.bucket is not None
                        out.append((kind, partial(traced.bucket, next(lasts))))
            return out

        forward = calls(("forward", "backward"))
        update = calls(("update",))
        # only what differs between the parities: the rest already is the state
        assign = {
            name: x
            for name, x, y in zip(self.assigned, seen.assigned, other.assigned, strict=True)
            if x is not y
        }
        loss = seen.synced[-1] if self.loss else None
        return Replay(forward, seen.tensors, update, assign, loss, seen.env)
