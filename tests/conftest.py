"""Shared test set-up: float64 oracles need determinism; GPU and real-data tests skip cleanly."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Real volumes live beside the project (../shared/data), never inside it.
SHARED_DATA = Path(os.environ.get("DPSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The commands' CLI tests run in this process: leave its allocator as glibc has it
# (dpseg.perf.allocator; tests/test_perf_allocator.py runs the policies in fresh processes).
os.environ["DPSEG_FREED_MEMORY"] = "return"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_data = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "real_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_data)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _backends_restored():
    # A test that registers a backend (the Triton interpreter) must take it away again: a
    # leftover "triton" makes "auto" choose the interpreter for every later test.
    from dpseg.ops import BACKENDS

    before = set(BACKENDS)
    yield
    leaked = set(BACKENDS) - before
    assert not leaked, f"this test left backends registered: {sorted(leaked)}"


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA
