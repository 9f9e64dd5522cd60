"""The sampling-loop benchmark: a few-step DDPM loop with a tiny conv model, per provider, with and without a CUDA
graph; the model alone is the floor, so (loop − model) / steps is each sampler's overhead per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import reference as R
from ..ops import ddpm_step
from ..schedule import Schedule, spaced_timesteps
from .common import LOOP_STEPS, NUM_TRAIN, SEED, Unavailable, parse_shape, resolve_device, sync
from .registry import diffusers_scheduler

LOOP_PROVIDERS = ("model", "fastrev", "eager", "diffusers", "model+graph", "fastrev+graph", "eager+graph")


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
        sync(self.device)
        return r


def make_loop(provider: str, shape=(1, 4, 64, 64), device="auto", steps: int = LOOP_STEPS) -> LoopCase:
    """A ``steps``-step DDPM sampling loop (ε, fixed_small, clipped; 1000 linear-β steps respaced to ``steps``
    leading steps) with :class:`TinyModel`, float32. ``model``: the model alone (the floor); ``+graph``: the whole
    loop captured in one CUDA graph (t read from device tensors)."""
    device = resolve_device(device)
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
        s = diffusers_scheduler("ddpm", "fixed_small", num_inference_steps=steps)

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
