"""Model families gmmquant refuses, with the reason, and the model class of a config (pack/model_class.py)."""

from __future__ import annotations

from typing import Any

from ..pack.model_class import AUTO_ORDER, auto_model_class, is_seq2seq


class UnsupportedFamilyError(ValueError):
    """A model type whose experts gmmquant cannot run on grouped matmuls (see UNSUPPORTED)."""


# Model types with MoE in their name or config that gmmquant refuses, and why (the census tests each one).
UNSUPPORTED: dict[str, str] = {
    "doge": "experts are rows of two embedding tables picked by product-key retrieval, not per-expert matmuls",
    "vitpose_backbone": "experts are chosen by a dataset index given with the input, not routed per token",
}


def check_supported(model: Any) -> None:
    """Raise UnsupportedFamilyError for a model type of UNSUPPORTED, with the reason."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in UNSUPPORTED:
        raise UnsupportedFamilyError(f"model type {model_type!r} is not supported by gmmquant: {UNSUPPORTED[model_type]}")


__all__ = ["AUTO_ORDER", "UNSUPPORTED", "UnsupportedFamilyError", "auto_model_class", "check_supported", "is_seq2seq"]
