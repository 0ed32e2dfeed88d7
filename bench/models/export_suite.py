#!/usr/bin/env python
"""Export the graph-only ONNX benchmark models (Alpa's GPT, GShard MoE and Wide-ResNet suites).

Needs torch, transformers, onnx, onnxscript and onnx-ir (not alpa-plan dependencies)::

    /work/torchenv/bin/python bench/models/export_suite.py [--only NAME ...] [--no-inspect]

Each model is built under ``FakeTensorMode`` (no weights), exported with the dynamo exporter
(``optimize=False``, static batch 1) and every initializer becomes a reference to an external
``.data`` file that is never written; load with ``onnx.load(p, load_external_data=False)``.
``manifest.json`` records config, torch parameter count, intended #GPUs, global batch and the
``alpa-plan inspect-model --json`` parameter count and wall time (planner venv).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PLANNER = ROOT / ".venv" / "bin" / "alpa-plan"
OPSET = 18
SEQ = 1024
GLOBAL_BATCH = 1024


def _fixtures() -> Any:
    """The fixture exporter module (``strip_metadata``, ``GraphLogits``, ``_hf``, ``_cfg_dict``)."""
    path = ROOT / "tests" / "fixtures" / "export_models.py"
    spec = importlib.util.spec_from_file_location("export_models", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["export_models"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


FX = _fixtures()

# --------------------------------------------------------------------------- suites

# name: (hidden, layers, heads, #GPUs)  (alpa benchmark/alpa/suite_manual_gpt.py)
GPT: dict[str, tuple[int, int, int, int]] = {
    "gpt-350m": (1024, 24, 16, 1),
    "gpt-760m": (1536, 24, 16, 2),
    "gpt-1.3b": (2048, 24, 32, 4),
    "gpt-2.6b": (2560, 32, 32, 8),
    "gpt-6.7b": (4096, 32, 32, 16),
    "gpt-15b": (5120, 48, 40, 32),
    "gpt-39b": (8192, 48, 64, 64),
}
# name: (hidden, layers, experts, #GPUs); heads 16, vocab 32000 (suite_manual_moe.py)
MOE: dict[str, tuple[int, int, int, int]] = {
    "moe-380m": (768, 8, 8, 1),
    "moe-690m": (768, 8, 16, 2),
    "moe-1.3b": (768, 16, 16, 4),
    "moe-2.4b": (1024, 16, 16, 8),
    "moe-10b": (1536, 16, 32, 16),
    "moe-27b": (2048, 16, 48, 32),
    "moe-70b": (2048, 32, 64, 64),
}
# name: (base channels, width factor, depth, #GPUs)  (suite_wresnet.py; image 224)
WRESNET: dict[str, tuple[int, int, int, int]] = {
    "wresnet-250m": (160, 2, 50, 1),
    "wresnet-500m": (224, 2, 50, 2),
    "wresnet-1b": (320, 2, 50, 4),
    "wresnet-2b": (448, 2, 50, 8),
}
WRESNET_BATCH = 1536

# --------------------------------------------------------------------------- GShard MoE


def top2_gating(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard top-2 gating (as alpa/model/moe.py): (G, S, E) -> combine, dispatch (G, S, E, C).

    One-hots are comparisons with an arange, slot positions a cumsum over the group, so the
    graph stays static (ArgMax, Equal, CumSum, Less, Where, Einsum).
    """
    _, s, e = gates.shape
    c = 2 * s // e
    experts = torch.arange(e, dtype=gates.dtype)
    slots = torch.arange(c, dtype=gates.dtype)
    mask1 = (gates.argmax(-1, keepdim=True).to(gates.dtype) == experts).to(gates.dtype)
    gate1 = (gates * mask1).sum(-1)
    rest = gates * (1 - mask1)
    mask2 = (rest.argmax(-1, keepdim=True).to(gates.dtype) == experts).to(gates.dtype)
    gate2 = (rest * mask2).sum(-1)
    pos1 = torch.cumsum(mask1, dim=1) - mask1
    mask1 = mask1 * (pos1 < c).to(gates.dtype)
    pos1 = (pos1 * mask1).sum(-1)
    pos2 = torch.cumsum(mask2, dim=1) - mask2 + mask1.sum(1, keepdim=True)
    mask2 = mask2 * (pos2 < c).to(gates.dtype)
    pos2 = (pos2 * mask2).sum(-1)
    gate1 = gate1 * mask1.sum(-1)
    gate2 = gate2 * mask2.sum(-1)
    denom = gate1 + gate2
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    slot1 = (pos1.unsqueeze(-1) == slots).to(gates.dtype)
    slot2 = (pos2.unsqueeze(-1) == slots).to(gates.dtype)
    combine = torch.einsum("gse,gsc->gsec", (gate1 / denom).unsqueeze(-1) * mask1, slot1)
    combine = combine + torch.einsum("gse,gsc->gsec", (gate2 / denom).unsqueeze(-1) * mask2, slot2)
    dispatch = (combine > 0).to(gates.dtype)
    return combine, dispatch


class MoEFFN(nn.Module):
    """Position-wise GShard MoE: expert weights (E, M, H) and (E, H, M), expert dim explicit."""

    def __init__(self, m: int, h: int, e: int, group: int) -> None:
        super().__init__()
        self.group = group
        self.wg = nn.Parameter(torch.randn(m, e) * 0.02)
        self.wi = nn.Parameter(torch.randn(e, m, h) * 0.02)
        self.wo = nn.Parameter(torch.randn(e, h, m) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, m = x.shape
        xs = x.reshape(-1, self.group, m)  # (G, S, M)
        gates = torch.softmax(torch.einsum("gsm,me->gse", xs, self.wg), dim=-1)
        combine, dispatch = top2_gating(gates)
        xe = torch.einsum("gsec,gsm->egcm", dispatch, xs)
        hid = torch.relu(torch.einsum("egcm,emh->egch", xe, self.wi))
        ye = torch.einsum("egch,ehm->egcm", hid, self.wo)
        return torch.einsum("gsec,egcm->gsm", combine, ye).reshape(b, t, m)


class Attention(nn.Module):
    """BERT self-attention (no mask) followed by the output projection."""

    def __init__(self, m: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(m, m) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, m = x.shape
        d = m // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, m))


class MoEBlock(nn.Module):
    """Post-LN BERT layer; the FFN is GShard MoE (relu experts) or dense (gelu)."""

    def __init__(self, m: int, heads: int, ffn: int, experts: int, group: int) -> None:
        super().__init__()
        self.attn = Attention(m, heads)
        self.ln1 = nn.LayerNorm(m, eps=1e-12)
        self.moe = MoEFFN(m, ffn, experts, group) if experts else None
        if self.moe is None:
            self.fc1, self.fc2 = nn.Linear(m, ffn), nn.Linear(ffn, m)
        self.ln2 = nn.LayerNorm(m, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln1(x + self.attn(x))
        y = self.moe(a) if self.moe is not None else self.fc2(F.gelu(self.fc1(a)))
        return self.ln2(a + y)


class GShardMoELM(nn.Module):
    """Alpa's FlaxMoEForLMModule: BERT embeddings, MoE on even layers, tied LM head + bias."""

    def __init__(
        self, vocab: int, m: int, layers: int, heads: int, experts: int, group: int, seq: int
    ) -> None:
        super().__init__()
        ffn = 8 * m  # alpa's MoE suite uses mlp_factor 8
        self.wte = nn.Embedding(vocab, m)
        self.wpe = nn.Embedding(seq, m)
        self.ln = nn.LayerNorm(m, eps=1e-12)
        self.h = nn.ModuleList(
            MoEBlock(m, heads, ffn, experts if i % 2 == 0 else 0, group) for i in range(layers)
        )
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.ln(self.wte(input_ids) + self.wpe.weight[:t])
        for block in self.h:
            x = block(x)
        return x @ self.wte.weight.t() + self.bias


# --------------------------------------------------------------------------- Wide-ResNet


class Bottleneck(nn.Module):
    """Alpa's BottleneckResNetBlock: 1x1 (f), 3x3 (f*width), 1x1 (4f), projected shortcut."""

    def __init__(self, cin: int, f: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, f, 1, bias=False),
            nn.BatchNorm2d(f),
            nn.ReLU(),
            nn.Conv2d(f, f * width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(f * width),
            nn.ReLU(),
            nn.Conv2d(f * width, 4 * f, 1, bias=False),
            nn.BatchNorm2d(4 * f),
        )
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != 4 * f:
            self.short = nn.Sequential(
                nn.Conv2d(cin, 4 * f, 1, stride, bias=False), nn.BatchNorm2d(4 * f)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.short(x) + self.body(x))


class WideResNet(nn.Module):
    """Alpa's wide_resnet.ResNet (bottleneck blocks, ResNet-50/101 stage sizes)."""

    def __init__(self, filters: int, width: int, depth: int, classes: int = 1024) -> None:
        super().__init__()
        stages = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
        self.stem = nn.Sequential(
            nn.Conv2d(3, filters, 7, 2, 3, bias=False),
            nn.BatchNorm2d(filters),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], filters
        for i, n in enumerate(stages):
            for j in range(n):
                f = filters * 2**i
                blocks.append(Bottleneck(cin, f, width, 2 if i > 0 and j == 0 else 1))
                cin = 4 * f
        self.h = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.h:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- export


def export_fake(
    build: Callable[[], nn.Module], example: Callable[[], torch.Tensor], in_name: str, path: Path
) -> dict[str, Any]:
    """Export ``build()`` under FakeTensorMode to a graph-only ONNX file; return counts."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build().eval()
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for n, b in model.named_buffers() if "num_batches" not in n)
        prog = torch.onnx.export(
            model,
            (example(),),
            input_names=[in_name],
            output_names=["logits"],
            dynamo=True,
            optimize=False,
            opset_version=OPSET,
            verbose=False,
        )
    irm = prog.model
    data_name = path.name + ".data"  # never written
    offset = 0
    for value in irm.graph.initializers.values():
        old = value.const_value
        assert old is not None
        length = int(np.prod(old.shape.numpy(), dtype=np.int64) * old.dtype.itemsize)
        value.const_value = ir.ExternalTensor(
            data_name, offset, length, old.dtype, shape=old.shape, name=value.name
        )
        offset += length
    proto = ir.serde.serialize_model(irm)
    FX.strip_metadata(proto)
    onnx.save(proto, str(path))
    onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    return {
        "torch_params": params,
        "torch_buffer_elements": buffers,
        "external_data_file_never_written": data_name,
        "external_data_bytes_referenced": offset,
        "num_nodes": len(proto.graph.node),
    }


def gpt_entry(name: str) -> tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict]:
    """Builder, input and config of one GPT (GPT-2 architecture, eager attention)."""
    h, layers, heads, _ = GPT[name]
    cfg = transformers.GPT2Config(
        vocab_size=51200,
        n_positions=SEQ,
        n_embd=h,
        n_layer=layers,
        n_head=heads,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    meta = {**FX._cfg_dict(cfg), "seq": SEQ, "batch": 1}
    return (
        lambda: FX.GraphLogits(FX._hf("GPT2LMHeadModel", cfg)),
        lambda: torch.zeros(1, SEQ, dtype=torch.int64),
        meta,
    )


def moe_entry(name: str) -> tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict]:
    """Builder, input and config of one GShard MoE LM."""
    h, layers, experts, _ = MOE[name]
    group = min(2048, SEQ)  # alpa's expert_group_size 2048 > one batch-1 sequence: G = 1
    meta = {
        "model_type": "gshard_moe_lm (alpa FlaxMoEForLMModule, post-LN BERT layers)",
        "vocab_size": 32000,
        "hidden_size": h,
        "num_layers": layers,
        "num_heads": 16,
        "intermediate_size": 8 * h,
        "num_experts": experts,
        "moe_layers": "even layer indices (0, 2, ...)",
        "gating": "top-2, capacity C = 2*S/E",
        "group_size_S": group,
        "capacity_C": 2 * group // experts,
        "alpa_expert_group_size": 2048,
        "tie_word_embeddings": True,
        "seq": SEQ,
        "batch": 1,
    }
    return (
        lambda: GShardMoELM(32000, h, layers, 16, experts, group, SEQ),
        lambda: torch.zeros(1, SEQ, dtype=torch.int64),
        meta,
    )


def wresnet_entry(name: str) -> tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict]:
    """Builder, input and config of one Wide-ResNet (eval-mode BatchNorm)."""
    filters, width, depth, _ = WRESNET[name]
    meta = {
        "model_type": "wide_resnet (alpa wide_resnet.ResNet, bottleneck)",
        "depth": depth,
        "num_filters": filters,
        "width_factor": width,
        "num_classes": 1024,
        "image_size": 224,
        "batch": 1,
        "batchnorm": "eval mode (running stats are initializers)",
    }
    return (
        lambda: WideResNet(filters, width, depth),
        lambda: torch.zeros(1, 3, 224, 224),
        meta,
    )


def inspect(path: Path) -> dict[str, Any]:
    """Run ``alpa-plan inspect-model --json`` and time it."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [str(PLANNER), "inspect-model", str(path), "--json"], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"inspect_ok": False, "inspect_error": res.stderr[-2000:], "import_seconds": wall}
    rep = json.loads(res.stdout)
    return {
        "inspect_ok": not rep["unsupported_ops"],
        "inspect_num_parameters": rep["num_parameters"],
        "inspect_unsupported_ops": rep["unsupported_ops"],
        "inspect_num_nodes": rep["num_nodes"],
        "inspect_forward_flops": rep["forward_flops"],
        "import_seconds": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Export the requested models and update manifest.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [*GPT, *MOE, *WRESNET]
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--no-inspect", action="store_true", help="skip alpa-plan inspect-model")
    ap.add_argument(
        "--inspect-only", action="store_true", help="re-time inspect-model on existing files"
    )
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    a.out.mkdir(parents=True, exist_ok=True)
    manifest_path = a.out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    models: dict[str, Any] = old.get("models", {})
    ok = True
    for name in a.only or names:
        if name in GPT:
            suite, (build, example, cfg), in_name = "gpt", gpt_entry(name), "input_ids"
            gpus, batch = GPT[name][3], GLOBAL_BATCH
        elif name in MOE:
            suite, (build, example, cfg), in_name = "moe", moe_entry(name), "input_ids"
            gpus, batch = MOE[name][3], GLOBAL_BATCH
        else:
            suite, (build, example, cfg), in_name = "wresnet", wresnet_entry(name), "x"
            gpus, batch = WRESNET[name][3], WRESNET_BATCH
        path = a.out / f"{name}.graph.onnx"
        print(f"== {name}", flush=True)
        if a.inspect_only:
            if name in models and path.exists():
                models[name].update(inspect(path))
                ok &= models[name]["inspect_ok"]
            continue
        t0 = time.time()
        entry: dict[str, Any] = {
            "file": path.name,
            "suite": suite,
            "config": cfg,
            "num_gpus": gpus,
            "global_batch": batch,
        }
        try:
            entry.update(export_fake(build, example, in_name, path))
            entry["export_seconds"] = round(time.time() - t0, 1)
            entry["file_bytes"] = path.stat().st_size
            if not a.no_inspect:
                entry.update(inspect(path))
                ok &= entry["inspect_ok"]
            print(json.dumps({k: v for k, v in entry.items() if k != "config"}), flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            entry.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:500]}")
            ok = False
        models[name] = entry
    manifest = {
        "generated_by": "bench/models/export_suite.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "notes": [
            "Graph-only: initializers reference <file>.data, never written; "
            "onnx.load(path, load_external_data=False).",
            "Static batch 1 (one micro-batch of size 1); global_batch is the suite's.",
            "torch_params = sum(p.numel()) of the module (tied embeddings once); BatchNorm "
            "running stats are torch_buffer_elements and appear as ONNX initializers.",
            "import_seconds: wall time of `.venv/bin/alpa-plan inspect-model --json`.",
        ],
        "models": {k: models[k] for k in names if k in models},
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
