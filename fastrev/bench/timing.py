"""How the harness measures: medians of repeated calls, interleaved on the CPU, event-timed on CUDA.

* CPU: the cases of one (bench, shape, dtype) — one per provider — run in interleaved rounds (one timed call of each
  provider per round) until every case has ``min_reps`` calls and the group has run ``min_time`` seconds. Load that
  comes and goes on a shared machine then hits every provider alike, so the ratios stay stable even when the absolute
  times do not; the spread (interquartile range / median) is reported beside each median.
* CUDA: ``triton.testing.do_bench`` per case (event-timed, L2 flushed before each call, median), plus ``wall_us``:
  back-to-back calls with the host clock around them (what a Python loop sees when launches are host-bound).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .common import resolve_device, sync


@dataclass(frozen=True)
class Timing:
    quick: bool = False
    cpu_min_time: float = 2.0         # seconds per CPU group (all its providers together)
    cpu_min_reps: int = 10            # timed calls per case, at least
    cpu_max_reps: int = 500
    warmup_ms: float = 25.0           # do_bench (CUDA)
    rep_ms: float = 100.0

    @classmethod
    def for_mode(cls, quick: bool) -> "Timing":
        if quick:
            return cls(quick=True, cpu_min_time=0.5, cpu_min_reps=5, cpu_max_reps=200, warmup_ms=10.0, rep_ms=40.0)
        return cls()


def machine_load() -> dict:
    """1-minute load average against the CPU count; ``busy`` when the load exceeds the cores."""
    cpus = os.cpu_count() or 1
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not on this platform
        return {"load1": None, "cpus": cpus, "busy": False}
    return {"load1": round(load1, 2), "cpus": cpus, "busy": load1 > cpus}


def busy_warning() -> Optional[str]:
    m = machine_load()
    if m["busy"]:
        return (f"WARNING: the machine is busy (1-min load average {m['load1']:.1f} > {m['cpus']} cores): CPU times "
                "are noisy and slower than on an idle machine; the ratios (providers interleaved, paired per round) "
                "are more reliable than the absolute figures. Multi-threaded torch ops wait for descheduled threads "
                f"on a busy machine: --threads 1 is steadier (torch threads in this run: {torch.get_num_threads()})")
    return None


def _stats(times: list) -> dict:
    med = statistics.median(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        spread = (q[2] - q[0]) / med if med > 0 else None
    else:
        spread = None
    return {"median_us": med * 1e6, "spread": spread, "reps": len(times), "times_us": [t * 1e6 for t in times]}


def paired_ratio(times_a: list, times_b: list) -> float:
    """Median over interleaved rounds of a's time / b's time in the same round: a slow spell that spans a round
    cancels out, which the ratio of the two medians does not do."""
    return statistics.median(a / b for a, b in zip(times_a, times_b, strict=True))


def time_interleaved(calls: list, *, min_time: float, min_reps: int, max_reps: int) -> list:
    """Interleaved rounds of synchronous calls → per call: {"median_us", "spread", "reps"}."""
    times = [[] for _ in calls]
    end = time.perf_counter() + min_time
    while True:
        for call, ts in zip(calls, times, strict=True):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        n = len(times[0])
        if n >= max_reps or (n >= min_reps and time.perf_counter() >= end):
            break
    return [_stats(ts) for ts in times]


def _do_bench(call, warmup_ms: float, rep_ms: float) -> float:
    """triton.testing.do_bench median in seconds (event-timed; L2 flushed before each call)."""
    from triton.testing import do_bench
    return do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3


def _wall_cuda(call, device, per_call_s: float, target_s: float = 0.02, repeats: int = 3) -> float:
    """Back-to-back calls, host clock around them: seconds per call including host overhead."""
    n = int(min(2000, max(10, target_s / max(per_call_s, 1e-6))))
    walls = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        sync(device)
        walls.append((time.perf_counter() - t0) / n)
    return statistics.median(walls)


def measure_group(cases: list, timing: Timing) -> list:
    """Warmed-up cases (same device) → per case {"median_us", "wall_us", "spread", "reps"}."""
    if not cases:
        return []
    if cases[0].device.type == "cuda":
        out = []
        for c in cases:
            med = _do_bench(c.call, timing.warmup_ms, timing.rep_ms)
            out.append({"median_us": med * 1e6, "wall_us": _wall_cuda(c.call, c.device, med) * 1e6,
                        "spread": None, "reps": None, "times_us": None})
        return out
    res = time_interleaved([c.call for c in cases], min_time=timing.cpu_min_time, min_reps=timing.cpu_min_reps,
                           max_reps=timing.cpu_max_reps)
    for r in res:
        r["wall_us"] = r["median_us"]
    return res


def measure_copy(device, nbytes: Optional[int] = None, timing: Optional[Timing] = None) -> dict:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of a large random buffer, 2 × nbytes moved."""
    device = resolve_device(device)
    timing = timing or Timing()
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    call = functools.partial(dst.copy_, src)
    call()
    sync(device)
    if device.type == "cuda":
        sec = _do_bench(call, timing.warmup_ms, timing.rep_ms)
    else:
        sec = time_interleaved([call], min_time=min(timing.cpu_min_time, 0.25), min_reps=5,
                               max_reps=timing.cpu_max_reps)[0]["median_us"] * 1e-6
    del src, dst
    return {"copy_gbps": 2 * n * 4 / sec / 1e9, "copy_bytes": n * 4, "copy_us": sec * 1e6}


def measure_loop(case, timing: Timing) -> dict:
    case.call_sync()
    case.call_sync()
    if case.device.type == "cuda":
        med = _do_bench(case.run, timing.warmup_ms, max(timing.rep_ms, 100.0))
    else:
        med = time_interleaved([case.run], min_time=timing.cpu_min_time / 2, min_reps=3,
                               max_reps=20)[0]["median_us"] * 1e-6
    return {"median_us": med * 1e6, "per_step_us": med * 1e6 / case.steps}
