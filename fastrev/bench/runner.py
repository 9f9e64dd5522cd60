"""Runs a plan: the same-work check, the loop, the step groups (interleaved providers), then the compile cases.
Every failure is recorded; fastrev's own failures and disagreements make the run fail (``doc["failures"]``)."""

from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch

from .cases import check_agreement, disagreements, make_case
from .common import Unavailable, shape_label
from .loop import make_loop
from .timing import Timing, measure_group, measure_loop, paired_ratio

CHECK_TOL = 1e-5     # relative L2; fp32 providers against fastrev on the same inputs (observed: ~5e-8)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


class Runner:
    """State of one run: results, skips, check, failures; ``on_result`` is called after every recorded case."""

    def __init__(self, device: torch.device, timing: Timing, *, budget_s: Optional[float] = None,
                 on_result: Callable[[], None] = lambda: None, log: Callable[[str], None] = print):
        self.device, self.timing, self.budget_s = device, timing, budget_s
        self.on_result, self.log = on_result, log
        self.t0 = time.perf_counter()
        self.results, self.skipped, self.failures = [], [], []
        self.check: dict = {}

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

    def _skip(self, key: dict, reason: str, *, fastrev_failed: bool = False) -> None:
        self.skipped.append(dict(key, reason=reason))
        if fastrev_failed:
            self.failures.append(f"fastrev failed: {key.get('bench')} {key.get('shape')} {key.get('dtype')}: "
                                 f"{reason}")
        if reason.startswith("failed"):
            self.log(f"  {key.get('bench')} {key.get('shape')} {key.get('dtype')} {key['provider']}: {reason}")

    # ---------------------------------------------------------------------------------------------- check
    def run_check(self, benches, providers) -> None:
        for b in benches:
            try:
                errs = check_agreement(b, self.device, providers)
            except Unavailable as e:
                self.check[b] = {"fastrev": f"unavailable: {e}"}
                continue
            except Exception as e:
                self.check[b] = {"fastrev": f"failed: {_short(e)}"}
                self.failures.append(f"check {b}: fastrev failed ({_short(e)})")
                self.log(f"  check {b}: fastrev FAILED {_short(e)}")
                continue
            self.check[b] = errs
            bad = disagreements(errs, CHECK_TOL)
            if bad:
                self.failures.append(f"check {b}: fastrev disagrees with " + ", ".join(
                    f"{p} (rel. error {e:.2e})" if isinstance(e, float) else f"{p} ({e})" for p, e in bad.items())
                    + f" (tolerance {CHECK_TOL:g})")
                self.log(f"  check {b}: DISAGREEMENT {bad}")

    # ---------------------------------------------------------------------------------------------- loop
    def run_loop(self, providers, shape, steps: int) -> None:
        floors = {}
        for lp in providers:
            key = dict(bench="loop", shape=shape_label(shape), dtype="float32", provider=lp)
            if self.over_budget():
                self._skip(key, "time budget")
                continue
            lc = None
            try:
                lc = make_loop(lp, shape, self.device, steps)
                m = measure_loop(lc, self.timing)
            except Unavailable as e:
                self._skip(key, str(e))
                continue
            except Exception as e:
                self._skip(key, f"failed: {_short(e)}", fastrev_failed=lp.startswith("fastrev"))
                continue
            finally:
                del lc
                gc.collect()
            r = dict(key, median_us=m["median_us"], gbps=None, steps=steps, per_step_us=m["per_step_us"])
            if lp.startswith("model"):
                floors["+graph" if lp.endswith("+graph") else ""] = m["median_us"]
            self.results.append(r)
            self.on_result()
            self.log(f"  loop {lp:14s} {m['median_us'] / 1e3:9.2f} ms  {m['per_step_us']:8.1f} us/step")
        for r in self.results:
            if r["bench"] == "loop" and not r["provider"].startswith("model"):
                floor = floors.get("+graph" if r["provider"].endswith("+graph") else "")
                if floor is not None:
                    r["overhead_us_per_step"] = (r["median_us"] - floor) / r["steps"]

    # ---------------------------------------------------------------------------------------------- steps
    def run_group(self, bench: str, shape, dtype: str, providers) -> None:
        """Build and warm up one case per provider, then time them together (interleaved on the CPU)."""
        cases = []
        for p in providers:
            key = dict(bench=bench, shape=shape_label(shape), dtype=dtype, provider=p)
            try:
                c = make_case(bench, shape, dtype, p, self.device)
                c.warmup()
                cases.append(c)
            except Unavailable as e:
                self._skip(key, str(e))
            except Exception as e:   # a provider that fails is reported, the run goes on
                self._skip(key, f"failed: {_short(e)}", fastrev_failed=p == "fastrev")
        try:
            ms = measure_group(cases, self.timing)
        except Exception as e:
            for c in cases:
                self._skip(dict(c.info()), f"failed while timed: {_short(e)}", fastrev_failed=c.provider == "fastrev")
            ms = [None] * len(cases)
        for c, m in zip(cases, ms, strict=True):
            if m is None:
                continue
            r = dict(bench=bench, shape=shape_label(shape), dtype=dtype, provider=c.provider,
                     median_us=m["median_us"], gbps=c.nbytes / (m["median_us"] * 1e-6) / 1e9, wall_us=m["wall_us"],
                     bytes=c.nbytes, spread=m["spread"], reps=m["reps"], input_sets=len(c.inputs),
                     times_us=m["times_us"])
            if c.compile_s is not None:
                r["compile_s"] = c.compile_s
            self.results.append(r)
            self.log(f"  {bench:18s} {r['shape']:>12s} {dtype:8s} {c.provider:9s} {m['median_us']:11.1f} us "
                     f"{r['gbps']:8.2f} GB/s" + (f"  ±{m['spread']:.0%}" if m.get("spread") is not None else "")
                     + (f"  (wall {m['wall_us']:.1f} us)" if self.device.type == "cuda" else "")
                     + (f"  compile {c.compile_s:.1f} s" if c.compile_s is not None else ""))
        _paired(self.results[len(self.results) - sum(m is not None for m in ms):])
        for c in cases:
            c.release()
        del cases
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.on_result()

    def run_steps(self, benches, shapes, dtypes, providers, compile_shapes=None, compile_benches=None) -> None:
        """Every provider but compile first (all dtypes), then the compile cases (their warm-ups are the long part):
        when the time budget runs out, what is lost is compile cases, not whole dtypes."""
        plain = [p for p in providers if p != "compile"]
        groups = [(d, b, s) for d in dtypes for b in benches for s in shapes]
        for d, b, s in groups:
            if self.over_budget():
                for p in plain:
                    self._skip(dict(bench=b, shape=shape_label(s), dtype=d, provider=p), "time budget")
                continue
            self.run_group(b, s, d, plain)
        if "compile" not in providers:
            return
        for d, b, s in groups:          # the plan's compile_benches / compile_shapes: not skips, the plan
            key = dict(bench=b, shape=shape_label(s), dtype=d, provider="compile")
            if (compile_benches is not None and b not in compile_benches) or \
                    (compile_shapes is not None and s not in compile_shapes):
                continue
            if self.over_budget():
                self._skip(key, "time budget")
            else:
                self.run_group(b, s, d, ["compile"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _paired(rows: list) -> None:
    """For the fastrev row of a group timed in interleaved rounds: ``paired_vs`` = per provider, the median over
    rounds of its time / fastrev's time in the same round (see timing.paired_ratio)."""
    f = next((r for r in rows if r["provider"] == "fastrev" and r.get("times_us")), None)
    if f is None:
        return
    f["paired_vs"] = {r["provider"]: paired_ratio(r["times_us"], f["times_us"]) for r in rows
                      if r is not f and r.get("times_us") and len(r["times_us"]) == len(f["times_us"])}


__all__ = ["Runner", "CHECK_TOL"]
