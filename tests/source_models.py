"""Tiny checkpoints in quantized source formats (block FP8, MXFP4), written in-process with safetensors.

Each builder saves a tiny random model of the family (tests/families/tiny.py shapes, bf16) in its on-disk
layout, then writes two directories from it:
- `quant`: the source format (FP8 weights + weight_scale_inv, or MXFP4 blocks + scales) with its
  `quantization_config`;
- `ref`: the same model in bf16 whose weights are the float64 dequantization of `quant`, computed here from
  the format's definition (not with gmmquant's code), rounded once to bf16.
Packing or calibrating `quant` must therefore give exactly what `ref` gives.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.families.tiny import tiny_config
from tests.tiny_models import save_tiny_model

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict, side_from: Path) -> Path:
    path.mkdir(parents=True)
    # two shards: tensors and their scales may sit in different files, as in real checkpoints
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config))
    for side in side_from.iterdir():
        if side.name.startswith("tokenizer") or side.name == "special_tokens_map.json":
            shutil.copy(side, path / side.name)
    return path


def fp8_block_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 `q * scale_inv` block by block, written out with explicit loops over blocks."""
    out = q.double().clone()
    rows, cols = q.shape[-2:]
    for i in range(math.ceil(rows / block[0])):
        for j in range(math.ceil(cols / block[1])):
            out[..., i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale_inv[..., i, j].double()[..., None, None]
    return out


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight `[..., out, in]` -> (float8_e4m3fn weight, float32 scale_inv `[..., ceil(out/b0), ceil(in/b1)]`)."""
    rows, cols = w.shape[-2:]
    r, c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scale = torch.empty(*w.shape[:-2], r, c)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    wf = w.float()
    for i in range(r):
        for j in range(c):
            blk = wf[..., i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s = blk.abs().amax(dim=(-1, -2)).clamp_min(1e-12) / FP8_MAX
            scale[..., i, j] = s
            q[..., i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (blk / s[..., None, None]).to(torch.float8_e4m3fn)
    return q, scale


def fp8_checkpoint(root: Path, model_type: str = "deepseek_v3", block: tuple[int, int] = (128, 128), seed: int = 0,
                   **overrides) -> tuple[Path, Path]:
    """(quant, ref) directories of a tiny `model_type` model whose linear projections are block FP8."""
    config = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(config, k, v)
    float_dir = save_tiny_model(root / "float", config, seed=seed)
    tensors = read_all(float_dir)
    quant, ref = {}, {}
    for name, t in tensors.items():
        # linear projections (attention, shared and routed experts) are FP8; norms, router, embeddings stay bf16
        if name.endswith("proj.weight") and t.dim() in (2, 3):
            q, s = quantize_fp8_block(t, block)
            quant[name], quant[name + "_scale_inv"] = q, s
            ref[name] = fp8_block_reference(q, s, block).to(torch.bfloat16)
        else:
            quant[name] = ref[name] = t
    config_dict = json.loads((float_dir / "config.json").read_text())
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return (_write(root / "quant", quant, {**config_dict, "quantization_config": qc}, float_dir),
            _write(root / "ref", ref, config_dict, float_dir))


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 `[..., out, in]` from uint8 blocks `[..., out, G, 16]` and e8m0 scales `[..., out, G]`, by the
    OCP MX definition: element 2j of a block is the low nibble of byte j, 2j+1 the high one; an e2m1 code
    is sign bit 3, magnitude E2M1[bits 0-2]; the block scale is 2 ** (scale - 127)."""
    b = blocks.long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # [..., out, G, 32]
    magnitude = torch.tensor(E2M1, dtype=torch.float64)[codes & 0x7]
    value = torch.where(codes >= 8, -magnitude, magnitude)
    value = value * torch.pow(2.0, scales.double() - 127.0).unsqueeze(-1)
    return value.flatten(-2)


def mxfp4_checkpoint(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(quant, ref) directories of a tiny gpt-oss whose experts are MXFP4 (random codes and exponents)."""
    config = tiny_config("gpt_oss")
    float_dir = save_tiny_model(root / "float", config, seed=seed)
    tensors = read_all(float_dir)
    gen = torch.Generator().manual_seed(seed)
    quant, ref = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, k, n = t.shape  # stored [E, in, out] like the parameter
            blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=gen)
            scales = torch.randint(118, 124, (e, n, k // 32), dtype=torch.uint8, generator=gen)
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
            ref[name] = mxfp4_reference(blocks, scales).transpose(-1, -2).to(torch.bfloat16)  # exact in bf16
        else:
            quant[name] = ref[name] = t
    config_dict = json.loads((float_dir / "config.json").read_text())
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"]}
    return (_write(root / "quant", quant, {**config_dict, "quantization_config": qc}, float_dir),
            _write(root / "ref", ref, config_dict, float_dir))
