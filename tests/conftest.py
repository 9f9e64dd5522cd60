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


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many small ops: on a 2-core machine shared with other work, torch's intra-op threads cost more
    than they bring (3-6x slower). One thread for the module, restored afterwards (``pytestmark`` opts in)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
