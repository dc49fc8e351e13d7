"""Where a HF MoE model keeps its expert weights, and how they become the canonical `[E, K, N]` layout.

transformers 5 fuses experts into one module per layer (`...experts.gate_up_proj` `[E, 2I, H]`,
`...experts.down_proj` `[E, H, I]`, flags `is_transposed`, `is_concatenated`, `has_gate`, `has_bias`),
while many checkpoints on disk keep one tensor per expert (`experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1.weight`). Both are described by transformers' own checkpoint conversion
mapping, which this module reads instead of hard-coding model families.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

GATE_UP_NAMES = ("gate_up_proj", "up_proj")  # has_gate=True / has_gate=False


@dataclass(frozen=True)
class ExpertsModuleInfo:
    """One fused experts module of a (meta-device) transformers model.

    Attributes:
        path: module path (`model.layers.0.mlp.experts`).
        num_experts: E.
        projections: canonical projection name -> (K, N) per expert.
        is_transposed: params stored `[E, K, N]` (True) or `[E, N, K]` (False, transformers' default).
        is_concatenated: gate and up are the two halves of gate_up (True) or interleaved (GPT-OSS).
        has_bias: per-expert biases `<proj>_bias` `[E, N]`.
        linear_names: set for the older layout, an `nn.ModuleList` of per-expert MLPs with nn.Linear
            gate / up / down (`gate_proj, up_proj, down_proj` or Mixtral's `w1, w3, w2`).
    """

    path: str
    num_experts: int
    projections: dict[str, tuple[int, int]]
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    linear_names: Optional[tuple[str, str, str]] = None  # (gate, up, down) of an nn.ModuleList of MLPs
    # How the MoE block calls the module (see runtime/adapters.py): "routed" `(hidden, top_k_index,
    # top_k_weights)` (transformers 5); "dense" `(routed_in [E*T, H])`, every expert on router-scaled rows
    # (llama4); "sorted" `(rows sorted by expert, expert_size)`, one projection (jetmoe's ParallelExperts).
    call: str = "routed"
    params: Optional[dict[str, str]] = None  # projection -> attribute of its parameter, when not the same name
    # Experts kept as 2-D `[E*I, H]` parameters (gate, up, down paths in the module: dbrx's mlp.w1 / v1 / w2);
    # gate and up are `[E, N, K]` per expert, down is `[E, K, N]` already.
    stack: Optional[tuple[str, str, str]] = None
    post_expert_norm: int = 0  # width of the module's own output norm (`has_post_expert_norm`), 0: none

    def param(self, proj: str) -> str:
        """The attribute of the module holding projection `proj`'s fused parameter."""
        return (self.params or {}).get(proj, proj)


# Experts classes transformers does not decorate with `use_experts_implementation`, and their layout.
UNDECORATED_EXPERTS: dict[str, dict[str, Any]] = {
    # gate_up [E, H, 2I], down [E, I, H]; the MoE block scales each expert's copy of the rows by its router
    # score and runs every expert on all of them.
    "Llama4TextExperts": {"is_transposed": True, "call": "dense"},
    # Routed experts plus "zero-computation" experts (ids >= E: the token itself times its weight); gate_up
    # has a row per expert of both kinds, down_proj only the E routed ones (the extra gate_up rows are unused).
    "LongcatFlashExperts": {"call": "routed+identity"},
    "DbrxExperts": {"stack": ("mlp.w1", "mlp.v1", "mlp.w2")},
}


def stack_info(path: str, module: nn.Module) -> Optional[ExpertsModuleInfo]:
    """ExpertsModuleInfo for experts kept as 2-D stacked parameters (UNDECORATED_EXPERTS "stack"), else None."""
    stack = UNDECORATED_EXPERTS.get(type(module).__name__, {}).get("stack")
    if stack is None:
        return None
    gate, _, down = (module.get_parameter(n) for n in stack)
    e = int(module.num_experts)
    inter, hidden = gate.shape[0] // e, gate.shape[1]
    return ExpertsModuleInfo(path=path, num_experts=e, projections={"gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)},
                             is_transposed=False, is_concatenated=True, has_bias=False, stack=tuple(stack))


def stacked_weight(module: nn.Module, info: ExpertsModuleInfo, proj: str) -> Tensor:
    """`[E, K, N]` of a stacked-parameter experts module (gate then up for gate_up_proj)."""
    gate, up, down = (module.get_parameter(n) for n in info.stack)
    e = info.num_experts
    if proj == "down_proj":
        return down.view(e, -1, down.shape[-1])
    return torch.cat([gate.view(e, -1, gate.shape[-1]), up.view(e, -1, up.shape[-1])], dim=1).transpose(1, 2)
# One projection of all experts, `weight` [E, N, K], called with rows sorted by expert and per-expert counts;
# by its attribute in the MoE MLP block (jetmoe's `mlp.input_linear` / `mlp.output_linear`). The attention
# experts of jetmoe (MoA, `self_attention.experts`) are attention projections and stay as they are.
SORTED_PROJECTIONS = {"mlp.input_linear": "gate_up_proj", "mlp.output_linear": "down_proj"}


def sorted_projection_info(path: str, module: nn.Module) -> Optional[ExpertsModuleInfo]:
    """ExpertsModuleInfo for a `...ParallelExperts` projection of an MoE MLP block, else None."""
    role = next((r for suffix, r in SORTED_PROJECTIONS.items() if path == suffix or path.endswith("." + suffix)), None)
    weight = getattr(module, "weight", None)
    if role is None or not type(module).__name__.endswith("ParallelExperts") or not isinstance(weight, Tensor) or weight.dim() != 3:
        return None
    return ExpertsModuleInfo(path=path, num_experts=weight.shape[0], projections={role: (weight.shape[2], weight.shape[1])},
                             is_transposed=False, is_concatenated=True, has_bias=False, call="sorted",
                             params={role: "weight"})


def experts_module_info(path: str, module: nn.Module) -> Optional[ExpertsModuleInfo]:
    """ExpertsModuleInfo for a fused experts module (3-D `down_proj` parameter) or a sorted-rows projection
    (SORTED_PROJECTIONS), else None."""
    special = sorted_projection_info(path, module) or stack_info(path, module)
    if special is not None:
        return special
    down = getattr(module, "down_proj", None)
    if not isinstance(down, (nn.Parameter, Tensor)) or down.dim() != 3:
        return None
    if isinstance(getattr(module, "gate_proj", None), Tensor):
        # Separate 3-D gate and up (inkling's always-on shared experts, called with per-token gammas): not a
        # routed experts module; it stays the model's own, like other shared experts.
        return None
    first = next((n for n in GATE_UP_NAMES if isinstance(getattr(module, n, None), (nn.Parameter, Tensor))), None)
    if first is None:
        return None
    known = UNDECORATED_EXPERTS.get(type(module).__name__, {})
    transposed = bool(getattr(module, "is_transposed", known.get("is_transposed", False)))
    up = getattr(module, first)

    def kn(t: Tensor) -> tuple[int, int]:
        return (t.shape[1], t.shape[2]) if transposed else (t.shape[2], t.shape[1])

    return ExpertsModuleInfo(
        path=path,
        num_experts=down.shape[0],
        projections={first: kn(up), "down_proj": kn(down)},
        is_transposed=transposed,
        is_concatenated=bool(getattr(module, "is_concatenated", True)),
        has_bias=bool(getattr(module, "has_bias", False)),
        call=known.get("call", "routed"),
        post_expert_norm=_post_norm_width(module),
    )


def _post_norm_width(module: nn.Module) -> int:
    norm = getattr(module, "post_expert_norm", None) if getattr(module, "has_post_expert_norm", False) else None
    weight = getattr(norm, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, Tensor) else 0


PER_EXPERT_LINEARS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def module_list_info(path: str, module: nn.Module) -> Optional[ExpertsModuleInfo]:
    """ExpertsModuleInfo for an nn.ModuleList of identical gated MLPs named `experts` (remote-code /
    transformers 4 layout; other lists of MLPs, such as longcat_flash's two dense `mlps`, are not experts)."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2 or not path.rsplit(".", 1)[-1].endswith("experts"):
        return None
    for names in PER_EXPERT_LINEARS:
        if not all(all(isinstance(getattr(m, n, None), nn.Linear) for n in names) for m in module):
            continue
        gate, up, down = (getattr(module[0], n) for n in names)
        shapes = {tuple(tuple(getattr(m, n).weight.shape) for n in names) for m in module}
        if len(shapes) != 1 or gate.weight.shape != up.weight.shape:
            return None
        hidden, inter = gate.in_features, gate.out_features
        return ExpertsModuleInfo(path, len(module), {"gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)},
                                 is_transposed=False, is_concatenated=True, has_bias=gate.bias is not None,
                                 linear_names=names)
    return None


DICT_LINEARS = (("wi", "wo"), ("fc1", "fc2"))  # (up, down) of switch_transformers / nllb-moe experts


def experts_of(module: nn.Module) -> list[nn.Module]:
    """The per-expert MLPs of an nn.ModuleList, or of an nn.ModuleDict keyed `expert_{i}`, in expert order."""
    if isinstance(module, nn.ModuleDict):
        return [module[f"expert_{i}"] for i in range(sum(k.startswith("expert_") for k in module.keys()))]
    return list(module)


def module_dict_info(path: str, module: nn.Module) -> Optional[ExpertsModuleInfo]:
    """ExpertsModuleInfo for an nn.ModuleDict of `expert_{i}` MLPs without a gate (switch_transformers' wi / wo,
    nllb-moe's fc1 / fc2), called `(hidden, selection, weights)`; see runtime/adapters.py."""
    if not isinstance(module, nn.ModuleDict):
        return None
    keys = {k for k in module.keys() if k.startswith("expert_")}
    if len(keys) < 2 or keys != {f"expert_{i}" for i in range(len(keys))}:
        return None
    members = experts_of(module)
    for up, down in DICT_LINEARS:
        if not all(isinstance(getattr(m, up, None), nn.Linear) and isinstance(getattr(m, down, None), nn.Linear) for m in members):
            continue
        first = getattr(members[0], up)
        return ExpertsModuleInfo(path, len(members), {"up_proj": (first.in_features, first.out_features),
                                                      "down_proj": (first.out_features, first.in_features)},
                                 is_transposed=False, is_concatenated=True, has_bias=first.bias is not None,
                                 linear_names=(None, up, down), call="dict")
    return None


def module_list_weight(module: nn.Module, info: ExpertsModuleInfo, proj: str) -> Tensor:
    """Stack per-expert nn.Linear weights into the canonical `[E, K, N]` (gate then up; up alone without a gate)."""
    gate, up, down = info.linear_names
    members = experts_of(module)
    if proj == "gate_up_proj":
        return torch.stack([torch.cat([getattr(m, gate).weight, getattr(m, up).weight]).t() for m in members])
    name = up if proj == "up_proj" else down
    return torch.stack([getattr(m, name).weight.t() for m in members])


def module_list_bias(module: nn.Module, info: ExpertsModuleInfo, proj: str) -> Tensor:
    gate, up, down = info.linear_names
    members = experts_of(module)
    if proj == "gate_up_proj":
        return torch.stack([torch.cat([getattr(m, gate).bias, getattr(m, up).bias]) for m in members])
    name = up if proj == "up_proj" else down
    return torch.stack([getattr(m, name).bias for m in members])


def find_experts_modules(model: nn.Module) -> dict[str, ExpertsModuleInfo]:
    """Every experts module of a model (fused transformers 5 modules and ModuleLists of MLPs), by path."""
    found = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in found):
            continue
        info = experts_module_info(path, module) or module_list_info(path, module) or module_dict_info(path, module)
        if info is not None:
            found[path] = info
    return found


_META_LOCK = threading.Lock()


def meta_model(config: Any) -> nn.Module:
    """The model of a config on the meta device: names, shapes and flags for free (no weights); built with
    the config's own class (causal LM, vision-language, seq2seq: model_class.auto_model_class).

    Serialised: `from_config` sets and restores torch's global default dtype, so two threads building at once
    could leave it changed (seen as a bfloat16 default after concurrent validations).
    """
    from .model_class import auto_model_class

    with _META_LOCK, torch.device("meta"):
        return auto_model_class(config)._from_config(config)


def deinterleave(t: Tensor, dim: int = -1) -> Tensor:
    """GPT-OSS keeps gate/up interleaved along N (g0 u0 g1 u1 ...): return gate then up."""
    dim = dim % t.dim()
    index_even = [slice(None)] * t.dim()
    index_odd = [slice(None)] * t.dim()
    index_even[dim] = slice(0, None, 2)
    index_odd[dim] = slice(1, None, 2)
    return torch.cat([t[tuple(index_even)], t[tuple(index_odd)]], dim=dim)


def expert_weight(module: nn.Module, info: ExpertsModuleInfo, proj: str) -> Tensor:
    """One projection of all experts of a module, canonical `[E, K, N]` (a view where the layout allows)."""
    if info.linear_names:
        return module_list_weight(module, info, proj)
    if info.stack:
        return stacked_weight(module, info, proj)
    return canonical(getattr(module, info.param(proj))[: info.num_experts], info, proj)


def expert_bias(module: nn.Module, info: ExpertsModuleInfo, proj: str) -> Optional[Tensor]:
    """The projection's per-expert bias `[E, N]` in canonical order, or None."""
    if not info.has_bias:
        return None
    if info.linear_names:
        return module_list_bias(module, info, proj)
    return canonical_bias(getattr(module, f"{proj}_bias"), info, proj)


def canonical(param: Tensor, info: ExpertsModuleInfo, proj: str) -> Tensor:
    """A fused experts parameter (all experts, or one expert's slice `[..]`) -> `[.., K, N]`."""
    w = param if info.is_transposed else param.transpose(-1, -2)
    if proj == "gate_up_proj" and not info.is_concatenated:
        w = deinterleave(w, dim=-1)
    return w


def canonical_bias(bias: Tensor, info: ExpertsModuleInfo, proj: str) -> Tensor:
    """A fused `[.., N]` bias in canonical (gate then up) order."""
    return deinterleave(bias, dim=-1) if proj == "gate_up_proj" and not info.is_concatenated else bias


@dataclass(frozen=True)
class PieceRule:
    """A per-expert tensor on disk that transformers merges into a fused parameter."""

    pattern: re.Pattern
    target: str  # e.g. "mlp.experts.gate_up_proj"
    part: int  # position among the converter's sources (0 = gate, 1 = up)
    parts: int


@dataclass
class DiskNaming:
    """How a model type's on-disk tensor names map to its fused in-memory parameters."""

    renamings: list[tuple[re.Pattern, str]]
    pieces: list[PieceRule]

    def rename(self, name: str) -> str:
        for pattern, replacement in self.renamings:
            name = pattern.sub(replacement, name)
        return name

    def piece(self, name: str) -> Optional[tuple[str, int, int, int]]:
        """(param path, expert, part, parts) if `name` (already renamed) is one expert's slice."""
        for rule in self.pieces:
            m = rule.pattern.search(name)
            if m:
                return name[: m.start()] + rule.target, int(m.group(1)), rule.part, rule.parts
        return None


def _pattern(source: str) -> re.Pattern:
    return re.compile(re.escape(source).replace(r"\*", r"(\d+)") + "$")


def disk_naming(model_type: str) -> DiskNaming:
    """Read transformers' checkpoint conversion mapping for `model_type` (no mapping: names are as in memory)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    renamings, pieces = [], []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        if type(rule).__name__ == "WeightRenaming":
            renamings += [(re.compile(s), t) for s, t in zip(sources, targets)]
        elif len(targets) == 1 and any("*" in s for s in sources):
            pieces += [PieceRule(_pattern(s), targets[0], i, len(sources)) for i, s in enumerate(sources)]
    # Per-expert layouts that predate a model type's mapping (remote code, older transformers).
    generic = [
        (("experts.*.gate_proj.weight", "experts.*.up_proj.weight"), "experts.gate_up_proj"),
        (("experts.*.w1.weight", "experts.*.w3.weight"), "experts.gate_up_proj"),
        (("experts.*.down_proj.weight",), "experts.down_proj"),
        (("experts.*.w2.weight",), "experts.down_proj"),
    ]
    for sources, target in generic:
        pieces += [PieceRule(_pattern("." + s), "." + target, i, len(sources)) for i, s in enumerate(sources)]
    return DiskNaming(renamings, pieces)


def owned_by(naming: DiskNaming, disk_name: str, params: set[str]) -> bool:
    """Whether an on-disk tensor is (a piece of) one of the in-memory parameters `params` (full paths)."""
    renamed = naming.rename(disk_name)
    piece = naming.piece(renamed)
    return renamed in params or (piece is not None and piece[0] in params)
