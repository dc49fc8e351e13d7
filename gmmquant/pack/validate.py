"""Checks of a gmmquant checkpoint beyond names, dtypes and shapes (format.validate_tensors).

- `value_problem`: scales must be finite and positive, offsets and biases finite (a NaN scale would
  otherwise load fine and turn every output into NaN); applied at save and at load.
- `unexpected_tensor_problems`: tensors inside a quantized experts module that its scheme does not use (a
  zero point in a checkpoint labelled symmetric would silently be ignored).
- `structure_problems`: the checkpoint against the model its config.json builds (on the meta device):
  every experts module's expert count and shapes, every non-expert tensor present with the model's shape.
- `checksum_problems`: every tensor read back and compared with the SHA-256 recorded at save.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from .format import FormatError, expert_tensor_owner
from .shards import CHECKSUM_KEY

if TYPE_CHECKING:
    from torch import nn

    from .checkpoint import QuantizedCheckpoint
    from .format import ExpertsSpec

POSITIVE = ("antiquant_scale", "weight_scale", "input_scale", "smooth_scale")
FINITE = ("antiquant_offset", "bias")

logger = logging.getLogger(__name__)


def value_problem(name: str, tensor: torch.Tensor) -> Optional[str]:
    """What is wrong with the values of one quantized-experts tensor (by its name's last part), or None."""
    kind = name.rsplit(".", 1)[-1]
    if kind not in POSITIVE + FINITE or not tensor.is_floating_point():
        return None
    t = tensor.float()
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        return f"{name}: {bad} NaN or inf value(s) (rule: scales, offsets and biases are finite)"
    if kind in POSITIVE:
        bad = int((t <= 0).sum())
        if bad:
            return f"{name}: {bad} zero or negative value(s) (rule: scales are positive)"
    return None


def values_problems(ck: "QuantizedCheckpoint") -> list[str]:
    """`value_problem` for every scale, offset and bias of the quantized experts modules (reads only those)."""
    problems = []
    for name in sorted(ck.headers):
        if expert_tensor_owner(name, ck.specs) is not None and name.rsplit(".", 1)[-1] in POSITIVE + FINITE:
            problem = value_problem(name, ck.tensor(name))
            if problem:
                problems.append(problem)
    return problems


def unexpected_tensor_problems(specs: "dict[str, ExpertsSpec]", names: Any) -> list[str]:
    """Tensors inside quantized experts modules that their schemes do not use."""
    expected = {n for s in specs.values() for n in s.expected_tensors()}
    problems = []
    for name in sorted(n for n in names if expert_tensor_owner(n, specs) is not None and n not in expected):
        owner = specs[expert_tensor_owner(name, specs)]
        hint = ""
        if name.endswith(".antiquant_offset") and owner.scheme.symmetric:
            hint = " (zero points in a module labelled symmetric: the checkpoint was relabelled; its offsets would be ignored)"
        problems.append(f"unexpected tensor {name} inside a quantized experts module{hint}")
    return problems


def structure_problems(ck: "QuantizedCheckpoint", model: "Optional[nn.Module]" = None, *,
                       missing_is_error: bool = True) -> list[str]:
    """The checkpoint against the model its config builds (or `model`, e.g. transformers' meta skeleton).

    Experts modules must exist with the configured expert count and projection shapes; every non-expert
    tensor the model has (except tied copies) must be stored, with the model's shape. Extra tensors are
    allowed (transformers ignores them, e.g. multi-token-prediction layers). `missing_is_error=False` (loading)
    logs missing non-expert tensors instead of refusing: matching disk names to the model's is heuristic for
    some composite layouts (vision towers, renamed sub-models), while `inspect` and export stay strict.
    """
    from .layouts import disk_naming, find_experts_modules, meta_model

    config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    model_type = config.get("model_type")
    if model is None:
        from transformers import AutoConfig

        try:  # through transformers' own reader of config.json (special floats, tuples), as from_pretrained does
            model = meta_model(AutoConfig.from_pretrained(ck.path))
        except Exception as err:  # noqa: BLE001 - any config transformers cannot build is reported, not raised
            return [f"{ck.path / 'config.json'}: transformers cannot build model_type {model_type!r} from it "
                    f"({type(err).__name__}: {err})"]
    problems = []
    infos = find_experts_modules(model)
    absent = sorted(p for p in ck.specs if p not in infos)
    if absent:
        problems.append(f"quantized modules {absent} do not exist in {type(model).__name__} as experts modules "
                        "(quantization_config.modules)")
    for prefix, spec in ck.specs.items():
        info = infos.get(prefix)
        if info is None:
            continue
        if info.num_experts != spec.num_experts:
            problems.append(f"{prefix}: quantization_config says {spec.num_experts} experts, the model config builds "
                            f"{info.num_experts} (and a router of that width)")
        if dict(info.projections) != spec.projections:
            problems.append(f"{prefix}: projections {spec.projections} in quantization_config, the model config builds "
                            f"{dict(info.projections)}")
    # transformers strips or prepends `base_model_prefix` levels when a checkpoint's names do not match the
    # model's (a vision-language model's `language_model.model.*` on disk is `model.language_model.*` in
    # memory): names are compared without those levels.
    level = getattr(model, "base_model_prefix", "") or "model"

    def canon(name: str) -> str:
        return ".".join(p for p in name.split(".") if p != level)

    state = model.state_dict()
    expected = {canon(name): tuple(t.shape) for name, t in state.items()}
    original = {canon(name): name for name in state}
    tied = set(dict(getattr(model, "all_tied_weights_keys", None) or {}))
    naming = disk_naming(model_type) if isinstance(model_type, str) else None
    present = set()
    for name, (_, shape) in ck.headers.items():
        if expert_tensor_owner(name, ck.specs) is not None:
            continue
        renamed = naming.rename(name) if naming else name
        piece = naming.piece(renamed) if naming else None
        if piece is not None:  # one expert's slice of a float experts module
            present.add(canon(piece[0]))
            continue
        renamed = canon(renamed)
        present.add(renamed)
        if renamed in expected and tuple(shape) != expected[renamed]:
            problems.append(f"{name}: shape {list(shape)}, the model config makes it {list(expected[renamed])}")
    quantized = tuple(canon(p) + "." for p in ck.specs)
    tied = {canon(n) for n in tied}
    missing = sorted(original[n] for n in expected if n not in present and n not in tied and not n.startswith(quantized))
    if missing:
        message = (f"missing tensors the model needs: {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                   f"({len(missing)} in all)")
        if missing_is_error:
            problems.append(message)
        else:
            logger.warning("%s: %s (transformers initialises them)", ck.path, message)
    return problems


def checksum_problems(ck: "QuantizedCheckpoint") -> tuple[int, int, list[str]]:
    """Read every tensor and compare it with its recorded SHA-256: (tensors read, tensors verified, problems)."""
    read, verified, problems = 0, 0, []
    by_file: dict[str, list[str]] = {}
    for name, file in ck.weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        path = ck.path / file
        try:
            with safe_open(str(path), framework="pt") as f:
                recorded = json.loads((f.metadata() or {}).get(CHECKSUM_KEY, "{}"))
                if not isinstance(recorded, dict):
                    raise ValueError(f"{CHECKSUM_KEY} is not a JSON object")
                for name in sorted(names):
                    t = f.get_tensor(name)
                    read += 1
                    if name not in recorded:
                        continue
                    data = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
                    digest = hashlib.sha256(data).hexdigest()
                    verified += 1
                    if digest != recorded[name]:
                        problems.append(f"{path}: {name}: SHA-256 {digest[:12]}..., recorded {str(recorded[name])[:12]}... "
                                        "at save: the data changed after it was written")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            problems.append(f"{path}: cannot read it back ({type(err).__name__}: {err})")
    return read, verified, problems


def validate_checkpoint(path: Any, *, structure: bool = True, model: "Optional[nn.Module]" = None,
                        missing_is_error: bool = True) -> "QuantizedCheckpoint":
    """`load_quantized` (names, dtypes, shapes, values, paths) plus `structure_problems`; FormatError lists all."""
    from .checkpoint import load_quantized

    ck = load_quantized(path)
    if structure:
        problems = structure_problems(ck, model, missing_is_error=missing_is_error)
        if problems:
            raise FormatError(f"{ck.path} does not fit the model its config.json describes:\n  " + "\n  ".join(problems))
    return ck
