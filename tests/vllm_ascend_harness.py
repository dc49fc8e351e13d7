"""Run vllm-ascend's own MoE loading and expert-MLP code on CPU, with torch_npu's ops routed to gmmquant.

What runs is the unmodified source of vllm-ascend 0.23.0.post1 and vLLM 0.23.0 (fetched by
`tools/fetch_vllm_ascend.py`, never copied into this project):

- `vllm_ascend/quantization/modelslim_config.py`: `AscendModelSlimConfig` reads quant_model_description.json
  and picks the MoE scheme of a layer (`get_quant_method`), so a type it does not register for MoE raises
  its own NotImplementedError;
- `vllm_ascend/quantization/method_adapters.py` (`AscendFusedMoEMethod.create_weights`) and
  `vllm_ascend/quantization/methods/*.py` (every scheme module, through the package's `__init__`): the
  parameters, their loader attributes and `process_weights_after_loading`;
- vLLM's `FusedMoE.weight_loader` and the helpers it calls (`_load_w13`, `_load_w2`, per-channel / group
  scale loading) and `make_expert_params_mapping`, compiled from `vllm/model_executor/layers/fused_moe/layer.py`
  onto a small layer class (the rest of that class needs vLLM's runtime);
- `vllm_ascend/ops/fused_moe/moe_mlp.py` (`quant_apply_mlp`, `unquant_apply_mlp`) and
  `vllm_ascend/device/device_op.py` (`DeviceOperator`): the expert MLP and its `npu_grouped_matmul` calls.

Stand-ins: `torch_npu` exposes exactly the ops these paths call, each routed to gmmquant (an op not listed
raises, naming itself); `torch.npu` / `Tensor.npu()` are host no-ops; the engine's runtime context (vLLM
config, parallel groups, forward context, logging) is a permissive placeholder, with explicit values where
the code branches on them (one rank, no expert-parallel load balancing, no fused MC2, no custom ops, no
Triton, not the A5 / 310P device adaptors). The per-checkpoint loop over tensor names is vLLM's MoE model
loop (qwen3_moe `load_weights`, expert branch), restated here. Everything is installed for the duration of
`sandbox()` and removed afterwards, so nothing leaks into other tests.
"""

from __future__ import annotations

import ast
import contextlib
import enum
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open

import gmmquant

VLLM_ASCEND = "vllm_ascend-0.23.0.post1"
VLLM = "vllm-0.23.0"
LAYER_PY = "vllm/model_executor/layers/fused_moe/layer.py"
# Modules executed from the sdist; every other vllm / vllm_ascend module is a placeholder.
REAL_MODULES = ("vllm_ascend.quantization.quant_type", "vllm_ascend.quantization.method_adapters",
                "vllm_ascend.quantization.modelslim_config", "vllm_ascend.ops.fused_moe.moe_mlp",
                "vllm_ascend.device.device_op")
REAL_PACKAGES = ("vllm_ascend.quantization.methods",)
# vLLM's qwen3_moe load_weights: expert tensors with these endings are skipped when the layer has no such parameter
IGNORE_SUFFIXES = (".bias", "_bias", ".weight_scale", "_weight_scale", ".input_scale", "_input_scale")
FUSED_MOE_METHODS = ("_load_per_tensor_weight_scale", "_load_combined_w13_weight_scale",
                     "_load_model_weight_or_group_weight_scale", "_load_per_channel_weight_scale", "_get_hidden_dim",
                     "_narrow_expert_data_for_padding", "_load_w13", "_load_w2", "_load_single_value", "_load_g_idx",
                     "_map_global_expert_id_to_local_expert_id", "weight_loader", "make_expert_params_mapping")


def peer_dir() -> Path:
    return Path(os.environ.get("GMMQUANT_PEER_DIR") or Path.home() / ".cache" / "gmmquant" / "peer")


def available() -> bool:
    root = peer_dir()
    return (root / VLLM_ASCEND / "vllm_ascend" / "quantization" / "modelslim_config.py").is_file() and (root / VLLM / LAYER_PY).is_file()


# ---------------------------------------------------------------------------------------------------------
# torch_npu: the ops the MoE paths call, on gmmquant
# ---------------------------------------------------------------------------------------------------------

class NpuOps(types.ModuleType):
    """`torch_npu` with the ops vllm-ascend's MoE load and MLP paths call; records every call by name."""

    def __init__(self, backend: str):
        super().__init__("torch_npu")
        self.backend = backend
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"torch_npu.{name} is called by vllm-ascend here but has no stand-in in tests/vllm_ascend_harness.py")

    def npu_grouped_matmul(self, x, weight, **kwargs):
        self.calls.append(("npu_grouped_matmul", {"x": [t.dtype for t in x], "weight": [t.dtype for t in weight],
                                                  **{k: ([t.dtype for t in v] if isinstance(v, list) else v)
                                                     for k, v in kwargs.items() if v is not None}}))
        return gmmquant.grouped_matmul(x, weight, backend=self.backend, **kwargs)

    def npu_dynamic_quant(self, x, smooth_scales=None, group_index=None, dst_type=torch.int8):
        self.calls.append(("npu_dynamic_quant", {}))
        return gmmquant.dynamic_quant(x, smooth_scales=smooth_scales, group_index=group_index, dst_type=dst_type)

    def npu_swiglu(self, x, dim=-1):
        # silu(first half) * second half in x's dtype, as the Hugging Face modules compute it
        self.calls.append(("npu_swiglu", {}))
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_format_cast(self, t, fmt):
        self.calls.append(("npu_format_cast", {"format": fmt}))  # NZ is a device memory layout, values unchanged
        return t

    def npu_convert_weight_to_int4pack(self, w):
        self.calls.append(("npu_convert_weight_to_int4pack", {}))
        return gmmquant.pack_int4(w.to(torch.int8))  # int32 values in [-8, 7], 8 per int32 along the last dim


class _Npu:
    """`torch.npu` on the host: streams and caches do nothing."""

    class _Stream:
        def record_event(self):
            return None

    def current_stream(self):
        return self._Stream()

    def empty_cache(self):
        return None


# ---------------------------------------------------------------------------------------------------------
# placeholders for the engine's runtime
# ---------------------------------------------------------------------------------------------------------

class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder_class(name)


class _Placeholder(metaclass=_PlaceholderMeta):
    """Anything the engine's runtime provides that the load / MLP paths only pass around."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # a decorator: leave the decorated object as it is
        return _Placeholder()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()

    def __bool__(self):
        return False


_CLASSES: dict[str, type] = {}


def _placeholder_class(name: str) -> type:
    if name not in _CLASSES:
        _CLASSES[name] = _PlaceholderMeta(name, (_Placeholder,), {})
    return _CLASSES[name]


class _StubModule(types.ModuleType):
    def __init__(self, name: str, values: dict[str, Any]):
        super().__init__(name)
        self.__path__ = []  # a package, so submodules import
        self.__dict__.update(values)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder_class(name)
        setattr(self, name, value)
        return value


class FusedMoeWeightScaleSupported(enum.Enum):  # replaced by vLLM's own enum in sandbox()
    pass


class MoECommType(enum.Enum):
    ALLGATHER = 0
    MC2 = 1
    ALLTOALL = 2
    FUSED_MC2 = 3


class MoEActivation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    SWIGLUOAI = "swigluoai"
    SWIGLUSTEP = "swiglustep"


class _Logger(logging.LoggerAdapter):
    def __init__(self):
        super().__init__(logging.getLogger("vllm_ascend_harness"), {})

    def warning_once(self, *a, **k):
        self.warning(*a, **k)

    def info_once(self, *a, **k):
        self.info(*a, **k)

    def debug_once(self, *a, **k):
        self.debug(*a, **k)


def _set_weight_attrs(weight, attrs):
    for key, value in (attrs or {}).items():
        assert not hasattr(weight, key), f"overwriting existing tensor attribute {key}"
        setattr(weight, key, value)


class _Context:
    """The values the vllm-ascend code reads from vLLM's config and its own config."""

    def __init__(self):
        ns = types.SimpleNamespace
        self.vllm_config = ns(quant_config=ns(quant_description={}), model_config=ns(dtype=torch.bfloat16, enforce_eager=True,
                                                                                      hf_config=ns(model_type="qwen3_moe")),
                              compilation_config=ns(mode=None), parallel_config=ns(enable_expert_parallel=False))
        self.ascend_config = ns(multistream_overlap_gate=False, eplb_config=ns(dynamic_eplb=False), enable_fused_mc2=0)
        self.extra_ctx = ns(moe_comm_type=MoECommType.ALLGATHER, moe_comm_method=None)


def _values(ctx: _Context, layer_cls: type, scale_enum: type) -> dict[str, dict[str, Any]]:
    return {
        "vllm.config": {"get_current_vllm_config": lambda: ctx.vllm_config,
                        "get_current_vllm_config_or_none": lambda: ctx.vllm_config},
        "vllm.logger": {"logger": _Logger(), "init_logger": lambda name: _Logger()},
        "vllm.distributed": {"get_tensor_model_parallel_world_size": lambda: 1, "get_tensor_model_parallel_rank": lambda: 0},
        "vllm.model_executor.layers.fused_moe": {"FusedMoE": layer_cls, "FusedMoeWeightScaleSupported": scale_enum},
        "vllm.model_executor.layers.fused_moe.activation": {"MoEActivation": MoEActivation},
        "vllm.model_executor.utils": {"set_weight_attrs": _set_weight_attrs},
        "vllm.triton_utils": {"HAS_TRITON": False},
        "vllm_ascend.utils": {"vllm_version_is": lambda v: v == "0.23.0", "ACL_FORMAT_FRACTAL_NZ": 29,
                              "maybe_trans_nz": lambda t: t, "COMPRESSED_TENSORS_METHOD": "compressed-tensors",
                              "ASCEND_QUANTIZATION_METHOD": "ascend", "enable_custom_op": lambda: False,
                              "dispose_tensor": lambda t: None, "get_weight_prefetch_method": lambda: None,
                              "get_ascend_device_type": lambda: "A2", "enable_dsa_cp": lambda: False,
                              "enable_dsa_cp_with_layer_shard": lambda: False, "mlp_tp_enable": lambda: False,
                              "oproj_tp_enable": lambda: False, "flashcomm2_enable": lambda: False},
        "vllm_ascend.ascend_config": {"get_ascend_config": lambda: ctx.ascend_config},
        "vllm_ascend.ascend_forward_context": {"_EXTRA_CTX": ctx.extra_ctx, "MoECommType": MoECommType},
        "vllm_ascend.distributed.parallel_state": {"get_mc2_group": lambda: object()},  # no device_group: single rank
    }


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, src: Path, values: dict[str, dict[str, Any]]):
        self.src, self.values = src, values

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top not in ("vllm", "vllm_ascend"):
            return None
        rel = self.src / fullname.replace(".", "/")
        if fullname in REAL_MODULES or any(fullname.startswith(p + ".") for p in REAL_PACKAGES):
            return importlib.util.spec_from_file_location(fullname, rel.with_suffix(".py"))
        if fullname in REAL_PACKAGES:
            return importlib.util.spec_from_file_location(fullname, rel / "__init__.py", submodule_search_locations=[str(rel)])
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name, self.values.get(spec.name, {}))

    def exec_module(self, module):
        pass


def _fused_moe_class(layer_py: Path, scale_enum_out: dict) -> type:
    """vLLM's FusedMoe weight-loading methods (FUSED_MOE_METHODS), compiled from its source onto an nn.Module."""
    tree = ast.parse(layer_py.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusedMoE")
    enum_def = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusedMoeWeightScaleSupported")
    keep = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in FUSED_MOE_METHODS
            and not any(isinstance(d, ast.Name) and d.id == "overload" for d in n.decorator_list)]
    missing = sorted(set(FUSED_MOE_METHODS) - {n.name for n in keep})
    if missing:
        raise RuntimeError(f"{layer_py}: FusedMoE has no {missing}")
    cls.bases, cls.keywords, cls.decorator_list, cls.body = [ast.Name("_Module", ast.Load())], [], [], keep
    module = ast.Module(body=[enum_def, cls], type_ignores=[])
    ast.fix_missing_locations(module)
    from typing import Literal, cast, overload

    class EplbState:  # vLLM's default (no redundant experts): physical expert i is logical expert i
        @staticmethod
        def build_initial_global_physical_to_logical_map(num_experts, num_redundant):
            return list(range(num_experts)) + [i % num_experts for i in range(num_redundant)]

    namespace = {"torch": torch, "Enum": enum.Enum, "_Module": torch.nn.Module, "Literal": Literal, "cast": cast,
                 "overload": overload, "UninitializedParameter": torch.nn.UninitializedParameter, "EplbState": EplbState}
    exec(compile(module, str(layer_py), "exec"), namespace)  # noqa: S102 - vLLM's own source, see module docstring
    scale_enum_out["enum"] = namespace["FusedMoeWeightScaleSupported"]
    return namespace["FusedMoE"]


@contextlib.contextmanager
def sandbox(backend: str = "reference") -> Iterator[types.SimpleNamespace]:
    """Install the stand-ins, import vllm-ascend's modules from the sdist, and remove everything on exit.

    Yields a namespace with `npu` (the torch_npu stand-in, whose `.calls` records each op), `ctx` (config
    values), `FusedMoE` (the layer class), `modelslim` (vllm-ascend's modelslim_config module) and `moe_mlp`.
    """
    root = peer_dir()
    src = root / VLLM_ASCEND
    ctx = _Context()
    enum_box: dict = {}
    base = _fused_moe_class(root / VLLM / LAYER_PY, enum_box)

    class FusedMoE(base):
        """The slice of vLLM's FusedMoE that loading touches (one rank, no expert parallelism)."""

        def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, quant_config: Any):
            super().__init__()
            ns = types.SimpleNamespace
            self.moe_config = ns(is_act_and_mul=True, moe_parallel_config=ns(tp_size=1), intermediate_size_per_partition=intermediate_size)
            self.tp_rank, self.tp_size = 0, 1
            self.quant_config = quant_config
            self.local_num_experts = self.global_num_experts = num_experts
            self.expert_map_manager = ns(map_global_to_local=lambda e: e)
            self.swiglu_limit = 0.0

    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in ("vllm", "vllm_ascend", "torch_npu")}
    for name in saved:
        del sys.modules[name]
    npu = NpuOps(backend)
    finder = _Finder(src, _values(ctx, FusedMoE, enum_box["enum"]))
    sys.modules["torch_npu"] = npu
    sys.meta_path.insert(0, finder)
    had_npu = hasattr(torch, "npu")
    torch.npu = _Npu()
    torch.Tensor.npu = lambda self, *a, **k: self
    try:
        import importlib

        modelslim = importlib.import_module("vllm_ascend.quantization.modelslim_config")
        moe_mlp = importlib.import_module("vllm_ascend.ops.fused_moe.moe_mlp")
        yield types.SimpleNamespace(npu=npu, ctx=ctx, FusedMoE=FusedMoE, modelslim=modelslim, moe_mlp=moe_mlp)
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "vllm_ascend", "torch_npu")]:
            del sys.modules[name]
        sys.modules.update(saved)
        del torch.Tensor.npu
        if not had_npu:
            del torch.npu
        _CLASSES.clear()


# ---------------------------------------------------------------------------------------------------------
# loading an AscendV1 directory's experts module, as vLLM + vllm-ascend do
# ---------------------------------------------------------------------------------------------------------

def read_dir(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, quant_model_description.json, every tensor) of an AscendV1 directory."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    return (json.loads((path / "config.json").read_text()), json.loads((path / "quant_model_description.json").read_text()), tensors)


def load_experts(sb: types.SimpleNamespace, path: Path, prefix: str, *, num_experts: int, hidden_size: int,
                 intermediate_size: int, params_dtype: torch.dtype = torch.bfloat16) -> types.SimpleNamespace:
    """Build the FusedMoE layer `prefix` (e.g. `model.layers.0.mlp.experts`) from an AscendV1 directory.

    Runs, in vLLM's order: the quant config's `get_quant_method`, `create_weights`, the weight loader for
    every checkpoint tensor of the layer (qwen3_moe's expert mapping loop), `process_weights_after_loading`.

    Returns:
        namespace: `layer`; `consumed`, the checkpoint tensors under `prefix.` that the weight loader took;
        `skipped`, those vLLM's model loop skips (names ending in IGNORE_SUFFIXES with no parameter);
        `unfilled`, the layer's parameters no tensor filled (they keep what `create_weights` put there).

    Raises:
        AssertionError: a tensor of the layer in the checkpoint that no parameter takes.
    """
    config, description, tensors = read_dir(path)
    sb.ctx.vllm_config.model_config.hf_config.model_type = config["model_type"]
    sb.ctx.vllm_config.model_config.dtype = params_dtype
    quant_config = sb.modelslim.AscendModelSlimConfig(description)
    sb.ctx.vllm_config.quant_config = quant_config
    layer = sb.FusedMoE(num_experts, hidden_size, intermediate_size, quant_config)
    layer.quant_method = quant_config.get_quant_method(layer, prefix)
    layer.quant_method.create_weights(layer=layer, num_experts=num_experts, hidden_size=hidden_size,
                                      intermediate_size_per_partition=intermediate_size, params_dtype=params_dtype,
                                      weight_loader=layer.weight_loader, global_num_experts=num_experts)
    parent = prefix.rsplit(".", 1)[0] + "."
    params = {parent + "experts." + n: p for n, p in layer.named_parameters()}
    mapping = sb.FusedMoE.make_expert_params_mapping(layer, "gate_proj", "down_proj", "up_proj", num_experts)
    filled: dict[str, int] = {}
    consumed, skipped = set(), set()
    for name, tensor in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name not in name:
                continue
            mapped = name.replace(weight_name, param_name)
            if mapped.endswith(IGNORE_SUFFIXES) and mapped not in params:  # vLLM's model loop skips these
                skipped.add(name)
                break
            assert mapped in params, f"{name}: vllm-ascend's {type(layer.quant_method.quant_method).__name__} has no parameter {mapped}"
            ok = params[mapped].weight_loader(params[mapped], tensor, mapped, shard_id=shard_id, expert_id=expert_id,
                                              return_success=True)
            assert ok, f"{name}: the weight loader did not take it"
            consumed.add(name)
            filled[mapped] = filled.get(mapped, 0) + 1
            break
        else:
            raise AssertionError(f"{name}: no expert parameter mapping matches it")
    unfilled = sorted(set(params) - set(filled))
    layer.quant_method.process_weights_after_loading(layer)
    return types.SimpleNamespace(layer=layer, consumed=consumed, skipped=skipped, unfilled=unfilled)


def expert_mlp(sb: types.SimpleNamespace, layer: torch.nn.Module, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """vllm-ascend's expert MLP (`moe_mlp.unified_apply_mlp`'s quantized / float branches) on rows sorted by
    expert: the tensors the layer's scheme passes to `build_fused_experts_input` in its `apply`."""
    scheme = layer.quant_method.quant_method
    kind = type(scheme).__name__
    if kind == "AscendW4A16FusedMoEMethod":
        out, _ = sb.moe_mlp.quant_apply_mlp(
            hidden_states=x, w1=layer.w13_weight_packed, w1_scale=layer.w13_weight_scale, w2=layer.w2_weight_packed,
            w2_scale=layer.w2_weight_scale, w1_offset=layer.w13_weight_offset, w2_offset=layer.w2_weight_offset,
            group_list=counts, group_list_type=1, act_quant_type=torch.int8, use_bf16=x.dtype == torch.bfloat16, activation="silu")
        return out
    if kind in ("AscendW8A8DynamicFusedMoEMethod", "AscendW8A8PDMixFusedMoeMethod"):
        w1_scale, w2_scale, bias1, bias2 = [layer.w13_weight_scale_fp32], [layer.w2_weight_scale], None, None
        w1, w2 = [layer.w13_weight], [layer.w2_weight]
    elif kind == "AscendW4A8DynamicFusedMoEMethod":
        w1, w2 = [layer.w13_weight], [layer.w2_weight]
        w1_scale, w2_scale = [layer.w13_weight_scale], [layer.w2_weight_scale]
        bias1, bias2 = [layer.w13_scale_bias.detach()], [layer.w2_scale_bias.detach()]
    else:
        raise NotImplementedError(f"expert_mlp: {kind}")
    out, _ = sb.moe_mlp.quant_apply_mlp(
        hidden_states=x, w1=w1, w1_scale=w1_scale, w2=w2, w2_scale=w2_scale, group_list=counts, group_list_type=1,
        w1_scale_bias=bias1, w2_scale_bias=bias2, act_quant_type=torch.int8, use_bf16=x.dtype == torch.bfloat16,
        activation="silu")
    return out


def gmmquant_mlp(projections: dict[str, Any], x: torch.Tensor, counts: torch.Tensor, act_dtype: torch.dtype,
                 backend: str) -> torch.Tensor:
    """gmmquant's runtime on the same rows: its GMMProjection modules, SiLU(gate) * up in between."""
    from gmmquant.runtime.experts import GMMProjection

    gate_up = GMMProjection.from_quantized(projections["gate_up_proj"], act_dtype, backend=backend)
    down = GMMProjection.from_quantized(projections["down_proj"], act_dtype, backend=backend)
    h = gate_up(x, counts)
    half = h.shape[-1] // 2
    return down(F.silu(h[:, :half]) * h[:, half:], counts)


__all__ = ["available", "expert_mlp", "gmmquant_mlp", "load_experts", "peer_dir", "read_dir", "sandbox"]
