"""The solver history: x_{t−1} = C0·x̂₀ + C1·x + C2·out + Σ_j Dj·h_j + σ·z (j < 4), read in the same pass.

For a history of 1..4 tensors, the fused kernel (the Triton interpreter here, the GPU where present) and the
float32 torch path ("torch") against the float64 reference, each to the bound of tests/_bounds.py extended by the
history terms |Dj·h_j|; kernel outputs start as NaN. A coefficient off by 1e-3 in D1 or D2 must fail that bound.
(The aux output, x̂₀'s noise term and D3's perturbation: tests/test_aux.py.)
"""

import pytest
import torch
from _bounds import check, step_terms, worst_ratio

import fastrev.ops as ops
from fastrev import Schedule, _cpu, tables
from fastrev.kernels import reverse_step as K

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
S = Schedule.linear()


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the op allocates for the kernel starts as NaN: an element the kernel skips cannot pass."""
    monkeypatch.setattr(ops, "_alloc", lambda like: torch.full_like(like, float("nan"),
                                                                      memory_format=torch.contiguous_format))


def _table(clip, seed=0):
    """float64 DDPM table with random history columns D0..D3 (a multistep solver's are O(1), of either sign)."""
    g = torch.Generator().manual_seed(seed)
    tab = tables.ddpm_table(S, "epsilon", "fixed_small", clip)
    for name in tables.HISTORY_COLS:
        tab[:, tables.COL[name]] = torch.randn(S.num_timesteps, generator=g, dtype=torch.float64)
    return tab


def _inputs(B=3, shape=(3, 341), seed=1):
    g = torch.Generator().manual_seed(seed)
    x, o, z, *hs = (torch.randn((B,) + shape, generator=g).to(DEV) for _ in range(7))
    t = torch.tensor([0, 500, S.num_timesteps - 1][:B], device=DEV)
    return x, o, z, hs, t


def _terms(tab64, t, x, o, z, hs):
    """(x̂₀ terms, x_{t−1} terms) of tests/_bounds.py, plus |Dj·h_j| for the history."""
    x0_terms, prev_terms = step_terms(tab64, t, x, o, z)
    c = tab64[t.cpu()].to(x.device)
    for j, h in enumerate(hs):
        d = c[:, tables.COL[tables.HISTORY_COLS[j]]].reshape((-1,) + (1,) * (x.dim() - 1))
        prev_terms = prev_terms + (d * h.double()).abs()
    return x0_terms, prev_terms


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_history_kernel_and_torch_equal_reference(n, clip):
    x, o, z, hs, t = _inputs()
    hs = tuple(hs[:n])
    tab64 = _table(clip)
    want = ops.fused_step(tab64, t, x.double(), o.double(), clip=clip, noise=z.double(),
                          history=tuple(h.double() for h in hs), backend="reference")
    x0_terms, prev_terms = _terms(tab64, t, x, o, z, hs)
    for backend in ("triton", "torch"):
        got = ops.fused_step(tab64.float().to(DEV), t, x, o, clip=clip, noise=z, history=hs, backend=backend)
        check(got.pred_original_sample, want.pred_original_sample, x0_terms, name=f"{backend} x0")
        check(got.prev_sample, want.prev_sample, prev_terms, name=f"{backend} prev")


@pytest.mark.parametrize("n", [2, 3])
def test_history_with_counter_noise_equals_reference(n):
    x, o, _, hs, t = _inputs(shape=(2, 130), seed=4)
    hs = tuple(hs[:n])
    tab64 = _table(False, seed=5)
    seed = torch.tensor([2**40 + 7], dtype=torch.int64, device=DEV)
    want = ops.fused_step(tab64, t, x.double(), o.double(), seed=seed, history=tuple(h.double() for h in hs),
                          backend="reference")
    from fastrev import noise
    z = noise.noise_like(x, 2**40 + 7, t, 0)
    for backend in ("triton", "torch"):
        got = ops.fused_step(tab64.float().to(DEV), t, x, o, seed=seed, history=hs, backend=backend)
        check(got.prev_sample, want.prev_sample, _terms(tab64, t, x, o, z, hs)[1], name=f"{backend} prev")


@pytest.mark.parametrize("col", ["D1", "D2"])
def test_a_wrong_history_coefficient_fails(col):
    """The bound is tight enough to see a 1e-3 error in D1 or D2, on the kernel and on the torch path."""
    x, o, z, hs, t = _inputs(seed=2)
    tab64 = _table(False, seed=3)
    want = ops.fused_step(tab64, t, x.double(), o.double(), noise=z.double(), history=tuple(h.double() for h in hs),
                          backend="reference")
    terms = _terms(tab64, t, x, o, z, hs)[1]
    bad = tab64.clone()
    bad[:, tables.COL[col]] += 1e-3
    for backend in ("triton", "torch"):
        ok = ops.fused_step(tab64.float().to(DEV), t, x, o, noise=z, history=tuple(hs), backend=backend)
        wrong = ops.fused_step(bad.float().to(DEV), t, x, o, noise=z, history=tuple(hs), backend=backend)
        assert worst_ratio(ok.prev_sample, want.prev_sample, terms, 1e-6) <= 1.0
        assert worst_ratio(wrong.prev_sample, want.prev_sample, terms, 1e-6) > 10.0, backend


def test_base_is_a_history_of_one():
    x, o, z, hs, t = _inputs(shape=(1, 64))
    tab = _table(True).float().to(DEV)
    for backend in ("triton", "torch", "reference"):
        table = tab.double() if backend == "reference" else tab
        a = ops.fused_step(table, t, x, o, clip=True, noise=z, base=hs[0], backend=backend)
        b = ops.fused_step(table, t, x, o, clip=True, noise=z, history=(hs[0],), backend=backend)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=0)
    assert tables.COL["D"] == tables.COL["D0"] and K._D.value == tables.COL["D0"]


def test_history_in_place_double_buffered():
    """A multistep loop's shape: x̂₀ of this step written into a buffer that is not read (double-buffering),
    x_{t−1} written over x itself; the result equals the out-of-place step."""
    x, o, z, hs, t = _inputs(shape=(1, 100), seed=6)
    tab = _table(False).float().to(DEV)
    want = ops.fused_step(tab, t, x, o, noise=z, history=(hs[0], hs[1]), backend="triton")
    y = x.clone()
    got = ops.fused_step(tab, t, y, o, noise=z, history=(hs[0], hs[1]), out=y, backend="triton")
    assert got.prev_sample is y
    torch.testing.assert_close(y, want.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, rtol=0, atol=0)


def test_bad_history_is_rejected():
    x, o, z, hs, t = _inputs(shape=(1, 8))
    tab = _table(False).float()
    with pytest.raises(ValueError, match="not both"):
        ops.fused_step(tab, t, x, o, base=hs[0], history=(hs[1],), backend="torch")
    with pytest.raises(ValueError, match="0 to 4 tensors"):
        ops.fused_step(tab, t, x, o, history=tuple(hs) + (hs[0],), backend="torch")
    with pytest.raises(ValueError, match="0 to 4 tensors"):
        ops.fused_step(tab, t, x, o, history=(hs[0], None), backend="torch")
    with pytest.raises(TypeError, match="history must be a tuple"):
        ops.fused_step(tab, t, x, o, history=hs[0], backend="torch")
    xf, of = x.reshape(3, -1), o.reshape(3, -1)
    prev = torch.empty_like(xf)
    with pytest.raises(ValueError, match="in order"):
        K.reverse_step(K.StepTensors(xf, of, tab, t, prev, h1=hs[0].reshape(3, -1)))
    with pytest.raises(ValueError, match="columns D0..D2"):
        K.reverse_step(K.StepTensors(xf, of, tab[:, :11].contiguous(), t, prev, base=xf, h1=xf, h2=xf))


@pytest.mark.skipif(not _cpu.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_compiled_cpu_pass_equals_eager_float32(n):
    """fastrev._cpu's one pass reads the history too, writes aux and adds x̂₀'s noise term: bit for bit the eager
    float32 update (tables.apply_table) with the caller's noise; with the counter stream, to its normals' 1e-6 (the
    pass evaluates Box–Muller's functions itself; row 0, SIGMA = 0, still draws z for x̂₀'s Z0·z)."""
    g = torch.Generator().manual_seed(7)
    x, o, z, *hs = (torch.randn((3, 2, 6, 7), generator=g) for _ in range(7))
    hs = tuple(hs[:n])
    t = torch.tensor([0, 500, 999])
    seed = torch.tensor([5], dtype=torch.int64)
    for clip, zz, aux, x0_noise in ((False, None, False, False), (True, z, True, False), (False, z, n % 2 == 0, True),
                                    (True, None, True, True)):
        tab = _table(clip).float()
        for name in ("AX0", "AX", "AH0", "AH1", "AH2", "AH3", "Z0"):
            tab[:, tables.COL[name]] = torch.randn(tab.shape[0], generator=g)
        stochastic = zz is not None or x0_noise
        assert _cpu.eligible(x, o, z, *hs)
        res = []
        for xx in (x, x.to(memory_format=torch.channels_last)):       # the compiled pass; eager torch ops
            a = torch.full_like(x, float("nan")) if aux else None
            r = ops.fused_step(tab, t, xx, o, clip=clip, noise=zz, seed=seed, history=hs, backend="torch",
                               stochastic=stochastic, aux_out=a, x0_noise=x0_noise)
            res.append((r.prev_sample, r.pred_original_sample, a))
        if zz is not None or not stochastic:
            torch.testing.assert_close(res[0], res[1], rtol=0, atol=0)
        else:
            torch.testing.assert_close(res[0], res[1], rtol=1e-5, atol=2e-5)


def test_history_through_the_registered_op():
    """torch.ops.fastrev.reverse_step (what torch.compile'd code calls) carries h_1 and h_2: the same as a launch."""
    x, o, z, hs, t = _inputs(shape=(1, 64), seed=8)
    tab = _table(False).float().to(DEV)
    B = x.shape[0]
    xf, of, zf = x.reshape(B, -1), o.reshape(B, -1), z.reshape(B, -1)
    h0, h1, h2 = (h.reshape(B, -1) for h in hs[:3])
    outs = []
    for via_op in (True, False):
        prev, x0 = torch.full_like(xf, float("nan")), torch.full_like(xf, float("nan"))
        K.reverse_step(K.StepTensors(xf, of, tab, t, prev, noise=zf, base=h0, x0=x0, h1=h1, h2=h2),
                       noise_mode=K.NOISE_TENSOR, via_op=via_op)
        outs.append((prev, x0))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    want = ops.fused_step(tab, t, x, o, noise=z, history=(hs[0], hs[1], hs[2]), backend="triton")
    torch.testing.assert_close(outs[0][0], want.prev_sample.reshape(B, -1), rtol=0, atol=0)
