"""Fixtures of the hostile-input battery: a tiny saved MoE model and checkpoints packed from it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # tiny_models, gmm_oracle

from tiny_models import qwen3_moe_config, save_tiny_model  # noqa: E402

from gmmquant.pack import get_scheme  # noqa: E402
from gmmquant.pack.stream import stream_pack  # noqa: E402


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE model directory (2 layers, 8 experts, hidden 128) with a tokenizer; never modified."""
    return save_tiny_model(tmp_path_factory.mktemp("hostile") / "src", qwen3_moe_config())


def _packed(tmp_path_factory, source: Path, name: str, scheme: str, **kw) -> Path:
    out = tmp_path_factory.mktemp("hostile") / name
    stream_pack(source, out, get_scheme(scheme, **kw))
    return out


@pytest.fixture(scope="session")
def packed_asym(tmp_path_factory, source) -> Path:
    """w4a16-g128 with zero points (antiquant_offset), one shard."""
    return _packed(tmp_path_factory, source, "asym", "w4a16-g128", symmetric=False)


@pytest.fixture(scope="session")
def packed_exportable(tmp_path_factory, source) -> Path:
    """w4a16-g128 symmetric: what both AscendV1 (vllm-ascend's MoE loader) and compressed-tensors take."""
    return _packed(tmp_path_factory, source, "exportable", "w4a16-g128", symmetric=True)


@pytest.fixture(scope="session")
def packed_sym(tmp_path_factory, source) -> Path:
    """w8a16 symmetric (compressed-tensors takes it; vllm-ascend runs no W8A16 MoE)."""
    return _packed(tmp_path_factory, source, "sym", "w8a16", symmetric=True)


@pytest.fixture(scope="session")
def packed_sharded(tmp_path_factory, source) -> Path:
    """w8a16 symmetric in many shards (index + several files)."""
    out = tmp_path_factory.mktemp("hostile") / "sharded"
    stream_pack(source, out, get_scheme("w8a16", symmetric=True), max_shard_size=300_000)
    return out


@pytest.fixture
def copy_of(tmp_path) -> Callable[[Path], Path]:
    """copy_of(checkpoint) -> a private copy to break."""
    def make(path: Path, name: str = "ck") -> Path:
        return Path(shutil.copytree(path, tmp_path / name))
    return make


def pytest_collection_modifyitems(config, items):
    """`hostile_full` tests (slow subprocess kills and races) run only when asked for: `-m hostile_full`."""
    if "hostile_full" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow fault test: run the whole set with -m hostile_full")
    for item in items:
        if "hostile_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _global_dtype_unchanged():
    """Nothing gmmquant does (validation builds models from configs) may leave torch's default dtype changed."""
    import torch

    before = torch.get_default_dtype()
    yield
    after = torch.get_default_dtype()
    torch.set_default_dtype(before)
    assert after == before, f"torch's default dtype changed to {after}"
