"""Sharded training-state checkpoints, written so that a crash never corrupts the latest one.

A checkpoint is a folder ``step-NNNNNNNN-<run id>`` under the checkpoint dir: every rank writes
its own parameter and optimizer-state shards (``rank<R>.npz``) and their layout (``rank<R>.json``:
spec, mesh and global shape of each tensor) into a temporary folder; once every rank reports
done, rank 0 adds the plan (``plan.json``) and ``meta.json`` (step, plan sha256), renames the
folder into place and only then rewrites the ``latest`` pointer (itself replaced atomically).
A resume under another plan is refused unless ``--reshard``: then each rank rebuilds the full
tensors it needs from all the old shards and slices them to the new plan's specs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.errors import UserError
from planner.sharding import ShardingSpec
from runtime.mesh import RankMesh, shard

LATEST = "latest"
TMP_PREFIX = ".tmp-"


def plan_digest(plan_path: str | Path) -> str:
    return hashlib.sha256(Path(plan_path).read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Found:
    """The checkpoint a resume starts from (resolved by rank 0 before any compute)."""

    folder: Path
    step: int
    same_plan: bool
    loss_scale: dict | None = None  # a float16 run's ``runtime.precision.LossScaler`` state


def find(root: str | Path, plan_path: str | Path, reshard: bool) -> Found:
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        raise UserError(f"--resume: no checkpoint in {str(root)!r} (no {LATEST!r} file)")
    folder = root / pointer.read_text().strip()
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: checkpoint {str(folder)!r} is unreadable: {exc}") from None
    same = meta["plan_sha256"] == plan_digest(plan_path)
    if not same and not reshard:
        raise UserError(
            f"checkpoint {str(folder)!r} was written under another plan (sha256 "
            f"{meta['plan_sha256'][:12]}..., this plan {plan_digest(plan_path)[:12]}...): "
            "resume with that plan, or pass --reshard to convert the checkpoint"
        )
    return Found(folder, int(meta["step"]), same, meta.get("loss_scale"))


def _layout(specs: dict[str, ShardingSpec], shapes: dict[str, tuple[int, ...]], mesh: RankMesh):
    return {
        "mesh": {"shape": list(mesh.shape), "devices": list(mesh.devices)},
        "tensors": {k: {"spec": str(s), "shape": list(shapes[k])} for k, s in specs.items()},
    }


def write_shards(
    root: Path,
    run_id: str,
    step: int,
    rank: int,
    state: dict[str, np.ndarray],
    specs: dict[str, ShardingSpec],
    shapes: dict[str, tuple[int, ...]],
    mesh: RankMesh,
) -> Path:
    """This rank's part, into the run's temporary folder for ``step``."""
    tmp = root / f"{TMP_PREFIX}{run_id}-{step:08d}"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / f"rank{rank}.npz", "wb") as f:
        np.savez(f, **state)
        f.flush()
        os.fsync(f.fileno())
    layout = _layout(specs, shapes, mesh)
    _write_file(tmp / f"rank{rank}.json", json.dumps(layout, sort_keys=True).encode())
    return tmp


def publish(
    root: Path,
    tmp: Path,
    run_id: str,
    step: int,
    ranks: int,
    plan_path: str | Path,
    loss_scale: dict | None = None,
) -> Path:
    """Rank 0, after every rank wrote its shards: meta, rename into place, then ``latest``.
    The folder name carries the run id, so a rerun of the same step never replaces the
    folder ``latest`` may still point to. ``loss_scale``: a float16 run's scaler state, so a
    resumed run scales (and rounds) its gradients as the uninterrupted one does."""
    plan_bytes = Path(plan_path).read_bytes()
    _write_file(tmp / "plan.json", plan_bytes)
    meta = {"step": step, "ranks": ranks, "plan_sha256": hashlib.sha256(plan_bytes).hexdigest()}
    if loss_scale is not None:
        meta["loss_scale"] = loss_scale
    _write_file(tmp / "meta.json", json.dumps(meta, sort_keys=True).encode())
    _fsync_dir(tmp)
    final = root / f"step-{step:08d}-{run_id}"
    os.replace(tmp, final)
    pointer = root / f"{TMP_PREFIX}{LATEST}"
    _write_file(pointer, final.name.encode())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    return final


def remove_stale(root: Path) -> None:
    """Temporary folders of runs that died mid-write (rank 0, before this run writes)."""
    if root.is_dir():
        for path in root.glob(f"{TMP_PREFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _read(folder: Path, rank: int) -> tuple[dict, dict[str, np.ndarray]]:
    layout = json.loads((folder / f"rank{rank}.json").read_text())
    with np.load(folder / f"rank{rank}.npz") as npz:
        return layout, {k: npz[k] for k in npz.files}


def load_own(found: Found, rank: int, specs: dict[str, ShardingSpec]) -> dict[str, np.ndarray]:
    """This rank's shards, written under the same plan."""
    _, arrays = _read(found.folder, rank)
    if set(arrays) != set(specs):
        raise UserError(
            f"checkpoint {str(found.folder)!r}: rank {rank} holds {sorted(arrays)[:3]}..., "
            f"the plan gives it {sorted(specs)[:3]}...: pass --reshard"
        )
    return arrays


def load_full(folder: str | Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Full tensors reassembled from every rank's shards (all names, or ``names``)."""
    folder = Path(folder)
    ranks = int(json.loads((folder / "meta.json").read_text())["ranks"])
    full: dict[str, np.ndarray] = {}
    for rank in range(ranks):
        if not (folder / f"rank{rank}.json").is_file():
            continue
        layout, arrays = _read(folder, rank)
        mesh = RankMesh(tuple(layout["mesh"]["shape"]), tuple(layout["mesh"]["devices"]))
        for name, info in layout["tensors"].items():
            if names is not None and name not in names:
                continue
            shape = tuple(info["shape"])
            if name not in full:
                full[name] = np.empty(shape, arrays[name].dtype)
            box = mesh.box(ShardingSpec.parse(info["spec"]), shape, rank)
            full[name][tuple(slice(a, b) for a, b in box)] = arrays[name]
    return full


def load_resharded(
    found: Found,
    specs: dict[str, ShardingSpec],
    shapes: dict[str, tuple[int, ...]],
    mesh: RankMesh,
    device: int,
) -> dict[str, np.ndarray]:
    """This rank's blocks under the new plan's ``specs``, from a checkpoint of another plan."""
    full = load_full(found.folder, set(specs))
    wrong = sorted(n for n in specs if n not in full or full[n].shape != shapes[n])
    if wrong:
        raise UserError(
            f"checkpoint {str(found.folder)!r} lacks {len(wrong)} tensors this plan trains "
            f"(or has other shapes), first {wrong[0]!r}: it was written for another model"
        )
    return {name: shard(full[name], spec, mesh, device) for name, spec in specs.items()}
