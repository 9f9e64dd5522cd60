"""fastrev.diffusers: drop-in FastDDPMScheduler / FastDDIMScheduler against diffusers' own schedulers.

Parity is "≤ 1e-5 relative in fp32", measured against what diffusers' own float32 arithmetic can resolve:
|ours − diffusers| ≤ 1e-5 · scale per element, where the scale of pred_original_sample is the magnitude of the terms
it sums (|A·x| + |B·out|: an ε-prediction x̂₀ is (x − √(1−ᾱ)ε)/√ᾱ, with 1/√ᾱ up to 157 on the linear schedule and
1.6e4 on the cosine one at t = 999), and the scale of prev_sample is max |prev| plus what that x̂₀ rounding carries
into it (plus, for DDIM, the rounding of diffusers' √(1 − ᾱ_prev − σ²), which cancels for η ≈ 1 as ᾱ_t → 0).
Everywhere else this is plain 1e-5 relative to the largest output. The broad matrix runs the float64 torch update
(the CPU default); the fused Triton kernel runs under the interpreter on a small representative subset (each launch
costs ~0.07 s there); tests marked ``cuda`` run the kernel on a GPU (CUDA-graph capture, no host sync, parity).
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from fastrev import noise as fnoise  # noqa: E402
from fastrev.diffusers import FastDDIMScheduler, FastDDPMScheduler  # noqa: E402

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
TRAINED = [float(b) for b in np.linspace(1e-4, 0.03, 100) ** 1.2]   # trained_betas case: N = 100
SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "trained_betas": dict(trained_betas=TRAINED, num_train_timesteps=len(TRAINED)),
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
CLIPS = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
}
SPACINGS = ("leading", "trailing", "linspace")
STEP_COUNTS = (7, 10)          # n = 1 and n = 1000: test_edge_step_counts_parity


# ------------------------------------------------------------------------------------------------ helpers
def _x0_terms(ref, t, x, out, prediction_type):
    """|A·x| + |B·out| per element, for x̂₀ = A·x + B·out at timestep t: the magnitude float32 rounding acts on
    (1/√ᾱ capped at 1e30 where ᾱ = 0, zero terminal SNR)."""
    ab = ref.alphas_cumprod[int(t)].double()
    if prediction_type == "epsilon":
        a, b = (1 / ab.sqrt()).clamp(max=1e30), ((1 - ab) / ab).sqrt().clamp(max=1e30)
    elif prediction_type == "sample":
        a, b = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    else:
        a, b = ab.sqrt(), (1 - ab).sqrt()
    return a * x.double().abs() + b * out.double().abs()


def _err(ours, ref, scale=0.0):
    """max |ours − ref| / max(scale, max |ref|), ``scale`` a float or a per-element tensor; a NaN in one but not the
    other at the same place → inf."""
    ours, ref = ours.double(), ref.double()
    if not torch.equal(torch.isnan(ours), torch.isnan(ref)):
        return float("inf")
    ok = ~torch.isnan(ref)
    if not ok.any():
        return 0.0
    top = float(ref[ok].abs().max())
    scale = torch.as_tensor(scale, dtype=torch.float64).expand_as(ref)[ok].clamp_min(max(top, 1e-30))
    return float(((ours[ok] - ref[ok]).abs() / scale).max())


def _errors(a, b, ref, t, x, out, prediction_type, clipped, c_x0, extra=0.0):
    """(prev error, x̂₀ error) of fastrev's output ``b`` against diffusers' ``a``, in units of what diffusers' own
    float32 arithmetic can resolve. x̂₀ is compared relative to its terms |A·x| + |B·out| (diffusers' x̂₀ is exact to
    ~1e-7 of those: ~1e-5 of |x̂₀| when 1/√ᾱ_999 ≈ 1.6e4 on the cosine schedule); prev_sample relative to max |prev|
    plus what that x̂₀ rounding carries into prev through its x̂₀ coefficient ``c_x0`` where x̂₀ is not clipped
    (clipped entries are exact); ``extra`` is an absolute bound per element added to the tolerance (DDIM: the
    rounding of diffusers' √(1 − ᾱ_prev − σ²) times |ε̂|)."""
    terms = _x0_terms(ref, t, x, out, prediction_type)
    x0_ref = a.pred_original_sample.double()
    free = (x0_ref.abs() < x0_ref.abs().max()) if clipped else torch.ones_like(x0_ref, dtype=torch.bool)
    prev_scale = float(a.prev_sample.abs().max()) + torch.where(free, c_x0 * terms, 0.0) + extra / TOL
    return _err(b.prev_sample, a.prev_sample, prev_scale), _err(b.pred_original_sample, a.pred_original_sample, terms)


def _ddim_direction_rounding(ab, ab_prev, eta, x, out, x0_ref, prediction_type, use_clipped):
    """Per element: diffusers' float32 error in √(1 − ᾱ_prev − σ²)·ε̂. 1 − ᾱ_prev − σ² cancels (to ~ᾱ_t/ᾱ_prev for
    η = 1), so its few-ulp rounding δ moves the square root d by min(√δ, δ/2d)."""
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    sig2 = eta**2 * var
    delta = 4.8e-7 * max(float(1 - ab_prev), float(sig2))
    d = float((1 - ab_prev - sig2).clamp_min(0).sqrt())
    dd = min(delta**0.5, delta / (2 * d)) if d > 0 else delta**0.5
    xd, od = x.double(), out.double()
    if use_clipped or prediction_type == "sample":
        src = x0_ref if use_clipped else od
        eps = (xd - ab.sqrt() * src) / (1 - ab).sqrt()
    elif prediction_type == "epsilon":
        eps = od
    else:
        eps = ab.sqrt() * od + (1 - ab).sqrt() * xd
    return dd * eps.abs()


def _inputs(seed, variance_type=None, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    if variance_type == "learned":          # a linear variance: positive
        out = torch.cat([out, torch.rand(shape, generator=g) * 0.02 + 1e-4], dim=1)
    elif variance_type == "learned_range":  # v in [-1, 1]
        out = torch.cat([out, torch.rand(shape, generator=g) * 2 - 1], dim=1)
    return x, out


def _ddim_ref_step(ref, prev_t, model_output, t, sample, **kw):
    """diffusers' own DDIMScheduler.step, with ᾱ_prev read at ``prev_t`` (fastrev_fixes: the schedule's next entry)
    instead of at its t − N // n (diffusers #12633): the entry it reads is patched for the call. A no-op where the
    two agree."""
    N, n = ref.config.num_train_timesteps, ref.num_inference_steps
    wrong = int(t) - N // n
    ab, final = ref.alphas_cumprod, ref.final_alpha_cumprod
    want = ab[prev_t].clone() if prev_t >= 0 else final.clone()
    if wrong >= 0:
        ref.alphas_cumprod = ab.clone()
        ref.alphas_cumprod[wrong] = want
    else:
        ref.final_alpha_cumprod = want
    try:
        return ref.step(model_output, t, sample, **kw)
    finally:
        ref.alphas_cumprod, ref.final_alpha_cumprod = ab, final


def _to_cpu(res):
    return type(res)(prev_sample=res.prev_sample.cpu(), pred_original_sample=res.pred_original_sample.cpu())


def _pick(timesteps):
    """The steps checked per configuration: the first, a middle one and the last two."""
    n = len(timesteps)
    return [timesteps[i] for i in sorted({0, n // 2, max(n - 2, 0), n - 1})]


def _compare_ddpm(cfg, ref_cfg, n, *, backend="torch", seed=0, steps=None, device="cpu"):
    """Step diffusers and fastrev side by side at the picked timesteps (fastrev's tensors on ``device``, the
    timestep a CPU tensor as pipelines pass it); return a list of failure strings."""
    ref = DDPMScheduler(**ref_cfg)
    fast = FastDDPMScheduler(**cfg)
    fast.backend = backend
    ref.set_timesteps(n)
    fast.set_timesteps(n)
    assert torch.equal(ref.timesteps, fast.timesteps)
    ts = ref.timesteps.tolist()
    g_ref, g_fast = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    clipped = bool(cfg.get("clip_sample", True) or cfg.get("thresholding", False))
    bad = []
    for k, t in enumerate(steps or _pick(ref.timesteps)):
        i = ts.index(int(t))
        ab = ref.alphas_cumprod[int(t)].double()
        ab_prev = ref.alphas_cumprod[ts[i + 1]].double() if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        c_x0 = float(ab_prev.sqrt() * (1 - ab / ab_prev) / (1 - ab))
        x, out = _inputs(seed * 1000 + k, cfg.get("variance_type"))
        a = ref.step(out, t, x, generator=g_ref)
        b = _to_cpu(fast.step(out.to(device), t, x.to(device), generator=g_fast))
        e_prev, e_x0 = _errors(a, b, ref, t, x, out[:, :SHAPE[1]], cfg.get("prediction_type", "epsilon"), clipped,
                               c_x0)
        if not (e_prev <= TOL and e_x0 <= TOL):
            bad.append(f"{cfg} n={n} t={int(t)}: prev {e_prev:.2e}, x0 {e_x0:.2e}")
    if not torch.equal(g_ref.get_state(), g_fast.get_state()):
        bad.append(f"{cfg} n={n}: generator consumed differently")
    return bad


def _compare_ddim(cfg, n, *, eta, use_clipped, backend="torch", seed=0, steps=None, device="cpu", fixes=False):
    """As :func:`_compare_ddpm`; by default against stock diffusers (previous timestep t − N // n), with ``fixes``
    (fastrev_fixes=True) against diffusers' arithmetic at the next entry of the schedule."""
    ref = DDIMScheduler(**cfg)
    fast = FastDDIMScheduler(**cfg, fastrev_fixes=fixes)
    fast.backend = backend
    ref.set_timesteps(n)
    fast.set_timesteps(n)
    assert torch.equal(ref.timesteps, fast.timesteps)
    g_ref, g_fast = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ts = ref.timesteps.tolist()
    clipped = bool(cfg.get("clip_sample", True) or cfg.get("thresholding", False))
    bad = []
    for k, t in enumerate(steps or _pick(ref.timesteps)):
        i = ts.index(int(t))
        if fixes:
            prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        else:
            prev_t = max(int(t) - ref.config.num_train_timesteps // n, -1)
        assert fast.previous_timestep(int(t)) == prev_t
        ab = ref.alphas_cumprod[int(t)].double()
        ab_prev = (ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.final_alpha_cumprod).double()
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        d = (1 - ab_prev - eta**2 * var).clamp_min(0).sqrt()
        c_x0 = float(ab_prev.sqrt() + (d * (ab / (1 - ab)).sqrt() if use_clipped else 0))
        x, out = _inputs(seed * 1000 + k)
        kw = dict(eta=eta, use_clipped_model_output=use_clipped)
        a = _ddim_ref_step(ref, prev_t, out, t, x, generator=g_ref, **kw)
        b = _to_cpu(fast.step(out.to(device), t, x.to(device), generator=g_fast, **kw))
        pt = cfg.get("prediction_type", "epsilon")
        extra = _ddim_direction_rounding(ab, ab_prev, eta, x, out, a.pred_original_sample.double(), pt, use_clipped)
        e_prev, e_x0 = _errors(a, b, ref, t, x, out, pt, clipped, c_x0, extra)
        if not (e_prev <= TOL and e_x0 <= TOL):
            bad.append(f"{cfg} eta={eta} clipped_eps={use_clipped} n={n} t={int(t)}: prev {e_prev:.2e}, "
                       f"x0 {e_x0:.2e}")
    if not torch.equal(g_ref.get_state(), g_fast.get_state()):
        bad.append(f"{cfg} n={n}: generator consumed differently")
    return bad


def _report(bad):
    assert not bad, f"{len(bad)} mismatches, e.g.:\n" + "\n".join(bad[:8])


# ------------------------------------------------------------------------------------------------ the parity matrix
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_parity_matrix(schedule, variance_type):
    """Every beta_schedule × variance_type × prediction_type × clip/threshold × spacing × step count (torch path)."""
    bad = []
    for prediction_type in PREDICTIONS:
        for clip in CLIPS.values():
            for spacing in SPACINGS:
                for n in STEP_COUNTS:
                    cfg = dict(SCHEDULES[schedule], variance_type=variance_type, prediction_type=prediction_type,
                               timestep_spacing=spacing, **clip)
                    # diffusers' fixed_large_log is NaN (#14569): fastrev's is fixed_large's noise scale
                    ref_cfg = dict(cfg, variance_type="fixed_large") if variance_type == "fixed_large_log" else cfg
                    bad += _compare_ddpm(cfg, ref_cfg, n, seed=len(bad) + n)
    _report(bad)


# η, set_alpha_to_one and use_clipped_model_output vary together (three combinations per configuration)
DDIM_VARIANTS = ((0.0, True, False), (1.0, False, True), (0.5, True, False))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"])
def test_ddim_parity_matrix(schedule, prediction_type):
    """Every beta_schedule × prediction_type × clip/threshold × spacing × step count against stock diffusers'
    DDIM step; with fastrev_fixes=True (where it differs: "linspace", "trailing") against diffusers' arithmetic at the
    schedule's next entry (the #12633 fix)."""
    bad = []
    for clip in CLIPS.values():
        for spacing in SPACINGS:
            for n in STEP_COUNTS:
                for j, (eta, one, use_clipped) in enumerate(DDIM_VARIANTS):
                    cfg = dict(SCHEDULES[schedule], prediction_type=prediction_type, timestep_spacing=spacing,
                               set_alpha_to_one=one, **clip)
                    bad += _compare_ddim(cfg, n, eta=eta, use_clipped=use_clipped, seed=n + 10 * j)
                    if spacing != "leading" and j == 1:
                        bad += _compare_ddim(cfg, n, eta=eta, use_clipped=use_clipped, seed=n, fixes=True)
    _report(bad)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_zero_terminal_snr_parity(spacing):
    """rescale_betas_zero_snr (ᾱ_999 = 0): every prediction type; with ε-prediction the clipped x̂₀ at t = 999 is
    diffusers' ±clip_sample_range (its (x − ε)/0 = ±inf, clipped)."""
    bad = []
    for prediction_type in PREDICTIONS:
        # ε with thresholding: diffusers' quantile of ±inf x̂₀ is NaN (fastrev: ±1, the clipped limit)
        for clip_name in ("clip",) if prediction_type == "epsilon" else CLIPS:
            base = dict(rescale_betas_zero_snr=True, prediction_type=prediction_type, timestep_spacing=spacing,
                        **CLIPS[clip_name])
            bad += _compare_ddpm(dict(base, variance_type="fixed_small"), dict(base, variance_type="fixed_small"), 10)
            # η = 0: with η > 0 diffusers' float32 1 − ᾱ_prev − σ² at ᾱ_t = 0 rounds below 0 (NaN; next test)
            bad += _compare_ddim(dict(base), 10, eta=0.0, use_clipped=prediction_type == "epsilon")
    _report(bad)


def test_zero_terminal_snr_ddim_eta_is_finite():
    """DDIM η = 1 at ᾱ_999 = 0: σ² = 1 − ᾱ_prev exactly, so √(1 − ᾱ_prev − σ²) = 0. diffusers computes it in
    float32 and gets √(a tiny negative) = NaN; fastrev gets 0 (and matches diffusers' float64 evaluation)."""
    cfg = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    ref, fast = DDIMScheduler(**cfg), FastDDIMScheduler(**cfg)
    ref.set_timesteps(10)
    fast.set_timesteps(10)
    x, out = _inputs(9)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    ours = fast.step(out, 999, x, eta=1.0, variance_noise=z).prev_sample
    assert torch.isfinite(ours).all()
    ref.alphas_cumprod = ref.alphas_cumprod.double()          # diffusers' own step, in float64
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    stock64 = _ddim_ref_step(ref, 899, out.double(), 999, x.double(), eta=1.0, variance_noise=z.double()).prev_sample
    assert _err(ours, stock64) <= TOL


@pytest.mark.parametrize("n", [1, 1000])
def test_edge_step_counts_parity(n):
    """One inference step (t = 0 for leading/linspace: no noise, no generator draw; t = 999 for trailing) and the
    full 1000-step chain, every spacing and prediction type."""
    bad = []
    for spacing in SPACINGS:
        for pt in PREDICTIONS:
            cfg = dict(timestep_spacing=spacing, prediction_type=pt, variance_type="learned_range")
            bad += _compare_ddpm(cfg, cfg, n)
            bad += _compare_ddim(dict(timestep_spacing=spacing, prediction_type=pt, set_alpha_to_one=False), n,
                                 eta=1.0, use_clipped=True)
    _report(bad)


def test_steps_offset_and_leading_parity():
    bad = _compare_ddpm(dict(steps_offset=1), dict(steps_offset=1), 10)
    bad += _compare_ddim(dict(steps_offset=1, set_alpha_to_one=False), 10, eta=1.0, use_clipped=False)
    _report(bad)


def test_full_chain_parity_before_set_timesteps():
    """DDPM without set_timesteps steps t → t − 1 (diffusers); a few timesteps of the 1000-step chain."""
    ref, fast = DDPMScheduler(variance_type="learned_range"), FastDDPMScheduler(variance_type="learned_range")
    for t in (999, 500, 1, 0):
        x, out = _inputs(t, "learned_range")
        a = ref.step(out, t, x, generator=torch.Generator().manual_seed(t))
        b = fast.step(out, t, x, generator=torch.Generator().manual_seed(t))
        assert _err(b.prev_sample, a.prev_sample) <= TOL
        assert fast.previous_timestep(t) == t - 1


# ------------------------------------------------------------------------------------------------ the fused kernel
KERNEL_CASES = [
    ("ddpm", dict(variance_type="fixed_small", prediction_type="epsilon", clip_sample=True), 10),
    ("ddpm", dict(variance_type="learned_range", prediction_type="v_prediction", thresholding=True,
                  sample_max_value=1.5, timestep_spacing="trailing"), 7),
    ("ddpm", dict(variance_type="learned", prediction_type="sample", clip_sample=False,
                  beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), 7),
    ("ddpm", dict(variance_type="fixed_large_log", rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10),
    ("ddim", dict(prediction_type="epsilon", clip_sample=True, set_alpha_to_one=False), 10),
    ("ddim", dict(prediction_type="v_prediction", thresholding=True, timestep_spacing="linspace",
                  beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 7),
]


@pytest.mark.parametrize("kind,cfg,n", KERNEL_CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(KERNEL_CASES)])
def test_kernel_parity_subset(kind, cfg, n):
    """The fused Triton kernel (the interpreter here) against diffusers, first and last step of a chain."""
    ts = None
    if kind == "ddpm":
        ref_cfg = dict(cfg, variance_type="fixed_large") if cfg["variance_type"] == "fixed_large_log" else cfg
        sch = DDPMScheduler(**ref_cfg)
        sch.set_timesteps(n)
        ts = [sch.timesteps[0], sch.timesteps[-1]]
        bad = _compare_ddpm(cfg, ref_cfg, n, backend="triton", steps=ts)
    else:
        sch = DDIMScheduler(**cfg)
        sch.set_timesteps(n)
        ts = [sch.timesteps[0], sch.timesteps[-1]]
        bad = _compare_ddim(cfg, n, eta=1.0, use_clipped=True, backend="triton", steps=ts)
    _report(bad)


def test_kernel_short_loop_matches_diffusers():
    """A 10-step DDPM loop on the kernel path, each step fed the previous output."""
    ref, fast = DDPMScheduler(), FastDDPMScheduler()
    fast.backend = "triton"
    ref.set_timesteps(10)
    fast.set_timesteps(10)
    xa = xb = _inputs(0)[0]
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ref.timesteps:
        xa = ref.step(xa * t / (t + 1), t, xa, generator=ga).prev_sample
        xb = fast.step(xb * t / (t + 1), t, xb, generator=gb).prev_sample
    assert _err(xb, xa) <= TOL


# ------------------------------------------------------------------------------------------------ golden loops
def _dummy_sample_deter():
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


@pytest.mark.parametrize("prediction_type,total,mean", [("epsilon", 258.9606, 0.3372),
                                                        ("v_prediction", 202.0296, 0.2631)])
def test_golden_full_loop(prediction_type, total, mean):
    """diffusers' tests/schedulers/test_scheduler_ddpm.py test_full_loop_no_noise / _with_v_prediction."""
    sch = FastDDPMScheduler(prediction_type=prediction_type, clip_sample=True)
    sample = _dummy_sample_deter()
    generator = torch.manual_seed(0)
    for t in reversed(range(len(sch))):
        sample = sch.step(sample * t / (t + 1), t, sample, generator=generator).prev_sample
    assert abs(sample.abs().sum().item() - total) < 1e-2
    assert abs(sample.abs().mean().item() - mean) < 1e-3


def test_get_variance_golden():
    sch = FastDDPMScheduler()
    assert abs(float(sch._get_variance(0)) - 0.0) < 1e-5
    assert abs(float(sch._get_variance(487)) - 0.00979) < 1e-5
    assert abs(float(sch._get_variance(999)) - 0.02) < 1e-5


# ------------------------------------------------------------------------------------------------ per-sample timesteps
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_per_sample_timesteps_match_one_at_a_time(kind, backend):
    """A [B] timestep with a list of generators = each sample stepped alone with its generator (= diffusers)."""
    if kind == "ddpm":
        cfg = dict(variance_type="learned_range", thresholding=True, sample_max_value=2.0)
        fast, ref = FastDDPMScheduler(**cfg), DDPMScheduler(**cfg)
        kw = {}
    else:
        cfg = dict(prediction_type="v_prediction")
        fast, ref = FastDDIMScheduler(**cfg), DDIMScheduler(**cfg)
        kw = dict(eta=1.0)
    fast.backend = backend
    fast.set_timesteps(10)
    ref.set_timesteps(10)
    ts = fast.timesteps[[0, 4, 9]]                     # 900, 500, 0: includes the noiseless last step
    x, out = _inputs(7, cfg.get("variance_type"), shape=(3, 3, 4, 4))
    batch = fast.step(out, ts, x, generator=[torch.Generator().manual_seed(40 + i) for i in range(3)], **kw)
    for i in range(3):
        alone = fast.step(out[i:i + 1], ts[i], x[i:i + 1], generator=torch.Generator().manual_seed(40 + i), **kw)
        assert _err(batch.prev_sample[i:i + 1], alone.prev_sample) <= 1e-6
        assert _err(batch.pred_original_sample[i:i + 1], alone.pred_original_sample) <= 1e-6
        if backend == "torch":
            stock = ref.step(out[i:i + 1], ts[i], x[i:i + 1], generator=torch.Generator().manual_seed(40 + i), **kw)
            assert _err(alone.prev_sample, stock.prev_sample) <= TOL


def test_per_sample_timesteps_fast_mode():
    """Fast mode: sample i of a batch at its own t gets counter noise (seed, i, t_i); the same as stepping it alone
    with that noise given explicitly."""
    fast = FastDDPMScheduler()
    fast.noise_seed = 1234
    fast.set_timesteps(10)
    ts = fast.timesteps[[0, 3, 8]]
    x, out = _inputs(3, shape=(3, 3, 4, 4))
    batch = fast.step(out, ts, x).prev_sample
    z = fnoise.noise_like(x, 1234, ts)
    for i in range(3):
        alone = fast.step(out[i:i + 1], ts[i], x[i:i + 1], variance_noise=z[i:i + 1]).prev_sample
        assert _err(batch[i:i + 1], alone) <= 1e-6


# ------------------------------------------------------------------------------------------------ fast mode
def test_fast_mode_kernel_equals_torch_path():
    """Without a generator both backends draw the same counter stream (to a few ulp)."""
    x, out = _inputs(11)
    res = {}
    for backend in ("torch", "triton"):
        for kind, sch, kw in (("ddpm", FastDDPMScheduler(variance_type="fixed_large"), {}),
                              ("ddim", FastDDIMScheduler(), dict(eta=0.7))):
            sch.backend = backend
            sch.noise_seed = 99
            sch.set_timesteps(10)
            res[backend, kind] = sch.step(out, sch.timesteps[2], x, **kw).prev_sample
    for kind in ("ddpm", "ddim"):
        assert _err(res["triton", kind], res["torch", kind]) <= TOL
    # and it is the documented stream: the exact-mode step with that noise given explicitly
    sch = FastDDPMScheduler(variance_type="fixed_large")
    sch.set_timesteps(10)
    t = sch.timesteps[2]
    z = fnoise.noise_like(x, 99, torch.full((2,), int(t)))
    assert _err(res["torch", "ddpm"], sch.step(out, t, x, variance_noise=z).prev_sample) <= 1e-6


def test_fast_mode_seeding():
    """The fast-mode seed is drawn from torch's global generator once per set_timesteps (at the first fast step)."""
    x, out = _inputs(12)

    def run():
        sch = FastDDPMScheduler()
        sch.set_timesteps(10)
        return [sch.step(out, t, x).prev_sample for t in sch.timesteps[:2]]

    torch.manual_seed(3)
    a = run()
    torch.manual_seed(3)
    b = run()
    c = run()
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert all(torch.isfinite(u).all() for u in a)


# ------------------------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def tiny_unets():
    """Tiny randomly initialised UNet2DModels (3 → 3 channels, and 3 → 6 for a learned variance); nothing
    downloaded. One OpenMP thread: tiny convolutions are faster so, and robust to a busy machine."""
    UNet2DModel = diffusers.UNet2DModel
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kw = dict(sample_size=8, in_channels=3, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    yield {3: UNet2DModel(out_channels=3, **kw).eval(), 6: UNet2DModel(out_channels=6, **kw).eval()}
    torch.set_num_threads(threads)


def _images(pipe, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return pipe(batch_size=2, generator=gen, output_type="np", **kw).images


def _assert_same_images(ours, stock, scheduler):
    """Images of a whole pipeline run: 1e-5 on average, and 1e-5 times the chain's amplification at worst — the
    first step's x̂₀ is x_T/√ᾱ_T-sized, so a 1e-7 rounding difference there reaches the image ×1/√ᾱ_{t_first}
    (≈ 70 for 10 leading steps) after passing through the UNet at every later step."""
    amp = float(1 / scheduler.alphas_cumprod[int(scheduler.timesteps[0])].sqrt())
    assert np.isfinite(stock).all() and stock.std() > 0.05
    assert np.abs(ours - stock).mean() <= TOL
    assert np.abs(ours - stock).max() <= TOL * amp


@pytest.mark.parametrize("variance_type,channels", [("fixed_small", 3), ("learned_range", 6)])
def test_ddpm_pipeline_swap(tiny_unets, variance_type, channels):
    pipe = diffusers.DDPMPipeline(unet=tiny_unets[channels], scheduler=DDPMScheduler(variance_type=variance_type))
    pipe.set_progress_bar_config(disable=True)
    stock = _images(pipe, num_inference_steps=10)
    pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, FastDDPMScheduler)
    ours = _images(pipe, num_inference_steps=10)
    _assert_same_images(ours, stock, pipe.scheduler)
    # no generator: fast counter noise, reproducible under torch.manual_seed
    torch.manual_seed(5)
    fast_a = _images(pipe, seed=None, num_inference_steps=10)
    torch.manual_seed(5)
    fast_b = _images(pipe, seed=None, num_inference_steps=10)
    assert np.isfinite(fast_a).all() and np.array_equal(fast_a, fast_b)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_swap(tiny_unets, eta):
    pipe = diffusers.DDIMPipeline(unet=tiny_unets[3], scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    stock = _images(pipe, eta=eta, num_inference_steps=10)
    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)   # after construction (see README)
    ours = _images(pipe, eta=eta, num_inference_steps=10)
    _assert_same_images(ours, stock, pipe.scheduler)


def test_ddim_pipeline_kernel_backend(tiny_unets):
    """The fused kernel inside a real pipeline (interpreter; 3 steps), exact mode, against the stock scheduler."""
    pipe = diffusers.DDIMPipeline(unet=tiny_unets[3], scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    stock = _images(pipe, eta=1.0, num_inference_steps=3)
    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.backend = "triton"
    ours = _images(pipe, eta=1.0, num_inference_steps=3)
    _assert_same_images(ours, stock, pipe.scheduler)


# ------------------------------------------------------------------------------------------------ being a drop-in
@pytest.mark.parametrize("fast_cls,stock_cls", [(FastDDPMScheduler, DDPMScheduler), (FastDDIMScheduler, DDIMScheduler)])
def test_config_signature_is_diffusers(fast_cls, stock_cls):
    """Same __init__ parameter names, order and defaults, then the one fastrev option (off); step's parameters start
    with diffusers' own."""
    ours = [(p.name, p.default) for p in inspect.signature(fast_cls.__init__).parameters.values()]
    theirs = [(p.name, p.default) for p in inspect.signature(stock_cls.__init__).parameters.values()]
    assert ours == theirs + [("fastrev_fixes", False)]
    ours = list(inspect.signature(fast_cls.step).parameters)
    theirs = list(inspect.signature(stock_cls.step).parameters)
    assert ours[:len(theirs)] == theirs
    assert "timesteps" in inspect.signature(fast_cls.set_timesteps).parameters


@pytest.mark.parametrize("fast_cls,stock_cls", [(FastDDPMScheduler, DDPMScheduler), (FastDDIMScheduler, DDIMScheduler)])
def test_from_config_both_ways(fast_cls, stock_cls, tmp_path):
    kw = dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015,
              prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing", steps_offset=1,
              rescale_betas_zero_snr=True)
    stock = stock_cls(**kw)
    fast = fast_cls.from_config(stock.config)
    back = stock_cls.from_config(fast.config)

    def public(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert public(fast.config) == dict(public(stock.config), fastrev_fixes=False)
    assert public(back.config) == public(stock.config)
    assert torch.equal(fast.alphas_cumprod, stock.alphas_cumprod)
    fast.save_config(tmp_path)
    again = fast_cls.from_pretrained(tmp_path)
    assert public(again.config) == public(fast.config) and type(again) is fast_cls
    assert fast.order == 1 and fast.init_noise_sigma == 1.0 and len(fast) == 500
    x = torch.randn(SHAPE)
    assert fast.scale_model_input(x, 3) is x
    # backend / noise_seed are attributes, not config keys
    assert "backend" not in fast.config and fast.backend == "auto"


@pytest.mark.parametrize("fast_cls,stock_cls", [(FastDDPMScheduler, DDPMScheduler), (FastDDIMScheduler, DDIMScheduler)])
def test_fastrev_fixes_survives_round_trips(fast_cls, stock_cls, tmp_path):
    """The option is a config key: save_config / from_pretrained keep it, and so does a trip through diffusers' own
    class (which ignores it: a hidden config entry), so a pipeline can swap schedulers back and forth."""
    fast = fast_cls(fastrev_fixes=True, timestep_spacing="linspace")
    fast.save_config(tmp_path)
    again = fast_cls.from_pretrained(tmp_path)
    assert again.config.fastrev_fixes is True and again._fixes
    stock = stock_cls.from_config(fast.config)
    assert type(stock) is stock_cls and stock.config.timestep_spacing == "linspace"
    back = fast_cls.from_config(stock.config)
    assert back.config.fastrev_fixes is True
    # the default: a stock config gives diffusers' semantics, and the default round-trips without a warning
    assert fast_cls.from_config(stock_cls().config).config.fastrev_fixes is False
    import io
    import logging
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    logging.getLogger("diffusers").addHandler(handler)            # diffusers' logger does not propagate
    try:
        stock_cls.from_config(fast_cls().config)
        assert "fastrev_fixes" not in seen.getvalue()
        stock_cls.from_config(fast_cls(fastrev_fixes=True).config)   # diffusers says it ignores it: right
        assert "fastrev_fixes" in seen.getvalue()
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    with pytest.raises(TypeError, match="fastrev_fixes must be a bool"):
        fast_cls(fastrev_fixes="yes")


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_set_timesteps_matches_diffusers(spacing, offset, n):
    """Identical timesteps (leading + steps_offset=1 with 1000 steps reaches t = 1000, which diffusers accepts here
    and fails to step from: so does fastrev)."""
    if offset and n == 1000:
        fast = FastDDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
        fast.set_timesteps(n)
        assert int(fast.timesteps[0]) == 1000
        x, out = _inputs(0)
        with pytest.raises(ValueError, match="timestep must be in"):
            fast.step(out, 1000, x)
        assert torch.isfinite(fast.step(out, 999, x, generator=torch.Generator()).prev_sample).all()
    for fast_cls, stock_cls in ((FastDDPMScheduler, DDPMScheduler), (FastDDIMScheduler, DDIMScheduler)):
        ref, fast = stock_cls(timestep_spacing=spacing, steps_offset=offset), fast_cls(timestep_spacing=spacing,
                                                                                      steps_offset=offset)
        ref.set_timesteps(n)
        fast.set_timesteps(n)
        assert torch.equal(ref.timesteps, fast.timesteps) and fast.timesteps.dtype == torch.int64
        assert fast.num_inference_steps == n


def test_custom_timesteps_as_diffusers():
    sch = FastDDPMScheduler()
    sch.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    assert sch.timesteps.tolist() == [100, 87, 50, 1, 0] and sch.custom_timesteps
    assert [int(sch.previous_timestep(t)) for t in sch.timesteps] == [87, 50, 1, 0, -1]
    assert sch.previous_timestep(torch.tensor(50)).item() == 1
    with pytest.raises(ValueError, match="descending"):
        sch.set_timesteps(timesteps=[100, 87, 50, 51, 0])
    with pytest.raises(ValueError, match="Can only pass one"):
        sch.set_timesteps(num_inference_steps=5, timesteps=[100, 87, 50, 1, 0])
    with pytest.raises(ValueError, match="must start before"):
        sch.set_timesteps(timesteps=[1000])
    with pytest.raises(ValueError, match="cannot be larger"):
        sch.set_timesteps(1001)
    # custom timesteps parity (stock DDPM supports them)
    ref = DDPMScheduler()
    ref.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    sch.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    for t in (100, 50, 1):
        x, out = _inputs(t)
        a = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = sch.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _err(b, a) <= TOL


def test_trailing_timesteps_every_n_as_diffusers():
    """diffusers' "trailing" is a float np.arange: for some n it rounds differently from N − i·N/n (n = 48) or
    ends with a −1 (n = 61). The default reproduces it for every n; fastrev_fixes gives exactly n points."""
    ref, fast, fixed = DDIMScheduler(timestep_spacing="trailing"), FastDDIMScheduler(timestep_spacing="trailing"), \
        FastDDIMScheduler(timestep_spacing="trailing", fastrev_fixes=True)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        fast.set_timesteps(n)
        assert torch.equal(ref.timesteps, fast.timesteps), n
    for n in (48, 61):
        fixed.set_timesteps(n)
        ts = fixed.timesteps
        assert len(ts) == n and int(ts[-1]) >= 0 and int(ts[0]) == 999



@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_trailing_minus_one_timestep_as_diffusers(kind):
    """For n = 61 diffusers' "trailing" timesteps end with −1, where it reads alphas_cumprod[-1] (and DDPM adds no
    noise): the default reproduces that step (host int, CPU tensor, [B] tensor, and whole loops); fastrev_fixes has
    no −1 and refuses one."""
    cfg = dict(timestep_spacing="trailing")
    ref, fast = (DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)) if kind == "ddpm" else \
        (DDIMScheduler(**cfg), FastDDIMScheduler(**cfg))
    kw = {} if kind == "ddpm" else dict(eta=1.0)
    for s in (ref, fast):
        s.set_timesteps(61)
    assert int(fast.timesteps[-1]) == -1 and fast.previous_timestep(-1) == -1
    x, out = _inputs(31)
    g_ref, g_fast = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = ref.step(out, -1, x, generator=g_ref, **kw)
    for t in (-1, torch.tensor(-1)):
        b = fast.step(out, t, x, generator=g_fast, **kw)
        assert _err(b.prev_sample, a.prev_sample) <= TOL and _err(b.pred_original_sample,
                                                                  a.pred_original_sample) <= TOL
        g_fast.set_state(torch.Generator().manual_seed(0).get_state())
    assert torch.equal(g_ref.get_state(), torch.Generator().manual_seed(0).get_state()) == (kind == "ddpm")
    z = torch.randn(SHAPE)
    both = fast.step(out, torch.tensor([-1, int(fast.timesteps[-2])]), x, variance_noise=z).prev_sample
    one = fast.step(out[:1], -1, x[:1], variance_noise=z[:1]).prev_sample
    assert _err(both[:1], one) <= 1e-6
    assert _err(_loop(fast, 61, kw.get("eta"), 5), _loop(ref, 61, kw.get("eta"), 5)) <= 1e-4
    fixed = type(fast)(**cfg, fastrev_fixes=True)
    fixed.set_timesteps(61)
    assert int(fixed.timesteps[-1]) >= 0
    with pytest.raises(ValueError, match="timestep must be in"):
        fixed.step(out, -1, x, **kw)


def test_ddim_previous_timestep_default_and_fixes():
    """Default: diffusers' t − N//n for every t and spacing (on the chain and off it); fastrev_fixes=True: the next
    entry of the schedule (#12633: t − N//n is not the next timestep under "linspace", nor "trailing" with n ∤ N)."""
    for spacing, n in (("linspace", 10), ("trailing", 7), ("leading", 7)):
        fast = FastDDIMScheduler(timestep_spacing=spacing)
        fixed = FastDDIMScheduler(timestep_spacing=spacing, fastrev_fixes=True)
        fast.set_timesteps(n)
        fixed.set_timesteps(n)
        ts = fast.timesteps.tolist()
        assert [fast.previous_timestep(t) for t in range(1000)] == [max(t - 1000 // n, -1) for t in range(1000)]
        assert [fixed.previous_timestep(t) for t in ts] == ts[1:] + [-1]
        nxt = ts[1:] + [-1]
        differs = any(t - 1000 // n != p for t, p in zip(ts, nxt, strict=True) if p >= 0 or t - 1000 // n >= 0)
        assert differs == (spacing != "leading")
        # off the chain with the fixes: to the largest scheduled timestep below
        assert fixed.previous_timestep(ts[0] - 1) == ts[1]
    # the default is stock diffusers, and the fix really changes the result there
    ref = DDIMScheduler(timestep_spacing="linspace")
    ref.set_timesteps(10)
    fast, fixed = FastDDIMScheduler(timestep_spacing="linspace"), \
        FastDDIMScheduler(timestep_spacing="linspace", fastrev_fixes=True)
    fast.set_timesteps(10)
    fixed.set_timesteps(10)
    x, out = _inputs(1)
    assert max(_err(fast.step(out, t, x).prev_sample, ref.step(out, t, x).prev_sample) for t in ref.timesteps) <= TOL
    assert max(_err(fixed.step(out, t, x).prev_sample, ref.step(out, t, x).prev_sample) for t in ref.timesteps) > 1e-2


def test_fixed_large_log_is_finite_where_diffusers_is_nan():
    ref, fast = DDPMScheduler(variance_type="fixed_large_log"), FastDDPMScheduler(variance_type="fixed_large_log")
    large = FastDDPMScheduler(variance_type="fixed_large")
    x, out = _inputs(2)
    a = ref.step(out, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = fast.step(out, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    c = large.step(out, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(b).all() and torch.equal(b, c)
    if torch.isnan(a).any():      # diffusers #14569 (if diffusers fixes it, it must agree with us)
        return
    assert _err(b, a) <= TOL


def test_add_noise_get_velocity_match():
    for fast_cls, stock_cls in ((FastDDPMScheduler, DDPMScheduler), (FastDDIMScheduler, DDIMScheduler)):
        ref, fast = stock_cls(beta_schedule="squaredcos_cap_v2"), fast_cls(beta_schedule="squaredcos_cap_v2")
        x, z = _inputs(4)
        t = torch.tensor([3, 999])
        assert torch.equal(fast.add_noise(x, z, t), ref.add_noise(x, z, t))
        assert torch.equal(fast.get_velocity(x, z, t), ref.get_velocity(x, z, t))


def test_step_outputs_and_dtypes():
    sch = FastDDIMScheduler()
    sch.set_timesteps(10)
    x, out = _inputs(5)
    res = sch.step(out, sch.timesteps[1], x, return_dict=False)
    assert isinstance(res, tuple) and len(res) == 2
    obj = sch.step(out, sch.timesteps[1], x)
    assert isinstance(obj, diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput)
    assert torch.equal(obj.prev_sample, res[0]) and torch.equal(obj.pred_original_sample, res[1])
    # None for use_clipped_model_output (what DDIMPipeline passes by default) is False
    assert torch.equal(sch.step(out, sch.timesteps[1], x, use_clipped_model_output=None).prev_sample, res[0])
    # float16 / float64 inputs keep their dtype; numpy ints and 0-dim tensors are timesteps too
    for dt in (torch.float16, torch.float64):
        r = sch.step(out.to(dt), np.int64(int(sch.timesteps[1])), x.to(dt)).prev_sample
        assert r.dtype == dt and _err(r.float(), res[0]) <= (2e-3 if dt == torch.float16 else 1e-6)
    ddpm = FastDDPMScheduler()
    r = ddpm.step(out, 10, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(r, tuple)
    assert isinstance(ddpm.step(out, 10, x), diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput)


def test_autograd_through_the_step():
    sch = FastDDIMScheduler()
    sch.set_timesteps(10)
    x, out = _inputs(6)
    out.requires_grad_(True)
    sch.step(out, sch.timesteps[2], x).prev_sample.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()


def test_errors_are_clear():
    x, out = _inputs(8)
    ddim = FastDDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(out, 999, x)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="both generator and variance_noise"):
        ddim.step(out, 900, x, eta=1.0, generator=torch.Generator(), variance_noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"FastDDIMScheduler\(num_train_timesteps=1000, beta_schedule='linear'.*"
                       r"timestep 900 \(to 800\).*eta=3.0 makes 1 − ᾱ_prev − σ² negative"):
        ddim.step(out, 900, x, eta=3.0)
    with pytest.raises(ValueError, match="backend"):
        ddim.backend = "cuda"
        ddim.step(out, 900, x)
    ddpm = FastDDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="twice the sample's channels"):
        ddpm.step(out, 500, x)
    ddpm = FastDDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):    # diffusers: IndexError
        ddpm.step(out, 899, x)
    with pytest.raises(ValueError, match="timestep must be in"):
        FastDDPMScheduler().step(out, 1000, x)
    # diffusers checks prediction_type / timestep_spacing at step / set_timesteps: so does fastrev
    odd = FastDDPMScheduler(prediction_type="noise", timestep_spacing="even")
    with pytest.raises(ValueError, match="prediction_type given as 'noise' must be one of"):
        odd.step(out, 10, x)
    with pytest.raises(ValueError, match="timestep_spacing='even' is not supported"):
        odd.set_timesteps(10)


def test_every_table_row_is_a_step():
    """Every one of the num_train_timesteps rows holds the step diffusers takes from that t (DDIM: to t − N//n; DDPM:
    to the scheduled timestep below), so any device timestep works without a host sync; no NaN rows."""
    for sch in (FastDDPMScheduler(), FastDDIMScheduler(timestep_spacing="linspace")):
        sch.set_timesteps(10)
        tab = sch._table(sch._default_key(), torch.device("cpu"), torch.float64)
        assert tab.shape[0] == 1001 and torch.isfinite(tab).all()           # row 1000: diffusers' t = −1


@pytest.mark.cuda
def test_device_checks_catch_nonscheduled_cuda_timestep():
    import fastrev

    sch = FastDDPMScheduler()
    sch.set_timesteps(10, device="cuda")
    x = torch.randn(2, 3, 4, 4, device="cuda")
    prev = fastrev.set_device_checks(True)
    try:
        with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
            sch.step(x, torch.tensor([899, 900], device="cuda"), x, return_dict=False)
    finally:
        fastrev.set_device_checks(prev)


def test_device_state_is_rewritten_in_place_by_set_timesteps():
    """Tables, the previous-timestep lookup and the drawn fast-mode seed keep their storage across set_timesteps (a
    captured CUDA graph keeps reading them) and hold the new chain's values."""
    sch = FastDDIMScheduler()
    sch.set_timesteps(10, device="cpu")
    x, out = _inputs(13)
    dev = torch.device("cpu")
    tab = sch._table(sch._key(1.0, False), dev, torch.float64)
    sch.step(out, 900, x, eta=1.0)                                  # fast mode: draws the seed
    seed = sch._seed_tensor(dev)
    prev = sch._device_value(("prev_t",), dev)
    ptrs, old_seed, old_row = (tab.data_ptr(), seed.data_ptr(), prev.data_ptr()), seed.clone(), tab[900].clone()
    sch.set_timesteps(25)                                           # 960, 920, …: 900 is not in the chain
    assert (tab.data_ptr(), seed.data_ptr(), prev.data_ptr()) == ptrs
    assert sch._table(sch._key(1.0, False), dev, torch.float64) is tab
    assert not torch.equal(seed, old_seed)                          # a new chain, a new fast-mode seed
    assert not torch.equal(tab[900], old_row)                       # 900 → 860 now, 900 → 800 before
    assert torch.equal(tab, sch._host_table(sch._key(1.0, False))[0][1:])
    assert int(sch.previous_timestep(torch.tensor(960))) == 920
    ref = DDIMScheduler()
    ref.set_timesteps(25)
    z = torch.randn(SHAPE)
    a = ref.step(out, 960, x, eta=1.0, variance_noise=z).prev_sample
    assert _err(sch.step(out, 960, x, eta=1.0, variance_noise=z).prev_sample, a) <= TOL


def test_shadowing_guard():
    """With the fastrev/ package directory itself on sys.path, `import diffusers` would find fastrev/diffusers.py:
    it refuses with a clear message instead of failing obscurely."""
    import fastrev
    pkg_dir = str(__import__("pathlib").Path(fastrev.__file__).parent)
    code = f"import sys; sys.path.insert(0, {pkg_dir!r}); import diffusers"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "fastrev/ package directory is on sys.path" in res.stderr
    import fastrev.diffusers as fd
    assert fd.DDPMScheduler is diffusers.DDPMScheduler          # inside fastrev, `diffusers` is the real package


# ------------------------------------------------------------------------------------------------ packaging
def test_fastrev_does_not_import_diffusers():
    code = "import sys, fastrev, fastrev.ops, fastrev.tables; print('diffusers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_missing_diffusers_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)          # makes `import diffusers` raise ImportError
    monkeypatch.delitem(sys.modules, "fastrev.diffusers")
    with pytest.raises(ImportError, match=r"pip install 'fastrev\[diffusers\]'"):
        importlib.import_module("fastrev.diffusers")


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_capture_of_step(kind):
    """With a device timestep, step makes no host sync (torch's sync debug mode raises on one) and captures into a
    CUDA graph whose replays follow the timestep written into the captured tensor (coefficients are gathered on the
    device, not frozen), and keep following after set_timesteps changes the chain (tables rewritten in place)."""
    dev = torch.device("cuda")
    sch = FastDDPMScheduler(variance_type="learned_range") if kind == "ddpm" else FastDDIMScheduler()
    kw = {} if kind == "ddpm" else dict(eta=1.0)
    sch.noise_seed = 7
    sch.set_timesteps(10, device=dev)
    C = 4
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, C, 16, 16, device=dev, generator=g)
    out = torch.randn(2, 2 * C if kind == "ddpm" else C, 16, 16, device=dev, generator=g)
    if kind == "ddpm":
        out[:, C:].uniform_(-1, 1)
    t_static = sch.timesteps[0].clone()
    sch.step(out, t_static, x, **kw)                 # first step: uploads what set_timesteps did not (η's table)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                sch.step(out, t_static, x, return_dict=False, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = sch.step(out, t_static, x, return_dict=False, **kw)[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for n in (10, 25):
        if n != 10:
            sch.set_timesteps(n, device=dev)
        seen = []
        for t in sch.timesteps:
            t_static.copy_(t)
            graph.replay()
            eager = sch.step(out, t, x, **kw).prev_sample
            torch.testing.assert_close(captured, eager, rtol=0, atol=0)
            seen.append(captured.clone())
        assert not torch.equal(seen[0], seen[5])


@pytest.mark.cuda
def test_cuda_kernel_parity():
    """On the GPU "auto" picks the fused kernel: the kernel subset against diffusers at every picked step, and
    diffusers' golden loop."""
    bad = []
    for kind, cfg, n in KERNEL_CASES:
        if kind == "ddpm":
            ref_cfg = dict(cfg, variance_type="fixed_large") if cfg["variance_type"] == "fixed_large_log" else cfg
            bad += _compare_ddpm(cfg, ref_cfg, n, backend="auto", device="cuda")
        else:
            bad += _compare_ddim(cfg, n, eta=1.0, use_clipped=True, backend="auto", device="cuda")
    _report(bad)
    sch = FastDDPMScheduler(clip_sample=True)
    sample = _dummy_sample_deter().cuda()
    generator = torch.manual_seed(0)
    for t in reversed(range(len(sch))):
        sample = sch.step(sample * t / (t + 1), t, sample, generator=generator).prev_sample
    assert abs(sample.abs().sum().item() - 258.9606) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_learned_variance_at_t0_ignores_negative_channels(backend):
    """Regression (review): diffusers skips the variance term at t = 0; a slightly negative linear variance there
    must not turn the sample into NaN (it did: 0·√v)."""
    ref, fast = DDPMScheduler(variance_type="learned"), FastDDPMScheduler(variance_type="learned")
    ref.set_timesteps(10)
    fast.set_timesteps(10)
    fast.backend = backend
    x = torch.randn(1, 2, 4, 4)
    out = torch.randn(1, 4, 4, 4)
    out[:, 2:] = -0.01
    a = ref.step(out, 0, x).prev_sample
    b = fast.step(out, 0, x, variance_noise=torch.randn_like(x)).prev_sample
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_promote_like_diffusers():
    """Regression (review): fp16 sample + fp32 model output gives fp32 outputs in diffusers."""
    ref, fast = DDPMScheduler(), FastDDPMScheduler()
    ref.set_timesteps(10)
    fast.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4).half()
    out = torch.randn(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    a = ref.step(out, 500, x, generator=torch.Generator().manual_seed(0))
    b = fast.step(out, 500, x, generator=g)
    assert a.prev_sample.dtype == b.prev_sample.dtype == torch.float32
    assert a.pred_original_sample.dtype == b.pred_original_sample.dtype
    # diffusers multiplies the fp16 sample by a 0-dim fp32 coefficient in fp16: agreement to fp16 rounding
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ diffusers' semantics
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_steps_from_any_timestep(spacing):
    """DDIM steps from any t in [0, N), scheduled or not (img2img strength, custom loops, inversion), to t − N//n as
    diffusers does — host ints, CPU tensors, and a [B] tensor of unscheduled timesteps at once."""
    cfg = dict(timestep_spacing=spacing, prediction_type="v_prediction", set_alpha_to_one=False)
    ref, fast = DDIMScheduler(**cfg), FastDDIMScheduler(**cfg)
    ref.set_timesteps(7)
    fast.set_timesteps(7)
    ts = [999, 998, 612, 143, 142, 141, 5, 0]
    x, out = _inputs(21, shape=(len(ts), 3, 4, 4))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    per_sample = fast.step(out, torch.tensor(ts), x, eta=1.0, variance_noise=z)
    for i, t in enumerate(ts):
        a = ref.step(out[i:i + 1], t, x[i:i + 1], eta=1.0, variance_noise=z[i:i + 1])
        for timestep in (t, torch.tensor(t)):
            b = fast.step(out[i:i + 1], timestep, x[i:i + 1], eta=1.0, variance_noise=z[i:i + 1])
            assert _err(b.prev_sample, a.prev_sample) <= TOL and _err(b.pred_original_sample,
                                                                      a.pred_original_sample) <= TOL, t
        assert _err(per_sample.prev_sample[i:i + 1], a.prev_sample) <= TOL, t


def test_ddpm_steps_as_diffusers_previous_timestep():
    """DDPM: t → t − 1 from any t before set_timesteps; after it only scheduled timesteps (diffusers raises
    otherwise), each to the next entry; fastrev_fixes=True also steps an unscheduled t to the scheduled one below."""
    ref, fast = DDPMScheduler(), FastDDPMScheduler()
    x, out = _inputs(22)
    for t in (999, 731, 1, 0):
        a = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _err(fast.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample, a) <= TOL
    fixed = FastDDPMScheduler(fastrev_fixes=True)
    for s in (ref, fast, fixed):
        s.set_timesteps(timesteps=[900, 611, 333, 2])
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        fast.step(out, 612, x)
    for t in (900, 2):
        a = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _err(fast.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample, a) <= TOL
    assert fixed.previous_timestep(899) == 611 and fixed.previous_timestep(1) == -1
    # an unscheduled t with the fixes: the step from t to 611, i.e. the custom chain [t, 611, ...]
    ref.set_timesteps(timesteps=[899, 611, 333, 2])
    g = torch.Generator().manual_seed(3)
    a = ref.step(out, 899, x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert _err(fixed.step(out, 899, x, generator=g).prev_sample, a) <= TOL


def test_underflowing_schedule_is_finite_wherever_diffusers_is():
    """beta_start=0.01, beta_end=0.2: diffusers' float32 ᾱ_t is 0 for t ≥ 959. Where diffusers is finite fastrev
    agrees; where diffusers is NaN (ᾱ_t = ᾱ_prev = 0: α'_t = 0/0) fastrev steps with the float64 product of α; where
    there is no answer the error names the user's config and the timestep."""
    cfg = dict(beta_start=0.01, beta_end=0.2)
    ref, fast = DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)
    x, out = _inputs(23)
    nan_in_diffusers = 0
    for t in (0, 500, 958, 959, 960, 999):
        a = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = fast.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.isfinite(b).all(), t
        if torch.isfinite(a).all():
            assert t <= 959 and _err(b, a) <= TOL, t
        else:       # the limit of diffusers' formula: x̂₀'s weight √ᾱ_prev·β'/(1−ᾱ_t) is 0, x's is √α'_t
            assert t >= 960
            nan_in_diffusers += 1
            alpha = float(torch.prod(ref.alphas[t:t + 1].double()))
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
            assert _err(b, (alpha ** 0.5 * x.double() + (1 - alpha) ** 0.5 * z.double()).float()) <= TOL
    assert nan_in_diffusers == 2
    for sch in (ref, fast):
        sch.set_timesteps(10)                        # 900 → 0: ᾱ_900 > 0; 999 is not scheduled (leading)
    ddim_ref, ddim = DDIMScheduler(**cfg, timestep_spacing="trailing"), FastDDIMScheduler(**cfg,
                                                                                         timestep_spacing="trailing")
    for sch in (ddim_ref, ddim):
        sch.set_timesteps(50)                        # 999 → 979: both 0 in float32
    finite_in_diffusers = []
    for t in (999, 979, 959, 499):
        a = ddim_ref.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ddim.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.isfinite(b).all(), t
        if torch.isfinite(a).all():
            finite_in_diffusers.append(t)
            assert _err(b, a) <= TOL, t
    assert finite_in_diffusers == [959, 499]
    # no answer: an unclipped ε-prediction x̂₀ = (x − ε)/0 that the step carries (ᾱ_959 = 0, ᾱ_prev > 0)
    bare = FastDDIMScheduler(**cfg, clip_sample=False, timestep_spacing="trailing")
    bare.set_timesteps(50)
    with pytest.raises(ValueError) as info:
        bare.step(out, 959, x)
    msg = str(info.value)
    assert "beta_start=0.01, beta_end=0.2" in msg and "timestep 959" in msg and "clip_sample" in msg
    assert "betas must be" not in msg
    # a device-style timestep on that row gets NaN, as diffusers gets NaN/inf (no host sync to check it)
    assert torch.isnan(bare._table(bare._key(0.0, False), torch.device("cpu"), torch.float64)[959]).all()


def test_negative_alphas_cumprod_names_the_config():
    """trained betas above 1 make ᾱ negative: diffusers' √ᾱ is NaN; the error names the config and the timestep."""
    sch = FastDDPMScheduler(trained_betas=[0.5, 1.5, 0.5, 0.5], num_train_timesteps=4)
    x, out = _inputs(24)
    assert torch.isfinite(sch.step(out, 0, x).prev_sample).all()
    with pytest.raises(ValueError, match=r"trained_betas=\[\.\.\.\].*timestep 2 \(to 1\).*negative"):
        sch.step(out, 2, x, generator=torch.Generator())


def test_other_variance_type_warns_once_and_computes_as_diffusers():
    """variance_type values diffusers falls through on: diffusers uses the clamped β̃ (as fixed_small)."""
    from fastrev import diffusers as fd
    fd._WARNED_VARIANCE_TYPES.discard(repr("other"))
    with pytest.warns(UserWarning, match=r"variance_type='other' is not one of \('fixed_small'"):
        fast = FastDDPMScheduler(variance_type="other")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastDDPMScheduler(variance_type="other")                   # once
    ref = DDPMScheduler(variance_type="other")
    for sch in (ref, fast):
        sch.set_timesteps(10)
    x, out = _inputs(25)
    for t in (900, 500, 0):
        a = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _err(fast.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample, a) <= TOL


@pytest.mark.parametrize("cls", [FastDDPMScheduler, FastDDIMScheduler])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_inputs_raise(cls, dtype):
    """An int or bool sample / model_output is a TypeError naming the argument (as fastrev.ddpm_step); diffusers
    would compute with it (DDPM: a truncated int64 sample)."""
    sch = cls()
    sch.set_timesteps(10)
    x, out = _inputs(26)
    with pytest.raises(TypeError, match=r"^sample must be a floating tensor"):
        sch.step(out, 500, x.to(dtype), generator=torch.Generator())
    with pytest.raises(TypeError, match=r"^model_output must be a floating tensor"):
        sch.step(out.to(dtype), 500, x, generator=torch.Generator())
    with pytest.raises(TypeError, match=r"^sample must be a torch.Tensor"):
        sch.step(out, 500, x.numpy(), generator=torch.Generator())


def test_ddim_eta_as_a_tensor():
    """diffusers' DDIM takes η as a tensor too (its `if eta > 0` reads it): so does fastrev."""
    ref, fast = DDIMScheduler(), FastDDIMScheduler()
    for s in (ref, fast):
        s.set_timesteps(10)
    x, out = _inputs(28)
    z = torch.randn(SHAPE)
    a = ref.step(out, 500, x, eta=torch.tensor(0.5), variance_noise=z).prev_sample
    assert _err(fast.step(out, 500, x, eta=torch.tensor(0.5), variance_noise=z).prev_sample, a) <= TOL
    with pytest.raises(TypeError, match="eta must be a number"):
        fast.step(out, 500, x, eta="0.5")


def test_learned_variance_without_its_channels_at_t0():
    """diffusers splits the variance channels only when there are 2C; without them its t = 0 step (no noise) is
    still computed: so is fastrev's; at t > 0 diffusers fails, fastrev says why."""
    ref, fast = DDPMScheduler(variance_type="learned_range"), FastDDPMScheduler(variance_type="learned_range")
    x, out = _inputs(27)
    a = ref.step(out, 0, x)
    b = fast.step(out, 0, x)
    assert _err(b.prev_sample, a.prev_sample) <= TOL
    with pytest.raises(ValueError, match="twice the sample's channels"):
        fast.step(out, 1, x)


# ------------------------------------------------------------------------------------------------ whole loops
LOOP_SCHEDULES = {k: SCHEDULES[k] for k in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")}
LOOP_KINDS = (("ddpm", None), ("ddim", 0.0), ("ddim", 1.0))


def _loop_model(x, t):
    """A deterministic stand-in for a UNet: smooth in x, varying with t."""
    return 0.8 * torch.tanh(x) + 0.1 * torch.cos(x * (1 + int(t) / 1000))


def _loop(sch, n, eta, seed):
    sch.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(seed + 1))
    kw = {} if eta is None else dict(eta=eta)
    for t in sch.timesteps:
        x = sch.step(_loop_model(x, t), t, x, generator=g, **kw).prev_sample
    return x


def test_loops_agree_with_diffusers_over_the_grid():
    """Done-when grid: whole generator-seeded loops (7 and 20 steps) of the drop-ins against diffusers' own classes,
    prediction type × beta schedule × spacing × clip/threshold × {DDPM, DDIM η=0, DDIM η=1}, to 1e-4 relative to the
    result's largest entry. Every cell of the grid is run (sigmoid is DDPM-only in diffusers)."""
    import itertools
    bad, cells = [], 0
    for (schedule, sched_cfg), pt, spacing, (clip_name, clip), n, (kind, eta) in itertools.product(
            LOOP_SCHEDULES.items(), PREDICTIONS, SPACINGS, CLIPS.items(), (7, 20), LOOP_KINDS):
        if kind == "ddim" and schedule == "sigmoid":
            continue
        cfg = dict(sched_cfg, prediction_type=pt, timestep_spacing=spacing, **clip)
        ref, fast = (DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)) if kind == "ddpm" else \
            (DDIMScheduler(**cfg), FastDDIMScheduler(**cfg))
        seed = cells
        cells += 1
        a, b = _loop(ref, n, eta, seed), _loop(fast, n, eta, seed)
        err = float((a.double() - b.double()).abs().max() / a.double().abs().max())
        if not err <= 1e-4:                               # NaN fails too
            bad.append(f"{kind} eta={eta} {schedule} {pt} {spacing} {clip_name} n={n}: {err:.2e}")
    assert cells == 3 * 3 * 3 * 2 * (4 + 3 + 3)
    _report(bad)


@pytest.mark.cuda
def test_cuda_generator_draw_rule_default_and_fixes():
    """A device timestep with a generator: by default DDPM reads t back to skip the t = 0 draw, as diffusers does
    (same generator state afterwards); with fastrev_fixes=True it makes no host sync (the draw is multiplied by 0)."""
    dev = torch.device("cuda")
    x = torch.randn(2, 3, 8, 8, device=dev)
    out = torch.randn(2, 3, 8, 8, device=dev)
    ref, fast, fixed = DDPMScheduler(), FastDDPMScheduler(), FastDDPMScheduler(fastrev_fixes=True)
    for s in (ref, fast, fixed):
        s.set_timesteps(10, device=dev)
    g_ref, g_fast = torch.Generator(device=dev).manual_seed(0), torch.Generator(device=dev).manual_seed(0)
    for t in ref.timesteps:                     # device timesteps, the last one 0
        a = ref.step(out, t, x, generator=g_ref).prev_sample
        b = fast.step(out, t, x, generator=g_fast).prev_sample
        assert _err(b.cpu(), a.cpu()) <= TOL
    assert torch.equal(g_ref.get_state(), g_fast.get_state())
    g = torch.Generator(device=dev).manual_seed(0)
    fixed.step(out, fixed.timesteps[0], x, generator=g)          # warm-up: tables on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in fixed.timesteps:
            fixed.step(out, t, x, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_trailing_minus_one_device_timestep(kind):
    """A device t = −1 (diffusers' "trailing" n = 61) reads the table's t = −1 row through the kernel's pointer
    arithmetic (one row before the view) and through torch's negative indexing: in bounds, diffusers' values."""
    dev = torch.device("cuda")
    cfg = dict(timestep_spacing="trailing", thresholding=kind == "ddim")
    ref, fast = (DDPMScheduler(**cfg), FastDDPMScheduler(**cfg)) if kind == "ddpm" else \
        (DDIMScheduler(**cfg), FastDDIMScheduler(**cfg))
    kw = {} if kind == "ddpm" else dict(eta=1.0)
    for s in (ref, fast):
        s.set_timesteps(61, device=dev)
    x, out = (v.to(dev) for v in _inputs(32))
    z = torch.randn(x.shape, device=dev)
    t = ref.timesteps[-1]
    assert int(t) == -1
    if kind == "ddpm":
        a = ref.step(out, t, x).prev_sample
        b = fast.step(out, t, x, variance_noise=z).prev_sample
    else:
        a = ref.step(out, t, x, variance_noise=z, **kw).prev_sample
        b = fast.step(out, t, x, variance_noise=z, **kw).prev_sample
    assert _err(b.cpu(), a.cpu()) <= TOL
