"""Streamed calibration: memory bounded by a chunk of experts, not by a decoder layer.

`calibrate_model` hands a model here when its source is quantized (block FP8, MXFP4, compressed-tensors:
gmmquant/sources/) or when a `max_memory` budget is given. The model is built on the meta device
(accelerate's `init_empty_weights`, with the class `calibration_model_class` picks); the embeddings, final
norm and head are loaded, then each decoder layer's non-expert weights (attention, router, norms, shared
experts) are loaded when its turn comes, dequantized as read. The routed experts are never a module:

1. the layer runs once with every targeted experts module replaced by a tap that records its calls
   `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` and returns zeros (the experts' input does not
   depend on their output inside a layer: attention, norm and router come first);
2. the experts are read in chunks whose size follows the `max_memory` budget (budget.py), each chunk moved
   to its device (`devices`, round-robin), and for each chunk: the statistics of the recorded calls' rows
   routed to its experts (GPTQ Hessians included), `quantize_experts` on the chunk, the chunk's float and
   quantized contributions to every recorded call's output, and its packed tensors written to spools
   (pack/spool.py), so that only one chunk's float and packed tensors are resident;
3. the layer runs again with the taps replaying the quantized outputs: the next layer's inputs.

`output_error` is measured on the routed experts' output (sum over chunks), not on the whole MoE block
(shared experts are the same in both runs). SmoothQuant's norm fold is not applied here (it rescales the
whole fused parameter); SmoothQuant recipes get per-expert smooth scales. W8A8 static recipes give experts
without calibration tokens the largest input scale of their chunk, not of their module.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..pack.budget import calibrate_bytes_per_expert, chunk_bounds, experts_per_chunk
from ..pack.checkpoint import save_quantized
from ..pack.format import ExpertsSpec, FormatError
from ..pack.layouts import ExpertsModuleInfo, canonical, canonical_bias, disk_naming, owned_by
from ..pack.primitives import activation_dtype
from ..pack.safety import scratch_dir
from ..pack.shards import parse_size
from ..pack.spool import ExpertSpool, SpooledTensor
from ..pack.validate import value_problem
from ..recipes import Recipe, RecipeError
from ..runtime.experts import GMMExperts, GMMProjection
from ..runtime.replace import trim_heap
from ..sources import SourceFormat, TensorStore
from .capture import capture_layer_calls, returns_more_than_hidden
from .families import CalibrationRefused
from .quantize import quantize_experts
from .stats import ExpertsStats, InputStats

logger = logging.getLogger(__name__)

Call = tuple[Tensor, Tensor, Tensor]  # hidden [T, H], top_k_index [T, k], top_k_weights [T, k] (CPU)


class ExpertsTap(nn.Module):
    """Stands in for a routed experts module: records its calls, then replays outputs given to it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.replay: Optional[list[Tensor]] = None
        self._cursor = 0

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if self.replay is None:
            self.calls.append((hidden_states.detach().cpu(), top_k_index.detach().cpu(), top_k_weights.detach().cpu()))
            return torch.zeros_like(hidden_states)
        out = self.replay[self._cursor]
        self._cursor += 1
        return out.to(hidden_states.device, hidden_states.dtype)


def check_streamable(targets: dict[str, ExpertsModuleInfo], layers: nn.ModuleList) -> None:
    """Streamed calibration handles fused, routed experts modules (transformers 5's `(hidden, top_k_index,
    top_k_weights)` call) in models whose layer loop takes a tensor back from each layer.

    Raises:
        CalibrationRefused: naming the module and the rule it breaks.
    """
    for path, info in targets.items():
        if info.call != "routed" or info.linear_names or info.stack or info.post_expert_norm:
            raise CalibrationRefused(f"{path}: streamed calibration (quantized sources, --max-memory) runs fused routed "
                                     "experts modules only (rule: call (hidden, top_k_index, top_k_weights), no per-expert "
                                     "nn.Linear list, no stacked parameters, no post-expert norm); dequantize the source "
                                     "to bf16 and calibrate it without --max-memory")
    if any(returns_more_than_hidden(layer) for layer in layers):
        raise CalibrationRefused("this model's layer loop needs each layer's full outputs during the capture pass; "
                                 "streamed calibration keeps layers on the meta device until their turn (rule: layers "
                                 "return their hidden states); calibrate a bf16 copy without --max-memory")


@dataclasses.dataclass
class ExpertSources:
    """Where one experts module's weights are in the store: fused logical tensors by projection, or per-expert
    pieces `(projection, expert, part) -> logical name` with `parts` pieces per projection."""

    fused: dict[str, str] = dataclasses.field(default_factory=dict)
    bias: dict[str, str] = dataclasses.field(default_factory=dict)
    pieces: dict[tuple[str, int, int], str] = dataclasses.field(default_factory=dict)
    parts: dict[str, int] = dataclasses.field(default_factory=dict)


def expert_sources(store: TensorStore, naming: Any, targets: dict[str, ExpertsModuleInfo]) -> dict[str, ExpertSources]:
    """Map every targeted experts module's projections to the store's logical tensors.

    Raises:
        FormatError: a projection or expert missing from the checkpoint.
    """
    owner = {f"{p}.{info.param(proj)}": (p, proj) for p, info in targets.items() for proj in info.projections}
    found = {p: ExpertSources() for p in targets}
    for name in store.entries:
        renamed = naming.rename(name)
        piece = naming.piece(renamed)
        if piece is not None and piece[0] in owner:
            path, proj = owner[piece[0]]
            found[path].pieces[(proj, piece[1], piece[2])] = name
            found[path].parts[proj] = piece[3]
        elif renamed in owner:
            path, proj = owner[renamed]
            found[path].fused[proj] = name
        elif renamed.endswith("_bias") and renamed[: -len("_bias")] in owner:
            path, proj = owner[renamed[: -len("_bias")]]
            found[path].bias[proj] = name
    for path, info in targets.items():
        for proj in info.projections:
            src = found[path]
            if proj in src.fused:
                continue
            parts = src.parts.get(proj, 0)
            missing = [e for e in range(info.num_experts) for part in range(parts) if (proj, e, part) not in src.pieces]
            if not parts or missing:
                raise FormatError(f"{store.root}: {path}.{proj}: expert weights missing from the checkpoint"
                                  f"{f' (experts {missing[:8]})' if missing else ''} (rule: every expert of every projection is stored)")
            if info.has_bias and proj not in src.bias:
                raise FormatError(f"{store.root}: {path}.{proj}_bias missing (rule: experts with biases store them)")
    return found


def read_chunk(store: TensorStore, src: ExpertSources, info: ExpertsModuleInfo, proj: str, first: int, count: int) -> Tensor:
    """Experts `first .. first + count - 1` of one projection, canonical `[C, K, N]`, dequantized to the store's dtype."""
    if proj in src.fused:
        return canonical(store.get(src.fused[proj], slice(first, first + count)), info, proj)
    parts = src.parts[proj]
    return torch.stack([torch.cat([store.get(src.pieces[(proj, e, part)]) for part in range(parts)], dim=0).t()
                        for e in range(first, first + count)])


def load_module_tensors(model: nn.Module, store: TensorStore, names: dict[str, str], device: str) -> None:
    """Set the model's parameters / buffers `names` (model name -> logical store name) from the store."""
    from accelerate.utils import set_module_tensor_to_device

    for model_name, logical in names.items():
        set_module_tensor_to_device(model, model_name, device, value=store.get(logical))
    store.release()


def _remap(index: Tensor, first: int, count: int) -> Tensor:
    """Expert ids of a chunk as 0..count-1; every other id becomes `count`, which GMMExperts drops (the
    sentinel of expert-parallel modules)."""
    local = index - first
    return torch.where((local >= 0) & (local < count), local, torch.full_like(local, count))


def chunk_statistics(calls: list[Call], first: int, count: int, weights: dict[str, Tensor], biases: dict[str, Optional[Tensor]],
                     gate: Callable[[Tensor], Tensor], projections: list[str], *, hessian: bool, inputs: bool,
                     all_experts: bool, device: str) -> ExpertsStats:
    """ExpertsStats of experts `first ..` (local ids 0..count-1) from recorded calls, as ExpertsObserver
    collects them: rows routed to each expert (all rows in all_experts mode) for gate_up / up, and that
    expert's float gate(x @ W + b) for down_proj. `weights` are canonical `[C, K, N]` float."""
    stats = ExpertsStats(count, torch.zeros(count, dtype=torch.int64),
                         {p: [InputStats(want_hessian=hessian) for _ in range(count)] for p in projections})
    first_proj = projections[0]
    for hidden, index, _ in calls:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        local = _remap(index, first, count)
        stats.routed += torch.bincount(local.reshape(-1), minlength=count + 1)[:count]
        if not inputs:
            continue
        for e in range(count):
            x = hidden if all_experts else hidden[(local == e).any(dim=-1)]
            if x.shape[0] == 0:
                continue
            x = x.to(device).float()
            stats.inputs[first_proj][e].add(x)
            if first_proj != "down_proj" and "down_proj" in projections:
                h = x @ weights[first_proj][e].float()
                if biases.get(first_proj) is not None:
                    h = h + biases[first_proj][e].float()
                stats.inputs["down_proj"][e].add(gate(h))
    return stats


class _CanonicalChunk(nn.Module):
    """A chunk's canonical `[C, K, N]` weights as a fused module `quantize_experts` reads (is_transposed,
    concatenated: `expert_weight` returns them as they are)."""

    def __init__(self, weights: dict[str, Tensor], biases: dict[str, Optional[Tensor]]):
        super().__init__()
        for proj, w in weights.items():
            setattr(self, proj, nn.Parameter(w, requires_grad=False))
            if biases.get(proj) is not None:
                setattr(self, f"{proj}_bias", nn.Parameter(biases[proj], requires_grad=False))


def _experts(source: nn.Module, info: ExpertsModuleInfo, projections: dict[str, GMMProjection]) -> GMMExperts:
    module = GMMExperts(source, info, projections, canonical_order=True)
    module.expert_parallel = True  # the ids of other chunks are sentinels (== count) and are dropped
    return module


def _contribute(module: GMMExperts, calls: list[Call], first: int, count: int, totals: list[Tensor], dtype: torch.dtype,
                device: str) -> None:
    with torch.no_grad():
        for i, (hidden, index, weights) in enumerate(calls):
            y = module(hidden.to(device, dtype), _remap(index, first, count).to(device), weights.to(device))
            totals[i] += y.float().cpu()


@dataclasses.dataclass
class StreamPlan:
    """What `calibrate_model` decided before handing over (see calibrate_model for each)."""

    src: Path
    config: Any
    config_dict: dict[str, Any]
    model_class: type
    targets: dict[str, ExpertsModuleInfo]
    layers_path: str
    batches: list[Tensor]
    num_tokens: int
    fmt: SourceFormat


def check_streamed_recipe(recipe: Recipe) -> None:
    """Refuse what the streamed path does not implement, before any work (no silent fallback).

    Raises:
        RecipeError: `algorithm: autoround` (learned rounding needs each expert's sampled routed rows, which
            chunk statistics do not keep) or `gptq.blend_all_tokens` > 0 (needs every token's Hessian per
            expert, which chunk statistics do not collect), or `calibration.router_weighted`.
    """
    if recipe.algorithm == "autoround":
        raise RecipeError("algorithm: autoround is not supported by streamed calibration (FP8 / MXFP4 / compressed "
                          "sources, or a max_memory budget) (rule: learned rounding needs each expert's sampled routed "
                          "rows, which the streamed path does not keep); use algorithm: gptq, or a bf16 source without "
                          "max_memory")
    if recipe.awq is not None:
        raise RecipeError("awq: not supported by streamed calibration (rule: the scale search needs each expert's "
                          "sampled rows, which the streamed path does not keep); drop the awq section, or calibrate a "
                          "bf16 source without max_memory")
    if recipe.gptq.blend_all_tokens > 0 and recipe.needs_hessians:
        raise RecipeError("gptq.blend_all_tokens: not supported by streamed calibration (rule: the blended Hessian "
                          "needs every token's Hessian per expert, which the streamed path does not collect); set it to "
                          "0, or calibrate a bf16 source without max_memory")
    if recipe.calibration.router_weighted and recipe.needs_activation_statistics:
        raise RecipeError("calibration.router_weighted: not supported by streamed calibration (rule: its chunk "
                          "statistics do not see the router weights); set it to false, or calibrate a bf16 source "
                          "without max_memory")


def calibrate_streamed(plan: StreamPlan, out_dir: "str | Path", recipe: Recipe, *, devices: list[str],
                       max_memory: "int | str", overwrite: bool, max_shard_size: "int | str",
                       progress: Optional[Callable] = None, on_layer: Optional[Callable] = None) -> Any:
    """Calibrate `plan` chunk by chunk (see the module docstring); returns a pipeline.CalibrationReport."""
    check_streamed_recipe(recipe)
    from accelerate import init_empty_weights

    from .pipeline import CalibrationReport, LayerInputs, LayerReport, _projection_tensors, _relative_error

    config, targets = plan.config, plan.targets
    dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    act = activation_dtype(dtype)
    device = devices[0]
    with init_empty_weights():
        model = plan.model_class._from_config(config, dtype=act).eval()
    layers = model.get_submodule(plan.layers_path)
    check_streamable(targets, layers)
    store = TensorStore(plan.src, plan.fmt, act)
    naming = disk_naming(config.model_type)
    owned = {f"{p}.{info.param(proj)}{suffix}" for p, info in targets.items() for proj in info.projections
             for suffix in ("", "_bias")}
    sources = expert_sources(store, naming, targets)
    # Model tensors by their model name -> logical store name; experts excluded.
    model_names = {naming.rename(n): n for n in store.entries if not owned_by(naming, n, owned)}
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    layer_prefix = plan.layers_path + "."
    outer = {m: n for m, n in model_names.items() if m in state and not m.startswith(layer_prefix)}
    load_module_tensors(model, store, outer, device)
    if getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta and not n.startswith(layer_prefix)]
    if left:
        raise FormatError(f"{plan.src}: tensors {left[:4]} are not in the checkpoint (rule: every weight of the model "
                          "outside the decoder layers is stored)")
    calls = capture_layer_calls(model, layers, plan.batches, device, logits_to_keep=1)
    hidden = [c[0].cpu() for c in calls[0]]
    budget = parse_size(max_memory)
    specs = {p: ExpertsSpec(p, recipe.quant_scheme(), info.num_experts, dict(info.projections), act, info.has_bias)
             for p, info in targets.items()}
    report = CalibrationReport(recipe, [], plan.num_tokens)
    side_files: dict[str, str] = {}

    def layer_tensors(spool_dir: str) -> Iterator[tuple[str, "Tensor | SpooledTensor"]]:
        nonlocal hidden
        indices = range(len(layers))
        for i in (progress(indices, "layers", len(layers)) if progress else indices):
            prefix = f"{plan.layers_path}.{i}"
            layer = layers[i]
            mine = {p[len(prefix) + 1:]: info for p, info in targets.items() if p.startswith(prefix + ".")}
            taps = {rel: ExpertsTap() for rel in mine}
            sources_meta = {rel: layer.get_submodule(rel) for rel in mine}
            for rel, tap in taps.items():
                layer.set_submodule(rel, tap)
            load_module_tensors(model, store, {m: n for m, n in model_names.items() if m.startswith(prefix + ".")
                                               and m in state}, device)
            left = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
            if left:
                raise FormatError(f"{plan.src}: layer {i}: tensors {left[:4]} are not in the checkpoint (rule: every "
                                  "non-expert weight of a decoder layer is stored)")
            inputs = LayerInputs(hidden, [(a, k) for _, a, k in calls[i]], device)
            if not mine:  # a dense layer (DeepSeek-V3's first three), or experts the recipe ignores
                hidden = inputs.run(layer)
                layers[i] = nn.Module()
                continue
            inputs.run(layer)  # pass 1: the taps record the experts' calls
            layer_report = LayerReport(i)
            pairs = []
            for rel, info in mine.items():
                path = f"{prefix}.{rel}"
                tap = taps[rel]
                out_f = [torch.zeros(c[0].shape, dtype=torch.float32) for c in tap.calls]
                out_q = [torch.zeros(c[0].shape, dtype=torch.float32) for c in tap.calls]
                per = calibrate_bytes_per_expert(info.projections, recipe.algorithm == "gptq")
                step = experts_per_chunk(budget // len(devices), per, info.num_experts)
                spools: dict[str, ExpertSpool] = {}
                errors: list[float] = []
                for j, (first, count) in enumerate(chunk_bounds(info.num_experts, step)):
                    dev = devices[j % len(devices)]
                    weights = {proj: read_chunk(store, sources[path], info, proj, first, count).to(dev)
                               for proj in info.projections}
                    biases = {proj: canonical_bias(store.get(sources[path].bias[proj], slice(first, first + count)), info, proj).to(dev)
                              if info.has_bias else None for proj in info.projections}
                    store.release()
                    chunk_info = dataclasses.replace(info, num_experts=count)
                    float_mod = _experts(sources_meta[rel], chunk_info, {
                        proj: GMMProjection.from_float(w.float(), None if biases[proj] is None else biases[proj].float(), None)
                        for proj, w in weights.items()})
                    stats = chunk_statistics(tap.calls, first, count, weights, biases, float_mod._gate, list(info.projections),
                                             hessian=recipe.algorithm == "gptq", inputs=recipe.needs_activation_statistics,
                                             all_experts=recipe.calibration.all_experts, device=dev)
                    _contribute(float_mod, tap.calls, first, count, out_f, torch.float32, dev)
                    canon = dataclasses.replace(chunk_info, is_transposed=True, is_concatenated=True, params=None)
                    result = quantize_experts(_CanonicalChunk(weights, biases), canon, stats, recipe, act, path=path)
                    for f in result.fallbacks:  # name experts by their index in the module, not in the chunk
                        local, proj = f[len(path) + 1:].split("].", 1)
                        layer_report.fallbacks.append(f"{path}[{first + int(local)}].{proj}")
                    _contribute(_experts(sources_meta[rel], chunk_info, result.projections), tap.calls, first, count, out_q, act, dev)
                    for proj, p in result.projections.items():
                        for name, t in _projection_tensors(path, proj, p).items():
                            problem = value_problem(name, t)
                            if problem:
                                raise FormatError(f"refusing to write {problem}")
                            if name not in spools:
                                spools[name] = ExpertSpool(spool_dir, name, t.dtype, (info.num_experts, *t.shape[1:]))
                            spools[name].write(first, t)
                    specs[path].extra = {proj: [b for b in ("input_scale", "smooth_scale") if getattr(p, b) is not None]
                                         for proj, p in result.projections.items()
                                         if p.input_scale is not None or p.smooth_scale is not None}
                    layer_report.routed += result.routed
                    layer_report.experts_covered += sum(any(n > 0 for n in col) for col in zip(*result.seen.values()))
                    layer_report.smoothing = result.smoothing
                    errors += result.weight_errors
                    del weights, biases, float_mod, stats, result
                    gc.collect()
                    trim_heap()
                layer_report.modules.append(path)
                layer_report.num_experts += info.num_experts
                layer_report.weight_error = sum(errors) / len(errors)
                tap.replay = out_q
                pairs += list(zip(out_q, out_f))
                for name, spool in spools.items():
                    t = spool.finish()
                    yield name, t
                    t.path.unlink()  # copied into its shard
            hidden = inputs.run(layer)  # pass 2: the taps replay the quantized experts' outputs
            layer_report.output_error = _relative_error(pairs)
            report.layers.append(layer_report)
            if on_layer is not None:
                on_layer(layer_report)
            layers[i] = nn.Module()  # free the layer
            del layer, taps, sources_meta, pairs
            gc.collect()
            trim_heap()

    def all_tensors(spool_dir: str) -> Iterator[tuple[str, "Tensor | SpooledTensor"]]:
        yield from layer_tensors(spool_dir)
        for name in store.names():
            if owned_by(naming, name, owned):
                continue
            yield name, store.get(name)
            store.release()
        side_files["calibration.json"] = json.dumps(report.to_dict(), indent=2) + "\n"

    with scratch_dir("gmmquant-spool-") as spool_dir:
        report.save = save_quantized(out_dir, config=plan.config_dict, specs=specs, tensors=all_tensors(spool_dir),
                                     act_dtype=act, ignore=list(recipe.ignore), source_dir=plan.src,
                                     max_shard_size=max_shard_size, overwrite=overwrite, extra_files=side_files)
    return report


__all__ = ["ExpertsTap", "StreamPlan", "calibrate_streamed", "check_streamable", "chunk_statistics", "expert_sources", "read_chunk"]
