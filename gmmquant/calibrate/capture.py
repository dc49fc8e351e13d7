"""The capture pass of calibration: every decoder layer's call arguments, for every batch.

Each decoder layer is swapped for a `_Recorder` that records `(hidden_states, args, kwargs)`. Most models'
layer loops take a tensor back from each layer, so the recorder returns its input and no layer runs (the
pass costs one embedding lookup per batch). Some loops take more from a layer: a tuple whose other items feed
the next layer (glm_moe_dsa's top-k indices, hy_v4, zaya). Their layers say so in their `forward`'s return
annotation; for them (and for any model whose loop fails on the cheap pass) every recorder runs its layer
(offloaded weights load through accelerate's hooks as in any forward), so the model's loop gets what it
expects and later layers' arguments are the ones the float model passes them.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def returns_more_than_hidden(layer: nn.Module) -> bool:
    """Whether a decoder layer's forward is annotated to return a tuple."""
    annotation = inspect.signature(type(layer).forward).return_annotation
    return "tuple" in str(annotation).lower()


class _Recorder(nn.Module):
    """Stands in for a decoder layer during the capture pass: records its call (see the module docstring)."""

    def __init__(self, layer: nn.Module, calls: list, state: dict):
        super().__init__()
        self.calls = calls
        self.state = state
        self.__dict__["layer"] = layer  # not a submodule: the recorder must not own the layer's parameters
        # Models' layer loops read plain attributes of their layers (attention_type, block_type, ...).
        for name, value in vars(layer).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)

    def __getattr__(self, name: str):
        # Anything else the loop reads from its layers (a property, a class attribute: inkling2's attention_type).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.state["run_layers"]:
            return self.layer(hidden_states, *args, **kwargs)
        return hidden_states


def capture_layer_calls(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor], device: str,
                        **forward_kwargs: Any) -> list[list[tuple[Tensor, tuple, dict]]]:
    """Per layer, per batch: the `(hidden_states, args, kwargs)` the model's forward passes the layer.

    Args:
        model: the (offloaded) model; called as `model(input_ids=batch, use_cache=False, **forward_kwargs)`.
        layers: its decoder-layer ModuleList (entries are swapped for recorders and put back).
        batches: int64 `[B, S]` token ids each.
    """
    originals = list(layers)
    modes = (True,) if any(returns_more_than_hidden(layer) for layer in originals) else (False, True)
    for run_layers in modes:
        calls: list[list] = [[] for _ in originals]
        state = {"run_layers": run_layers}
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, calls[i], state)
        try:
            with torch.no_grad():
                for batch in batches:
                    model(input_ids=batch.to(device), use_cache=False, **forward_kwargs)
            return calls
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            if run_layers:
                raise
            logger.info("the model's layer loop needs its layers' real outputs (%s): capturing with the layers running", exc)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
    raise AssertionError("unreachable: the last pass runs the layers or raises")


__all__ = ["capture_layer_calls"]
