"""Benchmarked steps: the UniPC drop-in (``fastrev.diffusers_unipc``) beside diffusers' ``UniPCMultistepScheduler``
and a naive eager version of the same step.

UniPC bh2, ε-prediction, predict_x0, corrector on, solver order 2 and 3: step 25 of a 50-step chain (diffusers' default
spacing), in the steady state (warm-up over: the corrector and the predictor at the full order). A UniPC step reads
the history its order needs, so every callable starts from the same fixed history (the earlier x̂₀'s and the last
corrected sample, a fixed function of the input's shape) and is set back to it before each call:

* fastrev: the device step index (``_step_index = 25``) and the call count (the warm-up level; it also fixes which
  history buffers the pass reads and which it writes, so every call reads the same ones);
* diffusers: ``_step_index``, ``model_outputs``, ``last_sample``, ``lower_order_nums``, ``this_order``;
* eager: the corrector and the predictor op by op from the same float64 coefficients (one kernel per term).

Bytes per element (fp32; fp16/bf16 halve them), what the fused pass must move: order 2 reads x, out, last_sample,
m_{−1}, m_{−2} and writes prev, x̂₀ (the next history entry) and the corrected sample (the next last_sample):
8 tensors = 32 B; order 3 also reads m_{−3}: 9 tensors = 36 B. diffusers returns prev only, so each callable returns
``(prev, prev)`` and prev is compared.
"""

import torch

from .common import NUM_TRAIN
from .registry import StepBench, register

STEPS = 50          # the chain: set_timesteps(50)
INDEX = 25          # the step every call runs (Inputs.t holds it)

_CONFIG = dict(num_train_timesteps=NUM_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
               prediction_type="epsilon", solver_type="bh2", predict_x0=True)


def _stock(order: int):
    from .common import require_diffusers
    require_diffusers()
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(**_CONFIG, solver_order=order)


def _fast(order: int):
    """The drop-in, built with ``from_config`` of diffusers' config (as a user swaps it in)."""
    from ..diffusers_unipc import FastUniPCMultistepScheduler
    return FastUniPCMultistepScheduler.from_config(_stock(order).config)


def _history(x: torch.Tensor, order: int):
    """(last_sample, [m_{−1}, m_{−2}, ...]): the fixed history every provider starts each call from (deterministic,
    from the shape only: no generator, so the eager step also compiles)."""
    n = x.numel()
    ramp = torch.arange(n, device=x.device, dtype=torch.float32).reshape(x.shape)
    last = torch.sin(ramp * 0.7311).to(x.dtype)
    ms = [(0.5 * torch.sin(ramp * (0.3137 + 0.1 * k) + k)).to(x.dtype) for k in range(order)]
    return last, ms


def _fastrev(order: int):
    def build(device, dtype):
        s = _fast(order)
        s.set_timesteps(STEPS, device=device)
        t = s.timesteps[INDEX]
        calls = 2 * (order + 1)          # >= order: the steady state (and the same buffers read and written each call)
        state = {}

        def f(inp):
            if not state:           # a first step allocates the history buffers; then the fixed history goes in
                s.step(inp.out, t, inp.x)
                last, ms = _history(inp.x, order)
                s._calls = calls
                s.model_outputs = list(reversed(ms))            # oldest first
                s.last_sample = last
                state["ok"] = True
            s._calls = calls
            s._step_index = INDEX
            prev = s.step(inp.out, t, inp.x, return_dict=False)[0]
            return prev, prev
        return f
    return build


def _diffusers(order: int):
    def build(device, dtype):
        s = _stock(order)
        s.set_timesteps(STEPS, device=device)
        t = s.timesteps[INDEX]
        state = {}

        def f(inp):
            if not state:
                state["last"], ms = _history(inp.x, order)
                state["mo"] = list(reversed(ms))          # oldest first
            s._step_index = INDEX
            s.model_outputs = list(state["mo"])
            s.last_sample = state["last"]
            s.lower_order_nums = order
            s.this_order = order
            prev = s.step(inp.out, t, inp.x, return_dict=False)[0]
            return prev, prev
        return f
    return build


def _eager(order: int):
    """The same step op by op in the storage dtype: x̂₀, then UniC, then UniP, from float64 coefficients."""
    def build(device, dtype):
        import numpy as np

        from ..diffusers_unipc import _bh_update, _Chain
        s = _stock(order)
        s.set_timesteps(STEPS)
        sig = s.sigmas.numpy()
        ch = _Chain(sig, flow=False)
        i = INDEX
        a, b = 1.0 / ch.alpha[i], -ch.sigma[i] / ch.alpha[i]
        cb, ck0, ckk, ckt = _bh_update(ch, i, i - 1, [i - 1 - k for k in range(1, order)], order, corrector=True,
                                       predict_x0=True, bh1=False)
        pb, pk0, pkk, _ = _bh_update(ch, i + 1, i, [i - k for k in range(1, order)], order, corrector=False,
                                     predict_x0=True, bh1=False)
        cf = [float(v) for v in (a, b, cb, ck0, ckt, pb, pk0)]
        ckk, pkk = [float(v) for v in np.atleast_1d(ckk)], [float(v) for v in np.atleast_1d(pkk)]
        state = {}

        def f(x, t, out):
            if not state:
                state["last"], state["ms"] = _history(x, order)
            last, ms = state["last"], state["ms"]
            x0 = cf[0] * x + cf[1] * out
            xc = cf[2] * last + cf[3] * ms[0] + cf[4] * x0              # UniC: the corrected sample
            for k, c in enumerate(ckk):
                xc = xc + c * ms[k + 1]
            prev = cf[5] * xc + cf[6] * x0                              # UniP from it
            for k, c in enumerate(pkk):
                prev = prev + c * ms[k]
            return prev, prev
        return f
    return build


for _order in (2, 3):
    register(StepBench(
        f"unipc_o{_order}_dropin",
        f"FastUniPCMultistepScheduler.step vs UniPCMultistepScheduler.step, bh2 order {_order}, corrector on; "
        f"step {INDEX} of {STEPS}, ε",
        reads=3 + _order, writes=3, group="drop-in", t_index=INDEX, compare_prev=("diffusers", "eager"),
        fastrev=_fastrev(_order), diffusers=_diffusers(_order), eager=_eager(_order)))
