"""The fused Triton step against the float64 reference.

Runs on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1), on the GPU when one is present.
Every comparison uses fresh random inputs; every kernel output is poisoned with NaN before the launch.

Tolerance (tests/_bounds.py, shared with the fuzz test): the fp32 rounding error of a sum is bounded by the sum of
the magnitudes of its terms, so |kernel − reference| ≤ 1e-6 · (|ref| + Σ|terms|) element-wise, the terms taken from
the float64 table (C0·(|A x| + |B out|), |C1 x|, |C2 out|, |σ z|). fp16 storage: the same against the reference on
the fp16-rounded inputs, plus one fp16 rounding of the output (2⁻¹¹ relative).
"""

import os
import subprocess
import sys

import pytest
import torch
from _bounds import check, step_terms

import fastrev.ops as ops
from fastrev import Schedule, ddim_step, ddpm_step, noise, tables
from fastrev.kernels import reverse_step as K

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
S = Schedule.linear()
SHAPES = {1: (1, 1), 1023: (3, 341), 4097: (17, 241)}          # (C, rest): N = C·rest elements per sample


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the op allocates for the kernel starts as NaN: an element the kernel skips cannot pass."""
    monkeypatch.setattr(ops, "_alloc", lambda like: torch.full_like(like, float("nan"),
                                                                      memory_format=torch.contiguous_format))


def _inputs(B, n, var="fixed_small", dtype=torch.float32):
    C, rest = SHAPES[n]
    x = torch.randn(B, C, rest, device=DEV, dtype=dtype) * 1.5
    o = torch.randn(B, 2 * C if var.startswith("learned") else C, rest, device=DEV, dtype=dtype)
    if var == "learned_range":
        o[:, C:].uniform_(-1, 1)
    elif var == "learned":
        o[:, C:] = o[:, C:] * 0.5 - 6
    z = torch.randn(B, C, rest, device=DEV, dtype=dtype)
    t = torch.randint(0, S.num_timesteps, (B,), device=DEV)
    t[0], t[-1] = 0, S.num_timesteps - 1
    return x, o, z, t


def _bound(table64, t, x, o, z, var_sigma=None):
    """(x̂₀ terms, x_{t−1} terms) per element, from the float64 table (tests/_bounds.py)."""
    return step_terms(table64, t, x, o, z, sigma=var_sigma)


def _check(got, want, terms, rtol=1e-6):
    check(got, want, terms, rtol)


@pytest.mark.parametrize("n", [1, 1023, 4097])
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
@pytest.mark.parametrize("var", ["fixed_small", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_ddpm_matrix(pred, var, clip, n):
    B = 3
    x, o, z, t = _inputs(B, n, var)
    kw = dict(prediction_type=pred, variance_type=var, clip_sample=clip == "clip", thresholding=clip == "threshold",
              dynamic_thresholding_ratio=0.9, sample_max_value=3.0, noise=z)
    got = ddpm_step(o, t, x, S, backend="triton", **kw)
    want = ddpm_step(o.double(), t, x.double(), S, backend="reference", **kw)
    table = tables.ddpm_table(S, pred, var, clip != "none")
    var_sigma = None
    if var.startswith("learned"):
        var_sigma = (want.prev_sample - ddpm_step(o.double(), t, x.double(), S, backend="reference",
                                                  **{**kw, "noise": torch.zeros_like(z)}).prev_sample).abs() \
            / z.double().abs().clamp_min(1e-30)
    x0_terms, prev_terms = _bound(table, t, x, o, z, var_sigma)
    _check(got.pred_original_sample, want.pred_original_sample, x0_terms)
    _check(got.prev_sample, want.prev_sample, prev_terms)


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_ddim_matrix(pred, eta, clip, use_clipped):
    x, o, z, t = _inputs(4, 1023)
    kw = dict(eta=eta, prediction_type=pred, clip_sample=clip == "clip", thresholding=clip == "threshold",
              use_clipped_model_output=use_clipped, noise=z)
    got = ddim_step(o, t, x, S, backend="triton", **kw)
    want = ddim_step(o.double(), t, x.double(), S, backend="reference", **kw)
    table = tables.ddim_table(S, pred, eta, clip != "none", 1.0, use_clipped)
    x0_terms, prev_terms = _bound(table, t, x, o, z)
    _check(got.pred_original_sample, want.pred_original_sample, x0_terms)
    _check(got.prev_sample, want.prev_sample, prev_terms)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_in_kernel_noise_is_the_reference_stream(kind):
    x, o, _, t = _inputs(5, 1023)
    fn = ddpm_step if kind == "ddpm" else ddim_step
    kw = dict(seed=2**40 + 123, sample_offset=11, **({} if kind == "ddpm" else dict(eta=1.0)))
    got = fn(o, t, x, S, backend="triton", **kw).prev_sample
    want = fn(o, t, x, S, backend="reference", **kw).prev_sample
    z = noise.noise_like(x, 2**40 + 123, t, 11).double()
    table = tables.ddpm_table(S) if kind == "ddpm" else tables.ddim_table(S, eta=1.0)
    _check(got, want, _bound(table, t, x, o, z)[1])


def _kernel_noise(B, N, seed, step, sample_offset=0, dtype=torch.float32):
    """z straight out of the kernel: a one-row table with only SIGMA = 1 makes x_{t−1} = z."""
    table = torch.zeros(1, tables.NCOL, dtype=torch.float32, device=DEV)
    table[0, tables.COL["SIGMA"]] = 1.0
    x = torch.zeros(B, N, device=DEV, dtype=dtype)
    prev = torch.full_like(x, float("nan"))
    K.reverse_step(K.StepTensors(x, x, table, torch.zeros(B, dtype=torch.int64, device=DEV), prev,
                                 step=torch.full((B,), step, dtype=torch.int64, device=DEV),
                                 seed=noise.as_seed_tensor(seed, DEV)),
                   sample_offset=sample_offset, noise_mode=K.NOISE_PHILOX)
    return prev


def test_kernel_noise_statistics():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = _kernel_noise(16, 4096, seed=99, step=3).double().cpu()
    assert not torch.isnan(z).any()
    torch.testing.assert_close(z.float(), noise.randn(99, torch.arange(16), 3, 4096), rtol=1e-6, atol=1e-6)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert scipy_stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-4
    bound = 5 / 4096**0.5
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(16, dtype=corr.dtype)).abs().max().item() < bound            # across samples
    z2 = _kernel_noise(16, 4096, seed=99, step=4).double().cpu()
    assert abs(torch.corrcoef(torch.stack([z[0], z2[0]]))[0, 1].item()) < bound           # across steps
    for lag in (1, 2, 3, 4):                                                               # across elements
        assert abs(torch.corrcoef(torch.stack([z[1, :-lag], z[1, lag:]]))[0, 1].item()) < bound


def test_kernel_noise_independent_of_batch_split_and_tile():
    whole = _kernel_noise(6, 37, seed=5, step=7)
    part = _kernel_noise(2, 37, seed=5, step=7, sample_offset=4)
    assert torch.equal(whole[4:], part)
    big = _kernel_noise(2, 3000, seed=5, step=7)            # other tile shape (one sample per program)
    assert torch.equal(big[:, :37], whole[:2])


def test_kernel_noise_with_a_64_bit_seed_in_every_tile_shape():
    """A seed with both key words non-zero, in each launch shape: several samples per program (N = 37), 32-bit
    storage in 256-element tiles over 2 warps (N = 2100: the counter-noise configuration, the key read as two 32-bit
    words), 16-bit storage in 1024-element tiles; each the stream of fastrev.noise."""
    seed = 2**62 - 987_654_321
    assert K.launch_config(2100, 4, K.NOISE_PHILOX) == (1, 256, 8, 2)
    assert K.launch_config(2100, 2, K.NOISE_PHILOX) == (1, 1024, 2, 4)
    assert K.launch_config(2100, 4, K.NOISE_TENSOR) == (1, 1024, 2, 4)
    assert K.launch_config(2100, 4, K.NOISE_PHILOX, hip=True) == (1, 1024, 2, 4)
    assert K.launch_config(37, 4, K.NOISE_PHILOX)[0] > 1
    for N, dtype in ((37, torch.float32), (2100, torch.float32), (2100, torch.float16)):
        z = _kernel_noise(3, N, seed=seed, step=11, sample_offset=5, dtype=dtype).float().cpu()
        want = noise.randn(seed, torch.arange(5, 8), 11, N)
        if dtype == torch.float16:
            torch.testing.assert_close(z, want.half().float(), rtol=2.0**-10, atol=1e-6)
        else:
            torch.testing.assert_close(z, want, rtol=0, atol=1e-6)


def test_kernel_noise_in_16_bit_storage_is_the_stream():
    """16-bit storage builds the noise in the 8-per-thread load layout (two Philox groups per thread): the same
    stream, rounded once to the storage dtype."""
    z = _kernel_noise(3, 2500, seed=12, step=9, sample_offset=2, dtype=torch.float16)
    want = noise.randn(12, torch.arange(2, 5), 9, 2500)
    torch.testing.assert_close(z.float().cpu(), want.half().float(), rtol=2.0**-10, atol=1e-6)


def test_many_sample_groups_split_over_grid_axes(monkeypatch):
    """More sample groups than a grid axis holds: axes 1 and 2 share them (CUDA's 65535 limit, here made tiny)."""
    monkeypatch.setattr(K, "_MAX_GRID_YZ", 2)
    x, o, z, t = _inputs(7, 4097)
    got = ddpm_step(o, t, x, S, seed=3, backend="triton")
    want = ddpm_step(o.double(), t, x.double(), S, seed=3, backend="reference")
    _check(got.prev_sample, want.prev_sample, _bound(tables.ddpm_table(S), t, x, o, noise.noise_like(x, 3, t))[1])


def test_int64_indexing_path_matches():
    x, o, z, t = _inputs(3, 1023, "learned_range")
    table = T = tables.device_table(S, ("t-int64",), lambda: tables.ddpm_table(S, "v_prediction", "learned_range",
                                                                              True), DEV)
    outs = []
    for force in (False, True):
        prev, x0 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        C = x.shape[1]
        K.reverse_step(K.StepTensors(x, o[:, :C], table, t, prev, var=o[:, C:], seed=noise.as_seed_tensor(8, DEV),
                                     x0=x0),
                       clip_mode=K.CLIP_RANGE, var_mode=K.VAR_RANGE, noise_mode=K.NOISE_PHILOX, force_int64=force)
        outs.append((prev, x0))
    assert not torch.isnan(outs[1][0]).any()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    del T


def test_in_place_and_out():
    x, o, z, t = _inputs(4, 1023)
    want = ddpm_step(o, t, x, S, noise=z, backend="reference").prev_sample
    y = x.clone()
    res = ddpm_step(o, t, y, S, noise=z, out=y, backend="triton")
    assert res.prev_sample is y
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    out = torch.full_like(x, float("nan")).transpose(1, 2).contiguous().transpose(1, 2)   # non-contiguous out
    res = ddpm_step(o, t, x, S, noise=z, out=out, backend="triton")
    assert res.prev_sample is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    big_x = torch.randn(8, 4, 6, 6, device=DEV)
    big_o = torch.randn(8, 4, 6, 6, device=DEV)
    x, o = big_x[::2], big_o[1::2]                         # batch-strided: read in place
    assert not x.is_contiguous() and ops._per_sample_contiguous(x)
    t = torch.tensor([5, 500, 0, 999], device=DEV)
    z = torch.randn_like(x)
    want = ddpm_step(o.double(), t, x.double(), S, noise=z, backend="reference")
    got = ddpm_step(o, t, x, S, noise=z, backend="triton")
    torch.testing.assert_close(got.prev_sample, want.prev_sample.float(), rtol=1e-5, atol=1e-5)
    # channels_last and transposed views: the documented explicit copy, same answer
    xc = x.contiguous(memory_format=torch.channels_last)
    ot = o.transpose(2, 3).contiguous().transpose(2, 3)
    assert not ops._per_sample_contiguous(xc) and not ops._per_sample_contiguous(ot)
    got2 = ddpm_step(ot, t, xc, S, noise=z, backend="triton")
    torch.testing.assert_close(got2.prev_sample, want.prev_sample.float(), rtol=1e-5, atol=1e-5)


def test_small_samples_many_per_program():
    x = torch.randn(300, 2, device=DEV)                    # 2-D data: 256 samples share one program
    o = torch.randn(300, 2, device=DEV)
    t = torch.randint(0, 1000, (300,), device=DEV)
    got = ddpm_step(o, t, x, S, seed=4, backend="triton")
    want = ddpm_step(o, t, x, S, seed=4, backend="reference")
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=1e-5)


def test_empty_and_zero_dim_t():
    x = torch.empty(0, 3, 4, device=DEV)
    r = ddpm_step(x, torch.empty(0, dtype=torch.int64, device=DEV), x, S, seed=0, backend="triton")
    assert r.prev_sample.shape == (0, 3, 4)
    x, o, z, _ = _inputs(2, 1023)
    a = ddpm_step(o, torch.tensor(17, device=DEV), x, S, noise=z, backend="triton").prev_sample
    b = ddpm_step(o, 17, x, S, noise=z, backend="reference").prev_sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fp16_storage():
    x, o, z, t = _inputs(3, 1023, dtype=torch.float16)
    got = ddpm_step(o, t, x, S, noise=z, clip_sample=True, backend="triton")
    assert got.prev_sample.dtype == torch.float16
    want = ddpm_step(o.double(), t, x.double(), S, noise=z.double(), clip_sample=True, backend="reference")
    x0_terms, prev_terms = _bound(tables.ddpm_table(S, clip=True), t, x, o, z)
    _check(got.prev_sample, want.prev_sample, prev_terms, rtol=2.0**-11 + 1e-6)
    _check(got.pred_original_sample, want.pred_original_sample, x0_terms, rtol=2.0**-11 + 1e-6)


def test_tables_cached_per_device():
    x, o, z, t = _inputs(2, 1)
    s = Schedule.cosine(50)
    ddpm_step(o, t.clamp_max(49), x, s, noise=z, backend="triton")
    n = len(s._device_cache)
    ddpm_step(o, t.clamp_max(49), x, s, noise=z, backend="triton")
    assert len(s._device_cache) == n


def test_registered_op_matches_direct_launch():
    """torch.compile'd code calls the kernel through torch.ops.fastrev.reverse_step (eager calls launch directly)."""
    x, o, z, t = _inputs(3, 1023, "learned_range")
    C = x.shape[1]
    table = tables.device_table(S, ("op-test",), lambda: tables.ddpm_table(S, "epsilon", "learned_range", True), DEV)
    seed = noise.as_seed_tensor(3, DEV)
    outs = []
    for via_op in (True, False):
        prev, x0 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        K.reverse_step(K.StepTensors(x, o[:, :C], table, t, prev, var=o[:, C:], seed=seed, x0=x0), sample_offset=5,
                       clip_mode=K.CLIP_RANGE, var_mode=K.VAR_RANGE, noise_mode=K.NOISE_PHILOX, via_op=via_op)
        outs.append((prev, x0))
    assert not torch.isnan(outs[0][0]).any() and not torch.isnan(outs[0][1]).any()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, fastrev; x = torch.zeros(1, 2)\n"
            "try:\n fastrev.ddpm_step(x, 1, x, fastrev.Schedule.linear(), seed=0, backend='triton')\n"
            "except RuntimeError as e: print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR backend='triton' on CPU tensors needs the Triton interpreter" in res.stdout, res.stderr


# ------------------------------------------------------------------------------------------------ GPU only
cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_bf16_storage(pred):
    x, o, z, t = _inputs(4, 4097, dtype=torch.bfloat16)
    got = ddpm_step(o, t, x, S, noise=z, prediction_type=pred, backend="triton")
    want = ddpm_step(o.double(), t, x.double(), S, noise=z.double(), prediction_type=pred, backend="reference")
    _, prev_terms = _bound(tables.ddpm_table(S, pred), t, x, o, z)
    _check(got.prev_sample, want.prev_sample, prev_terms, rtol=2.0**-8 + 1e-6)


@cuda
def test_cuda_graph_replays_across_steps():
    s = Schedule.linear().respace(range(0, 1000, 100))
    x = torch.randn(4, 3, 16, 16, device="cuda")
    o = torch.randn_like(x)
    t = torch.full((4,), 9, dtype=torch.int64, device="cuda")
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    out = torch.empty_like(x)
    side = torch.cuda.Stream()                                     # warm up the exact captured variant (compile,
    side.wait_stream(torch.cuda.current_stream())                  # module load, table) outside the capture
    with torch.cuda.stream(side):
        for _ in range(2):
            ddpm_step(o, t, x, s, seed=seed, out=out, return_x0=False)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ddpm_step(o, t, x, s, seed=seed, out=out, return_x0=False)
    for step in (9, 5, 1, 0):
        t.fill_(step)
        seed.fill_(100 + step)
        g.replay()
        want = ddpm_step(o, step, x, s, seed=100 + step, backend="reference").prev_sample
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@cuda
def test_compiles_without_graph_break():
    import torch._dynamo

    s = Schedule.linear()

    def f(o, t, x, seed):
        return ddpm_step(o, t, x * 1.0, s, seed=seed).prev_sample * 2.0

    x = torch.randn(2, 4, 32, 32, device="cuda")
    o = torch.randn_like(x)
    t = torch.tensor([10, 900], device="cuda")
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    f(o, t, x, seed)                                  # eager first: the table is built and cached outside the graph
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(o, t, x, seed), f(o, t, x, seed), rtol=1e-5, atol=1e-5)


@cuda
def test_more_than_2_31_elements_bf16():
    B, N = 2, 2**30 + 4096                                          # 2³¹ + 8192 elements in all
    x = torch.randn(B, N, device="cuda", dtype=torch.bfloat16)
    o = torch.randn_like(x)
    t = torch.tensor([500, 999], device="cuda")
    got = ddpm_step(o, t, x, S, seed=1, backend="triton", return_x0=False).prev_sample
    for b, (lo, hi) in ((1, (N - 5000, N)), (0, (0, 5000))):       # lo % 4 == 0: whole Philox groups
        # the counter stream is keyed by (sample, element): the reference for a slice needs only that slice's z
        g = torch.arange(lo // 4, (hi + 3) // 4, device="cuda")
        w = noise.philox4x32(g, b, int(t[b]), 0, 1, 0)             # seed 1 → key words (1, 0)
        u = [noise.uniform_from_words(v) for v in w]
        n0, n1 = noise.box_muller(u[0], u[1])
        n2, n3 = noise.box_muller(u[2], u[3])
        z = torch.stack([n0, n1, n2, n3], -1).reshape(1, -1)[:, : hi - lo]
        want = ddpm_step(o[b:b + 1, lo:hi].double(), t[b:b + 1], x[b:b + 1, lo:hi].double(), S,
                         noise=z.double(), backend="reference").prev_sample
        torch.testing.assert_close(got[b:b + 1, lo:hi].double(), want, rtol=1e-2, atol=2e-2)


def test_kernel_columns_match_tables():
    names = ["A", "B", "C0", "C1", "C2", "SIGMA", "LOG_LO", "LOG_HI", "CLIP", "D0", "D1", "D2", "D3", "AX0", "AX",
             "AH0", "AH1", "AH2", "AH3", "Z0"]
    assert [getattr(K, "_" + n).value for n in names] == [tables.COL[n] for n in names]
    assert tables.NCOL == len(names)
    assert K._D.value == tables.COL["D"] == tables.COL["D0"]      # the older name of the history-of-one column


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_variance_term_at_t0_even_with_wild_variance_channels(backend):
    """Regression (review): at t = 0 the variance channels must not matter — inf log-variance gave 0·inf = NaN."""
    x = torch.randn(2, 3, 8, device=DEV)
    o = torch.randn(2, 6, 8, device=DEV)
    o[:, 3:] = float("inf")
    r = ddpm_step(o, torch.tensor([0, 0], device=DEV), x, S, variance_type="learned", seed=1, backend=backend)
    assert torch.isfinite(r.prev_sample).all()
    want = ddpm_step(o[:, :3], 0, x, S, seed=1, backend="reference").prev_sample
    torch.testing.assert_close(r.prev_sample, want, rtol=1e-5, atol=1e-5)


def test_overlapping_out_is_rejected_like_torch():
    """Regression (review): an expanded `out` (all samples at one address) was written silently."""
    x, o, z, t = _inputs(3, 1023)
    out = torch.zeros(1, *x.shape[1:], device=DEV).expand_as(x)
    for backend in ("triton", "reference"):
        with pytest.raises(RuntimeError, match="single memory location"):
            ddpm_step(o, t, x, S, noise=z, out=out, backend=backend)


def test_kernel_branches_use_named_modes():
    """The device code branches on the named constants of fastrev.kernels.modes, never on bare numbers."""
    import inspect
    import re

    src = inspect.getsource(K._reverse_step_kernel.fn)
    assert not re.search(r"_MODE\s*[!=]=\s*\d", src)
    assert tables.VAR_RANGE is K.VAR_RANGE and tables.VAR_MODES["learned"] == K.VAR_LOG
