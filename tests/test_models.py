"""fastrev.models: the Gaussian mixture's closed forms (score, ε*, x₀*, v*) and the sliced Wasserstein distance."""

import math

import pytest
import torch

from fastrev.models import GaussianMixture, sliced_wasserstein
from fastrev.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_close(a, b, rtol=1e-7, atol=1e-7):
    """|a − b| <= atol + rtol·|b| elementwise (torch.testing.assert_close costs a 2 s import on first use)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = (a - b).abs()
    bad = err > atol + rtol * b.abs()
    assert not bad.any(), f"max abs error {err.max().item():.3e} (rtol {rtol}, atol {atol})"


@pytest.fixture(scope="module")
def gmm():
    means = torch.tensor([[0.5, -0.3, 0.2], [-0.6, 0.4, 0.0], [0.1, 0.9, -0.8]], dtype=torch.float64)
    return GaussianMixture(means, [0.3, 0.2, 0.15], [0.5, 0.3, 0.2], schedule=Schedule.linear())


@pytest.mark.parametrize("ab", [0.9999, 0.7, 0.2, 1e-3])
def test_score_is_the_gradient_of_log_prob(gmm, ab):
    x = torch.randn(7, 3, generator=_gen(0), dtype=torch.float64).requires_grad_()
    gmm.log_prob(x, ab).sum().backward()
    _assert_close(gmm.score(x.detach(), ab), x.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ab", [0.99, 0.5, 0.05])
def test_tweedie_and_score_noise_equivalence(gmm, ab):
    """E[x₀|x_t] = (x + (1 − ᾱ)·∇log p_t)/√ᾱ and ε* = −√(1 − ᾱ)·∇log p_t (the seed's score–noise equivalence)."""
    x = torch.randn(9, 3, generator=_gen(1), dtype=torch.float64)
    s = gmm.score(x, ab)
    _assert_close(gmm.x0(x, ab), (x + (1 - ab) * s) / math.sqrt(ab), rtol=1e-10, atol=1e-10)
    _assert_close(gmm.eps(x, ab), -math.sqrt(1 - ab) * s, rtol=1e-12, atol=1e-12)


def test_noised_marginal_is_the_stated_mixture(gmm):
    """x_t = √ᾱ x₀ + √(1−ᾱ) ε of mixture draws has the density log_prob(·, ᾱ): the mixture with means √ᾱ μ_k and
    variances ᾱ s_k² + 1 − ᾱ, checked against draws of that mixture."""
    ab = 0.6
    x0 = gmm.sample(2000, _gen(2))
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=_gen(3), dtype=torch.float64)
    noised = GaussianMixture(math.sqrt(ab) * gmm.means, (ab * gmm.stds**2 + 1 - ab).sqrt(), gmm.weights,
                             schedule=gmm.schedule)
    ref = noised.sample(2000, _gen(4))
    dd = sliced_wasserstein(noised.sample(2000, _gen(5)), ref)
    assert sliced_wasserstein(xt, ref) < 2.5 * dd
    pts = torch.randn(11, 3, generator=_gen(6), dtype=torch.float64)
    _assert_close(gmm.log_prob(pts, ab), noised.log_prob(pts), rtol=1e-12, atol=1e-12)


def test_eps_is_the_mmse_denoiser(gmm):
    """ε* minimises E‖ε − f(x_t)‖²: any perturbation of it does worse (Monte Carlo, common draws)."""
    ab = 0.3
    x0 = gmm.sample(20000, _gen(7))
    eps = torch.randn(x0.shape, generator=_gen(8), dtype=torch.float64)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    e = gmm.eps(xt, ab)
    best = (eps - e).pow(2).sum(1).mean()
    for f in (0.9 * e, 1.1 * e, e + 0.05, xt * math.sqrt(1 - ab)):
        assert (eps - f).pow(2).sum(1).mean() > best


@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction"])
def test_call_predictions(gmm, pt):
    s = gmm.schedule
    g = GaussianMixture(gmm.means, gmm.stds, gmm.weights, schedule=s, prediction_type=pt)
    x = torch.randn(5, 3, generator=_gen(9))
    t = torch.tensor([0, 10, 500, 900, 999])
    ab = s.alpha_bars[t]
    out = g(x, t)
    assert out.dtype == torch.float32 and out.shape == x.shape
    eps, x0 = gmm.eps(x, ab), gmm.x0(x, ab)
    want = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt()[:, None] * eps - (1 - ab).sqrt()[:, None] * x0}[pt]
    _assert_close(out, want.float(), rtol=1e-6, atol=1e-6)
    _assert_close(g(x, 500), g(x, torch.full((5,), 500)))


def test_call_is_per_sample_and_any_shape(gmm):
    x = torch.randn(8, 3, generator=_gen(10))
    t = torch.arange(8) * 100
    full = gmm(x, t)
    for k in (1, 3):
        assert torch.equal(full[:k], gmm(x[:k], t[:k]))
    g12 = GaussianMixture(torch.zeros(2, 12, dtype=torch.float64) + torch.arange(2.0)[:, None], 0.2,
                          schedule=gmm.schedule)
    xi = torch.randn(4, 3, 2, 2, generator=_gen(11), dtype=torch.float64)
    assert torch.equal(g12(xi, 3), g12(xi.reshape(4, 12), 3).reshape(4, 3, 2, 2))
    n0 = gmm.num_calls
    gmm(x, t)
    assert gmm.num_calls == n0 + 1


def test_sample_weights_and_moments(gmm):
    n = 40000
    x = gmm.sample(n, _gen(12))
    assert x.shape == (n, 3) and x.dtype == torch.float64
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    _assert_close(x.mean(0), mean, atol=4 * 0.7 / math.sqrt(n), rtol=0)
    # nearest-mean assignment (components are well separated): frequencies ≈ weights
    k = torch.cdist(x, gmm.means).argmin(1)
    freq = torch.bincount(k, minlength=3).double() / n
    assert (freq - gmm.weights).abs().max() < 0.02
    assert torch.equal(gmm.sample(5, _gen(1)), gmm.sample(5, _gen(1)))
    assert gmm.sample(3, dtype=torch.float32).dtype == torch.float32


def test_demo_2d():
    g = GaussianMixture.demo_2d()
    assert g.dim == 2 and g.num_components == 5 and abs(float(g.weights.sum()) - 1) < 1e-12
    assert g.schedule.num_timesteps == 1000
    # no symmetry: the mirrored data are far from the data
    x = g.sample(2000, _gen(0))
    assert sliced_wasserstein(x, -x) > 5 * sliced_wasserstein(x, g.sample(2000, _gen(1)))


def test_sliced_wasserstein():
    x = torch.randn(500, 1, generator=_gen(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == 0.0
    assert abs(sliced_wasserstein(x, x + 0.5) - 0.5) < 1e-12          # 1-D: W1 of a shift is the shift
    y = torch.randn(300, 4, generator=_gen(1), dtype=torch.float64)
    z = torch.randn(300, 4, generator=_gen(2), dtype=torch.float64)
    assert sliced_wasserstein(y, z) == sliced_wasserstein(z, y)       # symmetric, same projections
    assert sliced_wasserstein(y, z, seed=1) != sliced_wasserstein(y, z, seed=2)
    assert sliced_wasserstein(y, y[:150]) < 0.2                         # unequal sizes: quantile grid
    assert sliced_wasserstein(y, y + 3.0) > 1.0
    assert sliced_wasserstein(y.reshape(300, 2, 2), z.reshape(300, 4)) == sliced_wasserstein(y, z)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(means=[[0.0, 1.0]], stds=[0.1, 0.2]), ValueError, r"stds must be a number or have shape \[1\]"),
    (dict(means=[[0.0], [1.0]], stds=-1.0), ValueError, "stds must be > 0"),
    (dict(means=[[0.0], [1.0]], weights=[1.0]), ValueError, r"weights must have shape \[2\]"),
    (dict(means=[[0.0], [1.0]], weights=[-1.0, 2.0]), ValueError, "weights must be >= 0"),
    (dict(means="abc"), TypeError, "means must be a tensor"),
    (dict(means=[[float("nan")]]), ValueError, "means must be finite"),
    (dict(means=[[0.0]], schedule="linear"), TypeError, "schedule must be a fastrev.Schedule"),
    (dict(means=[[0.0]], prediction_type="eps"), ValueError, "prediction_type must be one of"),
])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        GaussianMixture(**kw)


def test_bad_inputs(gmm):
    with pytest.raises(ValueError, match="3 elements per sample"):
        gmm(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="t must be an int or an integer tensor"):
        gmm(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="x and y must have the same number of elements"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="num_projections must be an int >= 1"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 2), num_projections=0)


# ------------------------------------------------------------------------------------------------ other paths
@pytest.mark.parametrize("ab", [0.9, 0.3, 0.01])
def test_path_posterior_is_the_vp_closed_form(gmm, ab):
    """posterior(x, √ᾱ, √(1 − ᾱ)) is the VP model's x₀* and ε* (one formula for every path)."""
    x = torch.randn(6, 3, generator=_gen(20), dtype=torch.float64)
    x0, eps = gmm.posterior(x, math.sqrt(ab), math.sqrt(1 - ab))
    _assert_close(x0, gmm.x0(x, ab), rtol=1e-12, atol=1e-12)
    _assert_close(eps, gmm.eps(x, ab), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.3, 0.8])
def test_flow_marginal_is_the_law_of_the_path(gmm, sigma):
    """x_σ = (1 − σ)x₀ + σε of mixture draws has the law flow_marginal(σ): means (1 − σ)μ_k, variances
    (1 − σ)² s_k² + σ² (checked against draws of that mixture, and its density against the explicit mixture)."""
    x0 = gmm.sample(2000, _gen(21))
    xs = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=_gen(22), dtype=torch.float64)
    m = gmm.flow_marginal(sigma)
    ref = m.sample(2000, _gen(23))
    dd = sliced_wasserstein(m.sample(2000, _gen(24)), ref)
    assert sliced_wasserstein(xs, ref) < 2.5 * dd
    explicit = GaussianMixture((1 - sigma) * gmm.means, ((1 - sigma) ** 2 * gmm.stds**2 + sigma**2).sqrt(),
                               gmm.weights, schedule=gmm.schedule)
    pts = torch.randn(11, 3, generator=_gen(25), dtype=torch.float64)
    _assert_close(m.log_prob(pts), explicit.log_prob(pts), rtol=1e-12, atol=1e-12)
    # a wrong scaling of the path (means not shrunk) is far off: the check can fail
    wrong = GaussianMixture(gmm.means, m.stds, gmm.weights, schedule=gmm.schedule)
    assert sliced_wasserstein(xs, wrong.sample(2000, _gen(26))) > 2.5 * dd


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95])
def test_velocity_from_the_score_of_the_flow_marginal(gmm, sigma):
    """Independent of the closed form: with p_σ = flow_marginal(σ) and autograd's ∇log p_σ, Tweedie gives
    E[ε|x] = −σ ∇log p_σ and E[x₀|x] = (x − σ E[ε|x])/(1 − σ), so v* = E[ε|x] − E[x₀|x]."""
    x = torch.randn(7, 3, generator=_gen(27), dtype=torch.float64).requires_grad_()
    gmm.flow_marginal(sigma).log_prob(x).sum().backward()
    xd = x.detach()
    e = -sigma * x.grad
    want = e - (xd - sigma * e) / (1 - sigma)
    _assert_close(gmm.velocity(xd, sigma), want, rtol=1e-9, atol=1e-9)


def test_velocity_is_the_mmse_regressor_and_its_ends(gmm):
    """v* minimises E‖(ε − x₀) − f(x_σ)‖² (Monte Carlo, common draws); at σ = 0 it is −x, at σ = 1 x − E[x₀]."""
    sigma = 0.4
    x0 = gmm.sample(20000, _gen(28))
    eps = torch.randn(x0.shape, generator=_gen(29), dtype=torch.float64)
    xs = (1 - sigma) * x0 + sigma * eps
    v = gmm.velocity(xs, sigma)
    best = (eps - x0 - v).pow(2).sum(1).mean()
    for f in (0.9 * v, 1.1 * v, v + 0.05, -v, gmm.velocity(xs, 0.5)):
        assert (eps - x0 - f).pow(2).sum(1).mean() > best
    x = torch.randn(5, 3, generator=_gen(30), dtype=torch.float64)
    _assert_close(gmm.velocity(x, 0.0), -x, rtol=1e-12, atol=1e-12)
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    _assert_close(gmm.velocity(x, 1.0), x - mean, rtol=1e-12, atol=1e-12)
    per = torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0], dtype=torch.float64)          # per-sample σ
    _assert_close(gmm.velocity(x, per)[2:3], gmm.velocity(x[2:3], 0.4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_eps_sigma_is_the_scaled_vp_predictor(gmm, sigma):
    """σ-space ε*(x̃, σ) (x̃ = x₀ + σε) is the VP ε* at diffusers' scaled input x̃/√(σ² + 1), ᾱ = 1/(σ² + 1), and
    −σ ∇log of sigma_marginal(σ) (autograd)."""
    xt = (gmm.sample(6, _gen(31)) + sigma * torch.randn(6, 3, generator=_gen(32), dtype=torch.float64))
    got = gmm.eps_sigma(xt, sigma)
    c = 1 / math.sqrt(sigma**2 + 1)
    _assert_close(got, gmm.eps(c * xt, c * c), rtol=1e-10, atol=1e-10)
    x = xt.clone().requires_grad_()
    gmm.sigma_marginal(sigma).log_prob(x).sum().backward()
    _assert_close(got, -sigma * x.grad, rtol=1e-9, atol=1e-9)


def test_call_flow_prediction(gmm):
    g = GaussianMixture(gmm.means, gmm.stds, gmm.weights, schedule=gmm.schedule, prediction_type="flow_prediction")
    x = torch.randn(4, 3, generator=_gen(33))
    t = torch.tensor([1000.0, 750.0, 20.0, 0.0])
    out = g(x, t)
    assert out.dtype == torch.float32 and out.shape == x.shape
    _assert_close(out, gmm.velocity(x, t.double() / 1000).float(), rtol=1e-6, atol=1e-6)
    _assert_close(g(x, 500.0), g(x, torch.full((4,), 500.0)))
    _assert_close(g(x, 500), g(x, torch.full((4,), 500.0)))
    with pytest.raises(ValueError, match=r"flow timesteps t must be in \[0, 1000\]"):
        g(x, torch.full((4,), 1001.0))
    with pytest.raises(ValueError, match=r"sigma must be a number in \[0, 1\]"):
        gmm.flow_marginal(1.5)
    with pytest.raises(ValueError, match=r"sigma must be in \[0.0, 1.0\]"):
        gmm.velocity(x, -0.1)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        gmm.sigma_marginal(-1.0)
