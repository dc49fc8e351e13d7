"""The capture pass of calibration: every decoder layer's call arguments, for every batch.

Each decoder layer is swapped for a `_Recorder` that records `(hidden_states, args, kwargs)`. Most models'
layer loops take a tensor back from each layer, so the recorder returns its input and no layer runs (the
pass costs one embedding lookup per batch). Some loops take more from a layer: a tuple whose other items feed
the next layer (glm_moe_dsa's top-k indices, hy_v4, zaya). The first call of the first layer runs the real
layer to see which kind the model is; for the second kind the pass starts again with every recorder running
its layer (offloaded weights load through accelerate's hooks as in any forward), so the model's loop gets
what it expects and later layers' arguments are the ones the float model passes them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class _NeedsLayerOutputs(Exception):
    """Raised by the probe: the model's layer loop consumes more than a hidden-states tensor."""


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

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.state["run_layers"]:
            return self.layer(hidden_states, *args, **kwargs)
        if self.state.pop("probe", False):
            if not isinstance(self.layer(hidden_states, *args, **kwargs), Tensor):
                raise _NeedsLayerOutputs
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
    for run_layers in (False, True):
        calls: list[list] = [[] for _ in originals]
        state = {"run_layers": run_layers, "probe": True}
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, calls[i], state)
        try:
            with torch.no_grad():
                for batch in batches:
                    model(input_ids=batch.to(device), use_cache=False, **forward_kwargs)
            return calls
        except _NeedsLayerOutputs:
            logger.info("decoder layers return more than hidden states: capturing with the layers running")
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
    raise AssertionError("unreachable: the second pass runs the layers")


__all__ = ["capture_layer_calls"]
