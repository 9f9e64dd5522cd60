"""Benchmarked steps: fastrev's ops (``ddpm_step``, ``ddim_step``, learned_range) against diffusers' schedulers."""

import torch

from ..ops import ddim_step, ddpm_step
from .common import SEED
from .registry import StepBench, diffusers_scheduler, eager_ddim, eager_ddpm, register, scheduler_step, schedules


def _fastrev_op(kind: str, variance_type: str = "fixed_small"):
    def build(device, dtype):
        base, ddim, _ = schedules()
        seed = torch.tensor([SEED], dtype=torch.int64, device=device)   # a device tensor: no host→device per call
        if kind == "ddim":
            return lambda inp: ddim_step(inp.out, inp.t, inp.x, ddim, eta=0.0, clip_sample=True, seed=seed)
        return lambda inp: ddpm_step(inp.out, inp.t, inp.x, base, variance_type=variance_type, clip_sample=True,
                                     seed=seed)
    return build


register(StepBench(
    "ddpm_step", "fastrev.ddpm_step (default: counter noise from a seed) vs DDPMScheduler.step: ε, fixed_small, "
    "x̂₀ clipped to ±1, noise added, t=500 of 1000 linear-β steps", reads=2, writes=2,
    fastrev=_fastrev_op("ddpm"),
    diffusers=scheduler_step(lambda: diffusers_scheduler("ddpm"), "ddpm", exact=False),
    eager=eager_ddpm()))
register(StepBench(
    "ddim_step", "fastrev.ddim_step vs DDIMScheduler.step: η=0, ε, x̂₀ clipped, t=500 of 50 leading steps of 1000",
    reads=2, writes=2, t_index=schedules()[2], compare_prev=("eager", "diffusers"),
    fastrev=_fastrev_op("ddim"),
    diffusers=scheduler_step(lambda: diffusers_scheduler("ddim"), "ddim", exact=False),
    eager=eager_ddim(0.0)))
register(StepBench(
    "learned_range_step", "fastrev.ddpm_step vs DDPMScheduler.step: ε + learned_range variance (2C-channel model "
    "output), x̂₀ clipped, noise added, t=500", reads=3, writes=2, model_channels=2,
    fastrev=_fastrev_op("ddpm", "learned_range"),
    diffusers=scheduler_step(lambda: diffusers_scheduler("ddpm", "learned_range"), "ddpm", exact=False),
    eager=eager_ddpm("learned_range")))
