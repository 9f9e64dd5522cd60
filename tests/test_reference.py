"""The float64 reference: the seed's identities, parameterisations, variances, clipping and continuous time."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrev import Schedule
from fastrev import reference as R

f64 = torch.float64
SCHEDULES = {"linear": Schedule.linear(), "cosine": Schedule.cosine(), "scaled_linear": Schedule.scaled_linear(),
             "respaced": Schedule.linear().respace(range(0, 1000, 37))}


def _consistent(s, seed, B=6, shape=(3, 4, 4)):
    """A consistent (t, x₀, ε, x_t, v) with fixed ``seed``: a failure reproduces exactly."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, s.num_timesteps, (B,), generator=g)
    t[0] = 0
    x0 = torch.randn((B,) + shape, generator=g, dtype=f64)
    eps = torch.randn((B,) + shape, generator=g, dtype=f64)
    ab = R._bcast(s.alpha_bars[t], x0)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    return t, x0, eps, xt, v


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_product_of_gaussians_equals_closed_form(name, seed):
    """q(x_t|x_{t-1}) q(x_{t-1}|x_0): precisions α/(1−α) + 1/(1−ᾱ_{t−1}), mean B/A — the seed's derivation."""
    s = SCHEDULES[name]
    t, x0, _, xt, _ = _consistent(s, seed)
    t = t.clamp_min(1)
    a = R._bcast(s.alphas[t], x0)
    abp = R._bcast(s.alpha_bars_prev[t], x0)
    A1, A2 = a / (1 - a), 1 / (1 - abp)
    mean = (a.sqrt() * xt / (1 - a) + abp.sqrt() * x0 / (1 - abp)) / (A1 + A2)
    mu, var = R.compute_posterior_params(x0, xt, t, s.alpha_bars, s.betas)
    torch.testing.assert_close(mu, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, 1 / (A1 + A2).flatten(1)[:, 0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_parameterisations_agree(name, seed):
    s = SCHEDULES[name]
    t, x0, eps, xt, v = _consistent(s, seed)
    torch.testing.assert_close(R.predict_x0_from_eps(xt, t, eps, s.alpha_bars), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(R.predict_x0_from_v(xt, t, v, s.alpha_bars), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(R.predict_eps_from_x0(xt, t, x0, s.alpha_bars), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(R.predict_eps(xt, t, v, s.alpha_bars, "v_prediction"), eps, rtol=1e-10, atol=1e-10)
    means = [R.reverse_mean(xt, t, out, s.alpha_bars, s.betas, p)
             for out, p in ((eps, "epsilon"), (x0, "sample"), (v, "v_prediction"))]
    torch.testing.assert_close(means[0], means[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(means[2], means[1], rtol=1e-9, atol=1e-9)
    # ... and the seed's ε-form of the mean
    torch.testing.assert_close(R.reverse_mean_from_noise(xt, t, eps, s.alphas, s.alpha_bars), means[1],
                               rtol=1e-9, atol=1e-9)


def test_score_noise_equivalence():
    """∇ log q(x_t | x_0) = −(x_t − √ᾱ x_0)/(1 − ᾱ) = −ε/√(1 − ᾱ), by autograd of the Gaussian log-density."""
    s = Schedule.linear()
    t, x0, eps, xt, _ = _consistent(s, 4, B=4)
    ab = R._bcast(s.alpha_bars[t], x0)
    xt = xt.clone().requires_grad_(True)
    logq = (-(xt - ab.sqrt() * x0) ** 2 / (2 * (1 - ab))).sum()
    (grad,) = torch.autograd.grad(logq, xt)
    torch.testing.assert_close(R.score_from_eps(eps, s.alpha_bars[t]), grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(R.eps_from_score(grad, s.alpha_bars[t]), eps, rtol=1e-9, atol=1e-9)


def test_variances():
    s = Schedule.linear()
    t = torch.tensor([0, 1, 500, 999])
    small = R.posterior_log_variance(t, s.alpha_bars, s.betas, "fixed_small")
    large = R.posterior_log_variance(t, s.alpha_bars, s.betas, "fixed_large")
    assert small[0] == pytest.approx(math.log(s.posterior_variance[1].item()))     # entry 0 = β̃_1
    assert large[0] == pytest.approx(math.log(s.posterior_variance[1].item()))
    torch.testing.assert_close(large[1:], torch.log(s.betas[t[1:]]))
    assert (small <= large + 1e-12).all()
    v = torch.stack([torch.full((2, 2), -1.0, dtype=f64), torch.full((2, 2), 1.0, dtype=f64),
                     torch.zeros(2, 2, dtype=f64), torch.zeros(2, 2, dtype=f64)])
    lr = R.posterior_log_variance(t, s.alpha_bars, s.betas, "learned_range", v)
    assert lr[0, 0, 0] == pytest.approx(small[0].item())                                # v = −1 → log β̃
    assert lr[1, 0, 0] == pytest.approx(math.log(s.betas[1].item()))                    # v = +1 → log β
    assert lr[2, 0, 0] == pytest.approx(0.5 * (small[2] + large[2]).item())
    assert torch.equal(R.posterior_log_variance(t, s.alpha_bars, s.betas, "learned", v), v)
    with pytest.raises(ValueError, match="variance_type"):
        R.posterior_log_variance(t, s.alpha_bars, s.betas, "fixed_medium")
    with pytest.raises(ValueError, match="model_var_values"):
        R.posterior_log_variance(t, s.alpha_bars, s.betas, "learned")


def test_dynamic_threshold_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")             # in the test extra: CI always runs this
    sch = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 6, 6, generator=g) * 3
    ours = R.dynamic_threshold(x, 0.9, 2.5)
    torch.testing.assert_close(ours, sch._threshold_sample(x.clone()), rtol=1e-6, atol=1e-6)
    small = torch.rand(2, 10, generator=g) * 0.5        # quantile < 1 → s = 1 → plain clipping (no-op here)
    torch.testing.assert_close(R.dynamic_threshold(small), small)
    nan = torch.tensor([[float("nan"), 2.0]], dtype=f64)
    assert torch.isnan(R.clip_x0(nan)).any()


def test_ddim_eta_one_is_ddpm_posterior():
    """DDIM(η=1): σ² = β̃ and the mean equals μ̃_t (Song et al. 2021)."""
    s = Schedule.linear()
    t, x0, eps, xt, _ = _consistent(s, 6)
    torch.testing.assert_close(R.ddim_sigma(t, s.alpha_bars, 1.0) ** 2, s.posterior_variance[t], rtol=1e-9,
                               atol=1e-15)
    ddim, _ = R.ddim_step(xt, t, eps, s.alpha_bars, eta=1.0)
    ddpm, _ = R.ddpm_step(xt, t, eps, s.alpha_bars, s.betas)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-8, atol=1e-8)


def test_ddim_eta_zero_recovers_x0_path():
    """With the true ε, DDIM(0) maps x_t exactly to √ᾱ_{t−1} x_0 + √(1 − ᾱ_{t−1}) ε (deterministic)."""
    s = Schedule.cosine()
    t, x0, eps, xt, _ = _consistent(s, 7)
    prev, x0_hat = R.ddim_step(xt, t, eps, s.alpha_bars, eta=0.0)
    abp = R._bcast(s.alpha_bars_prev[t], x0)
    torch.testing.assert_close(prev, abp.sqrt() * x0 + (1 - abp).sqrt() * eps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-8, atol=1e-8)


def test_continuous_time_steps():
    g = torch.Generator().manual_seed(8)
    x, score, z = (torch.randn(3, 5, dtype=f64, generator=g) for _ in range(3))
    beta = torch.tensor([0.1, 1.0, 20.0], dtype=f64)
    d = R.vp_sde_drift(x, beta, score)
    torch.testing.assert_close(d, -0.5 * beta[:, None] * x - beta[:, None] * score)
    pf = R.probability_flow_drift(x, beta, score)
    torch.testing.assert_close(d - pf, -0.5 * beta[:, None] * score)          # the ODE halves the score term
    dt = 1e-3
    em = R.euler_maruyama_step(x, score, beta, dt, z)
    torch.testing.assert_close(em, x - d * dt + (beta[:, None] * dt).sqrt() * z)
    eps = torch.tensor([0.01, 0.02, 0.03], dtype=f64)
    torch.testing.assert_close(R.langevin_step(x, score, eps, z), x + eps[:, None] * score
                               + (2 * eps[:, None]).sqrt() * z)


def test_langevin_targets_gaussian():
    """Langevin with the exact score of N(μ, s²) keeps N(μ, s²) (up to O(ε) bias): the seed's MCMC view."""
    g = torch.Generator().manual_seed(1)
    mu, sd, eps = 2.0, 0.5, 1e-3
    x = torch.randn(20000, dtype=f64, generator=g)
    for _ in range(3000):
        x = R.langevin_step(x, -(x - mu) / sd**2, eps, torch.randn(20000, dtype=f64, generator=g))
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(sd, rel=0.05)


@settings(max_examples=60, deadline=None)
@given(betas=st.lists(st.floats(1e-4, 0.3), min_size=2, max_size=40), seed=st.integers(0, 2**31 - 1),
       pred=st.sampled_from(R.PREDICTION_TYPES))
def test_property_means_agree(betas, seed, pred):
    s = Schedule.from_betas(betas)
    t, x0, eps, xt, v = _consistent(s, seed, B=4, shape=(5,))
    out = {"epsilon": eps, "sample": x0, "v_prediction": v}[pred]
    mu = R.reverse_mean(xt, t, out, s.alpha_bars, s.betas, pred)
    mu_true, var = R.compute_posterior_params(x0, xt, t, s.alpha_bars, s.betas)
    scale = 1 + xt.abs().max().item() / s.sqrt_alpha_bars[t].min().item()
    assert (mu - mu_true).abs().max().item() <= 1e-9 * scale
    assert (var <= s.betas[t] * (1 + 1e-12)).all()


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_large_sample_quantile_path_equals_torch_quantile(monkeypatch, n, q):
    """Past 2²⁴ elements per sample dynamic thresholding takes a kthvalue path: the same numbers (forced here)."""
    x = torch.randn(3, n, dtype=f64, generator=torch.Generator().manual_seed(n))
    want = torch.quantile(x, q, dim=1)
    monkeypatch.setattr(R, "_QUANTILE_MAX", 0)
    torch.testing.assert_close(R.per_sample_quantile(x, q), want, rtol=1e-12, atol=1e-12)


def test_variance_type_fixed_large_only_for_ddpm():
    import fastrev
    from fastrev.models import GaussianMixture

    gm = GaussianMixture.demo_2d()
    with pytest.raises(ValueError, match="fixed_large"):
        fastrev.sample(gm, (2, 2), gm.schedule, method="ddim", variance_type="fixed_large", num_steps=3)
