"""Cluster spec: the hardware a plan targets, as a validated pydantic model.

A cluster is ``hosts`` identical hosts of ``devices_per_host`` devices. Links are given as
bandwidth in bytes/s and latency in seconds: ``intra_host`` is one device's link to its
host-mates (NVLink/NVSwitch, or shared memory for CPU ranks), ``inter_host`` is one *host's*
network bandwidth (all NICs together), which the devices of a host share when they talk
across hosts at the same time.

Presets: ``p3.16xlarge`` (Alpa's testbed), ``dgx-a100``, ``dgx-h100``, ``cpu``. On the command
line ``NAME:N`` means N hosts for GPU presets; for ``cpu``, ``cpu:4`` is one host of 4 ranks
and ``cpu:2x2`` two simulated hosts of 2 ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from planner.errors import UserError

DType = Literal["float32", "float16", "bfloat16", "float64"]
CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"]
PRESET_DIR = Path(__file__).parent / "clusters"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Link(_Strict):
    bandwidth: PositiveFloat = Field(description="bytes/s")
    latency: float = Field(ge=0, description="seconds per message (alpha)")
    collective_bandwidth: dict[CollectiveKind, PositiveFloat] = Field(
        default_factory=dict,
        description="bytes/s (B of the ring formulas) that collectives of a kind get where it "
        "differs from bandwidth; `profile` measures it (on CPU ranks an all-reduce's reduction "
        "runs at memory speed, far below a plain copy between ranks)",
    )


class Device(_Strict):
    name: str
    kind: Literal["gpu", "cpu"] = "gpu"
    peak_flops: dict[DType, PositiveFloat] = Field(description="FLOP/s per dtype")
    memory_bytes: PositiveFloat
    memory_bandwidth: PositiveFloat = Field(description="bytes/s")
    compute_efficiency: float = Field(0.7, gt=0, le=1, description="achieved / peak FLOP/s")
    memory_efficiency: float = Field(0.7, gt=0, le=1, description="achieved / peak bytes/s")
    sync_jitter: float = Field(
        0.0,
        ge=0,
        description="seconds^0.5: ranks' compute times jitter independently, so at each "
        "collective the ranks wait for the slowest, on average sync_jitter * sqrt(seconds of "
        "work since the previous collective) (`profile` measures it; about 0 on dedicated "
        "GPUs, 0.005 on a shared 2-core VM)",
    )
    kernel_latency: float = Field(5e-6, ge=0, description="seconds of fixed cost per op")
    dispatch_latency: float = Field(
        0.0,
        ge=0,
        description="seconds the executor spends per communication instruction besides the "
        "transfer: dispatching it, and the extra session call of the segment boundary it makes",
    )


class Cluster(_Strict):
    name: str
    hosts: PositiveInt
    devices_per_host: PositiveInt
    device: Device
    intra_host: Link
    inter_host: Link

    @property
    def num_devices(self) -> int:
        return self.hosts * self.devices_per_host

    def host_of(self, device: int) -> int:
        return device // self.devices_per_host


def _validation_message(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    return f"{source}: field '{loc}': {first['msg']} (see examples/clusters/*.yaml)"


def cluster_from_dict(data: object, source: str = "cluster") -> Cluster:
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: expected a mapping of cluster fields, got {type(data).__name__}"
        )
    try:
        return Cluster.model_validate(data)
    except ValidationError as err:
        raise UserError(_validation_message(source, err)) from None


def load_cluster_yaml(path: str | Path) -> Cluster:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read cluster file {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return cluster_from_dict(data, source=str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_cluster(spec: str) -> Cluster:
    """``--cluster`` value: a yaml path, ``PRESET``, ``PRESET:HOSTS`` or ``cpu:N`` / ``cpu:HxN``."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_cluster_yaml(spec)
    name, _, count = spec.partition(":")
    if name not in preset_names():
        raise UserError(
            f"unknown cluster {spec!r}: pass a yaml file or one of {preset_names()} "
            "(e.g. p3.16xlarge:8, cpu:4, cpu:2x2)"
        )
    base = load_cluster_yaml(PRESET_DIR / f"{name}.yaml").model_dump()
    if count:
        hosts_s, x, per_host_s = count.partition("x")
        if not hosts_s.isdigit() or (x and not per_host_s.isdigit()) or int(hosts_s) < 1:
            raise UserError(f"bad cluster count in {spec!r}: write NAME:HOSTS or cpu:N / cpu:HxN")
        if x:
            base["hosts"], base["devices_per_host"] = int(hosts_s), int(per_host_s)
        elif base["device"]["kind"] == "cpu":
            base["hosts"], base["devices_per_host"] = 1, int(hosts_s)
        else:
            base["hosts"] = int(hosts_s)
        if min(base["hosts"], base["devices_per_host"]) < 1:
            raise UserError(f"bad cluster count in {spec!r}: counts must be >= 1")
        base["name"] = spec
    return cluster_from_dict(base, source=spec)
