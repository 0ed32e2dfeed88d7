"""alpa-plan command line: cli -> planner (importer -> training -> intra_op -> inter_op -> plan)
-> plan JSON -> runtime.

Every command turns a user mistake (bad file, bad option, model that cannot be planned) into
one line on stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import json
import sys
from functools import wraps

import click

from planner.errors import UnsupportedModelError, UserError
from planner.training import add_training_options
from runtime.backend import BACKENDS

EXAMPLES = """
\b
Examples:
  alpa-plan inspect-model gpt2.onnx --dim batch=8 --dim seq=1024
  alpa-plan train-graph gpt2.onnx --dim batch=8 --dim seq=128 --loss cross_entropy \\
      --labels auto --optimizer adam -o step.onnx
  alpa-plan compile gpt2.onnx --dim batch=8 --dim seq=1024 --cluster p3.16xlarge:2 -o plan.json
  alpa-plan inspect plan.json
  alpa-plan run plan.json --model gpt2.onnx --steps 5
"""


def backend_option(fn):
    """--backend for run and verify (runtime.backend)."""
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="auto",
        show_default=True,
        help="auto: CUDA (one rank per GPU, NCCL) when the plan's cluster has GPUs, else "
        "CPU ranks with MPI; cpu/cuda force one (e.g. smoke-run a GPU plan on CPU ranks).",
    )(fn)


def user_errors(fn):
    """Print UserError as one line and exit 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def model_options(fn):
    """--dim / --input-shape: bind the model's symbolic dims."""
    fn = click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="NAME=D1xD2",
        help="Fix a whole input's shape, e.g. input_ids=8x1024.",
    )(fn)
    fn = click.option(
        "--dim",
        "dims",
        multiple=True,
        metavar="NAME=N",
        help="Bind a symbolic dim by name, e.g. batch=8 (repeatable).",
    )(fn)
    return fn


def import_options(dims, input_shapes):
    from planner.importer import ImportOptions, parse_dim_bindings, parse_input_shapes

    return ImportOptions(
        dims=parse_dim_bindings(dims), input_shapes=parse_input_shapes(input_shapes)
    )


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="alpa-plan")
def main() -> None:
    """Plan data, tensor (intra-op) and pipeline (inter-op) parallelism for an ONNX model."""


@main.command("inspect-model")
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def inspect_model(model: str, dims, input_shapes, as_json: bool) -> None:
    """Op counts, parameters, forward FLOPs, shapes and unsupported ops of MODEL."""
    from planner.importer import import_model
    from planner.summary import model_summary

    try:
        summary = model_summary(import_model(model, import_options(dims, input_shapes)))
    except UnsupportedModelError as exc:
        if as_json:
            click.echo(json.dumps({"error": str(exc), "unsupported_ops": _unsupported(model)}))
        raise
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    _print_summary(model, summary)


def _unsupported(path: str) -> list[str]:
    from planner.flops import CONTROL_FLOW_OPS, SUPPORTED_OPS
    from planner.importer import load_model

    ops = {
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        for n in load_model(path).graph
    }
    return sorted(o for o in ops if o not in SUPPORTED_OPS or o in CONTROL_FLOW_OPS)


def _print_summary(path: str, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{path}[/bold]: {s['num_nodes']} nodes")
    console.print(
        f"parameters: {s['num_parameters']:,} in {s['num_parameter_tensors']} tensors "
        f"({s['parameter_bytes'] / 2**20:,.1f} MiB); forward FLOPs: {s['forward_flops']:.4g}"
    )
    io = Table("", "name", "shape", "dtype")
    for kind in ("inputs", "outputs"):
        for v in s[kind]:
            io.add_row(kind[:-1], v["name"], "x".join(map(str, v["shape"])), str(v["dtype"]))
    console.print(io)
    ops = Table("op", "count")
    for op, count in sorted(s["op_counts"].items(), key=lambda kv: (-kv[1], kv[0])):
        ops.add_row(op, str(count))
    console.print(ops)


@main.command("inspect")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--top", default=10, show_default=True, help="How many communications to list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def inspect_cmd(plan: str, top: int, as_json: bool) -> None:
    """Stages, meshes, time and memory per stage, and the costliest communications of PLAN."""
    from planner.plan_io import load_plan
    from planner.plan_view import inspect_plan, print_inspect

    data = inspect_plan(load_plan(plan), top=top)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_inspect(data)


@main.command("explain")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--node", help="Node name: its strategy, cost and next-best alternatives.")
@click.option("--param", help="Parameter name: its sharding on its stage's mesh.")
@click.option("--top", default=5, show_default=True, help="How many alternatives to list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def explain_cmd(plan: str, node: str | None, param: str | None, top: int, as_json: bool) -> None:
    """Why PLAN chose what it chose for one node (--node) or parameter (--param)."""
    from planner.plan_io import load_plan
    from planner.plan_view import explain_node, explain_param, print_explain

    if (node is None) == (param is None):
        raise UserError("pass exactly one of --node NAME or --param NAME")
    loaded = load_plan(plan)
    data = explain_node(loaded, node, top) if node is not None else explain_param(loaded, param)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_explain(data)


@main.command("diff")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def diff_cmd(a: str, b: str, as_json: bool) -> None:
    """Semantic difference of plans A and B; exit 1 when they differ, 0 when equal."""
    from planner.plan_io import load_plan
    from planner.plan_view import diff_lines, diff_plans

    data = diff_plans(load_plan(a), load_plan(b))
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo("\n".join(diff_lines(data, a, b)))
    sys.exit(0 if data["equal"] else 1)


@main.command("run")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    required=True,
    type=click.Path(dir_okay=False),
    help="The ONNX file the plan was compiled from.",
)
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    help="Global batch as .npz (one array per data input); synthetic when omitted.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="Run report JSON [default: PLAN with .run.json].",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    help="Write sharded training-state checkpoints here (always after the last step).",
)
@click.option(
    "--checkpoint-every",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also checkpoint every K steps (0: only after the last).",
)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint.")
@click.option(
    "--reshard",
    is_flag=True,
    help="Resume from a checkpoint of another plan by re-slicing its tensors.",
)
@backend_option
@user_errors
def run_cmd(
    plan: str,
    model: str,
    steps: int,
    data: str | None,
    report: str | None,
    checkpoint_dir: str | None,
    checkpoint_every: int,
    resume: bool,
    reshard: bool,
    backend: str,
) -> None:
    """Train with PLAN on its ranks (mpiexec, or the MPI/Slurm job this runs in): loss per
    step, throughput, and a report of predicted vs measured time per stage."""
    from pathlib import Path

    from runtime.launch import CheckpointArgs, launch

    if (resume or reshard or checkpoint_every) and not checkpoint_dir:
        raise UserError("--resume, --reshard and --checkpoint-every need --checkpoint-dir")
    ckpt = (
        CheckpointArgs(checkpoint_dir, checkpoint_every, resume, reshard)
        if checkpoint_dir
        else None
    )
    report = report or str(Path(plan).with_suffix(".run.json"))
    sys.exit(
        launch(plan, model, steps, data, report, verify=False, checkpoints=ckpt, backend=backend)
    )


@main.command("verify")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    required=True,
    type=click.Path(dir_okay=False),
    help="The ONNX file the plan was compiled from.",
)
@click.option(
    "--data", type=click.Path(dir_okay=False), help="Global batch as .npz; synthetic when omitted."
)
@backend_option
@user_errors
def verify_cmd(plan: str, model: str, data: str | None, backend: str) -> None:
    """One training step with PLAN vs on one rank: loss, gradients and updated parameters
    must agree (fp32 relative error <= 1e-5); exit 1 naming the first tensor that differs.
    The reference step runs on rank 0's CPU whatever the backend."""
    from runtime.launch import launch

    sys.exit(launch(plan, model, 1, data, None, verify=True, backend=backend))


@main.command("profile")
@click.option(
    "--cluster",
    "cluster_spec",
    default="cpu",
    show_default=True,
    metavar="SPEC",
    help="Cluster whose ranks to measure: cpu, cpu:N or cpu:HxN (MPI ranks on this "
    "machine), or a GPU spec (one rank per GPU of this host, CUDA and NCCL).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the measured cluster yaml.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="onnxruntime threads per rank (run with ALPA_ORT_THREADS set alike).",
)
@click.option(
    "--budget", type=float, default=0.05, show_default=True, help="Seconds spent per measurement."
)
@click.option(
    "--workload",
    "workloads",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A one-device plan (compile --cluster cpu:1 --microbatches 1) whose training step "
    "calibrates the roofline (repeatable: two sizes also calibrate the per-op cost); "
    "needs --model.",
)
@click.option("--model", type=click.Path(dir_okay=False), help="The --workload plan's model.")
@user_errors
def profile_cmd(
    cluster_spec: str,
    output: str,
    threads: int,
    budget: float,
    workloads: tuple[str, ...],
    model: str | None,
) -> None:
    """Measure this machine's ranks (FLOP/s, memory bandwidth, per-op latency, executor
    dispatch, synchronisation, MPI alpha and bandwidth) and write a cluster yaml for
    `compile --cluster FILE`."""
    from cost_models.profile import profile

    c = profile(cluster_spec, output, threads, budget, workloads, model)
    d = c.device
    click.echo(
        f"wrote {output}: {d.peak_flops['float32'] / 1e9:.3g} GFLOP/s, "
        f"{d.memory_bandwidth / 1e9:.3g} GB/s, {d.kernel_latency * 1e6:.3g} us/op, "
        f"{d.dispatch_latency * 1e6:.3g} us/instruction, efficiency {d.compute_efficiency:.2f}, "
        f"{d.sync_jitter * 1e-3**0.5 * 1e3:.2g} ms waiting per sync after 1 ms of work, link "
        f"{c.intra_host.bandwidth / 1e9:.3g} GB/s + {c.intra_host.latency * 1e6:.3g} us"
    )


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of plan files."""
    from planner.plan_view import plan_json_schema

    click.echo(json.dumps(plan_json_schema(), indent=2, sort_keys=True))


@main.command("report")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="report.html (self-contained page) or report.png.",
)
@user_errors
def report_cmd(plan: str, output: str) -> None:
    """Pipeline timeline, device map and cost breakdown of PLAN as HTML or PNG."""
    from planner.plan_io import load_plan
    from planner.plan_report import write_report

    write_report(load_plan(plan), output)
    click.echo(f"wrote {output}")


@main.command("train-graph")
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@add_training_options
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the training-step ONNX model.",
)
@click.option("--emit-gradients", is_flag=True, help="Also output each parameter's gradient.")
@user_errors
def train_graph_cmd(
    model: str, dims, input_shapes, output: str, emit_gradients: bool, **training
) -> None:
    """Write MODEL's training step (forward, loss, backward, optimizer update) as ONNX."""
    from planner.importer import import_model
    from planner.training import build_training_step, save_model_atomic, training_options_from_cli

    options = training_options_from_cli(**training, emit_gradients=emit_gradients)
    step = build_training_step(import_model(model, import_options(dims, input_shapes)), options)
    save_model_atomic(step, output)
    graph = step.graph
    click.echo(
        f"wrote {output}: {len(graph)} nodes, {len(graph.inputs)} inputs, "
        f"{len(graph.outputs)} outputs (loss {graph.outputs[0].name!r})"
    )


def _mesh_shape(value: str | None) -> tuple[int, ...] | None:
    """'4x2' -> (4, 2); size-1 axes dropped, so '1x8' and '8' are the same 1-D view."""
    if value is None:
        return None
    parts = value.lower().split("x")
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UserError(f"--logical-mesh takes a shape like 8, 1x8 or 4x2, not {value!r}")
    return tuple(int(p) for p in parts if int(p) > 1) or (1,)


def _auto_int(value: str, flag: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{flag} takes 'auto' or a positive integer, not {value!r}")
    return int(value)


def compile_options(fn):
    """Options shared by `compile` and `compare`."""
    options = [
        click.option(
            "--cluster",
            "cluster_spec",
            required=True,
            metavar="SPEC",
            help="Preset (p3.16xlarge:8, dgx-a100:2, cpu:4, cpu:2x2) or a yaml file.",
        ),
        click.option(
            "--mode", type=click.Choice(["train", "infer"]), default="train", show_default=True
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default="float32",
            show_default=True,
            help="Precision to plan for: half = mixed precision (fp32 master state).",
        ),
        click.option(
            "--global-batch",
            type=int,
            default=None,
            help="Global batch (default: the model's bound batch).",
        ),
        click.option("--microbatches", default="auto", show_default=True, metavar="auto|N"),
        click.option(
            "--schedule", type=click.Choice(["1f1b", "gpipe"]), default="1f1b", show_default=True
        ),
        click.option(
            "--layers",
            default="auto",
            show_default=True,
            metavar="auto|N",
            help="Layers the forward graph is clustered into.",
        ),
        click.option(
            "--time-limit",
            type=float,
            default=20.0,
            show_default=True,
            help="Seconds per ILP; the best solution found is kept, with its gap.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return add_training_options(model_options(fn))


def _compile_options(
    method,
    mode,
    dtype,
    global_batch,
    microbatches,
    schedule,
    layers,
    time_limit,
    dp,
    tp,
    pp,
    training,
    logical_mesh=None,
):
    from planner.compiler import CompileOptions
    from planner.training import training_options_from_cli

    if training.get("labels") == "auto":
        training["labels"] = "labels"
    megatron = (dp, tp, pp) if method == "megatron" else None
    if method == "megatron" and None in megatron:
        raise UserError("--method megatron needs --dp A --tp B --pp C")
    return CompileOptions(
        method=method,
        mode=mode,
        dtype=dtype,
        training=training_options_from_cli(**training),
        global_batch=global_batch,
        microbatches=_auto_int(microbatches, "--microbatches"),
        schedule=schedule,
        layers=_auto_int(layers, "--layers"),
        megatron=megatron,
        time_limit=time_limit,
        logical_mesh=_mesh_shape(logical_mesh),
    )


def _progress():
    """A rich progress bar on stderr when it is a terminal, else nothing."""
    import contextlib

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return contextlib.nullcontext(None)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed} ILPs"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@compile_options
@click.option(
    "--method",
    type=click.Choice(["auto", "shard", "data", "zero2", "zero3", "megatron"]),
    default="auto",
    show_default=True,
)
@click.option("--dp", type=int, default=None, help="megatron: data-parallel degree.")
@click.option("--tp", type=int, default=None, help="megatron: tensor-parallel degree.")
@click.option("--pp", type=int, default=None, help="megatron: pipeline stages.")
@click.option(
    "--logical-mesh",
    default=None,
    metavar="AxB",
    help="shard: plan on this view of the cluster (8, 1x8, 4x2) instead of the best one.",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--emit-onnx",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the model with ONNX IR v11 sharding annotations.",
)
@click.option(
    "--timings",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write wall times as JSON (kept out of the plan so plans stay identical).",
)
@user_errors
def compile_cmd(
    model,
    dims,
    input_shapes,
    cluster_spec,
    mode,
    dtype,
    global_batch,
    microbatches,
    schedule,
    layers,
    time_limit,
    method,
    dp,
    tp,
    pp,
    logical_mesh,
    output,
    emit_onnx,
    timings,
    **training,
) -> None:
    """Plan MODEL for a cluster and write the plan JSON."""
    from cost_models.cluster import resolve_cluster
    from planner.compiler import compile_plan
    from planner.plan_io import canonical_json, write_atomic, write_plan

    cluster = resolve_cluster(cluster_spec)
    opts = _compile_options(
        method,
        mode,
        dtype,
        global_batch,
        microbatches,
        schedule,
        layers,
        time_limit,
        dp,
        tp,
        pp,
        training,
        logical_mesh,
    )
    with _progress() as bar:
        task = bar.add_task("planning", total=None) if bar else None
        tick = (lambda: bar.advance(task)) if bar else None
        result = compile_plan(model, import_options(dims, input_shapes), cluster, opts, tick)
    write_plan(result.plan, output)
    if emit_onnx:
        from planner.onnx_annotations import annotate_onnx

        annotate_onnx(model, result.plan, emit_onnx)
    if timings:
        write_atomic(timings, canonical_json(result.timings | {"ilp_solves": result.solves}))
    p = result.plan.predicted
    click.echo(
        f"wrote {output}: {len(result.plan.stages)} stage(s), {opts.method}, "
        f"{result.plan.options.microbatches} micro-batches, predicted "
        f"{p.iteration_time * 1e3:.4g} ms/iter, peak {p.peak_memory_per_device / 2**30:.3g} GiB"
        f"/device, MFU {p.mfu:.1%}; planned in {result.timings['total_s']:.1f} s "
        f"({result.solves} ILPs)"
    )


@main.command("compare")
@click.argument("model", type=click.Path(dir_okay=False))
@compile_options
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@user_errors
def compare_cmd(
    model,
    dims,
    input_shapes,
    cluster_spec,
    mode,
    dtype,
    global_batch,
    microbatches,
    schedule,
    layers,
    time_limit,
    as_json,
    **training,
) -> None:
    """Every method and the best Megatron dp x tp x pp point, under one cost model."""
    from cost_models.cluster import resolve_cluster
    from planner.compare import compare, rows_json

    cluster = resolve_cluster(cluster_spec)
    opts = _compile_options(
        "auto",
        mode,
        dtype,
        global_batch,
        microbatches,
        schedule,
        layers,
        time_limit,
        None,
        None,
        None,
        training,
    )
    rows = compare(model, import_options(dims, input_shapes), cluster, opts)
    if as_json:
        click.echo(json.dumps(rows_json(rows), indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "method",
        "configuration",
        "iteration",
        "peak mem/device",
        "MFU",
        "feasible",
        title=f"{model} on {cluster.name} ({cluster.num_devices} devices)",
    )
    for r in rows:
        table.add_row(
            r.method,
            r.configuration,
            f"{r.iteration_time * 1e3:.4g} ms" if r.iteration_time is not None else "-",
            f"{r.peak_memory / 2**30:.3g} GiB" if r.peak_memory is not None else "-",
            f"{r.mfu:.1%}" if r.mfu is not None else "-",
            "yes" if r.feasible else "no",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
