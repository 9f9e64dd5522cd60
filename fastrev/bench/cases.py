"""Step cases: one (bench, shape, dtype, provider) built on a device, with rotating input sets; the same-work check."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import registry
from .common import SHAPES, Unavailable, dtype_name, parse_shape, resolve_device, shape_label, sync, to_dtype
from .registry import as_pair


@dataclass
class StepCase:
    """One (bench, shape, dtype, provider) on a device: ``call()`` runs one step on the next input set."""
    bench: str
    shape: tuple
    dtype: str
    provider: str
    device: torch.device
    fn: Callable
    inputs: list
    nbytes: int
    compile_s: Optional[float] = None
    _i: int = 0

    def call(self):
        inp = self.inputs[self._i % len(self.inputs)]
        self._i += 1
        return self.fn(inp)

    def call_sync(self):
        r = self.call()
        sync(self.device)
        return r

    def warmup(self, n: int = 2) -> None:
        """First calls (Triton JIT, torch.compile, allocator); the first one's time is ``compile_s`` for compile."""
        t0 = time.perf_counter()
        self.call_sync()
        if self.provider == "compile":
            self.compile_s = time.perf_counter() - t0
        for _ in range(max(0, n - 1)):
            self.call_sync()

    def info(self) -> dict:
        return {"bench": self.bench, "shape": shape_label(self.shape), "dtype": self.dtype, "provider": self.provider,
                "bytes": self.nbytes, "input_sets": len(self.inputs)}

    def release(self) -> None:
        self.inputs.clear()
        self.fn = None


def rotation_sets(nbytes_per_set: int, device: torch.device, rotate_bytes: Optional[int] = None) -> int:
    """Enough input sets that one pass over them overflows the last-level cache (4× L2 on CUDA, 64 MiB on CPU)."""
    if rotate_bytes is None:
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
            rotate_bytes = 4 * l2
        else:
            rotate_bytes = 64 << 20
    return int(max(2, min(512, math.ceil(rotate_bytes / max(nbytes_per_set, 1)))))


def build_fn(entry: registry.StepBench, provider: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The provider's callable of one Inputs (raises :class:`Unavailable` where it cannot run)."""
    builder = entry.builder(provider)
    if provider == "eager":
        f = builder(device, dtype)
        return lambda inp: f(inp.x, inp.t, inp.out)
    if provider == "compile":
        if not hasattr(torch, "compile"):
            raise Unavailable("torch.compile is not available in this torch")
        torch._dynamo.reset()                      # a fresh cache per case: no recompile limit across cases
        cf = torch.compile(builder(device, dtype), dynamic=False, fullgraph=True)
        return lambda inp: cf(inp.x, inp.t, inp.out)
    return builder(device, dtype)


def make_case(bench: str, shape, dtype, provider: str, device="auto", *, rotate_bytes: Optional[int] = None,
              n_sets: Optional[int] = None, seed: int = 0) -> StepCase:
    """Build a step case (raises :class:`Unavailable` when the provider cannot run here)."""
    device = resolve_device(device)
    entry = registry.get(bench)
    shape = parse_shape(shape)
    dt = to_dtype(dtype)
    per_set = math.prod(shape) * dt.itemsize * (1 + entry.model_channels)
    if n_sets is None:
        n_sets = rotation_sets(per_set, device, rotate_bytes)
    fn = build_fn(entry, provider, device, dt)
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = [entry.inputs(shape, dt, device, g) for _ in range(n_sets)]
    return StepCase(bench, shape, dtype_name(dt), provider, device, fn, inputs, entry.bytes_moved(shape, dt))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_agreement(bench: str, device, providers, shape=SHAPES[0]) -> dict:
    """Relative error against fastrev, fp32, same inputs: of x̂₀ for every provider, and of x_{t−1} for the entry's
    ``compare_prev`` providers. A check that every provider runs the same work (not a speed). Raises whatever
    fastrev raises; a provider that cannot run maps to "unavailable: ..." or "failed: ...". NaN never passes."""
    device = resolve_device(device)
    entry = registry.get(bench)
    g = torch.Generator(device=device).manual_seed(7)
    inp = entry.inputs(parse_shape(shape), torch.float32, device, g)
    ref_prev, ref_x0 = as_pair(build_fn(entry, "fastrev", device, torch.float32)(inp))
    if not (torch.isfinite(ref_prev).all() and torch.isfinite(ref_x0).all()):
        raise FloatingPointError(f"{bench}: fastrev returned NaN/Inf")
    errs = {}
    for p in providers:
        if p in ("fastrev", "compile"):
            continue
        try:
            prev, x0 = as_pair(build_fn(entry, p, device, torch.float32)(inp))
        except Unavailable as e:
            errs[p] = f"unavailable: {e}"
            continue
        except Exception as e:  # a provider that cannot even run is reported (the timing pass reports it too)
            errs[p] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            continue
        e = _rel_err(x0, ref_x0)
        if p in entry.compare_prev:
            e = max(e, _rel_err(prev, ref_prev)) if e == e else e
        errs[p] = e
    return errs


def disagreements(errs: dict, tol: float) -> dict:
    """The providers of a check result whose error is not a number ≤ tol (NaN included); unavailable ones excluded."""
    return {p: e for p, e in errs.items()
            if not (isinstance(e, str) and e.startswith(("unavailable", "failed")))
            and not (isinstance(e, float) and e <= tol)}
