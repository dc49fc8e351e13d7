"""Quantization schemes as data: what a quantized experts module stores and how the kernel runs it.

A scheme is refused here, before any tensor is written, if npu_grouped_matmul could not run it: int8
weight-only per-group, W8A8 with a weight zero point or groups, a group size that does not divide K, int4
with N not a multiple of 8 (the int32 packing needs whole words; the kernel itself needs N even).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

GROUP_SIZES = (32, 64, 128, 256)
ACTIVATION_MODES = ("none", "dynamic", "static")


class SchemeError(ValueError):
    """A scheme the kernel cannot run, or a scheme description that does not parse."""


@dataclass(frozen=True)
class QuantScheme:
    """How one experts module is quantized.

    Attributes:
        name: preset name or a free label.
        weight_bits: 8 (int8) or 4 (int4 packed 8 to an int32).
        group_size: None for per-channel (one scale per output channel), else K-group length (32-256).
        symmetric: True: no zero point. False: `antiquant_offset = -zero_point` is stored.
        activation: "none" (weight-only, A16), "dynamic" (per-token int8 activations, W8A8 dynamic),
            "static" (per-tensor int8 activations with a calibrated scale, W8A8 static).
    """

    name: str
    weight_bits: int
    group_size: Optional[int] = None
    symmetric: bool = True
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise SchemeError(f"scheme {self.name!r}: weight_bits must be 4 or 8, got {self.weight_bits!r}")
        if self.activation not in ACTIVATION_MODES:
            raise SchemeError(f"scheme {self.name!r}: activation must be one of {ACTIVATION_MODES}, got {self.activation!r}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise SchemeError(f"scheme {self.name!r}: group_size must be None (per-channel) or one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.activation != "none":
            if self.weight_bits == 4 and self.activation != "dynamic":
                raise SchemeError(f"scheme {self.name!r}: int4 weights with int8 activations (A8W4) take per-token "
                                  "dynamic activations only (the kernel's A8W4 mode needs per_token_scale)")
            if self.weight_bits == 8 and self.group_size is not None:
                raise SchemeError(f"scheme {self.name!r}: W8A8 is per-channel only (full-quant scale is [E, N])")
            if not self.symmetric:
                raise SchemeError(f"scheme {self.name!r}: W8A8 / W4A8 weights must be symmetric (the kernel has no "
                                  "weight offset in full-quant modes)")
        elif self.weight_bits == 8 and self.group_size is not None:
            raise SchemeError(f"scheme {self.name!r}: int8 weight-only supports per-channel only; per-group needs int4")

    @property
    def weight_only(self) -> bool:
        return self.activation == "none"

    @property
    def a8w4(self) -> bool:
        """int8 per-token activations with int4 weights: the GMM's A8W4 mode (W4A8_DYNAMIC on Ascend)."""
        return self.activation == "dynamic" and self.weight_bits == 4

    def check_shape(self, k: int, n: int, what: str = "weight") -> None:
        """Refuse a `[.., K, N]` weight this scheme cannot pack into a kernel-legal checkpoint."""
        if self.group_size is not None and k % self.group_size:
            raise SchemeError(f"{what}: group_size {self.group_size} does not divide K={k} (scheme {self.name!r})")
        if self.weight_bits == 4 and n % 8:
            raise SchemeError(f"{what}: int4 packs 8 values per int32 along N, so N={n} must be a multiple of 8 (scheme {self.name!r})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantScheme":
        if not isinstance(data, dict):
            raise SchemeError(f"a scheme must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise SchemeError(f"unknown scheme keys {unknown}; known: {sorted(fields)}")
        missing = sorted({"name", "weight_bits"} - set(data))
        if missing:
            raise SchemeError(f"scheme is missing {missing}")
        return cls(**data)


def _presets() -> dict[str, QuantScheme]:
    presets = {
        "w8a16": QuantScheme("w8a16", 8, None, symmetric=True),
        "w4a16": QuantScheme("w4a16", 4, None, symmetric=False),
        "w8a8-dynamic": QuantScheme("w8a8-dynamic", 8, None, symmetric=True, activation="dynamic"),
        "w8a8-static": QuantScheme("w8a8-static", 8, None, symmetric=True, activation="static"),
    }
    for g in GROUP_SIZES:
        presets[f"w4a16-g{g}"] = QuantScheme(f"w4a16-g{g}", 4, g, symmetric=False)
    # int4 weights (symmetric), int8 per-token activations: per channel, or per group (msModelSlim's two-level form)
    presets["w4a8-dynamic"] = QuantScheme("w4a8-dynamic", 4, None, symmetric=True, activation="dynamic")
    for g in GROUP_SIZES:
        presets[f"w4a8-dynamic-g{g}"] = QuantScheme(f"w4a8-dynamic-g{g}", 4, g, symmetric=True, activation="dynamic")
    return presets


PRESETS: dict[str, QuantScheme] = _presets()


def get_scheme(name_or_scheme: "str | QuantScheme", **overrides: Any) -> QuantScheme:
    """A preset by name (optionally with field overrides, e.g. symmetric=True), or a scheme as given."""
    if isinstance(name_or_scheme, QuantScheme):
        scheme = name_or_scheme
    else:
        if name_or_scheme not in PRESETS:
            raise SchemeError(f"unknown scheme {name_or_scheme!r}; presets: {sorted(PRESETS)}")
        scheme = PRESETS[name_or_scheme]
    return dataclasses.replace(scheme, **overrides) if overrides else scheme
