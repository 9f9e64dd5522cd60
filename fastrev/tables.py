"""Per-timestep coefficient tables: every sampler step is the same Gaussian update with different numbers.

One row per schedule index t, built once in float64 on the host, cached per (schedule, options, device) as float32,
and gathered by the fused kernel with the per-sample t:

    x̂₀     = A·x_t + B·out [+ Z0·z]                       (optionally clipped: ±CLIP, or dynamic threshold; the
                                                           Z0·z term only with ``x0_noise``: Euler's churn)
    x_{t−1} = C0·x̂₀ + C1·x_t + C2·out + Σ_j Dj·h_j + σ·z   (h_0..h_3: the solver history, 0 to 4 more states:
                                                           h_0 = ``base`` with D0 = D, e.g. Heun's 2nd stage;
                                                           earlier x̂₀'s for multistep solvers)
    aux     = AX0·x̂₀ + AX·x_t + Σ_j AHj·h_j               (only when an aux output is requested: e.g. UniPC's
                                                           corrected sample, or ε̂ for an ε-history)
    σ       = SIGMA                                        (VAR_FIXED)
            = SIGMA·exp(½·v)                               (VAR_LOG: the model's extra channels are log σ²)
            = SIGMA·exp(½·(f·LOG_HI + (1−f)·LOG_LO)), f = (v+1)/2   (VAR_RANGE)
            = SIGMA·√v                                     (VAR_LINEAR: extra channels are σ², diffusers "learned")

where ``out`` is the raw model output (ε, x₀ or v), z the same noise in x̂₀ and x_{t−1} (the caller's, or the counter
stream of :mod:`fastrev.noise`). For learned variances SIGMA is the 0/1 noise switch. When x̂₀ is
not clipped, C0 is folded into C1 and C2 on the host (C0 = 0), so the step never goes through the amplified x̂₀
(1/√ᾱ_t is ~157 at t = 999 of the linear schedule): better fp32 accuracy for free. A new sampler is a new table.
"""

from __future__ import annotations

import torch

from .kernels.modes import VAR_FIXED, VAR_LINEAR, VAR_LOG, VAR_RANGE
from .reference import PREDICTION_TYPES, VARIANCE_TYPES
from .schedule import Schedule

__all__ = ["NCOL", "COL", "HISTORY_COLS", "AUX_HISTORY_COLS", "MAX_HISTORY", "history_tuple", "columns_needed",
           "VAR_MODES", "x0_coefficients", "eps_coefficients", "ddpm_table", "ddim_table", "finish_table",
           "device_table", "apply_table", "sorted_dynamic_threshold", "eps_linear", "VAR_FIXED", "VAR_LOG", "VAR_RANGE",
           "VAR_LINEAR"]

COL = dict(A=0, B=1, C0=2, C1=3, C2=4, SIGMA=5, LOG_LO=6, LOG_HI=7, CLIP=8, D0=9, D1=10, D2=11, D3=12,
           AX0=13, AX=14, AH0=15, AH1=16, AH2=17, AH3=18, Z0=19)
COL["D"] = COL["D0"]        # the history-of-one column (``base``), by its older name
NCOL = 20
HISTORY_COLS = ("D0", "D1", "D2", "D3")            # column of history entry h_j in x_{t−1}
AUX_HISTORY_COLS = ("AH0", "AH1", "AH2", "AH3")    # column of history entry h_j in aux
MAX_HISTORY = len(HISTORY_COLS)
VAR_MODES = {"fixed_small": VAR_FIXED, "fixed_large": VAR_FIXED, "learned": VAR_LOG, "learned_range": VAR_RANGE}


def x0_coefficients(schedule: Schedule, prediction_type: str):
    """(A, B) with x̂₀ = A·x_t + B·out, float64 [T]."""
    s = schedule
    if prediction_type == "epsilon":
        return s.sqrt_recip_alpha_bars, -s.sqrt_recipm1_alpha_bars
    if prediction_type == "sample":
        return torch.zeros_like(s.betas), torch.ones_like(s.betas)
    if prediction_type == "v_prediction":
        return s.sqrt_alpha_bars, -s.sqrt_one_minus_alpha_bars
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_coefficients(schedule: Schedule, prediction_type: str):
    """(E_x, E_o) with ε̂ = E_x·x_t + E_o·out from the raw output, float64 [T]."""
    s = schedule
    if prediction_type == "epsilon":
        return torch.zeros_like(s.betas), torch.ones_like(s.betas)
    if prediction_type == "sample":
        r = 1.0 / s.sqrt_one_minus_alpha_bars
        return r, -s.sqrt_alpha_bars * r
    if prediction_type == "v_prediction":
        return s.sqrt_one_minus_alpha_bars, s.sqrt_alpha_bars
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_linear(schedule: Schedule, prediction_type: str, clipped: bool):
    """(Kx, K0, Ko), float64 [T]: ε̂ = Kx·x_t + K0·x̂₀ + Ko·out — from the raw output (:func:`eps_coefficients`), or
    re-derived from the clipped x̂₀ when ``clipped``: ε̂ = (x_t − √ᾱ x̂₀)/√(1 − ᾱ)."""
    s = schedule
    if clipped:
        r = 1.0 / s.sqrt_one_minus_alpha_bars
        return r, -s.sqrt_alpha_bars * r, torch.zeros_like(r)
    Ex, Eo = eps_coefficients(s, prediction_type)
    return Ex, torch.zeros_like(Ex), Eo


def finish_table(A, B, C0, C1, C2, sigma, *, clip: bool, clip_range: float = 1.0, log_lo=None, log_hi=None,
                 D=None, D1=None, D2=None, D3=None, AX0=None, AX=None, AH0=None, AH1=None, AH2=None, AH3=None,
                 Z0=None, D0=None):
    """Stack the columns into a float64 [T, NCOL] table; fold C0 into C1/C2 when x̂₀ is not clipped. ``D`` (or
    ``D0``), ``D1``..``D3``: the history columns; ``AX0``, ``AX``, ``AH0``..``AH3``: the aux output's; ``Z0``: x̂₀'s
    noise coefficient (``x0_noise``). Each zero when None; a number is a constant column.

    The C0 fold only touches x_{t−1}'s columns (the aux output's AX0·x̂₀ is taken as given), and it is skipped when
    a Z0 column is given: x_{t−1} then keeps C0·x̂₀, so it sees x̂₀'s noise term C0·Z0·z."""
    if D is not None and D0 is not None:
        raise ValueError("finish_table: give the first history column as D or D0, not both")
    D = D0 if D is None else D
    if not clip and Z0 is None:
        C1, C2, C0 = C1 + C0 * A, C2 + C0 * B, torch.zeros_like(C0)
    zeros = torch.zeros_like(A)

    def column(c):
        if c is None:
            return zeros
        if isinstance(c, (int, float)):
            return torch.full_like(A, float(c))
        return c

    cols = [A, B, C0, C1, C2, sigma, column(log_lo), column(log_hi), torch.full_like(A, float(clip_range))] + \
        [column(c) for c in (D, D1, D2, D3, AX0, AX, AH0, AH1, AH2, AH3, Z0)]
    return torch.stack([c.to(torch.float64) for c in cols], dim=1)


def ddpm_table(schedule: Schedule, prediction_type="epsilon", variance_type="fixed_small", clip=False,
               clip_range=1.0):
    """Ancestral DDPM: x_{t−1} = μ̃_t(x_t, x̂₀) + σ_t z; no noise at t = 0 (SIGMA = 0 there)."""
    s = schedule
    A, B = x0_coefficients(s, prediction_type)
    nonzero = (torch.arange(s.num_timesteps) > 0).to(torch.float64)
    if variance_type == "fixed_small":
        sigma = torch.exp(0.5 * s.posterior_log_variance_clipped) * nonzero
    elif variance_type == "fixed_large":
        first = s.posterior_variance[1:2] if s.num_timesteps > 1 else s.betas[:1]
        sigma = torch.sqrt(torch.cat([first, s.betas[1:]])) * nonzero
    elif variance_type in ("learned", "learned_range"):
        sigma = nonzero
    else:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    return finish_table(A, B, s.posterior_mean_coef1, s.posterior_mean_coef2, torch.zeros_like(A), sigma,
                        clip=clip, clip_range=clip_range, log_lo=s.posterior_log_variance_clipped,
                        log_hi=s.log_betas)


def ddim_table(schedule: Schedule, prediction_type="epsilon", eta=0.0, clip=False, clip_range=1.0,
               use_clipped_model_output=False):
    """DDIM(η): x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ²) ε̂ + σ z, σ = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}).
    ε̂ is linear in (x_t, out) — or in (x_t, x̂₀) when re-derived from the clipped x̂₀ — so it folds into C0..C2."""
    s = schedule
    A, B = x0_coefficients(s, prediction_type)
    ab, ab_prev = s.alpha_bars, s.alpha_bars_prev
    # 1 − ᾱ_t/ᾱ_{t−1} is β_t: take the schedule's β (no cancellation at short strides)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(s.betas)
    d2 = 1 - ab_prev - sigma**2
    if (d2 < -1e-12).any():
        raise ValueError(f"eta={eta} makes 1 − ᾱ_prev − σ² negative (DDIM needs 0 <= eta <= 1 here)")
    d = torch.sqrt(d2.clamp_min(0))
    Kx, K0, Ko = eps_linear(s, prediction_type, clip and use_clipped_model_output)
    C0, C1, C2 = s.sqrt_alpha_bars_prev + d * K0, d * Kx, d * Ko
    return finish_table(A, B, C0, C1, C2, sigma, clip=clip, clip_range=clip_range)


def device_table(schedule: Schedule, key: tuple, build, device, dtype=torch.float32) -> torch.Tensor:
    """``build()`` (float64 [T, NCOL], built on the host) as a contiguous ``dtype`` table on ``device`` (float32 for
    the kernel and the torch path; float64 only for float64 inputs and the reference), cached on the schedule. The
    cast happens on the host: no float64 tensor reaches ``device`` unless ``dtype`` is float64."""
    if dtype == torch.float32:      # the historical cache key: float32 tables are shared with older callers
        return schedule.cached(("table",) + key, device, lambda: build().to(torch.float32).contiguous())
    return schedule.cached(("table",) + key + (dtype,), device, lambda: build().to(dtype).contiguous())


def sorted_dynamic_threshold(x0, ratio=0.995, max_value=1.0):
    """Dynamic thresholding (``reference.dynamic_threshold``'s semantics) from one sort and plain arithmetic: the
    per-sample quantile with linear interpolation, s = clamp(q, 1, max_value), x̂₀ ← clamp(x̂₀, −s, s)/s. For devices
    where ``torch.quantile(dim=...)``/``lerp``/``kthvalue`` are missing or unreliable (MPS: pytorch/pytorch#101878);
    equal to the quantile path to an ulp of s. Keeps float32/float64, computes half precision in float32."""
    dtype = x0.dtype
    x = x0 if dtype in (torch.float32, torch.float64) else x0.float()
    B = x.shape[0]
    flat = x.reshape(B, -1)
    n = flat.shape[1]
    if n == 0:
        return x0
    srt = flat.abs().sort(dim=1).values
    pos = ratio * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    q = srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo])
    s = q.clamp(min=1.0, max=max_value).reshape((B,) + (1,) * (x.dim() - 1))
    return (torch.clamp(x, -s, s) / s).to(dtype)


def history_tuple(base=None, history=None) -> tuple:
    """The solver history as a tuple of 0–4 tensors (h_0, h_1, h_2, h_3) from ``base`` (a history of one) or
    ``history`` (a sequence; not both)."""
    if history is None:
        return () if base is None else (base,)
    if base is not None:
        raise ValueError("give the solver history as base= (one tensor) or history= (a sequence), not both")
    if isinstance(history, torch.Tensor) or not isinstance(history, (tuple, list)):
        raise TypeError(f"history must be a tuple or list of 0 to {MAX_HISTORY} tensors, got {type(history).__name__}")
    if len(history) > MAX_HISTORY or any(not isinstance(h, torch.Tensor) for h in history):
        raise ValueError(f"history must hold 0 to {MAX_HISTORY} tensors, got {len(history)} entries "
                         f"({', '.join(type(h).__name__ for h in history)})")
    return tuple(history)


def columns_needed(n_hist: int = 0, aux: bool = False, x0_noise: bool = False) -> int:
    """How many leading columns an update reads: a table built before the aux and x0_noise columns existed (12
    columns) still serves every update with at most 3 history tensors, no aux output and no x0_noise."""
    n = COL["CLIP"] + 1 + n_hist
    if aux:
        n = max(n, COL["AX"] + 1, COL["AH0"] + n_hist)
    if x0_noise:
        n = max(n, COL["Z0"] + 1)
    return n


def apply_table(table, rows, x, out, *, var=None, z=None, base=None, history=None, clip=False, thresholding=False,
                ratio=0.995, max_value=1.0, var_mode=VAR_FIXED, dtype=torch.float64, aux=False, x0_noise=False):
    """The fused kernel's update in eager torch, computed in ``dtype``, from a table: returns (x_{t−1}, x̂₀) in
    ``dtype``, or (x_{t−1}, x̂₀, aux) with ``aux=True``.

    ``table``: [T, NCOL] (any float dtype, any device); ``rows``: int64 [B]; ``x``/``out``/``var``/``z``/``base``:
    [B, ...] (``var`` the learned-variance channels, ``z`` the noise or None for no noise); ``history``: up to four
    [B, ...] tensors h_0..h_3 with columns D0..D3 (``base`` is a history of one); ``aux``: also compute
    AX0·x̂₀ + AX·x + Σ_j AHj·h_j; ``x0_noise``: add Z0·z to x̂₀ before the clip (needs ``z``; not with
    ``thresholding``). Thresholding uses the
    reference's ``dynamic_threshold``. ``dtype=torch.float32`` is the "torch" backend's update (what the ops, the
    samplers and the diffusers drop-ins run off CUDA; every op stays in float32, so it runs where float64 does not,
    e.g. MPS); ``float64`` (the default) is the float64 twin used by ``backend="reference"`` on a float64 table.
    Both are the torch twin of ``kernels/reverse_step.py`` (tests hold each to the float64 reference).
    """
    from .reference import dynamic_threshold

    if x0_noise and z is None:
        raise ValueError("x0_noise: adding Z0·z to x̂₀ needs the noise z")
    if x0_noise and thresholding:
        raise ValueError("x0_noise cannot be combined with thresholding (the threshold's quantile does not see z)")
    hist = history_tuple(base, history)
    need = columns_needed(len(hist), aux, x0_noise)
    if table.shape[-1] < need:
        raise ValueError(f"table: this update reads {need} columns (history {len(hist)}, aux={aux}, "
                         f"x0_noise={x0_noise}), got a table of {table.shape[-1]} (fastrev.tables.NCOL = {NCOL})")
    cd = dtype
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    c = table.index_select(0, rows)
    c = c if c.dtype == cd else c.to(cd)

    def col(name):
        return c[:, COL[name]].reshape(shape)

    xd, od = x.to(cd), out.to(cd)
    zd = None if z is None else z.to(cd)
    x0 = col("A") * xd + col("B") * od
    if x0_noise:        # the same z as x_{t−1}'s, before the clip (not gated by SIGMA: Z0 is its own switch)
        x0 = x0 + col("Z0") * zd
    if thresholding:
        x0 = dynamic_threshold(x0, ratio, max_value) if x0.device.type in ("cpu", "cuda") else \
            sorted_dynamic_threshold(x0, ratio, max_value)
    elif clip:
        r = col("CLIP")
        x0 = torch.maximum(torch.minimum(x0, r), -r)             # NaN-propagating, like the kernel's clamp
    prev = col("C0") * x0 + col("C1") * xd + col("C2") * od
    a = col("AX0") * x0 + col("AX") * xd if aux else None
    for j, h in enumerate(hist):                               # h_0..h_3 in order, as the kernel
        hd = h.to(cd)
        prev = prev + col(HISTORY_COLS[j]) * hd
        if aux:
            a = a + col(AUX_HISTORY_COLS[j]) * hd
    if z is not None:
        sig = col("SIGMA")
        if var_mode == VAR_FIXED:
            sigma = sig
        else:
            v = var.to(cd)
            if var_mode == VAR_LOG:
                sigma = sig * torch.exp(0.5 * v)
            elif var_mode == VAR_RANGE:
                frac = (v + 1.0) * 0.5
                sigma = sig * torch.exp(0.5 * (frac * col("LOG_HI") + (1.0 - frac) * col("LOG_LO")))
            else:
                sigma = sig * torch.sqrt(v)
        prev = torch.where(sig != 0, prev + sigma * zd, prev)      # the table's switch, as the kernel
    return (prev, x0, a) if aux else (prev, x0)
