"""pytest-benchmark suite set-up: ``pytest bench --benchmark-only`` (the default ``pytest`` run collects tests/ only).

The plan is fastrev.bench's default for this device (``--quick``'s on the CPU, the full one on CUDA); narrow or widen
it with environment variables, comma lists as for ``fastrev bench``:

    FASTREV_BENCH_BENCHES, FASTREV_BENCH_SHAPES, FASTREV_BENCH_DTYPES, FASTREV_BENCH_PROVIDERS,
    FASTREV_BENCH_LOOP_PROVIDERS, FASTREV_BENCH_DEVICE (auto|cpu|cuda), FASTREV_BENCH_QUICK (1: the quick plan,
    0: the full one; default: quick on the CPU, full on CUDA).

pytest-benchmark's figures are host wall times of a call followed by a device synchronisation (launch overhead
included); ``fastrev bench`` gives the event-timed medians, GB/s and the copy ceiling.
"""

import pytest

try:
    import pytest_benchmark  # noqa: F401
    HAS_PYTEST_BENCHMARK = True
except ImportError:  # pragma: no cover
    HAS_PYTEST_BENCHMARK = False


def pytest_collection_modifyitems(config, items):
    if HAS_PYTEST_BENCHMARK:
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
