"""The aux output, x̂₀'s noise term and a history of four (fastrev.tables' columns D3, AX0, AX, AH0..AH3, Z0):

    x̂₀   = A·x + B·out [+ Z0·z]                → clip
    prev = C0·x̂₀ + C1·x + C2·out + Σ_j Dj·h_j + σ·z
    aux  = AX0·x̂₀ + AX·x + Σ_j AHj·h_j

For combinations of history 0..4 × aux on/off × x0_noise on/off × caller/counter noise × clip on/off (a pairwise
covering set: every pair of levels of any two factors occurs), the fused kernel (the Triton interpreter here), the
torch backend's compiled CPU pass and its eager float32 update against the float64 reference, each to the bound of
tests/_bounds.py extended by the new terms (|Z0·z| in x̂₀; |Dj·h_j| in x_{t−1}; |AX0|·(x̂₀'s terms), |AX·x|,
|AHj·h_j| in aux). Buffers start as NaN. A 1e-3 error in D3, AX0, AH3 or Z0 must fail that bound.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from _bounds import check, step_terms, worst_ratio

import fastrev.ops as ops
from fastrev import Schedule, _cpu, noise, tables
from fastrev.kernels import reverse_step as K

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
S = Schedule.linear()
SEED = 2**40 + 11
NEW_COLS = ("D0", "D1", "D2", "D3", "AX0", "AX", "AH0", "AH1", "AH2", "AH3", "Z0")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the op allocates for the kernel starts as NaN: an element the kernel skips cannot pass."""
    monkeypatch.setattr(ops, "_alloc", lambda like: torch.full_like(like, float("nan"),
                                                                      memory_format=torch.contiguous_format))


def _table(clip, seed=0):
    """float64 DDPM table (SIGMA = 0 at row 0) with random history, aux and Z0 columns, and C0 ≠ 0 also when x̂₀ is
    not clipped (so that x_{t−1} sees x̂₀'s noise term)."""
    g = torch.Generator().manual_seed(seed)
    tab = tables.ddpm_table(S, "epsilon", "fixed_small", clip)
    T = S.num_timesteps
    for name in NEW_COLS:
        tab[:, tables.COL[name]] = torch.randn(T, generator=g, dtype=torch.float64)
    if not clip:
        tab[:, tables.COL["C0"]] = 0.2 + torch.rand(T, generator=g, dtype=torch.float64)
    return tab


def _inputs(shape, seed, B=3):
    g = torch.Generator().manual_seed(seed)
    x, o, z, *hs = (torch.randn((B,) + shape, generator=g).to(DEV) for _ in range(7))
    t = torch.tensor([0, 500, S.num_timesteps - 1][:B], device=DEV)
    return x, o, z, hs, t


def _terms(tab64, t, x, o, z, hs, x0_noise, counter):
    """(x̂₀, x_{t−1}, aux) terms: tests/_bounds.py's, extended by the new columns. With counter noise the kernel's
    normals are within 1e-6 (absolute) of fastrev.noise's: a term |coef|·1 per noise coefficient covers that."""
    x0_terms, prev_terms = step_terms(tab64, t, x, o, z)
    c = tab64[t.cpu()].to(x.device)
    col = lambda k: c[:, tables.COL[k]].reshape((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
    if counter:
        prev_terms = prev_terms + col("SIGMA").abs()
    if x0_noise:
        zt = (col("Z0") * z.double()).abs() + (col("Z0").abs() if counter else 0.0)
        x0_terms = x0_terms + zt
        prev_terms = prev_terms + col("C0").abs() * zt
    aux_terms = col("AX0").abs() * x0_terms + (col("AX") * x.double()).abs()
    for j, h in enumerate(hs):
        prev_terms = prev_terms + (col(tables.HISTORY_COLS[j]) * h.double()).abs()
        aux_terms = aux_terms + (col(tables.AUX_HISTORY_COLS[j]) * h.double()).abs()
    return x0_terms, prev_terms, aux_terms


def _run(backend, tab, t, x, o, z, hs, aux, x0_noise, clip, counter, **kw):
    """One fused step; returns (prev, x̂₀, aux or None), x̂₀ and aux written into fresh NaN buffers."""
    x0_out = torch.full_like(x, float("nan"))
    aux_out = torch.full_like(x, float("nan")) if aux else None
    seed = torch.tensor([SEED], dtype=torch.int64, device=x.device) if counter else None
    r = ops.fused_step(tab, t, x, o, clip=clip, noise=None if counter else z, seed=seed, history=hs,
                       x0_out=x0_out, aux_out=aux_out, x0_noise=x0_noise, backend=backend, **kw)
    assert r.pred_original_sample is x0_out
    return r.prev_sample, x0_out, aux_out


# (history, aux, x0_noise, counter noise, clip, shape): pairwise covering, plus no history with aux, and one
# sample of 1100 elements (two tiles of a program: the noise's tile offset in the loop)
CASES = [
    (1, False, False, False, False, (3, 85)),
    (1, True, True, True, True, (3, 85)),
    (2, False, True, True, False, (3, 85)),
    (2, True, False, False, True, (3, 85)),
    (3, False, True, False, True, (3, 85)),
    (3, True, False, True, False, (3, 85)),
    (4, False, False, True, True, (3, 85)),
    (4, True, True, False, False, (3, 85)),
    (0, True, True, True, True, (1100,)),
]


@pytest.mark.parametrize("n,aux,x0_noise,counter,clip,shape", CASES)
def test_backends_equal_reference(n, aux, x0_noise, counter, clip, shape):
    x, o, z, hs, t = _inputs(shape, seed=10 + n)
    hs = tuple(hs[:n])
    tab64 = _table(clip, seed=n)
    if counter:
        z = noise.noise_like(x, SEED, t, 0)
    want = _run("reference", tab64, t, x.double(), o.double(), z.double(), tuple(h.double() for h in hs), aux,
                x0_noise, clip, counter)
    terms = _terms(tab64, t, x, o, z, hs, x0_noise, counter)
    backends = [("triton", x), ("torch", x)]
    if _cpu.AVAILABLE:              # the torch backend's other path: eager float32 ops (x not per-sample contiguous)
        backends.append(("torch", x.transpose(0, -1).contiguous().transpose(0, -1)))
    for backend, xx in backends:
        assert xx is x or not _cpu.eligible(xx), "the eager path needs an ineligible layout"
        got = _run(backend, tab64.float().to(DEV), t, xx, o, z, hs, aux, x0_noise, clip, counter)
        name = f"{backend}{'' if xx is x else ' eager'}"
        check(got[1], want[1], terms[0], name=f"{name} x0")
        check(got[0], want[0], terms[1], name=f"{name} prev")
        if aux:
            check(got[2], want[2], terms[2], name=f"{name} aux")


@pytest.mark.parametrize("col", ["D3", "AX0", "AH3", "Z0"])
def test_a_wrong_coefficient_fails(col):
    """The bound sees a 1e-3 error in D3, AX0, AH3 or Z0, on the kernel and on the torch path."""
    x, o, z, hs, t = _inputs((3, 85), seed=3)
    tab64 = _table(False, seed=4)
    args = (t, x, o, z, tuple(hs), True, True, False, False)
    want = _run("reference", tab64, t, x.double(), o.double(), z.double(), tuple(h.double() for h in hs), True,
                True, False, False)
    terms = _terms(tab64, t, x, o, z, hs, True, False)
    out_index = {"D3": 0, "Z0": 1, "AX0": 2, "AH3": 2}[col]
    bad = tab64.clone()
    bad[:, tables.COL[col]] += 1e-3
    for backend in ("triton", "torch"):
        ok = _run(backend, tab64.float().to(DEV), *args)
        wrong = _run(backend, bad.float().to(DEV), *args)
        for i in range(3):
            assert worst_ratio(ok[i], want[i], terms[i], 1e-6) <= 1.0
        assert worst_ratio(wrong[out_index], want[out_index], terms[out_index], 1e-6) > 10.0, (backend, col)


def test_double_buffered_multistep_loop():
    """A multistep solver's loop: x̂₀ written into a buffer not read in this pass (then it becomes h_0), x_{t−1}
    written over x in place, aux into its own buffer; three steps equal out-of-place steps bit for bit, on the kernel
    and on the torch backend. The two channel halves of one buffer are distinct outputs (no false overlap)."""
    x, o, z, hs, t = _inputs((2, 64), seed=5)
    tab = _table(True, seed=6).float().to(DEV)
    for backend in ("triton", "torch"):
        y = x.clone()
        bufs = [hs[0].clone(), hs[1].clone(), torch.full_like(x, float("nan"))]
        pair = torch.full((3, 4, 64), float("nan"), device=DEV)
        ref_y, ref_h = x.clone(), [hs[0].clone(), hs[1].clone()]
        for step in range(3):
            zz = z * (step + 1)
            h0, h1, x0_buf = bufs
            aux_buf = pair[:, 2:]
            r = ops.fused_step(tab, t, y, o, clip=True, noise=zz, history=(h0, h1), out=y, x0_out=x0_buf,
                               aux_out=aux_buf, backend=backend)
            assert r.prev_sample is y and r.pred_original_sample is x0_buf
            want = ops.fused_step(tab, t, ref_y, o, clip=True, noise=zz, history=tuple(ref_h), backend=backend)
            want_aux = torch.full_like(x, float("nan"))
            ops.fused_step(tab, t, ref_y, o, clip=True, noise=zz, history=tuple(ref_h), aux_out=want_aux,
                           backend=backend)
            torch.testing.assert_close(y, want.prev_sample, rtol=0, atol=0)
            torch.testing.assert_close(x0_buf, want.pred_original_sample, rtol=0, atol=0)
            torch.testing.assert_close(aux_buf, want_aux, rtol=0, atol=0)
            assert torch.isnan(pair[:, :2]).all()                 # the other half untouched
            bufs = [x0_buf, h0, h1]                                # the newest x̂₀ becomes h_0; h_1 is recycled
            ref_y, ref_h = want.prev_sample, [want.pred_original_sample, ref_h[0]]


def test_bad_outputs_are_rejected():
    x, o, z, hs, t = _inputs((1, 16), seed=7)
    tab = _table(False).float().to(DEV)
    kw = dict(noise=z, history=(hs[0], hs[1]), backend="torch")
    with pytest.raises(ValueError, match="x0_out overlaps a tensor read"):
        ops.fused_step(tab, t, x, o, x0_out=hs[1], **kw)
    with pytest.raises(ValueError, match="aux_out overlaps a tensor read"):
        ops.fused_step(tab, t, x, o, aux_out=x, **kw)
    with pytest.raises(ValueError, match="aux_out overlaps a tensor read"):
        ops.fused_step(tab, t, x, o, aux_out=z, **kw)
    buf = torch.empty_like(x)
    with pytest.raises(ValueError, match="aux_out overlaps x0_out"):
        ops.fused_step(tab, t, x, o, x0_out=buf, aux_out=buf, **kw)
    with pytest.raises(ValueError, match="x0_out overlaps out"):
        ops.fused_step(tab, t, x, o, x0_out=buf, out=buf, **kw)
    with pytest.raises(ValueError, match="x0_out must have the sample's shape"):
        ops.fused_step(tab, t, x, o, x0_out=torch.empty(3, 16, device=DEV), **kw)
    with pytest.raises(TypeError, match="aux_out must be a torch.Tensor"):
        ops.fused_step(tab, t, x, o, aux_out=1.0, **kw)
    with pytest.raises(ValueError, match="x0_noise cannot be combined with thresholding"):
        ops.fused_step(tab, t, x, o, thresholding=True, x0_noise=True, **kw)
    with pytest.raises(ValueError, match="x0_noise=True needs a stochastic step"):
        ops.fused_step(tab, t, x, o, stochastic=False, x0_noise=True, history=(hs[0],), backend="triton")
    with pytest.raises(ValueError, match="0 to 4 tensors"):
        ops.fused_step(tab, t, x, o, history=tuple(hs) + (hs[0],), backend="torch")
    old = tab[:, :12].contiguous()                        # a table built before the new columns
    for backend in ("triton", "torch", "reference"):
        tb = old.double() if backend == "reference" else old
        ops.fused_step(tb, t, x, o, noise=z, history=tuple(hs[:3]), backend=backend)     # still fine
        with pytest.raises(ValueError, match="columns"):
            ops.fused_step(tb, t, x, o, noise=z, history=tuple(hs[:3]), aux_out=buf, backend=backend)
        with pytest.raises(ValueError, match="columns"):
            ops.fused_step(tb, t, x, o, noise=z, x0_noise=True, backend=backend)


def test_aux_x0_noise_and_h3_through_the_registered_op():
    """torch.ops.fastrev.reverse_step (what torch.compile'd code calls) carries h_3, aux and x0_noise."""
    x, o, z, hs, t = _inputs((1, 64), seed=8)
    tab = _table(False).float().to(DEV)
    B = x.shape[0]
    flat = [a.reshape(B, -1) for a in (x, o, z, *hs[:4])]
    outs = []
    for via_op in (True, False):
        prev, x0, aux = (torch.full_like(flat[0], float("nan")) for _ in range(3))
        K.reverse_step(K.StepTensors(flat[0], flat[1], tab, t, prev, noise=flat[2], base=flat[3], x0=x0, h1=flat[4],
                                     h2=flat[5], h3=flat[6], aux=aux),
                       noise_mode=K.NOISE_TENSOR, via_op=via_op, x0_noise=True)
        outs.append((prev, x0, aux))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    aux = torch.full_like(x, float("nan"))
    want = ops.fused_step(tab, t, x, o, noise=z, history=tuple(hs[:4]), aux_out=aux, x0_noise=True, backend="triton")
    torch.testing.assert_close(outs[0][0], want.prev_sample.reshape(B, -1), rtol=0, atol=0)
    torch.testing.assert_close(outs[0][2], aux.reshape(B, -1), rtol=0, atol=0)


def test_columns_and_finish_table():
    names = ["D3", "AX0", "AX", "AH0", "AH1", "AH2", "AH3", "Z0"]
    assert [getattr(K, "_" + n).value for n in names] == [tables.COL[n] for n in names] == list(range(12, 20))
    assert tables.NCOL == 20 and tables.MAX_HISTORY == K.MAX_HISTORY == 4
    assert tables.AUX_HISTORY_COLS == ("AH0", "AH1", "AH2", "AH3")
    one = torch.ones(5, dtype=torch.float64)
    tab = tables.finish_table(one, 2 * one, 3 * one, one, one, one, clip=False, D3=4 * one, AX0=5.0, AH3=6 * one)
    c = tables.COL
    assert tab.shape == (5, 20) and tab[0, c["C0"]] == 0 and tab[0, c["C1"]] == 4      # C0 folded: no Z0
    assert (tab[0, c["D3"]], tab[0, c["AX0"]], tab[0, c["AH3"]], tab[0, c["Z0"]]) == (4, 5, 6, 0)
    tab = tables.finish_table(one, 2 * one, 3 * one, one, one, one, clip=False, Z0=0.5)
    assert tab[0, c["C0"]] == 3 and tab[0, c["Z0"]] == 0.5          # not folded: x_{t−1} keeps C0·x̂₀ (and Z0·z)
    assert tables.columns_needed(3) == 12 and tables.columns_needed(4) == 13
    assert tables.columns_needed(2, aux=True) == 17 and tables.columns_needed(0, x0_noise=True) == 20


def test_new_modes_compile_for_gpu_targets():
    """HISTORY = 4 with AUX and X0_NOISE compiles to an sm_90 cubin, and AUX + X0_NOISE with guidance to an AMD gfx942
    code object (no GPU needed; bench/kernel_ir.py's report compiles the other new variants for sm_90)."""
    pytest.importorskip("triton.backends.nvidia")
    pytest.importorskip("triton.backends.amd")
    from test_compile import ROOT, SCRIPT
    cases = {"cuda": ("fp32", dict(CLIP_MODE=1, VAR_MODE=0, NOISE_MODE=2, HISTORY=4, AUX=True, X0_NOISE=True)),
             "hip": ("bf16", dict(CLIP_MODE=0, VAR_MODE=1, NOISE_MODE=1, HISTORY=2, AUX=True, X0_NOISE=True,
                                  GUIDED=True, SAMPLES=4, BLOCK_N=256))}
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for backend, arch, binary in (("cuda", "90", "cubin"), ("hip", "gfx942", "hsaco")):
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "bench" / "kernel_ir.py"),
                              json.dumps([cases[backend]]), backend, arch, binary], capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        assert res.stdout.count("ok") == 1
