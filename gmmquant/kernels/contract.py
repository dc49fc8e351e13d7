"""The npu_grouped_matmul contract: every argument rule of the spec, checked in one place.

`check_grouped_matmul` validates a call against the Atlas A2/A3 rows of
`shared/reference/npu_grouped_matmul.zh.md` and returns a `GMMPlan`. Backends never see an illegal call:
a call that would fail on an NPU fails here, on any device, with a `GMMContractError` naming the rule.

The two APIs of the spec:
- "list" API: `group_list` is a `List[int]` (cumulative row ends) or None with `group_type` None
  (spec table 1 and the first scenario table);
- "tensor" API: `group_list` is an int64 Tensor, or None with `group_type` -1 (spec table 2 and the
  second scenario table).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .errors import GMMContractError
from .plan import GMMPlan, Group, Mode

MAX_LIST_LEN = 128  # x / weight / parameter lists
MAX_GROUPS = 1024  # groups of a single 3-D weight (a list of weights is already capped by MAX_LIST_LEN)
# The spec gives 65536 in one line and 2097151 in the next for A2/A3; DESIGN.md adopts the stricter one so
# that a call accepted here is accepted on every A2/A3 software stack.
INNER_AXIS_LIMIT = 65536
ACT_TYPES = {0: "none", 1: "relu", 2: "gelu_tanh", 4: "fast_gelu", 5: "silu"}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Bias dtype required for a float / weight-only call, by activation dtype (spec tables 1 and 2).
FLOAT_BIAS_DTYPE = {torch.float16: torch.float16, torch.bfloat16: torch.float32, torch.float32: torch.float32}
# Output dtype of a full-quant call by scale dtype (spec table 2): int64 -> int8, bf16 -> bf16, fp32 -> fp16.
QUANT_OUT_DTYPE = {torch.int64: torch.int8, torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}


def _fail(rule: str, message: str) -> None:
    raise GMMContractError(rule, message)


def _dtype_name(t: Optional[Tensor | torch.dtype]) -> str:
    if t is None:
        return "None"
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return str(dtype).replace("torch.", "")


def _tensor_list(name: str, value: Any, *, required: bool) -> Optional[list[Tensor]]:
    if value is None:
        if required:
            _fail(f"{name}.required", f"{name} is required")
        return None
    if isinstance(value, Tensor):
        _fail(f"{name}.list", f"{name} must be a list of tensors, got a bare Tensor (wrap it: [{name}])")
    if not isinstance(value, (list, tuple)):
        _fail(f"{name}.list", f"{name} must be a list of tensors, got {type(value).__name__}")
    if len(value) == 0:
        _fail(f"{name}.list", f"{name} must not be an empty list")
    if len(value) > MAX_LIST_LEN:
        _fail(f"{name}.max_len", f"{name} has {len(value)} tensors; the spec allows at most {MAX_LIST_LEN}")
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            _fail(f"{name}.list", f"{name}[{i}] is {type(t).__name__}, not a Tensor")
    return list(value)


def _is_transposed(t: Tensor) -> bool:
    """True for a transposed view: last two dims swapped in memory (stride[-2] == 1, stride[-1] != 1)."""
    if t.dim() < 2 or t.shape[-1] <= 1 or t.shape[-2] <= 1:
        return False
    return t.stride(-1) != 1 and t.stride(-2) == 1


def check_grouped_matmul(
    x: Any,
    weight: Any,
    *,
    bias: Any = None,
    scale: Any = None,
    offset: Any = None,
    antiquant_scale: Any = None,
    antiquant_offset: Any = None,
    per_token_scale: Any = None,
    group_list: Any = None,
    activation_input: Any = None,
    activation_quant_scale: Any = None,
    activation_quant_offset: Any = None,
    split_item: int = 0,
    group_type: Optional[int] = None,
    group_list_type: int = 0,
    act_type: int = 0,
    output_dtype: Optional[torch.dtype] = None,
    tuning_config: Optional[Sequence[int]] = None,
    read_group_list: bool = True,
) -> GMMPlan:
    """Validate npu_grouped_matmul arguments; return the plan backends execute.

    `read_group_list=False` skips the checks that need group_list's values when it is a device tensor
    (the npu backend passes it to the kernel untouched and a host read would stall the stream); the
    returned plan then has no groups.

    The checks that depend only on the call's signature (every tensor's dtype, shape, strides and device,
    the scalar arguments, a List[int] group_list) are cached per signature (`_verdicts`): a model calls
    the same few signatures once per layer and step. Only group_list's values are checked on every call.

    Raises:
        GMMContractError: the first rule the call breaks, with the rule name and the offending values.
    """
    static_args = (x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale, group_list,
                   activation_input, activation_quant_scale, activation_quant_offset, split_item, group_type,
                   group_list_type, act_type, output_dtype, tuning_config)
    key = _signature(static_args)
    verdict = _verdicts.get(key) if key is not None else None
    if verdict is None:
        verdict = _check_signature(*static_args)
        if key is not None:
            if len(_verdicts) >= VERDICT_CACHE_SIZE:
                _verdicts.clear()
            _verdicts[key] = verdict
    xs, ws = list(x), list(weight)
    if isinstance(group_list, (list, tuple)) and len(group_list) == 0:  # as in _check_signature
        group_list = None
    api, mode, out_dtype, weight_bits = verdict.api, verdict.mode, verdict.out_dtype, verdict.weight_bits
    x_single, w_single, single_output = verdict.x_single, verdict.w_single, verdict.single_output
    k, n = list(verdict.k), list(verdict.n)  # the plan's own lists; the verdict keeps tuples

    plan_groups, output_shapes, group_sizes = _plan_groups(
        xs, ws, api, group_list, group_type, group_list_type, x_single, w_single, single_output, n, read_group_list
    )
    if per_token_scale is not None:
        _check_per_token_scale(per_token_scale, xs)

    def as_list(v: Any) -> Optional[list[Tensor]]:
        return None if v is None else list(v)

    # group_list forms 0 and 1 list the experts in order by construction; form 2 may skip or repeat them.
    in_order = x_single and w_single and group_type == 0 and group_list_type in (0, 1)
    return GMMPlan(
        mode=mode,
        groups=plan_groups,
        out_dtype=out_dtype,
        act_type=act_type,
        weight_bits=weight_bits,
        n=n,
        k=k,
        output="stacked" if group_type == 2 else ("single" if single_output else "multi"),
        output_shapes=output_shapes,
        xs=xs,
        weights=ws,
        bias=as_list(bias),
        scale=as_list(scale),
        antiquant_scale=as_list(antiquant_scale),
        antiquant_offset=as_list(antiquant_offset),
        per_token_scale=as_list(per_token_scale),
        x=xs[0] if x_single else None,
        weight=ws[0] if w_single else None,
        experts_in_order=bool(in_order),
        group_sizes=group_sizes if in_order else None,
        k_split=group_type == 2,
    )


def _check_signature(x: Any, weight: Any, bias: Any, scale: Any, offset: Any, antiquant_scale: Any,
                     antiquant_offset: Any, per_token_scale: Any, group_list: Any, activation_input: Any,
                     activation_quant_scale: Any, activation_quant_offset: Any, split_item: int,
                     group_type: Optional[int], group_list_type: int, act_type: int,
                     output_dtype: Optional[torch.dtype], tuning_config: Optional[Sequence[int]]) -> "_Verdict":
    """Every rule that does not read group_list's values; the outcome depends only on the signature."""
    xs = _tensor_list("x", x, required=True)
    ws = _tensor_list("weight", weight, required=True)
    for name, value in (
        ("offset", offset),
        ("activation_input", activation_input),
        ("activation_quant_scale", activation_quant_scale),
        ("activation_quant_offset", activation_quant_offset),
    ):
        if value is not None:
            _fail(f"{name}.none", f"{name} is reserved by the spec and must be None")
    if split_item not in (0, 1, 2, 3):
        _fail("split_item.range", f"split_item must be 0, 1, 2 or 3, got {split_item!r}")
    single_output = split_item in (2, 3)

    # Which API: a List[int] group_list (spec table 1) or a Tensor one (table 2).
    if isinstance(group_list, Tensor):
        api = "tensor"
    elif group_list is None:
        api = "list" if group_type is None else "tensor"
    elif isinstance(group_list, (list, tuple)):
        api = "list"
        if len(group_list) == 0:  # an empty List[int] means "no grouping", like None
            group_list = None
        elif not all(isinstance(v, int) and not isinstance(v, bool) for v in group_list):
            _fail("group_list.type", f"a list group_list must hold Python ints, got {group_list!r}")
    else:
        _fail("group_list.type", f"group_list must be None, a List[int] or an int64 Tensor, got {type(group_list).__name__}")

    if api == "list":
        if group_type is not None:
            _fail("group_type.list_api", f"group_type must be None when group_list is a List[int] or None, got {group_type}")
        if group_list_type != 0:
            _fail("group_list_type.list_api", f"group_list_type must be left at its default when group_list is a List[int], got {group_list_type}")
        if act_type != 0:
            _fail("act_type.list_api", f"act_type must be 0 when group_list is a List[int], got {act_type}")
        if per_token_scale is not None:
            _fail("per_token_scale.list_api", "per_token_scale must be None when group_list is a List[int]; pass group_list as an int64 Tensor")
    else:
        if group_type is None:
            _fail("group_type.required", "group_type must be given (-1, 0 or 2) when group_list is a Tensor")
        if group_type == 1:
            _fail("group_type.n_axis", "group_type 1 (N-axis grouping) is not supported on Atlas A2/A3")
        if group_type not in (-1, 0, 2):
            _fail("group_type.range", f"group_type must be -1, 0 or 2, got {group_type!r}")
        if group_list_type not in (0, 1, 2):
            _fail("group_list_type.range", f"group_list_type must be 0 (cumsum), 1 (counts) or 2 ([idx, count] pairs), got {group_list_type!r}")
        if act_type == 3:
            _fail("act_type.unsupported", "act_type 3 is reserved and not supported by the kernel")
        if act_type not in ACT_TYPES:
            _fail("act_type.range", f"act_type must be one of {sorted(ACT_TYPES)} ({ACT_TYPES}), got {act_type!r}")

    device = xs[0].device
    for name, tensors in (("x", xs), ("weight", ws), ("bias", bias), ("scale", scale), ("antiquant_scale", antiquant_scale),
                          ("antiquant_offset", antiquant_offset), ("per_token_scale", per_token_scale)):
        for i, t in enumerate(tensors if isinstance(tensors, (list, tuple)) else []):
            if isinstance(t, Tensor) and t.device != device:
                _fail("device.same", f"{name}[{i}] is on {t.device} but x[0] is on {device}")

    scenario = _scenario(xs, ws, api, group_type, single_output, group_list)
    x_single, w_single = scenario
    mode, out_dtype, weight_bits = _resolve_dtypes(
        xs, ws, api, group_type, bias, scale, antiquant_scale, antiquant_offset, per_token_scale, output_dtype, x_single, w_single
    )
    if mode is Mode.QUANT_A8W4 and group_list_type != 1:
        # vllm-ascend turns cumulative group lists into counts before every A8W4 call, and upstream's A8W4
        # golden uses counts: the form known to run on the kernel.
        _fail("a8w4.group_list_type", f"A8W4 needs group_list_type 1 (counts per expert), got {group_list_type}")
    if act_type != 0 and mode is not Mode.QUANT_PER_TOKEN:
        _fail("act_type.per_token_only", f"act_type {act_type} ({ACT_TYPES[act_type]}) is only supported with per-token full quant (per_token_scale given); this call is {mode.value}")
    if group_type == 2 and bias is not None:
        _fail("bias.k_split", "bias must be None with group_type 2 (K-axis grouping)")
    if group_list_type == 2 and not (xs[0].dtype == torch.int8 and ws[0].dtype == torch.int8 and group_type == 0):
        _fail("group_list_type.pairs_int8_only", f"group_list_type 2 needs int8 x and int8 weight with group_type 0; got x {_dtype_name(xs[0])}, weight {_dtype_name(ws[0])}, group_type {group_type}")
    if tuning_config is not None:
        _check_tuning_config(tuning_config, mode, x_single, w_single)

    k, n = _check_shapes(xs, ws, api, group_type, x_single, w_single, single_output, weight_bits)
    _check_param_shapes(ws, w_single, n, k, bias, scale, antiquant_scale, antiquant_offset, weight_bits, mode is Mode.QUANT_A8W4)

    return _Verdict(api, mode, out_dtype, weight_bits, x_single, w_single, single_output, tuple(k), tuple(n))


@dataclass(frozen=True)
class _Verdict:
    """What `_check_signature` concluded about an accepted signature."""

    api: str
    mode: Mode
    out_dtype: torch.dtype
    weight_bits: int
    x_single: bool
    w_single: bool
    single_output: bool
    k: tuple[int, ...]
    n: tuple[int, ...]


VERDICT_CACHE_SIZE = 4096
_verdicts: dict[tuple, _Verdict] = {}


def _tensor_meta(t: Tensor) -> tuple:
    return (t.dtype, t.shape, t.stride(), t.device)


def _signature(args: tuple) -> Optional[tuple]:
    """A hashable key of everything the signature checks read, or None when an argument is of a kind
    the key does not describe (such calls are checked in full every time)."""
    parts: list = []
    for v in args:
        if v is None or isinstance(v, (bool, int, str, torch.dtype)):
            parts.append((type(v), v))
        elif isinstance(v, Tensor):
            parts.append(("tensor", _tensor_meta(v)))
        elif isinstance(v, (list, tuple)):
            if all(isinstance(t, Tensor) for t in v):
                parts.append((type(v), tuple(_tensor_meta(t) for t in v)))
            elif all(type(t) is int for t in v):
                parts.append((type(v), "ints", tuple(v)))
            else:
                return None
        else:
            return None
    return tuple(parts)


def _scenario(xs: list[Tensor], ws: list[Tensor], api: str, group_type: Optional[int], single_output: bool, group_list: Any) -> tuple[bool, bool]:
    """Return (x is a single tensor, weight is a single tensor) and check the scenario exists."""
    w_single = len(ws) == 1 and (ws[0].dim() == 3 or group_type == 2)
    x_single = len(xs) == 1 and (len(ws) > 1 or w_single)
    if not x_single and len(xs) != len(ws):
        _fail("scenario.list_lengths", f"x has {len(xs)} tensors and weight {len(ws)}: pass one x per weight, or a single x with a group_list")
    names = {(False, False, False): "multi/multi/multi", (True, False, True): "single/multi/single",
             (True, False, False): "single/multi/multi", (False, False, True): "multi/multi/single",
             (True, True, True): "single/single/single"}
    name = names.get((x_single, w_single, single_output))
    if api == "list":
        allowed = {"multi/multi/multi", "single/multi/single", "single/multi/multi", "multi/multi/single"}
    elif group_type == -1:
        allowed = {"multi/multi/multi"}
    elif group_type == 0:
        allowed = {"single/single/single", "single/multi/single", "multi/multi/single"}
    else:
        allowed = {"single/single/single"}
    if name not in allowed:
        shape = f"{'single' if x_single else 'multi'} x / {'single' if w_single else 'multi'} weight / {'single' if single_output else 'multi'} y (split_item {'2/3' if single_output else '0/1'})"
        where = "the List[int] API" if api == "list" else f"group_type {group_type}"
        _fail("scenario.unsupported", f"{shape} is not a scenario of {where}; allowed: {sorted(allowed)}")
    if api == "tensor" and group_type == -1 and group_list is not None:
        _fail("group_list.must_be_none", "group_list must be None with group_type -1 (no grouping)")
    if name in ("single/multi/single", "single/multi/multi", "single/single/single") and group_list is None:
        _fail("group_list.required", f"scenario {name} needs a group_list to split x")
    return x_single, w_single


def _resolve_dtypes(
    xs: list[Tensor], ws: list[Tensor], api: str, group_type: Optional[int], bias: Any, scale: Any,
    antiquant_scale: Any, antiquant_offset: Any, per_token_scale: Any, output_dtype: Optional[torch.dtype],
    x_single: bool, w_single: bool,
) -> tuple[Mode, torch.dtype, int]:
    """Find the dtype row of the spec's tables this call matches; return (mode, y dtype, weight bits)."""
    xd = xs[0].dtype
    wd = ws[0].dtype
    bias_l = _tensor_list("bias", bias, required=False)
    scale_l = _tensor_list("scale", scale, required=False)
    aqs_l = _tensor_list("antiquant_scale", antiquant_scale, required=False)
    aqo_l = _tensor_list("antiquant_offset", antiquant_offset, required=False)
    pts_l = _tensor_list("per_token_scale", per_token_scale, required=False)

    def same_dtype(name: str, ts: Optional[list[Tensor]]) -> Optional[torch.dtype]:
        if ts is None:
            return None
        for i, t in enumerate(ts):
            if t.dtype != ts[0].dtype:
                _fail(f"{name}.same_dtype", f"all {name} tensors must share a dtype: {name}[0] is {_dtype_name(ts[0])}, {name}[{i}] is {_dtype_name(t)}")
        return ts[0].dtype

    same_dtype("x", xs)
    same_dtype("weight", ws)
    bd, sd, aqsd, aqod, ptsd = (same_dtype(n, t) for n, t in (("bias", bias_l), ("scale", scale_l), ("antiquant_scale", aqs_l), ("antiquant_offset", aqo_l), ("per_token_scale", pts_l)))

    def none_for(mode_name: str, **params: Optional[torch.dtype]) -> None:
        for pname, pd in params.items():
            if pd is not None:
                _fail(f"{pname}.must_be_none", f"{pname} must be None for {mode_name} (x {_dtype_name(xd)}, weight {_dtype_name(wd)})")

    def out_ok(mode_name: str, allowed: tuple[Optional[torch.dtype], ...], y: torch.dtype) -> torch.dtype:
        if output_dtype not in allowed:
            _fail("output_dtype.table", f"output_dtype must be one of {[_dtype_name(a) for a in allowed]} for {mode_name}, got {_dtype_name(output_dtype)}")
        return y

    if xd in FLOAT_DTYPES and wd == xd:
        mode_name = f"the float {_dtype_name(xd)} row"
        none_for(mode_name, scale=sd, antiquant_scale=aqsd, antiquant_offset=aqod, per_token_scale=ptsd)
        if bd is not None and bd != FLOAT_BIAS_DTYPE[xd]:
            _fail("bias.dtype", f"bias must be {_dtype_name(FLOAT_BIAS_DTYPE[xd])} for {_dtype_name(xd)} x, got {_dtype_name(bd)}")
        if api == "tensor" and xd == torch.float32 and not (x_single and w_single):
            _fail("dtype.float32_single_only", "float32 with a Tensor group_list is only supported when x, weight and y are single tensors")
        return Mode.FLOAT, out_ok(mode_name, (None, xd), xd), xd.itemsize * 8

    if xd == torch.int8 and wd == torch.int8:
        none_for("int8 full quant", antiquant_scale=aqsd, antiquant_offset=aqod)
        if group_type == 2:
            _fail("group_type.k_split_float_only", "group_type 2 (K-axis grouping) supports float x/weight only")
        if ptsd is not None and ptsd != torch.float32:
            _fail("per_token_scale.dtype", f"per_token_scale must be float32, got {_dtype_name(ptsd)}")
        if sd is None:
            if api == "list":
                _fail("scale.required", "int8 x int8 with a List[int] group_list needs an int64 scale (per-channel full quant)")
            if ptsd is not None:
                _fail("scale.required", "per-token full quant needs a scale (bfloat16 or float32) beside per_token_scale")
            if output_dtype != torch.int32:
                _fail("scale.required", f"int8 x int8 without scale only produces the raw int32 accumulator: pass output_dtype=torch.int32 (got {_dtype_name(output_dtype)}) or give a scale")
            if bd not in (None, torch.int32):
                _fail("bias.dtype", f"bias must be int32 for int8 x int8 with int32 output, got {_dtype_name(bd)}")
            return Mode.QUANT_INT32, torch.int32, 8
        if sd not in QUANT_OUT_DTYPE:
            _fail("scale.dtype", f"scale must be int64, bfloat16 or float32, got {_dtype_name(sd)}")
        if api == "list" and sd != torch.int64:
            _fail("scale.dtype", f"with a List[int] group_list the scale must be int64 (npu_trans_quant_param encoding), got {_dtype_name(sd)}")
        y = QUANT_OUT_DTYPE[sd]
        if ptsd is not None:
            if sd == torch.int64:
                _fail("scale.dtype", "per-token full quant needs a bfloat16 or float32 scale, not int64")
            mode, mode_name = Mode.QUANT_PER_TOKEN, f"per-token full quant with {_dtype_name(sd)} scale"
        else:
            mode, mode_name = Mode.QUANT_PER_CHANNEL, f"per-channel full quant with {_dtype_name(sd)} scale"
        allowed_out: tuple[Optional[torch.dtype], ...] = (None, torch.int8) if sd == torch.int64 else (y,)
        if bd is not None:
            # int32 bias: formulas 2-1 / 3-1 (before scaling); float bias: 2-2 / 3-2 (after scaling).
            float_bias = {torch.bfloat16: (torch.bfloat16, torch.float32), torch.float16: (torch.float16, torch.float32)}
            legal = (torch.int32,) + float_bias.get(y, ())
            if bd not in legal:
                _fail("bias.dtype", f"bias must be one of {[_dtype_name(d) for d in legal]} for {mode_name}, got {_dtype_name(bd)}")
        return mode, out_ok(mode_name, allowed_out, y), 8

    if xd == torch.int8 and wd == torch.int32:
        return _resolve_a8w4(api, group_type, bd, sd, aqsd, aqod, ptsd, output_dtype, none_for)

    if xd in (torch.float16, torch.bfloat16) and wd in (torch.int8, torch.int32):
        bits = 8 if wd == torch.int8 else 4
        mode_name = f"weight-only int{bits} with {_dtype_name(xd)} x"
        if bits == 4 and api == "list":
            _fail("weight.int4_tensor_api", "int4 (int32-packed) weights need a Tensor group_list (or group_type -1), not a List[int]")
        none_for(mode_name, scale=sd, per_token_scale=ptsd)
        if group_type == 2:
            _fail("group_type.k_split_float_only", "group_type 2 (K-axis grouping) supports float x/weight only")
        if aqsd is None:
            _fail("antiquant_scale.required", f"{mode_name} needs antiquant_scale")
        if aqsd != xd:
            _fail("antiquant_scale.dtype", f"antiquant_scale must have x's dtype {_dtype_name(xd)}, got {_dtype_name(aqsd)}")
        if aqod is not None and aqod != xd:
            _fail("antiquant_offset.dtype", f"antiquant_offset must have x's dtype {_dtype_name(xd)}, got {_dtype_name(aqod)}")
        if bd is not None and bd != FLOAT_BIAS_DTYPE[xd]:
            _fail("bias.dtype", f"bias must be {_dtype_name(FLOAT_BIAS_DTYPE[xd])} for {mode_name}, got {_dtype_name(bd)}")
        return Mode.ANTIQUANT, out_ok(mode_name, (None, xd), xd), bits

    _fail("dtype.table", f"x {_dtype_name(xd)} with weight {_dtype_name(wd)} is not a row of the spec's dtype tables "
          "(float x with the same float weight, int8 x with int8 weight, or float16/bfloat16 x with int8 / int32-packed int4 weight)")
    raise AssertionError("unreachable")


A8W4_OUT_DTYPES = (torch.float16, torch.bfloat16)


def _resolve_a8w4(api: str, group_type: Optional[int], bd: Optional[torch.dtype], sd: Optional[torch.dtype],
                  aqsd: Optional[torch.dtype], aqod: Optional[torch.dtype], ptsd: Optional[torch.dtype],
                  output_dtype: Optional[torch.dtype], none_for: Any) -> tuple[Mode, torch.dtype, int]:
    """int8 x with int32-packed int4 weights: the A8W4 mode that vllm-ascend's W4A8_DYNAMIC MoE runs.

    Rules (docs/KERNELS.md "A8W4"): Tensor API with group_type 0, an int64 scale (float32 bits in the low
    32 bits, as npu_trans_quant_param or a raw bit view writes them), an optional float32 bias, an optional
    float32 per_token_scale, output_dtype float16 or bfloat16.
    """
    mode_name = "A8W4 (int8 x, int4 weight)"
    if api == "list":
        _fail("a8w4.tensor_api", "int8 x with int32-packed int4 weights (A8W4) needs a Tensor group_list and group_type 0, not a List[int]")
    if group_type != 0:
        _fail("a8w4.group_type", f"A8W4 supports group_type 0 (M-axis grouping) only, got {group_type}")
    none_for(mode_name, antiquant_scale=aqsd, antiquant_offset=aqod)
    if sd is None:
        _fail("scale.required", "A8W4 needs an int64 scale (float32 weight scales encoded by trans_quant_param)")
    if sd != torch.int64:
        _fail("scale.dtype", f"A8W4 takes an int64 scale (float32 bits, see trans_quant_param), got {_dtype_name(sd)}")
    if bd is not None and bd != torch.float32:
        _fail("bias.dtype", f"A8W4 takes a float32 bias (it carries 8 * sum_k(w * scale), see a8w4_scale_bias), got {_dtype_name(bd)}")
    if ptsd is not None and ptsd != torch.float32:
        _fail("per_token_scale.dtype", f"per_token_scale must be float32, got {_dtype_name(ptsd)}")
    if output_dtype not in A8W4_OUT_DTYPES:
        _fail("output_dtype.table", f"A8W4 needs output_dtype float16 or bfloat16, got {_dtype_name(output_dtype)}")
    return Mode.QUANT_A8W4, output_dtype, 4


def _check_tuning_config(tuning_config: Any, mode: Mode, x_single: bool, w_single: bool) -> None:
    if not isinstance(tuning_config, (list, tuple)) or not tuning_config or not all(isinstance(v, int) and v >= 0 for v in tuning_config):
        _fail("tuning_config.type", f"tuning_config must be a non-empty list of non-negative ints, got {tuning_config!r}")
    if mode not in (Mode.QUANT_PER_CHANNEL, Mode.QUANT_PER_TOKEN, Mode.QUANT_INT32) or not (x_single and w_single):
        _fail("tuning_config.scenario", "tuning_config is only used for int8 full quant with single x and single weight tensors")


def _check_shapes(
    xs: list[Tensor], ws: list[Tensor], api: str, group_type: Optional[int], x_single: bool, w_single: bool,
    single_output: bool, weight_bits: int,
) -> tuple[list[int], list[int]]:
    """Check ranks, K agreement, N agreement and layout; return (K, N) per weight tensor."""
    multi_nd = not x_single and not single_output  # multi/multi/multi may take 2-6-D x
    for i, t in enumerate(xs):
        if multi_nd:
            if not 2 <= t.dim() <= 6:
                _fail("x.rank", f"x[{i}] must have 2 to 6 dims in the multi/multi/multi scenario, got {t.dim()}")
            if t.dim() != xs[0].dim():
                _fail("x.rank", f"all x tensors must have the same rank: x[0] has {xs[0].dim()}, x[{i}] has {t.dim()}")
        elif t.dim() != 2:
            _fail("x.rank", f"x[{i}] must be 2-D in this scenario, got shape {tuple(t.shape)}")
        if group_type == 2:
            if not _is_transposed(t):
                _fail("x.transposed", "group_type 2 requires x to be transposed (a [M, K] view of a [K, M] tensor, e.g. xt.t())")
        elif _is_transposed(t):
            _fail("x.transposed", f"x[{i}] is a transposed view; the kernel does not support transposed x (call .contiguous())")
    want_wdim = 3 if (w_single and group_type != 2) else 2
    for i, w in enumerate(ws):
        if w.dim() != want_wdim:
            _fail("weight.rank", f"weight[{i}] must be {want_wdim}-D in this scenario, got shape {tuple(w.shape)}")
    transposed = [_is_transposed(w) for w in ws]
    if any(transposed) and not all(transposed):
        _fail("weight.transposed_uniform", f"either every weight tensor is transposed or none is; got {transposed}")
    if any(transposed) and (weight_bits == 4 or group_type == 2):
        what = "int32-packed int4 weights (packed along N)" if weight_bits == 4 else "group_type 2"
        _fail("weight.transposed", f"transposed weights are not supported for {what}")

    k = [w.shape[-2] for w in ws]
    n = [w.shape[-1] * (8 if weight_bits == 4 else 1) for w in ws]
    for i, t in enumerate(xs):
        wi = 0 if x_single else i
        kx = t.shape[-1]
        if group_type == 2:
            if kx != k[0]:
                _fail("shape.k", f"x is [M, K] = {tuple(t.shape)} but weight is [K, N] = {tuple(ws[0].shape)}: K differs")
            continue
        targets = range(len(ws)) if x_single else (wi,)
        for j in targets:
            if kx != k[j]:
                _fail("shape.k", f"x[{i}] has K={kx} but weight[{j}] has K={k[j]} (weight is [..., K, N])")
    if single_output and len(set(n)) > 1:
        _fail("shape.n_equal", f"a single output tensor needs every weight to have the same N; got N={n}")
    for i, t in enumerate(xs):
        inner = t.shape[-2] if _is_transposed(t) else t.shape[-1]
        if inner >= INNER_AXIS_LIMIT:
            _fail("shape.inner_limit", f"x[{i}] inner axis is {inner}; the kernel requires < {INNER_AXIS_LIMIT}")
    for i in range(len(ws)):
        inner = k[i] if transposed[i] else n[i]
        if inner >= INNER_AXIS_LIMIT:
            _fail("shape.inner_limit", f"weight[{i}] inner axis is {inner}; the kernel requires < {INNER_AXIS_LIMIT}")
    return k, n


def _check_param_shapes(
    ws: list[Tensor], w_single: bool, n: list[int], k: list[int], bias: Any, scale: Any,
    antiquant_scale: Any, antiquant_offset: Any, weight_bits: int, a8w4: bool = False,
) -> None:
    """Per-weight parameter lists: one tensor per weight, shaped [N] (or [E, N] for a 3-D weight).

    An A8W4 scale may also be per group: [E, G, N] ([G, N] per 2-D weight) with G dividing K; G = 1 is
    the per-channel form vllm-ascend passes for its down projection.
    """
    experts = ws[0].shape[0] if w_single else None
    for name, values in (("bias", bias), ("scale", scale)):
        if values is None:
            continue
        if len(values) != len(ws):
            _fail(f"{name}.len", f"{name} has {len(values)} tensors; it needs one per weight tensor ({len(ws)})")
        for i, t in enumerate(values):
            want = (experts, n[i]) if w_single else (n[i],)
            if a8w4 and name == "scale" and t.dim() == len(want) + 1 and tuple(t.shape[:-2]) == want[:-1] and t.shape[-1] == n[i]:
                groups = t.shape[-2]
                if groups == 0 or k[i] % groups:
                    _fail("scale.a8w4_group_divides_k", f"scale[{i}] has {groups} quant groups, which does not divide K={k[i]}")
                continue
            if tuple(t.shape) != want:
                if a8w4 and name == "scale":
                    lead = list(want[:-1])
                    _fail("scale.shape", f"A8W4 scale[{i}] must be {lead + [n[i]]} (per channel) or {lead + ['G', n[i]]} (per group, G divides K={k[i]}), got {list(t.shape)}")
                _fail(f"{name}.shape", f"{name}[{i}] must have shape {list(want)} (one value per output channel), got {list(t.shape)}")
    if antiquant_scale is None:  # _resolve_dtypes already refused an offset without a scale
        return
    if len(antiquant_scale) != len(ws):
        _fail("antiquant_scale.len", f"antiquant_scale has {len(antiquant_scale)} tensors; it needs one per weight tensor ({len(ws)})")
    if antiquant_offset is not None and len(antiquant_offset) != len(ws):
        _fail("antiquant_offset.len", f"antiquant_offset has {len(antiquant_offset)} tensors; it needs one per weight tensor ({len(ws)})")
    group_lengths = set()
    for i, s in enumerate(antiquant_scale):
        lead = (experts,) if w_single else ()
        per_channel = lead + (n[i],)
        if tuple(s.shape) == per_channel:
            pass
        elif s.dim() == len(per_channel) + 1 and tuple(s.shape[:-2]) == lead and s.shape[-1] == n[i]:
            groups = s.shape[-2]
            if weight_bits == 8:
                _fail("antiquant_scale.int8_per_group", "int8 weight-only supports per-channel antiquant_scale only (per-group needs int4 weights)")
            if groups == 0 or k[i] % groups:
                _fail("antiquant_scale.group_divides_k", f"antiquant_scale[{i}] has {groups} groups, which does not divide K={k[i]}")
            group_lengths.add(k[i] // groups)
        else:
            per_group = lead + ("G", n[i])
            _fail("antiquant_scale.shape", f"antiquant_scale[{i}] must be {list(per_channel)} (per-channel) or {list(per_group)} (per-group), got {list(s.shape)}")
        if antiquant_offset is not None and antiquant_offset[i].shape != s.shape:
            _fail("antiquant_offset.shape", f"antiquant_offset[{i}] must have antiquant_scale's shape {list(s.shape)}, got {list(antiquant_offset[i].shape)}")
    if len(group_lengths) > 1:
        _fail("antiquant_scale.group_length_equal", f"per-group lengths K_i/G_i must be equal across weights, got {sorted(group_lengths)}")
    kinds = {s.dim() for s in antiquant_scale}
    if len(kinds) > 1:
        _fail("antiquant_scale.mixed", "mixing per-channel and per-group antiquant_scale across weights is not supported")


def _group_values(group_list: Any, group_list_type: int) -> list[Any]:
    if isinstance(group_list, Tensor):
        if group_list.dtype != torch.int64:
            _fail("group_list.dtype", f"group_list must be int64, got {_dtype_name(group_list)}")
        want_dim = 2 if group_list_type == 2 else 1
        if group_list.dim() != want_dim or (want_dim == 2 and group_list.shape[1] != 2):
            form = "[G, 2] ([[group index, group size], ...])" if want_dim == 2 else "1-D"
            _fail("group_list.shape", f"group_list must be {form} for group_list_type {group_list_type}, got shape {list(group_list.shape)}")
        return group_list.tolist()
    return list(group_list)


def _plan_groups(
    xs: list[Tensor], ws: list[Tensor], api: str, group_list: Any, group_type: Optional[int], group_list_type: int,
    x_single: bool, w_single: bool, single_output: bool, n: list[int], read_group_list: bool,
) -> tuple[list[Group], list[tuple[int, ...]], Optional[list[int]]]:
    """Turn group_list into (matmuls, multi-output shapes, rows per listed group), checking its values."""
    num_weights = ws[0].shape[0] if (w_single and group_type != 2) else len(ws)
    if group_list is None:
        # One group per (x, weight) pair: multi/multi/multi or multi/multi/single.
        groups, shapes = [], []
        for i, t in enumerate(xs):
            rows = math.prod(t.shape[:-1])
            groups.append(Group(i, 0, rows, i, None))
            shapes.append(tuple(t.shape[:-1]) + (n[i],))
        return groups, shapes, None
    if isinstance(group_list, Tensor) and group_list.device.type != "cpu" and not read_group_list:
        return [], [], None

    values = _group_values(group_list, group_list_type)
    if group_list_type == 2:
        # The kernel walks the [index, size] rows in order and stops at the first size <= 0: routing ops
        # end their tables with a (0, 0) row.
        pairs = []
        for idx, size in values:
            if size <= 0:
                break
            pairs.append((idx, size))
        bad = [idx for idx, _ in pairs if not 0 <= idx < num_weights]
        if bad:
            _fail("group_list.group_index", f"group indices {bad} are outside [0, {num_weights})")
        experts = [idx for idx, _ in pairs]
        sizes = [size for _, size in pairs]
    else:
        if any(v < 0 for v in values):
            _fail("group_list.non_negative", f"group_list values must be non-negative, got {values}")
        if api == "list" or group_list_type == 0:
            if any(b < a for a, b in zip(values, values[1:])):
                _fail("group_list.monotonic", f"group_list (cumulative ends) must be non-decreasing, got {values}")
            sizes = [b - a for a, b in zip([0] + values[:-1], values)]
        else:
            sizes = values
        experts = list(range(len(sizes)))
        if (api == "list" or group_list_type == 1) and len(values) == 1:
            _fail("group_list.length_one", "the spec does not allow a group_list of length 1 in this form; use group_list_type 0 (cumsum)")
        if group_type != 2 and len(sizes) != num_weights:
            _fail("group_list.length", f"group_list has {len(sizes)} entries but there are {num_weights} weight groups")
    if len(sizes) > MAX_GROUPS:
        _fail("group_list.max_groups", f"group_list has {len(sizes)} groups; at most {MAX_GROUPS} are allowed")

    if not x_single:
        # group_list restates each x tensor's row count.
        rows = [t.shape[0] for t in xs]
        if sizes != rows:
            _fail("group_list.matches_x", f"group_list sizes {sizes} must equal the rows of each x tensor {rows}")
        groups = [Group(i, 0, rows[i], i, None) for i in range(len(xs))]
        return groups, [(rows[i], n[i]) for i in range(len(xs))], sizes

    total_axis = xs[0].shape[1] if group_type == 2 else xs[0].shape[0]
    axis = "K (x's second dim)" if group_type == 2 else "M (x's first dim)"
    if sum(sizes) != total_axis:
        form = {0: "the last cumulative value", 1: "the sum of the counts", 2: "the sum of the second column"}[0 if api == "list" else group_list_type]
        _fail("group_list.total", f"{form} of group_list is {sum(sizes)} but {axis} is {total_axis}")
    ends = list(itertools.accumulate(sizes))
    starts = [0] + ends[:-1]
    if group_type == 2:
        groups = [Group(0, a, b, 0, None) for a, b in zip(starts, ends)]
    elif single_output:
        # Empty groups add no rows to a single output: a decode step over 128 experts plans only the few hit.
        groups = [Group(0, a, b, 0 if w_single else e, e if w_single else None)
                  for a, b, e in zip(starts, ends, experts) if b > a]
    else:
        groups = [Group(0, a, b, e, None) for a, b, e in zip(starts, ends, experts)]
    if single_output:
        return groups, [], sizes
    shapes = [(size, n[0 if w_single else e]) for e, size in zip(experts, sizes)]
    return groups, shapes, sizes


def _check_per_token_scale(per_token_scale: list[Tensor], xs: list[Tensor]) -> None:
    if len(per_token_scale) != len(xs):
        _fail("per_token_scale.len", f"per_token_scale has {len(per_token_scale)} tensors; it needs one per x tensor ({len(xs)})")
    for i, (p, t) in enumerate(zip(per_token_scale, xs)):
        rows = math.prod(t.shape[:-1])
        if p.dim() != 1 or p.shape[0] != rows:
            _fail("per_token_scale.shape", f"per_token_scale[{i}] must be [M] = [{rows}] (one float32 per row of x[{i}]), got {list(p.shape)}")
