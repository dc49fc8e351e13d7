"""AscendV1 checkpoints (msModelSlim's layout, read by vllm-ascend and MindIE): export and import.

An AscendV1 directory holds safetensors weights, `quant_model_description.json` (every tensor name -> its
quant type string, plus `model_quant_type`, `version`, `group_size`, `metadata`) and the model's config.json
without a `quantization_config` (MindIE reads `"quantize"` from it instead). Experts are stored as one nn.Linear
per expert under the model's original names (`<base>` = e.g. `model.layers.0.mlp.experts.3.gate_proj`):

| type | tensors per expert linear | loader taking it for MoE |
|---|---|---|
| `W8A8_DYNAMIC` | `<base>.weight` int8 `[N, K]`, `<base>.weight_scale` fp32 `[N, 1]`, `<base>.weight_offset` fp32 `[N, 1]` (zeros) | vllm-ascend `AscendW8A8DynamicFusedMoEMethod`; MindIE |
| `W4A16` | `<base>.weight_packed` int32 `[N, K/8]` (compressed-tensors packing, packing.py), `<base>.weight_scale` `[N, K/g]`, `<base>.weight_shape` `[2]`; description `group_size` = g | vllm-ascend `AscendW4A16FusedMoEMethod` (symmetric only: it builds zero offsets and loads none) |
| `W4A8_DYNAMIC` | `<base>.weight` int8 `[N/2, K]` (two int4 per byte along N), `weight_scale` / `weight_offset` fp32 `[N, 1]`, per group `weight_scale_second` fp32 / `weight_offset_second` int64 `[N, K/g]`, `scale_bias` fp32 `[N, 1]` or `[N, 16]` (down_proj); description `version` "1.0.0", `group_size` g or 0 | vllm-ascend `AscendW4A8DynamicFusedMoEMethod` (the GMM's A8W4 mode) |
| `W8A8_MIX` | `<base>.weight` int8 `[N, K]`, `weight_scale` / `weight_offset` fp32 `[N, 1]`, `input_scale` / `input_offset` fp32 `[1]`, `quant_bias` int32 `[N]`, `deq_scale` `[N]` | vllm-ascend `AscendW8A8PDMixFusedMoeMethod`, which quantizes activations per token |
| `W8A16` | `<base>.weight` int8 `[N, K]`, `<base>.weight_scale` fp32 `[N, 1]`, `<base>.weight_offset` fp32 `[N, 1]` | import only: msModelSlim writes it per Linear; vllm-ascend registers W8A16 for linear layers only, not MoE |

Sign: msModelSlim dequantizes `(q - weight_offset) * weight_scale`, so `weight_offset` is a zero point that is
SUBTRACTED; gmmquant's `antiquant_offset` (added by the kernel) is its negation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..pack.checkpoint import copy_side_files, load_quantized
from ..pack.format import FormatError
from ..pack.safety import read_json_object
from ..pack.schemes import QuantScheme
from ..pack.shards import ShardWriter, atomic_output_dir, parse_size
from .compressed_tensors import check_exportable
from .export import float_experts_modules, float_tensors
from .foreign import ForeignCheckpoint, LinearFormat, make_scheme, read_all, read_foreign
from .linears import LinearCodes, split_projection
from .naming import Naming
from .packing import pack_offset_binary, unpack_offset_binary

logger = logging.getLogger(__name__)

DESCRIPTION = "quant_model_description.json"
SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_offset", "weight_shape", "bias", "weight_scale_second",
            "weight_offset_second", "scale_bias", "input_scale", "input_offset", "deq_scale", "quant_bias")
FLOAT = "FLOAT"
# msModelSlim records the lowest-bit type present as model_quant_type.
PRIORITY = ("FLOAT", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W4A16", "W4A8_DYNAMIC")


def quant_type(scheme: QuantScheme) -> str:
    """The AscendV1 type string of a gmmquant scheme, or FormatError saying why vllm-ascend's MoE loader could
    not take it (the rule of `gmmquant calibrate --target vllm-ascend`, interop/engines.py)."""
    from .engines import ENGINES

    why = ENGINES["vllm-ascend"].refusal(scheme)
    if why is not None:
        raise FormatError(f"{why} (rule: `export --to ascend` writes only what vllm-ascend's MoE loader runs)")
    if scheme.activation == "dynamic":
        return "W4A8_DYNAMIC" if scheme.weight_bits == 4 else "W8A8_DYNAMIC"
    if scheme.activation == "static":
        return "W8A8_MIX"
    return "W4A16"


ROW_PARALLEL = ("down_proj", "w2")  # msModelSlim splits these Linears' scale_bias into TP_SLICES K-slices
TP_SLICES = 16


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """`[N, K]` int4 codes -> `[N/2, K]` int8, two codes per byte along N: row r holds output 2r in the low
    nibble and 2r+1 in the high one (msModelSlim's W4A8 / per-group W4A16 packing, which vllm-ascend views as
    int32 words of 8 codes: exactly gmmquant's int4 layout once transposed)."""
    if q.shape[0] % 2:
        raise FormatError(f"two int4 per byte along N needs N even, got N={q.shape[0]}")
    q = q.to(torch.int16) & 0xF  # two's complement nibbles, in [0, 15]
    return (q[0::2] | (q[1::2] << 4)).to(torch.uint8).view(torch.int8).contiguous()


def unpack_int4_pairs(packed: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack_int4_pairs` along `dim` (0: `[N/2, K]` -> `[N, K]`; 1: `[N, K/2]` -> `[N, K]`), sign-extended."""
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0xF, b >> 4
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=dim + 1).flatten(dim, dim + 1).to(torch.int8)


def w4a8_tensors(base: str, codes: LinearCodes, group_size: Optional[int]) -> dict[str, torch.Tensor]:
    """msModelSlim's W4A8_DYNAMIC "version 1.0.0" tensors of one expert nn.Linear, as vllm-ascend's
    `AscendW4A8DynamicFusedMoEMethod` reads them.

    Per group, the stored scale (float16 values) is written as msModelSlim's two levels: `weight_scale` the
    per-channel maximum, `weight_scale_second` the per-group ratio, so that `fp16(weight_scale *
    weight_scale_second)`, what vllm-ascend multiplies and casts, gives back the stored scale exactly.
    `scale_bias` is the A8W4 bias `8 * sum_k(q * scale)`; for row-parallel Linears (down_proj) it is split into
    TP_SLICES partial sums over K slices (any TP size dividing 16 takes its own slices), as msModelSlim does.
    """
    n, k = codes.q.shape
    scale = codes.scale.float()  # [N, G]
    full = scale.repeat_interleave(k // scale.shape[1], dim=1)  # [N, K]
    contrib = codes.q.float() * full
    if base.rsplit(".", 1)[-1] in ROW_PARALLEL:
        if k % TP_SLICES:
            raise FormatError(f"{base}: K={k} must be a multiple of {TP_SLICES} for the row-parallel scale_bias slices")
        scale_bias = 8 * contrib.reshape(n, TP_SLICES, k // TP_SLICES).sum(dim=2)
    else:
        scale_bias = 8 * contrib.sum(dim=1, keepdim=True)
    out = {f"{base}.weight": pack_int4_pairs(codes.q)}
    if group_size is None:
        out.update({f"{base}.weight_scale": scale.contiguous(), f"{base}.weight_offset": torch.zeros(n, 1)})
    else:
        first = scale.amax(dim=1, keepdim=True)
        second = scale / first
        if not torch.equal((first * second).to(torch.float16).float(), scale):
            raise FormatError(f"{base}: the per-group scale does not factor exactly into msModelSlim's two levels")
        out.update({f"{base}.weight_scale": first.contiguous(), f"{base}.weight_offset": torch.zeros(n, 1),
                    f"{base}.weight_scale_second": second.contiguous(),
                    f"{base}.weight_offset_second": torch.zeros(n, scale.shape[1], dtype=torch.int64)})
    out[f"{base}.scale_bias"] = scale_bias.contiguous()
    return out


def w8a8_mix_tensors(base: str, codes: LinearCodes, input_scale: float, act_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """msModelSlim's W8A8_MIX tensors of one expert nn.Linear (its per-Linear static W8A8 layout plus
    weight_scale / weight_offset): symmetric activations (input_offset 0), no Linear bias (quant_bias 0),
    `deq_scale = input_scale * weight_scale` as float32, or its bits as int64 for float16 models (msModelSlim's
    deqscale2int64 rule)."""
    n, _ = codes.q.shape
    weight_scale = codes.scale.float().reshape(n, 1)
    deq = (torch.tensor(input_scale, dtype=torch.float32) * weight_scale[:, 0]).contiguous()
    if act_dtype != torch.bfloat16:
        deq = deq.view(torch.int32).to(torch.int64)
    return {f"{base}.weight": codes.q.to(torch.int8).contiguous(), f"{base}.weight_scale": weight_scale,
            f"{base}.weight_offset": torch.zeros(n, 1), f"{base}.input_scale": torch.tensor([input_scale], dtype=torch.float32),
            f"{base}.input_offset": torch.zeros(1), f"{base}.quant_bias": torch.zeros(n, dtype=torch.int32),
            f"{base}.deq_scale": deq}


def expert_linears_with_input_scale(ck, naming: Naming) -> Iterator[tuple[Any, str, LinearCodes, Optional[float]]]:
    """`expert_linears`, plus each expert's calibrated input scale for W8A8 static modules (else None)."""
    for prefix, spec in ck.specs.items():
        for proj, qw in ck.projections(prefix).items():
            names = naming.expert_linears(f"{prefix}.{proj}", spec.num_experts)
            scales = ck.tensor(f"{prefix}.{proj}.input_scale").float() if spec.scheme.activation == "static" else None
            for e, row in enumerate(split_projection(qw, len(names[0]))):
                for base, codes in zip(names[e], row):
                    yield spec, base, codes, None if scales is None else float(scales[e])


def linear_tensors(base: str, codes: LinearCodes, qtype: str, group_size: Optional[int] = None,
                   input_scale: Optional[float] = None, act_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """AscendV1 tensors of one expert nn.Linear (see the module docstring)."""
    n, k = codes.q.shape
    if qtype == "W4A8_DYNAMIC":
        return w4a8_tensors(base, codes, group_size)
    if qtype == "W8A8_MIX":
        return w8a8_mix_tensors(base, codes, input_scale, act_dtype)
    if qtype == "W4A16":
        return {f"{base}.weight_packed": pack_offset_binary(codes.q, 4), f"{base}.weight_scale": codes.scale.contiguous(),
                f"{base}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    zero = torch.zeros(n, 1) if codes.zero_point is None else codes.zero_point.float()
    return {f"{base}.weight": codes.q.to(torch.int8).contiguous(), f"{base}.weight_scale": codes.scale.float().contiguous(),
            f"{base}.weight_offset": zero.contiguous()}


def export_ascend(checkpoint: "str | os.PathLike", out_dir: "str | os.PathLike", *, max_shard_size: "int | str" = "4GB",
                  overwrite: bool = False) -> Path:
    """Write a gmmquant checkpoint in the AscendV1 layout (see the module docstring for what each engine reads).

    Expert tensors become per-expert `[N, K]` linears under the model's original names; other tensors keep
    their values and are described as FLOAT. Written atomically.

    Raises:
        FormatError: a scheme no AscendV1 MoE loader represents (W8A8 static, asymmetric or per-channel
            W4A16, mixed W4A16 group sizes), SmoothQuant factors, expert biases, or a family whose experts are
            fused on disk.
    """
    from transformers import AutoConfig

    ck = load_quantized(checkpoint)
    naming = Naming(ck.config["model_type"])
    types = {}
    for prefix, spec in ck.specs.items():
        check_exportable(spec, "AscendV1", naming)
        types[prefix] = quant_type(spec.scheme)
    # vllm-ascend's W4A16 and W4A8_DYNAMIC MoE methods both read the one global group_size (0: per channel)
    group_sizes = {s.scheme.group_size or 0 for p, s in ck.specs.items() if types[p] in ("W4A16", "W4A8_DYNAMIC")}
    if len(group_sizes) > 1:
        raise FormatError(f"int4 experts use group sizes {sorted(group_sizes)} (0: per channel); AscendV1 records one "
                          "global group_size that vllm-ascend's W4A16 and W4A8_DYNAMIC methods both read "
                          "(rule: quant_model_description.json 'group_size')")
    description: dict[str, Any] = {}
    float_modules = float_experts_modules(ck, AutoConfig.for_model(**{k: v for k, v in ck.config.items() if k != "quantization_config"}))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in float_tensors(ck, naming, float_modules):
            description[name] = FLOAT
            yield name, t
        for spec, base, codes, input_scale in expert_linears_with_input_scale(ck, naming):
            for name, t in linear_tensors(base, codes, types[spec.prefix], spec.scheme.group_size, input_scale,
                                          spec.act_dtype).items():
                description[name] = types[spec.prefix]
                yield name, t

    model_type = max(types.values(), key=PRIORITY.index)
    config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    config["quantize"] = model_type.lower()  # what MindIE reads; msModelSlim's examples set it the same way
    with atomic_output_dir(out_dir, overwrite=overwrite, protect=[checkpoint]) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for name, t in tensors():
            writer.add(name, t)
        writer.close()
        description.update({"model_quant_type": model_type, "version": "1.0.0",
                            "group_size": group_sizes.pop() if group_sizes else 0, "metadata": {"producer": "gmmquant"}})
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(ck.path, tmp)
    logger.info("exported %s -> %s (AscendV1, %s)", checkpoint, out_dir, model_type)
    return Path(out_dir)


class _Reader:
    """scheme_for / decode of one quant_model_description.json.

    msModelSlim's int4 types keep `weight` int8 with, in its "1.0.0" layout, two int4 codes per byte: along N
    (`[N/2, K]`) for W4A8_DYNAMIC and per-group W4A16, along K (`[N, K/2]`) for per-channel W4A16; older
    layouts store one code per byte (`[N, K]`). vllm-ascend's W4A16 MoE method reads compressed-tensors'
    `weight_packed` instead (what gmmquant exports). W4A8_DYNAMIC per group keeps two scale levels whose
    product, cast to float16, is the kernel's scale (as vllm-ascend computes it). W8A8_MIX / W8A8 experts load
    as W8A8 dynamic, which is how vllm-ascend runs W8A8_MIX MoE layers: their static activation parameters
    (input_scale, input_offset, deq_scale, quant_bias) are read and checked, not used.
    """

    def __init__(self, description: dict[str, Any], where: str):
        self.description, self.where = description, where
        self.group_size = int(description.get("group_size") or 0) or None
        self.new_layout = str(description.get("version", "")) == "1.0.0"

    def _type(self, base: str, tensors: dict[str, torch.Tensor]) -> str:
        for suffix in ("weight", "weight_packed"):
            if suffix in tensors:
                return str(self.description.get(f"{base}.{suffix}", FLOAT))
        return FLOAT

    def _symmetric(self, base: str, tensors: dict[str, torch.Tensor], *names: str) -> bool:
        return not any(n in tensors and bool(tensors[n].ne(0).any()) for n in names)

    def scheme_for(self, base: str, tensors: dict[str, torch.Tensor]) -> Optional[QuantScheme]:
        qtype = self._type(base, tensors)
        if qtype == FLOAT:
            return None
        if qtype in ("W8A8_DYNAMIC", "W8A8_MIX", "W8A8"):
            if qtype != "W8A8_DYNAMIC" and not self._symmetric(base, tensors, "input_offset", "quant_bias"):
                raise FormatError(f"{self.where}: {base} ({qtype}): a non-zero input_offset / quant_bias (asymmetric "
                                  "activations or a folded bias) has no place in gmmquant's W8A8 experts")
            return make_scheme(8, None, True, "dynamic")
        if qtype == "W4A8_DYNAMIC":
            if not self._symmetric(base, tensors, "weight_offset", "weight_offset_second"):
                raise FormatError(f"{self.where}: {base}: W4A8_DYNAMIC weights must be symmetric (rule: weight_offset and "
                                  "weight_offset_second all zero; the kernel's A8W4 mode has no weight offset)")
            second = tensors.get("weight_scale_second")
            if second is None:
                return make_scheme(4, None, True, "dynamic")
            k = self._k(base, tensors, "W4A8_DYNAMIC")
            return make_scheme(4, k // second.reshape(second.shape[0], -1).shape[1], True, "dynamic")
        if qtype == "W4A16":
            symmetric = self._symmetric(base, tensors, "weight_offset")
            if "weight_packed" in tensors:
                if self.group_size is None:
                    raise FormatError(f"{self.where}: {base} is W4A16 but {DESCRIPTION} has no group_size")
                return make_scheme(4, self.group_size, True)
            return make_scheme(4, self.group_size, symmetric)  # msModelSlim: group_size 0 means per channel
        if qtype == "W8A16":
            scale = tensors.get("weight_scale")
            offset = tensors.get("weight_offset")
            groups = None if scale is None or scale.dim() < 2 or scale.shape[1] == 1 else tensors["weight"].shape[1] // scale.shape[1]
            symmetric = offset is None or not bool(offset.ne(0).any())
            return make_scheme(8, groups, symmetric)
        raise FormatError(f"{self.where}: {base} has quant type {qtype!r}, which gmmquant does not import "
                          "(rule: FLOAT, W8A8_DYNAMIC, W8A8_MIX, W8A8, W8A16, W4A16 or W4A8_DYNAMIC)")

    def _int4_layout(self, base: str, tensors: dict[str, torch.Tensor], qtype: str) -> str:
        """"n" (two codes per byte along N), "k" (along K) or "none" (one code per byte) for an int4 `weight`."""
        w, scale = tensors["weight"], tensors.get("weight_scale")
        if w.dtype != torch.int8:
            raise FormatError(f"{self.where}: {base}.weight is {w.dtype}, expected int8 ({qtype} codes)")
        if scale is None:
            raise FormatError(f"{self.where}: {base}.weight_scale missing")
        rows = scale.shape[0]
        if w.shape[0] * 2 == rows:
            return "n"
        if w.shape[0] != rows:
            raise FormatError(f"{self.where}: {base}.weight {list(w.shape)} does not fit weight_scale {list(scale.shape)}")
        per_channel_w4a16 = qtype == "W4A16" and self.group_size is None
        return "k" if self.new_layout and per_channel_w4a16 else "none"

    def _k(self, base: str, tensors: dict[str, torch.Tensor], qtype: str) -> int:
        w = tensors["weight"]
        return w.shape[1] * (2 if self._int4_layout(base, tensors, qtype) == "k" else 1)

    def decode(self, base: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> LinearCodes:
        qtype = self._type(base, tensors)
        if "weight_packed" in tensors:
            shape = tensors.get("weight_shape")
            if shape is None or shape.numel() != 2:
                raise FormatError(f"{self.where}: {base}.weight_shape missing or not [2]")
            n, k = (int(v) for v in shape.tolist())
            q = unpack_offset_binary(tensors["weight_packed"], 4, k)
        else:
            q = tensors["weight"]
            if q.dtype != torch.int8:
                raise FormatError(f"{self.where}: {base}.weight is {q.dtype}, expected int8")
            if scheme.weight_bits == 4:
                layout = self._int4_layout(base, tensors, qtype)
                if layout != "none":
                    q = unpack_int4_pairs(q, dim=0 if layout == "n" else 1)
                elif q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
                    raise FormatError(f"{self.where}: {base}.weight [{q.shape[0]}, {q.shape[1]}] int8 holds values outside "
                                      f"[-8, 7], so it is not one int4 code per byte; msModelSlim's \"1.0.0\" layout packs two "
                                      f"per byte along N ([N/2, K]), which needs weight_scale to have 2x its rows "
                                      f"(rule: {qtype} weight layouts)")
            n, k = q.shape
        scale = tensors.get("weight_scale")
        if scale is None:
            raise FormatError(f"{self.where}: {base}.weight_scale missing")
        scale = scale.reshape(n, -1)
        if "weight_scale_second" in tensors:  # W4A8_DYNAMIC per group: the product, in float16, as vllm-ascend
            scale = (scale.float() * tensors["weight_scale_second"].reshape(n, -1).float()).to(torch.float16).float()
        zero = None
        if not scheme.symmetric:
            offset = tensors["weight_offset"].reshape(n, -1).float()
            zero = offset.round().to(torch.int32)
            if not torch.equal(zero.float(), offset):
                raise FormatError(f"{self.where}: {base}.weight_offset is not integer-valued: not a zero point")
        elif "weight_offset" in tensors and bool(tensors["weight_offset"].ne(0).any()):
            raise FormatError(f"{self.where}: {base}: {self.description.get(base + '.weight')} weights must be symmetric "
                              "(rule: weight_offset all zero)")
        return LinearCodes(q, scale, zero)


def read_ascend(path: "str | os.PathLike") -> ForeignCheckpoint:
    """Convert an AscendV1 MoE checkpoint (W8A8_DYNAMIC, W8A8_MIX / W8A8, W8A16, W4A16 or W4A8_DYNAMIC experts;
    see `_Reader`) to gmmquant's layout.

    Expert codes move into the kernel layout without dequantization; `antiquant_offset = -weight_offset`.
    Non-expert linears of type W8A8_DYNAMIC / W8A16 are dequantized to the model dtype.

    Raises:
        FormatError: no or invalid quant_model_description.json, or a type / scheme the kernel cannot run.
    """
    root = Path(path)
    description = read_json_object(root / DESCRIPTION, DESCRIPTION)
    config = read_json_object(root / "config.json", "config.json")
    config.pop("quantization_config", None)
    config.pop("quantize", None)
    reader = _Reader(description, str(root))
    return read_foreign(root, LinearFormat("AscendV1", SUFFIXES, reader.scheme_for, reader.decode), config, read_all(root))
