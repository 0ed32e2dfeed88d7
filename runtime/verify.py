"""``verify``: one training step sharded vs on a single rank, same inputs and initial state.

The sharded side gathers its final gradients and updated parameters/state to rank 0; rank 0
runs the unpartitioned training graph with plain onnxruntime (forward+backward per
microbatch, gradients averaged, the update once) and compares loss, gradients and updated
tensors in that order, naming the first one whose relative error (max |a-b| / max |ref|)
exceeds the tolerance. The reference update is applied to the sharded run's gradients (which
were just checked): Adam divides by sqrt(v) + eps, so gradients that are zero up to rounding
(e.g. attention key biases) would turn tolerated 1e-8 noise into lr-sized differences.
"""

from __future__ import annotations

import click
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from planner.graph import PHASE_KEY, UPDATES_KEY, Role, role_of
from runtime.comm import Communicator
from runtime.data import microbatch
from runtime.precision import half_precision
from runtime.step import PreparedStep

TOLERANCE = 1e-5
HALF_TOLERANCE = 1e-2


def sharded_tensors(
    runner, grads: dict[str, np.ndarray], comm: Communicator, tag: int, leaders: list[int]
) -> dict[str, np.ndarray] | None:
    """Global final gradients and updated state of every stage, on the host of rank 0
    (``leaders``: the first device of each stage, which sends its stage's tensors)."""
    p = runner.p
    mine = {g.key: comm.to_host(runner.gather(grads[g.key], g.spec)) for g in p.grads}
    mine.update(
        {
            name: comm.to_host(runner.gather(runner.state[name], spec))
            for name, spec in p.owned_specs.items()
        }
    )
    if comm.rank != 0:
        if comm.rank == p.mesh.devices[0]:
            comm.send_object(mine, 0, tag)
            comm.wait_sends()
        return None
    out = dict(mine)
    for leader in leaders:
        if leader != 0:
            out.update(comm.recv_object(leader, tag))  # type: ignore[arg-type]
    return out


def _session(
    proto: onnx.ModelProto,
    phases: set[str],
    outputs: list[str],
    types: dict[str, int],
    half: bool = False,
) -> tuple[ort.InferenceSession, list[str]]:
    g = proto.graph
    nodes = [
        n for n in g.node if {p.key: p.value for p in n.metadata_props}.get(PHASE_KEY) in phases
    ]
    made = {i.name for i in g.initializer}
    inputs: list[str] = []
    for n in nodes:
        inputs += [x for x in n.input if x and x not in made and x not in inputs]
        made.update(n.output)
    graph = helper.make_graph(
        nodes,
        "reference",
        [helper.make_tensor_value_info(x, types[x], None) for x in inputs],
        [helper.make_tensor_value_info(x, types[x], None) for x in outputs],
        initializer=list(g.initializer),
    )
    model = helper.make_model(
        graph, opset_imports=list(proto.opset_import), ir_version=min(proto.ir_version, 10)
    )
    if half:
        model = half_precision(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, inputs


def reference(
    step: PreparedStep,
    batch: dict[str, np.ndarray],
    microbatches: int,
    update_grads: dict[str, np.ndarray] | None = None,
    half: bool = False,
):
    """(loss, grads by name, updated state by input name) of the unpartitioned step; the
    update reads ``update_grads`` when given (the sharded run's gradients); ``half``: the
    forward and backward pass in float16, as a float16 plan runs them."""
    import onnx_ir as ir

    graph = step.model.graph
    types = {}
    for v in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
        if v.name and v.dtype is not None:
            types[v.name] = int(v.dtype)
    loss = graph.outputs[0].name or ""
    grads = [o.name or "" for n in graph for o in n.outputs if role_of(o) is Role.GRAD]
    updated = [
        (o.name or "", o.metadata_props[UPDATES_KEY])
        for o in graph.outputs
        if o.metadata_props.get(UPDATES_KEY)
    ]
    proto = ir.serde.serialize_model(step.model)
    fb, fb_inputs = _session(proto, {"forward", "backward"}, [loss, *grads], types, half)
    up, up_inputs = _session(proto, {"update"}, [u for u, _ in updated], types)
    losses, acc = [], {g: 0.0 for g in grads}
    for m in range(microbatches):
        feeds = {**microbatch(batch, m, microbatches), **step.state}
        out = fb.run([loss, *grads], {k: feeds[k] for k in fb_inputs})
        losses.append(out[0])
        for g, value in zip(grads, out[1:], strict=True):
            acc[g] = acc[g] + value
    mean = {g: (a / np.asarray(microbatches, a.dtype)).astype(a.dtype) for g, a in acc.items()}
    feeds = {**step.state, **mean, **(update_grads or {})}
    new = up.run([u for u, _ in updated], {k: feeds[k] for k in up_inputs})
    return (
        float(np.mean(losses)),
        mean,
        {state: v for (_, state), v in zip(updated, new, strict=True)},
    )


# Gradients are compared on at least this fraction of the step's largest gradient: a tensor
# whose true gradient is exactly zero (e.g. a key bias without rotary embeddings, which the
# softmax ignores) holds only rounding noise, and noise over noise is not a relative error.
GRAD_SCALE_FLOOR = 1e-2


def rel_err(a: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, floor)
    diff = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def _checks(loss: float, tensors: dict[str, np.ndarray], ref: tuple, floor: float) -> list:
    """(name, value, reference value, scale floor) of the loss, every gradient and every
    updated tensor; ``ref``: ``reference``'s (loss, gradients, updated state)."""
    ref_loss, ref_grads, ref_state = ref
    out = [("loss", np.array(loss), np.array(ref_loss), 0.0)]
    out += [(f"grad {k}", tensors[k], v, floor) for k, v in ref_grads.items()]
    out += [(f"updated {k}", tensors[k], v, 0.0) for k, v in ref_state.items()]
    return out


def compare(
    step: PreparedStep,
    sharded: dict[str, np.ndarray] | None,
    batch: dict[str, np.ndarray],
    microbatches: int,
    loss: float | None,
    half: bool = False,
) -> int:
    """0 when the sharded step matches the single-rank one within TOLERANCE. A float16 plan
    is compared with the single-rank step in float16, and both round at different session
    boundaries: a tensor passes within HALF_TOLERANCE, or within twice float16's own error on
    it (the float16 reference against the float32 one), since a sharding bug is off by far
    more than float16 is."""
    assert sharded is not None and loss is not None
    grads = [o.name for n in step.model.graph for o in n.outputs if role_of(o) is Role.GRAD]
    used = {g: sharded[g] for g in grads if g in sharded}
    ref_loss, ref_grads, ref_state = reference(step, batch, microbatches, used, half)
    largest = max((float(np.max(np.abs(v))) for v in ref_grads.values() if v.size), default=0.0)
    floor = GRAD_SCALE_FLOOR * largest
    checks = _checks(loss, sharded, (ref_loss, ref_grads, ref_state), floor)
    allowed = dict.fromkeys((c[0] for c in checks), TOLERANCE)
    if half:
        full = reference(step, batch, microbatches, used)
        own = _checks(ref_loss, {**ref_grads, **ref_state}, full, floor)
        allowed = {name: max(HALF_TOLERANCE, 2 * rel_err(a, ref, low)) for name, a, ref, low in own}
    worst = max(checks, key=lambda c: rel_err(c[1], c[2], c[3]) / allowed[c[0]])
    for name, a, ref, low in checks:
        err = rel_err(a, ref, low)
        if err > allowed[name]:
            click.echo(
                f"verify FAILED: first differing tensor: {name} (rel err {err:.3g} > "
                f"{allowed[name]:.3g}; {len(checks)} tensors compared)",
                err=True,
            )
            return 1
    bound = f"{TOLERANCE:g}" if not half else f"max({HALF_TOLERANCE:g}, 2x float16's own error)"
    click.echo(
        f"verify passed: loss {loss:.6f} vs {ref_loss:.6f}; {len(checks)} tensors "
        f"(loss, {len(ref_grads)} gradients, {len(ref_state)} updated) within "
        f"{bound}, worst {worst[0]} at {rel_err(*worst[1:]):.2g}"
    )
    return 0
