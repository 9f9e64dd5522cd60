"""The registry of benchmarked steps: one small :class:`StepBench` entry per step.

An entry says how to build the inputs, how many bytes the step must move per element, and how to build each
provider's callable: ``fastrev`` (required), ``diffusers`` (the step it replaces, if any) and ``eager`` (the naive
op-by-op PyTorch version, which the ``compile`` provider also compiles). Builders take ``(device, dtype)`` and return a
function of one :class:`Inputs` that returns ``(x_{t−1}, x̂₀)`` (a tuple, or an object with ``prev_sample`` and
``pred_original_sample``).

The entries live in modules named ``fastrev/bench/steps_<family>.py`` (``steps_ddpm_ddim``, ``steps_dropins``),
imported automatically in name order: a new family of steps is a new module, with no edit here. For example, a
``fastrev/bench/steps_euler.py``::

    from .registry import StepBench, register, scheduler_step

    register(StepBench(
        name="euler_step", what="Euler step, ε-prediction, σ at t=500 of 1000", reads=2, writes=2,
        fastrev=scheduler_step(make_fast_euler, "euler", exact=False),      # (device, dtype) -> fn(Inputs)
        diffusers=scheduler_step(make_diffusers_euler, "euler", exact=False),  # or None: no counterpart
        eager=lambda device, dtype: lambda x, t, out: naive_euler(x, t, out),  # or None; compile compiles it
        compare_prev=("diffusers",),               # their x_{t−1} must equal fastrev's (same noise or none)
    ))

Bytes moved: ``reads`` + ``writes`` full-size tensors per output element, times the storage itemsize. What is counted
and why is explained once, in docs/benchmarks.md ("Bytes moved"); entries only state their counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import reference as R
from ..schedule import Schedule, spaced_timesteps
from .common import DDIM_STEPS, NUM_TRAIN, SEED, T_STEP, Unavailable, numel, parse_shape, require_diffusers, to_dtype

Builder = Callable[[torch.device, torch.dtype], Callable]

BYTES_DOC = "docs/benchmarks.md#bytes-moved"


@dataclass
class Inputs:
    x: torch.Tensor           # x_t [B, C, H, W]
    out: torch.Tensor         # model output [B, C·model_channels, H, W]
    t: torch.Tensor           # int64 [B]: the entry's t_index on the device (the ops' schedule row)


@dataclass(frozen=True)
class StepBench:
    """One benchmarked step. See the module docstring for the builders' contract."""
    name: str
    what: str                                  # one line: the work, as the report prints it
    reads: int                                 # full-size tensors read per output element
    writes: int                                # full-size tensors written (x_{t−1}, x̂₀)
    fastrev: Builder
    diffusers: Optional[Builder] = None
    eager: Optional[Builder] = None            # f(x, t, out) -> (prev, x0); compile compiles this one
    model_channels: int = 1                    # model-output channels per sample channel (2: learned variances)
    t_index: int = T_STEP                      # value of Inputs.t (the ops' schedule row)
    compare_prev: tuple = ()                   # providers whose x_{t−1} equals fastrev's (no noise, or the same noise)
    group: str = "ops"                         # report section: "ops" or "drop-in"
    make_inputs: Optional[Callable[..., Inputs]] = None   # (shape, dtype, device, generator) -> Inputs

    def bytes_per_elem(self, dtype) -> int:
        return (self.reads + self.writes) * to_dtype(dtype).itemsize

    def bytes_moved(self, shape, dtype) -> int:
        return numel(shape) * self.bytes_per_elem(dtype)

    def inputs(self, shape, dtype, device, generator) -> Inputs:
        if self.make_inputs is not None:
            return self.make_inputs(shape, dtype, device, generator)
        return default_inputs(shape, dtype, device, generator, self.model_channels, self.t_index)

    def builder(self, provider: str) -> Builder:
        """The builder of ``provider`` (compile: the eager one); :class:`Unavailable` when the entry has none."""
        b = {"fastrev": self.fastrev, "diffusers": self.diffusers, "eager": self.eager,
             "compile": self.eager}.get(provider)
        if provider not in ("fastrev", "diffusers", "eager", "compile"):
            raise ValueError(f"provider must be one of fastrev, eager, compile, diffusers; got {provider!r}")
        if b is None:
            raise Unavailable(f"{self.name} has no {provider} counterpart")
        return b


REGISTRY: dict[str, StepBench] = {}


def register(entry: StepBench, *, replace: bool = False) -> StepBench:
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"a step benchmark named {entry.name!r} is already registered")
    if entry.name == "loop":
        raise ValueError("'loop' is the sampling-loop benchmark's name")
    REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get(name: str) -> StepBench:
    _discover()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown bench {name!r} (choose from {', '.join(list(REGISTRY) + ['loop'])})") from None


def as_pair(r: Any) -> tuple:
    """A provider's result → (prev, x0)."""
    if isinstance(r, (tuple, list)):
        return r[0], r[1]
    return r.prev_sample, r.pred_original_sample


def default_inputs(shape, dtype, device, generator, model_channels: int = 1, t_index: int = T_STEP) -> Inputs:
    """x_t ~ N(0, 1); ε ~ N(0, 1) (plus uniform(−1, 1) variance values for a 2C-channel output)."""
    shape = parse_shape(shape)
    dtype = to_dtype(dtype)
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if model_channels == 2:
        v = torch.rand(shape, generator=generator, device=device, dtype=torch.float32) * 2 - 1
        eps = torch.cat([eps, v], dim=1)
    t = torch.full((shape[0],), t_index, dtype=torch.int64, device=device)
    return Inputs(x, eps.to(dtype), t)


# ------------------------------------------------------------------------------------------------ shared pieces
@functools.lru_cache(maxsize=None)
def schedules():
    """(the 1000-step linear schedule, its 50 leading steps, the row of t=500 in those)."""
    base = Schedule.linear(NUM_TRAIN)
    ddim = base.respace(spaced_timesteps(NUM_TRAIN, DDIM_STEPS, "leading"))
    ddim_t = int((ddim.timesteps == T_STEP).nonzero()[0, 0])
    return base, ddim, ddim_t


def _tables(sched, device, dtype):
    return sched.alpha_bars.to(device=device, dtype=dtype), sched.betas.to(device=device, dtype=dtype)


def eager_ddpm(variance_type: str = "fixed_small"):
    """The naive DDPM step: fastrev.reference's formulas op by op in the inputs' dtype, plus torch.randn_like."""
    def build(device, dtype):
        ab, betas = _tables(schedules()[0], device, dtype)

        def f(x, t, out):
            noise = torch.randn_like(x)
            if variance_type in ("learned", "learned_range"):
                C = x.shape[1]
                return R.ddpm_step(x, t, out[:, :C], ab, betas, variance_type=variance_type,
                                   model_var_values=out[:, C:], clip_range=1.0, noise=noise)
            return R.ddpm_step(x, t, out, ab, betas, variance_type=variance_type, clip_range=1.0, noise=noise)
        return f
    return build


def eager_ddim(eta: float):
    def build(device, dtype):
        ab, _ = _tables(schedules()[1], device, dtype)
        if eta == 0:
            return lambda x, t, out: R.ddim_step(x, t, out, ab, eta=0.0, clip_range=1.0)
        return lambda x, t, out: R.ddim_step(x, t, out, ab, eta=eta, clip_range=1.0, noise=torch.randn_like(x))
    return build


_DIFFUSERS_COMMON = dict(num_train_timesteps=NUM_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


def diffusers_scheduler(kind: str, variance_type: str = "fixed_small", num_inference_steps=None):
    """diffusers' DDPMScheduler / DDIMScheduler configured to the benchmarks' work (DDIM: 50 leading steps)."""
    require_diffusers()
    from diffusers import DDIMScheduler, DDPMScheduler
    if kind == "ddim":
        s = DDIMScheduler(**_DIFFUSERS_COMMON, set_alpha_to_one=True)
        s.set_timesteps(num_inference_steps or DDIM_STEPS)
    else:
        s = DDPMScheduler(**_DIFFUSERS_COMMON, variance_type=variance_type)
        if num_inference_steps:
            s.set_timesteps(num_inference_steps)
    return s


def fastrev_dropin(kind: str):
    """fastrev.diffusers' drop-in configured from the diffusers scheduler's config (``from_config``, as a user does)."""
    stock = diffusers_scheduler(kind)
    from ..diffusers import FastDDIMScheduler, FastDDPMScheduler
    s = (FastDDIMScheduler if kind == "ddim" else FastDDPMScheduler).from_config(stock.config)
    if kind == "ddim":
        s.set_timesteps(DDIM_STEPS)
    s.noise_seed = SEED                       # fast mode: a fixed counter-stream seed
    return s


def scheduler_step(make: Callable, kind: str, *, exact: bool, eta: float = 0.0):
    """Builder of ``scheduler.step(out, 500, x, ...)`` with a Python int timestep (diffusers' fastest path); exact
    mode passes a generator seeded with SEED (built with the callable, so two fresh builds draw the same noise)."""
    def build(device, dtype):
        s = make()
        g = torch.Generator(device=device).manual_seed(SEED) if exact else None
        kw = dict(eta=eta) if kind == "ddim" else {}
        return lambda inp: s.step(inp.out, T_STEP, inp.x, generator=g, return_dict=False, **kw)
    return build


def step_benches() -> list:
    """The registered steps, in registration order (the order of the reports)."""
    _discover()
    return list(REGISTRY)


_DISCOVERED = False


def _discover() -> None:
    """Import every ``fastrev.bench.steps_*`` module once: each registers its entries. A new family of steps is a
    new module (no edit here), so helpers working in parallel never touch the same file."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import importlib
    import pkgutil

    from . import __path__ as pkg_path
    for m in sorted(pkgutil.iter_modules(pkg_path), key=lambda m: m.name):
        if m.name.startswith("steps_"):
            importlib.import_module(f"{__package__}.{m.name}")


__all__ = ["StepBench", "Inputs", "REGISTRY", "register", "unregister", "get", "as_pair", "default_inputs",
           "schedules", "diffusers_scheduler", "fastrev_dropin", "scheduler_step", "eager_ddpm", "eager_ddim",
           "step_benches", "BYTES_DOC"]
