#!/usr/bin/env bash
# One short check of the GPU path on a machine with an NVIDIA GPU (a few minutes at most):
#   (a) onnxruntime's providers, and a MatMul on CUDAExecutionProvider checked against numpy;
#   (b) every NCCL collective through runtime/cuda.py on a world of one rank;
#   (c) the GPT-2 fixture compiled for a one-GPU cluster, its whole training step timed on the
#       GPU through runtime/cuda.py's CudaSession, `alpa-plan run` of the plan (the plan's
#       device kind is gpu, so --backend auto must pick CUDA: checked in the run report),
#       `alpa-plan verify --backend cuda` (GPU step vs the CPU reference), and PyTorch eager on
#       the same model when torch is installed; then a float16 plan verified and run there;
#   (d) the GPU tests of tests/test_cuda_backend.py (skipped elsewhere);
#   (e) `alpa-plan profile` of the one-GPU cluster with two workload sizes, then plans compiled
#       for the measured yaml run next to their predictions.
# Each part prints what is missing and moves on; the exit code is the number of failed parts.
# PARTS=ce runs only parts c and e.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-$(mktemp -d)}
MPIEXEC="$(dirname "$PY")/mpiexec"
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec
failed=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
PARTS=${PARTS:-abcde}  # which parts to run
want() { [[ $PARTS == *"$1"* ]]; }
MODEL=tests/fixtures/gpt2.ts.onnx
DIMS=(--dim batch=16 --dim seq=32)
"$PY" - "$OUT/gpu1.yaml" <<'EOF'
import sys

import yaml

from cost_models.cluster import resolve_cluster

data = resolve_cluster("dgx-h100").model_dump() | {"name": "h100x1", "devices_per_host": 1}
open(sys.argv[1], "w").write(yaml.safe_dump(data, sort_keys=False))
EOF

if want a; then
echo "== (a) onnxruntime CUDA execution provider"
"$PY" - <<'EOF' || failed=$((failed + 1))
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from runtime.cuda import load_cuda_libraries

print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
load_cuda_libraries(ort)
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("missing: CUDAExecutionProvider (pip install onnxruntime-gpu)")
graph = helper.make_graph(
    [helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, [512, 512]) for n in "ab"],
    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [512, 512])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})  # TF32 misses a 1e-2 check at k=512
session = ort.InferenceSession(model.SerializeToString(), providers=[cuda])
a, b = (np.random.default_rng(i).standard_normal((512, 512), np.float32) for i in (0, 1))
(c,) = session.run(None, {"a": a, "b": b})
ok = session.get_providers()[0] == "CUDAExecutionProvider" and np.allclose(c, a @ b, atol=1e-2)
print("CUDA MatMul:", "ok" if ok else "WRONG", session.get_providers())
sys.exit(0 if ok else 1)
EOF
fi

if want b; then
echo "== (b) NCCL collectives through runtime/cuda.py (1 rank)"
timeout 120 "$MPIEXEC" -n 1 "$PY" -m runtime.cuda || failed=$((failed + 1))
fi

if want c; then
echo "== (c) GPT-2 fixture on one GPU"
"$PY" -m cli compile "$MODEL" "${DIMS[@]}" --cluster "$OUT/gpu1.yaml" --loss cross_entropy \
  --labels auto --optimizer adam -o "$OUT/gpu1-plan.json" || failed=$((failed + 1))
"$PY" - "$OUT/gpu1-plan.json" "$MODEL" <<'EOF' || failed=$((failed + 1))
import sys
import time

import onnx_ir as ir

from planner.errors import UserError
from planner.plan_io import load_plan
from runtime.cuda import CudaSession
from runtime.data import synthetic_batch
from runtime.step import prepare_step

plan = load_plan(sys.argv[1])
step = prepare_step(plan, sys.argv[2])
try:
    session = CudaSession(ir.serde.serialize_model(step.model).SerializeToString(), 0)
except UserError as exc:
    sys.exit(f"missing: {exc}")
feeds = {**step.state, **synthetic_batch(step.model.graph, set(step.state), 1, seed=0)}
feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.session.get_inputs()}}
outputs = [o.name for o in session.session.get_outputs()]
session.run(outputs, feeds)
start, steps = time.perf_counter(), 20
for _ in range(steps):
    session.run(outputs, feeds)
print(f"onnxruntime CUDA training step: {(time.perf_counter() - start) / steps * 1e3:.2f} ms "
      f"(plan predicted {plan.predicted.iteration_time * 1e3:.2f} ms)")
EOF
if "$PY" -m cli run "$OUT/gpu1-plan.json" --model "$MODEL" --steps 10 \
  --report "$OUT/gpu1.run.json"; then
  "$PY" - "$OUT/gpu1.run.json" <<'EOF' || failed=$((failed + 1))
import json
import sys

backend = json.load(open(sys.argv[1]))["backend"]
print("run report backend:", backend)
sys.exit(0 if backend == "cuda" else f"expected the cuda backend for a GPU plan, got {backend}")
EOF
else
  failed=$((failed + 1))
fi
"$PY" -m cli verify "$OUT/gpu1-plan.json" --model "$MODEL" --backend cuda || failed=$((failed + 1))
echo "-- the same model planned for float16 (mixed precision) on the GPU"
"$PY" -m cli compile "$MODEL" "${DIMS[@]}" --cluster "$OUT/gpu1.yaml" --loss cross_entropy \
  --labels auto --optimizer adam --dtype float16 -o "$OUT/gpu1-fp16.json" \
  && "$PY" -m cli verify "$OUT/gpu1-fp16.json" --model "$MODEL" --backend cuda \
  && "$PY" -m cli run "$OUT/gpu1-fp16.json" --model "$MODEL" --steps 10 \
  || failed=$((failed + 1))
"$PY" - <<'EOF' || echo "skipped: PyTorch eager comparison (see message above)"
import sys
import time

try:
    import torch
    import transformers
except ImportError as exc:
    sys.exit(f"missing: {exc.name} (PyTorch eager comparison needs torch and transformers)")
if not torch.cuda.is_available():
    sys.exit("missing: torch with CUDA")
# The fixture's configuration (tests/fixtures/export_models.py: build_gpt2).
cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                              bos_token_id=255, eos_token_id=255)
model = transformers.GPT2LMHeadModel(cfg).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
ids = torch.randint(0, 256, (16, 32), device="cuda")


def step() -> None:
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


step()
torch.cuda.synchronize()
start, steps = time.perf_counter(), 20
for _ in range(steps):
    step()
torch.cuda.synchronize()
print(f"PyTorch eager training step: {(time.perf_counter() - start) / steps * 1e3:.2f} ms")
EOF
fi

if want d; then
echo "== (d) GPU tests"
"$PY" -m pytest -q tests/test_cuda_backend.py || failed=$((failed + 1))
fi

if want e; then
echo "== (e) profile this GPU (two workload sizes), then predicted vs measured on it"
for b in 16 64; do
  "$PY" -m cli compile "$MODEL" --dim batch=$b --dim seq=32 --cluster "$OUT/gpu1.yaml" \
    --loss cross_entropy --labels auto --optimizer adam --microbatches 1 \
    -o "$OUT/work-$b.json" >/dev/null || failed=$((failed + 1))
done
if "$PY" -m cli profile --cluster "$OUT/gpu1.yaml" -o "$OUT/measured.yaml" --model "$MODEL" \
  --workload "$OUT/work-16.json" --workload "$OUT/work-64.json"; then
  grep '^#' "$OUT/measured.yaml"
  for b in 16 64; do
    "$PY" -m cli compile "$MODEL" --dim batch=$b --dim seq=32 --cluster "$OUT/measured.yaml" \
      --loss cross_entropy --labels auto --optimizer adam -o "$OUT/calibrated-$b.json" \
      && "$PY" -m cli run "$OUT/calibrated-$b.json" --model "$MODEL" --steps 30 | tail -1 \
      || failed=$((failed + 1))
  done
else
  failed=$((failed + 1))
fi
fi

echo "device check: $failed part(s) failed; outputs in $OUT"
exit "$failed"
