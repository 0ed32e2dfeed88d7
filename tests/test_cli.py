"""The CLI's foundation commands, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import FIXTURES

ROOT = Path(__file__).parents[1]


def alpa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_help_has_examples():
    proc = alpa("--help")
    assert proc.returncode == 0 and "Examples:" in proc.stdout and "inspect-model" in proc.stdout


def test_inspect_model_json_fields():
    proc = alpa(
        "inspect-model",
        str(FIXTURES / "llama.dynamo.onnx"),
        "--dim",
        "batch=2",
        "--dim",
        "seq=16",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in (
        "num_parameters",
        "parameter_bytes",
        "forward_flops",
        "op_counts",
        "inputs",
        "outputs",
        "unsupported_ops",
    ):
        assert key in data
    assert data["inputs"][0]["shape"] == [2, 16]
    assert data["unsupported_ops"] == []


def test_inspect_model_table():
    proc = alpa("inspect-model", str(FIXTURES / "vit.ts.onnx"), "--dim", "batch=2")
    assert proc.returncode == 0, proc.stderr
    assert "parameters:" in proc.stdout and "MatMul" in proc.stdout


def test_bad_dim_syntax_exit_2():
    proc = alpa("inspect-model", str(FIXTURES / "gpt2.ts.onnx"), "--dim", "batch")
    assert proc.returncode == 2 and "NAME=POSITIVE_INT" in proc.stderr
