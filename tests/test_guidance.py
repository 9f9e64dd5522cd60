"""Fused classifier-free guidance: ddpm_step / ddim_step with guidance_scale (and guidance_rescale).

The oracle is the ordinary step on the combined output u + w·(c − u), formed here in float64 (variance channels from
the conditional half, as diffusers' DeepFloyd IF pipeline takes them), with the same counter noise. The kernel
combines the halves in registers: its rounding is bounded per element by the shared bound (tests/_bounds.py) with
the output's terms |(1 − w)·u| + |w·c| in place of |out|.
"""

import pytest
import torch
from _bounds import check, sigma64, step_terms

from fastrev import Schedule, ddim_step, ddpm_step, tables
from fastrev import noise as N

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
S = Schedule.linear()
SEED = 1234


def _halves(B=3, C=2, rest=(5, 7), learned=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((B, C) + rest, generator=g) * 1.5).to(DEV, dtype)
    oc = 2 * C if learned else C
    u = torch.randn((B, oc) + rest, generator=g)
    c = torch.randn((B, oc) + rest, generator=g)
    for h in (u, c):
        if learned == "learned_range":
            h[:, C:].uniform_(-1, 1, generator=g)
        elif learned == "learned":
            h[:, C:] = h[:, C:] * 0.5 - 6
    t = torch.tensor([0, 500, 999][:B] + [17] * max(0, B - 3), device=DEV)
    return x, u.to(DEV, dtype), c.to(DEV, dtype), t


def _combined(u, c, w, C=None, f=None):
    """u + w·(c − u) in float64 on the first C channels (× f per sample), the conditional variance channels after."""
    shape = (u.shape[0],) + (1,) * (u.dim() - 1)
    w = (w if isinstance(w, torch.Tensor) else torch.full((u.shape[0],), float(w))).double().to(u.device)
    uu, cc = (u, c) if C is None else (u[:, :C], c[:, :C])
    out = uu.double() + w.reshape(shape) * (cc.double() - uu.double())
    if f is not None:
        out = out * f.reshape(shape)
    out_terms = ((1 - w).reshape(shape) * uu.double()).abs() + (w.reshape(shape) * cc.double()).abs()
    if f is not None:
        out_terms = out_terms * f.abs().reshape(shape)
    if C is not None:
        out = torch.cat([out, c[:, C:].double()], 1)
    return out, out_terms


# pairwise-covering cases: every (prediction, variance) and (prediction, clip) and (variance, clip) pair once
DDPM_CASES = [("epsilon", "fixed_small", "none"), ("epsilon", "learned", "clip"), ("epsilon", "learned_range",
                                                                                     "threshold"),
              ("v_prediction", "fixed_small", "clip"), ("v_prediction", "learned", "threshold"),
              ("v_prediction", "learned_range", "none"), ("sample", "fixed_small", "threshold"),
              ("sample", "learned", "none"), ("sample", "learned_range", "clip")]


@pytest.mark.parametrize("pred,var,clip", DDPM_CASES)
def test_ddpm_guided_equals_step_on_combined_output(pred, var, clip):
    learned = var if var.startswith("learned") else None
    x, u, c, t = _halves(learned=learned)
    w = 7.5
    C = x.shape[1]
    kw = dict(prediction_type=pred, variance_type=var, clip_sample=clip == "clip", thresholding=clip == "threshold",
              dynamic_thresholding_ratio=0.9, sample_max_value=3.0, seed=SEED)
    got = ddpm_step(torch.cat([u, c]), t, x, S, guidance_scale=w, backend="triton", **kw)
    comb, out_terms = _combined(u, c, w, C if learned else None)
    want = ddpm_step(comb, t, x.double(), S, backend="reference", **kw)
    table = tables.ddpm_table(S, pred, var, clip != "none")
    var_mode = tables.VAR_MODES[var] if learned else tables.VAR_FIXED
    sigma = sigma64(table, t, comb[:, C:] if learned else None, var_mode, x.dim())
    x0_terms, prev_terms = step_terms(table, t, x, out_terms, N.noise_like(x, SEED, t), sigma=sigma)
    check(got.pred_original_sample, want.pred_original_sample, x0_terms, name="x0")
    check(got.prev_sample, want.prev_sample, prev_terms, name="prev")
    # the eager backends combine first and give the oracle's answer
    ref = ddpm_step(torch.cat([u, c]).double(), t, x.double(), S, guidance_scale=w, backend="reference", **kw)
    torch.testing.assert_close(ref.prev_sample, want.prev_sample, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pred,eta,clip,use_clipped", [("epsilon", 0.0, "clip", True), ("v_prediction", 1.0, "none",
                                                                                       False),
                                                        ("sample", 0.5, "threshold", True)])
def test_ddim_guided_equals_step_on_combined_output(pred, eta, clip, use_clipped):
    x, u, c, t = _halves()
    w = torch.tensor([1.0, 4.0, 9.5], device=DEV)             # per-sample scales
    kw = dict(prediction_type=pred, eta=eta, clip_sample=clip == "clip", thresholding=clip == "threshold",
              use_clipped_model_output=use_clipped, seed=SEED)
    got = ddim_step(torch.cat([u, c]), t, x, S, guidance_scale=w, backend="triton", **kw)
    comb, out_terms = _combined(u, c, w)
    want = ddim_step(comb, t, x.double(), S, backend="reference", **kw)
    table = tables.ddim_table(S, pred, eta, clip != "none", 1.0, use_clipped)
    x0_terms, prev_terms = step_terms(table, t, x, out_terms, N.noise_like(x, SEED, t) if eta > 0 else None)
    check(got.pred_original_sample, want.pred_original_sample, x0_terms, name="x0")
    check(got.prev_sample, want.prev_sample, prev_terms, name="prev")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_guidance_rescale_matches_lin_et_al(backend):
    """f = φ·std(c)/std(cfg) + (1 − φ) per sample, cfg = u + w·(c − u) (std unbiased, over each sample)."""
    x, u, c, t = _halves(B=2, rest=(9, 9))
    w, phi = 5.0, 0.7
    cfg, _ = _combined(u, c, w)
    f = phi * c.double().flatten(1).std(1) / cfg.flatten(1).std(1) + (1 - phi)
    comb, out_terms = _combined(u, c, w, f=f)
    got = ddpm_step(torch.cat([u, c]), t, x, S, guidance_scale=w, guidance_rescale=phi, seed=SEED, backend=backend)
    want = ddpm_step(comb, t, x.double(), S, seed=SEED, backend="reference")
    _, prev_terms = step_terms(tables.ddpm_table(S), t, x, out_terms, N.noise_like(x, SEED, t))
    check(got.prev_sample, want.prev_sample, prev_terms, rtol=1e-5)     # + the float32 statistics of the pre-pass
    assert not torch.allclose(got.prev_sample.double(), ddpm_step(_combined(u, c, w)[0], t, x.double(), S, seed=SEED,
                                                                  backend="reference").prev_sample, atol=1e-3)


def test_scale_one_is_the_conditional_step_and_zero_the_unconditional():
    x, u, c, t = _halves(learned="learned_range")
    kw = dict(variance_type="learned_range", seed=SEED, backend="triton")
    mo = torch.cat([u, c])
    one = ddpm_step(mo, t, x, S, guidance_scale=1.0, **kw).prev_sample
    torch.testing.assert_close(one, ddpm_step(c, t, x, S, **kw).prev_sample, rtol=1e-5, atol=1e-5)
    zero = ddpm_step(mo, t, x, S, guidance_scale=0.0, **kw).prev_sample     # uncond ε, the cond variance
    mixed = torch.cat([u[:, :2], c[:, 2:]], 1)
    torch.testing.assert_close(zero, ddpm_step(mixed, t, x, S, **kw).prev_sample, rtol=1e-5, atol=1e-5)


def test_fp16_storage_guided():
    x, u, c, t = _halves(dtype=torch.float16)
    got = ddpm_step(torch.cat([u, c]), t, x, S, guidance_scale=3.0, seed=SEED, backend="triton")
    assert got.prev_sample.dtype == torch.float16
    comb, out_terms = _combined(u, c, 3.0)
    want = ddpm_step(comb, t, x.double(), S, seed=SEED, backend="reference")
    _, prev_terms = step_terms(tables.ddpm_table(S), t, x, out_terms, N.noise_like(x, SEED, t))
    check(got.prev_sample, want.prev_sample, prev_terms, rtol=2.0**-11 + 1e-6)


def test_bad_guidance_arguments_are_clear_errors():
    x, u, c, t = _halves()
    mo = torch.cat([u, c])
    with pytest.raises(ValueError, match="model_output must be the \\[2B, ...\\] concatenation"):
        ddpm_step(u, t, x, S, guidance_scale=2.0, seed=0)
    with pytest.raises(TypeError, match="guidance_scale must be a float or a \\[B\\] tensor"):
        ddpm_step(mo, t, x, S, guidance_scale=True, seed=0)
    with pytest.raises(TypeError, match="guidance_scale must be a float or a \\[B\\] tensor"):
        ddpm_step(mo, t, x, S, guidance_scale="7", seed=0)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        ddim_step(mo, t, x, S, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"guidance_scale tensor must have shape \[B\]"):
        ddpm_step(mo, t, x, S, guidance_scale=torch.ones(2, device=DEV), seed=0)
    with pytest.raises(TypeError, match="guidance_scale tensor must be floating point"):
        ddpm_step(mo, t, x, S, guidance_scale=torch.ones(3, dtype=torch.int64, device=DEV), seed=0)
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        ddpm_step(mo, t, x, S, guidance_scale=2.0, guidance_rescale=1.5, seed=0)
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        ddpm_step(u, t, x, S, guidance_rescale=0.5, seed=0)
