"""What both exporters write: a gmmquant checkpoint's tensors under the model's original per-expert names.

`float_tensors` yields every tensor that stays float (renamed to the original checkpoint names; experts
modules left in float by `--ignore` are split back into per-expert nn.Linear weights, which is how engines
load them), `expert_linears` the integer codes of every quantized expert nn.Linear.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..pack.checkpoint import QuantizedCheckpoint
from ..pack.format import ExpertsSpec, FormatError, expert_tensor_owner
from ..pack.layouts import ExpertsModuleInfo, find_experts_modules, meta_model
from .linears import LinearCodes, split_projection
from .naming import Naming


def float_experts_modules(ck: QuantizedCheckpoint, config: Any) -> dict[str, ExpertsModuleInfo]:
    """Experts modules of the model that the checkpoint keeps in float (matched by `--ignore`)."""
    return {p: info for p, info in find_experts_modules(meta_model(config)).items() if p not in ck.specs}


def _split_float(name: str, t: torch.Tensor, info: ExpertsModuleInfo, naming: Naming) -> dict[str, torch.Tensor]:
    """A fused float experts parameter (transformers' in-memory layout) -> per-expert `<base>.weight` `[N, K]`."""
    proj = name[len(info.path) + 1:]
    if proj not in info.projections:
        raise FormatError(f"{name}: float experts tensor {proj!r} has no per-expert form (rule: only gate_up / up / down "
                          "weights can be exported per expert)")
    if not info.is_concatenated:
        raise FormatError(f"{name}: interleaved gate/up experts have no per-expert Linear layout")
    w = t.transpose(1, 2) if info.is_transposed else t  # [E, N, K]
    names = naming.expert_linears(name, info.num_experts)
    parts = len(names[0])
    rows = w.shape[1] // parts
    return {f"{base}.weight": w[e, p * rows:(p + 1) * rows].contiguous()
            for e, row in enumerate(names) for p, base in enumerate(row)}


def float_tensors(ck: QuantizedCheckpoint, naming: Naming, float_modules: dict[str, ExpertsModuleInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """(original checkpoint name, tensor) of every tensor that is not a quantized expert tensor."""
    for name, t in ck.iter_tensors():
        if expert_tensor_owner(name, ck.specs) is not None:
            continue
        owner = next((p for p in float_modules if name.startswith(p + ".")), None)
        if owner is not None and naming.expert_piece(name) is None:  # fused in-memory name (from save_model)
            yield from _split_float(name, t, float_modules[owner], naming).items()
        else:
            yield naming.to_disk(name), t


def expert_linears(ck: QuantizedCheckpoint, naming: Naming) -> Iterator[tuple[ExpertsSpec, str, LinearCodes]]:
    """(module spec, original Linear name, codes) of every quantized expert nn.Linear, module by module."""
    for prefix, spec in ck.specs.items():
        for proj, qw in ck.projections(prefix).items():
            names = naming.expert_linears(f"{prefix}.{proj}", spec.num_experts)
            for e, row in enumerate(split_projection(qw, len(names[0]))):
                for base, codes in zip(names[e], row):
                    yield spec, base, codes


def module_pattern(naming: Naming, path: str, projections: Any) -> str:
    """A `re:` pattern matching exactly the per-expert Linear names of one experts module.

    Besides the checkpoint's own names (Mixtral's `experts.{e}.w1`) it matches `experts.{e}.gate_proj` /
    `up_proj` / `down_proj` under the same prefix: vLLM looks a fused MoE layer's scheme up under those names.
    """
    import re

    token = "EXPERTINDEX"
    names = [n for proj in projections for n in naming.expert_linears(f"{path}.{proj}", [token])[0]]
    alternatives = [re.escape(n).replace(token, r"\d+") for n in names]
    if any(n.rsplit(".", 1)[1] not in ("gate_proj", "up_proj", "down_proj") for n in names):
        prefixes = sorted({n.split(token)[0] for n in names})
        alternatives += [re.escape(p) + r"\d+\.(gate_proj|up_proj|down_proj)" for p in prefixes]
    return "re:^(" + "|".join(alternatives) + ")$"
