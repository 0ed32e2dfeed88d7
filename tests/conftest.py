"""Shared test helpers: fixture paths and the manifest of tests/fixtures/export_models.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
DEFAULT_DIMS = {"batch": 2, "seq": 16, "dec_seq": 8}


def manifest() -> list[dict]:
    return [
        f
        for f in json.loads((FIXTURES / "manifest.json").read_text())["files"]
        if f.get("status", "ok") == "ok"
    ]


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
