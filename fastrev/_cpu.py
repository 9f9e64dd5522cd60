"""The CPU fast path: the table step and the counter stream compiled with numba, one pass over memory.

Off CUDA the default backend ("torch") is the coefficient-table update of :func:`fastrev.tables.apply_table` in
float32. For the common case — float32, CPU, per-sample contiguous tensors, no autograd — this module runs that same
update as one compiled loop that reads x, the model output (and the variance channels, the noise tensor, the
solver history h_0..h_3) once and writes x_{t−1} (and x̂₀, the aux output) once, drawing the counter-stream noise of
:mod:`fastrev.noise` (Philox4x32-10 + Box–Muller) inline. diffusers' step is ~10 full-tensor torch ops plus
``torch.randn``; this is one pass, which is why it is faster than the step it replaces even though Philox costs about
as much as torch's RNG.

Exactness. The update is float32 in the same operation order as the eager torch update (no fast-math: no FMA
contraction, no reassociation), so it equals the eager float32 path bit for bit for fixed variances (tested; the
learned variances' ``exp`` is libm's where torch uses SLEEF's, ≤ 1 ulp). The Philox words are integer arithmetic
(exact); Box–Muller rounds to float32 at the same points as :func:`fastrev.noise.box_muller`, with ``log``, ``sin``
and ``cos`` evaluated in float64 by branch-free polynomials (so the loop vectorizes; libm's scalar calls would cost
~4× more) and rounded once: the correctly rounded float32 value, where torch's SLEEF is within 1 ulp of it. The
normals agree with :func:`fastrev.noise.randn` to ≤ 1e-6 absolute (tests check many (seed, sample, step, element)
combinations). Each element's value depends only on (seed, sample index, step, element), never on how the loop is
split across threads: any thread count gives the same bits.

Threads: ``torch.get_num_threads()`` of them — the calling thread and a small pool of Python threads running the
GIL-free kernels on contiguous ranges of 4096-element blocks (no second OpenMP runtime competing with torch's; inputs
under 2¹⁶ elements stay on the calling thread; a forked child starts its own pool). Compiled once per machine
(``cache=True``: numba's on-disk cache next to the module, or ``NUMBA_CACHE_DIR``); a few seconds on the first call
when the cache is cold.

``AVAILABLE`` is False when numba is not installed; the callers then use the eager torch path (same results, slower
counter noise). numba is imported at the first compiled step (not by ``import fastrev``); the kernels live in
:mod:`fastrev._cpu_kernels`.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

AVAILABLE = importlib.util.find_spec("numba") is not None
_K = None


def _kernels():
    """The numba kernels module, imported on first use."""
    global _K
    if _K is None:
        from . import _cpu_kernels
        _K = _cpu_kernels
    return _K


__all__ = ["AVAILABLE", "eligible", "table_step", "counter_normals"]

# noise modes, clip modes (the kernel's meaning; local values)
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2
_EMPTY2 = np.zeros((1, 1), dtype=np.float32)
_EMPTY1 = np.zeros(1, dtype=np.float32)


_POOL = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_MIN_PARALLEL = 1 << 16             # elements: below this one thread is faster than waking others


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there (DataLoader workers etc.)."""
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _launch(kernel, args, B: int, N: int) -> None:
    """Run ``kernel(*args, job0, job1)`` over the B × ceil(N / 4 / _GROUPS_PER_BLOCK) work items, split into
    contiguous ranges across ``torch.get_num_threads()`` threads (the calling thread takes the first range; the
    kernels release the GIL). Every element's value is independent of the split."""
    global _POOL, _POOL_SIZE
    gpb = _kernels()._GROUPS_PER_BLOCK
    nblk = ((N + 3) // 4 + gpb - 1) // gpb
    jobs = B * nblk
    n = min(torch.get_num_threads(), jobs) if B * N >= _MIN_PARALLEL else 1
    if n <= 1:
        kernel(*args, 0, jobs)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n - 1:    # grow; a caller still holding the old pool finishes on it, and
            # its idle threads exit once it is garbage (never shut down under a concurrent caller)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(n - 1, thread_name_prefix="fastrev-cpu"), n - 1
        pool = _POOL
    bounds = [jobs * k // n for k in range(n + 1)]
    futures = [pool.submit(kernel, *args, bounds[k], bounds[k + 1]) for k in range(1, n)]
    kernel(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()


def _seed_words(seed: torch.Tensor):
    s = int(seed.reshape(-1)[0])                  # a CPU tensor: no device sync
    return np.uint64(s & 0xFFFFFFFF), np.uint64((s >> 32) & 0xFFFFFFFF)


def _rows2d(x: torch.Tensor, B: int, N: int) -> np.ndarray:
    """[B, N] numpy view of a per-sample contiguous float32 CPU tensor (any batch stride)."""
    if B and x.is_contiguous() and not x.requires_grad:     # the common case in two calls: the same C-order view
        return x.numpy().reshape(B, N)
    return x.detach().as_strided((B, N), (x.stride(0) if x.dim() else N, 1)).numpy() if B else \
        np.zeros((0, N), np.float32)


def per_sample_contiguous(x: torch.Tensor) -> bool:
    """Contiguous within each sample (dims 1..), any batch stride: what the kernel's and this pass's [B, N] view
    can read in place."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def eligible(*tensors) -> bool:
    """True when the compiled loop can take these tensors as they are: numba present, plain float32 CPU tensors
    (not a subclass, not a functorch/vmap wrapper, not while torch.compile traces), per-sample contiguous, at least
    1-D, no autograd (None entries are skipped). Anything else runs the eager torch update."""
    if not AVAILABLE or torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() < 1 \
                or t.requires_grad or not per_sample_contiguous(t) or _is_wrapped(t):
            return False
    return True


def _is_wrapped(t: torch.Tensor) -> bool:
    return _functorch_wrapped is not None and _functorch_wrapped(t)


_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def counter_normals(seed: torch.Tensor, sample_index: torch.Tensor, step: torch.Tensor, out: torch.Tensor) -> None:
    """Fill float32 CPU ``out`` ([B, ...], per-sample contiguous) with the counter stream of :mod:`fastrev.noise`
    for samples ``sample_index`` (int64 [B]) at ``step`` (int64 [B]) under ``seed`` (int64, one element)."""
    B = out.shape[0]
    N = out[0].numel() if B else 0
    if B == 0 or N == 0:
        return
    k0, k1 = _seed_words(seed)
    _launch(_kernels()._normals_kernel, (_rows2d(out, B, N), sample_index.numpy(), step.numpy(), k0, k1), B, N)


def table_step(coef, x, o, *, var=None, z=None, base=None, thresh=None, clip=False, var_mode=0, seed=None,
               sample_index=None, step=None, stochastic=False, prev, x0=None, history=None, aux=None,
               x0_noise=False) -> None:
    """One table update into ``prev`` (and ``x0``, ``aux``): ``coef`` float32 [B, NCOL] (the gathered rows), tensors
    as in :func:`fastrev.tables.apply_table` (float32, CPU, per-sample contiguous; check :func:`eligible`). Noise:
    ``z`` if given, else the counter stream of ``seed`` for ``sample_index``/``step`` when ``stochastic``.
    ``thresh``: float32 [B] dynamic-threshold scales (clip mode "threshold"). ``history``: up to four tensors
    h_0..h_3 (coef's columns D0..D3); ``base`` is a history of one (give one or the other). ``aux``: written with
    AX0·x̂₀ + AX·x + Σ_j AHj·h_j; ``x0_noise``: x̂₀ += Z0·z before the clip (needs noise; not with ``thresh``)."""
    B = x.shape[0]
    N = x.numel() // B if B else 0
    if B == 0 or N == 0:
        return
    if thresh is not None:
        clip_mode = CLIP_THRESHOLD
    else:
        clip_mode = CLIP_RANGE if clip else CLIP_NONE
    if not stochastic:
        noise_mode = NOISE_NONE
    elif z is not None:
        noise_mode = NOISE_TENSOR
    else:
        noise_mode = NOISE_PHILOX
    hist = (base,) if history is None and base is not None else tuple(history or ())
    from .tables import columns_needed
    if len(hist) > 4 or coef.shape[1] < columns_needed(len(hist), aux is not None, x0_noise):
        raise ValueError(f"history: at most 4 tensors and a coef with every column the update reads, got "
                         f"{len(hist)} and {coef.shape[1]} columns")
    if x0_noise and (noise_mode == NOISE_NONE or clip_mode == CLIP_THRESHOLD):
        raise ValueError("x0_noise needs noise and cannot be combined with thresholding")
    hs = [_rows2d(h, B, N) for h in hist] + [_EMPTY2] * (4 - len(hist))
    if noise_mode == NOISE_PHILOX:
        k0, k1 = _seed_words(seed)
        si, st = sample_index.numpy(), step.numpy()
    else:
        k0 = k1 = np.uint64(0)
        si = st = _I64
    args = (_rows2d(x, B, N), _rows2d(o, B, N), _EMPTY2 if var is None else _rows2d(var, B, N),
            _EMPTY2 if z is None else _rows2d(z, B, N), *hs,
            coef.numpy(), _EMPTY1 if thresh is None else thresh.numpy(), si, st, k0, k1,
            _rows2d(prev, B, N), _EMPTY2 if x0 is None else _rows2d(x0, B, N),
            _EMPTY2 if aux is None else _rows2d(aux, B, N),
            clip_mode, var_mode, noise_mode, len(hist), x0 is not None, aux is not None, bool(x0_noise))
    _launch(_kernels()._step_kernel, args, B, N)


_I64 = np.zeros(1, dtype=np.int64)
