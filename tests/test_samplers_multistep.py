"""The multistep methods of ``fastrev.sample``: DPM-Solver++ 2M / 3M, their SDE variants, UniPC (bh2).

* quality: on the demo 2-D mixture with its exact ε-predictor, 10 and 20 steps land within the data-vs-data floor
  plus a margin (sliced W1 <= mean + 4·sd of 8 data-vs-data pairs, as tests/test_samplers.py); deliberately wrong
  tables (a flipped or scaled column) fail that threshold;
* exactness: the sampler (its tables, on the float64 reference backend) equals an independent float64 loop written
  from the solvers' formulas to 1e-9, and the fused kernel (the Triton interpreter on CPU) equals it to float32
  rounding; with guidance and per-sample conditioning too;
* diffusers: DPM-Solver++ 2M (and 3M, 2M SDE with the same noise) equal diffusers' DPMSolverMultistepScheduler
  (algorithm "dpmsolver++" / "sde-dpmsolver++", same timesteps and ᾱ) on a whole loop to float32 rounding, and
  UniPC equals UniPCMultistepScheduler (bh2, with its corrector); a coefficient off by 1e-3 fails that tolerance;
* structure: one model call and ONE fused launch per step, the x̂₀ history read in the same pass and the new x̂₀
  written into a ring buffer the step does not read; the CUDA-graph path (one graph per ring phase, emulated here)
  equals the eager loop; results do not depend on ``batch_size``.
"""

import math
import statistics

import pytest
import torch
from _graph import EmulatedGraph

import fastrev
import fastrev.sampling.graph as SG
import fastrev.sampling.multistep as MS
from fastrev import noise, ops
from fastrev import tables as T
from fastrev.models import GaussianMixture, sliced_wasserstein
from fastrev.sampling import MULTISTEP_METHODS, SampleOptions
from fastrev.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DPMPP = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde")
N_Q = 2000


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def quality():
    s = Schedule.linear()
    g = GaussianMixture.demo_2d(s)
    data = g.sample(N_Q, _gen(1))
    dd = [sliced_wasserstein(g.sample(N_Q, _gen(100 + j)), g.sample(N_Q, _gen(200 + j))) for j in range(8)]
    thr = statistics.mean(dd) + 4 * statistics.stdev(dd)
    assert 0.05 < thr < 0.12
    return dict(schedule=s, model=g, data=data, thr=thr)


def _sw(x, data):
    return sliced_wasserstein(x, data) if torch.isfinite(x).all() else math.inf


# ------------------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("method", MULTISTEP_METHODS)
def test_recovers_the_mixture(quality, method, steps):
    x = fastrev.sample(quality["model"], (N_Q, 2), quality["schedule"], method=method, num_steps=steps, seed=0)
    sw = _sw(x, quality["data"])
    assert sw <= quality["thr"], f"{method} {steps} steps: SW1 {sw:.4f} > {quality['thr']:.4f}"


def _bad(builder, column, fn, rows=slice(None)):
    def bad(*a, **k):
        tab = builder(*a, **k)
        tab[rows, T.COL[column]] = fn(tab[rows, T.COL[column]])
        return tab
    return bad


# deliberately wrong tables: (method, builder, column, change, rows); measured SW1 in the comments (threshold ≈ 0.08)
# (the right tables measure 0.040–0.065 at 10 and 20 steps)
TABLE_ERRORS = {
    "2m-history-sign": ("dpmpp_2m", "dpmpp_table", "D0", lambda c: -c, slice(None)),              # 0.72
    "2m-x-scale": ("dpmpp_2m", "dpmpp_table", "C1", lambda c: 1.05 * c, slice(None)),             # 0.60
    "3m-history2-sign": ("dpmpp_3m", "dpmpp_table", "D1", lambda c: -c, slice(None)),             # 0.37
    "2m_sde-noise-double": ("dpmpp_2m_sde", "dpmpp_table", "SIGMA", lambda c: 2 * c, slice(None)),  # 0.16
    "3m_sde-history-sign": ("dpmpp_3m_sde", "dpmpp_table", "D0", lambda c: -c, slice(None)),      # 4.6
    "unipc-corrector-sign": ("unipc", "unipc_table", "D0", lambda c: -c, slice(None)),    # x^c_{k−1} in x′: 0.45
    "unipc-aux-scale": ("unipc", "unipc_table", "AH0", lambda c: 1.1 * c, slice(None)),   # x^c_k drifts: 0.53
}


@pytest.mark.parametrize("case", list(TABLE_ERRORS))
def test_wrong_tables_fail(quality, monkeypatch, case):
    method, name, column, fn, rows = TABLE_ERRORS[case]
    monkeypatch.setattr(MS, name, _bad(getattr(MS, name), column, fn, rows))
    s = Schedule.linear()                                  # fresh: the tables are cached per schedule
    x = fastrev.sample(GaussianMixture.demo_2d(s), (N_Q, 2), s, method=method, num_steps=20, seed=0)
    assert _sw(x, quality["data"]) > quality["thr"]


# ------------------------------------------------------------------------------------------------ reference loops
def _x0(out, x, a, s, pt, clip):
    if pt == "epsilon":
        m = (x - s * out) / a
    elif pt == "v_prediction":
        m = a * x - s * out
    else:
        m = out
    return m.clamp(-1, 1) if clip else m


def _steps(R):
    """Per step k: (training timestep, row i, α, σ, λ), and the final (α, σ, λ) = (1, 0, +∞)."""
    N = R.num_timesteps
    out = []
    for k in range(N):
        i = N - 1 - k
        ab = float(R.alpha_bars[i])
        out.append((int(R.timesteps[i]), i, math.sqrt(ab), math.sqrt(1 - ab), 0.5 * math.log(ab / (1 - ab))))
    return out + [(None, None, 1.0, 0.0, math.inf)]


def ref_dpmpp(model, x, R, order, sde, seed=0, pt="epsilon", clip=False):
    """DPM-Solver++(order)M written out in float64 (data prediction, midpoint 2nd order; the 3rd order with the
    DPM-Solver reference code's and k-diffusion's coefficients), first order on the first and the last step and
    order ≤ 2 on the second-to-last when N < 15; noise z at key i (the row) for the SDE."""
    st = _steps(R)
    N = R.num_timesteps
    ms = []
    for k in range(N):
        t, i, a, s, lam = st[k]
        a2, s2, lam2 = st[k + 1][2:]
        m = _x0(model(x, torch.full((x.shape[0],), t)), x, a, s, pt, clip)
        ms.append(m)
        o = 1 if k == N - 1 else min(order, len(ms))
        if order == 3 and k == N - 2 and N < 15:
            o = min(o, 2)
        h = lam2 - lam
        H = 2 * h if sde else h
        x_new = (s2 / s) * (math.exp(-h) if sde else 1.0) * x + a2 * (1 - math.exp(-H)) * m
        if o >= 2:
            r0 = (lam - st[k - 1][4]) / h
            d1_0 = (ms[-1] - ms[-2]) / r0
            if o == 2:
                x_new = x_new + 0.5 * a2 * (1 - math.exp(-H)) * d1_0
            else:
                r1 = (st[k - 1][4] - st[k - 2][4]) / h
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = (math.exp(-H) - 1) / H + 1
                phi3 = phi2 / H - 0.5
                x_new = x_new + a2 * phi2 * d1 - a2 * phi3 * d2
        if sde and k < N - 1:
            z = noise.noise_like(torch.empty(x.shape), seed, torch.full((x.shape[0],), i), 0).double()
            x_new = x_new + s2 * math.sqrt(1 - math.exp(-2 * h)) * z
        x = x_new
    return x


def _rhos(hh, rks, order, corrector):
    """UniPC bh2's ρ: R ρ = b with R_{ij} = r_j^i, b_i = i!·φ_{i+1}(hh)·hh^{…}/B(h) (diffusers' recursion)."""
    if (corrector and order == 1) or (not corrector and order == 2):
        return [0.5]
    B = math.expm1(hh)
    phi, fact, b = math.expm1(hh) / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(phi * fact / B)
        fact *= i + 1
        phi = phi / hh - 1 / fact
    n = order if corrector else order - 1
    Rm = torch.tensor([[rks[j] ** p for j in range(n)] for p in range(n)], dtype=torch.float64)
    return torch.linalg.solve(Rm, torch.tensor(b[:n], dtype=torch.float64)).tolist()


def ref_unipc(model, x, R, order=2, pt="epsilon", clip=False):
    """UniPC-p bh2 written out in float64: at step k the model output at the predicted x_k, the corrector
    x^c_k = UniC(x^c_{k−1}, m_{k−1}, …, m_k) (not at k = 0), the predictor from x^c_k; orders min(p, N − k, k + 1)."""
    st = _steps(R)
    N = R.num_timesteps
    ms, last, prev_order = [], None, None
    for k in range(N):
        t, i, a, s, lam = st[k]
        m = _x0(model(x, torch.full((x.shape[0],), t)), x, a, s, pt, clip)
        if k > 0:                                           # corrector: from x^c_{k−1} at λ_{k−1} to λ_k
            a0, s0, lam0 = st[k - 1][2:]
            h = lam - lam0
            hh = -h
            rks = [(st[k - 1 - j][4] - lam0) / h for j in range(1, prev_order)] + [1.0]
            rho = _rhos(hh, rks, prev_order, True)
            res = sum(rho[j - 1] * (ms[-1 - j] - ms[-1]) / rks[j - 1] for j in range(1, prev_order))
            x = s / s0 * last - a * math.expm1(hh) * ms[-1] - a * math.expm1(hh) * (res + rho[-1] * (m - ms[-1]))
        ms.append(m)
        p = min(order, N - k, k + 1)
        a2, s2, lam2 = st[k + 1][2:]
        h = lam2 - lam
        hh = -h
        x_new = s2 / s * x - a2 * math.expm1(hh) * m
        if p >= 2:
            rks = [(st[k - j][4] - lam) / h for j in range(1, p)] + [1.0]
            rho = _rhos(hh, rks, p, False)
            x_new = x_new - a2 * math.expm1(hh) * sum(rho[j - 1] * (ms[-1 - j] - m) / rks[j - 1] for j in range(1, p))
        last, prev_order, x = x, p, x_new
    return x


def _small(pt="epsilon"):
    s = Schedule.linear()
    means = torch.tensor([[0.5, -0.3, 0.2], [-0.6, 0.4, 0.0]], dtype=torch.float64)
    return s, GaussianMixture(means, [0.3, 0.2], [0.6, 0.4], schedule=s, prediction_type=pt)


def _R(s, n, spacing="trailing"):
    return s.respace(fastrev.spaced_timesteps(s.num_timesteps, n, spacing))


def _reference(method, g, x, R, seed, pt="epsilon", clip=False, solver_order=2):
    if method == "unipc":
        return ref_unipc(g, x, R, solver_order, pt, clip)
    order, sde = MS.DPMPP_METHODS[method]
    return ref_dpmpp(g, x, R, order, sde, seed, pt, clip)


def _x_T(n, shape, seed, N):
    return noise.noise_like(torch.empty((n,) + shape), seed, N, 0).double()


EXACT_CASES = [(m, {}) for m in MULTISTEP_METHODS] + [
    ("dpmpp_2m", {"num_steps": 20}),
    ("dpmpp_3m", {"num_steps": 16, "timestep_spacing": "leading"}),
    ("dpmpp_2m_sde", {"prediction_type": "v_prediction", "clip_sample": True}),
    ("dpmpp_3m", {"prediction_type": "sample"}),
    ("unipc", {"solver_order": 1}), ("unipc", {"solver_order": 3, "num_steps": 9}),
    ("unipc", {"prediction_type": "v_prediction", "clip_sample": True}),
]


@pytest.mark.parametrize("method,kw", EXACT_CASES)
def test_tables_equal_the_reference_loop(method, kw):
    """The sampler on the float64 reference backend (its tables, its ring buffers) equals the loop written out."""
    pt = kw.get("prediction_type", "epsilon")
    s, g = _small(pt)
    n = kw.get("num_steps", 8)
    got = fastrev.sample(g, (6, 3), s, method=method, seed=11, dtype=torch.float64, backend="reference",
                         **{"num_steps": n, **kw})
    R = _R(s, n, kw.get("timestep_spacing", "trailing"))
    want = _reference(method, g, _x_T(6, (3,), 11, n), R, 11, pt, kw.get("clip_sample", False),
                      kw.get("solver_order", 2))
    err = (got - want).abs().max().item()
    assert err <= 1e-9 * max(1.0, want.abs().max().item()), err


FUSED_CASES = [(m, {}) for m in MULTISTEP_METHODS] + [("dpmpp_2m", {"clip_sample": True,
                                                                    "prediction_type": "v_prediction"})]


@pytest.fixture
def poison(monkeypatch):
    """Buffers the op allocates for the kernel start as NaN: an element the kernel skips cannot pass."""
    monkeypatch.setattr(ops, "_alloc", lambda like: torch.full_like(like, float("nan"),
                                                                      memory_format=torch.contiguous_format))


@pytest.mark.parametrize("method,kw", FUSED_CASES)
def test_fused_kernel_equals_the_reference_loop(kernel_device, poison, method, kw):
    """The fused launch (Triton; the interpreter on CPU), float32, against the float64 loop: 6 steps, 5 samples of
    [2, 3]."""
    pt = kw.get("prediction_type", "epsilon")
    s = Schedule.linear()
    means = torch.randn(3, 6, generator=_gen(0), dtype=torch.float64)
    g = GaussianMixture(means, [0.2, 0.3, 0.1], schedule=s, prediction_type=pt)
    got = fastrev.sample(g, (5, 2, 3), s, method=method, num_steps=6, seed=3, backend="triton",
                         device=kernel_device, **kw).cpu()
    want = _reference(method, g, _x_T(5, (2, 3), 3, 6), _R(s, 6), 3, pt, kw.get("clip_sample", False))
    assert torch.isfinite(got).all()
    rel = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, rel


# ------------------------------------------------------------------------------------------------ diffusers
def _diffusers_schedule(cls, **cfg):
    """A diffusers scheduler and a fastrev Schedule with the very σ = √((1 − ᾱ)/ᾱ) diffusers steps on (computed in
    float32 from its float32 ᾱ, where 1 − ᾱ near t = 0 keeps few digits): ᾱ = 1/(σ² + 1) in float64, so the two
    differ by the rounding of the steps alone."""
    d = cls(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing", **cfg)
    sig = (((1 - d.alphas_cumprod) / d.alphas_cumprod) ** 0.5).double()
    ab = 1 / (sig**2 + 1)
    return d, Schedule(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]), alpha_bars=ab)


def _wide(s):
    """A 2-D mixture with wide components: a loop whose float32 rounding is not amplified by narrow modes (the demo
    mixture's float32 runs differ from float64 by ~3e-5 at 25 steps; this one by ~2e-6)."""
    return GaussianMixture(torch.tensor([[-1.2, -0.8], [1.3, -0.6], [0.1, 1.4]]), [0.5, 0.4, 0.6], [0.5, 0.3, 0.2],
                           schedule=s)


TOL_DIFFUSERS = 4e-6          # measured: 0.3e-6 – 1.4e-6 (2M, 3M; 10, 25, 50 steps); ours in float32: up to 2.3e-6


def _diffusers_loop(d, g, x, N, sde_seed=None):
    d.set_timesteps(N)
    for k, t in enumerate(d.timesteps):
        eps = g(x, torch.full((x.shape[0],), int(t)))
        kw = {}
        if sde_seed is not None:         # our noise at key i = N − 1 − k (the row)
            kw["variance_noise"] = noise.noise_like(torch.empty(x.shape), sde_seed, N - 1 - k, 0)
        x = d.step(eps, t, x, **kw).prev_sample
    return x


DIFFUSERS_DPM = [("dpmpp_2m", "dpmsolver++", 2, 10), ("dpmpp_2m", "dpmsolver++", 2, 25),
                 ("dpmpp_3m", "dpmsolver++", 3, 10), ("dpmpp_2m_sde", "sde-dpmsolver++", 2, 10)]


@pytest.mark.parametrize("method,alg,order,N", DIFFUSERS_DPM)
def test_dpmpp_matches_diffusers(monkeypatch, method, alg, order, N):
    from diffusers import DPMSolverMultistepScheduler
    d, s = _diffusers_schedule(DPMSolverMultistepScheduler, solver_order=order, algorithm_type=alg)
    g = _wide(s)
    x_T = noise.noise_like(torch.empty(64, 2), 5, N, 0)
    want = _diffusers_loop(d, g, x_T.clone(), N, sde_seed=5 if "sde" in alg else None)
    assert torch.equal(torch.as_tensor(d.timesteps), _R(s, N).timesteps.flip(0))       # the same grid
    got = fastrev.sample(g, (64, 2), s, method=method, num_steps=N, seed=5, backend="reference",
                         dtype=torch.float64)
    err = (got - want.double()).abs().max().item()
    assert err <= TOL_DIFFUSERS, err
    # a history coefficient off by 1e-3 (relative) is far outside that tolerance
    monkeypatch.setattr(MS, "dpmpp_table", _bad(MS.dpmpp_table, "D0", lambda c: c * 1.001))
    s2 = Schedule(s.betas, alpha_bars=s.alpha_bars)
    bad = fastrev.sample(_wide(s2), (64, 2), s2, method=method, num_steps=N, seed=5,
                         backend="reference", dtype=torch.float64)
    assert (bad - want.double()).abs().max().item() > 10 * TOL_DIFFUSERS


@pytest.mark.parametrize("order,N", [(2, 10), (2, 25), (3, 10), (1, 8)])
def test_unipc_matches_diffusers(monkeypatch, order, N):
    from diffusers import UniPCMultistepScheduler
    d, s = _diffusers_schedule(UniPCMultistepScheduler, solver_order=order, solver_type="bh2")
    g = _wide(s)
    x_T = noise.noise_like(torch.empty(64, 2), 5, N, 0)
    want = _diffusers_loop(d, g, x_T.clone(), N)
    got = fastrev.sample(g, (64, 2), s, method="unipc", solver_order=order, num_steps=N, seed=5,
                         backend="reference", dtype=torch.float64)
    err = (got - want.double()).abs().max().item()
    assert err <= TOL_DIFFUSERS, err
    monkeypatch.setattr(MS, "unipc_table", _bad(MS.unipc_table, "AH0", lambda c: c * 1.001))
    s2 = Schedule(s.betas, alpha_bars=s.alpha_bars)
    bad = fastrev.sample(_wide(s2), (64, 2), s2, method="unipc", solver_order=order,
                         num_steps=N, seed=5, backend="reference", dtype=torch.float64)
    assert (bad - want.double()).abs().max().item() > 10 * TOL_DIFFUSERS


def test_3m_sde_differs_from_diffusers_by_its_d2_term():
    """diffusers 0.42.1's sde-dpmsolver++ order 3 weighs D2 by α'((1 − e^{−2h} − 2h)/(2h)² − ½), which tends to −α'
    as h → 0 (k-diffusion's DPM++ 3M SDE and the integral of a quadratic x̂₀(λ) give a term that vanishes); ours
    has k-diffusion's −α'φ3(2h). On a loop the difference is large, not rounding."""
    from diffusers import DPMSolverMultistepScheduler
    d, s = _diffusers_schedule(DPMSolverMultistepScheduler, solver_order=3, algorithm_type="sde-dpmsolver++")
    g = _wide(s)
    N = 10
    want = _diffusers_loop(d, g, noise.noise_like(torch.empty(64, 2), 5, N, 0), N, sde_seed=5)
    got = fastrev.sample(g, (64, 2), s, method="dpmpp_3m_sde", num_steps=N, seed=5, backend="reference",
                         dtype=torch.float64)
    assert (got - want.double()).abs().max().item() > 1e-2
    ref = ref_dpmpp(g, noise.noise_like(torch.empty(64, 2), 5, N, 0).double(), _R(s, N), 3, True, 5)
    assert (got - ref).abs().max().item() <= 1e-9


# ------------------------------------------------------------------------------------------------ structure
def _history_len(method, o):
    return MS.unipc_history(o.solver_order) if method == "unipc" else MS.dpmpp_history(MS.DPMPP_METHODS[method][0])


@pytest.mark.parametrize("method", MULTISTEP_METHODS)
def test_one_launch_per_step_history_in_the_same_pass(monkeypatch, method):
    """Each step is one model call and one fused_step: the history (fixed length: a compile-time property) read in
    the same launch, x̂₀ written into a ring buffer not among the tensors read, the new state over x in place."""
    s, g = _small()
    calls, model_calls = [], []
    real = ops.fused_step

    def spy(table, t, sample, model_output, **kw):
        calls.append(dict(kw, sample=sample))
        return real(table, t, sample, model_output, **kw)

    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(ops, "fused_step", spy)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: (copies.append(1), real_copy(self, *a, **k))[1])
    N = 7
    opts = SampleOptions(method=method, num_steps=N, seed=1, backend="torch")
    fastrev.sample(lambda x, t: (model_calls.append(1), g(x, t))[1], (4, 3), s, opts)
    assert len(calls) == N and len(model_calls) == N and not copies
    want = _history_len(method, opts)
    written = set()
    for c in calls:
        hist = c["history"]
        assert len(hist) == want
        reads = {c["sample"].data_ptr()} | {h.data_ptr() for h in hist}
        x0 = c["x0_out"]
        assert x0.data_ptr() not in reads
        written.add(x0.data_ptr())
        if method == "unipc":
            assert c["aux_out"].data_ptr() not in reads | {x0.data_ptr()}
        else:
            assert c.get("aux_out") is None
        assert c["out"] is c["sample"]                           # the new state written over x
    n_ring = MS.dpmpp_history(MS.DPMPP_METHODS[method][0]) + 1 if method != "unipc" else opts.solver_order + 1
    assert len(written) == n_ring                                # the x̂₀ ring: P + 1 buffers, no allocation per step


@pytest.mark.parametrize("method", MULTISTEP_METHODS)
def test_graph_replay_per_phase_equals_eager(monkeypatch, method):
    """cuda_graph=True captures one step per ring phase and replays it (emulated here: the captured function, with
    its phase's buffers bound): the same samples and callbacks as the eager loop, chunked."""
    monkeypatch.setattr(SG, "GRAPH_IMPL", EmulatedGraph)
    monkeypatch.setattr(SG, "check_graph_support", lambda device, fused: None)
    s, g = _small()
    seen_a, seen_b = [], []
    kw = dict(method=method, num_steps=9, seed=2, batch_size=3)
    a = fastrev.sample(g, (5, 3), s, callback=lambda i, t, x, x0: seen_a.append((t, x0.clone())), **kw)
    b = fastrev.sample(g, (5, 3), s, cuda_graph=True, callback=lambda i, t, x, x0: seen_b.append((t, x0.clone())),
                       **kw)
    assert torch.equal(a, b)
    assert [t for t, _ in seen_a] == [t for t, _ in seen_b]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(seen_a, seen_b, strict=True))
    # the last step lands on the last x̂₀ (first order into σ = 0)
    assert torch.allclose(seen_a[-1][1], a[3:], rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(method=m) for m in MULTISTEP_METHODS] +
                         [dict(method="unipc", solver_order=o) for o in (1, 3)])
def test_cuda_graph_matches_eager(kw):
    """On a GPU: the real per-phase graphs (one memory pool) against the eager loop, two chunks, 11 steps (every
    phase replayed at least once after its capture)."""
    s, g = _small()
    run = dict(num_steps=11, seed=2, batch_size=48, device="cuda", **kw)
    a = fastrev.sample(g, (100, 3), s, **run)
    b = fastrev.sample(g, (100, 3), s, cuda_graph=True, **run)
    assert torch.isfinite(a).all()
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m", "unipc"])
def test_batch_size_and_ranges(method):
    s, g = _small()
    kw = dict(method=method, num_steps=6, seed=4)
    full = fastrev.sample(g, (7, 3), s, **kw)
    assert torch.equal(full, fastrev.sample(g, (7, 3), s, batch_size=3, **kw))
    parts = [fastrev.sampling.sample_range(g, (3,), s, start=a, count=c, **kw) for a, c in ((0, 2), (2, 5))]
    assert torch.equal(full, torch.cat(parts))


# ------------------------------------------------------------------------------------------------ guidance
class _Labelled:
    """model(x, t, label): label 0 the whole mixture, k ≥ 1 its component k − 1 alone (per sample)."""

    def __init__(self):
        s, g = _small()
        self.parts = [g] + [GaussianMixture(g.means[k:k + 1], float(g.stds[k]), schedule=s) for k in range(2)]

    def __call__(self, x, t, label):
        out = torch.empty_like(x)
        for k in label.unique().tolist():
            m = label == k
            out[m] = self.parts[k](x[m], t[m])
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_guided_equals_the_combined_model(kernel_device, backend):
    """Guidance (the halves combined in the fused step) with per-sample scales: the same samples as an unguided run
    of a model that returns u + w·(c − u) itself."""
    model = _Labelled()
    s = model.parts[0].schedule
    cond = torch.tensor([1, 2, 1, 2, 1])
    w = torch.tensor([0.0, 1.0, 2.5, 4.0, 7.0], device=kernel_device if backend == "triton" else "cpu")
    method = "unipc"
    dev = kernel_device if backend == "triton" else torch.device("cpu")
    kw = dict(method=method, num_steps=5, seed=7, backend=backend, device=dev)
    guided = fastrev.sample(model, (5, 3), s, conditioning=cond, negative_conditioning=torch.tensor([0]),
                            guidance_scale=w, **kw)

    def combined(x, t):
        u, c = model(x, t, torch.zeros_like(cond)), model(x, t, cond)
        return u + w.reshape(-1, 1).to(x) * (c - u)

    want = fastrev.sample(combined, (5, 3), s, **kw)
    rel = ((guided - want).abs().max() / want.abs().max()).item()
    assert rel <= 2e-5, rel


# ------------------------------------------------------------------------------------------------ options
def test_defaults_and_options():
    o = SampleOptions(method="dpmpp_2m")
    assert (o.timestep_spacing, o.solver_order, o.prediction_type) == ("trailing", None, "epsilon")
    assert SampleOptions(method="dpmpp_2m", timestep_spacing="leading").timestep_spacing == "leading"
    assert set(DPMPP) <= set(fastrev.samplers.METHODS) and set(MULTISTEP_METHODS) <= set(fastrev.samplers.VP_METHODS)
    assert SampleOptions(method="unipc").solver_order == 2
    assert SampleOptions(method="unipc").replace(method="ddim").solver_order is None        # a default, re-derived
    with pytest.raises(ValueError, match="solver_order only applies"):                       # given: kept, refused
        SampleOptions(method="unipc", solver_order=3).replace(method="ddim")


BAD = [
    (dict(method="dpmpp_2m", solver_order=2), ValueError, "solver_order only applies to method='unipc'"),
    (dict(method="dpmpp_2m", eta=0.5), ValueError, "eta only applies to method='ddim'"),
    (dict(method="dpmpp_3m", snr=0.1), ValueError, "snr only applies to method='pc'"),
    (dict(method="dpmpp_2m_sde", variance_type="fixed_large"), ValueError, "fixed_large' only applies"),
    (dict(method="unipc", solver_order=4), ValueError, r"solver_order must be one of \(1, 2, 3\)"),
    (dict(method="unipc", solver_order=2.0), TypeError, "solver_order must be an int"),
    (dict(method="unipc", solver_order=True), TypeError, "solver_order must be an int"),
    (dict(method="unipc", solver_order=0), ValueError, "solver_order must be one of"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD)
def test_bad_options(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        SampleOptions(**bad)


@pytest.mark.parametrize("method", MULTISTEP_METHODS)
def test_zero_terminal_snr_is_an_error(method):
    """λ = log(α/σ) is −∞ at ᾱ = 0: the solvers cannot start there (a clear error, not NaN)."""
    S = Schedule.linear().rescale_zero_terminal_snr()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        fastrev.sample(GaussianMixture.demo_2d(S, "v_prediction"), (4, 2), S, method=method, num_steps=10,
                       prediction_type="v_prediction")
    x = fastrev.sample(GaussianMixture.demo_2d(S, "v_prediction"), (4, 2), S, method=method, num_steps=10,
                       prediction_type="v_prediction", timestep_spacing="leading")
    assert torch.isfinite(x).all()


def test_orders():
    assert MS.dpmpp_orders(5, 2) == [1, 2, 2, 2, 1]
    assert MS.dpmpp_orders(6, 3) == [1, 2, 3, 3, 2, 1]
    assert MS.dpmpp_orders(16, 3)[-3:] == [3, 3, 1]
    assert MS.dpmpp_orders(1, 3) == [1]
    assert MS.unipc_orders(6, 3) == [1, 2, 3, 3, 2, 1] and MS.unipc_orders(4, 2) == [1, 2, 2, 1]
