"""Tensor names on disk (Hugging Face's per-expert nn.Linear naming) vs. transformers 5 in-memory names.

Engines (vLLM, vllm-ascend, MindIE) load the model's original checkpoint names: one nn.Linear per expert
(`model.layers.0.mlp.experts.3.gate_proj.weight`, Mixtral's `...block_sparse_moe.experts.3.w1.weight`).
gmmquant keys experts by their fused in-memory module (`model.layers.0.mlp.experts`) and keeps other
tensors under the names it found (disk names from `gmmquant pack`, in-memory names from `save_model`).
Both directions come from transformers' own checkpoint conversion mapping for the model type, read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ..pack.format import FormatError
from ..pack.layouts import DiskNaming, disk_naming

_REGEX_META = re.compile(r"[\^$*+?\[\](){}|]")


def _literal(pattern: str) -> Optional[str]:
    """The plain string a renaming pattern matches, or None if it is a real regex."""
    text = pattern.replace("\\.", ".")
    return None if _REGEX_META.search(text.replace("\\", "")) or "\\" in text else text


@dataclass(frozen=True)
class ExpertSource:
    """One converter of the model type: per-expert disk tensors that form one fused parameter."""

    target: str  # suffix of the fused parameter path, e.g. "mlp.experts.gate_up_proj" or ".experts.gate_up_proj"
    sources: tuple[str, ...]  # e.g. ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight")


class Naming:
    """Name conversions of one model type (`config.model_type`)."""

    def __init__(self, model_type: str):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        self.model_type = model_type
        self.forward: DiskNaming = disk_naming(model_type)  # disk -> memory, with generic per-expert rules
        self._reverse: list[tuple[str, str]] = []
        self._experts: list[ExpertSource] = []
        for rule in get_checkpoint_conversion_mapping(model_type) or []:
            sources, targets = list(rule.source_patterns), list(rule.target_patterns)
            if type(rule).__name__ == "WeightRenaming":
                for s, t in zip(sources, targets):
                    ls, lt = _literal(s), _literal(t)
                    if ls is not None and lt is not None:
                        self._reverse.append((lt, ls))
            elif len(targets) == 1 and all("*" in s for s in sources):
                self._experts.append(ExpertSource(targets[0], tuple(sources)))

    def to_memory(self, name: str) -> str:
        """A disk (or already in-memory) tensor name -> its transformers 5 in-memory name."""
        return self.forward.rename(name)

    def to_disk(self, name: str) -> str:
        """A tensor name (disk or in-memory) -> the model's original checkpoint name."""
        name = self.to_memory(name)
        for target, source in reversed(self._reverse):
            name = name.replace(target, source)
        return name

    def expert_linears(self, param_path: str, experts: "int | Sequence[int | str]") -> list[list[str]]:
        """Disk names (without `.weight`) of the per-expert nn.Linear modules of one fused parameter.

        Args:
            param_path: in-memory fused parameter, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
            experts: E (all experts), or the expert ids (or a placeholder string) to name.

        Returns:
            `names[i][part]` for the i-th requested expert: for gate_up, part 0 is the gate and part 1 the up projection.

        Raises:
            FormatError: the model type keeps this parameter fused on disk (GPT-OSS, GraniteMoE), so there is
                no per-expert Linear naming the engines' loaders would recognise.
        """
        ids = range(experts) if isinstance(experts, int) else experts
        for rule in self._experts:
            if param_path.endswith(rule.target) and (rule.target.startswith(".") or param_path[: -len(rule.target)].endswith(".")):
                base = param_path[: -len(rule.target)]
                return [[self.to_disk(base + s.replace("*", str(e)))[: -len(".weight")] for s in rule.sources] for e in ids]
        raise FormatError(f"{param_path}: model type {self.model_type!r} has no per-expert nn.Linear checkpoint layout in "
                          "transformers' conversion mapping (its experts are stored fused on disk), so it cannot be "
                          "exported as per-expert tensors (rule: exports need per-expert Linear names)")

    def expert_piece(self, linear_weight_name: str) -> Optional[tuple[str, int, int, int]]:
        """(fused in-memory param path, expert, part, parts) of a per-expert `...weight` disk name, else None."""
        return self.forward.piece(self.to_memory(linear_weight_name))
