"""Which source format a model directory is in, from its config's `quantization_config.quant_method`."""

from __future__ import annotations

from typing import Any, Callable

from . import compressed_tensors, fp8_block, mxfp4
from .base import FLOAT, SourceError, SourceFormat

MAKERS: dict[str, Callable[[dict[str, Any]], SourceFormat]] = {
    "fp8": fp8_block.make,
    "mxfp4": mxfp4.make,
    "compressed-tensors": compressed_tensors.make,
}


def source_format(config: dict[str, Any]) -> SourceFormat:
    """The SourceFormat of a model's config.json dict: FLOAT without a quantization_config.

    Raises:
        SourceError: an unknown quant_method (named, with the ones gmmquant reads), a gmmquant checkpoint
            (already quantized), or a config the format's own rules refuse (block size, fmt, format).
    """
    qc = config.get("quantization_config")
    if qc is None:
        return FLOAT
    if not isinstance(qc, dict):
        raise SourceError(f"quantization_config is a {type(qc).__name__}, expected an object with a quant_method")
    method = qc.get("quant_method")
    if method == "gmmquant":
        raise SourceError("the source is already a gmmquant checkpoint (quant_method gmmquant); quantize its float model "
                          "instead, or load it with gmmquant.load_model")
    if method not in MAKERS:
        raise SourceError(f"unknown quantization_config.quant_method {method!r}: gmmquant reads float checkpoints and "
                          f"{', '.join(sorted(MAKERS))} sources (docs/SOURCES.md); dequantize it to bf16 first")
    return MAKERS[method](qc)


__all__ = ["MAKERS", "source_format"]
