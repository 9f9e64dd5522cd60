"""Benchmarked steps: the diffusers drop-ins (``fastrev.diffusers``), side by side with the class each replaces."""

import functools

from .common import T_STEP
from .registry import (
    StepBench,
    diffusers_scheduler,
    eager_ddim,
    eager_ddpm,
    fastrev_dropin,
    register,
    scheduler_step,
    schedules,
)

# the diffusers drop-ins, side by side with the class each replaces: exact mode (a generator: diffusers' noise,
# drawn and read, hence one more tensor read) and fast mode (no generator: counter noise)
for _kind, _eta, _label in (("ddpm", 0.0, "FastDDPMScheduler.step vs DDPMScheduler.step (t=500 of 1000)"),
                            ("ddim", 1.0, "FastDDIMScheduler.step vs DDIMScheduler.step, η=1 (t=500 of 50 leading)")):
    for _exact in (True, False):
        register(StepBench(
            f"{_kind}_dropin_{'exact' if _exact else 'fast'}",
            f"{_label}, {'exact mode (generator)' if _exact else 'fast mode (no generator)'}; ε, clipped",
            reads=3 if _exact else 2, writes=2, group="drop-in",
            compare_prev=("diffusers",) if _exact else (),
            t_index=schedules()[2] if _kind == "ddim" else T_STEP,
            fastrev=scheduler_step(functools.partial(fastrev_dropin, _kind), _kind, exact=_exact, eta=_eta),
            diffusers=scheduler_step(functools.partial(diffusers_scheduler, _kind), _kind, exact=_exact, eta=_eta),
            eager=eager_ddim(_eta) if _kind == "ddim" else eager_ddpm()))
