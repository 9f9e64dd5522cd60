"""The default path off CUDA: backend "torch", the coefficient-table update in float32.

* no float64 tensor is created on the sample's device by the ops, ``fastrev.sample`` or the drop-ins' step (a
  TorchDispatchMode watches every op; host-side table building is allowed, it is what the path is built on);
* it matches the float64 reference within a float32 bound that a 1e-3 coefficient error fails;
* the compiled CPU loop (fastrev._cpu) draws fastrev.noise's counter stream (≤ 1e-6), equals the eager float32
  torch update, and does not depend on the thread count or on concurrent callers.
"""

import contextlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastrev
from fastrev import Schedule, _cpu, ddim_step, ddpm_step, noise, ops
from fastrev import tables as T

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = Schedule.linear()
SHAPE = (3, 3, 5, 7)            # 105 elements per sample: not a multiple of 4


# ------------------------------------------------------------------------------------------------ the float64 watch
class NoFloat64(TorchDispatchMode):
    """Records every op that produces a float64 tensor on ``device`` (unless paused: host-side table building)."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.hits = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device == self.device:
                    self.hits.append(str(func))
        return out


_ACTIVE: list = []


@contextlib.contextmanager
def _host_side():
    """Pause the watch: tables built on the host (float64 by design) before they are cast for the device."""
    for m in _ACTIVE:
        m.paused += 1
    try:
        yield
    finally:
        for m in _ACTIVE:
            m.paused -= 1


@contextlib.contextmanager
def no_float64(monkeypatch, device="cpu"):
    """Watch the block; host-side table builders (Schedule construction and its cached tables, the samplers'
    respacing, fastrev.tables' float64 [T] builders) run unwatched. Fails listing the float64 ops seen."""
    import fastrev.sampling.coefficients as coefficients
    import fastrev.sampling.plan as plan

    def paused(fn):
        def wrapper(*a, **k):
            with _host_side():
                return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(Schedule, "cached", paused(Schedule.cached))
    monkeypatch.setattr(Schedule, "__init__", paused(Schedule.__init__))
    monkeypatch.setattr(plan, "respaced", paused(plan.respaced))
    for name in [n for n in dir(coefficients) if n.endswith(("_table", "_sigmas"))]:
        monkeypatch.setattr(coefficients, name, paused(getattr(coefficients, name)))   # the samplers' builders
    for name in ("x0_coefficients", "eps_coefficients", "eps_linear", "finish_table", "ddpm_table", "ddim_table"):
        monkeypatch.setattr(T, name, paused(getattr(T, name)))          # the float64 [T] host-side builders
    mode = NoFloat64(device)
    _ACTIVE.append(mode)
    try:
        with mode:
            yield mode
    finally:
        _ACTIVE.remove(mode)
    assert not mode.hits, f"float64 tensors created on {device}: {sorted(set(mode.hits))}"


def test_the_watch_sees_float64(monkeypatch):
    with pytest.raises(AssertionError, match="float64 tensors created"):
        with no_float64(monkeypatch):
            torch.ones(3).double() * 2
    with no_float64(monkeypatch):                       # host-side building is not watched
        with _host_side():
            torch.ones(3).double() * 2


# ------------------------------------------------------------------------------------------------ backends
def test_backend_vocabulary():
    assert ops.BACKENDS == ("auto", "triton", "torch", "reference")
    assert ops.resolve_backend("auto", "cpu") == "torch"
    assert ops.resolve_backend("auto", "cpu", any_f64=True) == "torch"
    assert ops.resolve_backend("auto", "cpu", needs_grad=True) == "torch"
    assert ops.resolve_backend("torch", "cpu") == "torch"
    assert ops.resolve_backend("reference", "cpu") == "reference"
    assert ops.resolve_backend("auto", "mps") == "torch"
    assert ops.resolve_backend("auto", "xpu") == "torch"
    assert ops.resolve_backend("auto", "cuda") == "triton"
    assert ops.resolve_backend("auto", "cuda", any_f64=True) == "torch"
    assert ops.resolve_backend("auto", "cuda", needs_grad=True) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("numba", "cpu")
    with pytest.raises(ValueError, match="supports CUDA"):
        ops.resolve_backend("triton", "mps")
    assert ops.table_dtype("triton") == ops.table_dtype("torch") == torch.float32
    assert ops.table_dtype("torch", any_f64=True) == ops.table_dtype("reference") == torch.float64


# ------------------------------------------------------------------------------------------------ ops: no float64
DDPM_CASES = [(p, v, c) for p in ("epsilon", "sample", "v_prediction")
              for v in ("fixed_small", "fixed_large", "learned", "learned_range")
              for c in ("none", "clip", "threshold")]
DDIM_CASES = [(p, eta, c, u) for p in ("epsilon", "sample", "v_prediction") for eta in (0.0, 0.5, 1.0)
              for c in ("none", "clip", "threshold") for u in (False, True)]


def _clip_kw(c):
    return dict(clip_sample=c == "clip", thresholding=c == "threshold", sample_max_value=1.5)


def _xo(learned=False, dtype=torch.float32, shape=SHAPE, gen=None):
    g = gen or torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    oshape = (shape[0], 2 * shape[1]) + shape[2:] if learned else shape
    o = torch.randn(oshape, generator=g).to(dtype)
    if learned:
        o[:, shape[1]:] = o[:, shape[1]:].tanh() * 0.9 + (0.05 if dtype else 0)
    return x, o


def _noise_kw(src, x):
    if src == "seed":
        return dict(seed=7, sample_offset=3)
    if src == "noise":
        return dict(noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(x.dtype))
    return dict(generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pred,var,clip", DDPM_CASES)
def test_ddpm_step_no_float64(monkeypatch, pred, var, clip):
    learned = var in ("learned", "learned_range")
    x, o = _xo(learned)
    t = torch.tensor([0, 1, 640])
    for src in ("seed", "noise", "generator"):
        kw = dict(prediction_type=pred, variance_type=var, **_clip_kw(clip), **_noise_kw(src, x))
        ddpm_step(o, t, x, S, **kw)                                      # builds the table (host side)
        with no_float64(monkeypatch):
            r = ddpm_step(o, t, x, S, **kw)
        assert r.prev_sample.dtype == torch.float32 and torch.isfinite(r.prev_sample).all()


@pytest.mark.parametrize("pred,eta,clip,use_clipped", DDIM_CASES)
def test_ddim_step_no_float64(monkeypatch, pred, eta, clip, use_clipped):
    x, o = _xo()
    kw = dict(prediction_type=pred, eta=eta, use_clipped_model_output=use_clipped, **_clip_kw(clip), seed=4)
    ddim_step(o, 500, x, S, **kw)
    with no_float64(monkeypatch):
        r = ddim_step(o, 500, x, S, **kw)
    assert torch.isfinite(r.prev_sample).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_no_float64(monkeypatch, dtype):
    x, o = _xo(dtype=dtype)
    ddpm_step(o, 500, x, S, seed=1, thresholding=True)
    with no_float64(monkeypatch):
        r = ddpm_step(o, 500, x, S, seed=1, thresholding=True)
        ddim_step(o, 500, x, S, seed=1, eta=1.0, clip_sample=True)
    assert r.prev_sample.dtype == dtype


def test_autograd_and_strided_inputs_no_float64(monkeypatch):
    x, o = _xo()
    xc = x.to(memory_format=torch.channels_last)
    ddpm_step(o, 500, xc, S, seed=1)
    with no_float64(monkeypatch):
        ddpm_step(o, 500, xc, S, seed=1)                                 # a layout the compiled loop does not take
        og = o.clone().requires_grad_(True)
        ddim_step(og, 300, x, S).prev_sample.sum().backward()
    assert og.grad is not None and og.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ sample / drop-ins
def _model(x, t):
    return 0.5 * x + 0.01 * t.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype) / 1000


@pytest.mark.parametrize("method,extra", [("ddpm", {}), ("ddim", dict(eta=0.5)), ("sde", {}), ("ode", {}),
                                          ("ode", dict(ode_solver="euler")), ("pc", {}),
                                          ("pc", dict(corrector_norms="sample")),
                                          ("ddpm", dict(clip_sample=True))])
def test_sample_no_float64(monkeypatch, method, extra):
    kw = dict(method=method, num_steps=4, seed=3, device="cpu", **extra)
    fastrev.sample(_model, (2, 3, 4, 5), S, **kw)
    with no_float64(monkeypatch):
        x = fastrev.sample(_model, (2, 3, 4, 5), S, **kw)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("cfg", [{}, dict(clip_sample=False), dict(thresholding=True, sample_max_value=1.5),
                                 dict(prediction_type="v_prediction")])
def test_dropin_step_no_float64(monkeypatch, kind, cfg):
    fd = pytest.importorskip("fastrev.diffusers")
    sch = (fd.FastDDPMScheduler if kind == "ddpm" else fd.FastDDIMScheduler)(**cfg)
    sch.set_timesteps(10)
    sch.noise_seed = 5
    x, o = _xo()
    t = int(sch.timesteps[3])
    kw = {"eta": 1.0} if kind == "ddim" else {}
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    modes = [dict(generator=torch.Generator().manual_seed(0)), dict(variance_noise=z), {}]   # exact ×2, fast
    for m in modes:
        sch.step(o, t, x, **kw, **m)
    for m in modes:
        with no_float64(monkeypatch):
            r = sch.step(o, t, x, **kw, **m)
        assert r.prev_sample.dtype == torch.float32 and torch.isfinite(r.prev_sample).all()


# ------------------------------------------------------------------------------------------------ accuracy
def _bound(table, t, x, o, z, clip):
    """Per-element float32 error budget of the update, from the float64 table. x̂₀ = A·x + B·o is two products and
    a sum, each rounded at 2⁻²⁴ ≈ 6e-8 relative, with coefficients rounded to float32 too: |error| ≤ ~4 roundings ×
    (|A·x| + |B·o|) — the cancellation at large t (1/√ᾱ ≈ 157) is part of it; clipping is 1-Lipschitz and keeps it.
    x_{t−1} adds C0·x̂₀ + C1·x + C2·o + σ·z (≤ 8 more roundings on the sum of the terms' magnitudes, and C0 times
    x̂₀'s error). 1e-6 × magnitudes covers both with margin; a coefficient off by 1e-3 moves the result by 1e-3 ×
    its term, far above it (checked below)."""
    c = table[t].double()
    sh = (t.shape[0],) + (1,) * (x.dim() - 1)

    def col(n):
        return c[:, T.COL[n]].reshape(sh)

    xd, od = x.double(), o.double()
    x0 = col("A") * xd + col("B") * od
    mag0 = (col("A") * xd).abs() + (col("B") * od).abs()
    if clip:
        x0 = x0.clamp(-1, 1)
    mag = (col("C0") * x0).abs() + col("C0").abs() * mag0 + (col("C1") * xd).abs() + (col("C2") * od).abs()
    if z is not None:
        mag = mag + (col("SIGMA") * z.double()).abs()
    return 1e-6 * mag + 1e-30, 1e-6 * mag0 + 1e-30


def _within(got, want, bound):
    err = (got.double() - want.double()).abs()
    return bool(torch.isfinite(got).all()) and bool((err <= bound).all())


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_float32_path_matches_float64_reference(pred, clip, kind):
    g = torch.Generator().manual_seed(11)
    x = torch.randn((6, 4, 9, 9), generator=g)
    o = torch.randn((6, 4, 9, 9), generator=g)
    z = torch.randn((6, 4, 9, 9), generator=g)
    t = torch.tensor([0, 1, 2, 250, 700, 999])
    if kind == "ddpm":
        table = T.ddpm_table(S, pred, "fixed_small", clip)
        step = lambda b: ddpm_step(o, t, x, S, prediction_type=pred, clip_sample=clip, noise=z, backend=b)  # noqa
    else:
        table = T.ddim_table(S, pred, 0.7, clip, 1.0, False)
        step = lambda b: ddim_step(o, t, x, S, prediction_type=pred, eta=0.7, clip_sample=clip, noise=z,  # noqa
                                   backend=b)
    got, want = step("torch"), step("reference")
    bp, b0 = _bound(table, t, x, o, z, clip)
    assert _within(got.prev_sample, want.prev_sample, bp)
    assert _within(got.pred_original_sample, want.pred_original_sample, b0)
    # the bound is tight enough: the same update with one coefficient off by 1e-3 (relative) fails it
    for name in ("C1", "C2", "SIGMA") if not clip else ("C0", "C1", "SIGMA"):
        bad = table.clone()
        bad[:, T.COL[name]] *= 1 + 1e-3
        if bad[t, T.COL[name]].abs().max() == 0:
            continue
        wrong = ops.fused_step(bad.float(), t, x, o, clip=clip, noise=z, backend="torch").prev_sample
        assert not _within(wrong, want.prev_sample, bp), name


def test_compiled_loop_equals_eager_float32_update():
    """fastrev._cpu's one pass against tables.apply_table in float32 (torch ops): same inputs, same order."""
    g = torch.Generator().manual_seed(3)
    for var, learned in (("fixed_small", False), ("learned_range", True), ("learned", True)):
        x = torch.randn((3, 2, 6, 7), generator=g)
        o = torch.randn((3, 4 if learned else 2, 6, 7), generator=g)
        if learned:
            o[:, 2:] = o[:, 2:].tanh()
        z = torch.randn(x.shape, generator=g)
        base = torch.randn(x.shape, generator=g)
        t = torch.tensor([1, 500, 999])
        for (clip, thr), bs, zz in itertools.product(((False, False), (True, False), (True, True)), (None, base),
                                                      (None, z)):
            tab = T.ddpm_table(S, "epsilon", var, clip).float()
            tab[:, T.COL["D"]] = 0.25
            kw = dict(learned=learned, variance_type=var, clip=clip, thresholding=thr, sample_max_value=1.5,
                      noise=zz, base=bs, backend="torch", stochastic=zz is not None)
            fast = ops.fused_step(tab, t, x, o, **kw)
            assert _cpu.eligible(x, o, z, base)
            slow = ops.fused_step(tab, t, x.to(memory_format=torch.channels_last), o, **kw)  # eager torch ops
            tol = 0 if var == "fixed_small" or zz is None else 2e-6       # exp: libm vs SLEEF, ≤ 1 ulp
            torch.testing.assert_close(fast.prev_sample, slow.prev_sample, rtol=tol, atol=tol)
            torch.testing.assert_close(fast.pred_original_sample, slow.pred_original_sample, rtol=0, atol=0)
            # in place over the sample (what the samplers do)
            y = x.clone()
            ops.fused_step(tab, t, y, o, out=y, **kw)
            torch.testing.assert_close(y, fast.prev_sample, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the counter stream
SEEDS = [0, 1, 12345, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63), 2**64 - 1, 0x9E3779B97F4A7C15]
NUMELS = [1, 2, 3, 4, 5, 7, 8, 9, 1023, 4095, 4097, 8193]


@pytest.mark.skipif(not _cpu.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_stream_equals_fastrev_noise(seed):
    g = torch.Generator().manual_seed(abs(seed) % 1000)
    for k, numel in enumerate(NUMELS):
        B = 1 + k % 3
        idx = torch.randint(0, 2**40, (B,), generator=g)
        idx[0] = [0, 1, 2**32 - 1, 2**32 + 5][k % 4]
        step = torch.randint(0, 2**33, (B,), generator=g)
        step[0] = [0, 1, 999, 1000][k % 4]
        out = torch.full((B, numel), float("nan"))
        _cpu.counter_normals(noise.as_seed_tensor(seed, "cpu"), idx, step, out)
        want = noise.randn(seed, idx, step, numel)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_compiled_stream_in_the_step():
    x, o = _xo(shape=(5, 3, 11, 13))                    # 429 elements per sample
    t = torch.tensor([3, 999, 1, 500, 77])
    for off in (0, 9, 2**32 + 1):
        want = noise.randn(21, torch.arange(5) + off, t, 429).reshape(x.shape)
        by_seed = ddpm_step(o, t, x, S, seed=21, sample_offset=off).prev_sample
        by_noise = ddpm_step(o, t, x, S, noise=want).prev_sample
        torch.testing.assert_close(by_seed, by_noise, rtol=0, atol=2e-6)


def test_large_stream_crosses_blocks_and_threads():
    """> 2¹⁶ elements: split across threads and 4096-element blocks; a tail not divisible by 4."""
    numel = 3 * 4096 * 2 + 4099
    idx, step = torch.tensor([0, 2**32 + 7]), torch.tensor([1000, 5])
    out = torch.empty(2, numel)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        _cpu.counter_normals(noise.as_seed_tensor(99, "cpu"), idx, step, out)
    finally:
        torch.set_num_threads(prev)
    want = noise.randn(99, idx, step, numel)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_thread_count_and_concurrency_do_not_change_bits():
    x, o = _xo(shape=(4, 4, 64, 65))
    t = torch.tensor([999, 500, 2, 1])
    prev = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(ddpm_step(o, t, x, S, seed=5, clip_sample=True).prev_sample)
        torch.set_num_threads(2)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(lambda: ddpm_step(o, t, x, S, seed=5, clip_sample=True).prev_sample)
                       for _ in range(8)]
            results += [f.result() for f in futures]
    finally:
        torch.set_num_threads(prev)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    assert threading.active_count() < 64


def test_vmap_and_subclasses_take_the_eager_path():
    x, o = _xo()
    want = torch.stack([ddim_step(o[i:i + 1], 500, x[i:i + 1], S, eta=0.0).prev_sample[0] for i in range(3)])
    got = torch.vmap(lambda a, b: ddim_step(b[None], 500, a[None], S, eta=0.0).prev_sample[0])(x, o)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    class Sub(torch.Tensor):
        pass

    assert not _cpu.eligible(x.as_subclass(Sub))
    assert _cpu.eligible(x, o)


def test_float64_table_is_cast_once_and_recast_after_rewrite(monkeypatch):
    x, o = _xo()
    t = torch.tensor([5, 5, 5])
    tab = T.ddpm_table(S, "epsilon", "fixed_small", False)              # float64, as a caller may still pass
    a = ops.fused_step(tab, t, x, o, stochastic=False, backend="torch").prev_sample
    with no_float64(monkeypatch):
        b = ops.fused_step(tab, t, x, o, stochastic=False, backend="torch").prev_sample
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ops.fused_step(tab.float(), t, x, o, stochastic=False,
                                                 backend="torch").prev_sample, rtol=0, atol=0)
    tab[5, T.COL["C1"]] *= 2                                              # an in-place rewrite (set_timesteps)
    c = ops.fused_step(tab, t, x, o, stochastic=False, backend="torch").prev_sample
    assert not torch.equal(a, c)
    torch.testing.assert_close(c, ops.fused_step(tab.float(), t, x, o, stochastic=False,
                                                 backend="torch").prev_sample, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_sorted_dynamic_threshold_equals_the_quantile_one(dtype, n):
    """The MPS/XPU thresholding (one sort, plain arithmetic) against reference.dynamic_threshold (torch.quantile)."""
    from fastrev.reference import dynamic_threshold
    g = torch.Generator().manual_seed(n)
    x0 = (torch.randn((4, n), generator=g) * torch.tensor([0.5, 2.0, 3.0, 10.0])[:, None]).to(dtype)
    for ratio, mx in ((0.995, 1.0), (0.9, 2.5), (0.5, 100.0), (1.0, 4.0)):
        got = T.sorted_dynamic_threshold(x0, ratio, mx)
        want = dynamic_threshold(x0, ratio, mx)
        assert got.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else (1e-14 if dtype == torch.float64 else 1e-2)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_runs_the_threaded_loop():
    """A DataLoader-style fork after the parent used the thread pool: the child starts its own (no hang). The child
    compares with numpy: torch's own multi-threaded ops are not fork-safe (libgomp), the compiled step is."""
    import subprocess
    import sys
    code = ("import os, torch, fastrev\n"
            "torch.set_num_threads(2)\n"
            "S = fastrev.Schedule.linear(); x = torch.randn(4, 4, 128, 128)\n"
            "a = fastrev.ddpm_step(x, 500, x, S, seed=1).prev_sample\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    b = fastrev.ddpm_step(x, 500, x, S, seed=1).prev_sample\n"
            "    import numpy as np\n"
            "    os._exit(0 if np.array_equal(a.numpy(), b.numpy()) else 3)\n"
            "_, st = os.waitpid(pid, 0)\n"
            "print('child', os.waitstatus_to_exitcode(st))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "child 0" in res.stdout, res.stderr
