"""fastrev.diffusers_euler: FastEulerDiscrete / FastEulerAncestralDiscrete / FastFlowMatchEulerDiscrete against the
diffusers classes they replace.

Parity is measured against what diffusers' own float32 arithmetic resolves: |ours − diffusers| ≤ TOL · max|diffusers|
per output (whole loops, prev_sample and pred_original_sample). The broad matrix runs the torch path (the CPU default);
the fused Triton kernel runs under the interpreter on a few short loops; ``cuda`` tests run the kernel on a GPU
(CUDA-graph capture). The fast-mode noise is checked against diffusers' own step fed with fastrev's counter-stream
noise (:mod:`fastrev.noise`), and sync-freedom by running the device code path on CPU tensors with every host read
of a tensor value patched to raise.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from fastrev import diffusers_euler as DE  # noqa: E402
from fastrev import noise as fnoise  # noqa: E402
from fastrev.diffusers_euler import (  # noqa: E402
    FastEulerAncestralDiscreteScheduler,
    FastEulerDiscreteScheduler,
    FastFlowMatchEulerDiscreteScheduler,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
PAIRS = {
    "euler": (EulerDiscreteScheduler, FastEulerDiscreteScheduler),
    "ancestral": (EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler),
    "flow": (FlowMatchEulerDiscreteScheduler, FastFlowMatchEulerDiscreteScheduler),
}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

EULER_CONFIGS = [
    ("default", {}, {}),
    ("sd-leading", dict(SD, timestep_spacing="leading", steps_offset=1), {}),
    ("trailing-v", dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"), {}),
    ("sample-pred", dict(prediction_type="sample"), {}),
    ("karras", dict(SD, use_karras_sigmas=True), {}),
    ("karras-minmax-v", dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=80.0,
                             prediction_type="v_prediction"), {}),
    ("exponential", dict(SD, use_exponential_sigmas=True), {}),
    ("beta", dict(SD, use_beta_sigmas=True), {}),
    ("log-linear", dict(interpolation_type="log_linear"), {}),
    ("sigma-min-final", dict(SD, final_sigmas_type="sigma_min"), {}),
    ("zero-snr-v", dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        prediction_type="v_prediction"), {}),
    ("continuous-v", dict(timestep_type="continuous", prediction_type="v_prediction", use_karras_sigmas=True), {}),
    ("cosine", dict(beta_schedule="squaredcos_cap_v2"), {}),
    ("churn", dict(SD), dict(s_churn=1.0)),
    ("churn-window", {}, dict(s_churn=3.0, s_tmin=0.3, s_tmax=4.0, s_noise=1.003)),
    ("churn-v", dict(prediction_type="v_prediction"), dict(s_churn=0.5)),
]
ANCESTRAL_CONFIGS = [
    ("default", {}),
    ("sd-leading", dict(SD, timestep_spacing="leading", steps_offset=1)),
    ("trailing-v", dict(SD, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("zero-snr-v", dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        prediction_type="v_prediction")),
    ("cosine", dict(beta_schedule="squaredcos_cap_v2")),
]
FLOW_CONFIGS = [
    ("default", {}, {}),
    ("sd3", dict(shift=3.0), {}),
    ("flux-dynamic", dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(mu=0.8)),
    ("dynamic-linear", dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.3)),
    ("ltx-terminal", dict(shift=2.0, shift_terminal=0.1), {}),
    ("karras", dict(shift=3.0, use_karras_sigmas=True), {}),
    ("exponential", dict(use_exponential_sigmas=True), {}),
    ("beta", dict(use_beta_sigmas=True), {}),
    ("invert", dict(invert_sigmas=True), {}),
    ("stochastic", dict(shift=3.0, stochastic_sampling=True), {}),
    ("custom-sigmas", dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.12, 0.05, 0.01])),
]


# ------------------------------------------------------------------------------------------------ helpers
def _model(shape, seed=3):
    """A fixed nonlinear 'denoiser' of (x, t): channel mixing + tanh + a t-dependent offset."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape[1], shape[1], generator=g) / math.sqrt(shape[1])
    bias = torch.randn(shape[1:], generator=g) * 0.1

    def f(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *(1,) * (x.dim() - 1))
        return torch.tanh(torch.einsum("ij,bj...->bi...", W, x.float())) + bias * (t / 1000) + 0.05

    return f


def _loop(sched, n=8, *, shape=SHAPE, gen=True, step_kw=None, set_kw=None, dtype=torch.float32, x=None,
          contiguous=False):
    """A pipeline-shaped loop; returns (final sample, per-step outputs, per-step scales). The model's output is
    channel-strided (einsum) unless ``contiguous``.

    The scales are the magnitudes diffusers' float32 arithmetic acts on: |x| for prev_sample (x + d·dt rounds at the
    size of x, e.g. 4096 at zero-terminal-SNR's σ_max), and |A·x| + |B·out| for x̂₀ = A·x + B·out."""
    set_kw = dict(set_kw or {})
    if "sigmas" in set_kw:
        sched.set_timesteps(**set_kw)
    else:
        sched.set_timesteps(n, **set_kw)
    model = _model(shape)
    if x is None:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        if hasattr(sched, "init_noise_sigma"):
            x = x * sched.init_noise_sigma
    x = x.to(dtype)
    g = torch.Generator().manual_seed(0) if gen else None
    outs, scales = [], []
    pt = getattr(sched.config, "prediction_type", None)
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model(xin, t).to(dtype)
        out = out.contiguous() if contiguous else out
        sig = float(sched.sigmas[i])
        a, b = {"epsilon": (1.0, sig), "v_prediction": (1 / (sig**2 + 1), sig / math.sqrt(sig**2 + 1))}.get(pt, (0, 1))
        ax, ao = x.double().abs().max().item(), out.double().abs().max().item()
        scales.append((ax, a * ax + b * ao))
        r = sched.step(out, t, x, generator=g, return_dict=False, **(step_kw or {}))
        outs.append(r)
        x = r[0]
    return x, outs, scales


def _close(ours, ref, tol=TOL, what="", scale=0.0):
    assert ours.shape == ref.shape, what
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all(), what
    err = (ours.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), scale)
    assert err <= tol * max(scale, 1e-30), f"{what}: max err {err:.3e} vs scale {scale:.3e}"


_STEPPING = [None]      # the diffusers scheduler currently stepping (its step index keys the counter noise)


def _recording(sched, log):
    orig = sched.step

    def step(out, t, x, **k):
        _STEPPING[0] = sched
        r = orig(out, t, x, **k)
        log.append((out, t, x, r))
        return r
    sched.step = step
    return sched


def _check_loop(stock, fast, loop_tol=TOL, **kw):
    """Whole loops (free running) to ``loop_tol`` of the final sample, and every step with the same inputs as
    diffusers' step (teacher forced, the generator consumed in the same order) to TOL of the terms it rounds."""
    log = []
    a, ra, sc = _loop(_recording(stock, log), **kw)
    b, rb, _ = _loop(fast, **kw)
    _close(b, a, tol=loop_tol, what="final sample (whole loop)")
    assert all(len(x) == len(y) for x, y in zip(ra, rb, strict=True))
    # teacher forced: diffusers' inputs into a fresh fast scheduler
    set_kw = dict(kw.get("set_kw") or {})
    fast2 = type(fast).from_config(fast.config)
    fast2.noise_seed = getattr(fast, "noise_seed", None)
    if "sigmas" in set_kw:
        fast2.set_timesteps(**set_kw)
    else:
        fast2.set_timesteps(kw.get("n", 8), **set_kw)
    g = torch.Generator().manual_seed(0) if kw.get("gen", True) else None
    for i, (out, t, x, ref) in enumerate(log):
        if hasattr(fast2, "scale_model_input"):
            fast2.scale_model_input(x, t)
        y = fast2.step(out, t, x, generator=g, return_dict=False, **(kw.get("step_kw") or {}))
        _close(y[0], ref[0], what=f"prev_sample at step {i}", scale=sc[i][0])
        if len(y) > 1:
            _close(y[1].float(), ref[1].float(), what=f"pred_original_sample at step {i}", scale=sc[i][1])


# ------------------------------------------------------------------------------------------------ surface
@pytest.mark.parametrize("name", list(PAIRS))
def test_same_config_signature_and_defaults(name):
    stock_cls, fast_cls = PAIRS[name]
    ps = inspect.signature(stock_cls.__init__).parameters
    pf = inspect.signature(fast_cls.__init__).parameters
    extra = set(pf) - set(ps)
    assert extra == {"fastrev_fixes"} and pf["fastrev_fixes"].default is False
    for k, p in ps.items():
        assert k in pf, k
        assert pf[k].default == p.default or (p.default is None and pf[k].default is None), k
    assert set(fast_cls().compatibles) == set(stock_cls().compatibles)     # the same diffusers classes
    assert fast_cls.order == stock_cls.order == 1
    for m in ("step", "set_timesteps"):
        assert list(inspect.signature(getattr(fast_cls, m)).parameters) == \
            list(inspect.signature(getattr(stock_cls, m)).parameters), m
    for attr in ("step_index", "begin_index", "set_begin_index", "index_for_timestep"):
        assert hasattr(fast_cls, attr)
    if name != "flow":
        for attr in ("scale_model_input", "init_noise_sigma", "add_noise"):
            assert hasattr(fast_cls, attr)
    else:
        for attr in ("scale_noise", "set_shift", "shift", "time_shift", "stretch_shift_to_terminal"):
            assert hasattr(fast_cls, attr)


@pytest.mark.parametrize("name", list(PAIRS))
def test_from_config_both_ways_and_save_load(name, tmp_path):
    stock_cls, fast_cls = PAIRS[name]
    cfg = dict(shift=3.0, stochastic_sampling=True) if name == "flow" else dict(SD, prediction_type="v_prediction",
                                                                                 timestep_spacing="trailing")
    stock = stock_cls(**cfg)
    fast = fast_cls.from_config(stock.config)
    for k, v in stock.config.items():
        if not k.startswith("_"):
            assert fast.config[k] == v, k
    back = stock_cls.from_config(fast.config)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in stock.config.items() if not k.startswith("_")}
    fast.save_config(tmp_path)
    again = fast_cls.from_pretrained(tmp_path)
    assert dict(again.config) == {k: v for k, v in fast.config.items() if k != "_use_default_values"} | \
        {k: v for k, v in again.config.items() if k.startswith("_")}
    assert len(fast) == len(stock) == stock.config.num_train_timesteps


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("case", EULER_CONFIGS, ids=[c[0] for c in EULER_CONFIGS])
def test_euler_schedule_identical(case):
    _, cfg, _ = case
    for n in (1, 7, 25):
        a, b = EulerDiscreteScheduler(**cfg), FastEulerDiscreteScheduler(**cfg)
        a.set_timesteps(n)
        b.set_timesteps(n)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
        assert torch.equal(torch.as_tensor(a.init_noise_sigma), torch.as_tensor(b.init_noise_sigma))
        assert a.num_inference_steps == b.num_inference_steps


@pytest.mark.parametrize("case", FLOW_CONFIGS, ids=[c[0] for c in FLOW_CONFIGS])
def test_flow_schedule_identical(case):
    _, cfg, set_kw = case
    a, b = FlowMatchEulerDiscreteScheduler(**cfg), FastFlowMatchEulerDiscreteScheduler(**cfg)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert (a.sigma_min, a.sigma_max, a.shift) == (b.sigma_min, b.sigma_max, b.shift)
    kw = dict(set_kw)
    n = None if "sigmas" in kw else 9
    a.set_timesteps(n, **kw)
    b.set_timesteps(n, **kw)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    if not cfg.get("use_dynamic_shifting"):
        a.set_shift(5.0)
        b.set_shift(5.0)
        a.set_timesteps(n, **kw)
        b.set_timesteps(n, **kw)
        assert b.shift == 5.0 and torch.equal(a.sigmas, b.sigmas)


def test_ancestral_schedule_identical():
    for _, cfg in ANCESTRAL_CONFIGS:
        a, b = EulerAncestralDiscreteScheduler(**cfg), FastEulerAncestralDiscreteScheduler(**cfg)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
        a.set_timesteps(12)
        b.set_timesteps(12)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
        assert torch.equal(a.init_noise_sigma, b.init_noise_sigma)


def test_euler_custom_timesteps_and_sigmas_identical():
    a, b = EulerDiscreteScheduler(**SD), FastEulerDiscreteScheduler(**SD)
    a.set_timesteps(timesteps=[901.0, 700.5, 350.0, 10.0])
    b.set_timesteps(timesteps=[901.0, 700.5, 350.0, 10.0])
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    a.set_timesteps(sigmas=[14.0, 6.0, 2.0, 0.5, 0.0])
    b.set_timesteps(sigmas=[14.0, 6.0, 2.0, 0.5, 0.0])
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    with pytest.raises(ValueError):
        b.set_timesteps(5, sigmas=[1.0, 0.0])


# ------------------------------------------------------------------------------------------------ exact loops
def _loop_tol(cfg):
    """Zero terminal SNR starts at σ_max = 4096: diffusers' float32 x + d·dt rounds at |x| ≈ 4096 (≈ 1e-3 absolute at
    the first step) and carries ~1.2e-5 of the final sample to the end of the loop; fastrev's float64 coefficients do
    not. Each step is still held to 1e-5 of the terms it rounds (teacher forced)."""
    return 3e-5 if cfg.get("rescale_betas_zero_snr") else TOL


@pytest.mark.parametrize("case", EULER_CONFIGS, ids=[c[0] for c in EULER_CONFIGS])
def test_euler_exact_loop_matches_diffusers(case):
    name, cfg, step_kw = case
    _check_loop(EulerDiscreteScheduler(**cfg), FastEulerDiscreteScheduler(**cfg), step_kw=step_kw,
                loop_tol=_loop_tol(cfg))


@pytest.mark.parametrize("case", ANCESTRAL_CONFIGS, ids=[c[0] for c in ANCESTRAL_CONFIGS])
def test_ancestral_exact_loop_matches_diffusers(case):
    _, cfg = case
    _check_loop(EulerAncestralDiscreteScheduler(**cfg), FastEulerAncestralDiscreteScheduler(**cfg), n=10,
                loop_tol=_loop_tol(cfg))


@pytest.mark.parametrize("case", FLOW_CONFIGS, ids=[c[0] for c in FLOW_CONFIGS])
def test_flow_exact_loop_matches_diffusers(case):
    _, cfg, set_kw = case
    _check_loop(FlowMatchEulerDiscreteScheduler(**cfg), FastFlowMatchEulerDiscreteScheduler(**cfg), set_kw=set_kw)


def test_exact_mode_list_of_generators_and_one_step_chain():
    for stock_cls, fast_cls, cfg in ((EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler, {}),
                                     (FlowMatchEulerDiscreteScheduler, FastFlowMatchEulerDiscreteScheduler,
                                      dict(stochastic_sampling=True))):
        res = []
        for cls in (stock_cls, fast_cls):
            s = cls(**cfg)
            s.set_timesteps(3)
            gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
            for t in s.timesteps:
                x = s.step(torch.tanh(x), t, x, generator=gens).prev_sample
            res.append(x)
        _close(res[1], res[0], what=stock_cls.__name__)
    _check_loop(EulerDiscreteScheduler(), FastEulerDiscreteScheduler(), n=1)


def test_mixed_dtypes_follow_diffusers():
    """fp16 model output with a float32 sample: prev_sample comes back in the output's dtype, as diffusers."""
    for stock_cls, fast_cls in PAIRS.values():
        res = []
        for cls in (stock_cls, fast_cls):
            s = cls()
            s.set_timesteps(4)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
            t = s.timesteps[0]
            out = torch.tanh(x).half()
            res.append(s.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
        assert res[1].dtype == res[0].dtype == torch.float16
        _close(res[1].float(), res[0].float(), tol=1e-3, what=stock_cls.__name__)


def test_img2img_begin_index_and_add_noise():
    """An img2img-shaped start: add_noise at timesteps[k] with set_begin_index(k), then the tail of the chain."""
    for stock_cls, fast_cls in (PAIRS["euler"], PAIRS["ancestral"]):
        res = []
        for cls in (stock_cls, fast_cls):
            s = cls(**SD)
            s.set_timesteps(10)
            s.set_begin_index(4)
            x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
            ts = s.timesteps[4:]
            x = s.add_noise(x0, z, ts[:1].repeat(SHAPE[0]))
            g = torch.Generator().manual_seed(0)
            for t in ts:
                x = s.step(torch.tanh(s.scale_model_input(x, t)), t, x, generator=g).prev_sample
            assert s.step_index == 10
            res.append(x)
        _close(res[1], res[0], what=stock_cls.__name__)
    # the flow-matching forward process (SD3 img2img)
    a, b = FlowMatchEulerDiscreteScheduler(shift=3.0), FastFlowMatchEulerDiscreteScheduler(shift=3.0)
    for s in (a, b):
        s.set_timesteps(10)
        s.set_begin_index(3)
    x0, z = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.equal(a.scale_noise(x0, a.timesteps[3:4], z), b.scale_noise(x0, b.timesteps[3:4], z))


def test_private_step_index_bookkeeping_like_diffusers():
    """Code that drives diffusers' private bookkeeping (LEDITS++ calls ``_init_step_index`` and ``_step_index += 1``)
    moves the device counter too."""
    res = []
    for cls in (EulerDiscreteScheduler, FastEulerDiscreteScheduler):
        s = cls(**SD)
        s.set_timesteps(6)
        s._init_step_index(s.timesteps[2])
        assert s.step_index == 2
        s._step_index += 1
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        x = s.step(torch.tanh(x), s.timesteps[0], x).prev_sample        # the timestep is ignored once indexed
        assert s.step_index == 4
        s._step_index = None                                            # restart from the timestep given
        x = s.step(torch.tanh(x), s.timesteps[1], x).prev_sample
        res.append((x, s.step_index))
    assert res[0][1] == res[1][1] == 2
    _close(res[1][0], res[0][0])


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_per_token_timesteps_as_diffusers(stochastic):
    """LTX-Video's per-token timesteps (each token its own σ): diffusers' eager arithmetic, the same numbers."""
    res = []
    for cls in (FlowMatchEulerDiscreteScheduler, FastFlowMatchEulerDiscreteScheduler):
        s = cls(shift=2.0, stochastic_sampling=stochastic)
        s.set_timesteps(5)
        x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for i, t in enumerate(s.timesteps):
            tok = torch.full((2, 6), float(t))
            tok[:, :2] = s.timesteps[min(i + 1, 4)]                    # conditioning tokens a step ahead
            x = s.step(-torch.tanh(x), t, x, per_token_timesteps=tok, generator=g).prev_sample
        res.append((x, s.step_index))
    assert res[0][1] == res[1][1] == 5
    _close(res[1][0], res[0][0])


def test_duplicate_timestep_start_takes_second_match():
    """diffusers' rule: a chain starting at a duplicated timestep starts at its second occurrence."""
    res = []
    for cls in (FlowMatchEulerDiscreteScheduler, FastFlowMatchEulerDiscreteScheduler):
        s = cls()
        s.set_timesteps(sigmas=[1.0, 0.6, 0.6, 0.3, 0.1])
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        x = s.step(torch.tanh(x), s.timesteps[1], x).prev_sample
        res.append((x, s.step_index))
    assert res[0][1] == res[1][1] == 3
    _close(res[1][0], res[0][0])


# ------------------------------------------------------------------------------------------------ fast mode
def _counter_noise_into(monkeypatch, module, seed, index_of):
    """Make diffusers' ``randn_tensor`` in ``module`` return fastrev's counter stream at the current step index."""
    def fake(shape, generator=None, device=None, dtype=None, **_):
        z = fnoise.noise_like(torch.empty(shape), seed, index_of())
        return z.to(dtype=dtype or torch.float32)
    monkeypatch.setattr(module, "randn_tensor", fake)


@pytest.mark.parametrize("name,cfg,step_kw", [
    ("ancestral", dict(SD), {}),
    ("ancestral", dict(prediction_type="v_prediction"), {}),
    ("euler", dict(SD), dict(s_churn=1.0)),
    ("euler", {}, dict(s_churn=3.0, s_tmin=0.3, s_tmax=4.0)),
    ("flow", dict(shift=3.0, stochastic_sampling=True), {}),
])
def test_fast_mode_noise_is_the_counter_stream(monkeypatch, name, cfg, step_kw):
    """Fast mode (no generator) equals diffusers' own step fed with the counter stream at (seed, sample, step index):
    the noise enters prev and, for churn, x̂₀ exactly as diffusers' noise does."""
    stock_cls, fast_cls = PAIRS[name]
    stock, fast = stock_cls(**cfg), fast_cls(**cfg)
    fast.noise_seed = 1234
    module = __import__(stock_cls.__module__, fromlist=["randn_tensor"])
    _counter_noise_into(monkeypatch, module, 1234, lambda: _STEPPING[0].step_index)
    _check_loop(stock, fast, n=8, gen=False, step_kw=step_kw)


def test_fast_mode_seed_drawn_per_chain_and_reproducible():
    s = FastEulerAncestralDiscreteScheduler()
    torch.manual_seed(0)
    a = _loop(s, n=5, gen=False)[0]
    b = _loop(s, n=5, gen=False)[0]                  # a new chain draws a new seed
    torch.manual_seed(0)
    c = _loop(FastEulerAncestralDiscreteScheduler(), n=5, gen=False)[0]
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_per_sample_timesteps():
    """A [B] timestep tensor: each sample steps from its own σ, as diffusers stepping that sample alone."""
    for name, cfg, noisy in (("euler", dict(SD), False), ("flow", dict(shift=3.0), False),
                             ("ancestral", {}, True), ("flow", dict(stochastic_sampling=True), True)):
        stock_cls, fast_cls = PAIRS[name]
        fast = fast_cls(**cfg)
        fast.set_timesteps(6)
        fast.noise_seed = 7
        x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
        out = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
        idx = [0, 3, 5]
        ts = fast.timesteps[idx]
        if name != "flow":
            xin = fast.scale_model_input(x, ts)
        prev = fast.step(out, ts, x, return_dict=False)[0]
        assert fast.step_index is None                  # per-sample steps leave the step index alone
        for b, i in enumerate(idx):
            stock = stock_cls(**cfg)
            stock.set_timesteps(6)
            stock.set_begin_index(i)
            if name != "flow":
                _close(xin[b:b + 1], stock.scale_model_input(x[b:b + 1], ts[b]), what=f"{name} scale {b}")
            z = fnoise.noise_like(x, 7, i)[b:b + 1] if noisy else None
            if noisy:
                module = __import__(stock_cls.__module__, fromlist=["randn_tensor"])
                orig = module.randn_tensor
                module.randn_tensor = lambda *a, _z=z, **k: _z
            try:
                ref = stock.step(out[b:b + 1], ts[b], x[b:b + 1], return_dict=False)[0]
            finally:
                if noisy:
                    module.randn_tensor = orig
            _close(prev[b:b + 1], ref, what=f"{name} sample {b} at step {i}")


@pytest.mark.parametrize("name,cfg,step_kw", [
    ("euler", dict(SD), {}),
    ("euler", dict(prediction_type="v_prediction"), {}),
    ("euler", dict(prediction_type="sample"), {}),
    ("euler", dict(SD), dict(s_churn=1.0)),
    ("euler", {}, dict(s_churn=3.0, s_tmin=0.3, s_tmax=4.0, s_noise=1.003)),
    ("ancestral", dict(SD), {}),
    ("flow", dict(shift=3.0), {}),
    ("flow", dict(shift=3.0, stochastic_sampling=True), {}),
])
def test_cpu_fast_path_is_fused_step_bit_for_bit(monkeypatch, name, cfg, step_kw):
    """Host-indexed steps on plain float32 CPU tensors call the one-pass CPU update directly (not through fused_step):
    every step's outputs equal fused_step's bit for bit (exact and fast mode, B = 1 and 3, scale_model_input in the
    loop); the direct path is the one taken, the device counter follows the host index, and a channel-strided model
    output takes fused_step."""
    _, fast_cls = PAIRS[name]
    taken = []
    direct = DE._FastEulerBase._cpu_step
    monkeypatch.setattr(DE._FastEulerBase, "_cpu_step", lambda self, *a: taken.append(1) or direct(self, *a))
    for shape in ((1, 4, 8, 8), (3, 2, 4, 4)):
        for gen in (True, False):
            runs = []
            for on in (True, False):
                monkeypatch.setattr(DE, "_CPU_FAST", on)
                taken.clear()
                s = fast_cls(**cfg)
                s.noise_seed = 21
                runs.append(_loop(s, n=6, shape=shape, gen=gen, step_kw=step_kw, contiguous=True)[1])
                assert len(taken) == (6 if on else 0)
                assert s.step_index == 6 and int(s._idx) == 6
            for i, (a, b) in enumerate(zip(*runs, strict=True)):
                for u, v in zip(a, b, strict=True):
                    assert torch.equal(u, v), f"{name} {shape} gen={gen} step {i}"
    monkeypatch.setattr(DE, "_CPU_FAST", True)
    taken.clear()
    _loop(fast_cls(**cfg), n=3, step_kw=step_kw)                  # channel-strided output: through fused_step
    assert not taken


def test_fast_device_path_never_reads_back(monkeypatch):
    """The device code path (CPU tensors treated as device tensors) never reads a tensor value on the host: a loop
    with every host read patched to raise runs through, and matches the host path."""
    monkeypatch.setattr(DE, "_HOST_DEVICES", ())
    cases = [(FastEulerDiscreteScheduler, dict(SD), dict(s_churn=1.0)), (FastEulerAncestralDiscreteScheduler, {}, {}),
             (FastFlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), {}),
             (FastEulerDiscreteScheduler, dict(prediction_type="v_prediction"), {}),
             (FastEulerDiscreteScheduler, {}, dict(s_churn=3.0, s_tmin=0.3, s_tmax=4.0))]    # γ > 0 at step 2 only
    for cls, cfg, kw in cases:
        ref_s = cls(**cfg)
        ref_s.noise_seed = 5
        ref, _, _ = _loop(ref_s, n=4, gen=False, step_kw=kw)
        s = cls(**cfg)
        s.noise_seed = 5
        s.set_timesteps(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
        if hasattr(s, "init_noise_sigma"):
            x = x * s.init_noise_sigma
        model = _model(SHAPE)

        def boom(*a, **k):
            raise AssertionError("host read of a tensor value in fast mode")
        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu"):
                m.setattr(torch.Tensor, attr, boom)
            for t in s.timesteps:
                xin = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                out = model(xin, t)
                x = s.step(out, t, x, return_dict=False, **kw)[0]
        _close(x, ref, tol=0, what=cls.__name__)
        assert s.step_index == 4                        # read back on demand (one sync)


# ------------------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("name,cfg,step_kw", [
    ("euler", dict(SD), dict(s_churn=1.0)),
    ("ancestral", dict(prediction_type="v_prediction"), {}),
    ("flow", dict(shift=3.0, stochastic_sampling=True), {}),
])
def test_triton_kernel_matches_torch_path(kernel_device, name, cfg, step_kw):
    """The fused kernel (interpreter on CPU) against the torch path: exact mode to float32 rounding, fast mode with
    the same counter noise (generated in the kernel)."""
    _, fast_cls = PAIRS[name]
    shape = (2, 3, 4, 4)
    for gen in (True, False):
        res = []
        for backend in ("triton", "torch"):
            s = fast_cls(**cfg)
            s.backend = backend
            s.noise_seed = 99
            x = torch.randn(shape, generator=torch.Generator().manual_seed(3), device="cpu").to(kernel_device)
            res.append(_loop(s, n=3, shape=shape, gen=gen, step_kw=step_kw, x=x)[0].cpu())
        _close(res[0], res[1], tol=2e-5, what=f"{name} gen={gen}")


CHURN_WINDOW = dict(s_churn=3.0, s_tmin=0.3, s_tmax=4.0, s_noise=1.003)     # n = 3: γ > 0 at the middle step only


def test_euler_churn_is_one_kernel_launch(kernel_device, monkeypatch):
    """Euler with churn: one launch a step, x̂₀'s noise through the kernel's X0_NOISE (the same z as prev's), in exact
    and fast mode; with a γ window exact mode launches without noise where γ = 0 (diffusers draws nothing there),
    fast mode always with it (multiplied by 0 there). The interpreter (or GPU) run equals the torch path."""
    from fastrev.kernels import reverse_step as K

    launches = []
    real = K.reverse_step

    def counting(ts, **kw):
        launches.append(bool(kw.get("x0_noise")))
        return real(ts, **kw)

    monkeypatch.setattr(K, "reverse_step", counting)
    shape, n = (2, 2, 3, 3), 3
    for step_kw, gen, want in ((dict(s_churn=1.0), True, [True] * 3), (dict(s_churn=1.0), False, [True] * 3),
                               (CHURN_WINDOW, True, [False, True, False]), (CHURN_WINDOW, False, [True] * 3)):
        res = []
        for backend in ("triton", "torch"):
            launches.clear()
            s = FastEulerDiscreteScheduler(**SD)
            s.backend = backend
            s.noise_seed = 8
            x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(kernel_device)
            _, outs, _ = _loop(s, n=n, shape=shape, gen=gen, step_kw=step_kw, x=x)
            assert launches == (want if backend == "triton" else []), (step_kw, gen, backend)
            res.append([(p.cpu(), x0.cpu()) for p, x0 in outs])
        for i, ((pa, xa), (pb, xb)) in enumerate(zip(*res, strict=True)):
            _close(pa, pb, tol=2e-5, what=f"prev step {i} {step_kw} gen={gen}")
            _close(xa, xb, tol=2e-5, what=f"x0 step {i} {step_kw} gen={gen}")


@pytest.mark.parametrize("contiguous", [False, True], ids=["fused_step", "direct-cpu"])
def test_euler_churn_one_pass_on_the_torch_path(monkeypatch, contiguous):
    """The torch path with churn: one fused_step a step (a channel-strided model output) or one pass of the CPU
    update (a contiguous one), never a second launch for x̂₀; whole exact loops still equal diffusers to float32
    rounding (prev and x̂₀, teacher forced too) — with a γ window as well."""
    from fastrev import _cpu

    calls = {"fused_step": 0, "table_step": 0}
    for mod, name in ((DE._ops, "fused_step"), (_cpu, "table_step")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or
                            _r(*a, **k))
    for step_kw in (dict(s_churn=1.0), CHURN_WINDOW):
        calls.update(fused_step=0, table_step=0)
        s = FastEulerDiscreteScheduler(**SD)
        _loop(s, n=3, step_kw=step_kw, contiguous=contiguous)
        assert calls == ({"fused_step": 0, "table_step": 3} if contiguous else {"fused_step": 3, "table_step": 0})
        _check_loop(EulerDiscreteScheduler(**SD), FastEulerDiscreteScheduler(**SD), n=3, step_kw=step_kw,
                    contiguous=contiguous)
    if contiguous:      # the compiled pass (x̂₀'s noise in its vectorized loop) against the eager float32 update
        for gen in (True, False):
            runs = []
            for available in (True, False):
                monkeypatch.setattr(_cpu, "AVAILABLE", available)
                s = FastEulerDiscreteScheduler(**SD)
                s.noise_seed = 2
                runs.append(_loop(s, n=4, gen=gen, step_kw=dict(s_churn=1.0), contiguous=True)[1])
            for a, b in zip(*runs, strict=True):      # exact: bit for bit; fast: the pass's normals to 1e-6
                torch.testing.assert_close(a, b, rtol=0 if gen else 1e-5, atol=0 if gen else 1e-4)


def test_triton_kernel_per_sample_and_mixed_dtype(kernel_device):
    """Per-sample [B] timesteps and an fp16 model output with a float32 sample, on the kernel and on the torch path."""
    res = []
    for backend in ("triton", "torch"):
        s = FastEulerAncestralDiscreteScheduler()
        s.backend = backend
        s.noise_seed = 4
        s.set_timesteps(5)
        x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)).to(kernel_device)
        ts = s.timesteps[[0, 2, 4]].to(kernel_device)
        out = torch.tanh(s.scale_model_input(x, ts)).half()
        prev, x0 = s.step(out, ts, x, return_dict=False)
        assert prev.dtype == torch.float16 and x0.dtype == torch.float32
        res.append((prev.float().cpu(), x0.cpu()))
    _close(res[0][0], res[1][0], tol=1e-3, what="prev (fp16)")
    _close(res[0][1], res[1][1], tol=2e-5, what="x0")


@pytest.mark.cuda
def test_cuda_graph_capture_fast_loop():
    """One eager fast-mode step (the warm-up: tables, seed and step index on the device), then the next step captured
    in a CUDA graph and replayed for the rest of the chain: the device step index advances inside the graph, and the
    loop equals the eager one."""
    dev = torch.device("cuda")
    for cls, cfg in ((FastEulerAncestralDiscreteScheduler, {}),
                     (FastFlowMatchEulerDiscreteScheduler, dict(shift=3.0, stochastic_sampling=True))):
        x0 = torch.randn(SHAPE, device=dev)
        eager = cls(**cfg)
        eager.noise_seed = 3
        eager.set_timesteps(6, device=dev)
        x = x0.clone()
        for t in eager.timesteps:
            x = eager.step(torch.tanh(x), t, x).prev_sample
        s = cls(**cfg)
        s.noise_seed = 3
        s.set_timesteps(6, device=dev)
        static_x = x0.clone()
        static_x.copy_(s.step(torch.tanh(static_x), s.timesteps[0], static_x).prev_sample)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nxt = s.step(torch.tanh(static_x), s.timesteps[1], static_x).prev_sample
        for _ in range(5):
            g.replay()
            static_x.copy_(nxt)
        torch.testing.assert_close(static_x, x, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_kernel_parity_and_no_sync():
    """On a GPU: exact-mode loops through the fused kernel equal diffusers' (same CUDA generator draws), and the
    steady-state fast loop (scale_model_input + step) runs under torch.cuda.set_sync_debug_mode("error")."""
    dev = torch.device("cuda")
    for name, cfg, step_kw in (("euler", dict(SD), {}), ("euler", dict(SD), dict(s_churn=1.0)),
                               ("ancestral", dict(SD), {}), ("flow", dict(shift=3.0), {}),
                               ("flow", dict(shift=3.0, stochastic_sampling=True), {})):
        stock_cls, fast_cls = PAIRS[name]
        res = []
        for cls in (stock_cls, fast_cls):
            s = cls(**cfg)
            s.set_timesteps(8, device=dev)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)).to(dev)
            x = x * s.init_noise_sigma.to(dev) if hasattr(s, "init_noise_sigma") else x
            g = torch.Generator(device=dev).manual_seed(0)
            for t in s.timesteps:
                xin = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                x = s.step(torch.tanh(xin), t, x, generator=g, **step_kw).prev_sample
            res.append(x)
        _close(res[1], res[0], tol=2e-5, what=f"{name} {cfg} {step_kw}")
        s = fast_cls(**cfg)
        s.noise_seed = 1
        s.set_timesteps(8, device=dev)
        x = torch.randn(SHAPE, device=dev)
        for i, t in enumerate(s.timesteps):
            if i >= 1:                     # the first step uploads the tables (host-to-device copies)
                torch.cuda.set_sync_debug_mode("error")
            try:
                xin = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                x = s.step(torch.tanh(xin), t, x, **step_kw).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------------ fixes, errors
def test_fastrev_fixes_single_shift():
    N = 1000
    stock, fast = FlowMatchEulerDiscreteScheduler(shift=3.0), FastFlowMatchEulerDiscreteScheduler(shift=3.0)
    fixed = FastFlowMatchEulerDiscreteScheduler(shift=3.0, fastrev_fixes=True)
    for s in (stock, fast, fixed):
        s.set_timesteps(10)
    assert torch.equal(stock.sigmas, fast.sigmas)
    u = np.linspace(1.0, 1.0 / N, 10)
    want = 3.0 * u / (1 + 2.0 * u)
    assert np.allclose(fixed.sigmas[:-1].numpy(), want, rtol=1e-6)
    assert not np.allclose(stock.sigmas[:-1].numpy(), want, rtol=1e-3)       # diffusers shifts twice (#13243)
    assert fixed.sigmas[-2] < stock.sigmas[-2]
    for cls in (FastFlowMatchEulerDiscreteScheduler, FastEulerDiscreteScheduler, FastEulerAncestralDiscreteScheduler):
        with pytest.raises(TypeError, match="fastrev_fixes"):
            cls(fastrev_fixes="yes")
    back = FastFlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerDiscreteScheduler.from_config(
        fixed.config).config)                      # kept through diffusers' class (a hidden config key there)
    assert back.config.fastrev_fixes is True


def test_fastrev_fixes_euler_churn_draws_without_host_reads(monkeypatch):
    """Euler with a churn window, exact mode, fastrev_fixes=True: the generator is drawn at every step (no host read
    of the step index) and a step equals diffusers' fed the draw of its own step index; runs on the device path with
    every host read patched to raise."""
    cfg, kw, n = dict(SD), dict(s_churn=3.0, s_tmin=0.3, s_tmax=4.0), 8
    fast = FastEulerDiscreteScheduler(**cfg, fastrev_fixes=True)
    probe = EulerDiscreteScheduler(**cfg)
    probe.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(SHAPE, generator=g) for _ in range(n)]            # one draw per step, in order
    module = __import__(EulerDiscreteScheduler.__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: zs[_STEPPING[0].step_index])
    _check_loop(EulerDiscreteScheduler(**cfg), fast, n=n, step_kw=kw)
    monkeypatch.setattr(DE, "_HOST_DEVICES", ())
    s = FastEulerDiscreteScheduler(**cfg, fastrev_fixes=True)
    s.set_timesteps(n)
    x, g = torch.randn(SHAPE) * s.init_noise_sigma, torch.Generator().manual_seed(0)

    def boom(*a, **k):
        raise AssertionError("host read of a tensor value")
    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu"):
            m.setattr(torch.Tensor, attr, boom)
        for t in s.timesteps:
            x = s.step(torch.tanh(s.scale_model_input(x, t)), t, x, generator=g, **kw).prev_sample
    assert torch.isfinite(x).all()


def test_option_unknown_to_installed_diffusers_raises():
    """With an older diffusers whose class lacks a config key, a non-default value raises instead of being dropped."""
    class Old:
        def __init__(self, num_train_timesteps=1000, shift=1.0):
            pass
    F = FastFlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError, match="stochastic_sampling"):
        DE._stock_kwargs(Old, F, F(stochastic_sampling=True).config)
    assert DE._stock_kwargs(Old, F, F(shift=2.0, fastrev_fixes=True).config) == dict(num_train_timesteps=1000,
                                                                                     shift=2.0)


def test_bad_input_raises_clearly():
    s = FastEulerDiscreteScheduler()
    s.set_timesteps(3)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 0, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:, :2], s.timesteps[0], x)
    with pytest.raises(TypeError, match="s_churn"):
        s.step(x, s.timesteps[0], x, s_churn="1")
    with pytest.raises(IndexError, match="not one of"):
        FastEulerDiscreteScheduler().step(x, 123.25, x)
    with pytest.raises(ValueError, match=r"\[B\]"):
        s.step(x, s.timesteps[:3], x)
    for t in s.timesteps:
        s.step(x, t, x)
    with pytest.raises(IndexError, match="out of range"):
        s.step(x, s.timesteps[-1], x)
    with pytest.raises(ValueError, match="backend"):
        s.backend = "cuda"
        s.set_timesteps(3)
        s.step(x, s.timesteps[0], x)
    with pytest.raises(NotImplementedError, match="sample"):
        FastEulerAncestralDiscreteScheduler(prediction_type="sample").step(x, 999.0, x)
    with pytest.raises(ValueError, match="prediction_type"):
        FastEulerDiscreteScheduler(prediction_type="flow")


def test_device_timestep_not_in_chain_gives_nan(monkeypatch):
    monkeypatch.setattr(DE, "_HOST_DEVICES", ())
    s = FastEulerDiscreteScheduler()
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    out = s.step(x, torch.tensor(123.25), x).prev_sample
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------------------------ pipeline-shaped
@pytest.fixture(scope="module")
def tiny_models():
    """Tiny randomly initialised diffusers models built locally (no downloads): an SD3 transformer and an SDXL-style
    conditional UNet, with text embeddings for classifier-free guidance."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randn(4, 5, 16, generator=g)            # [uncond ×2, cond ×2]
    pooled = torch.randn(4, 8, generator=g)
    return transformer, unet, text, pooled


def _sd3_loop(scheduler, transformer, text, pooled, *, n, set_kw, generator=None, guidance=4.0):
    """The SD3 / Flux denoising loop: set_timesteps(device), CFG over a doubled batch, the timestep expanded to the
    batch for the model, step(noise_pred, t, latents, return_dict=False)[0]."""
    if "sigmas" in set_kw:
        scheduler.set_timesteps(device="cpu", **set_kw)
    else:
        scheduler.set_timesteps(n, device="cpu", **set_kw)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent_in = torch.cat([latents] * 2)
            pred = transformer(hidden_states=latent_in, timestep=t.expand(latent_in.shape[0]),
                               encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
            uncond, cond = pred.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, generator=generator,
                                     return_dict=False)[0]
    return latents


def _sdxl_loop(scheduler, unet, text, *, n, generator, guidance=5.0):
    """The SDXL denoising loop: latents × init_noise_sigma, CFG, scale_model_input on the doubled batch,
    step(..., generator=generator, return_dict=False)[0]."""
    scheduler.set_timesteps(n, device="cpu")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            pred = unet(latent_in, t, encoder_hidden_states=text, return_dict=False)[0]
            uncond, cond = pred.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, generator=generator,
                                     return_dict=False)[0]
    return latents


@pytest.mark.parametrize("cfg,set_kw", [
    (dict(shift=3.0), {}),                                                              # SD3
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),                   # Flux
     dict(sigmas=list(np.linspace(1.0, 1 / 6, 6)), mu=0.9)),
    (dict(shift=3.0, stochastic_sampling=True), {}),
], ids=["sd3", "flux", "stochastic"])
def test_pipeline_shaped_flow_matching_loop(tiny_models, cfg, set_kw):
    transformer, _, text, pooled = tiny_models
    ref = _sd3_loop(FlowMatchEulerDiscreteScheduler(**cfg), transformer, text, pooled, n=6, set_kw=set_kw,
                    generator=torch.Generator().manual_seed(0))
    ours = _sd3_loop(FastFlowMatchEulerDiscreteScheduler(**cfg), transformer, text, pooled, n=6, set_kw=set_kw,
                     generator=torch.Generator().manual_seed(0))
    _close(ours, ref, what="latents")


@pytest.mark.parametrize("stock_cls,fast_cls,step_kw", [
    (EulerDiscreteScheduler, FastEulerDiscreteScheduler, {}),
    (EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler, {}),
], ids=["euler", "euler-a"])
def test_pipeline_shaped_sdxl_loop(tiny_models, stock_cls, fast_cls, step_kw):
    _, unet, text, _ = tiny_models
    cfg = dict(SD, timestep_spacing="leading", steps_offset=1)                         # SDXL's scheduler config
    ref = _sdxl_loop(stock_cls(**cfg), unet, text, n=6, generator=torch.Generator().manual_seed(0))
    ours = _sdxl_loop(fast_cls.from_config(stock_cls(**cfg).config), unet, text, n=6,
                      generator=torch.Generator().manual_seed(0))
    _close(ours, ref, what="latents")
