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


if __name__ == "__main__":
    main()
