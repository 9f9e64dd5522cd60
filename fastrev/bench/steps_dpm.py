"""Benchmarked steps: the multistep DPM-Solver drop-in (``fastrev.diffusers_dpm``) beside diffusers'
``DPMSolverMultistepScheduler`` and a naive eager version of the same step.

DPM-Solver++ 2M (``solver_order=2``), 3M (``solver_order=3``) and SDE-DPM-Solver++ 2M, ε-prediction, midpoint, step 25
of a 50-step chain (diffusers' default linspace spacing) at full order. These schedulers carry state — the step index,
the warm-up count ``lower_order_nums`` and the history ``model_outputs`` (the x̂₀ of the previous one or two steps) —
so every call resets it (``_step_index = 25``, ``lower_order_nums = order``, ``model_outputs = [..., m₋₂, m₋₁]``:
diffusers' attributes, which the drop-in keeps with the same meaning) and every timed call runs the same step.

The history rotates with the inputs, like x and the model output: ``Inputs.out`` holds the model output and the
history side by side in the channel dimension, [ε | m₋₁ | m₋₂] (views are passed, nothing is copied), so each input
set reads its own history from memory and the rotation that defeats the caches covers it too.

Bytes per element (docs/benchmarks.md#bytes-moved): 2M reads x, ε, m₋₁ and writes x_{t−1}, x̂₀ (5 tensors: 20 B in
fp32); 3M also reads m₋₂ (24 B); SDE 2M in exact mode also reads the generator's noise (24 B), in fast mode the noise is
generated in the step (20 B). The deterministic steps compare x_{t−1} with diffusers' and the eager one's; SDE exact
with diffusers' (the same generator on both sides); SDE fast compares x̂₀ only (its noise is the counter stream).
diffusers' step returns no x̂₀: its callables return its ``model_outputs[-1]`` (the x̂₀ it keeps), as the drop-in's.
"""

import torch

from .common import NUM_TRAIN, SEED
from .registry import Inputs, StepBench, register

STEPS = 50          # the chain: set_timesteps(50)
INDEX = 25          # the step every call runs (Inputs.t holds it: the eager version's row of the σ table)

_CONFIG = dict(num_train_timesteps=NUM_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
               prediction_type="epsilon", solver_type="midpoint")
_KINDS = {"2m": dict(solver_order=2, algorithm_type="dpmsolver++"),
          "3m": dict(solver_order=3, algorithm_type="dpmsolver++"),
          "sde2m": dict(solver_order=2, algorithm_type="sde-dpmsolver++")}


def _stock(kind: str):
    from .common import require_diffusers
    require_diffusers()
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(**_CONFIG, **_KINDS[kind])


def _fast(kind: str):
    """The drop-in, built with ``from_config`` of diffusers' config (as a user swaps it in)."""
    from ..diffusers import FastDPMSolverMultistepScheduler
    s = FastDPMSolverMultistepScheduler.from_config(_stock(kind).config)
    s.noise_seed = SEED                        # fast mode: a fixed counter-stream seed
    return s


def _order(kind: str) -> int:
    return _KINDS[kind]["solver_order"]


def _inputs(kind: str):
    """x ~ N(0, 1), and ``out`` = [ε | m₋₁ | m₋₂] with ε ~ N(0, 1) and history x̂₀'s ~ N(0, 1)/2 (order − 1 of them)."""
    def make(shape, dtype, device, generator):
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        parts = [torch.randn(shape, generator=generator, device=device, dtype=torch.float32)]
        parts += [0.5 * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                  for _ in range(_order(kind) - 1)]
        t = torch.full((shape[0],), INDEX, dtype=torch.int64, device=device)
        return Inputs(x.to(dtype), torch.cat(parts, dim=1).to(dtype), t)
    return make


def _split(inp: Inputs, order: int):
    """(ε, [m₋₁, m₋₂ ...]) as views of ``inp.out``."""
    C = inp.x.shape[1]
    return inp.out[:, :C], [inp.out[:, C * (j + 1):C * (j + 2)] for j in range(order - 1)]


def _step(make, kind: str, *, exact: bool):
    """Builder of ``scheduler.step(ε, timesteps[25], x, ...)`` at full order with the state reset on every call;
    exact mode passes a generator seeded with SEED (built with the callable, so two fresh builds draw the same
    noise)."""
    order = _order(kind)

    def build(device, dtype):
        s = make(kind)
        s.set_timesteps(STEPS, device=device)
        t = s.timesteps[INDEX]
        g = torch.Generator(device=device).manual_seed(SEED) if exact else None

        def f(inp):
            eps, hist = _split(inp, order)
            s._step_index = INDEX
            s.lower_order_nums = order
            s.model_outputs = [None] + hist[::-1]          # [dropped, ..., m₋₂, m₋₁]: diffusers' order
            prev = s.step(eps, t, inp.x, generator=g, return_dict=False)[0]
            return prev, s.model_outputs[-1]
        return f
    return build


def _eager(kind: str):
    """The naive step, op by op in the storage dtype from diffusers' σ table (row ``Inputs.t``): diffusers' formulas
    (x̂₀ from ε, the D-differences, the midpoint / third-order update, the SDE noise from torch.randn_like)."""
    order = _order(kind)

    def build(device, dtype):
        st = _stock(kind)
        st.set_timesteps(STEPS)
        sig = st.sigmas.to(device=device, dtype=dtype)

        def f(x, t, out):
            eps, hist = _split(Inputs(x, out, t), order)
            shape = (-1,) + (1,) * (x.dim() - 1)
            s = [sig[t + k].view(shape) for k in (1, 0, -1, -2)]             # σ_t, σ_s0, σ_s1, σ_s2
            alpha = [1 / (v**2 + 1) ** 0.5 for v in s]
            sigma = [v * a for v, a in zip(s, alpha, strict=True)]
            lam = [torch.log(a) - torch.log(v) for a, v in zip(alpha, sigma, strict=True)]
            x0 = (x - sigma[1] * eps) / alpha[1]
            h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
            r0, r1 = h0 / h, h1 / h
            m1 = hist[0]
            if order == 2:
                D1 = (1.0 / r0) * (x0 - m1)
                if kind == "sde2m":
                    e2 = 1 - torch.exp(-2.0 * h)
                    prev = (sigma[0] / sigma[1] * torch.exp(-h)) * x + alpha[0] * e2 * x0 + \
                        0.5 * alpha[0] * e2 * D1 + sigma[0] * torch.sqrt(e2) * torch.randn_like(x)
                else:
                    em1 = torch.exp(-h) - 1.0
                    prev = (sigma[0] / sigma[1]) * x - alpha[0] * em1 * x0 - 0.5 * alpha[0] * em1 * D1
                return prev, x0
            D1_0, D1_1 = (1.0 / r0) * (x0 - m1), (1.0 / r1) * (m1 - hist[1])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
            em1 = torch.exp(-h) - 1.0
            prev = (sigma[0] / sigma[1]) * x - alpha[0] * em1 * x0 + alpha[0] * (em1 / h + 1.0) * D1 - \
                alpha[0] * ((em1 + h) / h**2 - 0.5) * D2
            return prev, x0
        return f
    return build


_LABEL = {"2m": "DPM-Solver++ 2M", "3m": "DPM-Solver++ 3M", "sde2m": "SDE-DPM-Solver++ 2M"}

for _kind, _name, _exact, _mode, _reads in (
        ("2m", "dpm_2m_dropin", False, "deterministic", 3),
        ("3m", "dpm_3m_dropin", False, "deterministic", 4),
        ("sde2m", "sde_dpm_2m_dropin_exact", True, "exact mode (generator)", 4),
        ("sde2m", "sde_dpm_2m_dropin_fast", False, "fast mode (no generator)", 3)):
    register(StepBench(
        _name, f"FastDPMSolverMultistepScheduler.step vs DPMSolverMultistepScheduler.step, {_LABEL[_kind]}, {_mode}; "
               f"step {INDEX} of {STEPS}, ε, x̂₀ history read in the step",
        reads=_reads, writes=2, group="drop-in", t_index=INDEX, model_channels=_order(_kind),
        make_inputs=_inputs(_kind),
        compare_prev=("diffusers",) if _exact else (() if _kind == "sde2m" else ("diffusers", "eager")),
        fastrev=_step(_fast, _kind, exact=_exact),
        diffusers=_step(_stock, _kind, exact=_exact),
        eager=_eager(_kind)))
