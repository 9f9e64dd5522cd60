"""Test set-up: without a CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
before any kernel module is imported); tests marked ``cuda`` are skipped (bench/gpu_check.sh runs them)."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run bench/gpu_check.sh on a lent device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    """Where the Triton kernel runs in this session: the GPU if present, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
