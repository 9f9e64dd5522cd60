"""The reference: pure PyTorch, exact in float64 — the oracle every kernel is proven against.

Notation of ``shared/seed/reverse-process.md``. ``t`` is always a per-sample int tensor of schedule indices, shape
[B]; tables (``alpha_bars``, ``betas``, ...) are 1-D tensors indexed by t. Per-sample coefficients broadcast over the
trailing dimensions of x. ``compute_posterior_params`` and ``reverse_mean_from_noise`` are the seed's functions,
verbatim in signature and semantics (at t = 0, ᾱ_{t−1} = 1). Every function computes in the dtype it is given; pass
float64 tensors for the oracle.
"""

from __future__ import annotations

import torch

__all__ = [
    "PREDICTION_TYPES", "VARIANCE_TYPES",
    "compute_posterior_params", "reverse_mean_from_noise",
    "predict_x0_from_eps", "predict_x0_from_v", "predict_x0", "predict_eps_from_x0", "predict_eps",
    "reverse_mean", "posterior_log_variance", "clip_x0", "dynamic_threshold", "per_sample_quantile",
    "ddim_sigma", "ddim_step", "ddpm_step",
    "score_from_eps", "eps_from_score", "vp_sde_drift", "euler_maruyama_step", "langevin_step",
    "probability_flow_drift",
]

# the canonical vocabularies: every other module imports these (fastrev.diffusers adds diffusers' extra variances)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] per-sample coefficient → [B, 1, ..., 1] to broadcast against ``like``."""
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


def _prev(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t − 1], with 1 at t = 0 (the seed's ᾱ_{t−1} convention)."""
    return torch.where(t > 0, table[(t - 1).clamp_min(0)], torch.ones_like(table[t]))


# ---------------------------------------------------------------------------------------------- the seed's functions
def compute_posterior_params(x_0, x_t, t, alpha_bars, betas):
    """Parameters of q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I).

    β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t);
    μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t, with α_t = 1 − β_t.

    Returns:
        (posterior_mean shaped like x_0, posterior_variance shaped like t)
    """
    alpha_bar_t = alpha_bars[t]
    alpha_bar_prev = torch.where(t > 0, alpha_bars[(t - 1).clamp_min(0)], torch.ones_like(alpha_bar_t))
    beta_t = betas[t]
    alpha_t = 1.0 - beta_t
    posterior_var = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    coef_x0 = torch.sqrt(alpha_bar_prev) * beta_t / (1 - alpha_bar_t)
    coef_xt = torch.sqrt(alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    posterior_mean = _bcast(coef_x0, x_0) * x_0 + _bcast(coef_xt, x_t) * x_t
    return posterior_mean, posterior_var


def reverse_mean_from_noise(x_t, t, eps_pred, alphas, alpha_bars):
    """μ_θ(x_t, t) = (1/√α_t) (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε_θ)."""
    alpha_t = _bcast(alphas[t], x_t)
    alpha_bar_t = _bcast(alpha_bars[t], x_t)
    return (1.0 / torch.sqrt(alpha_t)) * (x_t - (1.0 - alpha_t) / torch.sqrt(1.0 - alpha_bar_t) * eps_pred)


# ---------------------------------------------------------------------------------------------- parameterisations
def predict_x0_from_eps(x_t, t, eps, alpha_bars):
    """x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
    ab = _bcast(alpha_bars[t], x_t)
    return (x_t - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)


def predict_x0_from_v(x_t, t, v, alpha_bars):
    """x̂₀ = √ᾱ_t x_t − √(1 − ᾱ_t) v  (v = √ᾱ_t ε − √(1 − ᾱ_t) x₀; Salimans & Ho 2022)."""
    ab = _bcast(alpha_bars[t], x_t)
    return torch.sqrt(ab) * x_t - torch.sqrt(1 - ab) * v


def predict_x0(x_t, t, model_output, alpha_bars, prediction_type="epsilon"):
    """x̂₀ for ``prediction_type`` ∈ {"epsilon", "sample" (x̂₀ = output), "v_prediction"}."""
    if prediction_type == "epsilon":
        return predict_x0_from_eps(x_t, t, model_output, alpha_bars)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return predict_x0_from_v(x_t, t, model_output, alpha_bars)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict_eps_from_x0(x_t, t, x0, alpha_bars):
    """ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)."""
    ab = _bcast(alpha_bars[t], x_t)
    return (x_t - torch.sqrt(ab) * x0) / torch.sqrt(1 - ab)


def predict_eps(x_t, t, model_output, alpha_bars, prediction_type="epsilon"):
    """ε̂ straight from the raw (unclipped) model output: the output (ε), re-derived from x̂₀ = output ("sample"),
    or √ᾱ_t v + √(1 − ᾱ_t) x_t ("v_prediction")."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return predict_eps_from_x0(x_t, t, model_output, alpha_bars)
    if prediction_type == "v_prediction":
        ab = _bcast(alpha_bars[t], x_t)
        return torch.sqrt(ab) * model_output + torch.sqrt(1 - ab) * x_t
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def reverse_mean(x_t, t, model_output, alpha_bars, betas, prediction_type="epsilon"):
    """μ_θ = μ̃_t(x_t, x̂₀) with x̂₀ from the model output (no clipping): the table of the seed, every row."""
    x0 = predict_x0(x_t, t, model_output, alpha_bars, prediction_type)
    return compute_posterior_params(x0, x_t, t, alpha_bars, betas)[0]


# ---------------------------------------------------------------------------------------------- variances
def posterior_log_variance(t, alpha_bars, betas, variance_type="fixed_small", model_var_values=None):
    """log σ_t² for the reverse step (improved-diffusion semantics).

    * "fixed_small": log β̃_t, with β̃_0 replaced by β̃_1 (``posterior_log_variance_clipped``).
    * "fixed_large": log β_t, with β_0 replaced by β̃_1.
    * "learned": the model's extra channels *are* log σ².
    * "learned_range": frac = (v + 1)/2, log σ² = frac · log β_t + (1 − frac) · log β̃_t (clipped).

    Returns a [B] tensor for fixed types, a tensor shaped like ``model_var_values`` for learned ones. The value at
    t = 0 is irrelevant to sampling (no noise is added there) but finite.
    """
    n = betas.shape[0]
    ab_prev = torch.cat([torch.ones_like(alpha_bars[:1]), alpha_bars[:-1]])
    post = betas * (1 - ab_prev) / (1 - alpha_bars)
    first = post[1:2] if n > 1 else betas[:1]
    log_post = torch.log(torch.cat([first, post[1:]]))
    if variance_type == "fixed_small":
        return log_post[t]
    if variance_type == "fixed_large":
        return torch.log(torch.cat([first, betas[1:]]))[t]
    if variance_type in ("learned", "learned_range"):
        if model_var_values is None:
            raise ValueError(f"variance_type={variance_type!r} needs model_var_values")
        if variance_type == "learned":
            return model_var_values
        frac = (model_var_values + 1) / 2
        return frac * _bcast(torch.log(betas)[t], frac) + (1 - frac) * _bcast(log_post[t], frac)
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


# ---------------------------------------------------------------------------------------------- clipping
def clip_x0(x0, clip_range=1.0):
    """x̂₀ clamped to [−clip_range, clip_range] (NaN stays NaN)."""
    return x0.clamp(-clip_range, clip_range)


_QUANTILE_MAX = 2**24       # torch.quantile refuses larger inputs ("input tensor is too large")


def per_sample_quantile(x2d, q):
    """torch.quantile(x2d, q, dim=1) (linear interpolation) for [B, n], without torch.quantile's 2²⁴-element limit
    (two kthvalue selections and a lerp past it)."""
    n = x2d.shape[1]
    if n <= _QUANTILE_MAX:
        return torch.quantile(x2d, q, dim=1)
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = x2d.kthvalue(lo + 1, dim=1).values
    v_hi = x2d.kthvalue(hi + 1, dim=1).values
    return torch.lerp(v_lo, v_hi, pos - lo)


def dynamic_threshold(x0, ratio=0.995, max_value=1.0):
    """Imagen's dynamic thresholding, diffusers ``_threshold_sample`` semantics: per sample
    s = clamp(quantile(|x̂₀| flattened, ratio), 1, max_value); x̂₀ ← clamp(x̂₀, −s, s) / s.
    Computed in float32 at least (float64 stays float64)."""
    dtype = x0.dtype
    x = x0 if dtype in (torch.float32, torch.float64) else x0.float()
    B = x.shape[0]
    flat = x.reshape(B, -1)
    s = per_sample_quantile(flat.abs(), ratio).clamp(min=1.0, max=max_value)
    s = s.reshape((B,) + (1,) * (x.dim() - 1))
    return (torch.clamp(x, -s, s) / s).to(dtype)


# ---------------------------------------------------------------------------------------------- whole steps
def ddpm_step(x_t, t, model_output, alpha_bars, betas, *, prediction_type="epsilon",
              variance_type="fixed_small", model_var_values=None, clip_range=None, threshold=None, noise=None):
    """One ancestral step: x_{t−1} = μ̃_t(x_t, x̂₀) + σ_t z, with no noise where t = 0.

    ``clip_range``: clamp x̂₀ to ±clip_range; ``threshold``: (ratio, max_value) for dynamic thresholding
    (takes precedence). Returns (x_{t−1}, x̂₀).
    """
    x0 = predict_x0(x_t, t, model_output, alpha_bars, prediction_type)
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    elif clip_range is not None:
        x0 = clip_x0(x0, clip_range)
    mean, _ = compute_posterior_params(x0, x_t, t, alpha_bars, betas)
    if noise is None:
        return mean, x0
    logvar = posterior_log_variance(t, alpha_bars, betas, variance_type, model_var_values)
    if logvar.dim() == 1:
        logvar = _bcast(logvar, x_t)
    std = torch.exp(0.5 * logvar)
    nonzero = _bcast(t > 0, x_t)
    return torch.where(nonzero, mean + std * noise, mean), x0        # no variance term at all where t = 0


def ddim_sigma(t, alpha_bars, eta):
    """σ_t(η) = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})  (Song et al. 2021, eq. 16)."""
    ab = alpha_bars[t]
    ab_prev = _prev(alpha_bars, t)
    return eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)


def ddim_step(x_t, t, model_output, alpha_bars, *, eta=0.0, prediction_type="epsilon", clip_range=None,
              threshold=None, use_clipped_model_output=False, noise=None):
    """DDIM(η): x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z.

    ε̂ comes from the raw model output (:func:`predict_eps`), or from the clipped x̂₀ when
    ``use_clipped_model_output`` (improved-diffusion always does the latter). Returns (x_{t−1}, x̂₀).
    """
    x0 = predict_x0(x_t, t, model_output, alpha_bars, prediction_type)
    eps = predict_eps(x_t, t, model_output, alpha_bars, prediction_type)
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    elif clip_range is not None:
        x0 = clip_x0(x0, clip_range)
    if use_clipped_model_output:
        eps = predict_eps_from_x0(x_t, t, x0, alpha_bars)
    sigma = ddim_sigma(t, alpha_bars, eta)
    ab_prev = _prev(alpha_bars, t)
    prev = _bcast(torch.sqrt(ab_prev), x0) * x0 + _bcast(torch.sqrt(1 - ab_prev - sigma**2), eps) * eps
    if noise is not None:
        prev = prev + _bcast(sigma, noise) * noise
    return prev, x0


# ---------------------------------------------------------------------------------------------- continuous time
def score_from_eps(eps, alpha_bar_t):
    """s_θ(x_t, t) = −ε_θ / √(1 − ᾱ_t)  (``alpha_bar_t`` per sample [B] or a float)."""
    ab = _bcast(alpha_bar_t, eps) if isinstance(alpha_bar_t, torch.Tensor) else alpha_bar_t
    return -eps / (1 - ab) ** 0.5


def eps_from_score(score, alpha_bar_t):
    """ε_θ = −√(1 − ᾱ_t) · s_θ."""
    ab = _bcast(alpha_bar_t, score) if isinstance(alpha_bar_t, torch.Tensor) else alpha_bar_t
    return -score * (1 - ab) ** 0.5


def vp_sde_drift(x, beta_t, score):
    """Reverse VP-SDE drift f − g² ∇log p = −½ β(t) x − β(t) s  (per-sample or scalar β)."""
    b = _bcast(beta_t, x) if isinstance(beta_t, torch.Tensor) else beta_t
    return -0.5 * b * x - b * score


def probability_flow_drift(x, beta_t, score):
    """Probability-flow ODE drift −½ β(t) x − ½ β(t) s."""
    b = _bcast(beta_t, x) if isinstance(beta_t, torch.Tensor) else beta_t
    return -0.5 * b * x - 0.5 * b * score


def euler_maruyama_step(x, score, beta_t, dt, z):
    """One Euler–Maruyama step of the reverse VP-SDE backwards in time by dt > 0:
    x ← x − [−½β x − β s] dt + √(β dt) z."""
    b = _bcast(beta_t, x) if isinstance(beta_t, torch.Tensor) else beta_t
    return x - vp_sde_drift(x, beta_t, score) * dt + (b * dt) ** 0.5 * z


def langevin_step(x, score, step_size, z):
    """One Langevin step x ← x + ε s + √(2ε) z  (ε per sample [B] or a float)."""
    e = _bcast(step_size, x) if isinstance(step_size, torch.Tensor) else step_size
    return x + e * score + (2 * e) ** 0.5 * z
