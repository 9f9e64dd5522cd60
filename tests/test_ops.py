"""Public ops off CUDA — the default "torch" backend (float32 table update) and the float64 "reference": semantics,
noise sources, timestep forms, dtypes and validation."""

import pytest
import torch

import fastrev
from fastrev import Schedule, ddim_step, ddpm_step, noise
from fastrev import reference as R

S = Schedule.linear()


def _inputs(B=4, shape=(3, 4, 4), dtype=torch.float32, learned=False):
    x = torch.randn((B,) + shape, dtype=dtype)
    o = torch.randn((B, shape[0] * (2 if learned else 1)) + shape[1:], dtype=dtype)
    if learned:
        o[:, shape[0]:].uniform_(-1, 1)
    return x, o


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("var", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_is_the_reference(dtype, pred, var):
    x, o = _inputs(dtype=dtype, learned=var == "learned_range")
    t = torch.tensor([0, 3, 500, 999])
    z = torch.randn_like(x)
    res = ddpm_step(o, t, x, S, prediction_type=pred, variance_type=var, clip_sample=True, noise=z)
    assert res.prev_sample.dtype == dtype and res.pred_original_sample.dtype == dtype
    C = x.shape[1]
    eps, vv = (o[:, :C], o[:, C:]) if var == "learned_range" else (o, None)
    x0 = R.clip_x0(R.predict_x0(x.double(), t, eps.double(), S.alpha_bars, pred))
    mean, _ = R.compute_posterior_params(x0, x.double(), t, S.alpha_bars, S.betas)
    logv = R.posterior_log_variance(t, S.alpha_bars, S.betas, var, None if vv is None else vv.double())
    if logv.dim() == 1:
        logv = logv[:, None, None, None]
    want = mean + (t > 0).double()[:, None, None, None] * torch.exp(0.5 * logv) * z.double()
    torch.testing.assert_close(res.prev_sample, want.to(dtype), rtol=1e-12 if dtype == torch.float64 else 1e-6,
                               atol=1e-12 if dtype == torch.float64 else 1e-6)
    torch.testing.assert_close(res.pred_original_sample, x0.to(dtype))


def test_no_noise_at_t0_and_ddim_deterministic():
    x, o = _inputs()
    t = torch.zeros(4, dtype=torch.int64)
    a = ddpm_step(o, t, x, S, seed=1).prev_sample
    b = ddpm_step(o, t, x, S, seed=2).prev_sample
    assert torch.equal(a, b)
    c = ddim_step(o, 500, x, S, eta=0.0, seed=1).prev_sample
    d = ddim_step(o, 500, x, S, eta=0.0, seed=2).prev_sample
    assert torch.equal(c, d)
    assert not torch.equal(ddim_step(o, 500, x, S, eta=1.0, seed=1).prev_sample,
                           ddim_step(o, 500, x, S, eta=1.0, seed=2).prev_sample)


def test_seed_uses_counter_stream():
    x, o = _inputs(B=3)
    t = torch.tensor([10, 20, 30])
    by_seed = ddpm_step(o, t, x, S, seed=42, sample_offset=7).prev_sample
    z = noise.noise_like(x, 42, t, sample_offset=7)
    by_noise = ddpm_step(o, t, x, S, noise=z).prev_sample
    torch.testing.assert_close(by_seed, by_noise, rtol=1e-6, atol=1e-6)


def test_batch_split_invariance_with_seed():
    x, o = _inputs(B=6)
    t = torch.tensor([5, 900, 3, 100, 999, 1])
    whole = ddpm_step(o, t, x, S, seed=3).prev_sample
    a = ddpm_step(o[:2], t[:2], x[:2], S, seed=3).prev_sample
    b = ddpm_step(o[2:], t[2:], x[2:], S, seed=3, sample_offset=2).prev_sample
    assert torch.equal(whole, torch.cat([a, b]))


def test_generator_reproducible_and_default_generator_used():
    x, o = _inputs()
    a = ddpm_step(o, 50, x, S, generator=torch.Generator().manual_seed(0)).prev_sample
    b = ddpm_step(o, 50, x, S, generator=torch.Generator().manual_seed(0)).prev_sample
    c = ddpm_step(o, 50, x, S, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = ddpm_step(o, 50, x, S).prev_sample
    torch.manual_seed(5)
    e = ddpm_step(o, 50, x, S).prev_sample
    assert torch.equal(d, e)


def test_timestep_forms_agree():
    x, o = _inputs()
    z = torch.randn_like(x)
    ref = ddpm_step(o, torch.full((4,), 77), x, S, noise=z).prev_sample
    for ts in (77, torch.tensor(77), torch.tensor([77]), torch.tensor(77, dtype=torch.int32)):
        assert torch.equal(ddpm_step(o, ts, x, S, noise=z).prev_sample, ref)


def test_per_sample_t_equals_one_at_a_time():
    x, o = _inputs(B=5)
    t = torch.tensor([999, 0, 450, 1, 70])
    z = torch.randn_like(x)
    batched = ddim_step(o, t, x, S, eta=0.7, noise=z, clip_sample=True).prev_sample
    single = torch.cat([ddim_step(o[i:i + 1], int(t[i]), x[i:i + 1], S, eta=0.7, noise=z[i:i + 1],
                                  clip_sample=True).prev_sample for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=0, atol=0)


def test_out_in_place_and_return_x0():
    x, o = _inputs()
    z = torch.randn_like(x)
    want = ddpm_step(o, 10, x, S, noise=z).prev_sample
    y = x.clone()
    res = ddpm_step(o, 10, y, S, noise=z, out=y, return_x0=False)
    assert res.prev_sample is y and res.pred_original_sample is None
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_dtypes():
    x, o = _inputs(dtype=torch.float16)
    r = ddpm_step(o, 10, x, S, seed=0)
    assert r.prev_sample.dtype == torch.float16
    r = ddpm_step(o.float(), 10, x, S, seed=0)              # mixed: output in the sample's dtype
    assert r.prev_sample.dtype == torch.float16
    r = ddpm_step(o.double(), 10, x.double(), S, seed=0)
    assert r.prev_sample.dtype == torch.float64


def test_autograd_through_reference():
    x, o = _inputs()
    o.requires_grad_(True)
    ddim_step(o, 300, x, S).prev_sample.sum().backward()
    ab = S.alpha_bars[300]
    # ∂x_{t−1}/∂ε for ε-prediction with η = 0 is −√ᾱ_{t−1}√(1−ᾱ)/√ᾱ + √(1 − ᾱ_{t−1})
    g = -(S.alpha_bars[299] * (1 - ab) / ab).sqrt() + (1 - S.alpha_bars[299]).sqrt()
    torch.testing.assert_close(o.grad, torch.full_like(o, g.item()), rtol=1e-5, atol=1e-6)


def test_default_off_cuda_is_the_torch_backend():
    x, o = _inputs()
    a = ddpm_step(o, 10, x, S, seed=3, clip_sample=True)
    b = ddpm_step(o, 10, x, S, seed=3, clip_sample=True, backend="torch")
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.pred_original_sample, b.pred_original_sample)
    c = ddpm_step(o, 10, x, S, seed=3, clip_sample=True, backend="reference")
    torch.testing.assert_close(a.prev_sample, c.prev_sample, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a.prev_sample, ddpm_step(o, 10, x, S, seed=4, clip_sample=True).prev_sample)


@pytest.mark.parametrize("fn,kw", [(ddpm_step, dict(variance_type="learned_range")), (ddim_step, dict(eta=0.6))])
def test_float64_inputs_stay_float64_on_the_torch_backend(fn, kw):
    x, o = _inputs(dtype=torch.float64, learned="variance_type" in kw)
    t = torch.tensor([1, 200, 700, 999])
    got = fn(o, t, x, S, seed=2, clip_sample=True, backend="torch", **kw)
    want = fn(o, t, x, S, seed=2, clip_sample=True, backend="reference", **kw)
    assert got.prev_sample.dtype == torch.float64
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    x, o = _inputs(B=0)
    r = ddpm_step(o, torch.zeros(0, dtype=torch.int64), x, S, seed=1)
    assert r.prev_sample.shape == x.shape


def test_exports():
    for name in ("Schedule", "spaced_timesteps", "ddpm_step", "ddim_step", "StepOutput", "noise", "reference"):
        assert hasattr(fastrev, name)


# ------------------------------------------------------------------------------------------------ bad input
x_, o_ = _inputs()
BAD = [
    (dict(model_output=o_[:, :2]), ValueError, "model_output must have the sample's shape"),
    (dict(timestep=1000), ValueError, r"timestep must be in \[0, 1000\)"),
    (dict(timestep=-1), ValueError, "timestep must be in"),
    (dict(timestep=torch.tensor([1, 2])), ValueError, "timestep must be a scalar or have shape"),
    (dict(timestep=torch.tensor([1.0] * 4)), TypeError, "timestep must have an integer dtype"),
    (dict(timestep=1.5), TypeError, "timestep must be an int"),
    (dict(timestep=torch.tensor([0, 1, 2, 1000])), ValueError, "timestep must be in"),
    (dict(sample=x_.int()), TypeError, "sample must be a floating tensor"),
    (dict(sample=[1.0]), TypeError, "sample must be a torch.Tensor"),
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (dict(variance_type="fixed"), ValueError, "variance_type must be one of"),
    (dict(variance_type="learned_range"), ValueError, "2C channels"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(clip_sample=True, clip_sample_range=0.0), ValueError, "clip_sample_range must be > 0"),
    (dict(thresholding=True, dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
    (dict(noise=torch.randn(4, 3)), ValueError, "noise must have the sample's shape"),
    (dict(out=torch.empty(4, 3, 4, 4, dtype=torch.float64)), ValueError, "out must match sample"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(sample_offset=-1), ValueError, "sample_offset"),
    (dict(schedule="linear"), TypeError, "schedule must be a fastrev.Schedule"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("override, exc, msg", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_is_named(override, exc, msg):
    kw = dict(model_output=o_, timestep=5, sample=x_, schedule=S)
    kw.update(override)
    args = [kw.pop(k) for k in ("model_output", "timestep", "sample", "schedule")]
    with pytest.raises(exc, match=msg):
        ddpm_step(*args, **kw)


def test_bad_eta():
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            ddim_step(o_, 5, x_, S, eta=eta)
    with pytest.raises(TypeError, match="eta must be a number"):
        ddim_step(o_, 5, x_, S, eta="0.5")
