"""Shared fixtures."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is fastest, and immune to spin-waiting on busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Kernel choices on the cpu backend follow the built-in rule in tests, whatever a developer's autotune cache
# says (tests/test_cpu_autotune.py sets its own cache directory and mode).
os.environ.setdefault("GMMQUANT_AUTOTUNE", "off")
