"""The plan as a picture: pipeline timeline, device map and cost breakdown.

``report.html`` is one self-contained page (inline SVG and CSS, no scripts, no external
assets) so CI can keep it as an artifact and anyone can open it offline; ``report.png`` is
the same timeline and breakdown drawn by matplotlib for places that only show images.

The timeline is simulated from the plan's predictions: a stage's predicted compute plus
communication is per iteration, so one micro-batch takes 1/M of it, split forward 1/3,
backward 2/3 (the usual 1:2 ratio; inference plans only run forward). Stage-to-stage
transfer time is not drawn. The page states these assumptions next to the picture.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

from planner.errors import UserError
from planner.plan_io import write_atomic
from planner.plan_schema import Plan
from planner.plan_view import fmt_bytes, fmt_seconds, mesh_shape, ranges

FORWARD_SHARE = 1 / 3
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
COST_COLORS = {"compute": "#4c72b0", "communication": "#dd8452", "bubble": "#c7c7c7"}
MEMORY_COLORS = {
    "params": "#4c72b0",
    "grads": "#55a868",
    "optimizer_state": "#8172b3",
    "activations": "#dd8452",
}


@dataclass(frozen=True)
class Op:
    stage: int
    microbatch: int
    kind: str  # "fwd" | "bwd"
    start: float
    end: float


def stage_color(stage: int) -> str:
    return PALETTE[stage % len(PALETTE)]


def _order(stage: int, stages: int, micro: int, schedule: str, train: bool) -> list[tuple]:
    if not train:
        return [("fwd", m) for m in range(micro)]
    if schedule == "gpipe":
        return [("fwd", m) for m in range(micro)] + [("bwd", m) for m in range(micro)]
    warm = min(stages - stage - 1, micro)
    order = [("fwd", m) for m in range(warm)]
    for i in range(micro - warm):
        order += [("fwd", warm + i), ("bwd", i)]
    return order + [("bwd", m) for m in range(micro - warm, micro)]


def timeline(plan: Plan) -> list[Op]:
    """Start/end of every (stage, micro-batch, fwd/bwd) under the plan's schedule."""
    n, micro = len(plan.stages), plan.options.microbatches
    train = plan.options.mode == "train"
    per_mb = [(s.compute + s.communication) / micro for s in plan.predicted.stages]
    length = {
        "fwd": [t * (FORWARD_SHARE if train else 1.0) for t in per_mb],
        "bwd": [t * (1 - FORWARD_SHARE) for t in per_mb],
    }
    orders = [_order(s, n, micro, plan.options.schedule, train) for s in range(n)]
    done: dict[tuple, float] = {}
    pos, free = [0] * n, [0.0] * n
    ops: list[Op] = []
    while any(pos[s] < len(orders[s]) for s in range(n)):
        progressed = False
        for s in range(n):
            while pos[s] < len(orders[s]):
                kind, m = orders[s][pos[s]]
                if kind == "fwd":
                    dep = ("fwd", s - 1, m) if s > 0 else None
                else:
                    dep = ("bwd", s + 1, m) if s < n - 1 else ("fwd", s, m)
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done[dep] if dep else 0.0)
                end = start + length[kind][s]
                done[(kind, s, m)] = free[s] = end
                ops.append(Op(s, m, kind, start, end))
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked")  # a bug in _order, not input
    return ops


def breakdown(plan: Plan) -> list[dict]:
    """Per stage: predicted compute / communication / bubble and memory per device."""
    return [
        {
            "stage": st.index,
            "layers": ranges(st.layers),
            "devices": ranges(st.submesh.devices),
            "logical_mesh": mesh_shape(st.logical_mesh.shape),
            "compute": pred.compute,
            "communication": pred.communication,
            "bubble": pred.bubble,
            "memory": st.memory.model_dump(),
        }
        for st, pred in zip(plan.stages, plan.predicted.stages, strict=True)
    ]


def write_report(plan: Plan, out: str | Path) -> None:
    """``.html`` (self-contained page) or ``.png`` (matplotlib), written atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in (".html", ".htm"):
        write_atomic(out, render_html(plan))
    elif suffix == ".png":
        write_atomic(out, render_png(plan))
    else:
        raise UserError(f"cannot write a report as {out.name!r}: use -o report.html or .png")


# ---------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 6px}
.facts{color:#444}.facts b{color:#000}.note{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
svg text{font:11px system-ui,sans-serif}.swatch{display:inline-block;width:10px;height:10px;
margin:0 4px 0 10px}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _ticks(span: float, count: int = 8) -> list[float]:
    if span <= 0:
        return [0.0]
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(span / step) + 1)]


def _timeline_svg(plan: Plan, ops: list[Op]) -> str:
    left, width, row, top = 70, 1060, 30, 10
    span = max((o.end for o in ops), default=0.0) or 1.0
    x = lambda t: left + t / span * width  # noqa: E731
    n = len(plan.stages)
    height = top + n * row + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 10}" '
        f'height="{height}" role="img" aria-label="pipeline timeline">'
    ]
    for s in range(n):
        y = top + s * row
        parts.append(f'<text x="4" y="{y + row / 2 + 4}">stage {s}</text>')
        parts.append(
            f'<line x1="{left}" x2="{left + width}" y1="{y + row - 2}" '
            f'y2="{y + row - 2}" stroke="#eee"/>'
        )
    axis_y = top + n * row + 14
    for t in _ticks(span):
        parts.append(
            f'<line x1="{x(t):.2f}" x2="{x(t):.2f}" y1="{top}" y2="{axis_y - 10}" '
            'stroke="#ccc" stroke-dasharray="2,3"/>'
        )
        parts.append(
            f'<text x="{x(t):.2f}" y="{axis_y}" text-anchor="middle">{_e(fmt_seconds(t))}</text>'
        )
    for o in ops:
        y = top + o.stage * row + 2
        w = max(x(o.end) - x(o.start), 0.5)
        color = stage_color(o.stage)
        opacity = "0.45" if o.kind == "fwd" else "1"
        label = (
            f"stage {o.stage} micro-batch {o.microbatch} {o.kind}: "
            f"{fmt_seconds(o.start)} - {fmt_seconds(o.end)}"
        )
        parts.append(
            f'<rect class="op {o.kind}" data-stage="{o.stage}" data-mb="{o.microbatch}" '
            f'x="{x(o.start):.2f}" y="{y}" width="{w:.2f}" height="{row - 6}" fill="{color}" '
            f'fill-opacity="{opacity}" stroke="#fff" stroke-width="0.5"><title>{_e(label)}'
            "</title></rect>"
        )
        if w > 16:
            parts.append(
                f'<text x="{x(o.start) + w / 2:.2f}" y="{y + row / 2 + 1}" '
                f'text-anchor="middle" fill="#000">{o.microbatch}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _device_map_svg(plan: Plan) -> str:
    hosts, per_host = int(plan.cluster["hosts"]), int(plan.cluster["devices_per_host"])
    where: dict[int, tuple[int, tuple[int, ...]]] = {}
    for st in plan.stages:
        shape = st.logical_mesh.shape
        flat = [d for r in st.logical_mesh.device_ids for d in r]
        for i, d in enumerate(flat):
            coord, rest = [], i
            for size in reversed(shape):
                coord.append(rest % size)
                rest //= size
            where[d] = (st.index, tuple(reversed(coord)))
    cell, gap, left, top = 64, 4, 60, 18
    width = left + per_host * (cell + gap)
    height = top + hosts * (cell + gap)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="device map">'
    ]
    for d in range(per_host):
        parts.append(
            f'<text x="{left + d * (cell + gap) + cell / 2}" y="12" '
            f'text-anchor="middle">dev {d}</text>'
        )
    for h in range(hosts):
        y = top + h * (cell + gap)
        parts.append(f'<text x="4" y="{y + cell / 2 + 4}">host {h}</text>')
        for d in range(per_host):
            gid = h * per_host + d
            xx = left + d * (cell + gap)
            stage, coord = where.get(gid, (None, ()))
            fill = "#f0f0f0" if stage is None else stage_color(stage)
            label = "idle" if stage is None else f"s{stage} {coord}"
            parts.append(
                f'<rect class="device" x="{xx}" y="{y}" width="{cell}" height="{cell}" rx="4" '
                f'fill="{fill}" fill-opacity="0.8"><title>device {gid}: {_e(label)}</title>'
                "</rect>"
                f'<text x="{xx + cell / 2}" y="{y + 24}" text-anchor="middle">#{gid}</text>'
                f'<text x="{xx + cell / 2}" y="{y + 42}" text-anchor="middle">{_e(label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _bars_svg(
    rows: list[tuple[str, dict[str, float]]], colors: dict[str, str], limit: float | None, fmt
) -> str:
    """Horizontal stacked bars, one per row; ``limit`` draws a red line (device memory)."""
    left, width, row = 90, 760, 24
    top_value = max([sum(v.values()) for _, v in rows] + [limit or 0.0]) or 1.0
    height = len(rows) * row + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}">'
    ]
    for i, (label, values) in enumerate(rows):
        y, xx = 4 + i * row, float(left)
        parts.append(f'<text x="4" y="{y + 14}">{_e(label)}</text>')
        for key, v in values.items():
            w = v / top_value * width
            parts.append(
                f'<rect class="bar {key}" x="{xx:.2f}" y="{y}" width="{w:.2f}" '
                f'height="{row - 6}" fill="{colors[key]}"><title>{_e(key)}: '
                f"{_e(fmt(v))}</title></rect>"
            )
            xx += w
        parts.append(f'<text x="{xx + 6:.2f}" y="{y + 14}">{_e(fmt(sum(values.values())))}</text>')
    if limit:
        lx = left + limit / top_value * width
        parts.append(
            f'<line x1="{lx:.2f}" x2="{lx:.2f}" y1="0" y2="{height - 20}" '
            'stroke="#d62728" stroke-width="2"/>'
            f'<text x="{lx:.2f}" y="{height - 6}" text-anchor="middle" fill="#d62728">'
            f"device memory {_e(fmt(limit))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _legend(colors: dict[str, str]) -> str:
    return "".join(
        f'<span class="swatch" style="background:{c}"></span>{_e(k)}' for k, c in colors.items()
    )


def render_html(plan: Plan) -> str:
    ops = timeline(plan)
    rows = breakdown(plan)
    p = plan.predicted
    makespan = max((o.end for o in ops), default=0.0)
    c = plan.cluster
    title = f"alpa-plan: {plan.model.file} on {c['name']}"
    stage_rows = "".join(
        f'<tr><td><span class="swatch" style="background:{stage_color(r["stage"])}"></span>'
        f"stage {r['stage']}</td><td>{_e(r['layers'])}</td><td>{_e(r['devices'])}</td>"
        f"<td>{_e(r['logical_mesh'])}</td><td>{fmt_seconds(r['compute'])}</td>"
        f"<td>{fmt_seconds(r['communication'])}</td><td>{fmt_seconds(r['bubble'])}</td>"
        f"<td>{fmt_bytes(r['memory']['peak'])}</td></tr>"
        for r in rows
    )
    cost_svg = _bars_svg(
        [(f"stage {r['stage']}", {k: r[k] for k in COST_COLORS}) for r in rows],
        COST_COLORS,
        None,
        fmt_seconds,
    )
    mem_svg = _bars_svg(
        [(f"stage {r['stage']}", {k: r["memory"][k] for k in MEMORY_COLORS}) for r in rows],
        MEMORY_COLORS,
        p.device_memory,
        fmt_bytes,
    )
    train = plan.options.mode == "train"
    split = "forward 1/3, backward 2/3 of it" if train else "forward only (inference)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{_e(title)}</h1>
<p class="facts">{len(plan.stages)} stage(s) on {c["hosts"]}x{c["devices_per_host"]}
{_e(c["device"]["name"])}; method <b>{_e(plan.options.method)}</b>, {_e(plan.options.mode)},
global batch {plan.options.global_batch} in {plan.options.microbatches} micro-batches
({_e(plan.options.schedule)}). Predicted iteration <b>{fmt_seconds(p.iteration_time)}</b>
(compute lower bound {fmt_seconds(p.compute_lower_bound)}, x{p.ratio_to_lower_bound:.3g});
MFU <b>{p.mfu:.1%}</b>; peak memory/device <b>{fmt_bytes(p.peak_memory_per_device)}</b> of
{fmt_bytes(p.device_memory)}.</p>
<h2>Pipeline timeline ({_e(plan.options.schedule)})</h2>
{_timeline_svg(plan, ops)}
<p class="note">Simulated from the plan's predictions: a stage's compute + communication is
per iteration, so one micro-batch takes 1/{plan.options.microbatches} of it, {split}
(light: forward, dark: backward; number: micro-batch). Stage-to-stage transfers are not drawn.
Simulated makespan {fmt_seconds(makespan)} vs predicted iteration
{fmt_seconds(p.iteration_time)}.</p>
<h2>Device map</h2>
{_device_map_svg(plan)}
<table><tr><th>stage</th><th>layers</th><th>devices</th><th>logical mesh</th><th>compute</th>
<th>communication</th><th>bubble</th><th>peak memory</th></tr>{stage_rows}</table>
<h2>Cost breakdown per stage</h2>
<div>{_legend(COST_COLORS)}</div>
{cost_svg}
<h2>Memory per device</h2>
<div>{_legend(MEMORY_COLORS)}</div>
{mem_svg}
<p class="note">{_e(plan.producer.name)} {_e(plan.producer.version)}, plan schema
{plan.schema_version}, cost model {_e(plan.cost_model_version)}.</p>
</body></html>
"""


# ---------------------------------------------------------------- PNG


def render_png(plan: Plan) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = timeline(plan)
    rows = breakdown(plan)
    n = len(rows)
    fig, (ax_t, ax_c, ax_m) = plt.subplots(
        3, 1, figsize=(12, 3 + 1.2 * n), height_ratios=[max(n, 2), max(n, 2), max(n, 2)]
    )
    for o in ops:
        ax_t.broken_barh(
            [(o.start, o.end - o.start)],
            (o.stage - 0.4, 0.8),
            facecolors=stage_color(o.stage),
            alpha=0.45 if o.kind == "fwd" else 1,
            edgecolor="white",
            linewidth=0.5,
        )
    ax_t.set_yticks(range(n), [f"stage {s}" for s in range(n)])
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds")
    ax_t.set_title(
        f"{plan.model.file} on {plan.cluster['name']}: {plan.options.schedule} "
        f"timeline (light fwd, dark bwd; fwd 1/3, bwd 2/3 of stage time)"
    )
    for ax, keys, colors, get, label in (
        (ax_c, list(COST_COLORS), COST_COLORS, lambda r, k: r[k], "seconds per iteration"),
        (
            ax_m,
            list(MEMORY_COLORS),
            MEMORY_COLORS,
            lambda r, k: r["memory"][k] / 2**30,
            "GiB per device",
        ),
    ):
        left = [0.0] * n
        for k in keys:
            vals = [get(r, k) for r in rows]
            ax.barh(range(n), vals, left=left, color=colors[k], label=k)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set_yticks(range(n), [f"stage {r['stage']}" for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax_m.axvline(plan.predicted.device_memory / 2**30, color="#d62728", label="device memory")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
