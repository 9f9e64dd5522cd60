"""The sampling methods, one small unit each: which tables a step launches and in what order.

A unit is a :class:`MethodStep`: ``builders`` names its tables (float64 builders from
:mod:`fastrev.sampling.coefficients` or :mod:`fastrev.tables`), ``step`` runs one step at the device rows ``rows``
(model call(s) and launches through ``plan.apply``; everything per-step is read from the device, so the step can be
captured in a CUDA graph). Adding a method is adding a unit here and its name in :mod:`fastrev.sampling.options`.
"""

from __future__ import annotations

import math

import torch

from .. import tables as T
from . import coefficients as C
from . import multistep as M

__all__ = ["MethodStep", "METHOD_STEPS"]


class MethodStep:
    """The defaults: one table ``"main"``, one model call, one launch."""

    stochastic = False          # the step draws noise (key = the row)
    needs = ""                  # what must be finite at every visited step ("" = nothing beyond x̂₀)

    def builders(self, grid, o) -> dict:
        raise NotImplementedError

    def step(self, plan, ch, rows, i: int, want_x0: bool, phase: int = 0):
        out, g = plan.predict(ch, ch.x, plan.grid.ts[rows])
        return plan.apply(plan.tables["main"], rows, ch.x, out, dst=ch.x, offset=ch.offset,
                          stochastic=self.is_stochastic(plan.opts), return_x0=want_x0, guidance=g)

    def is_stochastic(self, o) -> bool:
        return self.stochastic

    def graphable(self, o, i: int) -> bool:
        return True

    def needs_scratch_state(self, o) -> bool:
        return False

    def per_sample_corrector(self, o) -> bool:
        return False

    def phases(self, o) -> int:
        """How many distinct buffer arrangements the steps cycle through (step ``pos`` runs phase pos % phases):
        one CUDA graph is captured per phase. 1 for the single-state methods."""
        return 1

    def init_state(self, o, x):
        """Per-chunk buffers beyond x (a multistep solver's history), or None."""
        return None


class DDPM(MethodStep):
    """Ancestral sampling, ``tables.ddpm_table`` on R (learned variances read the model's extra channels)."""

    stochastic = True

    def builders(self, g, o):
        return {"main": lambda: T.ddpm_table(g.R, o.prediction_type, o.variance_type, o.clip_sample)}

    def step(self, plan, ch, rows, i, want_x0, phase=0):
        if not plan.opts.learned:
            return super().step(plan, ch, rows, i, want_x0, phase)
        out, g = plan.predict(ch, ch.x, plan.grid.ts[rows], learned=True)
        return plan.apply(plan.tables["main"], rows, ch.x, out, dst=ch.x, offset=ch.offset, stochastic=True,
                          return_x0=want_x0, learned=True, guidance=g)


class DDIM(MethodStep):
    """DDIM(η), ``tables.ddim_table`` on R (ε̂ from the clipped x̂₀ when clipping); noise only when η > 0."""

    def builders(self, g, o):
        return {"main": lambda: T.ddim_table(g.R, o.prediction_type, o.eta, o.clip_sample, 1.0,
                                             use_clipped_model_output=o.clip_sample)}

    def is_stochastic(self, o):
        return o.eta > 0


class SDE(MethodStep):
    """Euler–Maruyama on the reverse VP-SDE."""

    stochastic = True
    needs = "β(t) = −log α"

    def builders(self, g, o):
        return {"main": lambda: C.sde_table(g.S, g.k, g.R, o.prediction_type, o.clip_sample)}


class ODE(MethodStep):
    """The probability-flow ODE: Euler, or Heun (an Euler stage into the scratch state x', a second model call at
    (x', k_{i−1}) and the second-stage table with base = x); the last step is Euler."""

    needs = "β(t) = −log α"

    def builders(self, g, o):
        b = {"euler": lambda: C.ode_euler_table(g.S, g.k, g.R, o.prediction_type, o.clip_sample)}
        if o.ode_solver == "heun":
            b["heun2"] = lambda: C.ode_heun_table(g.S, g.k, g.R, o.prediction_type, o.clip_sample)
        return b

    def graphable(self, o, i):
        return not (o.ode_solver == "heun" and i == 0)

    def needs_scratch_state(self, o):
        return o.ode_solver == "heun"

    def step(self, plan, ch, rows, i, want_x0, phase=0):
        ts = plan.grid.ts
        out, g = plan.predict(ch, ch.x, ts[rows])
        euler = plan.tables["euler"]
        if plan.opts.ode_solver == "euler" or i == 0:
            return plan.apply(euler, rows, ch.x, out, dst=ch.x, offset=ch.offset, stochastic=False,
                              return_x0=want_x0, guidance=g)
        x0 = plan.apply(euler, rows, ch.x, out, dst=ch.xp, offset=ch.offset, stochastic=False, return_x0=want_x0,
                        guidance=g)
        # the second stage is guided too (every model evaluation is, as k-diffusion's CFG wrappers do): its table
        # is linear in the output, so the kernel combines the halves of the second call in the same launch
        out2, g2 = plan.predict(ch, ch.xp, ts[rows - 1])
        plan.apply(plan.tables["heun2"], rows, ch.xp, out2, base=ch.x, dst=ch.x, offset=ch.offset, stochastic=False,
                   guidance=g2)
        return x0


class PC(MethodStep):
    """score_sde's predictor–corrector: ``corrector_steps`` Langevin steps at the row (noise keys
    i + (j + 1)(N + 1)), then the reverse-diffusion predictor."""

    stochastic = True

    def builders(self, g, o):
        b = {"main": lambda: C.pc_predictor_table(g.R, o.prediction_type, o.clip_sample)}
        if o.corrector_norms == "expected":
            b["corr"] = lambda: C.pc_corrector_table(g.R, o.prediction_type, o.clip_sample, o.snr)
        return b

    def per_sample_corrector(self, o):
        return o.corrector_norms == "sample"

    def step(self, plan, ch, rows, i, want_x0, phase=0):
        t = plan.grid.ts[rows]
        for j in range(plan.opts.corrector_steps):
            out, g = plan.predict(ch, ch.x, t)
            keys = rows + (j + 1) * (plan.N + 1)
            if plan.corrector is not None:
                # its reduction pass reads the whole output in torch anyway: combine the halves there first
                plan.corrector(plan, ch, rows, out if g is None else g.combine(), keys)
            else:
                plan.apply(plan.tables["corr"], rows, ch.x, out, dst=ch.x, offset=ch.offset, keys=keys,
                           stochastic=True, guidance=g)
        return super().step(plan, ch, rows, i, want_x0, phase)


class Euler(MethodStep):
    """σ-space Euler (k-diffusion ``sample_euler``, diffusers ``EulerDiscreteScheduler`` without churn) on
    σ = √((1 − ᾱ)/ᾱ), kept in the model's input coordinates (``coefficients.euler_table``)."""

    needs = "σ = √((1 − ᾱ)/ᾱ)"

    def builders(self, g, o):
        return {"main": lambda: C.euler_table(g.R, o.prediction_type, o.clip_sample)}


class EulerAncestral(Euler):
    """σ-space Euler-ancestral, η = 1 (k-diffusion ``sample_euler_ancestral``, diffusers
    ``EulerAncestralDiscreteScheduler``); noise key = the row."""

    stochastic = True

    def builders(self, g, o):
        return {"main": lambda: C.euler_ancestral_table(g.R, o.prediction_type, o.clip_sample)}


class FlowEuler(MethodStep):
    """Flow-matching Euler for a velocity model (diffusers ``FlowMatchEulerDiscreteScheduler``'s update) on the
    σ grid of :class:`fastrev.sampling.plan.FlowGrid`."""

    def builders(self, g, o):
        return {"main": lambda: C.flow_euler_table(g.sigmas, o.clip_sample)}


class Multistep(MethodStep):
    """A multistep solver: each step is ONE launch that reads its history (earlier x̂₀'s, and for UniPC the previous
    corrected sample) in the same pass and writes the new x̂₀ (and the aux output) into ring buffers that this step
    does not read: no copies. The history length is fixed per method (a compile-time property of the launch); rows
    of lower order (the warm-up, the last steps) have zero coefficients on the missing entries, whose buffers start
    as zeros. Step pos uses ring slots by phase = pos mod lcm(P + 1, 2 if aux): the x̂₀ of step pos lives in
    slot pos mod (P + 1) (P = x̂₀ history length), the aux in slot pos mod 2."""

    needs = "λ = log(√ᾱ/√(1 − ᾱ)) finite"
    aux = False

    def x0_history(self, o) -> int:
        raise NotImplementedError

    def phases(self, o):
        n = self.x0_history(o) + 1
        return n * 2 // math.gcd(n, 2) if self.aux else n

    def init_state(self, o, x):
        n = self.x0_history(o) + 1
        return {"x0": [torch.zeros_like(x) for _ in range(n)],
                "aux": [torch.zeros_like(x) for _ in range(2)] if self.aux else None}

    def step(self, plan, ch, rows, i, want_x0, phase=0):
        st = ch.state
        ring = st["x0"]
        n = len(ring)
        w = ring[phase % n]
        hist = [ring[(phase - j) % n] for j in range(1, n)]         # m_{k−1}, m_{k−2}, …
        aux_out = None
        if self.aux:
            aux_out = st["aux"][phase % 2]
            hist = [st["aux"][(phase - 1) % 2]] + hist                 # x^c_{k−1} first
        out, g = plan.predict(ch, ch.x, plan.grid.ts[rows])
        plan.apply(plan.tables["main"], rows, ch.x, out, dst=ch.x, offset=ch.offset,
                   stochastic=self.is_stochastic(plan.opts), guidance=g, history=tuple(hist), x0_out=w,
                   aux_out=aux_out)
        return w


class DPMSolverPP(Multistep):
    """DPM-Solver++(2M / 3M), and their SDE variants (noise key = the row): ``multistep.dpmpp_table``."""

    def __init__(self, order: int, sde: bool):
        self.order, self.stochastic = order, sde

    def x0_history(self, o):
        return M.dpmpp_history(self.order)

    def builders(self, g, o):
        return {"main": lambda: M.dpmpp_table(g.R, self.order, self.stochastic, o.prediction_type, o.clip_sample)}


class UniPC(Multistep):
    """UniPC bh2 (order ``solver_order``, default 2) with its corrector, in one launch: the corrector of x_k (with
    the model output at x_k) and the predictor from the corrected sample, whose x^c_k is the aux output (the next
    step's corrector starts from it): ``multistep.unipc_table``."""

    aux = True

    def x0_history(self, o):
        return M.unipc_history(o.solver_order) - 1

    def builders(self, g, o):
        return {"main": lambda: M.unipc_table(g.R, o.solver_order, o.prediction_type, o.clip_sample)}


METHOD_STEPS = {"ddpm": DDPM(), "ddim": DDIM(), "sde": SDE(), "ode": ODE(), "pc": PC(), "euler": Euler(),
                "euler_a": EulerAncestral(), "flow_euler": FlowEuler(),
                **{name: DPMSolverPP(order, sde) for name, (order, sde) in M.DPMPP_METHODS.items()},
                "unipc": UniPC()}
