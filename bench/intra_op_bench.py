"""Per-stage intra-op ILP stats for the GPT-2.6B training graph on one p3.16xlarge host.

    .venv/bin/python bench/intra_op_bench.py [--layers-per-stage 8] [--mesh 1x8] [--method shard]

The graph-only fixture (32 layers, h=2560, seq 1024, batch 1) is imported, the training step
(cross-entropy, Adam) is derived, and the nodes are cut into stages of whole transformer
blocks by the ``h.<i>.`` name prefix; each stage's ILP is solved on the given logical mesh.
"""

from __future__ import annotations

import argparse
import re
import time

from cost_models.cluster import resolve_cluster
from planner.importer import import_model
from planner.intra_op import IntraOpOptions, solve_intra_op
from planner.mesh import logical_meshes
from planner.training import TrainingOptions, build_training_step

FIXTURE = "tests/fixtures/gpt3-2.6b.graph.onnx"
LAYER = re.compile(r"h\.(\d+)\.")


def stages(graph, layers_per_stage: int) -> list[list]:
    """Nodes grouped by the block their name (or their forward node's name) mentions."""
    out: dict[int, list] = {}
    current = 0
    for node in graph:
        key = (
            node.name
            + node.metadata_props.get("alpa.forward_node", "")
            + node.metadata_props.get("alpa.param", "")
        )
        found = LAYER.search(key)
        layer = int(found.group(1)) if found else current
        current = layer
        out.setdefault(layer // layers_per_stage, []).append(node)
    return [out[k] for k in sorted(out)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers-per-stage", type=int, default=8)
    ap.add_argument("--mesh", default="1x8")
    ap.add_argument("--method", default="shard")
    args = ap.parse_args()
    cluster = resolve_cluster("p3.16xlarge")
    shape = tuple(int(x) for x in args.mesh.split("x"))
    mesh = next(m for m in logical_meshes(cluster, range(8)) if m.shape == shape)
    t = time.perf_counter()
    model = build_training_step(
        import_model(FIXTURE), TrainingOptions(loss="cross_entropy", labels="auto")
    )
    print(f"training graph: {len(model.graph)} nodes in {time.perf_counter() - t:.1f}s")
    for i, nodes in enumerate(stages(model.graph, args.layers_per_stage)):
        t = time.perf_counter()
        sol = solve_intra_op(nodes, mesh, cluster, IntraOpOptions(method=args.method))
        s = sol.stats
        print(
            f"stage {i}: {len(nodes)} nodes, vars {s.num_vars} (int {s.num_int_vars}), "
            f"rows {s.num_constraints}, solve {s.solve_seconds:.2f}s, "
            f"total {time.perf_counter() - t:.2f}s, gap {s.mip_gap:.2e}, {s.status}, "
            f"objective {s.objective * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    main()
