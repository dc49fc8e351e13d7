"""Stream-pack: quantize the experts of a HF checkpoint directory shard by shard, without the model.

Only the model's config is instantiated, on the meta device, to learn which tensors are experts, their
shapes and layout flags. Expert weights are read one expert at a time (a safetensors slice for fused
layouts, the expert's own tensors for per-expert layouts), quantized with round-to-nearest into the
module's preallocated quantized buffers, and written when the module is complete; every other tensor is
copied unchanged. Peak memory is the quantized size of one projection plus a few expert tensors and one
output shard, not the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .checkpoint import SaveReport, projection_tensors, save_quantized
from .format import ExpertsSpec, FormatError, is_ignored
from .layouts import ExpertsModuleInfo, canonical, canonical_bias, disk_naming, find_experts_modules, meta_model
from .primitives import QuantizedWeight, activation_dtype, bias_dtype, quantize_weight
from ..sources import TensorStore, source_format
from .budget import DEFAULT_MAX_MEMORY, experts_per_chunk, pack_bytes_per_expert
from .safety import check_output_target, read_model_config, scratch_dir
from .schemes import QuantScheme
from .shards import parse_size
from .spool import ExpertSpool, SpooledTensor
from .validate import value_problem

logger = logging.getLogger(__name__)


@dataclass
class ProjectionStats:
    """Quantization error of one projection: relative Frobenius error per expert."""

    name: str
    bytes_before: int = 0
    bytes_after: int = 0
    rel_errors: list[float] = field(default_factory=list)


@dataclass
class PackSummary:
    projections: list[ProjectionStats]
    passthrough_tensors: int
    passthrough_bytes: int
    report: Optional[SaveReport] = None

    @property
    def bytes_before(self) -> int:
        return sum(p.bytes_before for p in self.projections) + self.passthrough_bytes

    @property
    def bytes_after(self) -> int:
        return sum(p.bytes_after for p in self.projections) + self.passthrough_bytes

    @property
    def max_rel_error(self) -> float:
        return max((e for p in self.projections for e in p.rel_errors), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        errors = [e for p in self.projections for e in p.rel_errors]
        return sum(errors) / len(errors) if errors else 0.0


class _ProjectionBuffer:
    """The quantized tensors of one projection, filled a chunk of experts at a time into spools
    (spool.py): only the chunk being quantized is in memory, not the projection."""

    def __init__(self, info: ExpertsModuleInfo, proj: str, scheme: QuantScheme, act_dtype: torch.dtype, spool_dir: str):
        self.info, self.proj, self.scheme, self.act_dtype = info, proj, scheme, act_dtype
        self.k, self.n = info.projections[proj]
        self.spool_dir = spool_dir
        scheme.check_shape(self.k, self.n, f"{info.path}.{proj}")
        self.spools: Optional[dict[str, ExpertSpool]] = None
        self.bias: Optional[torch.Tensor] = None
        self.done = [False] * info.num_experts
        self.parts: dict[int, dict[int, torch.Tensor]] = {}
        self.stats = ProjectionStats(f"{info.path}.{proj}")

    def add_experts(self, first: int, w: torch.Tensor) -> None:
        """Quantize experts `first ..` from their canonical `[C, K, N]` weights and spool them."""
        if tuple(w.shape[1:]) != (self.k, self.n):
            raise FormatError(f"{self.info.path}.{self.proj}: expert {first} has shape {list(w.shape[1:])}, expected [K, N] = [{self.k}, {self.n}]")
        try:
            qw = quantize_weight(w, self.scheme, self.act_dtype)
        except ValueError as err:  # name the tensor and the expert: the message alone does not say where
            bad = (~torch.isfinite(w.float())).flatten(1).any(dim=1).nonzero().flatten().tolist()
            where = f"expert {first + bad[0]}" if bad else (
                f"expert {first}" if w.shape[0] == 1 else f"experts {first}..{first + w.shape[0] - 1}")
            raise FormatError(f"{self.info.path}.{self.proj}: {where}: {err}") from None
        parts = {"qweight": qw.qweight, "scale": qw.scale, "offset": qw.offset}
        if self.spools is None:
            e_count = self.info.num_experts
            key = f"{self.info.path}.{self.proj}"
            self.spools = {role: ExpertSpool(self.spool_dir, f"{key}.{role}", t.dtype, (e_count, *t.shape[1:]))
                           for role, t in parts.items() if t is not None}
        names = projection_tensors(self.info.path, self.proj, qw)  # for value checks, by the tensors' own names
        for name, t in names.items():
            problem = value_problem(name, t)
            if problem:
                raise FormatError(f"refusing to write {problem}")
        for role, t in parts.items():
            if t is not None:
                self.spools[role].write(first, t)
        wf = w.float()
        err = (qw.dequantize() - wf).flatten(1).norm(dim=1) / wf.flatten(1).norm(dim=1).clamp_min(1e-30)
        self.stats.rel_errors += [float(x) for x in err]
        self.stats.bytes_before += w.numel() * w.element_size()
        for e in range(first, first + w.shape[0]):
            self.done[e] = True

    def add_expert(self, e: int, w: torch.Tensor) -> None:
        """Quantize expert e's canonical `[K, N]` weight into slot e."""
        self.add_experts(e, w.unsqueeze(0))

    def add_part(self, e: int, part: int, parts: int, t: torch.Tensor) -> None:
        """One per-expert source tensor (nn.Linear layout `[N_part, K]`); quantize once all parts are in."""
        got = self.parts.setdefault(e, {})
        got[part] = t
        if len(got) == parts:
            w = torch.cat([got[i] for i in range(parts)], dim=0).t()
            del self.parts[e]
            self.add_expert(e, w)

    @property
    def complete(self) -> bool:
        return all(self.done) and (not self.info.has_bias or self.bias is not None)

    def tensors(self) -> dict[str, "torch.Tensor | SpooledTensor"]:
        done = {role: spool.finish() for role, spool in self.spools.items()}
        qw = QuantizedWeight(done["qweight"], done["scale"], done.get("offset"), self.scheme)
        out = projection_tensors(self.info.path, self.proj, qw, bias=self.bias)
        self.stats.bytes_after = sum(t.nbytes if isinstance(t, SpooledTensor) else t.numel() * t.element_size()
                                     for t in out.values())
        return out


def _config_dtype(config: Any) -> Optional[torch.dtype]:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, dtype, None) if isinstance(dtype, str) else dtype


def stream_pack(
    model_dir: "str | os.PathLike",
    out_dir: "str | os.PathLike",
    scheme: QuantScheme,
    *,
    ignore: Optional[list[str]] = None,
    act_dtype: Optional[torch.dtype] = None,
    max_shard_size: "int | str" = "2GB",
    max_memory: "int | str" = DEFAULT_MAX_MEMORY,
    overwrite: bool = False,
    progress: Optional[Callable[[Iterator, str, int], Iterator]] = None,
) -> PackSummary:
    """Round-to-nearest quantize every experts module of a HF checkpoint directory into a gmmquant checkpoint.

    The source may be float (bf16 / fp16 / fp32) or quantized (block FP8, MXFP4, compressed-tensors:
    docs/SOURCES.md); quantized tensors are dequantized as they are read, one expert (or one chunk of a
    fused tensor) at a time, and non-expert ones are written dequantized to the activation dtype.

    Args:
        model_dir: HF model directory (config.json + safetensors, single file or sharded).
        out_dir: the checkpoint to write (atomically).
        scheme: the scheme applied to every experts module not matched by `ignore`.
        ignore: module-path patterns (fnmatch) of experts modules to keep in float.
        act_dtype: activation dtype; default the config's dtype if bf16/fp16, else bfloat16.
        max_shard_size: output shard bound (shards are streamed to disk, not held in memory).
        max_memory: budget for the experts in flight (`"4GiB"`, bytes): fused tensors are read and quantized
            in chunks of experts that fit it; quantized outputs are spooled to disk chunk by chunk.
        progress: optional wrapper `progress(iterable, description, total)` (the CLI passes tqdm).

    Returns:
        PackSummary with per-projection errors and byte counts.

    Raises:
        FormatError, SourceError (a source the format rules refuse), OutputError; nothing is written on error.
    """
    from transformers import AutoConfig

    src = Path(model_dir)
    if not os.path.lexists(src / "config.json"):
        raise FormatError(f"{src}: no config.json; pass a Hugging Face model directory")
    config_dict = read_model_config(src / "config.json")  # before transformers reads it: clear errors
    fmt = source_format(config_dict)
    check_output_target(out_dir, overwrite, protect=[src], probe_lock=True)  # before any work: -o SRC, foreign files, exists
    config = AutoConfig.from_pretrained(src)
    act = activation_dtype(_config_dtype(config), act_dtype)
    modules = find_experts_modules(meta_model(config))
    if not modules:
        raise FormatError(f"{src}: model type {config.model_type!r} has no fused MoE experts modules in transformers; nothing to quantize")
    ignore = list(ignore or [])
    targets = {p: info for p, info in modules.items() if not is_ignored(p, ignore)}
    if not targets:
        raise FormatError(f"{src}: --ignore {ignore} matches every experts module ({sorted(modules)[:3]}...): nothing "
                          "would be quantized, and a checkpoint without quantized modules is not a gmmquant checkpoint")
    budget = parse_size(max_memory)
    naming = disk_naming(config.model_type)
    param_owner = {f"{p}.{proj}": (p, proj) for p, info in targets.items() for proj in info.projections}
    bias_owner = {f"{p}.{proj}_bias": (p, proj) for p, info in targets.items() if info.has_bias for proj in info.projections}
    specs = {p: ExpertsSpec(p, scheme, info.num_experts, dict(info.projections), act, info.has_bias,
                            post_expert_norm=info.post_expert_norm) for p, info in targets.items()}
    store = TensorStore(src, fmt, act)  # reads (and dequantizes) logical tensors, file by file
    names = store.names()
    summary = PackSummary([], 0, 0)

    def tensors(spool_dir: str) -> Iterator[tuple[str, "torch.Tensor | SpooledTensor"]]:
        buffers = {(p, proj): _ProjectionBuffer(info, proj, scheme, act, spool_dir)
                   for p, info in targets.items() for proj in info.projections}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(store.file_of(name), []).append(name)
        for file, file_names in by_file.items():
            items = progress(file_names, file, len(file_names)) if progress else file_names
            for name in items:
                renamed = naming.rename(name)
                piece = naming.piece(renamed)
                if piece is not None and piece[0] in param_owner:
                    key = param_owner[piece[0]]
                    _, e, part, parts = piece
                    buffers[key].add_part(e, part, parts, store.get(name))
                elif renamed in param_owner:
                    key = param_owner[renamed]
                    info = targets[key[0]]
                    k, n = info.projections[key[1]]
                    step = experts_per_chunk(budget, pack_bytes_per_expert(k, n), info.num_experts)
                    for e0 in range(0, info.num_experts, step):
                        chunk = store.get(name, slice(e0, min(e0 + step, info.num_experts)))
                        buffers[key].add_experts(e0, canonical(chunk, info, key[1]))
                        del chunk
                        store.release()  # drop the mapping: resident pages stay one chunk
                elif renamed in bias_owner:
                    key = bias_owner[renamed]
                    bias = canonical_bias(store.get(name), targets[key[0]], key[1])
                    buffers[key].bias = bias.to(bias_dtype(act))
                else:
                    t = store.get(name)
                    summary.passthrough_tensors += 1
                    summary.passthrough_bytes += t.numel() * t.element_size()
                    yield name, t
                    continue
                if buffers[key].complete:  # only the projection just fed can have completed
                    buffer = buffers.pop(key)
                    summary.projections.append(buffer.stats)
                    for out_name, t in buffer.tensors().items():
                        yield out_name, t
                        if isinstance(t, SpooledTensor):
                            t.path.unlink()  # copied into its shard: the scratch disk holds one projection at most
            store.release()
        if buffers:
            missing = sorted(f"{p}.{proj}" for p, proj in buffers)
            raise FormatError(f"{src}: expert tensors incomplete for {missing} (missing experts or shards)")

    # Spools live in a scratch directory that is removed on success, on error, and by the next run after a kill.
    with scratch_dir("gmmquant-spool-") as spool_dir:
        summary.report = save_quantized(out_dir, config=config_dict, specs=specs, tensors=tensors(spool_dir), act_dtype=act,
                                        ignore=ignore, source_dir=src, max_shard_size=max_shard_size, overwrite=overwrite)
    store.release()
    return summary
