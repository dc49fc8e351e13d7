"""`calibrate_model`: a HF MoE model + a recipe + calibration text -> a gmmquant checkpoint, layer by layer.

Memory stays bounded by one decoder layer: the model is loaded with every decoder layer offloaded to disk
(accelerate, through `from_pretrained(device_map=..., offload_folder=...)`); only the embeddings and the LM
head stay in memory. One forward with the layers swapped for recorders captures each layer's call
arguments (masks, rotary embeddings) and the first layer's inputs. Then, per layer:

1. load the layer's weights onto the compute device;
2. run it on the calibration activations in float with an `ExpertsObserver` on each targeted experts module
   (per-expert token counts, input ranges, GPTQ Hessians), recording the MoE block's output;
3. SmoothQuant (W8A8): fold gate_up's factor into the norm before the block (checked), per-expert
   smooth scales for the rest;
4. quantize every expert (`quantize.quantize_experts`), install the GMM experts modules;
5. run the layer again: the quantized block's output error against step 2, and the next layer's inputs
   (quantization errors propagate, as they will at inference);
6. stream the quantized tensors into the checkpoint and drop the layer.

Tensors outside the experts are copied from the source files (with SmoothQuant's folded norms and
readers replaced). The checkpoint is written atomically: an error anywhere leaves nothing behind.
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..pack.checkpoint import SaveReport, projection_tensors, save_quantized, weight_files
from ..pack.format import ExpertsSpec, expert_tensor_owner
from ..pack.layouts import ExpertsModuleInfo, disk_naming, expert_weight, find_experts_modules, meta_model, owned_by
from ..pack.primitives import QuantizedWeight, activation_dtype
from ..pack.safety import check_output_target, read_model_config, scratch_dir
from ..pack.budget import DEFAULT_MAX_MEMORY
from ..recipes import Recipe, load_recipe
from ..runtime.adapters import gmm_experts
from ..runtime.experts import GMMProjection
from ..runtime.replace import NoExpertsError, strip_float_experts, trim_heap
from ..sources import source_format
from .awq import awq_shared_factor
from .capture import capture_layer_calls
from .data import DatasetError, calibration_ids, load_texts
from .devices import check_devices
from .families import TOWER_WORDS, calibration_model_class, check_one_stack
from .observers import OBSERVERS
from .quantize import ModuleResult, quantize_experts
from .smoothquant import apply_norm_fold, find_norm_fold, smoothing_factors, undo_norm_fold
from .stats import ExpertsInputRecorder, ExpertsObserver, ExpertsStats
from .streamed import StreamPlan, calibrate_streamed, check_streamed_recipe

logger = logging.getLogger(__name__)

Progress = Callable[[Any, str, int], Any]


@dataclass
class LayerReport:
    """One decoder layer's calibration summary (all numbers over its targeted experts modules)."""

    index: int
    modules: list[str] = field(default_factory=list)
    num_experts: int = 0
    experts_covered: int = 0  # experts whose statistics saw at least one token
    routed: list[int] = field(default_factory=list)  # tokens the router sent to each expert
    fallbacks: list[str] = field(default_factory=list)
    weight_error: float = 0.0  # mean relative Frobenius error of the quantized expert weights
    output_error: float = 0.0  # ||moe_q - moe_float|| / ||moe_float|| on the calibration tokens
    smoothing: str = "none"

    @property
    def min_tokens(self) -> int:
        return min(self.routed, default=0)

    @property
    def median_tokens(self) -> float:
        return statistics.median(self.routed) if self.routed else 0.0


@dataclass
class CalibrationReport:
    recipe: Recipe
    layers: list[LayerReport]
    num_tokens: int
    save: Optional[SaveReport] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "calibration_tokens": self.num_tokens,
            "layers": [{
                "index": r.index, "modules": r.modules, "experts": r.num_experts, "experts_covered": r.experts_covered,
                "routed_tokens_per_expert": r.routed, "fallbacks": r.fallbacks, "weight_error": r.weight_error,
                "output_error": r.output_error, "smoothing": r.smoothing,
            } for r in self.layers],
        }


def decoder_layers(model: nn.Module, experts_paths: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers holding the experts modules (`model.layers`)."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and name and any(p.startswith(f"{name}.") for p in experts_paths)
             and all(child_name.isdigit() for child_name, _ in module.named_children())]
    text = [(n, m) for n, m in found if not any(w in n for w in TOWER_WORDS)]  # the language model's, not a tower's
    if text or found:
        return (text or found)[0]
    raise NoExpertsError("could not find the decoder-layer list that holds the experts modules")


def _offload_device_map(model: nn.Module, layers_path: str, num_layers: int, device: str) -> dict[str, str]:
    """Everything on `device` except the decoder layers, which go to disk."""
    device_map: dict[str, str] = {f"{layers_path}.{i}": "disk" for i in range(num_layers)}
    parts = layers_path.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        module = model.get_submodule(parent) if parent else model
        for child, _ in module.named_children():
            if child != parts[depth]:
                device_map[f"{parent}.{child}" if parent else child] = device
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            device_map[f"{parent}.{pname}" if parent else pname] = device
    return device_map


def _materialize(layer: nn.Module, device: str) -> None:
    """Load an offloaded layer's weights and remove accelerate's hooks, so it runs as a plain module."""
    from accelerate.hooks import remove_hook_from_module

    for module in layer.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False):
            hook.pre_forward(module)
    remove_hook_from_module(layer, recurse=True)
    layer.to(device)


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_layer(layer: nn.Module, hidden: Tensor, args: tuple, kwargs: dict, device: str) -> Tensor:
    out = layer(hidden.to(device), *_to(args, device), **_to(kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def _install(layer: nn.Module, rel_path: str, info: ExpertsModuleInfo, result: ModuleResult) -> None:
    source = layer.get_submodule(rel_path)
    layer.set_submodule(rel_path, gmm_experts(source, info, result.projections, canonical_order=True))
    strip_float_experts(source, info)  # the GMM module keeps the source's gate function, not its weights


def _projection_tensors(path: str, proj: str, p: GMMProjection) -> dict[str, Tensor]:
    scale = p.antiquant_scale if p.scheme.weight_only else p.weight_scale
    qw = QuantizedWeight(p.qweight, scale, p.antiquant_offset, p.scheme)
    return projection_tensors(path, proj, qw, bias=p.bias, input_scale=p.input_scale, smooth_scale=p.smooth_scale)


def _fold_gate_up(layer: nn.Module, rel_path: str, info: ExpertsModuleInfo, stats: ExpertsStats, recipe: Recipe,
                  check: Callable[[], float], tolerance: float, factor: Optional[Tensor] = None) -> Optional[dict[str, Tensor]]:
    """A gate_up factor folded into the norm (and the experts' float weights, in place): SmoothQuant's, or
    `factor` `[K]` (powers of two) when given (the weight-only AWQ search's).

    Returns the changed non-expert parameters (name in the layer -> tensor), or None when no fold is
    possible or the folded block differs from the original by more than `tolerance` (then undone)."""
    module = layer.get_submodule(rel_path)
    if info.stack or info.call != "routed":
        return None  # folding scales the fused parameter in place: per-expert smooth scales instead
    block = layer.get_submodule(rel_path.rsplit(".", 1)[0]) if "." in rel_path else layer
    first = "gate_up_proj" if "gate_up_proj" in info.projections else "up_proj"
    inputs = [s for s in stats.inputs[first] if s.absmax is not None]
    if not inputs:
        return None
    fold = find_norm_fold(layer, block, module, check)
    if fold is None:
        logger.info("%s: no norm to fold SmoothQuant into; using per-expert smooth scales", rel_path)
        return None
    act = torch.stack([s.absmax for s in inputs]).amax(dim=0)
    param = getattr(module, info.param(first))
    k_axis = -2 if info.is_transposed else -1  # the input-channel axis of the fused [E, K, N] / [E, N, K]
    w_absmax = param.detach().abs().float().amax(dim=(0, -1 if info.is_transposed else -2))
    s = smoothing_factors(act, w_absmax, recipe.smoothquant.alpha) if factor is None else factor.to(act.device)
    saved = apply_norm_fold(fold, s)
    shape = [1, -1, 1] if k_axis == -2 else [1, 1, -1]
    with torch.no_grad():
        original = param.detach().clone()
        param.copy_((param.float() * s.view(shape)).to(param.dtype))
    error = check()
    if error > tolerance:
        undo_norm_fold(fold, saved)
        with torch.no_grad():
            param.copy_(original)
        logger.warning("%s: folding the gate_up factor into the norm changed the block output by %.2e (> %.0e); "
                       "not folded", rel_path, error, tolerance)
        return None
    for st in stats.inputs[first]:  # the experts now see x / s
        if st.absmax is not None:
            st.absmax = st.absmax / s
        if st.hessian is not None:
            st.hessian = st.hessian / s.unsqueeze(0) / s.unsqueeze(1)
        if st.samples is not None:  # learned rounding's rows (powers of two: exact in any dtype)
            st.samples = (st.samples.float() / s.cpu()).to(st.samples.dtype)
        if st.sample_targets is not None:
            st.sample_targets = (st.sample_targets.float() / s.cpu()).to(st.sample_targets.dtype)
    if stats.all_inputs:  # the blend's all-token Hessian of gate_up: one object shared by every expert
        shared = stats.all_inputs[first][0]
        if shared.hessian is not None:
            shared.hessian = shared.hessian / s.unsqueeze(0) / s.unsqueeze(1)
    changed = {id(fold.norm.weight)} | {id(r.weight) for r in fold.readers}
    return {name: p.detach().clone() for name, p in layer.named_parameters() if id(p) in changed}


def _awq_fold_factor(module: nn.Module, info: ExpertsModuleInfo, calls: list, recipe: Recipe, act: torch.dtype, *,
                     seed: int, path: str) -> Optional[Tensor]:
    """The weight-only AWQ factor `[K]` of one experts module's gate_up (calibrate/awq.py), or None when the
    search keeps a = 0, the module has no gate_up -> down pair with a known activation, or saw no tokens."""
    from .autoround import expert_activation

    first = "gate_up_proj" if "gate_up_proj" in info.projections else "up_proj"
    gate = expert_activation(module, info)
    if gate is None or not calls:
        logger.warning("%s: awq needs a gate_up -> down expert with a known activation; not scaled", path)
        return None
    s, err0, err = awq_shared_factor(calls, expert_weight(module, info, first).detach(),
                                     expert_weight(module, info, "down_proj").detach(), gate, recipe.quant_scheme(), act,
                                     OBSERVERS[recipe.observer], grid=recipe.awq.grid, max_rows=recipe.awq.max_rows,
                                     seed=seed)
    logger.info("%s: awq (norm fold) MoE output error %.4g -> %.4g", path, err0, err)
    return None if bool((s == 1).all()) else s


def _relative_error(pairs: list[tuple[Tensor, Tensor]]) -> float:
    num = sum(float((q.float() - f.float()).pow(2).sum()) for q, f in pairs)
    den = sum(float(f.float().pow(2).sum()) for _, f in pairs)
    return (num / den) ** 0.5 if den > 0 else 0.0


@dataclass
class LayerInputs:
    """One decoder layer's calibration inputs: hidden states per batch (on the CPU) and its call arguments."""

    hidden: list[Tensor]
    args_kwargs: list[tuple[tuple, dict]]
    device: str

    def run(self, layer: nn.Module, batches: Optional[int] = None) -> list[Tensor]:
        """The layer's outputs (CPU) for the first `batches` batches (all by default)."""
        pairs = list(zip(self.hidden, self.args_kwargs))[:batches]
        with torch.no_grad():
            return [_run_layer(layer, h, a, k, self.device).cpu() for h, (a, k) in pairs]


class _BlockOutputs:
    """Records the outputs of MoE blocks while a layer runs (a context manager)."""

    def __init__(self, blocks: dict[str, nn.Module]):
        self.blocks = blocks
        self.outputs: dict[str, list[Tensor]] = {rel: [] for rel in blocks}

    def __enter__(self) -> "_BlockOutputs":
        def record(rel):
            return lambda module, args, out: self.outputs[rel].append((out[0] if isinstance(out, tuple) else out).detach().cpu())
        self._hooks = [blk.register_forward_hook(record(rel)) for rel, blk in self.blocks.items()]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()


def _calibrate_layer(layer: nn.Module, index: int, prefix: str, mine: dict[str, ExpertsModuleInfo], inputs: LayerInputs,
                     recipe: Recipe, act: torch.dtype, float_inputs: Optional[LayerInputs] = None
                     ) -> tuple[dict[str, ModuleResult], LayerReport, list[Tensor], dict[str, Tensor], Optional[list[Tensor]]]:
    """Observe, (smooth,) quantize and re-run one decoder layer; see the module docstring, steps 2-5.

    `float_inputs` (learned rounding with float-stream targets): the same batches as the float model feeds
    this layer; the float layer runs on them first and its experts' input rows become the targets' inputs.

    Returns the quantized modules by relative path, the layer's report, the next layer's inputs, the
    non-expert parameters SmoothQuant changed (name in the layer -> tensor), and the float stream's next
    inputs (None without `float_inputs`)."""
    blocks = {rel: layer.get_submodule(rel.rsplit(".", 1)[0]) if "." in rel else layer for rel in mine}
    float_rows: dict[str, list[Tensor]] = {}
    next_float = None
    if float_inputs is not None:
        recorders = {rel: ExpertsInputRecorder(layer.get_submodule(rel), info) for rel, info in mine.items()}
        try:
            next_float = float_inputs.run(layer)
        finally:
            float_rows = {rel: r.remove() for rel, r in recorders.items()}
    ar = recipe.autoround
    observers = {rel: ExpertsObserver(layer.get_submodule(rel), info, all_experts=recipe.calibration.all_experts,
                                      hessian=recipe.needs_hessians, inputs=recipe.needs_activation_statistics,
                                      samples=ar.max_rows if recipe.algorithm == "autoround" else
                                      recipe.awq.max_rows if recipe.awq_per_expert else 0,
                                      sample_all=recipe.awq_per_expert,
                                      seed=ar.seed + 7919 * index, blend=recipe.blends_all_tokens,
                                      router_weighted=recipe.calibration.router_weighted and recipe.needs_activation_statistics,
                                      float_rows=float_rows.get(rel))
                 for rel, info in mine.items()}
    awq_fold = recipe.awq is not None and recipe.quant_scheme().weight_only
    recorders = {rel: ExpertsInputRecorder(layer.get_submodule(rel), info, routing=True) for rel, info in mine.items()
                 } if awq_fold else {}
    with _BlockOutputs(blocks) as float_run:
        inputs.run(layer)
    stats = {rel: obs.remove() for rel, obs in observers.items()}
    awq_calls = {rel: r.remove() for rel, r in recorders.items()}

    changed: dict[str, Tensor] = {}
    folded: set[str] = set()
    if (recipe.smoothquant is not None and recipe.smoothquant.fold_norm) or awq_fold:
        for rel, info in mine.items():
            def check(rel=rel) -> float:
                with _BlockOutputs({rel: blocks[rel]}) as probe:
                    inputs.run(layer, batches=1)
                return _relative_error([(probe.outputs[rel][0], float_run.outputs[rel][0])])

            factor = None
            if awq_fold:
                factor = _awq_fold_factor(layer.get_submodule(rel), info, awq_calls.pop(rel), recipe, act,
                                          seed=ar.seed + 7919 * index, path=f"{prefix}.{rel}")
                if factor is None:
                    continue
            # power-of-two factors make the folded block exact, bar subnormals
            fold = _fold_gate_up(layer, rel, info, stats[rel], recipe, check, tolerance=1e-3, factor=factor)
            if fold is not None:
                folded.add(rel)
                changed.update(fold)

    results = {}
    for rel, info in mine.items():
        results[rel] = quantize_experts(layer.get_submodule(rel), info, stats[rel], recipe, act, path=f"{prefix}.{rel}",
                                        gate_up_folded=rel in folded)
        _install(layer, rel, info, results[rel])
    del stats  # the Hessians

    with _BlockOutputs(blocks) as quant_run:
        next_hidden = inputs.run(layer)

    report = LayerReport(index)
    errors = []
    for rel, result in results.items():
        report.modules.append(f"{prefix}.{rel}")
        report.num_experts += len(result.routed)
        report.routed += result.routed
        report.fallbacks += result.fallbacks
        errors += result.weight_errors
        report.experts_covered += sum(any(n > 0 for n in col) for col in zip(*result.seen.values()))
        report.smoothing = result.smoothing
    report.weight_error = sum(errors) / len(errors)
    report.output_error = _relative_error([pair for rel in mine for pair in zip(quant_run.outputs[rel], float_run.outputs[rel])])
    return results, report, next_hidden, changed, next_float


def calibrate_model(
    model: "str | Path",
    out_dir: "str | Path",
    recipe: "str | Path | Recipe | None" = None,
    *,
    device: str = "cpu",
    offload: bool = True,
    overwrite: bool = False,
    max_shard_size: "int | str" = "2GB",
    max_memory: "int | str | None" = None,
    devices: Optional[list[str]] = None,
    progress: Optional[Progress] = None,
    on_layer: Optional[Callable[[LayerReport], None]] = None,
) -> CalibrationReport:
    """Calibrate and quantize every targeted experts module of a HF MoE model into a gmmquant checkpoint.

    Args:
        model: a local HF model directory (config.json, safetensors, tokenizer).
        out_dir: the checkpoint to write (atomically); it loads with `load_model` / `from_pretrained`.
        recipe: a Recipe, a shipped recipe name or a YAML path (default `w8a16`).
        device: compute device for the current layer ("cpu", "cuda:N", "npu:N").
        offload: keep decoder layers on disk until their turn (bounded memory); False loads the whole model.
        max_memory: budget for the experts in flight (`"4GiB"`, bytes). Given, or for a quantized source
            (block FP8, MXFP4, compressed-tensors), calibration streams the experts from the files in
            chunks that fit it (calibrate/streamed.py, docs/SOURCES.md); default 2GiB there.
        devices: streamed calibration only: spread each layer's expert chunks over these devices
            (round-robin; `device` is the first by default).
        progress: optional `progress(iterable, description, total)` wrapper (the CLI passes tqdm).
        on_layer: called with each layer's report as soon as it is done.

    Returns:
        CalibrationReport (also written to `out_dir/calibration.json`).

    Raises:
        RecipeError, DatasetError, NoExpertsError, FormatError; nothing is written on error.
    """
    from transformers import AutoConfig, AutoTokenizer

    recipe = load_recipe(recipe)
    src = Path(model)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a model directory (no config.json); pass a local Hugging Face model directory")
    config_dict = read_model_config(src / "config.json")  # a clear FormatError for garbage, before transformers reads it
    fmt = source_format(config_dict)  # a SourceError for an unknown quant_method, before any work
    streamed = fmt.quantized or max_memory is not None or bool(devices)
    if streamed:
        check_streamed_recipe(recipe)  # a RecipeError for what only the in-memory path implements, before any work
        devices = check_devices(list(devices or [device]))  # a missing GPU / toolkit fails now, not after the capture
    check_output_target(out_dir, overwrite, protect=[src], probe_lock=True)  # before hours of work: -o SRC, an existing output
    config = AutoConfig.from_pretrained(src)
    scheme = recipe.quant_scheme()
    model_class = calibration_model_class(config)  # causal LM or vision-language; refuses seq2seq
    # Refuse what cannot work before loading any weight: no experts, shapes the scheme cannot pack.
    skeleton = meta_model(config)
    all_modules = find_experts_modules(skeleton)
    if not all_modules:
        raise NoExpertsError(f"{src}: model type {config.model_type!r} has no MoE experts modules; nothing to calibrate")
    targets = {p: info for p, info in all_modules.items() if recipe.targets_module(p)}
    if not targets:
        raise NoExpertsError(f"{src}: the recipe's targets {list(recipe.targets)} / ignore {list(recipe.ignore)} match none of "
                             f"the experts modules ({sorted(all_modules)[:3]}...)")
    for path, info in targets.items():
        if info.linear_names:
            raise ValueError(f"{path}: calibrating an nn.ModuleList of experts (transformers 4 / remote-code layout) is not "
                             "supported; load the model with transformers >= 5, whose MoE families fuse their experts")
        for proj, (k, n) in info.projections.items():
            scheme.check_shape(k, n, f"{path}.{proj}")
    layers_path, skeleton_layers = decoder_layers(skeleton, list(targets))
    towers = check_one_stack(list(targets), layers_path)
    if towers:  # vision / audio tower experts: text calibration never reaches them; they stay as they are
        logger.warning("leaving %d experts modules of a vision / audio tower in float (%s ...): calibration runs text",
                       len(towers), towers[0])
        targets = {p: info for p, info in targets.items() if p not in towers}
    num_layers = len(skeleton_layers)
    device_map = _offload_device_map(skeleton, layers_path, num_layers, device) if offload else {"": device}
    del skeleton

    cal = recipe.calibration
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = calibration_ids(tokenizer, load_texts(cal.dataset, "train"), cal.num_samples, cal.seq_len, cal.seed)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise DatasetError(f"{src}: its tokenizer produced token id {int(ids.max())}, outside the model's vocabulary "
                           f"of {vocab}; the tokenizer files do not belong to this model")
    batches = list(ids.split(cal.batch_size))
    if streamed:
        plan = StreamPlan(src, config, config_dict, model_class, targets, layers_path, batches, int(ids.numel()), fmt)
        return calibrate_streamed(plan, out_dir, recipe, devices=devices,
                                  max_memory=DEFAULT_MAX_MEMORY if max_memory is None else max_memory,
                                  overwrite=overwrite, max_shard_size=max_shard_size, progress=progress, on_layer=on_layer)

    with scratch_dir("gmmquant-offload-") as offload_dir:  # a killed run's offload copy: removed by the next run
        kwargs = {"device_map": device_map, "experts_implementation": "gmm"}  # our float GMM path: faster on CPU
        if offload:
            kwargs["offload_folder"] = offload_dir
        model_obj = model_class.from_pretrained(src, **kwargs).eval()
        act = activation_dtype(next(model_obj.parameters()).dtype)
        layers = model_obj.get_submodule(layers_path)

        # Capture pass: every layer's call arguments, for every batch; layer 0's hidden states.
        calls = capture_layer_calls(model_obj, layers, batches, device, logits_to_keep=1)
        hidden = [c[0].cpu() for c in calls[0]]
        # learned rounding against the float model's own stream (autoround.float_targets): a second copy of the
        # hidden states that only ever passes through float layers
        float_hidden = list(hidden) if recipe.algorithm == "autoround" and recipe.autoround.float_targets else None

        specs = {p: ExpertsSpec(p, scheme, info.num_experts, dict(info.projections), act, info.has_bias,
                                post_expert_norm=info.post_expert_norm) for p, info in targets.items()}
        overrides: dict[str, Tensor] = {}
        report = CalibrationReport(recipe, [], int(ids.numel()))
        side_files: dict[str, str] = {}
        naming = disk_naming(config.model_type)
        owned = {f"{p}.{info.param(proj)}{suffix}" for p, info in targets.items() for proj in info.projections
                 for suffix in ("", "_bias")} | {f"{p}.{n}" for p, info in targets.items() for n in info.stack or ()}

        def layer_tensors() -> Iterator[tuple[str, Tensor]]:
            nonlocal hidden, float_hidden
            indices = range(num_layers)
            for i in (progress(indices, "layers", num_layers) if progress else indices):
                prefix = f"{layers_path}.{i}"
                layer = layers[i]
                _materialize(layer, device)
                mine = {p[len(prefix) + 1:]: info for p, info in targets.items() if p.startswith(prefix + ".")}
                inputs = LayerInputs(hidden, [(a, k) for _, a, k in calls[i]], device)
                float_inputs = None if float_hidden is None else LayerInputs(float_hidden, inputs.args_kwargs, device)
                if not mine:  # a dense layer, or experts the recipe ignores: just carry the activations on
                    hidden = inputs.run(layer)
                    if float_inputs is not None:
                        float_hidden = float_inputs.run(layer)
                    layers[i] = nn.Module()
                    continue
                results, layer_report, hidden, changed, float_hidden = _calibrate_layer(
                    layer, i, prefix, mine, inputs, recipe, act, float_inputs)
                overrides.update({f"{prefix}.{name}": t for name, t in changed.items()})
                report.layers.append(layer_report)
                if on_layer is not None:
                    on_layer(layer_report)
                for rel, result in results.items():
                    specs[f"{prefix}.{rel}"].extra = {
                        proj: [b for b in ("input_scale", "smooth_scale") if getattr(p, b) is not None]
                        for proj, p in result.projections.items()
                        if p.input_scale is not None or p.smooth_scale is not None}
                    for proj, p in result.projections.items():
                        yield from _projection_tensors(f"{prefix}.{rel}", proj, p).items()
                layers[i] = nn.Module()  # free the layer: its tensors are written
                del results, layer
                gc.collect()  # modules hold reference cycles (bound methods, hooks): free the layer now
                trim_heap()  # and hand its pages back, so the peak stays one layer, not the sum

        def all_tensors() -> Iterator[tuple[str, Tensor]]:
            yield from layer_tensors()
            weight_map = weight_files(src)
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, names in sorted(by_file.items()):
                with safe_open(str(src / file), framework="pt") as f:
                    for name in names:
                        if owned_by(naming, name, owned):
                            continue
                        renamed = naming.rename(name)
                        # A non-expert tensor stored under the experts module's name on disk (laguna keeps its
                        # router's e_score_correction_bias at `mlp.experts.`) is written under its model name.
                        out_name = renamed if expert_tensor_owner(name, specs) is not None else name
                        if renamed in overrides:
                            yield out_name, overrides.pop(renamed)
                        else:
                            yield out_name, f.get_tensor(name)
            if overrides:
                raise RuntimeError(f"the norm fold (SmoothQuant / AWQ) changed {sorted(overrides)} but they are not in {src}'s files")
            side_files["calibration.json"] = json.dumps(report.to_dict(), indent=2) + "\n"

        report.save = save_quantized(out_dir, config=config_dict, specs=specs, tensors=all_tensors(), act_dtype=act,
                                     ignore=list(recipe.ignore), source_dir=src, max_shard_size=max_shard_size,
                                     overwrite=overwrite, extra_files=side_files)
    return report


__all__ = ["CalibrationReport", "LayerReport", "calibrate_model", "decoder_layers"]
