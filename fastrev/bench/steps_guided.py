"""Benchmarked steps: classifier-free guidance fused into the DDPM step.

``fastrev.ddpm_step(model_output=[2B, …], guidance_scale=w)`` combines the unconditional and conditional halves
(unconditional first, as diffusers' pipelines batch them) in the step's single pass, against what diffusers'
pipelines do — ``uncond + w·(cond − uncond)`` as a separate torch expression, then ``DDPMScheduler.step`` — and the
naive eager version (the same combine, then the eager DDPM step). Bytes per element: x_t, the two halves read,
x_{t−1} and x̂₀ written (20 B in fp32); the separate combine alone moves another 12 B (two reads, one write) on top of
the 16 B of the plain step, which is what the count exposes.
"""

import torch

from ..ops import ddpm_step
from .common import SEED, T_STEP
from .registry import Inputs, StepBench, diffusers_scheduler, eager_ddpm, register, schedules

GUIDANCE = 7.5      # SD's usual guidance scale


def _inputs(shape, dtype, device, generator) -> Inputs:
    """x_t ~ N(0, 1) [B, …]; model output [2B, …] ~ N(0, 1) (unconditional half first); t = 500 per sample."""
    from .common import parse_shape, to_dtype
    shape, dtype = parse_shape(shape), to_dtype(dtype)
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    out = torch.randn((2 * shape[0],) + shape[1:], generator=generator, device=device, dtype=torch.float32)
    t = torch.full((shape[0],), T_STEP, dtype=torch.int64, device=device)
    return Inputs(x, out.to(dtype), t)


def _combine(out: torch.Tensor) -> torch.Tensor:
    """diffusers' pipelines' classifier-free guidance: chunk the [2B] batch, uncond + w·(cond − uncond)."""
    uncond, cond = out.chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def _fastrev(device, dtype):
    base = schedules()[0]
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)   # a device tensor: no host→device per call
    return lambda inp: ddpm_step(inp.out, inp.t, inp.x, base, clip_sample=True, seed=seed, guidance_scale=GUIDANCE)


def _diffusers(device, dtype):
    s = diffusers_scheduler("ddpm")
    return lambda inp: s.step(_combine(inp.out), T_STEP, inp.x, return_dict=False)


def _eager(device, dtype):
    step = eager_ddpm()(device, dtype)
    return lambda x, t, out: step(x, t, _combine(out))


register(StepBench(
    "guided_ddpm_step", f"fastrev.ddpm_step with fused classifier-free guidance (w={GUIDANCE}, [2B] model output) vs "
    "the pipelines' combine + DDPMScheduler.step: ε, fixed_small, x̂₀ clipped, noise added, t=500",
    reads=3, writes=2,
    model_channels=2,      # the [2B] output is twice the sample's size: sizes the cache-overflowing input rotation
    make_inputs=_inputs,
    fastrev=_fastrev, diffusers=_diffusers, eager=_eager))
