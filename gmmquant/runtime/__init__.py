"""Runtime: run HF MoE models' experts through grouped-matmul kernels."""

from .experts import GMMExperts, GMMProjection
from .replace import NoExpertsError, ReplaceReport, replace_experts

__all__ = ["GMMExperts", "GMMProjection", "NoExpertsError", "ReplaceReport", "replace_experts"]
from .load import load_model, save_model  # noqa: E402

__all__ += ["load_model", "save_model"]
from . import hf_integration  # noqa: E402,F401  (registers quant_method "gmmquant" and experts "gmm")
