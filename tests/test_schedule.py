"""Schedules: published values, table identities, zero-terminal SNR, respacing and timestep spacing."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrev import Schedule, spaced_timesteps
from fastrev.schedule import TIMESTEP_SPACINGS, check_timestep_spacing


def _diffusers():
    """diffusers, for the tests that compare with it (in the test extra: CI always runs them)."""
    return pytest.importorskip("diffusers")


CONSTRUCTORS = {
    "linear": (Schedule.linear, "linear"),
    "scaled_linear": (Schedule.scaled_linear, "scaled_linear"),
    "cosine": (Schedule.cosine, "squaredcos_cap_v2"),
    "sigmoid": (Schedule.sigmoid, "sigmoid"),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_betas_match_diffusers(name):
    diffusers = _diffusers()
    ctor, beta_schedule = CONSTRUCTORS[name]
    ours = ctor()
    kw = {} if name != "scaled_linear" else dict(beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, **kw)
    # diffusers builds its betas in float32: agreement to float32 rounding
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(ours.alpha_bars, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)


def test_published_values():
    s = Schedule.linear()
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert s.alpha_bars[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)      # DDPM paper schedule, ᾱ_T
    # diffusers' own test: _get_variance(487) ≈ 0.00979 for linear / fixed_small
    assert s.posterior_variance[487].item() == pytest.approx(0.00979, abs=1e-5)
    c = Schedule.cosine()
    assert c.betas.max().item() == pytest.approx(0.999)
    # improved-diffusion: ᾱ_t = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2), before the β cap bites
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert c.alpha_bars[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-9)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_table_identities(name):
    s = CONSTRUCTORS[name][0]()
    assert all(getattr(s, n).dtype == torch.float64 for n in
               ("betas", "alphas", "alpha_bars", "alpha_bars_prev", "posterior_variance",
                "posterior_log_variance_clipped", "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars"))
    assert s.alpha_bars_prev[0] == 1.0
    torch.testing.assert_close(s.alpha_bars_prev[1:], s.alpha_bars[:-1])
    assert (s.posterior_variance <= s.betas + 1e-15).all()                       # β̃ ≤ β
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(s.posterior_variance[1].item()))
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], torch.log(s.posterior_variance[1:]))
    torch.testing.assert_close(s.sqrt_recip_alpha_bars * s.sqrt_alpha_bars, torch.ones_like(s.betas))
    torch.testing.assert_close(s.sqrt_recipm1_alpha_bars**2, 1 / s.alpha_bars - 1)
    torch.testing.assert_close(s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas,
                               # x_t = √α_t x_{t-1} consistency: μ̃ of (x0, √ᾱ x0) recovers √ᾱ_{t−1} x0
                               (s.sqrt_alpha_bars_prev * s.betas + s.sqrt_alphas * s.sqrt_alphas
                                * (1 - s.alpha_bars_prev)) / (1 - s.alpha_bars))
    assert s.timesteps.dtype == torch.int64 and s.timesteps.tolist() == list(range(1000))


def test_rescale_zero_terminal_snr_matches_diffusers():
    _diffusers()
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    s = Schedule.scaled_linear()
    z = s.rescale_zero_terminal_snr()
    assert z.alpha_bars[-1].item() == 0.0
    assert z.alpha_bars[0].item() == pytest.approx(s.alpha_bars[0].item(), rel=1e-12)
    ref = rescale_zero_terminal_snr(s.betas.clone())
    torch.testing.assert_close(z.betas, ref, rtol=1e-10, atol=1e-12)
    assert z is not s and s.alpha_bars[-1] > 0            # a new schedule; the old one untouched


def test_respace_keeps_alpha_bars():
    s = Schedule.linear()
    keep = spaced_timesteps(1000, 50, "leading")
    r = s.respace(keep)
    assert r.num_timesteps == 50 and r.num_train_timesteps == 1000
    torch.testing.assert_close(r.alpha_bars, s.alpha_bars[keep], rtol=1e-12, atol=0)
    torch.testing.assert_close(r.betas[1:], 1 - s.alpha_bars[keep[1:]] / s.alpha_bars[keep[:-1]])
    assert r.betas[0].item() == pytest.approx(1 - s.alpha_bars[keep[0]].item())
    assert r.timesteps.tolist() == keep.tolist()
    # respacing a respaced schedule composes the timestep maps
    rr = r.respace([0, 10, 49])
    assert rr.timesteps.tolist() == [keep[0].item(), keep[10].item(), keep[49].item()]
    torch.testing.assert_close(rr.alpha_bars, s.alpha_bars[rr.timesteps])


def test_respace_all_is_identity():
    s = Schedule.cosine(100)
    r = s.respace(range(100))
    torch.testing.assert_close(r.betas, s.betas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.posterior_variance, s.posterior_variance, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("bad, exc", [([3, 2, 5], ValueError), ([1, 1, 2], ValueError), ([-1, 4], ValueError),
                                      ([0, 1000], ValueError), ([], ValueError), ([0.5, 2.0], TypeError)])
def test_respace_rejects(bad, exc):
    with pytest.raises(exc, match="timesteps"):
        Schedule.linear().respace(bad)


@pytest.mark.parametrize("betas", [[0.1, 0.0], [0.1, 1.5], [0.1, float("nan")], [-0.1]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_betas(betas)


@pytest.mark.parametrize("spacing, expected", [
    ("linspace", [999, 832, 666, 500, 333, 166, 0]),
    ("leading", [852, 710, 568, 426, 284, 142, 0]),
    ("trailing", [999, 856, 713, 570, 428, 285, 142]),
])
def test_spacing_matches_peers(spacing, expected):
    assert spaced_timesteps(1000, 7, spacing).tolist() == sorted(expected)


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 10, 50, 333, 1000])
def test_spacing_matches_diffusers(spacing, n):
    sch = _diffusers().DDPMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" and n < 1000
                                  else 0)
    sch.set_timesteps(n)
    ours = spaced_timesteps(1000, n, spacing, steps_offset=sch.config.steps_offset)
    assert ours.tolist() == sorted(sch.timesteps.tolist())


def test_improved_diffusion_sections():
    assert spaced_timesteps(1000, None, "ddim50").tolist() == list(range(0, 1000, 20))
    steps = spaced_timesteps(1000, None, "10,15,20").tolist()
    assert len(steps) == 45 and steps[0] == 0 and steps[9] == 333 and steps[10] == 334
    assert steps[-1] == 999
    assert spaced_timesteps(1000, 45, "10,15,20").tolist() == steps
    with pytest.raises(ValueError, match="disagrees"):
        spaced_timesteps(1000, 44, "10,15,20")
    with pytest.raises(ValueError, match="integer stride"):
        spaced_timesteps(1000, None, "ddim600")
    with pytest.raises(ValueError, match="spacing must be one of"):
        spaced_timesteps(1000, 10, "cosine")


@settings(max_examples=40, deadline=None)
@given(n_train=st.integers(2, 400), frac=st.floats(0.01, 1.0), spacing=st.sampled_from(TIMESTEP_SPACINGS))
def test_spacing_properties(n_train, frac, spacing):
    n = max(1, int(n_train * frac))
    ts = spaced_timesteps(n_train, n, spacing)
    assert ts.dtype == torch.int64 and len(ts) == n
    assert (ts[1:] > ts[:-1]).all() and ts[0] >= 0 and ts[-1] < n_train
    r = Schedule.linear(n_train, 1e-4, min(0.5, 20.0 / n_train)).respace(ts)   # improved-diffusion scaling
    assert (r.betas > 0).all() and (r.betas <= 1).all()
    assert (r.posterior_variance <= r.betas + 1e-15).all()


@settings(max_examples=40, deadline=None)
@given(betas=st.lists(st.floats(1e-5, 0.5), min_size=2, max_size=60))
def test_schedule_properties(betas):
    s = Schedule.from_betas(betas)
    assert (s.posterior_variance <= s.betas * (1 + 1e-12)).all()
    assert (s.alpha_bars[1:] <= s.alpha_bars[:-1]).all()
    np.testing.assert_allclose(s.alpha_bars.numpy(), np.cumprod(1 - np.asarray(betas)), rtol=1e-12)


@pytest.mark.parametrize("abar, msg", [([0.9, 0.95], "non-increasing"), ([0.9, float("nan")], "finite"),
                                       ([1.0, 0.5], r"\[0, 1\)"), ([0.5, -0.1], r"\[0, 1\)")])
def test_bad_alpha_bars(abar, msg):
    with pytest.raises(ValueError, match=msg):
        Schedule([0.1, 0.1], alpha_bars=abar)


@pytest.mark.parametrize("spacing", list(TIMESTEP_SPACINGS) + ["ddim50", "10,15,20", "7"])
def test_check_timestep_spacing_accepts(spacing):
    assert check_timestep_spacing(spacing) == spacing


@pytest.mark.parametrize("spacing, exc", [("cosine", ValueError), ("", ValueError), ("10;20", ValueError),
                                          (None, TypeError), (50, TypeError)])
def test_check_timestep_spacing_rejects(spacing, exc):
    with pytest.raises(exc, match="timestep_spacing"):
        check_timestep_spacing(spacing)
    with pytest.raises(exc, match="spacing"):
        spaced_timesteps(1000, 10, spacing)


@pytest.mark.parametrize("spacing", ["ddimx", ",", "ddim"])
def test_malformed_section_strings(spacing):
    with pytest.raises(ValueError, match="not a valid section string"):
        spaced_timesteps(1000, None, spacing)


def test_bad_steps_offset():
    with pytest.raises(TypeError, match="steps_offset"):
        spaced_timesteps(1000, 10, "leading", steps_offset=2.7)
