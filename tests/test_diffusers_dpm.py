"""fastrev.diffusers_dpm: FastDPMSolverMultistepScheduler against diffusers' DPMSolverMultistepScheduler.

The bound (docs/diffusers-dpm.md). Exact mode gives diffusers' step to float32 rounding. The scalar coefficients are
diffusers' own float32 values (the same float32 arithmetic from the same sigmas); what differs is the order of the
float32 operations on the tensors: diffusers forms D1 = (1/r₀)(m₀ − m₋₁), D2, ... and sums five products in float32,
the fused step sums C0·m₀ + C1·x + D0·m₋₁ + D1·m₋₂ + σz with the differences expanded into float64 coefficients. Each
step's results therefore differ by a few float32 ulps of the terms it sums, |x| and |m_j| (≤ 1e-6 relative), and a
loop carries those along its steps. So:

    per step (teacher forced: diffusers' inputs and history):  |ours − diffusers| ≤ TOL · max(|x|, |m₀|, |m₋₁|, |m₋₂|)
    whole loop (free running, 1-50 steps):                   |ours − diffusers| ≤ TOL · max over the loop of |x|

with TOL = 1e-5 (observed: ≤ 4e-6 on the loops below, 100-step loops included). A coefficient wrong by 3e-4
relative, a sign error or a dropped history term fails it (``test_a_wrong_coefficient_fails_the_bound``).

The broad matrix runs the torch path (the CPU default); the fused Triton kernel runs under the interpreter on a few
short loops; ``cuda`` tests run the kernel on a GPU (CUDA-graph capture, no host sync).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_dpmsolver_multistep as dmod  # noqa: E402

from fastrev import diffusers_dpm as DD  # noqa: E402
from fastrev import noise as fnoise  # noqa: E402
from fastrev.diffusers import FastDPMSolverMultistepScheduler as Fast  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),        # diffusers deprecates "dpmsolver"
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NOISE_ALGS = ("dpmsolver", "sde-dpmsolver")          # ε-history: need final_sigmas_type="sigma_min" in diffusers


def _cfg(alg, **kw):
    c = dict(algorithm_type=alg, **kw)
    if alg in NOISE_ALGS:
        c.setdefault("final_sigmas_type", "sigma_min")
    return c


# ------------------------------------------------------------------------------------------------ helpers
def _model(shape, seed=3):
    """A fixed nonlinear 'denoiser' of (x, t): channel mixing + tanh + a t-dependent offset."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    W = torch.randn(C, C, generator=g) / math.sqrt(C)
    bias = torch.randn(shape[1:], generator=g) * 0.1

    def f(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *(1,) * (x.dim() - 1))
        y = torch.tanh(torch.einsum("ij,bj...->bi...", W, x.float())) + bias * (t / 1000) + 0.05
        return y.to(x.dtype)
    return f


def _start(sched, n, set_kw):
    if set_kw.get("timesteps") is not None:
        sched.set_timesteps(**set_kw)
    else:
        sched.set_timesteps(n, **set_kw)


def _loop(sched, n=10, *, shape=SHAPE, gen=True, set_kw=None, dtype=torch.float32, out_channels=None, log=None):
    """A pipeline-shaped loop: (final sample, max |x| over the loop)."""
    _start(sched, n, dict(set_kw or {}))
    model = _model(shape)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(11)) * sched.init_noise_sigma).to(dtype)
    g = torch.Generator().manual_seed(0) if gen else None
    scale = x.double().abs().max().item()
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        if out_channels:                                    # learned variances: ε channels, then variance values
            out = torch.cat([out, torch.rand_like(out)[:, :out_channels - shape[1]]], dim=1)
        prev = sched.step(out, t, x, generator=g, return_dict=False)[0]
        if log is not None:
            log.append((out, t, x, prev, [m for m in sched.model_outputs if m is not None]))
        x = prev
        scale = max(scale, x.double().abs().max().item())
    return x, scale


def _close(ours, ref, scale, tol=TOL, what=""):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape, ours.dtype, ref.dtype)
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all(), what
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max err {err:.3e} > {tol:g} x scale {scale:.3e} ({err / scale:.2e})"
    return err / scale


def _amax(*ts) -> float:
    """The largest magnitude in ``ts`` (the scale a float32 step rounds at)."""
    return max(t.double().abs().max().item() for t in ts if t is not None)


def _check_loop(cfg, n=10, tol=TOL, **kw):
    """Whole loop (free running) and every step teacher forced (diffusers' inputs, the generator consumed in the same
    order), both to ``tol``; returns the worst relative error seen."""
    log = []
    a, scale = _loop(DPMSolverMultistepScheduler(**cfg), n, log=log, **kw)
    b, _ = _loop(Fast(**cfg), n, **kw)
    worst = _close(b, a, scale, tol, f"whole loop {cfg} n={n}")
    fast = Fast(**cfg)
    _start(fast, n, dict(kw.get("set_kw") or {}))
    g = torch.Generator().manual_seed(0) if kw.get("gen", True) else None
    for i, (out, t, x, ref, ms) in enumerate(log):
        y = fast.step(out, t, x, generator=g).prev_sample
        sc = max([x.double().abs().max().item()] + [m.double().abs().max().item() for m in ms])
        worst = max(worst, _close(y, ref, sc, tol, f"step {i} {cfg} n={n}"))
    return worst


# ------------------------------------------------------------------------------------------------ surface
def test_same_config_signature_defaults_and_api():
    ps = inspect.signature(DPMSolverMultistepScheduler.__init__).parameters
    pf = inspect.signature(Fast.__init__).parameters
    assert set(pf) - set(ps) == {"fastrev_fixes"} and pf["fastrev_fixes"].default is False
    for k, p in ps.items():
        d = pf[k].default
        assert d == p.default or (isinstance(d, float) and math.isinf(d) and d == p.default), k
    assert set(Fast().compatibles) == set(DPMSolverMultistepScheduler().compatibles)
    assert Fast.order == DPMSolverMultistepScheduler.order == 1
    for m in ("step", "set_timesteps", "scale_model_input", "add_noise", "convert_model_output"):
        assert list(inspect.signature(getattr(Fast, m)).parameters) == \
            list(inspect.signature(getattr(DPMSolverMultistepScheduler, m)).parameters), m
    s, d = Fast(solver_order=3), DPMSolverMultistepScheduler(solver_order=3)
    for attr in ("init_noise_sigma", "model_outputs", "lower_order_nums", "step_index", "begin_index",
                 "num_inference_steps"):
        assert getattr(s, attr) == getattr(d, attr), attr
    for attr in ("betas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas", "timesteps"):
        assert torch.equal(getattr(s, attr), getattr(d, attr)), attr
    assert len(s) == len(d) == 1000
    x = torch.randn(SHAPE)
    assert s.scale_model_input(x, 5) is x


def test_from_config_both_ways_switching_and_save_load(tmp_path):
    stock = DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    fast = Fast.from_config(stock.config)
    for k, v in stock.config.items():
        if not k.startswith("_"):
            assert fast.config[k] == v, k
    back = DPMSolverMultistepScheduler.from_config(fast.config)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in stock.config.items() if not k.startswith("_")}
    fast.save_config(tmp_path)
    again = Fast.from_pretrained(tmp_path)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == \
        {k: v for k, v in fast.config.items() if not k.startswith("_")}
    # around diffusers' multistep family and back (diffusers' test_switch), fastrev_fixes kept on the way
    f = Fast(fastrev_fixes=True, solver_order=3)
    s = f
    for cls in (DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, Fast):
        s = cls.from_config(s.config)
    assert isinstance(s, Fast) and s.config.fastrev_fixes is True and s.config.solver_order == 3
    assert torch.equal(_loop(s, 6)[0], _loop(Fast(fastrev_fixes=True, solver_order=3), 6)[0])
    # a DPMSolverMultistepScheduler built from ours runs diffusers' loop
    d = DPMSolverMultistepScheduler.from_config(Fast(solver_order=3).config)
    a, scale = _loop(d, 8)
    _close(_loop(Fast(solver_order=3), 8)[0], a, scale)


def test_deis_and_solver_type_aliases_as_diffusers():
    for kw in (dict(algorithm_type="deis", final_sigmas_type="sigma_min"), dict(solver_type="bh2"),
               dict(solver_type="logrho")):
        a, b = DPMSolverMultistepScheduler(**kw), Fast(**kw)
        assert (a.config.algorithm_type, a.config.solver_type) == (b.config.algorithm_type, b.config.solver_type)
    for kw in (dict(algorithm_type="deis"), dict(algorithm_type="nope"), dict(solver_type="nope"),
               dict(algorithm_type="dpmsolver"), dict(use_karras_sigmas=True, use_beta_sigmas=True)):
        with pytest.raises(Exception) as e_stock:
            DPMSolverMultistepScheduler(**kw)
        with pytest.raises(type(e_stock.value)):
            Fast(**kw)
    with pytest.raises(TypeError, match="fastrev_fixes"):
        Fast(fastrev_fixes="yes")
    with pytest.raises(ValueError, match="solver_order"):
        Fast(solver_order=4)


SCHEDULES = [
    ("default", {}, {}),
    ("sd-leading", dict(SD, timestep_spacing="leading", steps_offset=1), {}),
    ("trailing", dict(SD, timestep_spacing="trailing"), {}),
    ("karras", dict(SD, use_karras_sigmas=True), {}),
    ("lu", dict(use_lu_lambdas=True), {}),
    ("exponential", dict(use_exponential_sigmas=True), {}),
    ("beta", dict(use_beta_sigmas=True), {}),
    ("flow", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), {}),
    ("flow-mu", dict(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction"),
     dict(mu=0.7)),
    ("cosine-clipped", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), {}),
    ("zero-snr", dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing"), {}),
    ("sigma-min", dict(final_sigmas_type="sigma_min"), {}),
]


@pytest.mark.parametrize("case", SCHEDULES, ids=[c[0] for c in SCHEDULES])
def test_schedule_identical(case):
    _, cfg, set_kw = case
    for n in (1, 7, 25):
        a, b = DPMSolverMultistepScheduler(**cfg), Fast(**cfg)
        a.set_timesteps(n, **set_kw)
        b.set_timesteps(n, **set_kw)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
        assert a.num_inference_steps == b.num_inference_steps and b.config.flow_shift == a.config.flow_shift


def test_custom_timesteps_identical_and_errors():
    a, b = DPMSolverMultistepScheduler(**SD), Fast(**SD)
    for s in (a, b):
        s.set_timesteps(timesteps=[901, 700, 350, 10])
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    for kw in (dict(num_inference_steps=None), dict(num_inference_steps=5, timesteps=[3, 2])):
        with pytest.raises(ValueError):
            b.set_timesteps(**kw)
    with pytest.raises(ValueError):
        Fast(use_karras_sigmas=True).set_timesteps(timesteps=[3, 2])
    # diffusers' test_custom_timesteps: custom timesteps equal to the default ones give the same loop
    for alg in ("dpmsolver++", "sde-dpmsolver++"):
        for fst in ("sigma_min", "zero"):
            cfg = dict(algorithm_type=alg, final_sigmas_type=fst, prediction_type="v_prediction")
            ref = Fast(**cfg)
            ref.set_timesteps(10)
            x1 = _loop(Fast(**cfg), 10)[0]
            x2 = _loop(Fast(**cfg), set_kw=dict(timesteps=ref.timesteps.tolist()))[0]
            assert torch.equal(x1, x2)


# ------------------------------------------------------------------------------------------------ exact loops
ALG_ORDERS = [(a, o) for a in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver") for o in (1, 2, 3)
              if not (a == "sde-dpmsolver" and o == 3)]


@pytest.mark.parametrize("alg,order", ALG_ORDERS, ids=[f"{a}-{o}" for a, o in ALG_ORDERS])
def test_exact_loops_every_algorithm_order_solver_and_prediction(alg, order):
    """algorithm × order × midpoint/heun × ε/x₀/v, 10 steps (lower_order_final active) and 25."""
    for solver_type in ("midpoint", "heun"):
        for pt in ("epsilon", "sample", "v_prediction"):
            cfg = _cfg(alg, solver_order=order, solver_type=solver_type, prediction_type=pt)
            _check_loop(cfg, n=10)
            if pt == "epsilon":        # (Karras with final σ_min repeats σ_min at the end: 0/0 in diffusers)
                _check_loop(dict(cfg, **SD, use_karras_sigmas=alg not in NOISE_ALGS), n=25)


EXACT_CONFIGS = [
    ("dpm++2m-karras-sd", dict(SD, use_karras_sigmas=True), 20, {}),
    ("dpm++2m-sde-karras", dict(SD, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"), 20, {}),
    ("dpm++3m-sde-heun", dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), 12, {}),
    ("no-lower-order-final", dict(solver_order=3, lower_order_final=False), 8, {}),
    ("euler-at-final", dict(solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min"), 20, {}),
    ("sigma-min-3m", dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), 20, {}),
    ("threshold-eps", dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=1.5), 10, {}),
    ("threshold-3m-sample", dict(thresholding=True, solver_order=3, prediction_type="sample",
                                 sample_max_value=0.5), 10, {}),
    ("threshold-sde", dict(thresholding=True, algorithm_type="sde-dpmsolver++", sample_max_value=2.0), 10, {}),
    ("threshold-dpmsolver-eps", _cfg("dpmsolver", thresholding=True, solver_order=3, sample_max_value=1.5), 10, {}),
    ("threshold-dpmsolver-v", _cfg("dpmsolver", thresholding=True, prediction_type="v_prediction"), 10, {}),
    ("threshold-sde-dpmsolver", _cfg("sde-dpmsolver", thresholding=True, prediction_type="sample"), 10, {}),
    ("flow", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_order=3), 12, {}),
    ("flow-sde-mu", dict(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction",
                         algorithm_type="sde-dpmsolver++"), 12, dict(mu=0.7)),
    ("flow-eps", dict(use_flow_sigmas=True, flow_shift=2.0, solver_order=3), 12, {}),
    ("lu-v", dict(use_lu_lambdas=True, prediction_type="v_prediction"), 10, {}),
    ("exponential-3m", dict(use_exponential_sigmas=True, solver_order=3), 12, {}),
    ("beta", dict(use_beta_sigmas=True), 12, {}),
    ("cosine-clipped", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3), 15, {}),
    ("zero-snr-v", dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        prediction_type="v_prediction"), 15, {}),
    ("leading-offset", dict(SD, timestep_spacing="leading", steps_offset=1, solver_order=3), 15, {}),
    ("trained-betas", dict(trained_betas=np.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500), 10, {}),
    ("deis-alias", dict(algorithm_type="deis", final_sigmas_type="sigma_min", solver_order=3), 10, {}),
    ("short-1", dict(solver_order=3), 1, {}),
    ("short-2", dict(solver_order=3, final_sigmas_type="sigma_min"), 2, {}),
    ("short-3-sde", dict(solver_order=3, algorithm_type="sde-dpmsolver++"), 3, {}),
    ("long-50-3m", dict(solver_order=3), 50, {}),
    ("long-50-dpmsolver", _cfg("dpmsolver", solver_order=3, solver_type="heun"), 50, {}),
]


@pytest.mark.parametrize("case", EXACT_CONFIGS, ids=[c[0] for c in EXACT_CONFIGS])
def test_exact_loop_matches_diffusers(case):
    _, cfg, n, set_kw = case
    _check_loop(cfg, n=n, set_kw=set_kw)


def test_learned_variance_keeps_the_first_channels():
    """learned / learned_range with ε-prediction: the first C channels (diffusers: [:, :3], the same for C = 3);
    for C = 4 (latents) diffusers cannot run, fastrev keeps the first 4 (equal to passing them alone)."""
    for vt in ("learned", "learned_range"):
        for alg in ("dpmsolver++", "sde-dpmsolver"):
            _check_loop(_cfg(alg, variance_type=vt, solver_order=2), n=8, out_channels=6)
    shape = (2, 4, 3, 3)
    a = _loop(Fast(variance_type="learned_range"), 6, shape=shape, out_channels=8)[0]
    b = _loop(Fast(), 6, shape=shape)[0]
    assert torch.equal(a, b)


def test_exact_mode_generator_list_and_variance_noise():
    """SDE variants: a list of generators (one per sample) and variance_noise are diffusers' noise exactly."""
    for alg in ("sde-dpmsolver++", "sde-dpmsolver"):
        res = []
        for cls in (DPMSolverMultistepScheduler, Fast):
            s = cls(**_cfg(alg))
            s.set_timesteps(6)
            gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
            for i, t in enumerate(s.timesteps):
                if i == 2:                             # the noise itself, at one step
                    vn = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
                    x = s.step(torch.tanh(x), t, x, variance_noise=vn).prev_sample
                else:
                    x = s.step(torch.tanh(x), t, x, generator=gens).prev_sample
            res.append(x)
        _close(res[1], res[0], res[0].abs().max().item(), what=alg)


def test_fp16_and_mixed_dtypes_follow_diffusers():
    """fp16 loops (diffusers' test_fp16_support config: thresholding with ratio 0) stay fp16 and within fp16 rounding
    of diffusers (whose history and difference terms are fp16 arithmetic); a float32 sample with an fp16 output
    returns diffusers' dtype: float32 for ε, the output's for x₀-prediction."""
    for cfg in (dict(thresholding=True, dynamic_thresholding_ratio=0), dict(solver_order=3),
                dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction")):
        a, sa = _loop(DPMSolverMultistepScheduler(**cfg), 10, dtype=torch.float16)
        b, _ = _loop(Fast(**cfg), 10, dtype=torch.float16)
        assert a.dtype == b.dtype == torch.float16
        _close(b, a, sa, tol=4e-3, what=f"fp16 {cfg}")
    for pt, alg, want in (("epsilon", "dpmsolver++", torch.float32), ("sample", "dpmsolver++", torch.float16),
                          ("epsilon", "dpmsolver", torch.float16), ("v_prediction", "dpmsolver", torch.float32)):
        res = []
        for cls in (DPMSolverMultistepScheduler, Fast):
            s = cls(**_cfg(alg, prediction_type=pt))
            s.set_timesteps(5)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
            for t in s.timesteps[:3]:
                x = s.step(torch.tanh(x).half(), t, x.float()).prev_sample
            res.append(x)
        assert res[0].dtype == res[1].dtype == want, (pt, alg)
        _close(res[1].float(), res[0].float(), res[0].abs().max().item(), tol=2e-3, what=f"mixed {pt} {alg}")


def test_img2img_begin_index_add_noise_and_manual_history():
    """diffusers' test_full_loop_with_noise shape (add_noise at timesteps[5], then the tail); and history set by hand
    (diffusers' tests assign model_outputs) with lower_order_nums written by a caller."""
    res = []
    for cls in (DPMSolverMultistepScheduler, Fast):
        s = cls(solver_order=3)
        s.set_timesteps(10)
        s.set_begin_index(5)
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
        x = s.add_noise(x0, z, s.timesteps[5:6])
        for t in s.timesteps[5:]:
            x = s.step(torch.tanh(x), t, x).prev_sample
        assert s.step_index == 10
        res.append(x)
    _close(res[1], res[0], _amax(res[0], x0, z), what="img2img")
    res = []
    for cls in (DPMSolverMultistepScheduler, Fast):
        s = cls(solver_order=3, algorithm_type="sde-dpmsolver++")
        s.set_timesteps(12)
        past = [torch.full(SHAPE, 0.3), torch.full(SHAPE, -0.2), torch.full(SHAPE, 0.1)]
        s.model_outputs = list(past)
        s.lower_order_nums = 2                         # a caller resuming a chain mid-way
        s.set_begin_index(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps[4:8]:
            x = s.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        res.append((x, s.lower_order_nums, s.step_index))
    assert res[0][1:] == res[1][1:] == (3, 8)
    _close(res[1][0], res[0][0], _amax(res[0][0], *past), what="manual history")


def test_duplicate_timestep_start_and_unknown_timestep_like_diffusers():
    """The first step at a duplicated timestep starts at its second occurrence; an unknown timestep starts at the
    last index (diffusers' index_for_timestep), on the host and on the device path."""
    for host in (("cpu",), ()):
        res = []
        for cls in (DPMSolverMultistepScheduler, Fast):
            DD._HOST_DEVICES = host
            try:
                for start in (700, 123):
                    s = cls(solver_order=2, final_sigmas_type="sigma_min")
                    s.set_timesteps(timesteps=[900, 700, 700, 300, 10])
                    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
                    x = s.step(torch.tanh(x), torch.tensor(start), x).prev_sample
                    res.append((x, s.step_index))
            finally:
                DD._HOST_DEVICES = ("cpu",)
        assert [r[1] for r in res] == [3, 5, 3, 5]            # started at 2 (700's second match) and 4
        for i in range(2):
            _close(res[2 + i][0], res[i][0], res[i][0].abs().max().item(), what=f"start {i} host={host}")


# ------------------------------------------------------------------------------------------------ fast mode
def _counter_noise_into(monkeypatch, seed, stock):
    def fake(shape, generator=None, device=None, dtype=None, **_):
        return fnoise.noise_like(torch.empty(shape), seed, stock.step_index).to(dtype or torch.float32)
    monkeypatch.setattr(dmod, "randn_tensor", fake)


@pytest.mark.parametrize("cfg", [dict(algorithm_type="sde-dpmsolver++", solver_order=3),
                                 _cfg("sde-dpmsolver", solver_type="heun", prediction_type="v_prediction")],
                         ids=["sde-dpm++3m", "sde-dpmsolver-heun"])
def test_fast_mode_noise_is_the_counter_stream(monkeypatch, cfg):
    """Fast mode (no generator) equals diffusers' own loop fed with the counter stream at (seed, sample, step index)."""
    stock = DPMSolverMultistepScheduler(**cfg)
    _counter_noise_into(monkeypatch, 1234, stock)
    a, scale = _loop(stock, 10, gen=False)
    fast = Fast(**cfg)
    fast.noise_seed = 1234
    b, _ = _loop(fast, 10, gen=False)
    _close(b, a, scale)


def test_fast_mode_seed_drawn_per_chain_and_reproducible():
    cfg = dict(algorithm_type="sde-dpmsolver++")
    s = Fast(**cfg)
    torch.manual_seed(0)
    a = _loop(s, 5, gen=False)[0]
    b = _loop(s, 5, gen=False)[0]                 # a new chain draws a new seed
    torch.manual_seed(0)
    c = _loop(Fast(**cfg), 5, gen=False)[0]
    assert not torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("cfg", [dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++", solver_order=2),
                                 _cfg("dpmsolver", solver_order=3, prediction_type="v_prediction")],
                         ids=["dpm++3m", "sde-dpm++2m", "dpmsolver-3m"])
def test_per_sample_timesteps(monkeypatch, cfg):
    """A [B] timestep tensor: each sample steps from its own row with the shared warm-up level and history, as
    diffusers stepping that sample alone from that step index with the same history (and the counter noise)."""
    fast = Fast(**cfg)
    fast.set_timesteps(8)
    fast.noise_seed = 7
    n = 8
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    past = [None, torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)][-cfg["solver_order"]:]
    fast.model_outputs = list(past)
    fast.lower_order_nums = cfg["solver_order"] - 1
    idx = [1, 4, 7]
    prev = fast.step(out, fast.timesteps[idx], x).prev_sample
    assert fast.step_index is None and fast.lower_order_nums == cfg["solver_order"]
    for b, i in enumerate(idx):
        stock = DPMSolverMultistepScheduler(**cfg)
        stock.set_timesteps(n)
        stock.set_begin_index(i)
        stock.model_outputs = [None if p is None else p[b:b + 1] for p in past]
        stock.lower_order_nums = cfg["solver_order"] - 1
        z = fnoise.noise_like(x, 7, i)[b:b + 1]
        monkeypatch.setattr(dmod, "randn_tensor", lambda *a, _z=z, **k: _z)
        ref = stock.step(out[b:b + 1], fast.timesteps[i], x[b:b + 1]).prev_sample
        sc = _amax(ref, x, out, *past)
        _close(prev[b:b + 1], ref, sc, what=f"sample {b} at step {i}")
        mine = fast.model_outputs[-1][b:b + 1]
        _close(mine, stock.model_outputs[-1], sc, what=f"history of sample {b}")


def test_fast_device_path_never_reads_back(monkeypatch):
    """The device code path (CPU tensors treated as device tensors) never reads a tensor value on the host: a loop
    with every host read patched to raise runs through, and equals the host path bit for bit."""
    monkeypatch.setattr(DD, "_HOST_DEVICES", ())
    for cfg in (dict(algorithm_type="sde-dpmsolver++", solver_order=3, thresholding=True),
                _cfg("dpmsolver", solver_order=2, thresholding=True), dict(solver_order=3, use_karras_sigmas=True)):
        ref_s = Fast(**cfg)
        ref_s.noise_seed = 5
        ref, _ = _loop(ref_s, 6, gen=False)
        s = Fast(**cfg)
        s.noise_seed = 5
        s.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
        model = _model(SHAPE)

        def boom(*a, **k):
            raise AssertionError("host read of a tensor value in fast mode")
        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu"):
                m.setattr(torch.Tensor, attr, boom)
            for t in s.timesteps:
                x = s.step(model(x, t), t, x).prev_sample
        assert torch.equal(x, ref), cfg
        assert s.step_index == 6                        # read back on demand (one sync)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_history_ring_never_copies_or_aliases(monkeypatch, order):
    """With the kernel's ``x0_out`` (emulated by a copy when this fastrev predates it), m₀ goes into the buffer that
    just fell out of the history: ``solver_order`` buffers for a whole chain, none aliasing a tensor the same launch
    reads, and the loop unchanged."""
    native = "x0_out" in inspect.signature(DD._ops.fused_step).parameters
    orig = DD._ops.fused_step
    seen = []

    def spy(table, t, sample, model_output, *, x0_out=None, history=(), **kw):
        if x0_out is not None:
            seen.append(x0_out.data_ptr())
            for r in (sample, model_output, *history):
                assert x0_out.data_ptr() != r.data_ptr(), "x0_out aliases a tensor read in the same launch"
        if native:
            return orig(table, t, sample, model_output, x0_out=x0_out, history=history, **kw)
        prev, x0 = orig(table, t, sample, model_output, history=history, **kw)
        if x0_out is not None:
            x0_out.copy_(x0)
            x0 = x0_out
        return DD._ops.StepOutput(prev, x0)

    cfg = dict(solver_order=order, algorithm_type="sde-dpmsolver++")
    ref = Fast(**cfg)
    ref.noise_seed = 1
    want = _loop(ref, 10, gen=False)[0]
    monkeypatch.setattr(DD._ops, "fused_step", spy)
    s = Fast(**cfg)
    s.noise_seed = 1
    got = _loop(s, 10, gen=False)[0]
    assert torch.equal(got, want)
    assert len(seen) == 10 and len(set(seen)) == order
    assert len({m.data_ptr() for m in s.model_outputs}) == order


# ------------------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("cfg", [dict(solver_order=3, solver_type="heun"),
                                 dict(algorithm_type="sde-dpmsolver++", thresholding=True, sample_max_value=1.2),
                                 _cfg("dpmsolver", solver_order=2, thresholding=True)],
                         ids=["dpm++3m", "sde-dpm++2m-threshold", "dpmsolver-threshold"])
def test_triton_kernel_matches_torch_path_and_diffusers(kernel_device, cfg):
    """The fused kernel (interpreter on CPU) with HISTORY = 0, 1, 2 launches: exact mode equals diffusers to the
    bound, fast mode equals the torch path with the same counter noise (generated in the kernel)."""
    shape = (2, 3, 4, 4)
    for gen in (True, False):
        res = []
        for backend in ("triton", "torch"):
            s = Fast(**cfg)
            s.backend = backend
            s.noise_seed = 99
            res.append(_loop(s, 5, shape=shape, gen=gen)[0].cpu())
        _close(res[0], res[1], _amax(res[1]), what=f"kernel vs torch gen={gen}")
        if gen:
            a, scale = _loop(DPMSolverMultistepScheduler(**cfg), 5, shape=shape)
            _close(res[0], a, scale, what="kernel vs diffusers")


def test_a_wrong_coefficient_fails_the_bound(monkeypatch):
    """The bound is tight enough that a wrong coefficient fails it: each perturbation of the table (a coefficient off
    by 3e-4 relative, the sign of the m₋₁ term, a dropped m₋₂ term, the noise scale off by 1e-3) breaks a loop that
    otherwise passes."""
    orig = DD.dpm_rows
    T = DD._T.COL
    perturb = {
        "C1*(1+3e-4)": lambda t: t[:, T["C1"]].mul_(1 + 3e-4),
        "-D0": lambda t: t[:, T["D0"]].neg_(),
        "D1=0": lambda t: t[:, T["D1"]].zero_(),
        "SIGMA*(1+1e-3)": lambda t: t[:, T["SIGMA"]].mul_(1 + 1e-3),
    }
    cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    assert _check_loop(cfg, n=10) < TOL
    for f in perturb.values():
        def rows(*a, _f=f, **k):
            table, orders = orig(*a, **k)
            _f(table)
            return table, orders
        monkeypatch.setattr(DD, "dpm_rows", rows)
        with pytest.raises(AssertionError):
            _check_loop(cfg, n=10)
        monkeypatch.setattr(DD, "dpm_rows", orig)


def test_coefficients_against_the_closed_forms():
    """The float64 rows (fastrev_fixes) of DPM-Solver++(2M) midpoint and the third-order update against the
    closed forms of Lu et al. written independently: prev = (σ_t/σ_s)x + α_t(1 − e^−h)[(1 + 1/(2r₀))m₀ − m₋₁/(2r₀)],
    and the order-3 weights from D1, D2 with r₀, r₁ (1e-12)."""
    s = Fast(solver_order=3, fastrev_fixes=True)
    s.set_timesteps(12)
    sig = s.sigmas.double()
    a = 1 / torch.sqrt(sig**2 + 1)
    sg = sig * a
    lam = torch.log(a) - torch.log(sg)
    T = DD._T.COL
    for level in (1, 2):
        table, orders = DD.dpm_rows(s.sigmas, level, algorithm_type="dpmsolver++", solver_order=3,
                                       solver_type="midpoint", prediction_type="sample", thresholding=False,
                                       lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                                       flow=False, float64=True)
        for i in range(1, 10):
            h, h0 = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            r0, phi = h0 / h, a[i + 1] * (1 - torch.exp(-h))
            want = {"C1": sg[i + 1] / sg[i]}
            if orders[i] == 2:
                want.update(C2=phi * (1 + 0.5 / r0), D0=-phi * 0.5 / r0, D1=0.0)
            else:
                h1 = lam[i - 1] - lam[i - 2]
                r1 = h1 / h
                p1 = phi / h - a[i + 1] * torch.exp(-h)           # α_t((1 − e^−h)/h − e^−h)... coefficient of D1
                p1 = a[i + 1] * ((torch.exp(-h) - 1) / h + 1)
                p2 = -a[i + 1] * ((torch.exp(-h) - 1 + h) / h**2 - 0.5)
                d10 = (1 + r0 / (r0 + r1)) * p1 + p2 / (r0 + r1)
                d11 = -(r0 / (r0 + r1)) * p1 - p2 / (r0 + r1)
                want.update(C2=phi + d10 / r0, D0=-d10 / r0 + d11 / r1, D1=-d11 / r1)
            for k, v in want.items():
                assert abs(table[i, T[k]].item() - float(v)) <= 1e-12 * (1 + abs(float(v))), (level, i, k)
    assert list(DD.dpm_orders(10, 2, 3, True, False, "zero")) == [3] * 8 + [2, 1]
    assert list(DD.dpm_orders(20, 2, 3, True, False, "sigma_min")) == [3] * 20
    assert list(DD.dpm_orders(20, 1, 3, False, True, "sigma_min")) == [2] * 19 + [1]


def test_fastrev_fixes_float64_coefficients():
    """fastrev_fixes=True: float64 scalar coefficients; the loop moves by diffusers' float32 rounding of h (about
    1e-6 relative here), stays finite, and the config key round-trips through diffusers' class."""
    cfg = dict(solver_order=3, prediction_type="v_prediction")
    a, scale = _loop(DPMSolverMultistepScheduler(**cfg), 25)
    b = _loop(Fast(**cfg), 25)[0]
    c = _loop(Fast(**cfg, fastrev_fixes=True), 25)[0]
    assert not torch.equal(b, c)
    _close(c, a, scale, tol=2e-5, what="fixes vs diffusers")
    assert DPMSolverMultistepScheduler.from_config(Fast(fastrev_fixes=True).config).config.fastrev_fixes is True


# ------------------------------------------------------------------------------------------------ errors
def test_errors_like_diffusers_and_clear_messages():
    s = Fast()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(3)
    for t in s.timesteps:
        x = s.step(torch.tanh(x), t, x).prev_sample
    with pytest.raises(IndexError):                                   # past the end (diffusers: IndexError too)
        s.step(x, s.timesteps[-1], x)
    s = Fast(**_cfg("dpmsolver", prediction_type="flow_prediction"))
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="prediction_type"):
        s.step(x, s.timesteps[0], x)
    s = Fast(**_cfg("sde-dpmsolver", solver_order=3))
    s.set_timesteps(6)
    x = s.step(x, s.timesteps[0], x).prev_sample
    x = s.step(x, s.timesteps[1], x).prev_sample
    with pytest.raises(NotImplementedError, match="third-order"):     # diffusers: UnboundLocalError here
        s.step(x, s.timesteps[2], x)
    s = Fast(algorithm_type="sde-dpmsolver++")
    s.set_timesteps(3)
    for bad, err in ((dict(model_output=torch.randn(2, 3, 4)), ValueError),
                     (dict(sample=torch.ones(SHAPE, dtype=torch.int64)), TypeError),
                     (dict(variance_noise=torch.randn(3, 3)), ValueError),
                     (dict(timestep=torch.tensor([1, 2, 3])), ValueError),
                     (dict(timestep="999"), TypeError)):
        kw = dict(model_output=torch.randn(SHAPE), timestep=s.timesteps[0], sample=torch.randn(SHAPE))
        kw.update(bad)
        with pytest.raises(err):
            s.step(**kw)
    s.backend = "nope"
    with pytest.raises(ValueError, match="backend"):
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))
    s = Fast(solver_order=2)
    s.set_timesteps(4)
    s.lower_order_nums = 1                                            # claims a history it does not have
    with pytest.raises(ValueError, match="model_outputs"):
        s.step(torch.randn(SHAPE), s.timesteps[1], torch.randn(SHAPE))


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cuda_graph_capture_whole_chain_and_no_sync():
    """On a GPU: one eager fast-mode chain uploads every level's table; a second chain's steps (device timesteps) run
    under torch.cuda.set_sync_debug_mode("error"), and a third chain is captured whole in a CUDA graph; both equal the
    eager chain."""
    dev = torch.device("cuda")
    for cfg in (dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++", solver_order=2, thresholding=True)):
        s = Fast(**cfg)
        s.noise_seed = 3
        x0 = torch.randn(SHAPE, device=dev)

        def steps(x, s=s):
            for t in s.timesteps:
                x = s.step(torch.tanh(x), t, x).prev_sample
            return x
        s.set_timesteps(8, device=dev)
        eager = steps(x0.clone())
        s.set_timesteps(8, device=dev)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = steps(x0.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(again, eager, rtol=0, atol=0)
        static = x0.clone()
        s.set_timesteps(8, device=dev)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = steps(static)
        g.replay()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_kernel_exact_parity():
    dev = torch.device("cuda")
    for cfg in (dict(solver_order=2), dict(solver_order=3, thresholding=True),
                dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **SD)):
        res = []
        for cls in (DPMSolverMultistepScheduler, Fast):
            s = cls(**cfg)
            s.set_timesteps(20, device=dev)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)).to(dev)
            g = torch.Generator(device=dev).manual_seed(0)
            for t in s.timesteps:
                x = s.step(torch.tanh(x), t, x, generator=g).prev_sample
            res.append(x)
        _close(res[1], res[0], _amax(res[0]), what=str(cfg))
