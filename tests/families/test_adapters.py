"""The GMM adapters of runtime/adapters.py against the modules they replace, on few tokens (so some experts
get no rows: empty groups), in float32 against the original module run in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import census
from gmmquant.pack.layouts import find_experts_modules
from gmmquant.runtime.adapters import (GMMDenseExperts, GMMDictExperts, GMMIdentityExperts, GMMSortedProjection,
                                       gmm_experts, routed_rows)
from gmmquant.runtime.experts import GMMExperts, float_projections

CASES = {"llama4": GMMDenseExperts, "longcat_flash": GMMIdentityExperts, "jetmoe": GMMSortedProjection,
         "switch_transformers": GMMDictExperts, "nllb-moe": GMMDictExperts, "dbrx": GMMExperts}


def _first_call(model, path, inputs):
    seen = {}
    hook = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    try:
        census._output(model, inputs)
    finally:
        hook.remove()
    return seen["call"]


def _to64(obj):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.double()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to64(o) for o in obj)
    return obj


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_adapter_matches_the_module_it_replaces(model_type, one_thread):
    config, _, model = census.build(model_type)
    inputs = census._inputs(config)
    inputs = {k: v[:1, :3] for k, v in inputs.items()}  # 3 tokens: most experts get no rows
    path, info = next(iter(find_experts_modules(model).items()))
    source = model.get_submodule(path)
    args, kwargs = _first_call(model, path, inputs)
    gmm = gmm_experts(source, info, float_projections(source, info, None), canonical_order=False)
    assert type(gmm) is CASES[model_type]
    _, ids = routed_rows(info, args, kwargs)
    counts = torch.bincount(ids[(ids >= 0) & (ids < info.num_experts)].reshape(-1), minlength=info.num_experts)
    assert (counts == 0).any() and counts.sum() > 0, counts  # empty groups and routed rows
    with torch.no_grad():
        out = gmm(*args, **kwargs).double()
        ref = copy.deepcopy(source).double()(*_to64(args), **_to64(kwargs))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()
    assert out.abs().sum() > 0
