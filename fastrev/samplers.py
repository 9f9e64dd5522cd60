"""Whole sampling runs on the fused step: ``fastrev.sample(model, shape, schedule, method=...)``.

Every method is a per-step coefficient table for the one generic fused kernel (:mod:`fastrev.tables`,
:func:`fastrev.ops.fused_step`); a sampling step is one model call plus one launch, except where a method needs
more (Heun's second stage, the Langevin corrector's reduction). Notation of ``shared/seed/reverse-process.md``.

Time and β(t)
-------------
The user's schedule S (the training schedule, or any schedule) is respaced to ``num_steps`` indices
k_{N−1} > … > k_0 (``spaced_timesteps``); R = S.respace(k) is what ``ddpm``/``ddim``/``pc`` step on, and the model is
fed the training timestep ``R.timesteps[i]``. The continuous-time methods (``sde``, ``ode``) measure time τ in units of
S's steps and take β(τ) piecewise constant, β(τ) = −log α_k on (k − 1, k], so that exp(−∫₀^k β) = ᾱ_k exactly at every
grid point: the model's ε at timestep k is then exactly the noise of the SDE's marginal at τ = k (the data are at
τ = −1). Step i goes from τ = k_i to k_{i−1} (k_{−1} = −1) with dt_i = k_i − k_{i−1}.

The methods (tables, row i = respaced index; the per-sample corrector is the one exception)
-------------------------------------------------------------------------------------------
Write ε̂ = Kx·x + K0·x̂₀ + Ko·out for the noise estimate (from the raw output; with ``clip_sample`` re-derived from the
clipped x̂₀, ε̂ = (x − √ᾱ x̂₀)/√(1 − ᾱ), as improved-diffusion does) and s = −ε̂/√(1 − ᾱ_i) for the score.

* ``ddpm``: ancestral sampling, ``tables.ddpm_table`` on R (variance_type as there, learned ones included).
* ``ddim``: DDIM(η), ``tables.ddim_table`` on R (ε̂ from the clipped x̂₀ when ``clip_sample``).
* ``sde``: Euler–Maruyama on the reverse VP-SDE dx = [−½β x − β ∇log p]dt + √β dW̄ backwards in time:
  x ← (1 + ½β dt)x + β dt·s + √(β dt)·z with β = β(k_i), dt = dt_i; no noise on the last step (score_sde's
  ``denoise``: the last step returns its mean).
* ``ode``: the probability-flow ODE dx/dτ = −½β x − ½β ∇log p, integrated backwards with Heun's method (default) or
  Euler (``ode_solver="euler"``). With d(x, τ) = ½β(τ)x + ½β(τ)s(x, τ) (the backward derivative), stage 1 is the
  Euler table x' = x + dt·d(x, k_i); stage 2 is a second table x ← ½x + ½x' + ½dt·d(x', k_{i−1}), linear in
  (x', ε̂(x', k_{i−1}), x): one launch with sample = x', out = the model at (x', k_{i−1}) and the kernel's third state
  ``base`` = x (column D = ½). The last step (to τ = −1, where there is no score) is Euler, so Heun costs 2N − 1
  model calls.
* ``pc``: score_sde's predictor–corrector. Predictor: reverse diffusion on R, x ← (2 − √α'_i)x + β'_i s + √β'_i z
  (no noise on the last step). Before it, ``corrector_steps`` Langevin steps at the same i,
  x ← x + ε s + √(2ε) z, with score_sde's step size ε = 2α'_i (snr ‖z‖ / ‖s‖)² — whose norms score_sde takes as
  **batch means**, so a sample depends on its batch-mates. Here it never does; ``corrector_norms`` picks how:

  - ``"expected"`` (default): the norms are replaced by their per-sample expectations, ‖z‖² → d and
    ‖s‖² → d/(1 − ᾱ_i) (‖ε̂‖² → E‖ε‖² = d), so ε_i = 2α'_i snr² (1 − ᾱ_i) depends on i alone: a table, one fused
    launch. For large d this is what the batch means converge to.
  - ``"sample"``: each sample's own norms, ε_b = 2α'_i (snr ‖z_b‖ / ‖s_b‖)² (0 where ‖s_b‖ = 0). This corrector
    is not a single pass: ε_b needs the norms of the whole sample's score and noise before any element can move
    (a grid-wide reduction). So each step is a reduction pass (ε̂, z and their per-sample norms, in torch), a
    per-sample [B, NCOL] table built on the device with torch ops (no host sync, graph-safe), and one fused launch
    over rows t = arange(B) with that z passed in as the noise tensor (z is the counter stream at the corrector's
    key: drawn by the kernel itself on the fused backend — one launch, graph-safe — and by fastrev.noise on the
    reference).
    Caveat: a step size that depends on the current state (through ‖s_b(x)‖) and on the noise (through ‖z_b‖) is
    no longer a Langevin step with invariant p_t. In high dimension the norms concentrate and it agrees with
    "expected"; in 2-D it is visibly biased (the demo mixture with snr = 0.16: sliced W1 ≈ 0.14 against ≈ 0.03
    for "expected" or data-vs-data, worse with more steps).

Noise keys (never repeated within a run)
----------------------------------------
The normal for element e of global sample j = start + position at noise step k is Philox(seed; e//4, j, k, 0)
(:mod:`fastrev.noise`). With N = the respaced length: x_T uses k = N; the step at respaced index i (ddpm, ddim, sde,
the pc predictor) uses k = i; the pc corrector's j-th step (j = 0, 1, …) at index i uses k = i + (j + 1)(N + 1).
The ODE draws only x_T. A sample therefore depends on (seed, its global index) alone: never on ``batch_size``, on
the chunk it lands in, or on the backend (the kernel's Philox and torch's agree to a few ulp).

CUDA graphs
-----------
``cuda_graph=True`` captures one whole step (model call(s), the reductions and launches) per chunk, after a warm-up
on a side stream, and replays it with the step index copied into a device buffer: everything per-step (table rows,
model timesteps, noise keys) is computed on the device from that buffer, nothing is a Python scalar frozen into the
graph except the chunk's global sample offset (hence one capture per chunk). The ODE's last (Euler) step runs
eagerly. It needs the fused backend and a capturable model (no host syncs).

Backends
--------
``"triton"`` runs the fused kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); ``"reference"`` runs the same
update in eager torch in float64 from the float64 table, cast to ``dtype`` after every step (what ``"auto"`` picks off
CUDA, and for float64). Both give the same samples to ≤ 1e-5 relative in float32.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import torch

from . import noise as _noise
from . import tables as T
from .reference import PREDICTION_TYPES, VARIANCE_TYPES
from .schedule import TIMESTEP_SPACINGS, Schedule, spaced_timesteps

__all__ = ["sample", "METHODS", "ODE_SOLVERS", "CORRECTOR_NORMS", "SAMPLER_BACKENDS", "noise_keys"]

METHODS = ("ddpm", "ddim", "sde", "ode", "pc")
CORRECTOR_NORMS = ("expected", "sample")
ODE_SOLVERS = ("heun", "euler")
SAMPLER_BACKENDS = ("auto", "triton", "reference")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEFAULT_SNR = 0.16
_DEFAULT_CORRECTOR_STEPS = 1


def noise_keys(num_steps: int, corrector_steps: int = 0) -> dict:
    """The noise-step keys of a run with ``num_steps`` (respaced) steps, as documented in the module: a dict with
    ``"x_T"`` (int), ``"predictor"`` (list, index i → key) and ``"corrector"`` (list of lists, [j][i] → key)."""
    n = int(num_steps)
    return {"x_T": n, "predictor": list(range(n)),
            "corrector": [[i + (j + 1) * (n + 1) for i in range(n)] for j in range(int(corrector_steps))]}


# ------------------------------------------------------------------------------------------------ validation
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


from .ops import _check_choice as _choice  # noqa: E402  (one validator for every module)


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _resolve_device(model, device) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device string like 'cuda' or 'cpu', "
                             f"got {device!r}") from None
    if isinstance(model, torch.nn.Module):
        for p in list(model.parameters()) + list(model.buffers()):
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_graph_support(device: torch.device, fused: bool) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True captures the step loop in a CUDA graph and needs a CUDA device, got "
                         f"device={str(device)!r}")
    if not fused:
        raise ValueError("cuda_graph=True runs the fused kernel: it needs backend='triton' or 'auto' and a "
                         "float16/bfloat16/float32 dtype (the reference backend is eager only)")


_RESPACED: "weakref.WeakKeyDictionary[Schedule, dict]" = weakref.WeakKeyDictionary()


def _respaced(schedule: Schedule, num_steps, spacing):
    """(indices k into ``schedule`` ascending, the respaced Schedule), cached per (schedule, num_steps, spacing) so
    repeated runs reuse its device tables."""
    per = _RESPACED.setdefault(schedule, {})
    key = (num_steps, spacing)
    hit = per.get(key)
    if hit is None:
        N = schedule.num_timesteps
        if spacing in TIMESTEP_SPACINGS:
            k = spaced_timesteps(N, N if num_steps is None else num_steps, spacing)
        else:
            k = spaced_timesteps(N, num_steps, spacing)
        hit = (k, schedule.respace(k))
        per[key] = hit
    return hit


# ------------------------------------------------------------------------------------------------ tables
def _score_update_table(R, prediction_type, clip, P, Q, sigma, D=None, at=None):
    """The table of x_new = P·x + Q·ε̂ (+ D·base) + σ·z, with ε̂ and x̂₀ taken at respaced indices ``at`` (default:
    each row's own index)."""
    A, Bc = T.x0_coefficients(R, prediction_type)
    Kx, K0, Ko = T.eps_linear(R, prediction_type, clip)
    if at is not None:
        A, Bc, Kx, K0, Ko = (c[at] for c in (A, Bc, Kx, K0, Ko))
    return T.finish_table(A, Bc, Q * K0, P + Q * Kx, Q * Ko, sigma, clip=clip, D=D)


def _beta_dt(S: Schedule, k: torch.Tensor):
    """(β(k_i), dt_i) float64 [N]: the piecewise-constant rate β = −log α_k of the base schedule at k_i and the step
    length k_i − k_{i−1} (k_{−1} = −1)."""
    rate = -torch.log(S.alphas)
    kk = k.to(torch.int64)
    prev = torch.cat([torch.tensor([-1], dtype=torch.int64), kk[:-1]])
    return rate[kk], (kk - prev).to(torch.float64)


def sde_table(S: Schedule, k, R: Schedule, prediction_type="epsilon", clip=False):
    """Euler–Maruyama on the reverse VP-SDE (module doc), float64 [N, NCOL]; no noise at row 0."""
    beta, dt = _beta_dt(S, k)
    bdt = beta * dt
    sigma = torch.sqrt(bdt)
    sigma[0] = 0.0
    return _score_update_table(R, prediction_type, clip, 1.0 + 0.5 * bdt, -bdt / R.sqrt_one_minus_alpha_bars, sigma)


def ode_euler_table(S: Schedule, k, R: Schedule, prediction_type="epsilon", clip=False):
    """x' = x + dt·d(x, k_i), d = ½βx + ½β s: Heun's first stage and the Euler solver, float64 [N, NCOL]."""
    beta, dt = _beta_dt(S, k)
    bdt = beta * dt
    return _score_update_table(R, prediction_type, clip, 1.0 + 0.5 * bdt, -0.5 * bdt / R.sqrt_one_minus_alpha_bars,
                               torch.zeros_like(bdt))


def ode_heun_table(S: Schedule, k, R: Schedule, prediction_type="epsilon", clip=False):
    """Heun's second stage at row i ≥ 1: x ← ½·base + ½x' + ½dt_i·d(x', k_{i−1}) with sample = x', out = the model at
    (x', k_{i−1}), base = x (column D = ½); ε̂ and x̂₀ use index i − 1. Row 0 is unused (zeros but D)."""
    beta, dt = _beta_dt(S, k)
    N = R.num_timesteps
    at = (torch.arange(N) - 1).clamp_min(0)
    b2 = beta[at] * dt                                     # β(k_{i−1})·dt_i
    P = 0.5 + 0.25 * b2
    Q = -0.25 * b2 / R.sqrt_one_minus_alpha_bars[at]
    tab = _score_update_table(R, prediction_type, clip, P, Q, torch.zeros_like(P), D=torch.full_like(P, 0.5), at=at)
    tab[0, :] = 0.0
    tab[0, T.COL["D"]] = 1.0
    tab[0, T.COL["CLIP"]] = 1.0
    return tab


def pc_corrector_table(R: Schedule, prediction_type="epsilon", clip=False, snr=_DEFAULT_SNR):
    """The Langevin corrector with ``corrector_norms="expected"``: x ← x + ε_i s + √(2ε_i) z with
    ε_i = 2α'_i snr² (1 − ᾱ_i), float64 [N, NCOL] (noise at every row)."""
    step = 2.0 * R.alphas * snr**2 * (1.0 - R.alpha_bars)
    return _score_update_table(R, prediction_type, clip, torch.ones_like(step), -step / R.sqrt_one_minus_alpha_bars,
                               torch.sqrt(2.0 * step))


def pc_predictor_table(R: Schedule, prediction_type="epsilon", clip=False):
    """score_sde's reverse-diffusion predictor on R: x ← (2 − √α'_i)x + β'_i s + √β'_i z, no noise at row 0."""
    sigma = torch.sqrt(R.betas)
    sigma[0] = 0.0
    return _score_update_table(R, prediction_type, clip, 2.0 - R.sqrt_alphas, -R.betas / R.sqrt_one_minus_alpha_bars,
                               sigma)


# ------------------------------------------------------------------------------------------------ the plan
class _Plan:
    """Everything a run needs that does not depend on the chunk: validated options, respaced schedule, device tables
    (float32 for the kernel, float64 for the reference), model timesteps on the device, the seed tensor."""

    def __init__(self, model, sample_shape, schedule, *, method, num_steps, timestep_spacing, eta, prediction_type,
                 variance_type, clip_sample, seed, device, dtype, snr, corrector_steps, corrector_norms, ode_solver,
                 backend):
        self.model = model
        self.sample_shape = sample_shape
        self.method = method
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.learned = variance_type in ("learned", "learned_range")
        self.clip = clip_sample
        self.device = device
        self.dtype = dtype
        self.snr = snr
        self.corrector_steps = corrector_steps
        self.corrector_norms = corrector_norms
        self._noise_table = None
        self.ode_solver = ode_solver
        self.eta = eta
        from .ops import resolve_backend
        backend = resolve_backend(backend, device, any_f64=dtype == torch.float64)
        self.fused = backend == "triton"
        self.backend = backend
        self.S = schedule
        self.k, self.R = _respaced(schedule, num_steps, timestep_spacing)
        self.N = self.R.num_timesteps
        if self.R.zero_terminal_snr:         # the run visits ᾱ = 0 (zero terminal SNR, last step kept)
            if prediction_type == "epsilon":
                raise ValueError("prediction_type='epsilon' is undefined at the first step of this run: the schedule "
                                 "has zero terminal SNR (ᾱ = 0 at training timestep "
                                 f"{int(self.R.timesteps[-1])}, x̂₀ = (x − ε)/√ᾱ); use 'v_prediction' or 'sample', or "
                                 "a spacing that skips the last timestep ('leading')")
            if method in ("sde", "ode"):
                raise ValueError(f"method={method!r} needs β(t) = −log α finite, but the schedule has zero terminal "
                                 "SNR (α = 0 at its last step); use 'ddpm', 'ddim' or 'pc', or a spacing that skips "
                                 "the last timestep ('leading')")
        self.timesteps = self.R.timesteps.tolist()            # host copy, for callbacks (no device sync)
        self.ts = self.R.device_tensor("timesteps", device, torch.int64)
        self.seed = _noise.as_seed_tensor(seed, device)
        self.tables = {name: self._table(name, build) for name, build in self._builders().items()}
        if method == "pc" and self.corrector_norms == "sample":
            Kx, K0, Ko = T.eps_linear(self.R, prediction_type, self.clip)
            aux = torch.stack([Kx, K0, Ko, self.R.sqrt_one_minus_alpha_bars, self.R.alphas], dim=1)
            self.aux = self._cached(("pc_aux", prediction_type, self.clip), lambda: aux)

    # tables ---------------------------------------------------------------------------------------
    def _builders(self):
        R, S, k, pt, clip = self.R, self.S, self.k, self.prediction_type, self.clip
        m = self.method
        if m == "ddpm":
            return {"main": lambda: T.ddpm_table(R, pt, self.variance_type, clip)}
        if m == "ddim":
            return {"main": lambda: T.ddim_table(R, pt, self.eta, clip, 1.0, use_clipped_model_output=clip)}
        if m == "sde":
            return {"main": lambda: sde_table(S, k, R, pt, clip)}
        if m == "ode":
            b = {"euler": lambda: ode_euler_table(S, k, R, pt, clip)}
            if self.ode_solver == "heun":
                b["heun2"] = lambda: ode_heun_table(S, k, R, pt, clip)
            return b
        b = {"main": lambda: pc_predictor_table(R, pt, clip)}
        if self.corrector_norms == "expected":
            b["corr"] = lambda: pc_corrector_table(R, pt, clip, self.snr)
        return b

    def _cached(self, key, build):
        dt = torch.float32 if self.fused else torch.float64
        return self.R.cached(("sampler",) + key + (dt,), self.device,
                             lambda: build().to(dt).contiguous())

    def _table(self, name, build):
        key = (self.method, name, self.prediction_type, self.variance_type, self.clip, float(self.eta),
               self.snr if name == "corr" else None)
        return self._cached(key, build)

    # model ----------------------------------------------------------------------------------------
    def call_model(self, x, t):
        out = self.model(x, t)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model(x, t) must return a torch.Tensor, got {type(out).__name__}")
        want = tuple(x.shape)
        if self.learned:
            want = (x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:])
        if tuple(out.shape) != want:
            extra = " (2C channels: output, then variance values)" if self.learned else ""
            raise ValueError(f"model(x, t) must return shape {want}{extra}, got {tuple(out.shape)}")
        if out.dtype not in _DTYPES:
            raise TypeError(f"model(x, t) must return a floating tensor, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"model(x, t) returned a tensor on {out.device}, expected {x.device}")
        if self.fused and out.dtype == torch.float64:
            out = out.to(torch.float32)
        return out

    def eps_part(self, out):
        """The prediction channels (the first C of a learned-variance output)."""
        return out[:, : out.shape[1] // 2] if self.learned else out

    # one table update -----------------------------------------------------------------------------
    def apply(self, table, rows, x, out, *, dst, offset, keys=None, stochastic, noise=None, base=None,
              return_x0=False, learned=False):
        """x_new = the table update of (x, out[, base], z) at ``rows``, written into ``dst``; returns x̂₀ or None."""
        from .ops import fused_step
        res = fused_step(table, rows, x, out, learned=learned, variance_type=self.variance_type, clip=self.clip,
                         noise=noise, seed=self.seed, sample_offset=offset, stochastic=stochastic, out=dst,
                         return_x0=return_x0, step=keys, base=base, backend=self.backend)
        return res.pred_original_sample

    # the per-step functions: every per-step value comes from the device buffer i_buf (graph-safe); the host int
    # i only selects the code path (ODE's last step) ------------------------------------------------------
    def graphable(self, i: int) -> bool:
        return not (self.method == "ode" and self.ode_solver == "heun" and i == 0)

    def step(self, ch: "_Chunk", i_buf: torch.Tensor, i: int, want_x0: bool):
        B = ch.x.shape[0]
        rows = i_buf.expand(B).contiguous()
        t_model = self.ts[rows]
        m = self.method
        if m == "pc":
            for j in range(self.corrector_steps):
                self._corrector(ch, rows, t_model, j)
        out = self.call_model(ch.x, t_model)
        if m == "ode":
            euler = self.tables["euler"]
            if self.ode_solver == "euler" or i == 0:
                return self.apply(euler, rows, ch.x, self.eps_part(out), dst=ch.x, offset=ch.offset,
                                  stochastic=False, return_x0=want_x0)
            x0 = self.apply(euler, rows, ch.x, self.eps_part(out), dst=ch.xp, offset=ch.offset, stochastic=False,
                            return_x0=want_x0)
            out2 = self.call_model(ch.xp, self.ts[rows - 1])
            self.apply(self.tables["heun2"], rows, ch.xp, self.eps_part(out2), base=ch.x, dst=ch.x,
                       offset=ch.offset, stochastic=False)
            return x0
        stochastic = m in ("ddpm", "sde", "pc") or (m == "ddim" and self.eta > 0)
        if m == "ddpm" and self.learned:
            return self.apply(self.tables["main"], rows, ch.x, out, dst=ch.x, offset=ch.offset,
                              stochastic=stochastic, return_x0=want_x0, learned=True)
        return self.apply(self.tables["main"], rows, ch.x, self.eps_part(out), dst=ch.x, offset=ch.offset,
                          stochastic=stochastic, return_x0=want_x0)

    def _kernel_noise(self, ch, x, out, keys):
        """The counter-stream z at noise steps ``keys`` drawn by the kernel into the chunk's float32 buffer: a
        one-row table with σ = 1 and every other coefficient 0."""
        from .ops import fused_step
        if self._noise_table is None:
            tab = torch.zeros(1, T.NCOL, dtype=torch.float32, device=self.device)
            tab[0, T.COL["SIGMA"]] = 1.0
            tab[0, T.COL["CLIP"]] = 1.0
            self._noise_table = tab
        fused_step(self._noise_table, ch.zero_rows, x, out, seed=self.seed, sample_offset=ch.offset,
                   stochastic=True, out=ch.z, return_x0=False, step=keys)
        return ch.z

    def _corrector(self, ch, rows, t_model, j):
        """One Langevin step at the rows' index: a table step ("expected"), or a reduction pass, a per-sample table
        and one launch ("sample"; see the module doc)."""
        x = ch.x
        B = x.shape[0]
        out = self.eps_part(self.call_model(x, t_model))
        keys = rows + (j + 1) * (self.N + 1)
        if self.corrector_norms == "expected":
            self.apply(self.tables["corr"], rows, x, out, dst=x, offset=ch.offset, keys=keys, stochastic=True)
            return
        if self.fused:      # the kernel draws z (one launch: σ = 1, all else 0; capture-safe, unlike eager Philox)
            z = self._kernel_noise(ch, x, out, keys)
        else:
            z = _noise.noise_like(x, self.seed, keys, ch.offset)               # float32 counter stream
        cdt = torch.float32 if self.fused else torch.float64
        main = self.tables["main"][rows].to(cdt)                               # [B, NCOL]: A, B, CLIP at i
        aux = self.aux[rows].to(cdt)                                           # [B, 5]: Kx, K0, Ko, √(1−ᾱ), α'
        A, Bc = main[:, T.COL["A"]], main[:, T.COL["B"]]
        Kx, K0, Ko, s1m, alpha = aux.unbind(1)
        shape = (B,) + (1,) * (x.dim() - 1)
        xc, oc = x.to(cdt), out.to(cdt)
        if self.clip:
            x0 = A.reshape(shape) * xc + Bc.reshape(shape) * oc
            r = main[:, T.COL["CLIP"]].reshape(shape)
            x0 = x0.clamp(-r, r)
            eps = Kx.reshape(shape) * xc + K0.reshape(shape) * x0
        else:
            eps = Kx.reshape(shape) * xc + Ko.reshape(shape) * oc
        e2 = eps.reshape(B, -1).pow(2).sum(1)                                  # ‖ε̂_b‖²
        z2 = z.to(cdt).reshape(B, -1).pow(2).sum(1)                            # ‖z_b‖²
        # ε_b = 2α (snr ‖z‖/‖s‖)² with ‖s‖ = ‖ε̂‖/√(1−ᾱ); 0 where ‖ε̂‖ = 0
        ok = e2 > 0
        step = torch.where(ok, 2 * alpha * self.snr**2 * z2 * s1m**2 / torch.where(ok, e2, torch.ones_like(e2)),
                           torch.zeros_like(e2))
        Q = -step / s1m                                                        # x += ε_b·s = −ε_b/√(1−ᾱ)·ε̂
        zeros = torch.zeros_like(step)
        cols = [A, Bc, Q * K0, 1 + Q * Kx, Q * Ko, torch.sqrt(2 * step), zeros, zeros,
                main[:, T.COL["CLIP"]], zeros]
        table = torch.stack(cols, dim=1).contiguous()
        self.apply(table, ch.arange, x, out, dst=x, offset=ch.offset, keys=keys, stochastic=True, noise=z)


class _Chunk:
    """The state of one chunk of samples: x (updated in place), scratch, global offset, row indices."""

    def __init__(self, plan: _Plan, n: int, offset: int):
        shape = (n,) + tuple(plan.sample_shape)
        self.offset = offset
        empty = torch.empty(shape, dtype=torch.float32, device=plan.device)
        self.x = _noise.noise_like(empty, plan.seed, plan.N, offset).to(plan.dtype)      # x_T: key N
        self.xp = torch.empty_like(self.x) if plan.method == "ode" else None
        self.arange = torch.arange(n, dtype=torch.int64, device=plan.device)
        self._pc_sample = plan.method == "pc" and plan.corrector_norms == "sample" and plan.fused
        self.zero_rows = torch.zeros(n, dtype=torch.int64, device=plan.device) if self._pc_sample else None
        self.z = torch.empty(shape, dtype=torch.float32, device=plan.device) if self._pc_sample else None

    def clone(self, plan: _Plan) -> "_Chunk":
        c = _Chunk.__new__(_Chunk)
        c.offset, c.arange, c.zero_rows = self.offset, self.arange, self.zero_rows
        c.z = None if self.z is None else torch.empty_like(self.z)
        c.x = self.x.clone()
        c.xp = None if self.xp is None else torch.empty_like(self.xp)
        return c


# ------------------------------------------------------------------------------------------------ the reference update
# ------------------------------------------------------------------------------------------------ CUDA graphs
class _CudaGraph:
    """One captured sampler step: warm-up on a side stream (on a scratch copy of the chunk, so the state is not
    touched), capture of ``fn()`` (the model call(s) and launches of one step, reading the step from ``i_buf``), and
    replay. Per-chunk: the chunk's global sample offset is a launch argument, frozen into the graph."""

    def __init__(self, device):
        self.device = device
        self.graph = None
        self.result = None

    def warmup(self, fn, times: int = 2):
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(times):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)

    def capture(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = fn()
        return self.result

    def replay(self):
        self.graph.replay()
        return self.result


_GRAPH_IMPL = _CudaGraph        # tests on machines without a GPU swap in an emulator of capture/replay


def _run_chunk(plan: _Plan, n: int, offset: int, *, callback, bar, cuda_graph: bool, check_finite: bool = False):
    ch = _Chunk(plan, n, offset)
    i_buf = torch.zeros(1, dtype=torch.int64, device=plan.device)
    want_x0 = callback is not None
    order = list(range(plan.N - 1, -1, -1))
    graph = None
    if cuda_graph:
        first = next((i for i in order if plan.graphable(i)), None)
        if first is not None:
            graph = _GRAPH_IMPL(plan.device)
            warm = ch.clone(plan)
            i_buf.fill_(first)
            graph.warmup(lambda: plan.step(warm, i_buf, first, want_x0))
            del warm
            graph.capture(lambda: plan.step(ch, i_buf, first, want_x0))
    for pos, i in enumerate(order):
        i_buf.fill_(i)
        if graph is not None and plan.graphable(i):
            x0 = graph.replay()
        else:
            x0 = plan.step(ch, i_buf, i, want_x0)
        if check_finite and not bool(torch.isfinite(ch.x).all()):     # opt-in: one host sync per step
            bad = int((~torch.isfinite(ch.x)).sum())
            raise FloatingPointError(
                f"a non-finite value first appeared at step {pos} of {plan.N} (respaced index {i}, training timestep "
                f"{plan.timesteps[i]}) in samples {offset}..{offset + n - 1}: {bad} non-finite elements "
                f"(method={plan.method!r})")
        if callback is not None:
            callback(pos, plan.timesteps[i], ch.x, x0)
        if bar is not None:
            bar.update(1)
    return ch.x


def _validate(model, sample_shape, schedule, *, method, num_steps, timestep_spacing, eta, prediction_type,
              variance_type, clip_sample, seed, batch_size, device, dtype, progress, cuda_graph, callback, snr,
              corrector_steps, corrector_norms, ode_solver, backend, start, count, check_finite=False):
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastrev.Schedule, got {type(schedule).__name__}")
    _choice("method", method, METHODS)
    if num_steps is not None:
        if not _is_int(num_steps):
            raise TypeError(f"num_steps must be an int or None, got {type(num_steps).__name__}")
        if not 1 <= num_steps <= schedule.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {schedule.num_timesteps}] (the schedule's length), "
                             f"got {num_steps}")
    if not isinstance(timestep_spacing, str):
        raise TypeError(f"timestep_spacing must be a str, got {type(timestep_spacing).__name__}")
    if timestep_spacing not in TIMESTEP_SPACINGS and not (
            timestep_spacing.startswith("ddim") or (timestep_spacing and set(timestep_spacing) <= set("0123456789,"))):
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS} or an improved-diffusion section "
                         f"string like 'ddim50' or '10,15,20', got {timestep_spacing!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a number, got {type(eta).__name__}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta only applies to method='ddim', got eta={eta} with method={method!r}")
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _choice("variance_type", variance_type, VARIANCE_TYPES)
    if variance_type == "fixed_large" and method != "ddpm":
        raise ValueError(f"variance_type='fixed_large' only applies to method='ddpm' (the other methods fix their own "
                         f"noise), got method={method!r}")
    _flag("clip_sample", clip_sample)
    _flag("progress", progress)
    _flag("cuda_graph", cuda_graph)
    _flag("check_finite", check_finite)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(i, t, x, x0) or None, got {type(callback).__name__}")
    if not (isinstance(seed, torch.Tensor) or _is_int(seed)):
        raise TypeError(f"seed must be an int or an int64 tensor of one element, got {type(seed).__name__}")
    if batch_size is not None:
        if not _is_int(batch_size):
            raise TypeError(f"batch_size must be an int or None, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, torch.float64, "
                        f"got {dtype!r}")
    _choice("backend", backend, SAMPLER_BACKENDS)
    if method == "pc":
        snr = _DEFAULT_SNR if snr is None else snr
        corrector_steps = _DEFAULT_CORRECTOR_STEPS if corrector_steps is None else corrector_steps
        if isinstance(snr, bool) or not isinstance(snr, (int, float)):
            raise TypeError(f"snr must be a number, got {type(snr).__name__}")
        if not (snr > 0 and math.isfinite(snr)):
            raise ValueError(f"snr must be a finite number > 0, got {snr}")
        if not _is_int(corrector_steps):
            raise TypeError(f"corrector_steps must be an int, got {type(corrector_steps).__name__}")
        if corrector_steps < 0:
            raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
        corrector_norms = "expected" if corrector_norms is None else corrector_norms
        _choice("corrector_norms", corrector_norms, CORRECTOR_NORMS)
    else:
        for name, v in (("snr", snr), ("corrector_steps", corrector_steps), ("corrector_norms", corrector_norms)):
            if v is not None:
                raise ValueError(f"{name} only applies to method='pc', got {name}={v!r} with method={method!r}")
    if method == "ode":
        ode_solver = "heun" if ode_solver is None else ode_solver
        _choice("ode_solver", ode_solver, ODE_SOLVERS)
    elif ode_solver is not None:
        raise ValueError(f"ode_solver only applies to method='ode', got ode_solver={ode_solver!r} with "
                         f"method={method!r}")
    if variance_type in ("learned", "learned_range") and len(sample_shape) < 1:
        raise ValueError(f"variance_type={variance_type!r} needs a channel dimension: shape (N, C, ...)")
    for name, v in (("start", start), ("count", count)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    dev = _resolve_device(model, device)
    if cuda_graph and dev.type != "cuda":
        _check_graph_support(dev, True)
    return dict(snr=snr, corrector_steps=corrector_steps, corrector_norms=corrector_norms, ode_solver=ode_solver,
                device=dev)


def _check_shape(shape):
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 1 or \
            not all(_is_int(s) for s in shape):
        raise TypeError(f"shape must be a tuple of ints (num_samples, *sample_shape), got {shape!r}")
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must have entries >= 1, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _sample_range(model, sample_shape, schedule, *, start: int, count: int, method="ddpm", num_steps=None,
                  timestep_spacing="leading", eta=0.0, prediction_type="epsilon", variance_type="fixed_small",
                  clip_sample=False, seed=0, batch_size=None, device=None, dtype=torch.float32, progress=False,
                  cuda_graph=False, callback=None, snr=None, corrector_steps=None, corrector_norms=None,
                  ode_solver=None, backend="auto", check_finite=False) -> torch.Tensor:
    """Samples with global indices ``start .. start + count − 1`` ([count, *sample_shape]): the building block of
    :func:`sample` (start = 0) and of runs split across processes (each takes its own range; the union is the
    single-process run, bit for bit on one backend). Arguments as :func:`sample`."""
    if not isinstance(sample_shape, (tuple, list, torch.Size)):
        raise TypeError(f"sample_shape must be a tuple of ints, got {sample_shape!r}")
    sample_shape = _check_shape((1,) + tuple(sample_shape))[1:]
    r = _validate(model, sample_shape, schedule, method=method, num_steps=num_steps,
                  timestep_spacing=timestep_spacing, eta=eta, prediction_type=prediction_type,
                  variance_type=variance_type, clip_sample=clip_sample, seed=seed, batch_size=batch_size,
                  device=device, dtype=dtype, progress=progress, cuda_graph=cuda_graph, callback=callback, snr=snr,
                  corrector_steps=corrector_steps, corrector_norms=corrector_norms, ode_solver=ode_solver,
                  backend=backend, start=start, count=count, check_finite=check_finite)
    plan = _Plan(model, sample_shape, schedule, method=method, num_steps=num_steps,
                 timestep_spacing=timestep_spacing, eta=float(eta), prediction_type=prediction_type,
                 variance_type=variance_type, clip_sample=clip_sample, seed=seed, device=r["device"], dtype=dtype,
                 snr=r["snr"], corrector_steps=r["corrector_steps"], corrector_norms=r["corrector_norms"],
                 ode_solver=r["ode_solver"], backend=backend)
    if cuda_graph:
        _check_graph_support(plan.device, plan.fused)
    result = torch.empty((count,) + sample_shape, dtype=dtype, device=plan.device)
    bs = count if batch_size is None else min(batch_size, count)
    chunks = [(c, min(bs, count - c)) for c in range(0, count, max(bs, 1))]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError("progress=True needs tqdm: pip install tqdm (or fastrev[progress])") from None
        bar = tqdm(total=len(chunks) * plan.N, desc=f"fastrev {method}", unit="step")
    from .kernels.reverse_step import device_guard
    try:
        # sampling never needs gradients (a module's parameters would chain an autograd graph through every step),
        # and CUDA work (launches, graph capture streams) must run on the sampling device, not the current one
        with torch.no_grad(), device_guard(plan.device):
            for c, n in chunks:
                result[c:c + n] = _run_chunk(plan, n, start + c, callback=callback, bar=bar, cuda_graph=cuda_graph,
                                             check_finite=check_finite)
    finally:
        if bar is not None:
            bar.close()
    return result


def sample(model: Callable, shape, schedule: Schedule, *, method: str = "ddpm", num_steps: Optional[int] = None,
           timestep_spacing: str = "leading", eta: float = 0.0, prediction_type: str = "epsilon",
           variance_type: str = "fixed_small", clip_sample: bool = False, seed=0, batch_size: Optional[int] = None,
           device=None, dtype: torch.dtype = torch.float32, progress: bool = False, cuda_graph: bool = False,
           callback: Optional[Callable] = None, snr: Optional[float] = None, corrector_steps: Optional[int] = None,
           corrector_norms: Optional[str] = None, ode_solver: Optional[str] = None,
           backend: str = "auto", check_finite: bool = False) -> torch.Tensor:
    """A whole sampling run: ``shape[0]`` samples of shape ``shape[1:]`` from ``model`` with ``method``.

    Each step is the model call plus one fused launch (see the module doc for the tables, the noise keying and what
    the ODE's second stage and the PC corrector add).

    Args:
        model: ``model(x, t) -> prediction`` with x [B, *shape[1:]] (``dtype``, on ``device``) and t int64 [B]
            *training* timesteps (respaced runs feed the model the steps it was trained on). Returns ε, x₀ or v
            (``prediction_type``) shaped like x, or with 2C channels for learned variances.
        shape: (num_samples, *sample_shape).
        schedule: the :class:`fastrev.Schedule` the model was trained with.
        method: "ddpm" (ancestral), "ddim" (DDIM(η)), "sde" (Euler–Maruyama on the reverse VP-SDE), "ode"
            (probability-flow ODE, Heun by default) or "pc" (reverse-diffusion predictor + Langevin corrector).
        num_steps: respace to this many steps (None: every step of ``schedule``).
        timestep_spacing: "leading", "linspace", "trailing" or an improved-diffusion string ("ddim50", "10,15,20").
        eta: DDIM's η in [0, 1] (method "ddim" only).
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: "fixed_small", "fixed_large", "learned" (extra channels are log σ²) or "learned_range"
            (ddpm's variance; with a learned type every method takes the first C output channels as the prediction).
        clip_sample: clamp x̂₀ to [−1, 1]; ε̂ (and the score) are then re-derived from the clipped x̂₀.
        seed: int (or int64 tensor) keying the counter-based noise (see module doc).
        batch_size: chunk size (None: all at once). Results do not depend on it.
        device: where to sample (None: the model's device if it is an nn.Module with parameters, else CUDA if
            available, else the CPU).
        dtype: the state's dtype (float16/bfloat16/float32; float64 runs on the reference backend).
        progress: show a tqdm bar (needs tqdm).
        cuda_graph: capture one step (model call(s) + launches) in a CUDA graph per chunk and replay it (CUDA only;
            the model must be capturable: no host syncs). The last ODE step (Euler) runs outside the graph.
        callback: ``callback(i, t, x, x0)`` after every step: i counts steps from 0, t is the training timestep (int),
            x the chunk's new state and x0 its x̂₀ prediction (buffers that the next step overwrites: clone to keep).
            With ``batch_size`` below the sample count it is called per chunk.
        snr, corrector_steps: the PC corrector's signal-to-noise ratio (0.16) and Langevin steps per step (1).
        corrector_norms: how the PC corrector sizes its steps: "expected" (default: ‖z‖², ‖s‖² replaced by their
            expectations d and d/(1 − ᾱ), a table) or "sample" (each sample's own norms, score_sde's rule made
            per-sample: a reduction pass; biased in low dimension, see the module doc).
        ode_solver: "heun" (default) or "euler" (method "ode" only).
        backend: "auto" (fused kernel on CUDA, reference elsewhere), "triton" or "reference".
        check_finite: after every step, check the state for NaN/Inf (a host sync per step) and raise
            ``FloatingPointError`` naming the step where a non-finite value first appeared.

    Returns:
        the samples, ``shape``, ``dtype``, on ``device``.
    """
    shape = _check_shape(shape)
    return _sample_range(model, shape[1:], schedule, start=0, count=shape[0], method=method, num_steps=num_steps,
                         timestep_spacing=timestep_spacing, eta=eta, prediction_type=prediction_type,
                         variance_type=variance_type, clip_sample=clip_sample, seed=seed, batch_size=batch_size,
                         device=device, dtype=dtype, progress=progress, cuda_graph=cuda_graph, callback=callback,
                         snr=snr, corrector_steps=corrector_steps, corrector_norms=corrector_norms,
                         ode_solver=ode_solver, backend=backend, check_finite=check_finite)
