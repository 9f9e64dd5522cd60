"""The sampling methods' coefficient tables (float64 [N, NCOL] on the host; :mod:`fastrev.tables` has the layout).

Each builder returns the table of one kind of step; the methods (:mod:`fastrev.sampling.methods`) pick which ones
they launch. ``S`` is the user's schedule, ``k`` the respaced indices into it, ``R = S.respace(k)``; row i is the
step *from* respaced index i (the flow tables: from grid point i + 1 to i). The math of every table is in the
package doc (:mod:`fastrev.sampling`).
"""

from __future__ import annotations

import torch

from .. import tables as T
from ..schedule import Schedule
from .options import DEFAULT_SNR

__all__ = ["score_update_table", "beta_dt", "sde_table", "ode_euler_table", "ode_heun_table", "pc_corrector_table",
           "pc_predictor_table", "euler_sigmas", "euler_table", "euler_ancestral_table", "flow_sigmas",
           "flow_euler_table"]


def score_update_table(R, prediction_type, clip, P, Q, sigma, D=None, at=None):
    """The table of x_new = P·x + Q·ε̂ (+ D·base) + σ·z, with ε̂ and x̂₀ taken at respaced indices ``at`` (default:
    each row's own index)."""
    A, Bc = T.x0_coefficients(R, prediction_type)
    Kx, K0, Ko = T.eps_linear(R, prediction_type, clip)
    if at is not None:
        A, Bc, Kx, K0, Ko = (c[at] for c in (A, Bc, Kx, K0, Ko))
    return T.finish_table(A, Bc, Q * K0, P + Q * Kx, Q * Ko, sigma, clip=clip, D=D)


# ------------------------------------------------------------------------------------------------ VP-SDE / ODE / PC
def beta_dt(S: Schedule, k: torch.Tensor):
    """(β(k_i), dt_i) float64 [N]: the piecewise-constant rate β = −log α_k of the base schedule at k_i and the step
    length k_i − k_{i−1} (k_{−1} = −1)."""
    rate = -torch.log(S.alphas)
    kk = k.to(torch.int64)
    prev = torch.cat([torch.tensor([-1], dtype=torch.int64), kk[:-1]])
    return rate[kk], (kk - prev).to(torch.float64)


def sde_table(S: Schedule, k, R: Schedule, prediction_type="epsilon", clip=False):
    """Euler–Maruyama on the reverse VP-SDE, float64 [N, NCOL]; no noise at row 0."""
    beta, dt = beta_dt(S, k)
    bdt = beta * dt
    sigma = torch.sqrt(bdt)
    sigma[0] = 0.0
    return score_update_table(R, prediction_type, clip, 1.0 + 0.5 * bdt, -bdt / R.sqrt_one_minus_alpha_bars, sigma)


def ode_euler_table(S: Schedule, k, R: Schedule, prediction_type="epsilon", clip=False):
    """x' = x + dt·d(x, k_i), d = ½βx + ½β s: Heun's first stage and the Euler solver, float64 [N, NCOL]."""
    beta, dt = beta_dt(S, k)
    bdt = beta * dt
    return score_update_table(R, prediction_type, clip, 1.0 + 0.5 * bdt, -0.5 * bdt / R.sqrt_one_minus_alpha_bars,
                              torch.zeros_like(bdt))


def ode_heun_table(S: Schedule, k, R: Schedule, prediction_type="epsilon", clip=False):
    """Heun's second stage at row i ≥ 1: x ← ½·base + ½x' + ½dt_i·d(x', k_{i−1}) with sample = x', out = the model at
    (x', k_{i−1}), base = x (column D = ½); ε̂ and x̂₀ use index i − 1. Row 0 is unused (zeros but D)."""
    beta, dt = beta_dt(S, k)
    N = R.num_timesteps
    at = (torch.arange(N) - 1).clamp_min(0)
    b2 = beta[at] * dt                                     # β(k_{i−1})·dt_i
    P = 0.5 + 0.25 * b2
    Q = -0.25 * b2 / R.sqrt_one_minus_alpha_bars[at]
    tab = score_update_table(R, prediction_type, clip, P, Q, torch.zeros_like(P), D=torch.full_like(P, 0.5), at=at)
    tab[0, :] = 0.0
    tab[0, T.COL["D"]] = 1.0
    tab[0, T.COL["CLIP"]] = 1.0
    return tab


def pc_corrector_table(R: Schedule, prediction_type="epsilon", clip=False, snr=DEFAULT_SNR):
    """The Langevin corrector with ``corrector_norms="expected"``: x ← x + ε_i s + √(2ε_i) z with
    ε_i = 2α'_i snr² (1 − ᾱ_i), float64 [N, NCOL] (noise at every row)."""
    step = 2.0 * R.alphas * snr**2 * (1.0 - R.alpha_bars)
    return score_update_table(R, prediction_type, clip, torch.ones_like(step), -step / R.sqrt_one_minus_alpha_bars,
                              torch.sqrt(2.0 * step))


def pc_predictor_table(R: Schedule, prediction_type="epsilon", clip=False):
    """score_sde's reverse-diffusion predictor on R: x ← (2 − √α'_i)x + β'_i s + √β'_i z, no noise at row 0."""
    sigma = torch.sqrt(R.betas)
    sigma[0] = 0.0
    return score_update_table(R, prediction_type, clip, 2.0 - R.sqrt_alphas, -R.betas / R.sqrt_one_minus_alpha_bars,
                              sigma)


# ------------------------------------------------------------------------------------------------ σ-space Euler
def euler_sigmas(R: Schedule):
    """(σ_i, σ_{i−1}) float64 [N]: σ = √((1 − ᾱ)/ᾱ) at each respaced index and at the next one visited (0 after
    the last: the run ends at the data)."""
    sigma = R.sqrt_recipm1_alpha_bars
    return sigma, torch.cat([torch.zeros(1, dtype=torch.float64), sigma[:-1]])


def euler_table(R: Schedule, prediction_type="epsilon", clip=False):
    """σ-space Euler, x̃ ← x̃ + (σ' − σ)·ε̂ on x̃ = x/√ᾱ, in the model's coordinates x = √ᾱ·x̃:
    x' = √(ᾱ'/ᾱ)·x + √ᾱ'(σ' − σ)·ε̂, float64 [N, NCOL], no noise."""
    sigma, sigma_next = euler_sigmas(R)
    P = R.sqrt_alpha_bars_prev * R.sqrt_recip_alpha_bars
    Q = R.sqrt_alpha_bars_prev * (sigma_next - sigma)
    return score_update_table(R, prediction_type, clip, P, Q, torch.zeros_like(P))


def euler_ancestral_table(R: Schedule, prediction_type="epsilon", clip=False):
    """σ-space Euler-ancestral (η = 1): x̃ ← x̃ + (σ_down − σ)·ε̂ + σ_up·z with σ_up = σ'·√((σ² − σ'²)/σ²),
    σ_down = √(σ'² − σ_up²), in the model's coordinates: x' = √(ᾱ'/ᾱ)·x + √ᾱ'(σ_down − σ)·ε̂ + √ᾱ'σ_up·z;
    float64 [N, NCOL], no noise at row 0 (σ' = 0)."""
    sigma, sigma_next = euler_sigmas(R)
    sigma_up = torch.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = torch.sqrt((sigma_next**2 - sigma_up**2).clamp_min(0))
    P = R.sqrt_alpha_bars_prev * R.sqrt_recip_alpha_bars
    Q = R.sqrt_alpha_bars_prev * (sigma_down - sigma)
    return score_update_table(R, prediction_type, clip, P, Q, R.sqrt_alpha_bars_prev * sigma_up)


# ------------------------------------------------------------------------------------------------ flow matching
def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The flow grid σ_0 = 0 < σ_1 < … < σ_N = 1, float64 [N + 1]: u = linspace(0, 1, N + 1) shifted as SD3 does,
    σ = shift·u / (1 + (shift − 1)·u) (shift > 1 spends more steps at high noise)."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_euler_table(sigmas: torch.Tensor, clip=False):
    """Flow-matching Euler for a velocity model v ≈ E[ε − x₀ | x_σ], row i from σ = σ_{i+1} to σ' = σ_i:
    x' = x + (σ' − σ)·v, x̂₀ = x − σ·v; with ``clip`` the velocity is re-derived from the clipped x̂₀,
    v̂ = (x − x̂₀)/σ, so x' = (σ'/σ)·x + (1 − σ'/σ)·x̂₀. float64 [N, NCOL], no noise."""
    s, s_next = sigmas[1:], sigmas[:-1]
    A, B = torch.ones_like(s), -s
    if clip:
        r = s_next / s
        C0, C1, C2 = 1.0 - r, r, torch.zeros_like(s)
    else:
        C0, C1, C2 = torch.zeros_like(s), torch.ones_like(s), s_next - s
    return T.finish_table(A, B, C0, C1, C2, torch.zeros_like(s), clip=clip)
