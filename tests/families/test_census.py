"""The MoE family census (census.py) as tests: one per model type of the installed transformers.

Default run: every family is built tiny and checked for replace (float, w8a16) and save/load; calibration
runs on the families the issue named plus a deterministic sample (CALIBRATE_SAMPLE; set
GMMQUANT_CENSUS_SAMPLE=<n> to rotate it). `pytest -m families_full tests/families` calibrates every family.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

import census
from discover import candidates
from gmmquant.runtime.families import UNSUPPORTED

TYPES = [c.model_type for c in candidates()]
ALWAYS_CALIBRATE = {"qwen3_vl_moe", "llama4", "glm_moe_dsa", "jetmoe"}  # issue 17's "done when"
SAMPLE_EVERY = 10


def calibrate_sample() -> set[str]:
    """ALWAYS_CALIBRATE plus one family in SAMPLE_EVERY, picked by a hash of its name and the rotation."""
    rotation = int(os.environ.get("GMMQUANT_CENSUS_SAMPLE", "0"))
    return ALWAYS_CALIBRATE | {t for t in TYPES if (zlib.crc32(t.encode()) + rotation) % SAMPLE_EVERY == 0}


CALIBRATE_SAMPLE = calibrate_sample()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _check(model_type: str, tmp_path: Path, calibrate: bool) -> census.Row:
    row = census.check_family(model_type, tmp_path, calibrate=calibrate)
    assert row.status in ("supported", "refused", "cannot build tiny"), (row.status, row.note, row.failures)
    assert row.green, row.failures
    if row.status == "supported":
        assert row.float_error is not None and row.float_error <= census.FLOAT_TOL
        assert row.w8a16_error is not None and row.w8a16_error <= census.W8A16_TOL
        assert row.roundtrip == "identical"
        if calibrate:
            assert row.calibrate.startswith(("ok", "refused: ")), row.calibrate
    elif row.status == "refused":
        assert row.note == UNSUPPORTED[model_type]
    return row


@pytest.mark.parametrize("model_type", TYPES)
def test_family(model_type, tmp_path):
    _check(model_type, tmp_path, calibrate=model_type in CALIBRATE_SAMPLE)


@pytest.mark.families_full
@pytest.mark.parametrize("model_type", sorted(set(TYPES) - CALIBRATE_SAMPLE))
def test_family_calibrates(model_type, tmp_path):
    _check(model_type, tmp_path, calibrate=True)


def test_discovery_is_from_the_library():
    """Every fused experts class transformers decorates belongs to a discovered family, and the families
    the issue names are found."""
    import importlib
    import pkgutil

    import transformers.models as models

    assert len(TYPES) == len(set(TYPES)) and len(TYPES) > 60
    assert {"qwen3_vl_moe", "llama4", "glm_moe_dsa", "jetmoe", "mixtral", "nllb-moe", "switch_transformers"} <= set(TYPES)
    packages = {c.package for c in candidates()}
    for info in pkgutil.iter_modules(models.__path__):
        path = Path(models.__path__[0]) / info.name
        if any("@use_experts_implementation" in f.read_text() for f in path.glob("modeling_*.py")):
            assert info.name in packages, info.name


def test_refused_families_say_why():
    """Each refusal is tested: replace_experts raises with the reason, and calibration refuses before loading."""
    from gmmquant.calibrate.families import calibration_model_class
    from gmmquant.runtime.families import UnsupportedFamilyError

    for model_type, reason in UNSUPPORTED.items():
        config = census.tiny_config_of(model_type)
        with pytest.raises(UnsupportedFamilyError, match=reason[:30]):
            calibration_model_class(config)


def test_encoder_decoder_calibration_is_refused_with_the_alternative():
    from gmmquant.calibrate.families import calibration_model_class

    for model_type in ("nllb-moe", "switch_transformers"):
        with pytest.raises(ValueError, match="encoder-decoder.*replace_experts"):
            calibration_model_class(census.tiny_config_of(model_type))


def test_docs_table_lists_every_family():
    """docs/RUNTIME.md's census table (census.py --write-docs) has a row for every discovered family."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "RUNTIME.md").read_text()
    block = text.split(census.BEGIN)[1].split(census.END)[0]
    missing = [t for t in TYPES if f"| {t} |" not in block]
    assert not missing, f"run `python -m tests.families.census --write-docs`; missing: {missing}"
