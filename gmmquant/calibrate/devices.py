"""Compute devices of streamed calibration (`--device`, `--devices`), checked before any weight is read.

`cpu`, `cuda[:N]` and `npu[:N]` are accepted. An NPU needs torch_npu, which registers the `npu` device type
with torch when imported; it is imported here, lazily (importing gmmquant never imports it), and asked
whether the device exists, so a typo or a missing toolkit fails in the first second, not after the capture pass.
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device string that names no usable device here; the message says which rule it breaks."""


def _index(device: str) -> int:
    _, _, index = device.partition(":")
    if index and not index.isdigit():
        raise DeviceError(f"device {device!r}: the index after ':' must be a number (rule: cpu, cuda:N or npu:N)")
    return int(index or 0)


def check_device(device: str) -> str:
    """`device` normalised (`cuda` -> `cuda:0`), or DeviceError naming why it cannot be used."""
    kind = device.partition(":")[0]
    if kind == "cpu":
        return "cpu"
    index = _index(device)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    elif kind == "npu":
        try:
            import torch_npu  # noqa: PLC0415, F401 - importable only on Ascend machines; registers torch.npu
        except ImportError:
            raise DeviceError(f"device {device!r} needs torch_npu (the Ascend PyTorch adapter), which is not installed here") from None
        npu = getattr(torch_npu, "npu", None) or getattr(torch, "npu", None)
        count = npu.device_count() if npu is not None and npu.is_available() else 0
    else:
        raise DeviceError(f"device {device!r}: unknown device type {kind!r} (rule: cpu, cuda:N or npu:N)")
    if index >= count:
        raise DeviceError(f"device {device!r}: this machine has {count} {kind} device(s)")
    return f"{kind}:{index}"


def check_devices(devices: list[str]) -> list[str]:
    """Every device checked (check_device); at least one."""
    if not devices:
        raise DeviceError("--devices is empty (rule: at least one of cpu, cuda:N, npu:N)")
    return [check_device(d) for d in devices]


__all__ = ["DeviceError", "check_device", "check_devices"]
