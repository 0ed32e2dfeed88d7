"""Regenerate the golden plans (`make plans`); tests/test_golden_plans.py recompiles each and
fails with `alpa-plan diff` output when the planner's output drifts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TRAIN = ["--loss", "cross_entropy", "--labels", "labels", "--optimizer", "adam"]

# name -> compile arguments (model first); small models on the presets the executor runs.
GOLDEN: dict[str, list[str]] = {
    "gpt2-cpu4-auto": [
        str(FIXTURES / "gpt2.ts.onnx"),
        "--dim",
        "batch=8",
        "--dim",
        "seq=16",
        "--cluster",
        "cpu:4",
        *TRAIN,
    ],
    "gpt2-cpu2x2-auto": [
        str(FIXTURES / "gpt2.ts.onnx"),
        "--dim",
        "batch=8",
        "--dim",
        "seq=16",
        "--cluster",
        "cpu:2x2",
        "--microbatches",
        "4",
        *TRAIN,
    ],
    "llama-cpu4-megatron": [
        str(FIXTURES / "llama.dynamo.onnx"),
        "--dim",
        "batch=4",
        "--dim",
        "seq=16",
        "--cluster",
        "cpu:4",
        "--method",
        "megatron",
        "--dp",
        "2",
        "--tp",
        "2",
        "--pp",
        "1",
        *TRAIN,
    ],
    "wrn-cpu4-zero2": [
        str(FIXTURES / "wrn.dynamo_noopt.onnx"),
        "--dim",
        "batch=8",
        "--cluster",
        "cpu:4",
        "--method",
        "zero2",
        "--microbatches",
        "1",
        *TRAIN,
    ],
}


def compile_golden(name: str, out: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "cli", "compile", *GOLDEN[name], "-o", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )


def main() -> None:
    for name in GOLDEN:
        compile_golden(name, ROOT / "plans" / f"{name}.json")
        print(f"plans/{name}.json")


if __name__ == "__main__":
    main()
