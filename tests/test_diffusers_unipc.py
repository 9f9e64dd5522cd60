"""fastrev.diffusers_unipc: FastUniPCMultistepScheduler against diffusers' UniPCMultistepScheduler.

UniPC draws no noise, so the drop-in and diffusers differ only in rounding. Two bounds, on every step of whole loops
(free running, each step's prev_sample against diffusers' at the same step, relative to its max |value|):

* ``TOL64 = 1e-12``: the drop-in on float64 data against diffusers' own step run on float64 data with its float32
  sigmas viewed as float64 (``sigmas.double()``: diffusers' λ, h, φ recursion and ρ solves then run in float64). Both
  compute the same numbers from the same sigmas, so this isolates the coefficient rows: measured <= 6.3e-15; a
  coefficient off by 1e-9 fails it.
* ``TOL32 = 1e-5``: the drop-in on float32 data against diffusers in float32 and against diffusers in float64. float32
  rounding of each step's terms (~1e-7 relative) is amplified by x̂₀ = (x − σ·ε)/α (1/α ≈ 157 at the linear schedule's
  σ_max) and carried through up to 25 steps; diffusers also rounds its coefficients in float32 (λ differences over
  h ~ 0.4, the φ_k recursion ~ 1e-7/hᵏ): measured <= 2.9e-6 over the matrix below. A sign error or a coefficient off by
  1e-3 fails it.

The broad matrix runs the torch path (the CPU default); the fused Triton kernel runs under the interpreter on two
tiny configs; sync-freedom is checked by running the device code path on CPU tensors with every host read patched
to raise.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)

from fastrev import diffusers_unipc as DU  # noqa: E402
from fastrev.diffusers_unipc import FastUniPCMultistepScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL64 = 1e-12
TOL32 = 1e-5
SHAPE = (2, 3, 4, 4)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
WAN = dict(use_flow_sigmas=True, prediction_type="flow_prediction")

CONFIGS = [       # (name, config, steps, set_timesteps kwargs[, float32 bound when not TOL32])
    ("default", {}, 10, {}),
    ("order3", dict(solver_order=3), 25, {}),
    ("order1", dict(solver_order=1), 10, {}),
    ("bh1", dict(solver_type="bh1", final_sigmas_type="sigma_min"), 10, {}),
    ("bh1-order3", dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), 25, {}),
    ("eps-history-order3", dict(predict_x0=False, solver_order=3, final_sigmas_type="sigma_min"), 10, {}),
    ("eps-history-v-bh1", dict(predict_x0=False, prediction_type="v_prediction", solver_type="bh1",
                               final_sigmas_type="sigma_min"), 25, {}),
    # ε = (x − α·x̂₀)/σ from a sample prediction: a float32 cancellation divided by σ (0.03 at the last steps), for
    # diffusers too (its float32 loop is 3.2e-5 from its float64 one)
    ("eps-history-sample", dict(predict_x0=False, prediction_type="sample", final_sigmas_type="sigma_min"), 10, {},
     2e-4),
    ("v-karras", dict(prediction_type="v_prediction", use_karras_sigmas=True), 10, {}),
    ("karras-minmax", dict(SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, solver_order=3), 10, {}),
    ("threshold-sample-order3", dict(thresholding=True, prediction_type="sample", solver_order=3,
                                     sample_max_value=1.5), 10, {}),
    ("threshold-eps", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0), 10, {}),
    ("no-lower-order-final", dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3), 25, {}),
    ("disable-corrector", dict(disable_corrector=[0, 1, 4], solver_order=3), 10, {}),
    ("wan-flow", dict(WAN, flow_shift=3.0), 10, {}),
    ("wan-flow-order3", dict(WAN, flow_shift=5.0, solver_order=3), 25, {}),
    ("flow-karras", dict(WAN, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0), 10, {}),
    ("flow-dynamic", dict(WAN, use_dynamic_shifting=True), 10, dict(mu=0.8)),
    ("flow-terminal", dict(WAN, flow_shift=2.0, shift_terminal=0.1), 10, {}),
    ("flow-custom-sigmas", dict(WAN, flow_shift=3.0), None,
     dict(sigmas=np.array([1.0, 0.8, 0.55, 0.3, 0.12, 0.05, 0.01]))),
    ("flow-eps", dict(use_flow_sigmas=True, flow_shift=3.0), 10, {}),
    ("zero-snr-v", dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        prediction_type="v_prediction"), 25, {}),
    ("exponential-order3", dict(use_exponential_sigmas=True, solver_order=3), 10, {}),
    ("beta-sigmas", dict(use_beta_sigmas=True), 10, {}),
    ("sd-leading", dict(SD, timestep_spacing="leading", steps_offset=1), 25, {}),
    ("cosine-sample-order1", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", solver_order=1), 10,
     {}),
    ("trained-betas", dict(trained_betas=np.linspace(1e-4, 0.02, 100).tolist(), num_train_timesteps=100), 10, {}),
]


# ------------------------------------------------------------------------------------------------ helpers
def _model(shape, seed=3):
    """A fixed nonlinear 'denoiser' of (x, t), evaluated in x's dtype."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape[1], shape[1], generator=g) / math.sqrt(shape[1])
    bias = torch.randn(shape[1:], generator=g) * 0.1

    def f(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *(1,) * (x.dim() - 1))
        y = torch.tanh(torch.einsum("ij,bj...->bi...", W.to(x.dtype), x)) + bias.to(x.dtype) * (t / 1000) + 0.05
        return y.to(x.dtype)
    return f


def _set(sched, n, set_kw, f64=False):
    sched.set_timesteps(n, **set_kw) if n is not None else sched.set_timesteps(**set_kw)
    if f64:                                   # diffusers' coefficient arithmetic in float64 on its own sigmas
        sched.sigmas = sched.sigmas.double()


def _loop(sched, n=10, set_kw=None, dtype=torch.float32, f64=False, start=0, x=None, out_dtype=None, shape=SHAPE,
          model=None):
    """A pipeline-shaped loop from step index ``start``; returns every step's prev_sample."""
    _set(sched, n, dict(set_kw or {}), f64)
    model = model or _model(shape)
    if x is None:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    x = x.to(dtype)
    traj = []
    for t in sched.timesteps[start:]:
        x = sched.step(model(x, t).to(out_dtype or dtype), t, x).prev_sample
        traj.append(x)
    return traj


def _close(ours, ref, tol, what=""):
    """Every step: |ours − ref| <= tol·max|ref| (NaN never passes)."""
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what} step {i}"
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        assert err <= tol * scale, f"{what} step {i}: max err {err:.3e} vs {tol:.0e} x {scale:.3e}"


def _worst(ours, ref) -> float:
    return max((a.double() - b.double()).abs().max().item() / b.double().abs().max().item()
               for a, b in zip(ours, ref, strict=True))


def _check_config(cfg, n, set_kw, tol32=TOL32):
    stock, fast = UniPCMultistepScheduler(**cfg), FastUniPCMultistepScheduler(**cfg)
    _set(stock, n, set_kw)
    _set(fast, n, set_kw)
    assert torch.equal(fast.timesteps, stock.timesteps) and torch.equal(fast.sigmas, stock.sigmas)
    d64 = _loop(UniPCMultistepScheduler(**cfg), n, set_kw, torch.float64, f64=True)
    _close(_loop(FastUniPCMultistepScheduler(**cfg), n, set_kw, torch.float64), d64, TOL64, "float64 rows")
    ours = _loop(FastUniPCMultistepScheduler(**cfg), n, set_kw)
    _close(ours, _loop(UniPCMultistepScheduler(**cfg), n, set_kw), tol32, "float32 vs diffusers float32")
    _close(ours, d64, tol32, "float32 vs diffusers float64")


# ------------------------------------------------------------------------------------------------ whole loops
@pytest.mark.parametrize("case", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_whole_loops_match_diffusers(case):
    _check_config(*case[1:])


def test_img2img_start_and_lookup_start():
    """``set_begin_index`` + ``add_noise`` (img2img), and a first step found from its timestep (diffusers' test)."""
    for cfg in ({}, dict(solver_order=3), dict(WAN, flow_shift=3.0)):
        for begin in (True, False):
            res = {}
            for cls, dt in ((UniPCMultistepScheduler, torch.float64), (FastUniPCMultistepScheduler, torch.float64),
                            (FastUniPCMultistepScheduler, torch.float32)):
                s = cls(**cfg)
                _set(s, 10, {}, f64=cls is UniPCMultistepScheduler)
                if begin:
                    s.set_begin_index(4)
                x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dt)
                z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).to(dt)
                x = s.add_noise(x0, z, s.timesteps[4:5])
                model, traj = _model(SHAPE), []
                for t in s.timesteps[4:]:
                    x = s.step(model(x, t), t, x).prev_sample
                    traj.append(x)
                res[(cls, dt)] = traj
            ref = res[(UniPCMultistepScheduler, torch.float64)]
            _close(res[(FastUniPCMultistepScheduler, torch.float64)], ref, TOL64, f"{cfg} begin={begin}")
            _close(res[(FastUniPCMultistepScheduler, torch.float32)], ref, TOL32, f"{cfg} begin={begin} f32")


def test_timestep_not_in_chain_is_the_last_step_and_past_the_end_raises():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outs = []
    for cls in (UniPCMultistepScheduler, FastUniPCMultistepScheduler):
        s = cls()
        s.set_timesteps(25)
        outs.append(s.step(0.1 * x, 0, x).prev_sample)            # 0 is not a timestep: the last step index
        assert s.step_index == 25
    _close([outs[1]], [outs[0]], TOL32)
    s = FastUniPCMultistepScheduler()
    s.set_timesteps(3)
    for t in s.timesteps:
        s.step(x, t, x)
    with pytest.raises(IndexError, match="out of range"):
        s.step(x, s.timesteps[-1], x)


# ------------------------------------------------------------------------------------------------ limits
@pytest.mark.parametrize("cfg", [dict(solver_type="bh1"), dict(predict_x0=False),
                                 dict(predict_x0=False, solver_order=3), dict(WAN, flow_shift=3.0, solver_type="bh1")],
                         ids=["bh1", "eps-history", "eps-history-order3", "flow-bh1"])
def test_last_step_to_zero_sigma_is_the_limit_where_diffusers_gives_nan(cfg):
    """The last step to σ = 0 (order 1, lower_order_final): diffusers computes −inf·0 (bh1) or 0·inf (ε history) =
    NaN; fastrev gives the limit, which is diffusers' own step with σ_N = 1e-30 in float64."""
    n = 10
    assert torch.isnan(_loop(UniPCMultistepScheduler(**cfg), n)[-1]).all()
    ref = UniPCMultistepScheduler(**cfg)
    orig = ref.set_timesteps

    def tiny_final(*a, **k):
        orig(*a, **k)
        ref.sigmas = ref.sigmas.double()
        ref.sigmas[-1] = 1e-30
    ref.set_timesteps = tiny_final
    d64 = _loop(ref, n, dtype=torch.float64)
    _close(_loop(FastUniPCMultistepScheduler(**cfg), n, dtype=torch.float64), d64, TOL64, "float64")
    _close(_loop(FastUniPCMultistepScheduler(**cfg), n), d64, TOL32, "float32")


@pytest.mark.parametrize("order", [2, 3])
def test_no_finite_answer_raises_on_the_host_and_is_nan_on_the_device(monkeypatch, order):
    """Order >= 2 to σ = 0 (lower_order_final=False, final_sigmas_type="zero"): diffusers gives inf (order 2) or a
    singular solve (order 3); the drop-in raises a ValueError saying why, or gives NaN when the index is on the
    device."""
    cfg = dict(lower_order_final=False, solver_order=order)
    s = FastUniPCMultistepScheduler(**cfg)
    s.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps[:-1]:
        x = s.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="lower_order_final"):
        s.step(0.1 * x, s.timesteps[-1], x)
    monkeypatch.setattr(DU, "_HOST_DEVICES", ())
    s = FastUniPCMultistepScheduler(**cfg)
    s.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        x = s.step(0.1 * x, t, x).prev_sample
    assert torch.isnan(x).all()


# ------------------------------------------------------------------------------------------------ the bound bites
_MUTATION_CFG = dict(solver_order=3, disable_corrector=[5])


def _mutated(monkeypatch, col, fn):
    orig = DU.unipc_rows

    def rows(*a, **k):
        t, bad = orig(*a, **k)
        t = t.clone()
        t[:, DU._COL[col]] = fn(t[:, DU._COL[col]])
        return t, bad
    monkeypatch.setattr(DU, "unipc_rows", rows)


@pytest.mark.parametrize("col", ["A", "B", "C0", "C1", "D0", "D1", "D2", "D3", "AX0", "AX", "AH0", "AH1", "AH2", "AH3"])
def test_a_wrong_coefficient_fails_the_bounds(monkeypatch, col):
    """Every column the rows use: off by 1e-9 (relative) fails TOL64; off by 1e-3, or its sign flipped, fails TOL32."""
    n = 10
    d64 = _loop(UniPCMultistepScheduler(**_MUTATION_CFG), n, dtype=torch.float64, f64=True)
    _close(_loop(FastUniPCMultistepScheduler(**_MUTATION_CFG), n, dtype=torch.float64), d64, TOL64)
    for fn, dtype, tol in ((lambda c: c * (1 + 1e-9), torch.float64, TOL64),
                           (lambda c: c * (1 + 1e-3), torch.float32, TOL32),
                           (lambda c: -c, torch.float32, TOL32)):
        with monkeypatch.context() as m:
            _mutated(m, col, fn)
            got = _loop(FastUniPCMultistepScheduler(**_MUTATION_CFG), n, dtype=dtype)
        bad = any(not torch.isfinite(g).all() for g in got)
        assert bad or _worst(got, d64) > tol, f"{col}: a perturbed column passes the bound"


# ------------------------------------------------------------------------------------------------ surface
def test_same_config_signature_defaults_and_api():
    ps = inspect.signature(UniPCMultistepScheduler.__init__).parameters
    pf = inspect.signature(FastUniPCMultistepScheduler.__init__).parameters
    assert set(pf) - set(ps) == {"fastrev_fixes"} and pf["fastrev_fixes"].default is False
    for k, p in ps.items():
        assert k in pf and pf[k].default == p.default, k
    stock, fast = UniPCMultistepScheduler(), FastUniPCMultistepScheduler()
    assert set(fast.compatibles) == set(stock.compatibles)
    assert FastUniPCMultistepScheduler.order == UniPCMultistepScheduler.order == 1
    for m in ("step", "set_timesteps", "add_noise", "scale_model_input", "set_begin_index"):
        assert list(inspect.signature(getattr(FastUniPCMultistepScheduler, m)).parameters) == \
            list(inspect.signature(getattr(UniPCMultistepScheduler, m)).parameters), m
    assert fast.init_noise_sigma == stock.init_noise_sigma == 1.0
    assert len(fast) == len(stock) == 1000
    assert fast.step_index is None and fast.begin_index is None
    fast.set_begin_index(3)
    assert fast.begin_index == 3
    x = torch.randn(SHAPE)
    assert fast.scale_model_input(x, 999) is x
    fast.set_timesteps(7, device="cpu")
    assert fast.timesteps.dtype == torch.int64 and fast.num_inference_steps == 7 and fast.begin_index is None
    assert fast.model_outputs == [None, None] and fast.last_sample is None and fast.lower_order_nums == 0
    r = fast.step(x, fast.timesteps[0], x, return_dict=False)
    assert isinstance(r, tuple) and len(r) == 1 and r[0].shape == x.shape
    assert FastUniPCMultistepScheduler(solver_type="midpoint").config.solver_type == "bh2"   # as diffusers


def test_from_config_both_ways_and_save_load(tmp_path):
    cfg = dict(SD, solver_order=3, timestep_spacing="trailing", prediction_type="v_prediction")
    stock = UniPCMultistepScheduler(**cfg)
    fast = FastUniPCMultistepScheduler.from_config(stock.config)
    def own(c):
        return {k: v for k, v in c.items() if k not in ("fastrev_fixes", "_use_default_values")}
    assert own(fast.config) == own(stock.config)
    back = UniPCMultistepScheduler.from_config(fast.config)
    assert own(back.config) == own(stock.config)
    dpm = DPMSolverMultistepScheduler.from_config(fast.config)
    assert FastUniPCMultistepScheduler.from_config(dpm.config).config.solver_order == 3
    fixed = FastUniPCMultistepScheduler(fastrev_fixes=True)
    assert FastUniPCMultistepScheduler.from_config(
        UniPCMultistepScheduler.from_config(fixed.config).config).config.fastrev_fixes is True
    fixed.save_config(tmp_path)
    loaded = FastUniPCMultistepScheduler.from_pretrained(tmp_path)
    assert loaded.config.fastrev_fixes is True and loaded.config.solver_order == 2


def test_history_views_and_instance_attributes_follow_diffusers():
    """``model_outputs`` / ``last_sample`` / ``lower_order_nums`` hold diffusers' values mid-chain; assigning
    ``model_outputs`` mid-chain (diffusers' tests do) and changing ``disable_corrector`` / ``predict_x0`` on the
    instance act as in diffusers."""
    cfg = dict(solver_order=3, final_sigmas_type="sigma_min")
    model = _model(SHAPE)
    ss = [UniPCMultistepScheduler(**cfg), FastUniPCMultistepScheduler(**cfg)]
    xs = []
    for s in ss:
        _set(s, 10, {}, f64=isinstance(s, UniPCMultistepScheduler))
        s.disable_corrector = [6]
        xs.append(torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    for i, t in enumerate(ss[0].timesteps):
        if i == 4:
            a, b = ss[0].model_outputs, ss[1].model_outputs
            _close(b, a, TOL64, "model_outputs")
            _close([ss[1].last_sample], [ss[0].last_sample], TOL64, "last_sample")
            assert ss[0].lower_order_nums == ss[1].lower_order_nums == 3
            new = [m * 0.9 + 0.01 for m in a]
            for s in ss:
                s.model_outputs = [m.clone() for m in new]
        for k, s in enumerate(ss):
            xs[k] = s.step(model(xs[k], t), t, xs[k]).prev_sample
        _close([xs[1]], [xs[0]], TOL64, f"step {i}")
    for s in ss:
        s.predict_x0 = False
    for s in ss:
        _set(s, 6, {}, f64=isinstance(s, UniPCMultistepScheduler))
    _close(_loop(ss[1], 6, {}, torch.float64), _loop(ss[0], 6, {}, torch.float64, f64=True), TOL64, "predict_x0")


def test_history_edited_mid_chain_like_chronoedit():
    """ChronoEdit's temporal-reasoning switch: mid-chain, the latents and every held history entry are sliced to
    fewer frames (``model_outputs[j] = ...[:, :, [0, -1]]``, ``last_sample = ...``) and the loop goes on."""
    shape = (1, 2, 3, 4, 4)
    cfg = dict(WAN, flow_shift=3.0, solver_order=3)
    res = []
    for cls in (UniPCMultistepScheduler, FastUniPCMultistepScheduler):
        s = cls(**cfg)
        _set(s, 8, {}, f64=cls is UniPCMultistepScheduler)

        def model(x, t):
            return torch.tanh(1.3 * x + 0.2) - 0.1 * x + float(t) / 2000
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        traj = []
        for i, t in enumerate(s.timesteps):
            if i == 4:
                x = x[:, :, [0, -1]]
                for j in range(len(s.model_outputs)):
                    if s.model_outputs[j] is not None and s.model_outputs[j].shape[-3] != x.shape[-3]:
                        s.model_outputs[j] = s.model_outputs[j][:, :, [0, -1]]
                if s.last_sample is not None:
                    s.last_sample = s.last_sample[:, :, [0, -1]]
            x = s.step(model(x, t), t, x).prev_sample
            traj.append(x)
        res.append(traj)
    _close(res[1], res[0], TOL64)


def test_solver_p_runs_diffusers_step():
    """``solver_p`` (another scheduler as the predictor): diffusers' eager step, the same numbers."""
    outs = []
    for cls in (UniPCMultistepScheduler, FastUniPCMultistepScheduler):
        s = cls(solver_p=DDIMScheduler())
        outs.append(_loop(s, 8))
        assert s.step_index == 8
    _close(outs[1], outs[0], 0.0)


# ------------------------------------------------------------------------------------------------ per-sample, dtypes
def test_per_sample_timesteps():
    """A [B] timestep tensor: sample 0 runs the chain from step 0, sample 1 from step 3 (each against diffusers
    stepping it alone); the history is shared by the batch, the step index is not advanced."""
    cfg = dict(solver_order=3)
    n, calls = 10, 6
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = _model(SHAPE)
    fast = FastUniPCMultistepScheduler(**cfg)
    fast.set_timesteps(n)
    refs = []
    for b, begin in enumerate((0, 3)):
        s = UniPCMultistepScheduler(**cfg)
        _set(s, n, {}, f64=True)
        s.set_begin_index(begin)
        xb, traj = x[b:b + 1], []
        for t in s.timesteps[begin:begin + calls]:
            xb = s.step(model(xb, t), t, xb).prev_sample
            traj.append(xb)
        refs.append(traj)
    xf = x.clone()
    for c in range(calls):
        t = torch.stack([fast.timesteps[c], fast.timesteps[c + 3]])
        xf = fast.step(model(xf, t), t, xf).prev_sample
        for b in range(2):
            _close([xf[b:b + 1]], [refs[b][c]], TOL64, f"sample {b} call {c}")
    assert fast.step_index is None
    with pytest.raises(ValueError, match=r"\[B\] tensor"):
        fast.step(xf, fast.timesteps[:3], xf)


def test_dtypes():
    """float16 storage (math in float32: closer to diffusers' float64 result than diffusers' own float16 loop), and a
    float16 model output with a float32 sample (prev float32, as diffusers; diffusers computes σ·out in float16 there,
    2.7e-4 off its float64 result, the drop-in in float32). The model outputs are fixed float16
    tensors (independent of x: one float16 rounding of an output that depends on x would flip between two loops that
    differ by float32 rounding, and be amplified by 1/α)."""
    cfg = dict(solver_order=3, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(7)
    fixed = {int(t): torch.randn(SHAPE, generator=g).half() for t in _timesteps(cfg, 10)}

    def model(x, t):
        return fixed[int(t)]
    d64 = _loop(UniPCMultistepScheduler(**cfg), 10, dtype=torch.float64, f64=True, model=model)
    ours16 = _loop(FastUniPCMultistepScheduler(**cfg), 10, dtype=torch.float16, model=model)
    theirs16 = _loop(UniPCMultistepScheduler(**cfg), 10, dtype=torch.float16, model=model)
    assert all(o.dtype == torch.float16 for o in ours16)
    assert _worst(ours16, d64) < 3e-3 and _worst(ours16, d64) <= _worst(theirs16, d64)
    mixed = _loop(FastUniPCMultistepScheduler(**cfg), 10, out_dtype=torch.float16, model=model)
    assert all(o.dtype == torch.float32 for o in mixed)
    _close(mixed, d64, TOL32, "mixed vs float64")
    _close(mixed, _loop(UniPCMultistepScheduler(**cfg), 10, out_dtype=torch.float16, model=model), 1e-3, "mixed")


def _timesteps(cfg, n):
    s = UniPCMultistepScheduler(**cfg)
    s.set_timesteps(n)
    return s.timesteps


# ------------------------------------------------------------------------------------------------ no host sync
def test_device_path_never_reads_back(monkeypatch):
    """The device code path (CPU tensors treated as device tensors) never reads a tensor value on the host: a loop
    with every host read patched to raise runs through and equals the host path."""
    for cfg in (dict(solver_order=3), dict(WAN, flow_shift=3.0, thresholding=True)):
        ref = _loop(FastUniPCMultistepScheduler(**cfg), 8)
        monkeypatch.setattr(DU, "_HOST_DEVICES", ())
        s = FastUniPCMultistepScheduler(**cfg)
        s.set_timesteps(8)
        ts = s.timesteps.clone()
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
        model = _model(SHAPE)
        traj = []

        def boom(*a, **k):
            raise AssertionError("host read of a tensor value")
        for i in range(8):
            out = model(x, ts[i])
            with monkeypatch.context() as m:
                for attr in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu"):
                    m.setattr(torch.Tensor, attr, boom)
                x = s.step(out, ts[i], x).prev_sample
            traj.append(x)
        monkeypatch.setattr(DU, "_HOST_DEVICES", ("cpu",))
        _close(traj, ref, 0.0, str(cfg))
        assert s.step_index == 8


# ------------------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("cfg", [dict(solver_order=3, thresholding=True, sample_max_value=1.2, disable_corrector=[2]),
                                 dict(predict_x0=False, prediction_type="v_prediction", solver_type="bh1",
                                      final_sigmas_type="sigma_min")], ids=["order3-threshold", "eps-history-bh1"])
def test_triton_kernel_matches_torch_path_and_diffusers(monkeypatch, kernel_device, cfg):
    """The fused kernel (the interpreter on CPU) on a short loop: every output buffer (prev, the x̂₀ history, the
    corrected sample) poisoned with NaN before each pass; equal to the torch path to float32 rounding and to diffusers
    (float64) to TOL32."""
    from fastrev import ops
    poison = lambda like: torch.full_like(like, float("nan"), memory_format=torch.contiguous_format)  # noqa: E731
    monkeypatch.setattr(ops, "_alloc", poison)
    monkeypatch.setattr(DU, "_new_buffer", poison)
    shape, n = (2, 2, 4, 4), 6
    model = _model(shape)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    d64 = _loop(UniPCMultistepScheduler(**cfg), n, dtype=torch.float64, f64=True, x=x0, shape=shape)
    res = {}
    for backend in ("triton", "torch"):
        s = FastUniPCMultistepScheduler(**cfg)
        s.backend = backend
        s.set_timesteps(n, device=kernel_device)
        x, traj = x0.to(kernel_device), []
        for t in s.timesteps:
            if s._ring is not None:
                s._ring[s._calls % len(s._ring)].fill_(float("nan"))
                s._last[s._calls % 2].fill_(float("nan"))
            x = s.step(model(x.cpu(), t.cpu()).to(kernel_device), t, x).prev_sample
            traj.append(x.cpu())
        res[backend] = traj
    _close(res["triton"], res["torch"], 1e-6, "triton vs torch")
    _close(res["triton"], d64, TOL32, "triton vs diffusers")


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        FastUniPCMultistepScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="solver_order"):
        FastUniPCMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="solver_order"):
        FastUniPCMultistepScheduler(solver_order=0)
    with pytest.raises(TypeError, match="fastrev_fixes"):
        FastUniPCMultistepScheduler(fastrev_fixes="yes")
    with pytest.raises(NotImplementedError):
        FastUniPCMultistepScheduler(solver_type="bh3")
    x = torch.randn(SHAPE)
    s = FastUniPCMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:1], s.timesteps[0], x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        s.step(x.numpy(), s.timesteps[0], x)
    s.backend = "cuda"
    with pytest.raises(ValueError, match="backend"):
        s.step(x, s.timesteps[0], x)
    s.backend = "auto"
    s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="does not match the history"):
        s.step(x[:1], s.timesteps[1], x[:1])
    e = FastUniPCMultistepScheduler(**WAN, predict_x0=False)
    e.set_timesteps(5)
    with pytest.raises(ValueError, match="flow_prediction"):
        e.step(x, e.timesteps[0], x)


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
def test_cuda_whole_loop_graph_parity_and_no_sync():
    """On a GPU: loops through the fused kernel equal diffusers' to TOL32; a whole loop (warmed up once: tables,
    buffers, kernels) runs under torch.cuda.set_sync_debug_mode("error") and captured in one CUDA graph, whose replay
    after set_timesteps equals the eager loop."""
    dev = torch.device("cuda")
    for cfg in (dict(solver_order=3), dict(WAN, flow_shift=3.0), dict(predict_x0=False, final_sigmas_type="sigma_min")):
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)).to(dev)

        def loop(s, x):
            for t in s.timesteps:
                x = s.step(torch.tanh(x) + 0.1, t, x).prev_sample
            return x
        stock = UniPCMultistepScheduler(**cfg)
        stock.set_timesteps(8, device=dev)
        ref = loop(stock, x0.clone())
        s = FastUniPCMultistepScheduler(**cfg)
        s.set_timesteps(8, device=dev)
        eager = loop(s, x0.clone())
        _close([eager], [ref], TOL32, f"kernel {cfg}")
        s.set_timesteps(8, device=dev)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = loop(s, x0.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _close([again], [eager], 0.0, "second chain")
        s.set_timesteps(8, device=dev)
        static_x = x0.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = loop(s, static_x)
        s.set_timesteps(8, device=dev)
        g.replay()
        torch.cuda.synchronize()
        _close([out], [eager], 0.0, "graph replay")
