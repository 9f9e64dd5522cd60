"""Benchmark harness: the fused step against naive elementwise PyTorch, torch.compile and diffusers.

One implementation behind ``fastrev bench`` / ``python -m fastrev.bench`` and the pytest-benchmark suite in
``bench/test_bench.py``.

Providers (each runs the same work on the same device):

* ``fastrev``   — :func:`fastrev.ddpm_step` / :func:`fastrev.ddim_step` with ``backend="auto"``: the fused Triton
  kernel on CUDA; **on the CPU it is the float64 reference path** (PyTorch ops in float64 plus the counter-noise
  Philox in int64 ops), not the kernel — CPU figures of ``fastrev`` are not kernel figures.
* ``eager``     — the seed's formulas op by op (:mod:`fastrev.reference` in the sample's dtype, tables cast to it)
  plus ``torch.randn_like``: the naive elementwise version.
* ``compile``   — ``torch.compile(eager, dynamic=False, fullgraph=True)``, one compile per (work, shape, dtype);
  its warm-up (the first call) is reported separately as ``compile_s``.
* ``diffusers`` — ``DDPMScheduler.step`` / ``DDIMScheduler.step`` configured to the same work (skipped, and reported
  as missing, where diffusers is not installed).

Works (``bench`` names): ``ddpm_step`` (ε, fixed_small, x̂₀ clipped to ±1, noise added; t = 500 of 1000 linear-β
steps), ``ddim_step`` (η = 0, ε, clipped; t = 500 of 50 "leading" steps), ``learned_range_step`` (DDPM with a 2C-channel
model output, learned_range variance, clipped). Every provider returns x_{t−1} and x̂₀.

Bytes counted — the fewest each step must move, the same for every provider: ddpm/ddim read x_t and ε and write
x_{t−1} and x̂₀ = 4 × itemsize per element (16 B in fp32; noise is generated, not read); learned_range also reads the
C variance channels = 5 × itemsize per output element (20 B in fp32). GB/s = those bytes / median time; ``frac_copy``
divides by a device-to-device copy (``dst.copy_(src)``, read + write counted) measured in the same run.

Timing: on CUDA ``triton.testing.do_bench`` (event-timed, L2 flushed before every call, median) gives ``median_us``;
``wall_us`` is the back-to-back host-inclusive time per call (what a Python sampling loop sees when the launch is
bound by the host). On the CPU both are the median of repeated ``perf_counter`` runs. Inputs rotate among several
sets so that repeated runs do not measure the cache.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import reference as R
from .ops import ddim_step, ddpm_step
from .schedule import Schedule, spaced_timesteps

__all__ = ["BENCHES", "STEP_BENCHES", "PROVIDERS", "LOOP_PROVIDERS", "SHAPES", "DTYPES", "WORKS", "Work",
           "Unavailable", "StepCase", "LoopCase", "make_case", "make_loop", "default_plan", "measure_copy",
           "parse_shape", "shape_label", "bytes_moved", "main"]

BENCHES = ("ddpm_step", "ddim_step", "learned_range_step", "loop")
STEP_BENCHES = BENCHES[:3]
PROVIDERS = ("fastrev", "eager", "compile", "diffusers")
LOOP_PROVIDERS = ("model", "fastrev", "eager", "diffusers", "model+graph", "fastrev+graph", "eager+graph")
SHAPES = ((1, 4, 64, 64), (4, 4, 128, 128), (16, 3, 256, 256), (64, 3, 256, 256))
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "f16": "float16", "half": "float16"}

NUM_TRAIN = 1000          # linear β schedule, 1e-4 .. 0.02 (diffusers' DDPM defaults)
T_STEP = 500              # the training timestep every step benchmark runs at (noise is added: t > 0)
DDIM_STEPS = 50           # DDIM runs on the 50 "leading" steps (diffusers' set_timesteps(50)); 500 is one of them
LOOP_STEPS = 50
SEED = 1234


# ------------------------------------------------------------------------------------------------ the work
@dataclass(frozen=True)
class Work:
    name: str
    kind: str                 # "ddpm" | "ddim"
    variance_type: str
    model_channels: int       # model output channels per sample channel (2 for learned variances)
    reads: int                # tensors read, in units of the sample's size
    writes: int               # tensors written (x_{t−1} and x̂₀)
    what: str

    def bytes_per_elem(self, dtype) -> int:
        return (self.reads + self.writes) * _dtype(dtype).itemsize


WORKS = {
    "ddpm_step": Work("ddpm_step", "ddpm", "fixed_small", 1, 2, 2,
                      "DDPM ε-prediction, fixed_small σ, x̂₀ clipped to ±1, noise added (t=500 of 1000, linear β)"),
    "ddim_step": Work("ddim_step", "ddim", "fixed_small", 1, 2, 2,
                      "DDIM η=0, ε-prediction, x̂₀ clipped to ±1 (t=500 of 50 leading steps of 1000)"),
    "learned_range_step": Work("learned_range_step", "ddpm", "learned_range", 2, 3, 2,
                               "DDPM ε + learned_range variance (2C-channel model output), x̂₀ clipped, noise added"),
}

BYTES_NOTE = ("bytes counted = the minimum the step must move, the same for every provider: ddpm_step/ddim_step read "
              "x_t and ε and write x_{t-1} and x̂₀ = 4 × itemsize per element (16 B fp32, 8 B bf16/fp16; noise is "
              "generated, not read); learned_range_step also reads the C variance channels = 5 × itemsize per output "
              "element (20 B fp32, 10 B bf16/fp16). copy = dst.copy_(src) of a large buffer, read + write counted.")


class Unavailable(RuntimeError):
    """A provider that cannot run here (missing package, no CUDA, ...): reported, never fatal."""


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = _DTYPE_ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or fp32/bf16/fp16), got {name!r}")
    return getattr(torch, name)


def _dtype_name(dtype) -> str:
    return str(_dtype(dtype)).replace("torch.", "")


def parse_shape(s) -> tuple:
    if isinstance(s, (tuple, list)):
        return tuple(int(v) for v in s)
    parts = re.split(r"[x×,]", str(s).strip().lower())
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        raise ValueError(f"shape must look like 1x4x64x64, got {s!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be B×C×H×W with positive sizes (like 1x4x64x64), got {s!r}")
    return shape


def shape_label(shape) -> str:
    return "x".join(str(v) for v in shape)


def bytes_moved(bench: str, shape, dtype) -> int:
    """The fewest bytes ``bench`` must move for a sample of ``shape`` in ``dtype`` (see BYTES_NOTE)."""
    return math.prod(parse_shape(shape)) * WORKS[bench].bytes_per_elem(dtype)


@functools.lru_cache(maxsize=None)
def _schedules():
    base = Schedule.linear(NUM_TRAIN)
    ddim = base.respace(spaced_timesteps(NUM_TRAIN, DDIM_STEPS, "leading"))
    ddim_t = int((ddim.timesteps == T_STEP).nonzero()[0, 0])
    return base, ddim, ddim_t


def _work_schedule(work: Work):
    """(schedule, schedule index t) of a step benchmark."""
    base, ddim, ddim_t = _schedules()
    return (ddim, ddim_t) if work.kind == "ddim" else (base, T_STEP)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if d.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device}")
    return d


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    x: torch.Tensor           # x_t [B, C, H, W]
    out: torch.Tensor         # model output [B, C·model_channels, H, W]
    t: torch.Tensor           # int64 [B] schedule index on the device (fastrev, eager, compile)


def _rotation_sets(nbytes_per_set: int, device: torch.device, rotate_bytes: Optional[int]) -> int:
    """Enough input sets that one pass over them overflows the last-level cache (4× L2 on CUDA)."""
    if rotate_bytes is None:
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
            rotate_bytes = 4 * l2
        else:
            rotate_bytes = 64 << 20
    return int(max(2, min(512, math.ceil(rotate_bytes / max(nbytes_per_set, 1)))))


def make_inputs(work: Work, shape, dtype, device, n_sets: int, seed: int = 0) -> list:
    B, C = shape[0], shape[1]
    _, t_idx = _work_schedule(work)
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    t = torch.full((B,), t_idx, dtype=torch.int64, device=device)
    for _ in range(n_sets):
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        eps = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if work.model_channels == 2:
            v = torch.rand(shape, generator=g, device=device, dtype=torch.float32) * 2 - 1
            out = torch.cat([eps, v], dim=1).to(dtype)
        else:
            out = eps.to(dtype)
        sets.append(Inputs(x, out, t))
    return sets


# ------------------------------------------------------------------------------------------------ providers
def eager_step(work: Work, alpha_bars: torch.Tensor, betas: torch.Tensor) -> Callable:
    """The naive step: the seed's formulas (fastrev.reference) op by op in the tensors' dtype, plus torch.randn.
    ``f(x, t, out) -> (x_{t−1}, x̂₀)``; this is also what ``compile`` compiles."""
    if work.kind == "ddim":
        def f(x, t, out):
            return R.ddim_step(x, t, out, alpha_bars, eta=0.0, clip_range=1.0)
    elif work.variance_type == "learned_range":
        def f(x, t, out):
            C = x.shape[1]
            noise = torch.randn_like(x)
            return R.ddpm_step(x, t, out[:, :C], alpha_bars, betas, variance_type="learned_range",
                               model_var_values=out[:, C:], clip_range=1.0, noise=noise)
    else:
        def f(x, t, out):
            noise = torch.randn_like(x)
            return R.ddpm_step(x, t, out, alpha_bars, betas, variance_type=work.variance_type, clip_range=1.0,
                               noise=noise)
    return f


def _fastrev_fn(work: Work, device, **kw) -> Callable:
    sched, _ = _work_schedule(work)
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)      # a device tensor: no host→device per call
    if work.kind == "ddim":
        return lambda inp: ddim_step(inp.out, inp.t, inp.x, sched, eta=0.0, clip_sample=True, seed=seed, **kw)
    return lambda inp: ddpm_step(inp.out, inp.t, inp.x, sched, variance_type=work.variance_type, clip_sample=True,
                                 seed=seed, **kw)


def _eager_fn(work: Work, device, dtype) -> Callable:
    sched, _ = _work_schedule(work)
    f = eager_step(work, sched.alpha_bars.to(device=device, dtype=dtype), sched.betas.to(device=device, dtype=dtype))
    return lambda inp: f(inp.x, inp.t, inp.out)


def _compile_fn(work: Work, device, dtype) -> Callable:
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile is not available in this torch")
    try:
        torch._dynamo.reset()                       # a fresh cache per case: no recompile limit across cases
    except Exception:  # pragma: no cover
        pass
    sched, _ = _work_schedule(work)
    f = eager_step(work, sched.alpha_bars.to(device=device, dtype=dtype), sched.betas.to(device=device, dtype=dtype))
    cf = torch.compile(f, dynamic=False, fullgraph=True)
    return lambda inp: cf(inp.x, inp.t, inp.out)


def diffusers_available() -> tuple:
    try:
        import diffusers  # noqa: F401
        from diffusers import DDIMScheduler, DDPMScheduler  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"diffusers not importable ({type(e).__name__}: {e})".strip()
    return True, getattr(diffusers, "__version__", "?")


def _diffusers_scheduler(kind: str, variance_type: str = "fixed_small", num_inference_steps=None):
    ok, why = diffusers_available()
    if not ok:
        raise Unavailable(why)
    from diffusers import DDIMScheduler, DDPMScheduler
    common = dict(num_train_timesteps=NUM_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)
    if kind == "ddim":
        s = DDIMScheduler(**common, set_alpha_to_one=True)
        s.set_timesteps(num_inference_steps or DDIM_STEPS)
    else:
        s = DDPMScheduler(**common, variance_type=variance_type)
        if num_inference_steps:
            s.set_timesteps(num_inference_steps)
    return s


def _diffusers_fn(work: Work, device, dtype) -> Callable:
    s = _diffusers_scheduler(work.kind, work.variance_type)
    # a Python int timestep: diffusers' fastest path (no host syncs on a device tensor)
    if work.kind == "ddim":
        return lambda inp: s.step(inp.out, T_STEP, inp.x, eta=0.0, return_dict=False)
    return lambda inp: s.step(inp.out, T_STEP, inp.x, return_dict=False)


def _provider_fn(provider: str, work: Work, device, dtype) -> Callable:
    if provider == "fastrev":
        return _fastrev_fn(work, device)
    if provider == "eager":
        return _eager_fn(work, device, dtype)
    if provider == "compile":
        return _compile_fn(work, device, dtype)
    if provider == "diffusers":
        return _diffusers_fn(work, device, dtype)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


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
        _sync(self.device)
        return r

    def warmup(self, n: int = 2) -> None:
        """First calls (Triton JIT, torch.compile, allocator); the first one's time is ``compile_s`` for compile."""
        t0 = time.perf_counter()
        self.call_sync()
        first = time.perf_counter() - t0
        if self.provider == "compile":
            self.compile_s = first
        for _ in range(max(0, n - 1)):
            self.call_sync()

    def info(self) -> dict:
        return {"bench": self.bench, "shape": shape_label(self.shape), "dtype": self.dtype, "provider": self.provider,
                "bytes": self.nbytes, "input_sets": len(self.inputs)}


def make_case(bench: str, shape, dtype, provider: str, device="auto", *, rotate_bytes: Optional[int] = None,
              n_sets: Optional[int] = None) -> StepCase:
    """Build a step case (raises :class:`Unavailable` when the provider cannot run here)."""
    device = _resolve_device(device)
    work = WORKS[bench]
    shape = parse_shape(shape)
    dt = _dtype(dtype)
    per_set = math.prod(shape) * dt.itemsize * (1 + work.model_channels)
    if n_sets is None:
        n_sets = _rotation_sets(per_set, device, rotate_bytes)
    fn = _provider_fn(provider, work, device, dt)
    inputs = make_inputs(work, shape, dt, device, n_sets)
    return StepCase(bench, shape, _dtype_name(dt), provider, device, fn, inputs, bytes_moved(bench, shape, dt))


# ------------------------------------------------------------------------------------------------ timing
def _time_host(call, *, min_time: float, min_reps: int, max_reps: int) -> tuple:
    """Median seconds of repeated synchronous calls (CPU, or CUDA with a sync inside ``call``)."""
    times = []
    end = time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < end and len(times) < max_reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _do_bench(call, warmup_ms: float, rep_ms: float) -> float:
    """triton.testing.do_bench median in seconds (event-timed; L2 flushed before each call)."""
    from triton.testing import do_bench
    return do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3


def _wall_cuda(call, device, per_call_s: float, target_s: float = 0.02, repeats: int = 3) -> float:
    """Back-to-back calls, host clock around them: seconds per call including host overhead."""
    n = int(min(2000, max(10, target_s / max(per_call_s, 1e-6))))
    walls = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        _sync(device)
        walls.append((time.perf_counter() - t0) / n)
    return statistics.median(walls)


@dataclass
class Timing:
    quick: bool = False
    cpu_min_time: float = 0.5
    cpu_min_reps: int = 5
    cpu_max_reps: int = 200
    warmup_ms: float = 25.0
    rep_ms: float = 100.0

    @classmethod
    def for_mode(cls, quick: bool) -> "Timing":
        if quick:
            return cls(quick=True, cpu_min_time=0.15, cpu_min_reps=3, cpu_max_reps=50, warmup_ms=10.0, rep_ms=40.0)
        return cls()


def measure_step(case: StepCase, timing: Timing) -> dict:
    """{"median_us", "wall_us", "reps"} for a warmed-up case."""
    if case.device.type == "cuda":
        med = _do_bench(case.call, timing.warmup_ms, timing.rep_ms)
        wall = _wall_cuda(case.call, case.device, med)
        return {"median_us": med * 1e6, "wall_us": wall * 1e6, "reps": None}
    med, n = _time_host(case.call, min_time=timing.cpu_min_time, min_reps=timing.cpu_min_reps,
                        max_reps=timing.cpu_max_reps)
    return {"median_us": med * 1e6, "wall_us": med * 1e6, "reps": n}


def run_step_case(bench: str, shape, dtype, provider: str, device, timing: Timing) -> dict:
    """Build, warm up and time one case; free its memory. Raises :class:`Unavailable` for a provider that cannot
    run here."""
    case = make_case(bench, shape, dtype, provider, device)
    try:
        case.warmup()
        m = measure_step(case, timing)
        m["compile_s"] = case.compile_s
        m["input_sets"] = len(case.inputs)
        return m
    finally:
        case.inputs.clear()
        del case
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_copy(device, nbytes: Optional[int] = None, timing: Optional[Timing] = None) -> dict:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of a large random buffer, 2 × nbytes moved."""
    device = _resolve_device(device)
    timing = timing or Timing()
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    call = functools.partial(dst.copy_, src)
    call()
    _sync(device)
    if device.type == "cuda":
        sec = _do_bench(call, timing.warmup_ms, timing.rep_ms)
    else:
        sec, _ = _time_host(call, min_time=timing.cpu_min_time, min_reps=max(5, timing.cpu_min_reps),
                            max_reps=timing.cpu_max_reps)
    del src, dst
    return {"copy_gbps": 2 * n * 4 / sec / 1e9, "copy_bytes": n * 4, "copy_us": sec * 1e6}


# ------------------------------------------------------------------------------------------------ the loop
class TinyModel(torch.nn.Module):
    """A small convolutional ε-model: conv3×3 (C→hidden) + timestep bias, SiLU, conv3×3 (hidden→C)."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.c1 = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        self.temb = torch.nn.Parameter(torch.randn(hidden) * 0.1)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / NUM_TRAIN).reshape(-1, 1, 1, 1)
        h = self.c1(x) + tt * self.temb.reshape(1, -1, 1, 1)
        return self.c2(torch.nn.functional.silu(h))


@dataclass
class LoopCase:
    provider: str
    shape: tuple
    device: torch.device
    run: Callable
    steps: int
    graph: object = None

    def call_sync(self):
        r = self.run()
        _sync(self.device)
        return r


def make_loop(provider: str, shape=(1, 4, 64, 64), device="auto", steps: int = LOOP_STEPS) -> LoopCase:
    """A ``steps``-step DDPM sampling loop (ε, fixed_small, clipped; 1000 linear-β steps respaced to ``steps``
    leading steps) with :class:`TinyModel`, float32. ``model``: the model alone (the floor); ``+graph``: the whole
    loop captured in one CUDA graph (t read from device tensors)."""
    device = _resolve_device(device)
    shape = parse_shape(shape)
    if provider not in LOOP_PROVIDERS:
        raise ValueError(f"loop provider must be one of {LOOP_PROVIDERS}, got {provider!r}")
    graph = provider.endswith("+graph")
    base = provider.split("+")[0]
    if graph and device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    B, C = shape[:2]
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    model = TinyModel(C).to(device).eval()
    x_T = torch.randn(shape, generator=g).to(device)
    sched = Schedule.linear(NUM_TRAIN).respace(spaced_timesteps(NUM_TRAIN, steps, "leading"))
    order = list(reversed(range(steps)))
    idx = [torch.full((B,), i, dtype=torch.int64, device=device) for i in order]        # schedule rows
    tt = [torch.full((B,), int(sched.timesteps[i]), dtype=torch.int64, device=device) for i in order]  # model's t
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)

    if base == "model":
        def body():
            e = None
            for k in range(steps):
                e = model(x_T, tt[k])
            return e
    elif base == "fastrev":
        def body():
            x = x_T
            for k in range(steps):
                e = model(x, tt[k])
                x = ddpm_step(e, idx[k], x, sched, clip_sample=True, seed=seed, return_x0=False).prev_sample
            return x
    elif base == "eager":
        ab, betas = sched.alpha_bars.to(device, torch.float32), sched.betas.to(device, torch.float32)

        def body():
            x = x_T
            for k in range(steps):
                e = model(x, tt[k])
                x = R.ddpm_step(x, idx[k], e, ab, betas, clip_range=1.0, noise=torch.randn_like(x))[0]
            return x
    else:   # diffusers, as DDPMPipeline runs it: CPU timesteps, moved to the device for the model
        s = _diffusers_scheduler("ddpm", "fixed_small", num_inference_steps=steps)

        def body():
            x = x_T
            for t in s.timesteps:
                e = model(x, t.to(device).expand(B))
                x = s.step(e, t, x).prev_sample
            return x

    def run_plain():
        with torch.no_grad():
            return body()

    if not graph:
        return LoopCase(provider, shape, device, run_plain, steps)
    # capture the whole loop once (after warm-up on a side stream: JIT, cuDNN, allocator), replay it
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            run_plain()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    cg = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(cg):
        static_out = body()

    def run_graph():
        cg.replay()
        return static_out
    return LoopCase(provider, shape, device, run_graph, steps, graph=cg)


def measure_loop(case: LoopCase, timing: Timing) -> dict:
    case.call_sync()
    case.call_sync()
    if case.device.type == "cuda":
        med = _do_bench(case.run, timing.warmup_ms, max(timing.rep_ms, 100.0))
    else:
        med, _ = _time_host(case.run, min_time=timing.cpu_min_time, min_reps=3, max_reps=20)
    return {"median_us": med * 1e6, "per_step_us": med * 1e6 / case.steps}


# ------------------------------------------------------------------------------------------------ the plan
def default_plan(device, quick: bool) -> dict:
    """Benches, shapes, dtypes and providers that run by default on ``device`` (CLI and pytest suite alike)."""
    device = _resolve_device(device)
    if device.type == "cuda":
        if quick:
            return dict(benches=BENCHES, shapes=[SHAPES[0], SHAPES[2]], dtypes=["float32", "bfloat16"],
                        providers=list(PROVIDERS), loop_shape=(1, 4, 64, 64))
        return dict(benches=BENCHES, shapes=list(SHAPES), dtypes=list(DTYPES), providers=list(PROVIDERS),
                    loop_shape=(1, 4, 64, 64))
    # CPU: 2 cores here; torch.compile warm-ups (C++ through gcc) cost seconds to tens of seconds each
    if quick:
        return dict(benches=BENCHES, shapes=[SHAPES[0], SHAPES[1]], dtypes=["float32"],
                    providers=["fastrev", "eager", "diffusers", "compile"], compile_shapes=[SHAPES[0]],
                    loop_shape=(1, 4, 32, 32))
    return dict(benches=BENCHES, shapes=[SHAPES[0], SHAPES[1], SHAPES[2]], dtypes=["float32", "bfloat16"],
                providers=list(PROVIDERS), loop_shape=(1, 4, 64, 64))


def _env_info(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    else:
        name = platform.processor() or platform.machine()
        label = "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover
        load = None
    return {"device": label, "device_name": name, "torch": torch.__version__, "triton": tv, "loadavg": load,
            "cpus": os.cpu_count(),
            "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def _repo_root() -> Optional[Path]:
    """The fastrev checkout that holds the current directory, if any."""
    for d in [Path.cwd(), *Path.cwd().parents]:
        pp = d / "pyproject.toml"
        if pp.is_file() and (d / "bench").is_dir():
            try:
                if 'name = "fastrev"' in pp.read_text():
                    return d
            except OSError:
                pass
    return None


def _check_agreement(bench: str, device, providers) -> dict:
    """Max relative error of x̂₀ (and of x_{t−1} for the deterministic DDIM) of each provider against fastrev's,
    fp32, same inputs. A sanity check that every provider runs the same work (not a speed)."""
    work = WORKS[bench]
    inp = make_inputs(work, SHAPES[0], torch.float32, _resolve_device(device), 1, seed=7)[0]
    ref = _fastrev_fn(work, device)(inp)
    errs = {}
    for p in providers:
        if p == "fastrev":
            continue
        try:
            fn = _provider_fn(p, work, device, torch.float32)
            prev, x0 = fn(inp)[:2]
        except Unavailable:
            continue
        except Exception as e:  # a provider that cannot even run is reported by the timing pass
            errs[p] = f"failed: {type(e).__name__}"
            continue
        pairs = [(x0, ref.pred_original_sample)]
        if work.kind == "ddim":
            pairs.append((prev, ref.prev_sample))
        e = 0.0
        for a, b in pairs:
            a, b = a.double(), b.double()
            e = max(e, float((a - b).norm() / b.norm().clamp_min(1e-30)))
        errs[p] = e
    return errs


# ------------------------------------------------------------------------------------------------ kernel report
def _kernel_stats(ck) -> str:
    """One compiled variant (a triton CompiledKernel) → two report lines."""
    try:
        ck._init_handles()             # loads the binary: fills n_regs / n_spills (needs the driver)
    except Exception:
        pass
    asm = ck.asm
    ttgir = asm["ttgir"] if "ttgir" in asm else ""
    ptx = asm["ptx"] if "ptx" in asm else ""
    src = getattr(ck, "src", None)
    consts = {}
    if src is not None and hasattr(src, "constants"):
        for k, v in src.constants.items():
            name = src.fn.arg_names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)
            if name.isupper() and name not in ("B", "N"):
                consts[name] = v
    sig = getattr(src, "signature", {}) or {}
    types = "/".join(str(sig.get(n, "?")) for n in ("x_ptr", "out_ptr", "prev_ptr"))
    md = ck.metadata

    def count(pattern):
        return len(re.findall(pattern, ptx))
    stats = {
        "regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None),
        "shared_B": getattr(md, "shared", None), "warps": getattr(md, "num_warps", None),
        "convert_layout": ttgir.count("convert_layout"), "local_alloc": ttgir.count("local_alloc"),
        "ld.v4": count(r"ld\.global[\w.]*\.v4"), "ld.v2": count(r"ld\.global[\w.]*\.v2"),
        "ld.scalar": count(r"ld\.global(?![\w.]*\.v[24])[\w.]*\s"),
        "st.v4": count(r"st\.global[\w.]*\.v4"), "st.v2": count(r"st\.global[\w.]*\.v2"),
        "st.scalar": count(r"st\.global(?![\w.]*\.v[24])[\w.]*\s"),
        "shared_ld/st": count(r"(?:ld|st)\.shared"), "bar.sync": count(r"bar\.sync"),
        "mul.hi": count(r"mul\.hi\.u32"), "lg2.approx": count(r"lg2\.approx"),
        "sin/cos.approx": count(r"(?:sin|cos)\.approx"), "ex2.approx": count(r"ex2\.approx"),
        "ptx_lines": ptx.count("\n"),
    }
    return (f"- {types} " + " ".join(f"{k}={v}" for k, v in consts.items()) + "\n    " +
            " ".join(f"{k}={v}" for k, v in stats.items()))


def kernel_report() -> str:
    """What the compiler made of every variant of the fused kernel compiled in this process (CUDA): registers,
    spills, shared memory, layout conversions in TTGIR (shared_B > 0 with bar.sync: a shared-memory round trip),
    and static counts of vector vs scalar global accesses and special-function instructions in the PTX (libdevice's
    accurate log/sin/cos show no .approx). Costs no device time beyond the run."""
    try:
        from .kernels import reverse_step as K
    except Exception as e:  # pragma: no cover
        return f"kernel report unavailable: {e}\n"
    fn = K._reverse_step_kernel
    lines = ["fused kernel variants compiled in this run (static PTX counts, not dynamic):"]
    for dev, caches in getattr(fn, "device_caches", {}).items():
        cache = caches[0] if isinstance(caches, tuple) else caches
        for ck in list(getattr(cache, "values", lambda: [])()):
            try:
                lines.append(_kernel_stats(ck))
            except Exception as e:  # pragma: no cover - report, never fail the run
                lines.append(f"- (variant not readable: {type(e).__name__}: {e})")
    if len(lines) == 1:
        lines.append("(none: the kernel did not run in this process)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ reporting
def _derive(results: list, copy_gbps: float) -> None:
    """frac_copy for each step entry; speedup_vs (and speedup_vs_wall) for fastrev entries."""
    by_key = {}
    for r in results:
        if r["bench"] in STEP_BENCHES:
            by_key.setdefault((r["bench"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    for r in results:
        if r.get("gbps") is not None and copy_gbps:
            r["frac_copy"] = r["gbps"] / copy_gbps
    for group in by_key.values():
        f = group.get("fastrev")
        if not f:
            continue
        f["speedup_vs"] = {p: r["median_us"] / f["median_us"] for p, r in group.items() if p != "fastrev"}
        if f.get("wall_us"):
            f["speedup_vs_wall"] = {p: r["wall_us"] / f["wall_us"] for p, r in group.items()
                                    if p != "fastrev" and r.get("wall_us")}


def _fmt(v, spec="{:.1f}", missing="—"):
    return missing if v is None else spec.format(v)


def markdown(doc: dict) -> str:
    res = doc["results"]
    lines = [f"## {doc['device']} ({doc.get('device_name', '')}) — {doc['date']}", "",
             f"torch {doc['torch']}, triton {doc['triton']}, {doc.get('threads')} torch threads on {doc.get('cpus')} "
             f"CPUs (load average {_fmt((doc.get('loadavg_start') or [None])[0], '{:.1f}')} at start, "
             f"{_fmt((doc.get('loadavg_end') or [None])[0], '{:.1f}')} at end); "
             f"copy ceiling **{doc['copy_gbps']:.1f} GB/s** (dst.copy_(src) of {doc.get('copy_bytes', 0) >> 20} MiB, "
             "read + write counted).", ""]
    for n in doc.get("notes", []):
        lines.append(f"- {n}")
    lines += [f"- {BYTES_NOTE}", ""]
    step = [r for r in res if r["bench"] in STEP_BENCHES]
    if step:
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in step)]
        others = [p for p in provs if p != "fastrev"]
        head = (["bench", "shape", "dtype", "MB moved"] + [f"{p} µs" for p in provs] +
                ["fastrev GB/s", "× copy"] + [f"vs {p}" for p in others])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        keys = []
        for r in step:
            k = (r["bench"], r["shape"], r["dtype"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            g = {r["provider"]: r for r in step if (r["bench"], r["shape"], r["dtype"]) == k}
            f = g.get("fastrev", {})
            any_r = next(iter(g.values()))
            row = [k[0], k[1], k[2], f"{any_r['bytes'] / 1e6:.2f}"]
            row += [_fmt(g[p]["median_us"]) if p in g else "—" for p in provs]
            row += [_fmt(f.get("gbps")), _fmt(f.get("frac_copy"), "{:.2f}")]
            row += [_fmt(f.get("speedup_vs", {}).get(p), "{:.2f}×") for p in others]
            lines.append("| " + " | ".join(row) + " |")
        comp = [r for r in step if r.get("compile_s") is not None]
        if comp:
            lines += ["", "compile warm-up (first call, s): " + ", ".join(
                f"{r['bench']} {r['shape']} {r['dtype']}: {r['compile_s']:.1f}" for r in comp)]
        if any(r.get("speedup_vs_wall") for r in step) and doc.get("device") != "cpu":
            lines += ["", "Back-to-back wall time per call (host overhead included), fastrev speedup:"]
            for r in step:
                if r["provider"] == "fastrev" and r.get("speedup_vs_wall"):
                    lines.append(f"- {r['bench']} {r['shape']} {r['dtype']}: fastrev {r['wall_us']:.1f} µs; " +
                                 ", ".join(f"{p} {v:.2f}×" for p, v in r["speedup_vs_wall"].items()))
    loop = [r for r in res if r["bench"] == "loop"]
    if loop:
        lines += ["", f"Loop: {loop[0].get('steps', LOOP_STEPS)} DDPM steps with a 2-conv model, "
                      f"{loop[0]['shape']} {loop[0]['dtype']}; overhead = (loop − model alone) / steps.", "",
                  "| provider | loop ms | per step µs | sampler overhead µs/step |", "|---|---|---|---|"]
        for r in loop:
            lines.append(f"| {r['provider']} | {r['median_us'] / 1e3:.2f} | {r['per_step_us']:.1f} | "
                         f"{_fmt(r.get('overhead_us_per_step'))} |")
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(
            f"{s.get('bench', '')} {s.get('shape', '')} {s.get('dtype', '')} {s['provider']}: {s['reason']}".strip()
            for s in _dedupe_skips(doc["skipped"]))]
    if doc.get("check"):
        lines += ["", "Same-work check (fp32, rel. error of x̂₀ vs fastrev; DDIM also x_{t-1}): " + "; ".join(
            f"{b}: " + ", ".join(f"{p} {_fmt(e, '{:.1e}') if isinstance(e, float) else e}" for p, e in d.items())
            for b, d in doc["check"].items())]
    return "\n".join(lines) + "\n"


def _dedupe_skips(skips):
    """Collapse identical (provider, reason) skips over many cases into one line."""
    seen = {}
    for s in skips:
        key = (s["provider"], s["reason"])
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = dict(s, count=1)
    out = []
    for s in seen.values():
        if s["count"] > 1:
            out.append({"provider": s["provider"], "reason": f"{s['reason']} ({s['count']} cases)"})
        else:
            out.append(s)
    return out


def plot(doc: dict, path: Path) -> Optional[Path]:
    """GB/s against bytes moved per provider, one panel per (bench, dtype); the copy ceiling dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except Exception:
        return None
    step = [r for r in doc["results"] if r["bench"] in STEP_BENCHES and r.get("gbps")]
    if not step:
        return None
    benches = [b for b in STEP_BENCHES if any(r["bench"] == b for r in step)]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in step)]
    fig, axes = plt.subplots(len(benches), len(dtypes), figsize=(max(6.0, 4.2 * len(dtypes)), 3.2 * len(benches)),
                             squeeze=False, sharey=True)
    markers = dict(fastrev="o", eager="s", compile="^", diffusers="v")
    for i, b in enumerate(benches):
        for j, d in enumerate(dtypes):
            ax = axes[i][j]
            for p in PROVIDERS:
                pts = sorted((r["bytes"], r["gbps"]) for r in step
                             if r["bench"] == b and r["dtype"] == d and r["provider"] == p)
                if pts:
                    ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], marker=markers.get(p, "o"), label=p)
            ax.axhline(doc["copy_gbps"], ls="--", color="gray", lw=1, label="copy")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{b} {d}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(benches) - 1:
                ax.set_xlabel("MB moved per step (minimum)")
            if j == 0:
                ax.set_ylabel("effective GB/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fastrev bench — {doc['device']} — {doc['date'][:10]} (torch {doc['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def _csv(s, cast=str):
    return [cast(v.strip()) for v in s.split(",") if v.strip()] if s else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrev bench", description=(
        "Time the fused reverse step against naive elementwise PyTorch (eager), torch.compile and diffusers; write "
        "bench/results/<device>-<date>.json, append a table to bench/RESULTS.md and plot GB/s against size."))
    p.add_argument("--quick", action="store_true", help="a small plan (about a minute on a 2-core CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON and PNG go (default: bench/results in a fastrev checkout, else .)")
    p.add_argument("--markdown", default=None,
                   help="markdown file the table is appended to (default: bench/RESULTS.md in a checkout, else "
                        "./RESULTS.md); 'none' to skip")
    p.add_argument("--benches", default=None, help=f"comma list of {','.join(BENCHES)}")
    p.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)}")
    p.add_argument("--loop-providers", default=None, help=f"comma list of {','.join(LOOP_PROVIDERS)}")
    p.add_argument("--shapes", default=None, help="comma list like 1x4x64x64,4x4x128x128")
    p.add_argument("--dtypes", default=None, help="comma list of float32,bfloat16,float16")
    p.add_argument("--compile-shapes", default=None, help="restrict the compile provider to these shapes")
    p.add_argument("--loop-shape", default=None, help="shape of the sampling loop (default 1x4x64x64)")
    p.add_argument("--loop-steps", type=int, default=LOOP_STEPS)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-check", action="store_true", help="skip the same-work agreement check")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (the rest is reported as skipped)")
    p.add_argument("--kernel-report", default=None,
                   help="CUDA: write registers/spills/layout conversions/vector widths of the fused kernel's variants here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="explicit JSON path (default <out-dir>/<device>-<date>.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    plan = default_plan(device, args.quick)
    benches = _csv(args.benches) or list(plan["benches"])
    providers = _csv(args.providers) or list(plan["providers"])
    shapes = _csv(args.shapes, parse_shape) or [tuple(s) for s in plan["shapes"]]
    dtypes = [_dtype_name(d) for d in (_csv(args.dtypes) or plan["dtypes"])]
    compile_shapes = _csv(args.compile_shapes, parse_shape)
    if compile_shapes is None and plan.get("compile_shapes"):
        # the plan restricts compile (CPU --quick): to its shapes among those that run, else the first that runs
        compile_shapes = [s for s in shapes if s in [tuple(c) for c in plan["compile_shapes"]]] or shapes[:1]
    loop_shape = parse_shape(args.loop_shape) if args.loop_shape else tuple(plan["loop_shape"])
    for b in benches:
        if b not in BENCHES:
            raise SystemExit(f"--benches: unknown bench {b!r} (choose from {', '.join(BENCHES)})")
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: unknown provider {p!r} (choose from {', '.join(PROVIDERS)})")
    loop_providers = _csv(args.loop_providers) or [
        p for p in LOOP_PROVIDERS if (device.type == "cuda" or not p.endswith("+graph"))
        and (p.split("+")[0] in ("model",) or p.split("+")[0] in providers)]
    timing = Timing.for_mode(args.quick)

    env = _env_info(device)
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: `fastrev` here is the op with backend='auto', i.e. the float64 PyTorch reference path "
                     "(plus counter-noise Philox in int64 ops), NOT the fused Triton kernel (which runs on CUDA); "
                     "its CPU figures say nothing about the kernel. Times are medians of repeated perf_counter runs.")
    else:
        notes.append("CUDA run: `fastrev` is the fused Triton kernel; median_us from triton.testing.do_bench "
                     "(event-timed, L2 flushed before each call, median); wall_us = back-to-back calls, host "
                     "overhead included.")
    if args.quick:
        notes.append("--quick: reduced plan (shapes " + ", ".join(shape_label(s) for s in shapes) + "; dtypes " +
                     ", ".join(dtypes) + (f"; compile only at {', '.join(shape_label(s) for s in compile_shapes)}"
                                          if compile_shapes and 'compile' in providers else "") + ").")
    ok, dv = diffusers_available()
    notes.append(f"diffusers {dv}" if ok else f"diffusers missing: {dv}")
    print(f"fastrev bench on {env['device']} ({env['device_name']}), torch {env['torch']}, triton {env['triton']}",
          flush=True)

    copy = measure_copy(device, timing=timing)
    print(f"copy ceiling: {copy['copy_gbps']:.1f} GB/s", flush=True)
    results, skipped = [], []
    root = _repo_root()
    out_dir = Path(args.out_dir) if args.out_dir else (root / "bench" / "results" if root else Path.cwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{env['device']}-{env['date'][:10]}"
    json_path = Path(args.json) if args.json else out_dir / f"{stem}.json"

    def build_doc():
        return {"device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
                "copy_gbps": copy["copy_gbps"], "results": results,
                "device_name": env["device_name"], "python": env["python"], "threads": env["threads"],
                "cpus": env["cpus"], "loadavg_start": env["loadavg"],
                "loadavg_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
                "copy_bytes": copy["copy_bytes"], "bytes_note": BYTES_NOTE,
                "works": {b: WORKS[b].what for b in STEP_BENCHES if b in benches},
                "bytes_per_elem": {b: {d: WORKS[b].bytes_per_elem(d) for d in dtypes} for b in STEP_BENCHES
                                   if b in benches},
                "plan": {"quick": args.quick, "shapes": [shape_label(s) for s in shapes], "dtypes": dtypes,
                         "providers": providers, "loop_providers": loop_providers,
                         "loop_shape": shape_label(loop_shape),
                         "compile_shapes": [shape_label(s) for s in compile_shapes] if compile_shapes else None},
                "notes": notes, "skipped": skipped, "check": check,
                "elapsed_s": time.perf_counter() - t_start}

    def checkpoint():
        """Rewrite the JSON after every case (marked partial), so that a run cut off by a time limit keeps what it
        measured; the final write below replaces it."""
        d = dict(build_doc(), partial=True)
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=1, default=str) + "\n")
        tmp.replace(json_path)

    def over_budget():
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    check = {}

    def _run_cases():
        if not args.no_check:
            for b in benches:
                if b in STEP_BENCHES and "fastrev" in providers:
                    try:
                        check[b] = _check_agreement(b, device, [p for p in providers if p != "compile"])
                    except Exception as e:   # fastrev itself failed: the timing pass reports it per case
                        check[b] = {"fastrev": f"failed: {type(e).__name__}: {str(e)[:200]}"}
                        print(f"  check {b}: fastrev FAILED {type(e).__name__}: {e}", flush=True)
                        continue
                    bad = {p: e for p, e in check[b].items() if not isinstance(e, float) or e > 1e-3}
                    if bad:
                        print(f"WARNING: providers disagree with fastrev on {b}: {bad}", flush=True)

        if "loop" in benches:
            floors = {}
            for lp in loop_providers:
                key = dict(bench="loop", shape=shape_label(loop_shape), dtype="float32", provider=lp)
                if over_budget():
                    skipped.append(dict(key, reason="time budget"))
                    continue
                try:
                    lc = make_loop(lp, loop_shape, device, args.loop_steps)
                    m = measure_loop(lc, timing)
                except Unavailable as e:
                    skipped.append(dict(key, reason=str(e)))
                    continue
                except Exception as e:
                    skipped.append(dict(key, reason=f"failed: {type(e).__name__}: {str(e)[:200]}"))
                    print(f"  loop {lp}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                finally:
                    lc = None
                    gc.collect()
                r = dict(key, median_us=m["median_us"], gbps=None, steps=args.loop_steps, per_step_us=m["per_step_us"])
                if lp.startswith("model"):
                    floors["+graph" if lp.endswith("+graph") else ""] = m["median_us"]
                results.append(r)
                checkpoint()
                print(f"  loop {lp:14s} {m['median_us'] / 1e3:9.2f} ms  {m['per_step_us']:8.1f} us/step", flush=True)
            for r in results:
                if r["bench"] == "loop" and not r["provider"].startswith("model"):
                    floor = floors.get("+graph" if r["provider"].endswith("+graph") else "")
                    if floor is not None:
                        r["overhead_us_per_step"] = (r["median_us"] - floor) / r["steps"]

        # every provider but compile first (all dtypes), then the compile cases (their warm-ups are the long part):
        # when --budget-s runs out, what is lost is compile cases, not whole dtypes
        plan_cases = [(dtype, b, shape, p)
                      for phase in ([p for p in providers if p != "compile"], [p for p in providers if p == "compile"])
                      for dtype in dtypes for b in benches if b in STEP_BENCHES for shape in shapes for p in phase]
        for dtype, b, shape, p in plan_cases:
            key = dict(bench=b, shape=shape_label(shape), dtype=dtype, provider=p)
            if p == "compile" and compile_shapes and shape not in compile_shapes:
                skipped.append(dict(key, reason="compile restricted to " +
                                    ",".join(shape_label(s) for s in compile_shapes)))
                continue
            if over_budget():
                skipped.append(dict(key, reason="time budget"))
                continue
            try:
                m = run_step_case(b, shape, dtype, p, device, timing)
            except Unavailable as e:
                skipped.append(dict(key, reason=str(e)))
                continue
            except Exception as e:   # a provider that fails here is reported, the run goes on
                skipped.append(dict(key, reason=f"failed: {type(e).__name__}: {str(e)[:200]}"))
                print(f"  {b} {key['shape']} {dtype} {p}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            nbytes = bytes_moved(b, shape, dtype)
            r = dict(key, median_us=m["median_us"], gbps=nbytes / (m["median_us"] * 1e-6) / 1e9,
                     wall_us=m["wall_us"], bytes=nbytes)
            for extra in ("reps", "compile_s", "input_sets"):
                if m.get(extra) is not None:
                    r[extra] = m[extra]
            results.append(r)
            checkpoint()
            print(f"  {b:18s} {key['shape']:>12s} {dtype:8s} {p:9s} {m['median_us']:11.1f} us "
                  f"{r['gbps']:8.1f} GB/s  (wall {m['wall_us']:.1f} us"
                  + (f", compile {m['compile_s']:.1f} s" if m.get("compile_s") is not None else "") + ")",
                  flush=True)

    try:
        _run_cases()
    except KeyboardInterrupt:          # gpu_check.sh's timeout sends SIGINT: keep and write what was measured
        notes.append("interrupted (SIGINT / time limit): the cases not reached are missing")
        print("interrupted: writing what was measured", flush=True)

    _derive(results, copy["copy_gbps"])
    doc = build_doc()
    if not args.no_plot:
        png = plot(doc, out_dir / f"{stem}.png")
        doc["plot"] = png.name if png else None
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    if (args.markdown or "").lower() != "none":
        md_path = Path(args.markdown) if args.markdown else (root / "bench" / "RESULTS.md" if root
                                                             else Path.cwd() / "RESULTS.md")
        md_path.parent.mkdir(parents=True, exist_ok=True)
        new = not md_path.exists() or md_path.stat().st_size == 0
        with md_path.open("a") as fh:
            if new:
                fh.write("# fastrev benchmark results\n\nAppended by `fastrev bench` (fastrev/bench.py); newest last.\n")
            fh.write("\n" + md)
    if args.kernel_report and device.type == "cuda":
        rep = kernel_report()
        Path(args.kernel_report).write_text(rep)
        print(rep, flush=True)
    print("\n" + md, flush=True)
    print(f"wrote {json_path}" + (f" and {out_dir / doc['plot']}" if doc.get("plot") else "") +
          f" in {doc['elapsed_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
