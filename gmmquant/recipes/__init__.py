"""Recipes: what `gmmquant calibrate` does to a model, as a YAML file validated before any model is loaded.

A recipe names the quantization scheme (a preset of `pack.schemes`, optionally with `group_size` /
`symmetric` overrides), how weights are rounded (`algorithm`: rtn | gptq | autoround, `observer`: minmax | mse),
SmoothQuant for W8A8, which experts modules are targeted, and the calibration data. The shipped recipes
are the `*.yaml` files next to this module; `load_recipe` takes one of their names or a path.

Every problem is a `RecipeError` naming the offending key (`calibration.num_samples: expected int, got
str`), raised before the model is touched.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..pack.schemes import PRESETS, QuantScheme, SchemeError, get_scheme

ALGORITHMS = ("rtn", "gptq", "autoround")
AUTOROUND_INITS = ("rtn", "gptq")
OBSERVERS = ("minmax", "mse")
# Never quantized: routers, shared-expert gates and the LM head are small and precision-critical. Only
# experts modules are quantized at all; the defaults keep that explicit and let users add their own.
DEFAULT_IGNORE = ("*.gate", "*.router", "*shared_expert_gate*", "lm_head")
DEFAULT_RECIPE = "w8a16"


class RecipeError(ValueError):
    """A recipe that does not parse, has unknown keys or wrong types, or asks for what the kernel cannot run."""


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ per expert: `block_size` columns per lazy update, `damp` x mean(diag H) dampening, `act_order`
    (quantize inputs by descending Hessian diagonal; groups stay contiguous in the stored layout)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    # Rarely routed experts: H = (n_e H_e + w n_min H_all) / (n_e + w n_min), with H_all the Hessian of
    # every calibration token through that expert (w = blend_all_tokens, n_min = blend_rows). 0 = off.
    blend_all_tokens: float = 0.0
    blend_rows: int = 256


@dataclass(frozen=True)
class AutoRoundSettings:
    """Learned rounding and clipping per expert (calibrate/autoround.py).

    Attributes:
        iters: signed-gradient steps per expert.
        lr: initial step size (default 1 / iters), decayed linearly to 0.
        max_rows: routed tokens kept per expert (sampled deterministically from the calibration stream).
        batch_rows: rows per step (0 = all max_rows).
        seed: seed of the row sampling.
        init: "rtn" (start from the float weight) or "gptq" (start from the GPTQ-quantized weight).
        min_clip: lower bound of the learned clip factors (1 = no clipping learned).
        learn_clip: learn the clip factors (else rounding only).
        float_targets: learn each expert against the float model's output on the float model's own inputs
            (a second, unquantized stream through the layers), not on the quantized stream's: the rounding
            then also absorbs the error earlier quantized layers left (AutoRound's quantized-input mode).
            One more float forward per layer.
    """

    iters: int = 200
    lr: Optional[float] = None
    max_rows: int = 2048
    batch_rows: int = 512
    seed: int = 0
    init: str = "rtn"
    min_clip: float = 0.5
    learn_clip: bool = True
    float_targets: bool = False


@dataclass(frozen=True)
class SmoothQuantSettings:
    """SmoothQuant for W8A8: `s_j = max|x_j|^alpha / max|w_j|^(1-alpha)`; folded into the norm before
    gate_up when `fold_norm` and the model allows, per-expert `smooth_scale` (dynamic_quant) otherwise."""

    alpha: float = 0.5
    fold_norm: bool = True


@dataclass(frozen=True)
class AWQSettings:
    """Activation-aware scale search per expert and projection (calibrate/awq.py): `s = mean|x|^a`, a on a
    grid of `grid` points in [0, 1), weights' rows x s, activations / s through the per-expert `smooth_scale`
    (dynamic per-token activations only). `max_rows` sampled rows per expert decide."""

    grid: int = 20
    max_rows: int = 1024


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration data and per-expert coverage.

    Attributes:
        dataset: "builtin" (CPython's pydoc topics), a `.txt` / `.jsonl` path, or a `datasets` name
            already in the local cache (`name` or `name:config`).
        num_samples, seq_len: the calibration set is `num_samples` x `seq_len` tokens.
        seed: chooses the windows of the token stream.
        batch_size: samples per forward.
        all_experts: every expert's statistics see every calibration token (the model's outputs still use
            the real routing), so no expert is left uncalibrated.
        min_tokens: an expert whose statistics saw fewer tokens falls back to weight-only RTN (warned).
        router_weighted: each routed token counts with its router weight squared in GPTQ's Hessian and in
            learned rounding's loss (the expert's error on a token reaches the MoE block output scaled by
            that weight), so tokens the router barely sends are not fitted at the cost of those it trusts.
            Needs all_experts: false and experts called with their router weights (transformers 5).
    """

    dataset: str = "builtin"
    num_samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    all_experts: bool = False
    min_tokens: int = 16
    router_weighted: bool = False


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; see the module docstring and recipes/*.yaml."""

    name: str
    scheme: str
    description: str = ""
    group_size: Optional[int] = None
    symmetric: Optional[bool] = None
    algorithm: str = "rtn"
    observer: str = "minmax"
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    autoround: AutoRoundSettings = field(default_factory=AutoRoundSettings)
    smoothquant: Optional[SmoothQuantSettings] = None
    awq: Optional[AWQSettings] = None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def quant_scheme(self) -> QuantScheme:
        """The `QuantScheme` this recipe produces (preset + overrides)."""
        overrides = {k: v for k, v in (("group_size", self.group_size), ("symmetric", self.symmetric)) if v is not None}
        return get_scheme(self.scheme, name=self.name, **overrides)

    @property
    def needs_activation_statistics(self) -> bool:
        """Whether quantizing needs the experts' input statistics (GPTQ Hessians, SmoothQuant or static
        activation ranges); weight-only and dynamic RTN need only the weights."""
        return self.algorithm != "rtn" or self.smoothquant is not None or self.awq is not None or self.quant_scheme().activation == "static"

    @property
    def awq_per_expert(self) -> bool:
        """AWQ through the per-expert smooth_scale (dynamic per-token activation schemes)."""
        return self.awq is not None and self.quant_scheme().activation == "dynamic"

    @property
    def needs_hessians(self) -> bool:
        """Whether quantizing needs per-expert GPTQ Hessians (GPTQ, or learned rounding started from GPTQ)."""
        return self.algorithm == "gptq" or (self.algorithm == "autoround" and self.autoround.init == "gptq")

    @property
    def blends_all_tokens(self) -> bool:
        """Whether GPTQ Hessians blend in every token's (gptq.blend_all_tokens > 0)."""
        return self.needs_hessians and self.gptq.blend_all_tokens > 0

    def targets_module(self, path: str) -> bool:
        """Whether an experts module at `path` is quantized by this recipe."""
        matched = any(fnmatch.fnmatchcase(path, p) for p in self.targets)
        return matched and not any(fnmatch.fnmatchcase(path, p) for p in self.ignore)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["targets"], out["ignore"] = list(self.targets), list(self.ignore)
        return out


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the field type `hint`, or a RecipeError naming `key`."""
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _check_type(key, value, inner)
    if dataclasses.is_dataclass(hint):
        return _section(key, value, hint)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{key}: expected a list of module-name patterns (strings), got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise RecipeError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section(prefix: str, data: Any, cls: type) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise RecipeError(f"{prefix + '.' if prefix else ''}{key}: unknown key; known keys: {known}")
    values = {k: _check_type(f"{prefix + '.' if prefix else ''}{k}", v, hints[k]) for k, v in data.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in values:
            raise RecipeError(f"{prefix + '.' if prefix else ''}{key}: required key is missing")
    return cls(**values)


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(recipe: Recipe) -> Recipe:
    """Refuse settings that are unknown, out of range, or that the kernel cannot run; returns the recipe."""
    if recipe.scheme not in PRESETS:
        raise RecipeError(f"scheme: unknown scheme {recipe.scheme!r}; presets: {sorted(PRESETS)}")
    try:
        scheme = recipe.quant_scheme()
    except SchemeError as exc:
        key = "group_size" if "group" in str(exc) else "symmetric" if "symmetric" in str(exc) else "scheme"
        raise RecipeError(f"{key}: {exc}") from None
    if recipe.algorithm not in ALGORITHMS:
        raise RecipeError(f"algorithm: must be one of {ALGORITHMS}, got {recipe.algorithm!r}")
    if recipe.observer not in OBSERVERS:
        raise RecipeError(f"observer: must be one of {OBSERVERS}, got {recipe.observer!r}")
    if recipe.smoothquant is not None:
        if scheme.activation != "dynamic":
            raise RecipeError(f"smoothquant: needs per-token int8 activations (a w8a8-dynamic scheme); scheme {recipe.scheme!r} "
                              "has " + ("no int8 activations" if scheme.weight_only else "static per-tensor activation scales"))
        if not 0.0 <= recipe.smoothquant.alpha <= 1.0:
            raise RecipeError(f"smoothquant.alpha: must be in [0, 1], got {recipe.smoothquant.alpha}")
    g = recipe.gptq
    _positive("gptq.block_size", g.block_size)
    _positive("gptq.damp", g.damp)
    if scheme.group_size is not None and g.block_size % scheme.group_size and scheme.group_size % g.block_size:
        raise RecipeError(f"gptq.block_size: {g.block_size} and group_size {scheme.group_size} must divide one another")
    _positive("gptq.blend_all_tokens", g.blend_all_tokens, allow_zero=True)
    _positive("gptq.blend_rows", g.blend_rows)
    a = recipe.autoround
    _positive("autoround.iters", a.iters)
    if a.lr is not None:
        _positive("autoround.lr", a.lr)
    _positive("autoround.max_rows", a.max_rows)
    _positive("autoround.batch_rows", a.batch_rows, allow_zero=True)
    if a.init not in AUTOROUND_INITS:
        raise RecipeError(f"autoround.init: must be one of {AUTOROUND_INITS}, got {a.init!r}")
    if not 0.0 < a.min_clip <= 1.0:
        raise RecipeError(f"autoround.min_clip: must be in (0, 1], got {a.min_clip}")
    if recipe.awq is not None:
        if scheme.activation == "static":
            raise RecipeError(f"awq: needs per-token int8 activations (a w8a8-/w4a8-dynamic scheme, whose per-expert "
                              f"smooth_scale carries the activations' 1/s) or a weight-only scheme (1/s folded into the "
                              f"norm); scheme {recipe.scheme!r} has static per-tensor activation scales")
        if recipe.smoothquant is not None:
            raise RecipeError("awq: does not combine with smoothquant (rule: both set the per-expert smooth_scale); "
                              "keep one of the two sections")
        if recipe.algorithm == "autoround" and not scheme.weight_only:
            raise RecipeError("awq: does not combine with algorithm: autoround for dynamic schemes (rule: the rounding "
                              "is learned on the unscaled expert); use algorithm: rtn or gptq with awq")
        _positive("awq.grid", recipe.awq.grid)
        _positive("awq.max_rows", recipe.awq.max_rows)
    if recipe.algorithm == "autoround" and recipe.smoothquant is not None:
        raise RecipeError("autoround: learned rounding does not combine with smoothquant (rule: the rounding is "
                          "learned on the unsmoothed expert); drop the smoothquant section or use algorithm: gptq")
    c = recipe.calibration
    for key in ("num_samples", "seq_len", "batch_size"):
        _positive(f"calibration.{key}", getattr(c, key))
    _positive("calibration.min_tokens", c.min_tokens, allow_zero=True)
    if c.router_weighted and c.all_experts:
        raise RecipeError("calibration.router_weighted: does not combine with calibration.all_experts (rule: a token "
                          "not routed to an expert has no router weight there); keep one of the two")
    if not recipe.targets:
        raise RecipeError("targets: the list is empty, so nothing would be quantized")
    return recipe


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def parse_recipe(data: Any, *, name: Optional[str] = None) -> Recipe:
    """A validated Recipe from a parsed YAML mapping (`name` defaults to the file's)."""
    if isinstance(data, dict) and "name" not in data and name is not None:
        data = {"name": name, **data}
    return validate(_section("", data, Recipe))


def load_recipe(name_or_path: "str | Path | Recipe | None" = None, **overrides: Any) -> Recipe:
    """A shipped recipe by name (`w4a16-g128-gptq`), or a YAML file path; validated.

    Args:
        name_or_path: recipe name, path, an existing Recipe, or None for the default (`w8a16`).
        **overrides: calibration settings to replace (`num_samples=32`, `dataset="my.txt"`); None values are
            ignored, so CLI flags can be passed through as they are.

    Raises:
        RecipeError: unknown name, unreadable or malformed file, unknown key, wrong type, or a combination
            the kernel cannot run.
    """
    if isinstance(name_or_path, Recipe):
        recipe = name_or_path
    else:
        text, label = _recipe_text(name_or_path or DEFAULT_RECIPE)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{label}: not valid YAML: {' '.join(str(exc).split())}") from None
        try:
            recipe = parse_recipe(data, name=Path(label).stem)
        except RecipeError as exc:  # name the file and the line of the offending key
            line = _key_lines(text).get(str(exc).split(":", 1)[0])
            raise RecipeError(f"{label}{f' line {line}' if line else ''}: {exc}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(CalibrationSettings)})
        if unknown:
            raise RecipeError(f"calibration.{unknown[0]}: unknown key")
        data = recipe.to_dict()
        data["calibration"].update(overrides)
        recipe = parse_recipe(data)
    return recipe


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path (`calibration.num_samples`) -> its 1-based line in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}{key.value}"
                lines[path] = key.start_mark.line + 1
                walk(value, path + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _recipe_text(name_or_path: "str | Path") -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} is not a regular file")
        try:
            return path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    shipped = resources.files(__package__) / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}: not a file, and not one of the shipped recipes {recipe_names()}")
    return shipped.read_text(), f"{name_or_path}.yaml"


__all__ = ["AWQSettings", "AutoRoundSettings", "CalibrationSettings", "DEFAULT_RECIPE", "GPTQSettings", "Recipe", "RecipeError", "SmoothQuantSettings",
           "load_recipe", "parse_recipe", "recipe_names", "validate"]
