"""Benchmarked steps: the Euler-family drop-ins (``fastrev.diffusers_euler``) beside the diffusers class each replaces
and a naive eager version of the same step.

All three run step 25 of a 50-step chain (diffusers' default spacing). These schedulers keep a step index, so every
callable sets it back to 25 before its step (``scheduler._step_index = 25``: diffusers' attribute, and the drop-in's
setter of its device counter), and every timed call runs the same step. The Euler step (no churn) and the flow step
(no stochastic sampling) are deterministic, so exact and fast mode are the same step and their x_{t−1} is compared
with diffusers' and the eager one's; Euler-ancestral is run in exact mode (a generator on both sides: the same noise,
x_{t−1} compared with diffusers') and in fast mode (counter noise in the step; x̂₀ compared).

Flow matching returns no x̂₀ (``FlowMatchEulerDiscreteScheduler.step`` gives ``prev_sample`` only): its callables
return ``(prev, prev)`` and the entry counts one write (12 B per element in fp32).
"""

import torch

from .common import NUM_TRAIN, SEED
from .registry import StepBench, register

STEPS = 50          # the chain: set_timesteps(50)
INDEX = 25          # the step every call runs (Inputs.t holds it: the eager version's row of the σ table)

_EULER_CONFIG = dict(num_train_timesteps=NUM_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                     prediction_type="epsilon")
_FLOW_CONFIG = dict(num_train_timesteps=NUM_TRAIN, shift=1.0)


def _stock(kind: str):
    """diffusers' scheduler of ``kind`` ("euler", "euler_a", "flow"), unset."""
    from .common import require_diffusers
    require_diffusers()
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(**_FLOW_CONFIG)
    return (EulerDiscreteScheduler if kind == "euler" else EulerAncestralDiscreteScheduler)(**_EULER_CONFIG)


def _fast(kind: str):
    """The drop-in, built with ``from_config`` of diffusers' config (as a user swaps it in)."""
    stock = _stock(kind)
    from ..diffusers import (
        FastEulerAncestralDiscreteScheduler,
        FastEulerDiscreteScheduler,
        FastFlowMatchEulerDiscreteScheduler,
    )
    cls = {"euler": FastEulerDiscreteScheduler, "euler_a": FastEulerAncestralDiscreteScheduler,
           "flow": FastFlowMatchEulerDiscreteScheduler}[kind]
    s = cls.from_config(stock.config)
    s.noise_seed = SEED                        # fast mode: a fixed counter-stream seed
    return s


def _step(make, kind: str, *, exact: bool):
    """Builder of ``scheduler.step(out, timesteps[25], x, ...)`` with the step index reset to 25 on every call and a
    Python float timestep; exact mode passes a generator seeded with SEED (built with the callable, so two fresh
    builds draw the same noise)."""
    def build(device, dtype):
        s = make(kind)
        s.set_timesteps(STEPS, device=device)
        s.is_scale_input_called = True         # the sample is taken as already scaled (no warning per call)
        t = float(s.timesteps[INDEX])
        g = torch.Generator(device=device).manual_seed(SEED) if exact else None

        def f(inp):
            s._step_index = INDEX
            r = s.step(inp.out, t, inp.x, generator=g, return_dict=False)
            return (r[0], r[0]) if kind == "flow" else (r[0], r[1])
        return f
    return build


def _sigmas(kind: str, device, dtype) -> torch.Tensor:
    s = _stock(kind)
    s.set_timesteps(STEPS, device=device)
    return s.sigmas.to(device=device, dtype=dtype)


def _eager(kind: str):
    """The naive step, op by op in the storage dtype from diffusers' σ table (row ``Inputs.t``)."""
    def build(device, dtype):
        sig = _sigmas(kind, device, dtype)

        def f(x, t, out):
            s = sig[t].view(-1, *([1] * (x.dim() - 1)))
            s_next = sig[t + 1].view_as(s)
            if kind == "flow":
                prev = x + (s_next - s) * out
                return prev, prev
            x0 = x - s * out
            d = (x - x0) / s
            if kind == "euler":
                return x + d * (s_next - s), x0
            s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
            s_down = (s_next ** 2 - s_up ** 2) ** 0.5
            return x + d * (s_down - s) + torch.randn_like(x) * s_up, x0
        return f
    return build


_LABEL = {"euler": "FastEulerDiscreteScheduler.step vs EulerDiscreteScheduler.step",
          "euler_a": "FastEulerAncestralDiscreteScheduler.step vs EulerAncestralDiscreteScheduler.step",
          "flow": "FastFlowMatchEulerDiscreteScheduler.step vs FlowMatchEulerDiscreteScheduler.step"}

for _kind, _name, _exact, _mode in (("euler", "euler_dropin", False, "deterministic (no churn)"),
                                    ("euler_a", "euler_a_dropin_exact", True, "exact mode (generator)"),
                                    ("euler_a", "euler_a_dropin_fast", False, "fast mode (no generator)"),
                                    ("flow", "flow_euler_dropin", False, "deterministic, velocity, shift 1")):
    register(StepBench(
        _name, f"{_LABEL[_kind]}, {_mode}; step {INDEX} of {STEPS}" + ("" if _kind == "flow" else ", ε"),
        reads=3 if _exact else 2, writes=1 if _kind == "flow" else 2, group="drop-in", t_index=INDEX,
        compare_prev=("diffusers",) if _exact else (() if _kind == "euler_a" else ("diffusers", "eager")),
        fastrev=_step(_fast, _kind, exact=_exact),
        diffusers=_step(_stock, _kind, exact=_exact),
        eager=_eager(_kind)))
