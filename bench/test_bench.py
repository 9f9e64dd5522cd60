"""The pytest-benchmark suite: every (bench, shape, dtype, provider) of fastrev.bench's plan, and the sampling loop.

Run ``pytest bench --benchmark-only`` (see bench/conftest.py for the environment variables that choose the plan).
Cases are built by :func:`fastrev.bench.make_case` / :func:`fastrev.bench.make_loop` from the same registry
(:mod:`fastrev.bench.registry`) as ``fastrev bench``. Nothing here asserts a speed.
"""

import os

import pytest

from fastrev import bench as fb


def _env_list(name, cast=str):
    v = os.environ.get(name)
    return [cast(s.strip()) for s in v.split(",") if s.strip()] if v else None


DEVICE = fb.resolve_device(os.environ.get("FASTREV_BENCH_DEVICE", "auto"))
_QUICK = os.environ.get("FASTREV_BENCH_QUICK")
PLAN = fb.default_plan(DEVICE, quick=(DEVICE.type == "cpu") if _QUICK is None else _QUICK not in ("", "0"))
BENCHES = _env_list("FASTREV_BENCH_BENCHES") or list(PLAN["benches"])
SHAPES = _env_list("FASTREV_BENCH_SHAPES", fb.parse_shape) or [tuple(s) for s in PLAN["shapes"]]
DTYPES = _env_list("FASTREV_BENCH_DTYPES") or list(PLAN["dtypes"])
PROVIDERS = _env_list("FASTREV_BENCH_PROVIDERS") or list(PLAN["providers"])
COMPILE_SHAPES = [tuple(s) for s in PLAN.get("compile_shapes") or SHAPES]
COMPILE_BENCHES = PLAN.get("compile_benches") or fb.step_benches()
LOOP_PROVIDERS = _env_list("FASTREV_BENCH_LOOP_PROVIDERS") or [
    p for p in PLAN["loop_providers"] if p.split("+")[0] in ["model"] + PROVIDERS]

STEP_PARAMS = [
    pytest.param(b, s, d, p, id=f"{b}-{fb.shape_label(s)}-{d}-{p}")
    for d in DTYPES for b in BENCHES if b in fb.REGISTRY for s in SHAPES for p in PROVIDERS
    if p != "compile" or (s in COMPILE_SHAPES and b in COMPILE_BENCHES)
]


@pytest.mark.parametrize("bench_name,shape,dtype,provider", STEP_PARAMS)
def test_step(benchmark, bench_name, shape, dtype, provider):
    try:
        case = fb.make_case(bench_name, shape, dtype, provider, DEVICE)
    except fb.Unavailable as e:
        pytest.skip(str(e))
    case.warmup()                                   # JIT / torch.compile warm-up stays out of the timing
    benchmark.group = f"{bench_name} {fb.shape_label(shape)} {dtype}"
    benchmark.extra_info.update(case.info())
    benchmark.extra_info["device"] = str(DEVICE)
    if case.compile_s is not None:
        benchmark.extra_info["compile_s"] = case.compile_s
    benchmark(case.call_sync)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:                           # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["gbps"] = case.nbytes / median / 1e9 if median > 0 else None


@pytest.mark.skipif("loop" not in BENCHES, reason="loop not in FASTREV_BENCH_BENCHES")
@pytest.mark.parametrize("provider", LOOP_PROVIDERS)
def test_loop(benchmark, provider):
    try:
        case = fb.make_loop(provider, PLAN["loop_shape"], DEVICE)
    except fb.Unavailable as e:
        pytest.skip(str(e))
    case.call_sync()
    benchmark.group = f"loop {fb.shape_label(case.shape)} ({case.steps} steps)"
    benchmark.extra_info.update(provider=provider, shape=fb.shape_label(case.shape), steps=case.steps,
                                device=str(DEVICE))
    benchmark(case.call_sync)
