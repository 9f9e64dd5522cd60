"""Benchmarks: fastrev's steps against diffusers, naive eager PyTorch and torch.compile of it.

``fastrev bench`` / ``python -m fastrev.bench`` (:func:`main`) and the pytest-benchmark suite in ``bench/`` run the
same cases. Modules:

* :mod:`~fastrev.bench.registry` — one :class:`StepBench` entry per benchmarked step (inputs, bytes moved per element,
  the fastrev / diffusers / naive eager callables); the entries live in ``steps_*.py`` modules (``steps_ddpm_ddim``,
  ``steps_dropins``), found automatically: a new family of steps is a new ``steps_<name>.py`` with
  :func:`register` calls;
* :mod:`~fastrev.bench.cases` — a case = (bench, shape, dtype, provider) on a device, with rotating inputs; the
  same-work check of every provider against fastrev;
* :mod:`~fastrev.bench.timing` — medians (CPU: providers interleaved; CUDA: event-timed), copy ceiling, busy warning;
* :mod:`~fastrev.bench.loop` — the sampling-loop benchmark (with and without a CUDA graph);
* :mod:`~fastrev.bench.plan`, :mod:`~fastrev.bench.runner` — the default plan per device, running it;
* :mod:`~fastrev.bench.report`, :mod:`~fastrev.bench.kernel_report` — markdown, ratios, plot, JSON, RESULTS.md;
  compiler statistics of the kernel (CUDA).

The method (timing, bytes counted, exit status) is described in docs/benchmarks.md.
"""

from . import registry
from .cases import StepCase, check_agreement, make_case
from .common import (
    DTYPES,
    PROVIDERS,
    SHAPES,
    Unavailable,
    diffusers_available,
    parse_shape,
    resolve_device,
    shape_label,
)
from .loop import LOOP_PROVIDERS, LoopCase, make_loop
from .main import main
from .plan import default_plan
from .registry import REGISTRY, StepBench, register, step_benches, unregister
from .timing import Timing, measure_copy

registry._discover()           # import the steps_* modules: REGISTRY is complete once fastrev.bench is imported


def bytes_moved(bench: str, shape, dtype) -> int:
    """The fewest bytes ``bench`` must move for a sample of ``shape`` in ``dtype`` (docs/benchmarks.md)."""
    from .registry import get
    return get(bench).bytes_moved(shape, dtype)


__all__ = ["DTYPES", "LOOP_PROVIDERS", "PROVIDERS", "REGISTRY", "SHAPES", "LoopCase", "StepBench", "StepCase",
           "Timing", "Unavailable", "bytes_moved", "check_agreement", "default_plan", "diffusers_available",
           "main", "make_case", "make_loop", "measure_copy", "parse_shape", "register", "resolve_device",
           "shape_label", "step_benches", "unregister"]
