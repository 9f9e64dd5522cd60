"""Test set-up: without a CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
before any kernel module is imported); tests marked ``cuda`` are skipped (bench/gpu_check.sh runs them).

hypothesis profiles, chosen by ``FASTREV_HYPOTHESIS_PROFILE``: ``ci`` (the default: 600 examples per property, what
CI runs) and ``dev`` (60 examples, for quick local runs). A test's own ``@settings(max_examples=...)`` overrides
the profile; the kernel fuzz test leaves it to the profile.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

HYPOTHESIS_PROFILES = {"ci": 600, "dev": 60}
for _name, _examples in HYPOTHESIS_PROFILES.items():
    settings.register_profile(_name, max_examples=_examples, deadline=None)
HYPOTHESIS_PROFILE = os.environ.get("FASTREV_HYPOTHESIS_PROFILE", "ci") or "ci"


def pytest_configure(config):
    # before collection: @settings decorators inherit the loaded profile when the test modules are imported
    if HYPOTHESIS_PROFILE not in HYPOTHESIS_PROFILES:
        raise pytest.UsageError(f"FASTREV_HYPOTHESIS_PROFILE must be one of {tuple(HYPOTHESIS_PROFILES)}, "
                                f"got {HYPOTHESIS_PROFILE!r}")
    settings.load_profile(HYPOTHESIS_PROFILE)


def pytest_report_header(config):
    return (f"fastrev: hypothesis profile {HYPOTHESIS_PROFILE!r} ({HYPOTHESIS_PROFILES[HYPOTHESIS_PROFILE]} "
            f"examples; FASTREV_HYPOTHESIS_PROFILE=ci|dev), "
            f"{'CUDA' if HAS_CUDA else 'CPU (Triton interpreter)'}")


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
