"""Golden plans: the planner's output for the fixture models must not drift silently.

After an intended change, run `make plans` and review `git diff plans/`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plans.regenerate import GOLDEN, ROOT, compile_golden


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_plan_unchanged(name, tmp_path):
    fresh = tmp_path / f"{name}.json"
    compile_golden(name, fresh)
    golden = ROOT / "plans" / f"{name}.json"
    if fresh.read_bytes() != golden.read_bytes():
        diff = subprocess.run(
            [sys.executable, "-m", "cli", "diff", str(golden), str(fresh)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        pytest.fail(
            f"plan {name} drifted (run `make plans` if intended):\n{diff.stdout}{diff.stderr}"
        )


def test_golden_plans_are_canonical():
    from planner.plan_io import dump_plan, load_plan

    for name in GOLDEN:
        path = Path(ROOT / "plans" / f"{name}.json")
        assert dump_plan(load_plan(path)) == path.read_text()
