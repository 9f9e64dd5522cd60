"""hypothesis fuzzing of the fused kernel (interpreter on CPU) against the float64 reference.

Random shapes, batch sizes, options, dtypes, layouts, noise sources, per-sample timesteps and classifier-free
guidance; the example count is the hypothesis profile's (conftest: "ci" 600, "dev" 60, env
FASTREV_HYPOTHESIS_PROFILE), no deadline. Every failure
the fuzzer ever found stays below as an ``@example``. The tolerance is the per-element, per-prediction-type bound of
tests/_bounds.py (the one test_kernel.py uses), and ``test_bound_rejects_a_wrong_step`` shows that it can fail.
"""

import pytest
import torch
from _bounds import sigma64, step_terms, worst_ratio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastrev.ops as ops
from fastrev import Schedule, StepOutput, ddim_step, ddpm_step, noise, tables

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCHEDULES = [Schedule.linear(), Schedule.cosine(200), Schedule.scaled_linear().respace(range(0, 1000, 50)),
             Schedule.linear().rescale_zero_terminal_snr()]


@st.composite
def cases(draw):
    sched_i = draw(st.integers(0, len(SCHEDULES) - 1))
    s = SCHEDULES[sched_i]
    kind = draw(st.sampled_from(["ddpm", "ddim"]))
    pred = draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))
    var = draw(st.sampled_from(["fixed_small", "fixed_large", "learned", "learned_range"])) if kind == "ddpm" \
        else "fixed_small"
    B = draw(st.integers(1, 5))
    C = draw(st.integers(1, 4))
    rest = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=2)))
    t = draw(st.lists(st.integers(0, s.num_timesteps - 1), min_size=B, max_size=B))
    if pred == "epsilon" and float(s.alpha_bars[-1]) == 0:
        t = [min(v, s.num_timesteps - 2) for v in t]          # ε-prediction is undefined at ᾱ = 0 (a ValueError)
    return dict(
        sched=sched_i, kind=kind, pred=pred, var=var, shape=(B, C) + rest, t=t,
        clip=draw(st.sampled_from(["none", "clip", "threshold"])), clip_range=draw(st.sampled_from([0.5, 1.0, 3.0])),
        eta=draw(st.sampled_from([0.0, 0.3, 1.0])), use_clipped=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16])),
        noise=draw(st.sampled_from(["tensor", "seed"])), seed=draw(st.integers(0, 2**64 - 1)),
        offset=draw(st.integers(0, 10**6)), layout=draw(st.sampled_from(["contiguous", "batch_strided",
                                                                         "channels_last"])),
        in_place=draw(st.booleans()), data_seed=draw(st.integers(0, 2**31 - 1)),
        guidance=draw(st.sampled_from([None, None, 0.0, 1.0, 3.5, 7.5])),
    )


def _make(shape, layout, g, dtype):
    if layout == "batch_strided":
        big = torch.randn((2 * shape[0],) + shape[1:], generator=g)
        x = big[::2]
    else:
        x = torch.randn(shape, generator=g)
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEV, dtype)


def _table64(c, s):
    """The float64 table of the case's step (what the kernel gathers, before the float32 cast)."""
    clip = c["clip"] != "none"
    if c["kind"] == "ddpm":
        return tables.ddpm_table(s, c["pred"], c["var"], clip, c["clip_range"])
    return tables.ddim_table(s, c["pred"], c["eta"], clip, c["clip_range"], c["use_clipped"])


def _run_case(c, backend="triton", table=None):
    """(inputs, got, want) of a case: the step on ``backend`` (or, with ``table``, the kernel on that float32 table)
    and the float64 reference."""
    s = SCHEDULES[c["sched"]]
    g = torch.Generator().manual_seed(c["data_seed"])
    x = _make(c["shape"], c["layout"], g, c["dtype"]) * 2
    C = c["shape"][1]
    learned = c["var"].startswith("learned")
    oshape = (c["shape"][0], C * (2 if learned else 1)) + c["shape"][2:]
    o = _make(oshape, c["layout"], g, c["dtype"])
    if c["var"] == "learned_range":
        o[:, C:] = o[:, C:].clamp(-1, 1)
    elif c["var"] == "learned":
        o[:, C:] = o[:, C:] - 5
    t = torch.tensor(c["t"], device=DEV)
    kw = dict(prediction_type=c["pred"], clip_sample=c["clip"] == "clip", clip_sample_range=c["clip_range"],
              thresholding=c["clip"] == "threshold", sample_max_value=c["clip_range"] + 1.0,
              sample_offset=c["offset"])
    if c["kind"] == "ddpm":
        fn, kw = ddpm_step, {**kw, "variance_type": c["var"]}
    else:
        fn, kw = ddim_step, {**kw, "eta": c["eta"], "use_clipped_model_output": c["use_clipped"]}
    if c["noise"] == "tensor":
        kw["noise"] = _make(c["shape"], c["layout"], g, c["dtype"])
        z = kw["noise"]
    else:
        kw["seed"] = c["seed"]
        z = noise.noise_like(x, c["seed"], t, c["offset"])
    o_bound = o                 # what the bound reads as the model output (terms, variance channels)
    if c.get("guidance") is not None:   # classifier-free guidance: o is the unconditional half; draw the conditional
        w = c["guidance"]
        oc = _make(oshape, c["layout"], g, c["dtype"])
        if learned:
            oc[:, C:] = o[:, C:].flip(0)          # valid variance values, other than the unconditional half's
        kw["guidance_scale"] = w
        o = torch.cat([o, oc])
        o_bound = torch.cat([((1 - w) * o[: x.shape[0], :C].double()).abs() + (w * oc[:, :C].double()).abs(),
                             oc[:, C:].double()], 1)
    want = fn(o.double(), t, x.double(), s, backend="reference",
              **{**kw, "noise": kw["noise"].double() if "noise" in kw else None})
    xin = x.clone() if c["in_place"] else x
    if table is None:
        got = fn(o, t, xin, s, backend=backend, out=xin if c["in_place"] else None, **kw)
    else:
        got = ops.fused_step(table, t, x, o, learned=learned, variance_type=c["var"], clip=c["clip"] != "none",
                             thresholding=c["clip"] == "threshold", sample_max_value=c["clip_range"] + 1.0,
                             noise=kw.get("noise"), seed=None if "seed" not in kw else noise.as_seed_tensor(
                                 c["seed"], DEV), sample_offset=c["offset"], backend="triton")
    return (x, o_bound, z, t, xin), got, want


def _worst(c, inputs, got, want):
    """{output: worst error / bound} with the shared per-element bound (tests/_bounds.py) of the case's table;
    the reference in the storage dtype (fp16 overflows to ±inf near ᾱ → 0 exactly like the kernel)."""
    x, o, z, t, _ = inputs
    table = _table64(c, SCHEDULES[c["sched"]])
    stochastic = c["kind"] == "ddpm" or c["eta"] > 0
    var_mode = tables.VAR_MODES[c["var"]] if c["var"].startswith("learned") else tables.VAR_FIXED
    sigma = sigma64(table, t, o[:, x.shape[1]:] if var_mode != tables.VAR_FIXED else None, var_mode,
                    x.dim())
    x0_terms, prev_terms = step_terms(table, t, x, o, z if stochastic else None, sigma=sigma)
    if c["dtype"] == torch.float32:
        tol = dict(rtol=2e-6)
    else:                                   # fp16 storage: the same fp32 bound + one ulp between the two roundings
        tol = dict(rtol=2e-6, round_rtol=2.0**-10, atol=2.0**-24)
    return {name: worst_ratio(a, b.to(c["dtype"]), terms, **tol)
            for name, a, b, terms in (("prev", got.prev_sample, want.prev_sample, prev_terms),
                                      ("x0", got.pred_original_sample, want.pred_original_sample, x0_terms))}


@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(c=cases())
# found by the fuzzer in CI: fp16 x̂₀ ≈ 81062 at ᾱ ≈ 4e-9 overflows to inf (correctly); the test compared it with
# the float64 reference instead of the reference in the storage dtype
@example(c=dict(sched=3, kind="ddim", pred="epsilon", var="fixed_small", shape=(1, 2), t=[998], clip="none",
                clip_range=0.5, eta=0.0, use_clipped=False, dtype=torch.float16, noise="tensor", seed=0, offset=0,
                layout="contiguous", in_place=False, data_seed=0, guidance=None))
@example(c=dict(sched=3, kind="ddim", pred="v_prediction", var="fixed_small", shape=(2, 1), t=[19 * 0 + 999, 0],
                clip="threshold", clip_range=1.0, eta=1.0, use_clipped=True, dtype=torch.float32, noise="seed",
                seed=2**64 - 1, offset=0, layout="contiguous", in_place=True, data_seed=0, guidance=None))
def test_kernel_matches_reference(c):
    inputs, got, want = _run_case(c)
    x, xin = inputs[0], inputs[4]
    if c["in_place"]:
        assert got.prev_sample is xin
    assert got.prev_sample.dtype == c["dtype"] and got.prev_sample.shape == x.shape
    worst = _worst(c, inputs, got, want)
    assert max(worst.values()) <= 1.0, worst


# zero-terminal-SNR v-prediction at the last step: the case where the old bound (scaled by 1/√ᾱ of the batch's worst
# t, whatever the prediction type) was about 16 against |x_{t−1}| ≤ 4.6
ZT_V = dict(sched=3, kind="ddpm", pred="v_prediction", var="fixed_small", shape=(2, 3, 7), t=[999, 500], clip="none",
            clip_range=1.0, eta=0.0, use_clipped=False, dtype=torch.float32, noise="tensor", seed=0, offset=0,
            layout="contiguous", in_place=False, data_seed=1, guidance=None)


@pytest.mark.parametrize("c", [ZT_V, {**ZT_V, "kind": "ddim", "eta": 1.0, "noise": "seed", "seed": 5},
                               {**ZT_V, "sched": 0, "pred": "epsilon", "var": "learned_range", "clip": "clip"},
                               {**ZT_V, "sched": 1, "t": [3, 150], "pred": "sample", "dtype": torch.float16}])
def test_bound_rejects_a_wrong_step(c):
    """The fuzz check can fail: +0.5 on one element, and the kernel run on a table with one coefficient off by 1e-3
    (relative), are both rejected where the correct step passes."""
    inputs, got, want = _run_case(c)
    assert max(_worst(c, inputs, got, want).values()) <= 1.0
    bad = got.prev_sample.clone()
    bad[0, 0, 0] += 0.5
    assert _worst(c, inputs, StepOutput(bad, got.pred_original_sample), want)["prev"] > 1.0
    table64 = _table64(c, SCHEDULES[c["sched"]])
    rows = torch.tensor(c["t"])
    mutated = 0
    for col in ("A", "B", "C0", "C1", "C2", "SIGMA"):
        if not table64[rows, tables.COL[col]].ne(0).all():        # a column the step does not use at these rows
            continue
        table = table64.clone()
        table[:, tables.COL[col]] *= 1 + 1e-3
        _, got_bad, _ = _run_case(c, table=table.float().contiguous())
        assert max(_worst(c, inputs, got_bad, want).values()) > 1.0, col
        mutated += 1
    assert mutated >= 3


def test_nan_and_inf_propagate_like_pytorch():
    s = SCHEDULES[0]
    x = torch.randn(3, 4, 8, device=DEV)
    o = torch.randn_like(x)
    x[0, 0, 0] = float("nan")
    o[1, 2, 3] = float("inf")
    for backend in ("triton", "reference"):
        r = ddpm_step(o, torch.tensor([5, 5, 5], device=DEV), x, s, seed=0, clip_sample=True, backend=backend)
        assert torch.isnan(r.prev_sample[0, 0, 0]) and torch.isnan(r.pred_original_sample[0, 0, 0])
        assert not torch.isnan(r.prev_sample[2]).any()            # other samples untouched
        assert torch.isfinite(r.pred_original_sample[1, 2, 3])    # clipped inf is finite, as torch.clamp gives
    r = ddpm_step(o, torch.tensor([5, 5, 5], device=DEV), x, s, seed=0, backend="triton")
    assert torch.isinf(r.pred_original_sample[1, 2, 3])


def test_zero_terminal_snr_epsilon_at_last_step_is_an_error():
    s = SCHEDULES[3]
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ddpm_step(x, s.num_timesteps - 1, x, s, seed=0)
    ddpm_step(x, s.num_timesteps - 1, x, s, seed=0, prediction_type="v_prediction")      # fine
    prev = ops.set_device_checks(True)
    try:
        with pytest.raises(ValueError, match="zero terminal SNR"):
            ddpm_step(x.to(DEV), torch.tensor([0, s.num_timesteps - 1], device=DEV), x.to(DEV), s, seed=0)
    finally:
        ops.set_device_checks(prev)
