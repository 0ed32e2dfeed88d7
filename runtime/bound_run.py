"""A session run once per step (the optimizer update; with one micro-batch, every session)
through buffers bound once.

``InferenceSession.run`` turns every input into an ``OrtValue`` and every output into a
fresh numpy array on each call. For the update, with several inputs and outputs per
parameter (the parameter, its gradient, its optimizer state), that conversion costs more than
the arithmetic on small models: 85 inputs and 64 outputs took 330 us per call against 242 us
through an IOBinding bound once (Llama fixture, 2 ranks). ``BoundRun`` binds the inputs by
pointer and re-binds only those whose array changed, and writes the outputs into one of two
sets of buffers kept for the job, alternating. Its inputs are mostly last step's outputs
(the new optimizer state) or buffers kept from step to step (gradient buckets, gathered
parameters, the data), so after two steps nothing is re-bound. The outputs replace the
state, as a framework updates its state in place; a value stays valid until the run after
next, when its set is written again, by which time every reader of it (the next step, a
checkpoint, verify) is done. An output that a bucket packs may instead be written straight
into the bucket's buffer (``place``), as DDP's gradients are views of its buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_

import numpy as np

from runtime.comm import contiguous


class BoundRun:
    """One CPU ``InferenceSession`` run through kept bindings (see the module docstring):
    ``bind(values)`` then ``run()``. The first run is a plain one that shows the outputs'
    shapes and dtypes."""

    def __init__(self, session, inputs: Sequence[str], outputs: Sequence[str]):
        self.session, self.inputs, self.outputs = session, tuple(inputs), list(outputs)
        self.bindings = [session.io_binding(), session.io_binding()]
        self.bound: list[list[np.ndarray] | None] = [None, None]  # kept alive: by pointer
        self.sets: list[dict[str, np.ndarray]] = []  # output name -> kept buffer
        self.turn = 0
        self.first: dict[str, np.ndarray] = {}
        self.first_outputs: dict[str, np.ndarray] = {}  # the plain run's; the caller drops them
        self.rebound = -1  # inputs the last ``bind`` re-bound (-1: all, the first run's plain)

    def bind(self, values: Sequence[np.ndarray]) -> None:
        """Point the next run's inputs at ``values`` (re-binding only the changed ones)."""
        if not self.sets:
            self.first = dict(zip(self.inputs, values, strict=True))
            return
        k = self.turn
        bound = self.bound[k]
        if bound is None:
            changed, bound = range(len(values)), [None] * len(values)
        elif all(map(is_, values, bound)):
            self.rebound = 0
            return
        else:
            changed = [j for j, kept in enumerate(map(is_, values, bound)) if not kept]
        bound = list(bound)
        for j in changed:
            bound[j] = contiguous(values[j])
            self.bindings[k].bind_cpu_input(self.inputs[j], bound[j])
        self.bound[k] = bound
        self.rebound = len(changed)

    def place(self, where: dict[str, np.ndarray]) -> None:
        """Write output ``name`` into ``where[name]`` from the next run on, in both sets (a
        consumer's buffer, see ``runtime.buckets.Placed``): for outputs read only within
        the step that makes them."""
        for name, y in where.items():
            assert y.shape == self.sets[0][name].shape and y.dtype == self.sets[0][name].dtype
            for binding, kept in zip(self.bindings, self.sets, strict=True):
                binding.bind_output(name, "cpu", 0, y.dtype, list(y.shape), y.ctypes.data)
                kept[name] = y

    def run(self) -> dict[str, np.ndarray]:
        """The outputs by name."""
        if not self.sets:
            first = dict(zip(self.outputs, self.session.run(self.outputs, self.first), strict=True))
            self.first, self.first_outputs = {}, first
            for binding in self.bindings:
                kept = {name: np.empty_like(y) for name, y in first.items()}
                for name, y in kept.items():
                    binding.bind_output(name, "cpu", 0, y.dtype, list(y.shape), y.ctypes.data)
                self.sets.append(kept)
            return first
        k = self.turn
        self.replay()
        return self.sets[k]

    def replay(self) -> None:
        """``run`` on the inputs bound at this turn, which the caller knows are unchanged
        (``runtime.replay``): its outputs are where they were two runs ago."""
        k = self.turn
        self.session.run_with_iobinding(self.bindings[k])
        self.turn = 1 - k
