"""The plan: the versioned contract between planner and executor (pydantic models).

A plan is complete enough that ``alpa-plan run`` executes it with only the model file beside
it: the training-step options to rebuild the same step graph (checked by its structure hash),
the cluster, every stage's nodes, device mesh and the strategy of every node (input and
output sharding specs plus the collectives the strategy performs), cross-stage transfers, and
the planner's predictions so the executor can report predicted next to measured.

Sharding specs are strings in ``planner.sharding``'s canonical form: one token per tensor dim,
``R`` (replicated) or ``S`` + mesh axes (``S0``, ``S1``, ``S01``), comma-separated; a partial
sum is appended as ``|P0``. Scalars have the empty spec.

Units: seconds and bytes. Node, stage and transfer costs are per execution of one
micro-batch (the update's per step); ``predicted`` is per training iteration (all
micro-batches): per stage, compute + communication + bubble = iteration time.

Bump ``SCHEMA_VERSION`` on any change an older executor would misread.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
COST_MODEL_VERSION = "alpha-beta-roofline/1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Producer(_Model):
    name: str = "alpa-plan"
    version: str


class ModelIdentity(_Model):
    file: str = Field(description="model file name as given to compile (not a path)")
    structure_sha256: str = Field(description="sha256 of the imported graph, weights excluded")
    dims: dict[str, int] = Field(default_factory=dict)
    input_shapes: dict[str, list[int]]


class TrainingConfig(_Model):
    loss: str = "auto"
    labels: str | None = None
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


class Options(_Model):
    method: Literal["auto", "shard", "data", "zero2", "zero3", "megatron"]
    mode: Literal["train", "infer"] = "train"
    dtype: str = "float32"
    training: TrainingConfig | None = None
    global_batch: int
    microbatches: int = 1
    schedule: Literal["1f1b", "gpipe"] = "1f1b"
    layers: int | None = None
    megatron: dict[str, int] | None = Field(default=None, description="dp/tp/pp when forced")


class Collective(_Model):
    """One collective a strategy performs on its output (or input) along mesh axes."""

    kind: Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"]
    axes: list[int]
    reduce: Literal["sum", "mean", "max", "min"] | None = None
    dim: int | None = Field(default=None, description="tensor dim gathered/scattered")
    output: int = Field(default=0, description="which output of the node it applies to")
    bytes: int = 0
    seconds: float = 0.0


class Alternative(_Model):
    strategy: str
    cost: float


class NodePlan(_Model):
    """How one node runs on its stage's mesh."""

    op: str
    strategy: str
    inputs: list[str | None] = Field(description="spec each input must have (None: absent)")
    outputs: list[str]
    collectives: list[Collective] = Field(default_factory=list)
    local: Literal["vocab_parallel"] | None = Field(
        default=None,
        description="special local program: vocab_parallel = the table's gathered/scattered "
        "axis 0 is split; shift indices by the rank's first row and mask rows held elsewhere",
    )
    replicated_fallback: bool = False
    compute: float = 0.0
    communication: float = 0.0
    resharding: float = 0.0
    alternatives: list[Alternative] = Field(default_factory=list)


class LogicalMeshPlan(_Model):
    shape: list[int]
    device_ids: list[list[int]] = Field(description="global device ids, row-major, 2-D")


class Submesh(_Model):
    hosts: list[int]
    devices: list[int] = Field(description="global device ids = host * devices_per_host + local")


class StageMemory(_Model):
    params: float
    grads: float
    optimizer_state: float
    activations: float = Field(description="bytes of all in-flight micro-batches")
    peak: float


class StagePlan(_Model):
    index: int
    layers: list[int]
    submesh: Submesh
    logical_mesh: LogicalMeshPlan
    nodes: dict[str, NodePlan] = Field(
        description="node name -> plan; nodes run in the training graph's topological order"
    )
    params: dict[str, str] = Field(
        description="parameter and optimizer-state name -> the spec it is stored in"
    )
    inputs: dict[str, str] = Field(description="tensors entering the stage -> spec")
    outputs: dict[str, str] = Field(description="tensors leaving the stage -> spec")
    compute: float
    communication: float
    memory: StageMemory


class Transfer(_Model):
    tensor: str
    src_stage: int
    dst_stage: int
    src_spec: str
    dst_spec: str
    bytes: int
    seconds: float


class IlpStats(_Model):
    stage: int
    objective: float
    bound: float
    gap: float
    variables: int
    constraints: int
    status: str


class SolverStats(_Model):
    """Deterministic solver facts only: wall times would break byte-identical plans, so
    `compile` prints them (and `--timings FILE` writes them) instead."""

    ilps: list[IlpStats] = Field(default_factory=list)
    dp_optimum: float | None = None


class StagePrediction(_Model):
    compute: float
    communication: float
    bubble: float


class Predicted(_Model):
    iteration_time: float
    stages: list[StagePrediction]
    peak_memory_per_device: float
    device_memory: float
    mfu: float
    compute_lower_bound: float
    ratio_to_lower_bound: float


class Plan(_Model):
    schema_version: int = SCHEMA_VERSION
    producer: Producer
    model: ModelIdentity
    cluster: dict = Field(description="the resolved cluster spec (cost_models.cluster.Cluster)")
    options: Options
    cost_model_version: str = COST_MODEL_VERSION
    solver: SolverStats
    stages: list[StagePlan]
    transfers: list[Transfer] = Field(default_factory=list)
    predicted: Predicted
