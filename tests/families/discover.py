"""Find every model type of the installed transformers whose modeling code has routed MoE experts.

Found from the library, not from a list: a model package is a candidate when its modeling source decorates
a class with `use_experts_implementation` or defines a `...Experts` class, or when its configuration has a
routed-experts attribute (`num_experts`, `num_local_experts`, `n_routed_experts`, `moe_num_experts`). Each
candidate package contributes its root model types: those that are not a sub-config of another type of the
same package (`qwen3_vl_moe`, not `qwen3_vl_moe_text`). Packages without modeling code of their own
(configuration-only ports) are reported too, so they cannot slip through silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import transformers

EXPERTS_SOURCE = re.compile(r"@use_experts_implementation|^class \w*Experts\w*\(", re.M)
EXPERTS_CONFIG = re.compile(r"\b(num_experts|num_local_experts|n_routed_experts|moe_num_experts)\b")


@dataclass(frozen=True)
class Candidate:
    model_type: str
    package: str
    config_class: str
    evidence: str  # "decorated experts", "experts class", "config only"


def _root_types(package: str, types: list[str]) -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    subs: set = set()

    def walk(cls, depth=0):
        for sub in (getattr(cls, "sub_configs", None) or {}).values():
            if getattr(sub, "model_type", None) not in subs and depth < 4:
                subs.add(getattr(sub, "model_type", None))
                walk(sub, depth + 1)

    for mt in types:
        try:
            walk(CONFIG_MAPPING[mt])
        except (KeyError, ImportError):
            continue
    return [mt for mt in types if mt not in subs]


def candidates() -> list[Candidate]:
    """Root model types of every package with routed experts, sorted by model type."""
    from transformers.models.auto import configuration_auto as ca

    models = Path(transformers.__file__).parent / "models"
    by_package: dict[str, list[str]] = {}
    for mt in ca.CONFIG_MAPPING_NAMES:
        by_package.setdefault(ca.model_type_to_module_name(mt), []).append(mt)
    out = []
    for package, types in sorted(by_package.items()):
        folder = models / package
        modeling = "\n".join(p.read_text() for p in folder.glob("modeling_*.py"))
        config_src = "\n".join(p.read_text() for p in folder.glob("configuration_*.py"))
        if "@use_experts_implementation" in modeling:
            evidence = "decorated experts"
        elif EXPERTS_SOURCE.search(modeling):
            evidence = "experts class"
        elif EXPERTS_CONFIG.search(config_src):
            evidence = "config only" if modeling else "config only, no modeling code"
        else:
            continue
        for mt in _root_types(package, types):
            out.append(Candidate(mt, package, ca.CONFIG_MAPPING_NAMES[mt], evidence))
    return sorted(out, key=lambda c: c.model_type)
