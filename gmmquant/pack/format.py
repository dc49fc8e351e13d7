"""The gmmquant checkpoint format, version 1: tensor names, the quantization_config, validation.

docs/FORMAT.md is the human description; this module is the executable one. A quantized experts module at
model path `P` (e.g. `model.layers.0.mlp.experts`) stores, for each projection `p` (`gate_up_proj`,
`down_proj`, or `up_proj` for experts without a gate):

    P.p.qweight            [E, K, N] int8 | [E, K, N/8] int32 (int4, 8 per word, low nibble first)
    P.p.antiquant_scale    [E, N] | [E, K/g, N]   activation dtype        (weight-only schemes)
    P.p.antiquant_offset   like antiquant_scale                          (asymmetric only; = -zero_point)
    P.p.weight_scale       [E, N] bfloat16 (bf16 models) | float32 (fp16) (W8A8 schemes)
                           [E, N] | [E, K/g, N] float32                  (W4A8: FP19 values; per group also fp16)
    P.p.input_scale        [E] float32                                    (W8A8 static)
    P.p.smooth_scale       [E, K] activation dtype                        (optional, W8A8 SmoothQuant)
    P.p.bias               [E, N] float32 (bf16 models) | float16          (experts with bias)

gate_up_proj holds gate then up along N (interleaved sources such as GPT-OSS are de-interleaved).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..kernels import GMMContractError, check_grouped_matmul
from .primitives import bias_dtype, w8a8_scale_dtype
from .schemes import QuantScheme, SchemeError

FORMAT_VERSION = 1
QUANT_METHOD = "gmmquant"
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FormatError(ValueError):
    """A checkpoint that is not a valid gmmquant checkpoint; the message lists every problem found."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class ExpertsSpec:
    """What one quantized experts module must contain.

    Attributes:
        prefix: the module's path in the model (`model.layers.0.mlp.experts`).
        scheme: its quantization scheme.
        num_experts: E.
        projections: projection name -> (K, N) of one expert.
        act_dtype: the model's activation dtype (bfloat16 / float16).
        has_bias: whether each projection stores a bias.
        extra: optional per-projection tensors present (`input_scale`, `smooth_scale`).
    """

    prefix: str
    scheme: QuantScheme
    num_experts: int
    projections: dict[str, tuple[int, int]]
    act_dtype: torch.dtype
    has_bias: bool = False
    extra: dict[str, list[str]] = field(default_factory=dict)
    post_expert_norm: int = 0  # width of the experts' own output norm (muse_spark), kept in float; 0: none

    def expected_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) of every tensor this module must have."""
        s, e = self.scheme, self.num_experts
        out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for proj, (k, n) in self.projections.items():
            base = f"{self.prefix}.{proj}"
            packed_n = n // 8 if s.weight_bits == 4 else n
            out[f"{base}.qweight"] = (torch.int32 if s.weight_bits == 4 else torch.int8, (e, k, packed_n))
            param_shape = (e, k // s.group_size, n) if s.group_size else (e, n)
            if s.weight_only:
                out[f"{base}.antiquant_scale"] = (self.act_dtype, param_shape)
                if not s.symmetric:
                    out[f"{base}.antiquant_offset"] = (self.act_dtype, param_shape)
            elif s.a8w4:  # float32 (the kernel takes it int64-encoded, see primitives.a8w4_kwargs)
                out[f"{base}.weight_scale"] = (torch.float32, param_shape)
            else:
                out[f"{base}.weight_scale"] = (w8a8_scale_dtype(self.act_dtype), (e, n))
                if s.activation == "static":
                    out[f"{base}.input_scale"] = (torch.float32, (e,))
            if "smooth_scale" in self.extra.get(proj, []):
                out[f"{base}.smooth_scale"] = (self.act_dtype, (e, k))
            if self.has_bias:
                out[f"{base}.bias"] = (bias_dtype(self.act_dtype), (e, n))
        if self.post_expert_norm:  # a float tensor of the model's dtype (None: any float dtype)
            out[f"{self.prefix}.post_expert_norm.weight"] = (None, (self.post_expert_norm,))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.to_dict(),
            "num_experts": self.num_experts,
            "projections": {p: {"k": k, "n": n} for p, (k, n) in self.projections.items()},
            "has_bias": self.has_bias,
            "extra": self.extra,
            **({"post_expert_norm": self.post_expert_norm} if self.post_expert_norm else {}),
        }

    @classmethod
    def from_dict(cls, prefix: str, data: dict[str, Any], act_dtype: torch.dtype) -> "ExpertsSpec":
        try:
            projections = {p: (int(v["k"]), int(v["n"])) for p, v in data["projections"].items()}
            unknown = sorted(set(projections) - set(PROJECTIONS))
            if unknown:
                raise FormatError(f"module {prefix!r}: unknown projections {unknown}; known: {list(PROJECTIONS)}")
            return cls(prefix=prefix, scheme=QuantScheme.from_dict(data["scheme"]), num_experts=int(data["num_experts"]),
                       projections=projections, act_dtype=act_dtype, has_bias=bool(data.get("has_bias", False)),
                       extra={k: list(v) for k, v in data.get("extra", {}).items()},
                       post_expert_norm=int(data.get("post_expert_norm", 0)))
        except (KeyError, TypeError, SchemeError) as err:
            raise FormatError(f"module {prefix!r}: malformed quantization_config entry ({type(err).__name__}: {err})") from err


def build_quantization_config(specs: dict[str, ExpertsSpec], act_dtype: torch.dtype, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "act_dtype": dtype_name(act_dtype),
        "modules": {prefix: spec.to_dict() for prefix, spec in sorted(specs.items())},
        "ignore": list(ignore),
    }


def parse_quantization_config(qc: Any) -> tuple[dict[str, ExpertsSpec], list[str], torch.dtype]:
    """Read a `quantization_config` block; unknown versions and malformed entries raise FormatError."""
    if not isinstance(qc, dict):
        raise FormatError("config.json has no quantization_config object: not a gmmquant checkpoint")
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"quantization_config.quant_method is {qc.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"unknown gmmquant format_version {version!r}: this gmmquant reads version {FORMAT_VERSION}; upgrade gmmquant or re-pack the model")
    act_name = qc.get("act_dtype")
    if act_name not in ("bfloat16", "float16"):
        raise FormatError(f"quantization_config.act_dtype must be 'bfloat16' or 'float16', got {act_name!r}")
    act_dtype = DTYPES[act_name]
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise FormatError("quantization_config.modules must be a non-empty mapping of experts module paths")
    specs = {prefix: ExpertsSpec.from_dict(prefix, data, act_dtype) for prefix, data in modules.items()}
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise FormatError(f"quantization_config.ignore must be a list of name patterns, got {ignore!r}")
    return specs, ignore, act_dtype


def kernel_check(spec: ExpertsSpec) -> list[str]:
    """Run the kernel contract on meta tensors shaped like the module's tensors: problems, if any."""
    problems = []
    expected = spec.expected_tensors()
    for proj, (k, _) in spec.projections.items():
        def meta(name: str, proj: str = proj) -> torch.Tensor:
            dtype, shape = expected[f"{spec.prefix}.{proj}.{name}"]
            return torch.empty(shape, dtype=dtype, device="meta")

        s = spec.scheme
        kwargs: dict[str, Any] = dict(group_list=torch.zeros(spec.num_experts, dtype=torch.int64), group_list_type=1,
                                      group_type=0, split_item=2)
        if s.weight_only:
            x = torch.empty(0, k, dtype=spec.act_dtype, device="meta")
            kwargs["antiquant_scale"] = [meta("antiquant_scale")]
            if not s.symmetric:
                kwargs["antiquant_offset"] = [meta("antiquant_offset")]
        elif s.a8w4:
            if spec.has_bias:
                problems.append(f"{spec.prefix}.{proj}: W4A8 experts cannot carry a bias (the A8W4 call's bias is the "
                                "scale_bias the mode needs, added before the per-token scale)")
                continue
            x = torch.empty(0, k, dtype=torch.int8, device="meta")
            scale = meta("weight_scale")
            kwargs.update(scale=[torch.empty(scale.shape, dtype=torch.int64, device="meta")],
                          bias=[torch.empty(spec.num_experts, expected[f"{spec.prefix}.{proj}.qweight"][1][2] * 8,
                                            dtype=torch.float32, device="meta")],
                          per_token_scale=[torch.empty(0, dtype=torch.float32, device="meta")], output_dtype=spec.act_dtype)
        else:
            x = torch.empty(0, k, dtype=torch.int8, device="meta")
            scale = meta("weight_scale")
            kwargs.update(scale=[scale], per_token_scale=[torch.empty(0, dtype=torch.float32, device="meta")],
                          output_dtype=torch.bfloat16 if scale.dtype == torch.bfloat16 else torch.float16)
        if spec.has_bias:
            kwargs["bias"] = [meta("bias")]
        try:
            check_grouped_matmul([x], [meta("qweight")], **kwargs)
        except GMMContractError as err:
            problems.append(f"{spec.prefix}.{proj}: the kernel would reject it: {err}")
    return problems


def validate_tensors(specs: dict[str, ExpertsSpec], tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """Compare the tensors present (name -> (dtype, shape)) with what every module needs: all problems."""
    problems = []
    for spec in specs.values():
        for name, (dtype, shape) in spec.expected_tensors().items():
            if name not in tensors:
                problems.append(f"missing tensor {name} ({dtype_name(dtype) if dtype else 'float'} {list(shape)})")
                continue
            got_dtype, got_shape = tensors[name]
            if dtype is None:
                if not got_dtype.is_floating_point:
                    problems.append(f"{name}: dtype {dtype_name(got_dtype)}, expected a float dtype")
            elif got_dtype != dtype:
                problems.append(f"{name}: dtype {dtype_name(got_dtype)}, expected {dtype_name(dtype)}")
            if tuple(got_shape) != tuple(shape):
                problems.append(f"{name}: shape {list(got_shape)}, expected {list(shape)}")
        try:
            for proj, (k, n) in spec.projections.items():
                spec.scheme.check_shape(k, n, f"{spec.prefix}.{proj}")
        except SchemeError as err:
            problems.append(str(err))
            continue
        problems += kernel_check(spec)
    return problems


def is_ignored(name: str, patterns: list[str]) -> bool:
    """fnmatch-style module-name patterns (`*.mlp.gate`, `lm_head`)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def expert_tensor_owner(name: str, specs: dict[str, ExpertsSpec]) -> Optional[str]:
    """The module prefix a tensor name belongs to, if it is a quantized expert tensor."""
    for prefix in specs:
        if name.startswith(prefix + "."):
            return prefix
    return None
