"""Canonical plan files: sorted keys, floats at 4 significant digits, trailing newline, atomic.

Identical inputs give byte-identical files under any PYTHONHASHSEED, so a plan diff in CI
means the plan changed. Loading refuses schema versions this build does not know.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from planner.errors import UserError
from planner.plan_schema import SCHEMA_VERSION, Plan


def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.4g}") if obj == obj else obj
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


def canonical_json(data: dict) -> str:
    return json.dumps(_round(data), sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def dump_plan(plan: Plan) -> str:
    return canonical_json(plan.model_dump(mode="json"))


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write via a temp file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plan(plan: Plan, path: str | Path) -> None:
    write_atomic(path, dump_plan(plan))


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read plan {str(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{str(path)!r} is not a JSON plan ({exc.msg} at line {exc.lineno})"
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{str(path)!r} has plan schema_version {version!r}; this alpa-plan reads version "
            f"{SCHEMA_VERSION}: recompile the plan with this version"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UserError(
            f"{str(path)!r} is not a valid plan: field '{loc}': {first['msg']}"
        ) from None
