"""Write a plan into the model as standard ONNX IR v11 multi-device annotations.

Other ONNX tools can read a plan only in ONNX's own vocabulary: ``ModelProto.configuration``
declares the devices, each ``NodeProto.device_configurations`` entry gives the node's
``pipeline_stage`` and a ``sharding_spec`` per input/output. ONNX treats several
configurations as *alternative* targets ("a backend may ignore configurations it cannot
run"), so a plan is one configuration spanning every device of its cluster; a stage's mesh
is the set of device indices its nodes' specs name, and device index = global device id.

Mapping of a spec onto ``ShardingSpecProto``: split dims become ``sharded_dim`` entries in
tensor-dim order (a dim split over several mesh axes is one ``num_shards`` = product, major
axis first), and shards are enumerated row-major over them, as the ONNX proposal specifies;
the devices a shard is replicated on (free mesh axes) form an ``index_to_device_group_map``
group. ONNX has no partial-sum sharding, so tensors with ``|P`` specs get no spec; the node's
full strategy is kept in ``metadata_props['alpa_plan.strategy']``.

The model is the one the plan was compiled from, imported the same way (static shapes,
folded shape math), so node names match the plan. Backward and optimizer nodes of the plan
have no counterpart in the forward model and are not written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from planner.errors import UserError
from planner.plan_io import write_atomic
from planner.plan_schema import LogicalMeshPlan, NodePlan, Plan
from planner.sharding import ShardingSpec as Spec

IR_VERSION = 11  # first IR version with multi-device annotations
CONFIGURATION = "alpa-plan"


def annotate_onnx(
    model: str | Path | ir.Model, plan: Plan, out_path: str | Path, *, base_dir: str | None = None
) -> ir.Model:
    """Annotate ``model`` (a path, imported with the plan's dims, or an imported ``ir.Model``,
    annotated in place) with ``plan`` and write it to ``out_path`` atomically.

    Weights stay where they are: external tensors are re-pointed relative to ``out_path``
    (``base_dir`` is where a given ``ir.Model``'s external files live; default: the model
    file's folder or the tensors' own base dir), embedded ones are written inline.
    """
    if isinstance(model, str | Path):
        from planner.importer import ImportOptions, import_model, structure_hash

        opts = ImportOptions(
            dims=plan.model.dims,
            input_shapes={k: tuple(v) for k, v in plan.model.input_shapes.items()},
        )
        base_dir = str(Path(model).parent) if base_dir is None else base_dir
        model = import_model(model, opts)
        if structure_hash(model) != plan.model.structure_sha256:
            raise UserError(
                f"the model is not the one the plan was compiled from ({plan.model.file}): "
                "pass the same model file and recompile if it changed"
            )
    _annotate(model, plan)
    _write(model, Path(out_path), base_dir)
    return model


def _annotate(model: ir.Model, plan: Plan) -> None:
    cluster = plan.cluster
    per_host = int(cluster["devices_per_host"])
    num_devices = int(cluster["hosts"]) * per_host
    kind = "cuda" if cluster["device"].get("kind", "gpu") == "gpu" else "cpu"
    config = model.add_device_configuration(
        CONFIGURATION,
        device_names=[f"host{d // per_host}/{kind}:{d % per_host}" for d in range(num_devices)],
    )
    placed = {
        name: (stage.index, stage.logical_mesh, node)
        for stage in plan.stages
        for name, node in stage.nodes.items()
    }
    for node in model.graph:
        if node.name not in placed:
            continue
        stage, mesh, node_plan = placed[node.name]
        specs = _node_specs(node, node_plan, mesh)
        node.device_configurations = (
            ir.NodeDeviceConfiguration(
                configuration=config, sharding_specs=tuple(specs), pipeline_stage=stage
            ),
        )
        node.metadata_props["alpa_plan.strategy"] = node_plan.strategy
    model.ir_version = max(model.ir_version, IR_VERSION)


def _node_specs(node: ir.Node, plan: NodePlan, mesh: LogicalMeshPlan) -> list[ir.ShardingSpec]:
    if len(plan.inputs) > len(node.inputs) or len(plan.outputs) > len(node.outputs):
        raise UserError(
            f"plan node {node.name!r} has {len(plan.inputs)} inputs/{len(plan.outputs)} "
            f"outputs but the model's has {len(node.inputs)}/{len(node.outputs)}: "
            "the plan belongs to another model"
        )
    out: list[ir.ShardingSpec] = []
    seen: set[ir.Value] = set()
    pairs = [
        *zip(node.inputs, plan.inputs, strict=False),
        *zip(node.outputs, plan.outputs, strict=False),
    ]
    for value, text in pairs:
        if value is None or text is None or value in seen:
            continue
        seen.add(value)
        spec = Spec.parse(text)
        if spec.partial:
            continue
        shape = value.shape
        if shape is None or len(shape) != spec.rank:
            raise UserError(
                f"plan spec {text!r} of {value.name!r} (node {node.name!r}) does not match "
                f"its shape {shape}: the plan belongs to another model"
            )
        out.append(_sharding_spec(value, spec, mesh))
    return out


def _sharding_spec(value: ir.Value, spec: Spec, mesh: LogicalMeshPlan) -> ir.ShardingSpec:
    """Shards row-major over the split dims; each shard's replica devices form one group."""
    ids = np.asarray(mesh.device_ids, dtype=np.int64).reshape(mesh.shape)
    order = [a for d in spec.dims for a in d]
    free = [a for a in range(ids.ndim) if a not in order]
    groups = ids.transpose(order + free).reshape(math.prod(ids.shape[a] for a in order), -1)
    devices: list[int] = []
    group_map: list[ir.IndexToDeviceGroupMapEntry] = []
    for group in groups.tolist():
        if len(group) == 1:
            devices.append(group[0])
        else:
            key = -1 - len(group_map)
            devices.append(key)
            group_map.append(ir.IndexToDeviceGroupMapEntry(key=key, value=tuple(group)))
    assert value.shape is not None
    dims = tuple(
        ir.ShardedDim(
            axis=i,
            simple_shardings=(
                ir.SimpleShardedDim(
                    dim=value.shape[i], num_shards=math.prod(ids.shape[a] for a in axes)
                ),
            ),
        )
        for i, axes in enumerate(spec.dims)
        if axes
    )
    return ir.ShardingSpec(
        value=value,
        device=tuple(devices),
        index_to_device_group_map=tuple(group_map),
        sharded_dims=dims,
    )


def _write(model: ir.Model, out: Path, base_dir: str | None) -> None:
    """Serialize with external tensors re-pointed relative to ``out``; rename into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            source = base_dir if base_dir is not None else tensor.base_dir
            target = os.path.abspath(os.path.join(source or ".", tensor.location))
            value.const_value = ir.ExternalTensor(
                os.path.relpath(target, out.parent.resolve()),
                tensor.offset,
                tensor.length,
                tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
                base_dir=str(out.parent),
            )
    write_atomic(out, ir.to_proto(model).SerializeToString())
