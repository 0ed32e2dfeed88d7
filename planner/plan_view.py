"""Reading plans: ``inspect``, ``explain`` and ``diff`` as plain data, plus thin renderers.

Users review plans in CI diffs and ask "why this?": each command is a pure function from
``Plan`` to dicts/lists (what ``--json`` prints, what tests check) and a renderer that only
formats that data, so the text and the JSON never disagree.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable

from planner.errors import UserError
from planner.plan_io import dump_plan
from planner.plan_schema import SCHEMA_VERSION, Plan, StagePlan
from planner.sharding import ShardingSpec as Spec

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# ---------------------------------------------------------------- formatting helpers


def ranges(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: layer and device lists stay one short token."""
    out: list[str] = []
    for i in sorted(set(ids)):
        if out and i == int(out[-1].rpartition("-")[2]) + 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out) or "-"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns" if s else "0 s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def mesh_shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _cluster_label(plan: Plan) -> str:
    c = plan.cluster
    return f"{c['name']} ({c['hosts']}x{c['devices_per_host']} {c['device']['name']})"


def plan_json_schema() -> dict:
    """The JSON Schema of plan files (what ``alpa-plan schema`` prints)."""
    schema = Plan.model_json_schema()
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["title"] = f"alpa-plan plan, schema_version {SCHEMA_VERSION}"
    return schema


# ---------------------------------------------------------------- inspect


def inspect_plan(plan: Plan, top: int = 10) -> dict:
    """Summary, per-stage rows (time, memory, mesh) and the ``top`` costliest communications."""
    p = plan.predicted
    stages = []
    for stage, pred in zip(plan.stages, p.stages, strict=True):
        stages.append(
            {
                "stage": stage.index,
                "layers": ranges(stage.layers),
                "hosts": ranges(stage.submesh.hosts),
                "devices": ranges(stage.submesh.devices),
                "logical_mesh": mesh_shape(stage.logical_mesh.shape),
                "nodes": len(stage.nodes),
                "params": len(stage.params),
                "compute": pred.compute,
                "communication": pred.communication,
                "bubble": pred.bubble,
                "memory": stage.memory.model_dump(),
            }
        )
    return {
        "plan": {
            "model": plan.model.file,
            "dims": plan.model.dims,
            "cluster": _cluster_label(plan),
            "devices": plan.cluster["hosts"] * plan.cluster["devices_per_host"],
            "method": plan.options.method,
            "mode": plan.options.mode,
            "schedule": plan.options.schedule,
            "global_batch": plan.options.global_batch,
            "microbatches": plan.options.microbatches,
            "dtype": plan.options.dtype,
            "producer": f"{plan.producer.name} {plan.producer.version}",
            "cost_model_version": plan.cost_model_version,
        },
        "predicted": p.model_dump(exclude={"stages"}),
        "solver": plan.solver.model_dump(),
        "stages": stages,
        "communications": communications(plan)[:top],
    }


def communications(plan: Plan) -> list[dict]:
    """Every priced communication (collectives, input resharding, stage-to-stage transfers),
    costliest first."""
    rows: list[dict] = []
    for stage in plan.stages:
        for name, node in stage.nodes.items():
            where = f"stage {stage.index}"
            for c in node.collectives:
                rows.append(
                    {
                        "kind": c.kind,
                        "where": where,
                        "what": name,
                        "axes": c.axes,
                        "bytes": c.bytes,
                        "seconds": c.seconds,
                    }
                )
            if node.resharding:
                rows.append(
                    {
                        "kind": "resharding",
                        "where": where,
                        "what": name,
                        "axes": None,
                        "bytes": None,
                        "seconds": node.resharding,
                    }
                )
    for t in plan.transfers:
        rows.append(
            {
                "kind": "transfer",
                "where": f"stage {t.src_stage}->{t.dst_stage}",
                "what": t.tensor,
                "axes": None,
                "bytes": t.bytes,
                "seconds": t.seconds,
            }
        )
    return sorted(rows, key=lambda r: (-r["seconds"], r["where"], r["what"], r["kind"]))


def print_inspect(data: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info, pred = data["plan"], data["predicted"]
    console.print(
        f"[bold]{info['model']}[/bold] {info['dims']} on {info['cluster']}: method "
        f"{info['method']}, {info['mode']}, batch {info['global_batch']} in "
        f"{info['microbatches']} micro-batches ({info['schedule']}), {info['dtype']}"
    )
    console.print(
        f"predicted iteration {fmt_seconds(pred['iteration_time'])}; compute lower bound "
        f"{fmt_seconds(pred['compute_lower_bound'])} (x{pred['ratio_to_lower_bound']:.3g}); "
        f"MFU {pred['mfu']:.1%}; peak memory/device {fmt_bytes(pred['peak_memory_per_device'])}"
        f" of {fmt_bytes(pred['device_memory'])}"
    )
    style = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False}
    stages = Table(
        "stage",
        "layers",
        "devices",
        "mesh",
        "nodes",
        "compute",
        "comm",
        "bubble",
        "peak mem",
        title="stages",
        **style,
    )
    for s in data["stages"]:
        stages.add_row(
            str(s["stage"]),
            s["layers"],
            s["devices"],
            s["logical_mesh"],
            str(s["nodes"]),
            fmt_seconds(s["compute"]),
            fmt_seconds(s["communication"]),
            fmt_seconds(s["bubble"]),
            fmt_bytes(s["memory"]["peak"]),
        )
    console.print(stages)
    comms = Table(
        "kind",
        "where",
        "node / tensor",
        "axes",
        "bytes",
        "time",
        title=f"costliest communications (top {len(data['communications'])})",
        **style,
    )
    for c in data["communications"]:
        axes = "-" if c["axes"] is None else ",".join(map(str, c["axes"]))
        comms.add_row(
            c["kind"], c["where"], c["what"], axes, fmt_bytes(c["bytes"]), fmt_seconds(c["seconds"])
        )
    console.print(comms)
    for ilp in data["solver"]["ilps"]:
        console.print(
            f"stage {ilp['stage']} ILP: {ilp['status']}, objective {ilp['objective']:.4g}, "
            f"gap {ilp['gap']:.2%} ({ilp['variables']} variables, {ilp['constraints']} "
            "constraints)"
        )


# ---------------------------------------------------------------- explain


def _unknown(kind: str, name: str, names: Iterable[str]) -> UserError:
    names = sorted(names)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    close = close or [n for n in names if name.lower() in n.lower()][:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UserError(f"no {kind} {name!r} in the plan ({len(names)} {kind}s){hint}")


def explain_node(plan: Plan, name: str, top: int = 5) -> dict:
    """The chosen strategy with its cost split and the ``top`` cheapest alternatives.

    Node cost = compute + communication + resharding of its inputs. Alternatives are
    compared on their own cost (compute + communication) with the chosen strategy's own: the
    resharding an alternative would need depends on what its neighbours chose. The ILP
    minimises the whole stage, so an alternative cheaper on its own loses when it forces
    resharding on neighbours or breaks the memory budget; ``verdict`` says which case this is.
    """
    for stage in plan.stages:
        if name in stage.nodes:
            break
    else:
        raise _unknown("node", name, (n for s in plan.stages for n in s.nodes))
    node = stage.nodes[name]
    own = node.compute + node.communication
    total = own + node.resharding
    alts = sorted(node.alternatives, key=lambda a: (a.cost, a.strategy))
    # plans keep 4 significant digits: costs that close are a tie
    tied = [a for a in alts if math.isclose(a.cost, own, rel_tol=1e-3)]
    cheaper = [a for a in alts if a.cost < own and a not in tied]
    if not alts:
        verdict = "only strategy considered"
    elif cheaper:
        verdict = (
            f"{len(cheaper)} alternative(s) cost less on their own; the stage optimum prefers "
            "this one (less resharding with neighbours, or the memory budget)"
        )
    elif tied:
        verdict = f"tied: {len(tied)} alternative(s) cost the same on their own"
    else:
        verdict = f"cheapest: next best costs {fmt_seconds(alts[0].cost - own)} more"
    return {
        "kind": "node",
        "name": name,
        "stage": stage.index,
        "logical_mesh": mesh_shape(stage.logical_mesh.shape),
        "op": node.op,
        "strategy": node.strategy,
        "inputs": node.inputs,
        "outputs": node.outputs,
        "local": node.local,
        "replicated_fallback": node.replicated_fallback,
        "collectives": [c.model_dump() for c in node.collectives],
        "cost": {
            "compute": node.compute,
            "communication": node.communication,
            "resharding": node.resharding,
            "total": total,
        },
        "alternatives": [
            {"strategy": a.strategy, "cost": a.cost, "delta": a.cost - own} for a in alts[:top]
        ],
        "num_alternatives": len(alts),
        "verdict": verdict,
    }


def describe_spec(text: str, shape: list[int]) -> str:
    """``"S0,R"`` on a 2x4 mesh -> which dims split how many ways, which axes replicate."""
    spec = Spec.parse(text)
    parts = [
        f"dim {d} split {_ways(axes, shape)} ways over mesh axis {''.join(map(str, axes))}"
        for d, axes in enumerate(spec.dims)
        if axes
    ]
    rep = [a for a in range(len(shape)) if a not in spec.used_axes() and shape[a] > 1]
    if rep:
        parts.append(
            f"replicated over mesh axis {''.join(map(str, rep))} ({_ways(rep, shape)} copies)"
        )
    if spec.partial:
        parts.append(f"partial sum over mesh axis {''.join(map(str, spec.partial))}")
    return "; ".join(parts) or "whole tensor on one device"


def _ways(axes: Iterable[int], shape: list[int]) -> int:
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def explain_param(plan: Plan, name: str) -> dict:
    """Where a parameter lives and how it is split; gradients reduce over replicated axes."""
    where = [s for s in plan.stages if name in s.params]
    if not where:
        raise _unknown("parameter", name, (p for s in plan.stages for p in s.params))
    placements = []
    for stage in where:
        spec, shape = stage.params[name], stage.logical_mesh.shape
        used = Spec.parse(spec).used_axes()
        rep = [a for a in range(len(shape)) if a not in used and shape[a] > 1]
        placements.append(
            {
                "stage": stage.index,
                "logical_mesh": mesh_shape(shape),
                "devices": ranges(stage.submesh.devices),
                "spec": spec,
                "meaning": describe_spec(spec, shape),
                "fraction_per_device": 1 / Spec.parse(spec).shards(shape),
                "gradient_reduced_over_axes": rep if plan.options.mode == "train" else [],
            }
        )
    return {"kind": "param", "name": name, "placements": placements}


def print_explain(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if data["kind"] == "param":
        for p in data["placements"]:
            console.print(
                f"[bold]{data['name']}[/bold]: stage {p['stage']} (mesh {p['logical_mesh']}, "
                f"devices {p['devices']}), spec [bold]{p['spec']}[/bold]: {p['meaning']}; "
                f"{p['fraction_per_device']:.3g} of it per device"
            )
        return
    cost = data["cost"]
    console.print(
        f"[bold]{data['name']}[/bold] ({data['op']}) in stage {data['stage']} on mesh "
        f"{data['logical_mesh']}: chose [bold]{data['strategy']}[/bold] costing "
        f"{fmt_seconds(cost['total'])} = compute {fmt_seconds(cost['compute'])} + "
        f"communication {fmt_seconds(cost['communication'])} + resharding "
        f"{fmt_seconds(cost['resharding'])}"
    )
    console.print(f"inputs {data['inputs']} -> outputs {data['outputs']}")
    for c in data["collectives"]:
        console.print(
            f"  {c['kind']} over mesh axes {c['axes']} on output {c['output']}: "
            f"{fmt_bytes(c['bytes'])}, {fmt_seconds(c['seconds'])}"
        )
    if data["replicated_fallback"]:
        console.print("replicated fallback: no sharded strategy applies to this node")
    if data["alternatives"]:
        table = Table(
            "alternative",
            "cost",
            "vs chosen (own cost)",
            title=f"next best ({len(data['alternatives'])} of {data['num_alternatives']})",
        )
        for a in data["alternatives"]:
            sign = "+" if a["delta"] >= 0 else "-"
            table.add_row(
                a["strategy"], fmt_seconds(a["cost"]), f"{sign}{fmt_seconds(abs(a['delta']))}"
            )
        console.print(table)
    console.print(data["verdict"])


# ---------------------------------------------------------------- diff


def _pattern(names: list[str]) -> str:
    """Names equal up to numbers -> one name with varying numbers as ``[lo-hi]`` or ``*``."""
    if len(names) == 1:
        return names[0]
    split = [re.split(r"(\d+)", n) for n in names]
    out = []
    for i, token in enumerate(split[0]):
        values = sorted({int(s[i]) for s in split}) if i % 2 else [token]
        if i % 2 == 0 or len(values) == 1:
            out.append(split[0][i])
        elif values == list(range(values[0], values[-1] + 1)):
            out.append(f"[{values[0]}-{values[-1]}]")
        else:
            out.append("*")
    return "".join(out)


def group_changes(changes: dict[str, tuple], extra: dict[str, float] | None = None) -> list[dict]:
    """Collapse per-name changes that are the same change on names equal up to numbers
    (every layer's weight going ``R -> S1`` is one line with a count); ``extra`` (per-name
    cost deltas) is summed per group."""
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for name in sorted(changes):
        a, b = changes[name]
        buckets[(re.sub(r"\d+", "#", name), a, b)].append(name)
    rows = []
    for (_, a, b), names in buckets.items():
        row = {"name": _pattern(names), "count": len(names), "a": a, "b": b}
        if extra is not None:
            row["cost_delta"] = sum(extra[n] for n in names)
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["count"], r["name"]))


def _layer_stage(plan: Plan) -> dict[int, int]:
    return {layer: s.index for s in plan.stages for layer in s.layers}


def _stage_mesh(stage: StagePlan | None) -> dict | None:
    if stage is None:
        return None
    return {
        "hosts": ranges(stage.submesh.hosts),
        "devices": ranges(stage.submesh.devices),
        "logical_mesh": mesh_shape(stage.logical_mesh.shape),
        "mesh_devices": stage.logical_mesh.device_ids,
    }


def _delta(metric: str, a: float, b: float) -> dict:
    return {
        "metric": metric,
        "a": a,
        "b": b,
        "delta": b - a,
        "percent": (b - a) / a * 100 if a else None,
    }


def _leaf_paths(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            p
            for k in sorted(a.keys() | b.keys())
            for p in _leaf_paths(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in _leaf_paths(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path]


def diff_plans(a: Plan, b: Plan) -> dict:
    """Semantic difference of two plans; ``equal`` ignores only the producer (version)."""
    da, db = (json.loads(dump_plan(p)) for p in (a, b))
    for d in (da, db):
        d.pop("producer")
    out: dict = {"equal": da == db}
    out["model"] = (
        None
        if a.model == b.model
        else {
            "a": f"{a.model.file} {a.model.dims}",
            "b": f"{b.model.file} {b.model.dims}",
            "same_graph": a.model.structure_sha256 == b.model.structure_sha256,
        }
    )
    out["cluster"] = (
        None if da["cluster"] == db["cluster"] else {"a": _cluster_label(a), "b": _cluster_label(b)}
    )
    oa, ob = da["options"], db["options"]
    out["options"] = [
        {"field": k, "a": oa.get(k), "b": ob.get(k)}
        for k in sorted(oa.keys() | ob.keys())
        if oa.get(k) != ob.get(k)
    ]

    la, lb = _layer_stage(a), _layer_stage(b)
    moves: dict[tuple, list[int]] = defaultdict(list)
    for layer in sorted(la.keys() | lb.keys()):
        if la.get(layer) != lb.get(layer):
            moves[(la.get(layer), lb.get(layer))].append(layer)
    meshes = []
    for i in range(max(len(a.stages), len(b.stages))):
        ma = _stage_mesh(a.stages[i] if i < len(a.stages) else None)
        mb = _stage_mesh(b.stages[i] if i < len(b.stages) else None)
        if ma != mb:
            meshes.append({"stage": i, "a": ma, "b": mb})
    out["stages"] = {
        "count": [len(a.stages), len(b.stages)],
        "layer_moves": [{"layers": ranges(ls), "a": s, "b": t} for (s, t), ls in moves.items()],
        "meshes": meshes,
    }

    pa = {n: spec for s in a.stages for n, spec in s.params.items()}
    pb = {n: spec for s in b.stages for n, spec in s.params.items()}
    out["params"] = group_changes(
        {n: (pa.get(n), pb.get(n)) for n in pa.keys() | pb.keys() if pa.get(n) != pb.get(n)}
    )

    na = {n: (s.index, node) for s in a.stages for n, node in s.nodes.items()}
    nb = {n: (s.index, node) for s in b.stages for n, node in s.nodes.items()}
    changed, cost, moved = {}, {}, defaultdict(int)
    for n in na.keys() | nb.keys():
        x, y = na.get(n), nb.get(n)
        if x and y and x[0] != y[0]:
            moved[(x[0], y[0])] += 1
        sx = x[1].strategy if x else None
        sy = y[1].strategy if y else None
        if sx != sy:
            changed[n] = (sx, sy)
            cost[n] = _node_cost(y) - _node_cost(x)
    out["nodes"] = group_changes(changed, cost)
    out["node_moves"] = [{"a": s, "b": t, "count": c} for (s, t), c in sorted(moved.items())]

    pred_a, pred_b = a.predicted, b.predicted
    out["predicted"] = [
        _delta(m, getattr(pred_a, m), getattr(pred_b, m))
        for m in (
            "iteration_time",
            "peak_memory_per_device",
            "mfu",
            "compute_lower_bound",
            "ratio_to_lower_bound",
            "device_memory",
        )
        if getattr(pred_a, m) != getattr(pred_b, m)
    ]
    out["stage_costs"] = [
        _delta(f"stage {i} {m}", getattr(x, m), getattr(y, m))
        for i, (x, y) in enumerate(zip(pred_a.stages, pred_b.stages, strict=False))
        for m in ("compute", "communication", "bubble")
        if getattr(x, m) != getattr(y, m)
    ]
    ta, tb = (_transfer_totals(p) for p in (a, b))
    out["transfers"] = None if da["transfers"] == db["transfers"] else {"a": ta, "b": tb}
    covered = {"model", "cluster", "options", "stages", "predicted", "transfers"}
    other = _leaf_paths(
        {k: v for k, v in da.items() if k not in covered},
        {k: v for k, v in db.items() if k not in covered},
    )
    if (
        not out["equal"]
        and not other
        and not any(
            out[k]
            for k in ("model", "cluster", "options", "params", "nodes", "predicted", "transfers")
        )
        and not (out["stages"]["layer_moves"] or out["stages"]["meshes"])
    ):
        other = _leaf_paths(da, db)
    out["other"] = other[:20]
    return out


def _transfer_totals(plan: Plan) -> dict:
    return {
        "count": len(plan.transfers),
        "bytes": sum(t.bytes for t in plan.transfers),
        "seconds": sum(t.seconds for t in plan.transfers),
    }


def _node_cost(entry: tuple | None) -> float:
    if entry is None:
        return 0.0
    node = entry[1]
    return node.compute + node.communication + node.resharding


def _fmt_metric(metric: str, v: float) -> str:
    if metric in ("peak_memory_per_device", "device_memory"):
        return fmt_bytes(v)
    if metric == "mfu":
        return f"{v:.1%}"
    if metric == "ratio_to_lower_bound":
        return f"x{v:.3g}"
    return fmt_seconds(v)


def diff_lines(d: dict, a_name: str = "a", b_name: str = "b") -> list[str]:
    """The diff as a readable list (what ``alpa-plan diff`` prints)."""
    if d["equal"]:
        return [f"plans are equal: {a_name} == {b_name}"]
    lines = [f"plans differ: {a_name} -> {b_name}"]
    if d["model"]:
        same = "same graph" if d["model"]["same_graph"] else "different graph"
        lines.append(f"model: {d['model']['a']} -> {d['model']['b']} ({same})")
    if d["cluster"]:
        lines.append(f"cluster: {d['cluster']['a']} -> {d['cluster']['b']}")
    for o in d["options"]:
        lines.append(f"option {o['field']}: {o['a']} -> {o['b']}")
    st = d["stages"]
    if st["count"][0] != st["count"][1]:
        lines.append(f"stages: {st['count'][0]} -> {st['count'][1]}")
    for m in st["layer_moves"]:
        src = "absent" if m["a"] is None else f"stage {m['a']}"
        dst = "absent" if m["b"] is None else f"stage {m['b']}"
        lines.append(f"  layers {m['layers']}: {src} -> {dst}")
    for m in st["meshes"]:
        ta, tb = _mesh_text(m["a"]), _mesh_text(m["b"])
        if ta == tb:  # same devices and shape, different order on the mesh
            ta, tb = (f"{t} ids {x['mesh_devices']}" for t, x in ((ta, m["a"]), (tb, m["b"])))
        lines.append(f"  stage {m['stage']}: {ta} -> {tb}")
    if d["params"]:
        lines.append(f"parameters whose spec changed ({sum(r['count'] for r in d['params'])}):")
        lines += [f"  {_change(r)}" for r in d["params"]]
    if d["nodes"]:
        lines.append(f"nodes whose strategy changed ({sum(r['count'] for r in d['nodes'])}):")
        lines += [
            f"  {_change(r)}  (cost {'+' if r['cost_delta'] >= 0 else '-'}"
            f"{fmt_seconds(abs(r['cost_delta']))})"
            for r in d["nodes"]
        ]
    for m in d["node_moves"]:
        lines.append(f"{m['count']} nodes moved: stage {m['a']} -> stage {m['b']}")
    if d["transfers"]:
        ta, tb = d["transfers"]["a"], d["transfers"]["b"]
        lines.append(
            f"stage-to-stage transfers: {ta['count']} ({fmt_bytes(ta['bytes'])}, "
            f"{fmt_seconds(ta['seconds'])}) -> {tb['count']} ({fmt_bytes(tb['bytes'])}, "
            f"{fmt_seconds(tb['seconds'])})"
        )
    if d["predicted"] or d["stage_costs"]:
        lines.append("predicted:")
    for p in d["predicted"] + d["stage_costs"]:
        metric = p["metric"].split()[-1] if p["metric"].startswith("stage") else p["metric"]
        a, b = _fmt_metric(metric, p["a"]), _fmt_metric(metric, p["b"])
        if metric == "mfu":
            change = f"{p['delta'] * 100:+.1f} pp"
        elif p["percent"] is None:
            change = "new"
        else:
            change = f"{p['percent']:+.1f}%"
        label = "MFU" if metric == "mfu" else p["metric"].replace("_", " ")
        lines.append(f"  {label}: {a} -> {b} ({change})")
    if d["other"]:
        lines.append("other fields: " + ", ".join(d["other"]))
    return lines


def _mesh_text(m: dict | None) -> str:
    if m is None:
        return "(none)"
    return f"hosts {m['hosts']} devices {m['devices']} mesh {m['logical_mesh']}"


def _change(r: dict) -> str:
    count = f"  x{r['count']}" if r["count"] > 1 else ""
    a = "(absent)" if r["a"] is None else r["a"]
    b = "(absent)" if r["b"] is None else r["b"]
    return f"{r['name']}: {a} -> {b}{count}"
