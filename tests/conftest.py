"""Test setup: Triton under its interpreter on machines without a GPU, and the `gpu` marker.

`import dbkernels` turns TRITON_INTERPRET=1 on when no CUDA device exists and triton
is not imported yet, so it happens here, before any test module imports triton.
"""
import pytest
import torch

import dbkernels  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU-only machines)
from dbkernels import _backend


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long test, deselect with -m 'not slow'")
    # triton 3.6's interpreter converts 1-element arrays to int; numpy >= 2.4 makes that an error
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def triton_cpu_reason():
    """None if the Triton kernels can run on CPU tensors in this process."""
    return _backend.unavailable_reason("triton", "cpu")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A developer's DBKERNELS_BACKEND must not change what a test checks.
    monkeypatch.delenv("DBKERNELS_BACKEND", raising=False)
    yield


@pytest.fixture
def cpu_triton():
    why = triton_cpu_reason()
    if why:
        pytest.skip(why)
    return "triton"

