"""The fused reverse step: one Triton kernel, one memory pass.

Every tensor is seen as ``[B, N]``: a batch stride and N contiguous elements per sample (a plain tensor, a batch
slice, or the ε-half of a ``[B, 2C, ...]`` learned-variance output all qualify without a copy). Each program owns
``SUBTILES`` tiles of ``SAMPLES × BLOCK_N`` elements (``SAMPLES > 1`` packs several small samples into one program;
``SUBTILES`` consecutive tiles of a large sample, processed in a loop: 2 × 1024 over 4 warps, or 8 × 256 over 2
warps for 32-bit storage with the counter noise — fewer values live across Philox, full occupancy; see
:func:`launch_config`) and gathers its samples' coefficient rows from the float32 table by their step t, read from
device memory: nothing per-step is a Python scalar, so a captured CUDA graph replays correctly at every step, and
nothing is ``tl.constexpr`` but the shape of the work (no recompiles across steps).

Per element (see ``fastrev.tables`` for the table's columns)::

    out     = the model output, or g_u·out_u + g_c·out_c with classifier-free guidance (the two halves of it)
    x̂₀      = A·x + B·out [+ Z0·z]         → clip (±CLIP) or dynamic threshold (per-sample s, from a pre-pass)
    x_{t−1} = C0·x̂₀ + C1·x + C2·out + Σ_j Dj·h_j + σ·z   σ fixed or per element from the learned-variance channels
    aux     = AX0·x̂₀ + AX·x + Σ_j AHj·h_j                (AUX: a third output, written in the same pass)
    z       = the caller's noise, or Philox4x32-10(seed; e//4, i, k, 0) through Box–Muller — fastrev.noise's stream,
              with k the per-sample noise step (the table row t unless the caller gives another)

h_0..h_{HISTORY−1} is the solver history: up to four more state tensors read in the same pass, with their own table
columns D0..D3 (and AH0..AH3 in aux; ``base``, i.e. h_0 with column D = D0, is Heun's second stage; multistep
solvers pass earlier x̂₀'s, the x̂₀ this kernel writes being the next entry, double-buffered by the caller). HISTORY
(0–4), AUX (an aux output is given) and X0_NOISE (Z0·z enters x̂₀ before the clip: Euler's churn, the same z as
x_{t−1}'s) are compile-time properties of the launch: never per-step values. Each history tensor costs one more read,
aux one more write; X0_NOISE moves no byte (z is generated, or read, once).

Bytes moved per element for each mode (history length, guidance, noise source, dtype): docs/kernel.md; how the
benchmarks count them: docs/benchmarks.md#bytes-moved.

Host side: one launcher, :func:`reverse_step`, taking the tensors as a :class:`StepTensors` named tuple and the
modes of :mod:`fastrev.kernels.modes`; it picks int32/int64 offsets, the grid and the CUDA device, and goes through
the registered ``torch.ops.fastrev.reverse_step`` when torch.compile traces it. docs/kernel.md has the cost model.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastrev.kernels import modes
from fastrev.kernels.modes import (
    CLIP_NONE,
    CLIP_RANGE,
    CLIP_THRESHOLD,
    NOISE_NONE,
    NOISE_PHILOX,
    NOISE_TENSOR,
    VAR_FIXED,
    VAR_LINEAR,
    VAR_LOG,
    VAR_RANGE,
)

__all__ = ["StepTensors", "reverse_step", "device_guard", "INTERPRET", "CLIP_NONE", "CLIP_RANGE", "CLIP_THRESHOLD",
           "VAR_FIXED", "VAR_LOG", "VAR_RANGE", "VAR_LINEAR", "NOISE_NONE", "NOISE_TENSOR", "NOISE_PHILOX"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# table columns (fastrev.tables.COL)
_A, _B, _C0, _C1, _C2, _SIGMA, _LOG_LO, _LOG_HI, _CLIP, _D0, _D1, _D2, _D3 = (tl.constexpr(i) for i in range(13))
_AX0, _AX, _AH0, _AH1, _AH2, _AH3, _Z0 = (tl.constexpr(i) for i in range(13, 20))
_D = _D0            # the history-of-one column (``base``), by its older name
MAX_HISTORY = 4


# ------------------------------------------------------------------------------------------------ device functions
# The normals of fastrev.noise without libdevice's general-purpose log/sin/cos: the arguments here have known ranges
# (u1 in [1e-7, 1), the angle 2π·u2 in [0, 2π)), so one argument reduction serves both sin and cos and no special
# cases are needed. All in float32 with ordinary rounding (no approximate hardware functions): within 1e-6 of the
# reference stream (tests/test_kernel.py), and identical on every backend Triton compiles for.

# Philox4x32-10 (Salmon et al. 2011), as tl.philox: round multipliers and key increments
_PHILOX_M0, _PHILOX_M1 = tl.constexpr(0xD2511F53), tl.constexpr(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = tl.constexpr(0x9E3779B9), tl.constexpr(0xBB67AE85)
# π/2 split in two: HI has 20 significant bits, so k·HI is exact for the quadrants k ≤ 4 and θ − k·HI is exact
_PIO2_HI = tl.constexpr(1.5707950592041016)
_PIO2_LO = tl.constexpr(1.2675908465098473e-06)
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
_ROUND_MAGIC = tl.constexpr(12582912.0)      # 1.5·2²³: x + MAGIC rounds x to an integer held in the low bits
# sin r = r + r³·(SIN0 + z·SIN1 + z²·SIN2), cos r = 1 + z·(−½ + z·(COS0 + z·COS1 + z²·COS2)), z = r², |r| ≤ π/4
# (least-squares fits, relative error below one float32 ulp on that interval)
_SIN0, _SIN1, _SIN2 = tl.constexpr(-0.16666662693023682), tl.constexpr(0.008332503959536552), \
    tl.constexpr(-0.0001954892068170011)
_COS0, _COS1, _COS2 = tl.constexpr(0.04166635870933533), tl.constexpr(-0.0013869121903553605), \
    tl.constexpr(2.2145530238049105e-05)
# log u = e·ln 2 + log1p(f), u = 2^e·(1 + f), 1 + f in [2/3, 4/3); log1p(f) = f − f²/2 + f³·P(f), P of degree 6
_LN2_HI, _LN2_LO = tl.constexpr(0.693359375), tl.constexpr(-0.00021219444170128554)
_TWO_THIRDS_BITS = tl.constexpr(0x3F2AAAAB)
_LOG0, _LOG1, _LOG2, _LOG3 = tl.constexpr(0.3333335816860199), tl.constexpr(-0.25001609325408936), \
    tl.constexpr(0.19996868073940277), tl.constexpr(-0.1654772311449051)
_LOG4, _LOG5, _LOG6 = tl.constexpr(0.14299945533275604), tl.constexpr(-0.14633670449256897), \
    tl.constexpr(0.12258646637201309)


@triton.jit
def _mul_wide(a, m: tl.constexpr):
    """(high, low) 32-bit words of the 64-bit product a·m: one wide multiply instead of mul.hi + mul.lo."""
    p = a.to(tl.uint64) * m
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1); bit-exact with ``tl.philox``."""
    for _ in tl.static_range(10):
        hi0, lo0 = _mul_wide(c0, _PHILOX_M0)
        hi2, lo2 = _mul_wide(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _uniform(w):
    """uint32 words → float32 uniforms in [0, 1), as ``tl.random.uint_to_uniform_float``."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _minus_2_log(u):
    """−2·log u for float32 u in [1e-7, 1) (positive, normal: no special cases). The −2 is folded into the
    constants: scaling by a power of two is exact, so this is bit-for-bit −2 × the plain evaluation."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits - _TWO_THIRDS_BITS) >> 23                       # u = 2^e·m, m in [2/3, 4/3)
    f = (bits - (e << 23)).to(tl.float32, bitcast=True) - 1.0  # exact
    p = (-2.0 * _LOG6) * f + (-2.0 * _LOG5)
    p = p * f + (-2.0 * _LOG4)
    p = p * f + (-2.0 * _LOG3)
    p = p * f + (-2.0 * _LOG2)
    p = p * f + (-2.0 * _LOG1)
    p = p * f + (-2.0 * _LOG0)
    ef = e.to(tl.float32)
    return ef * (-2.0 * _LN2_HI) + ((f * f) * (p * f + 1.0) + (-2.0 * f) + ef * (-2.0 * _LN2_LO))


@triton.jit
def _sincos(th):
    """(sin θ, cos θ) for float32 θ in [0, 2π]: one shared quadrant reduction, two short polynomials."""
    j = th * _TWO_OVER_PI + _ROUND_MAGIC
    k = j - _ROUND_MAGIC                                      # nearest quadrant, 0..4
    q = j.to(tl.int32, bitcast=True)                          # its low bits: k mod 4
    r = th - k * _PIO2_HI                                     # exact
    r = r - k * _PIO2_LO                                      # |r| ≤ π/4 + ε
    z = r * r
    s = (z * (_SIN2 * z + _SIN1) + _SIN0) * (z * r) + r
    c = (z * ((_COS2 * z + _COS1) * z + _COS0) - 0.5) * z + 1.0
    swap = (q & 1) != 0
    sin_abs = tl.where(swap, c, s).to(tl.int32, bitcast=True)
    cos_abs = tl.where(swap, s, c).to(tl.int32, bitcast=True)
    sin_t = (sin_abs ^ ((q << 30) & -2147483648)).to(tl.float32, bitcast=True)          # negative in quadrants 2, 3
    cos_t = (cos_abs ^ (((q + 1) << 30) & -2147483648)).to(tl.float32, bitcast=True)    # negative in quadrants 1, 2
    return sin_t, cos_t


@triton.jit
def _box_muller(u1, u2):
    """Two float32 uniform tiles [S, Q] → two standard-normal tiles [S, Q] (``tl.random.pair_uniform_to_normal``)."""
    u1 = tl.maximum(1.0e-7, u1)
    r = tl.sqrt(_minus_2_log(u1))
    s, c = _sincos(6.283185307179586 * u2)
    return r * c, r * s


@triton.jit
def _group_normals(seed_lo, seed_hi, group, sample, step):
    """Word k of Philox(seed; group, sample, step, 0) through Box–Muller, for k = 0..3: four float32 tiles."""
    zero = tl.zeros(group.shape, dtype=tl.uint32)
    w0, w1, w2, w3 = _philox(group.to(tl.uint32) + zero, sample.to(tl.uint32) + zero, step.to(tl.uint32) + zero,
                             zero, seed_lo, seed_hi)
    n0, n1 = _box_muller(_uniform(w0), _uniform(w1))
    n2, n3 = _box_muller(_uniform(w2), _uniform(w3))
    return n0, n1, n2, n3


@triton.jit
def _counter_normals(seed_lo, seed_hi, group0, sample, step, SAMPLES: tl.constexpr, BLOCK_N: tl.constexpr,
                     VEC: tl.constexpr):
    """The counter stream of ``fastrev.noise`` for a tile.

    seed_lo, seed_hi: the two uint32 words of the seed (the Philox key); group0: the tile's first element group (its
    first element // 4); sample: [SAMPLES] global sample indices i; step: [SAMPLES] steps t. Returns float32
    [SAMPLES, BLOCK_N]: element 4g + k is word k of Philox(seed; g, i, t, 0) through Box–Muller — all four words of
    every Philox call are used.

    VEC (4 or 8) is the number of consecutive elements one thread loads at once (16 bytes of the storage dtype): the
    noise is built in the same register layout (8: two consecutive groups per thread), so it needs no shuffle
    through shared memory.
    """
    lo, hi = seed_lo, seed_hi
    s = sample.to(tl.uint32)[:, None]
    t = step.to(tl.uint32)[:, None]
    if VEC == 8:
        H: tl.constexpr = BLOCK_N // 8
        g = (group0 + 2 * tl.arange(0, H))[None, :]                   # even groups; g + 1 the odd ones
        a0, a1, a2, a3 = _group_normals(lo, hi, g, s, t)
        b0, b1, b2, b3 = _group_normals(lo, hi, g + 1, s, t)
        # [S, H, 2, 2, 2] with [.., i, j, k] = n_{2j+k} of group 2h + i... built as join(a, b) on the last axis, then
        # that axis moved in front of the two word axes
        za = tl.join(tl.join(a0, a2), tl.join(a1, a3))
        zb = tl.join(tl.join(b0, b2), tl.join(b1, b3))
        z = tl.permute(tl.join(za, zb), (0, 1, 4, 2, 3))
    else:
        Q: tl.constexpr = BLOCK_N // 4
        g = (group0 + tl.arange(0, Q))[None, :]
        n0, n1, n2, n3 = _group_normals(lo, hi, g, s, t)
        # interleave so that element 4g + k holds n_k: join → [S, Q, 2, 2] with [.., i, j] = n_{2i+j}
        z = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(z, [SAMPLES, BLOCK_N])


@triton.jit
def _tile_noise(noise_ptr, stride_noise, rows, cols, mask, seed_lo, seed_hi, first, sample_rows, step,
                NOISE_MODE: tl.constexpr, SAMPLES: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr):
    """z for a tile, float32 [SAMPLES, BLOCK_N]: the caller's noise tensor, or the counter stream."""
    if NOISE_MODE == modes.NOISE_TENSOR:
        z = tl.load(noise_ptr + rows[:, None] * stride_noise + cols[None, :], mask=mask, other=0.0)
        z = z.to(tl.float32)
    else:  # modes.NOISE_PHILOX
        z = _counter_normals(seed_lo, seed_hi, first // 4, sample_rows, step, SAMPLES, BLOCK_N, VEC)
    return z


# ------------------------------------------------------------------------------------------------ the kernel
@triton.jit(do_not_specialize=["sample_offset"])
def _reverse_step_kernel(
    x_ptr, out_ptr, var_ptr, noise_ptr,                  # inputs [B, N]: x_t, model output, variance channels, z
    h0_ptr, h1_ptr, h2_ptr, h3_ptr,                      # inputs [B, N]: the solver history (the first HISTORY read)
    thresh_ptr, table_ptr, t_ptr, step_ptr, seed_ptr,    # fp32 [B]; fp32 [T, NCOL]; int64 [B]; int64 [B]; int64 [1]
    prev_ptr, x0_ptr, aux_ptr,                           # outputs [B, N]
    cond_ptr, guide_ptr,                                 # guidance: conditional output [B, N]; fp32 [B, 2]
    B, N, sample_offset,
    stride_x, stride_out, stride_var, stride_noise, stride_h0, stride_h1, stride_h2, stride_prev, stride_x0,
    stride_cond, table_stride, stride_h3, stride_aux,   # (the last two after the older ones: their ints keep their
                                                        # 8-byte pairing in the parameter block, one load per pair)
    CLIP_MODE: tl.constexpr, VAR_MODE: tl.constexpr, NOISE_MODE: tl.constexpr, WRITE_X0: tl.constexpr,
    HISTORY: tl.constexpr, GUIDED: tl.constexpr, AUX: tl.constexpr, X0_NOISE: tl.constexpr,
    SAMPLES: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILES: tl.constexpr, INT64: tl.constexpr,
):
    """One program: SAMPLES samples × SUBTILES consecutive tiles of BLOCK_N elements. The per-program work (the
    coefficient rows, the seed, Philox's key schedule) is done once for all SUBTILES tiles."""
    # grid: (element blocks, sample groups split over axes 1 and 2 as the 65535 limit requires) - no division
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_z = tl.program_id(2)
    if INT64:
        pid_n = pid_n.to(tl.int64)
        pid_b = pid_b.to(tl.int64)
        pid_z = pid_z.to(tl.int64)
    pid_b += pid_z * tl.num_programs(1)
    rows = pid_b * SAMPLES + tl.arange(0, SAMPLES)          # [S] samples of this program
    row_ok = rows < B

    # per-sample step and coefficient row (tiny gathers, cached)
    t = tl.load(t_ptr + rows, mask=row_ok, other=0)
    coef = table_ptr + t * table_stride
    a = tl.load(coef + _A, mask=row_ok, other=0.0)[:, None]
    b = tl.load(coef + _B, mask=row_ok, other=0.0)[:, None]
    c0 = tl.load(coef + _C0, mask=row_ok, other=0.0)[:, None]
    c1 = tl.load(coef + _C1, mask=row_ok, other=0.0)[:, None]
    c2 = tl.load(coef + _C2, mask=row_ok, other=0.0)[:, None]
    sig = tl.load(coef + _SIGMA, mask=row_ok, other=0.0)[:, None]
    if CLIP_MODE == modes.CLIP_RANGE:
        lim = tl.load(coef + _CLIP, mask=row_ok, other=1.0)[:, None]
    elif CLIP_MODE == modes.CLIP_THRESHOLD:
        lim = tl.load(thresh_ptr + rows, mask=row_ok, other=1.0)[:, None]
    if HISTORY >= 1:
        d0 = tl.load(coef + _D0, mask=row_ok, other=0.0)[:, None]
    if HISTORY >= 2:
        d1 = tl.load(coef + _D1, mask=row_ok, other=0.0)[:, None]
    if HISTORY >= 3:
        d2 = tl.load(coef + _D2, mask=row_ok, other=0.0)[:, None]
    if HISTORY >= 4:
        d3 = tl.load(coef + _D3, mask=row_ok, other=0.0)[:, None]
    if AUX:         # aux = AX0·x̂₀ + AX·x + Σ_j AHj·h_j
        ax0 = tl.load(coef + _AX0, mask=row_ok, other=0.0)[:, None]
        ax = tl.load(coef + _AX, mask=row_ok, other=0.0)[:, None]
        if HISTORY >= 1:
            ah0 = tl.load(coef + _AH0, mask=row_ok, other=0.0)[:, None]
        if HISTORY >= 2:
            ah1 = tl.load(coef + _AH1, mask=row_ok, other=0.0)[:, None]
        if HISTORY >= 3:
            ah2 = tl.load(coef + _AH2, mask=row_ok, other=0.0)[:, None]
        if HISTORY >= 4:
            ah3 = tl.load(coef + _AH3, mask=row_ok, other=0.0)[:, None]
    if X0_NOISE:    # x̂₀ += Z0·z before the clip (Euler's churn: the noise enters x̂₀ too)
        z0c = tl.load(coef + _Z0, mask=row_ok, other=0.0)[:, None]
    if GUIDED:      # out = g_u·uncond + g_c·cond (g_u = f·(1 − w), g_c = f·w; f the guidance-rescale factor)
        g_u = tl.load(guide_ptr + 2 * rows, mask=row_ok, other=0.0)[:, None]
        g_c = tl.load(guide_ptr + 2 * rows + 1, mask=row_ok, other=0.0)[:, None]
    if VAR_MODE == modes.VAR_RANGE:
        log_lo = tl.load(coef + _LOG_LO, mask=row_ok, other=0.0)[:, None]
        log_hi = tl.load(coef + _LOG_HI, mask=row_ok, other=0.0)[:, None]
    seed_lo = 0
    seed_hi = 0
    step = t
    VEC: tl.constexpr = 8 if (x_ptr.dtype.element_ty.primitive_bitwidth == 16 and BLOCK_N >= 8) else 4
    if NOISE_MODE == modes.NOISE_PHILOX:
        if VEC == 8:
            seed = tl.load(seed_ptr).to(tl.uint64)
            seed_lo, seed_hi = (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32)
        else:   # the key as two 32-bit loads (little-endian words): with the halves of a 64-bit load, LLVM widens
            # Philox's 32-bit xors with the key to 64 bits, and each wide multiply then costs one more add
            seed_words = seed_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
            seed_lo = tl.load(seed_words)
            seed_hi = tl.load(seed_words + 1)
        step = tl.load(step_ptr + rows, mask=row_ok, other=0)

    for sub in tl.range(0, SUBTILES, loop_unroll_factor=1):     # a loop, not unrolled: registers of one tile
        first = (pid_n * SUBTILES + sub) * BLOCK_N
        cols = first + tl.arange(0, BLOCK_N)                # [BN] elements within each sample
        mask = row_ok[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + rows[:, None] * stride_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GUIDED:  # classifier-free guidance: both halves of the model output combined in registers
            oc = tl.load(cond_ptr + rows[:, None] * stride_cond + cols[None, :], mask=mask, other=0.0)
            o = g_u * o + g_c * oc.to(tl.float32)

        x0 = a * x + b * o
        if X0_NOISE:        # z before x̂₀: the same z enters x̂₀ and x_{t−1}
            z = _tile_noise(noise_ptr, stride_noise, rows, cols, mask, seed_lo, seed_hi, first, rows + sample_offset,
                            step, NOISE_MODE, SAMPLES, BLOCK_N, VEC)
            x0 += z0c * z
        if CLIP_MODE == modes.CLIP_RANGE:
            x0 = tl.clamp(x0, -lim, lim, propagate_nan=tl.PropagateNan.ALL)
        elif CLIP_MODE == modes.CLIP_THRESHOLD:
            x0 = tl.clamp(x0, -lim, lim, propagate_nan=tl.PropagateNan.ALL) / lim
        prev = c0 * x0 + c1 * x + c2 * o
        if AUX:
            aux = ax0 * x0 + ax * x
        if HISTORY >= 1:        # the solver history, in order h_0..h_3 (the twins add in the same order)
            h = tl.load(h0_ptr + rows[:, None] * stride_h0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            prev += d0 * h
            if AUX:
                aux += ah0 * h
        if HISTORY >= 2:
            h = tl.load(h1_ptr + rows[:, None] * stride_h1 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            prev += d1 * h
            if AUX:
                aux += ah1 * h
        if HISTORY >= 3:
            h = tl.load(h2_ptr + rows[:, None] * stride_h2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            prev += d2 * h
            if AUX:
                aux += ah2 * h
        if HISTORY >= 4:
            h = tl.load(h3_ptr + rows[:, None] * stride_h3 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            prev += d3 * h
            if AUX:
                aux += ah3 * h

        if NOISE_MODE != modes.NOISE_NONE:
            if VAR_MODE == modes.VAR_FIXED:
                sigma = sig
            else:
                v = tl.load(var_ptr + rows[:, None] * stride_var + cols[None, :], mask=mask, other=0.0)
                v = v.to(tl.float32)
                if VAR_MODE == modes.VAR_LOG:
                    sigma = sig * tl.exp(0.5 * v)
                elif VAR_MODE == modes.VAR_RANGE:
                    frac = (v + 1.0) * 0.5
                    sigma = sig * tl.exp(0.5 * (frac * log_hi + (1.0 - frac) * log_lo))
                else:  # modes.VAR_LINEAR
                    sigma = sig * tl.sqrt(v)
            if not X0_NOISE:
                z = _tile_noise(noise_ptr, stride_noise, rows, cols, mask, seed_lo, seed_hi, first,
                                rows + sample_offset, step, NOISE_MODE, SAMPLES, BLOCK_N, VEC)
            # gate on the table's switch, not on σ: at a no-noise step (SIGMA = 0) nothing is added, even where the
            # learned-variance channels would make σ NaN (√ of a negative variance, 0·inf)
            prev = tl.where(sig != 0.0, prev + sigma * z, prev)

        tl.store(prev_ptr + rows[:, None] * stride_prev + cols[None, :], prev.to(prev_ptr.dtype.element_ty),
                 mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + rows[:, None] * stride_x0 + cols[None, :], x0.to(x0_ptr.dtype.element_ty), mask=mask)
        if AUX:
            tl.store(aux_ptr + rows[:, None] * stride_aux + cols[None, :], aux.to(aux_ptr.dtype.element_ty),
                     mask=mask)


# ------------------------------------------------------------------------------------------------ host side
_TILE = 1024          # elements per tile
_SUBTILES = 2         # tiles per program once a sample fills a tile (the per-program work amortised over 2048)
_NUM_WARPS = 4
# 32-bit storage with the in-kernel counter noise, once a sample fills a program: the same 2048 elements per program
# as 8 tiles of 256 over 2 warps — 4 elements (one Philox group) per thread and tile instead of 8, so fewer values
# are live across Philox and Box–Muller: 32 registers (full occupancy on sm_90) instead of 40 (docs/kernel.md)
_NOISE_TILE_32 = (256, 8, 2)      # BLOCK_N, SUBTILES, num_warps
_MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


class StepTensors(NamedTuple):
    """The tensors of one step. Every [B, ...] tensor is contiguous within each sample (any batch stride).

    x, out: x_t and the model output (its ε/x₀/v part); table: float32 [T, NCOL] contiguous; t: int64 [B] contiguous
    table rows; prev: x_{t−1} (written). Optional: var (learned-variance channels), noise (z), base (history entry
    h_0, column D0 = D; Heun's third state), thresh (float32 [B] dynamic-threshold scale), step (int64 [B] noise
    steps; None: t), seed (int64 [1], read iff noise_mode is NOISE_PHILOX), x0 (x̂₀, written when given), cond +
    guide (classifier-free guidance: the conditional half of the model output, and float32 [B, 2] contiguous
    (g_u, g_c): the output used is g_u·out + g_c·cond, with ``out`` the unconditional half), h1, h2, h3 (history
    entries h_1..h_3, columns D1..D3: each needs the one before, h1 needs base — the launch's HISTORY is how many are
    given), aux (written when given: AX0·x̂₀ + AX·x + Σ_j AHj·h_j; the launch's AUX).
    """
    x: torch.Tensor
    out: torch.Tensor
    table: torch.Tensor
    t: torch.Tensor
    prev: torch.Tensor
    var: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    base: torch.Tensor | None = None
    thresh: torch.Tensor | None = None
    step: torch.Tensor | None = None
    seed: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    guide: torch.Tensor | None = None
    h1: torch.Tensor | None = None
    h2: torch.Tensor | None = None
    h3: torch.Tensor | None = None
    aux: torch.Tensor | None = None

    @property
    def history(self) -> tuple:
        """The history tensors given, in order (h_0 = ``base``, h_1, h_2, h_3): a prefix, its length the HISTORY."""
        hs = (self.base, self.h1, self.h2, self.h3)
        n = sum(h is not None for h in hs)
        if any(h is None for h in hs[:n]):
            raise ValueError("StepTensors: the history must be given in order (h1 needs base, h2 needs h1, h3 "
                             "needs h2)")
        return hs[:n]


def _tile(n: int):
    """(SAMPLES, BLOCK_N, SUBTILES) for N elements per sample: one sample per program once N fills a tile; then
    SUBTILES tiles per program while N has that many."""
    block_n = max(4, min(_TILE, triton.next_power_of_2(max(n, 1))))
    samples = max(1, _TILE // block_n)
    return samples, block_n, (_SUBTILES if samples == 1 and n > block_n else 1)


def launch_config(n: int, elem_bytes: int = 4, noise_mode: int = NOISE_NONE, hip: bool = False):
    """(SAMPLES, BLOCK_N, SUBTILES, num_warps) of a launch over N elements per sample in ``elem_bytes``-byte storage
    (x's dtype) with ``noise_mode``; ``hip``: an AMD GPU (64-wide wavefronts: the 4-warp tiles)."""
    samples, block_n, subtiles = _tile(n)
    if samples == 1 and subtiles == _SUBTILES and elem_bytes == 4 and noise_mode == NOISE_PHILOX and not hip:
        block_n, subtiles, warps = _NOISE_TILE_32
        assert block_n * subtiles == _TILE * _SUBTILES          # the same grid
        return 1, block_n, subtiles, warps
    return samples, block_n, subtiles, _NUM_WARPS


def _span(t: torch.Tensor | None, B: int, N: int) -> int:
    """Largest element offset a [B, N] view of ``t`` can touch (+1)."""
    if t is None or B == 0:
        return 0
    return (B - 1) * abs(t.stride(0)) + N


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device (cuda:1, a torchrun rank ...)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_COLUMN_NAMES = ("A", "B", "C0", "C1", "C2", "SIGMA", "LOG_LO", "LOG_HI", "CLIP", "D0", "D1", "D2", "D3", "AX0", "AX",
                 "AH0", "AH1", "AH2", "AH3", "Z0")


def _check_columns(table: torch.Tensor, n_hist: int, aux: bool, x0_noise: bool) -> None:
    """The table must have every column the launch reads (an older 12-column table serves every launch without
    HISTORY = 4, aux or x0_noise)."""
    ncol = table.shape[-1]
    if n_hist and ncol <= _D0 + n_hist - 1:
        raise ValueError(f"table: a launch with {n_hist} history tensors needs columns D0..D{n_hist - 1}, "
                         f"got a table of {ncol} columns")
    need = []
    if aux:
        need.append(("an aux output", _AH0.value + n_hist - 1 if n_hist else _AX.value))
    if x0_noise:
        need.append(("x0_noise", _Z0.value))
    for what, c in need:
        if ncol <= c:
            raise ValueError(f"table: a launch with {what} reads column {_COLUMN_NAMES[c]} (index {c}), got a table "
                             f"of {ncol} columns (build it with fastrev.tables.finish_table: NCOL = 20)")


def _launch(kernel, ts: StepTensors, sample_offset: int, clip_mode: int, var_mode: int, noise_mode: int,
            force_int64: bool, x0_noise: bool = False) -> None:
    x, prev = ts.x, ts.prev
    B = x.shape[0]
    N = x[0].numel() if B else 0
    hist = ts.history
    _check_columns(ts.table, len(hist), ts.aux is not None, x0_noise)
    if x0_noise and noise_mode == NOISE_NONE:
        raise ValueError("x0_noise: adding Z0·z to x̂₀ needs noise (noise_mode NOISE_TENSOR or NOISE_PHILOX)")
    if x0_noise and clip_mode == CLIP_THRESHOLD:
        raise ValueError("x0_noise cannot be combined with dynamic thresholding (its pre-pass does not see z)")
    if B == 0 or N == 0:
        return
    samples, block_n, subtiles, warps = launch_config(N, x.element_size(), noise_mode,
                                                      hip=getattr(torch.version, "hip", None) is not None)
    # int64 offsets only when some tensor's [B, N] view reaches past 2^31 elements (chosen here, on the host)
    span = max(_span(a, B, N) for a in (x, ts.out, ts.var, ts.noise, *hist, prev, ts.x0, ts.aux, ts.cond))
    int64 = bool(force_int64) or span >= 2**31 - 1 or B >= 2**31 - 1
    groups = triton.cdiv(B, samples)
    grid = (triton.cdiv(N, block_n * subtiles), min(groups, _MAX_GRID_YZ), triton.cdiv(groups, _MAX_GRID_YZ))
    # absent optional tensors: any valid pointer (never read: the constexpr modes switch their loads off)
    either = lambda a, b: b if a is None else a  # noqa: E731
    stride = lambda a: 0 if a is None else a.stride(0)  # noqa: E731
    with device_guard(x.device):
        kernel[grid](
            x, ts.out, either(ts.var, x), either(ts.noise, x), either(ts.base, x), either(ts.h1, x), either(ts.h2, x),
            either(ts.h3, x), either(ts.thresh, x), ts.table,
            ts.t, either(ts.step, ts.t), either(ts.seed, ts.t), prev, either(ts.x0, prev), either(ts.aux, prev),
            either(ts.cond, x), either(ts.guide, ts.table), B, N, int(sample_offset),
            x.stride(0), ts.out.stride(0), stride(ts.var), stride(ts.noise), stride(ts.base), stride(ts.h1),
            stride(ts.h2), prev.stride(0), stride(ts.x0), stride(ts.cond), ts.table.stride(0), stride(ts.h3),
            stride(ts.aux),
            CLIP_MODE=clip_mode, VAR_MODE=var_mode, NOISE_MODE=noise_mode, WRITE_X0=ts.x0 is not None,
            HISTORY=len(hist), GUIDED=ts.cond is not None, AUX=ts.aux is not None, X0_NOISE=bool(x0_noise),
            SAMPLES=samples, BLOCK_N=block_n, SUBTILES=subtiles, INT64=int64, num_warps=warps,
        )


def reverse_step(ts: StepTensors, *, sample_offset: int = 0, clip_mode: int = CLIP_NONE, var_mode: int = VAR_FIXED,
                 noise_mode: int = NOISE_NONE, force_int64: bool = False, via_op: bool | None = None,
                 x0_noise: bool = False) -> None:
    """Launch the fused step: writes ``ts.prev`` (and ``ts.x0``, ``ts.aux``). The one launcher of the kernel.

    ``sample_offset``: global index of sample 0 in the counter stream; the modes are :mod:`fastrev.kernels.modes`
    constants; ``force_int64`` forces 64-bit offsets (chosen automatically past 2³¹ elements). ``x0_noise``: add
    Z0·z to x̂₀ before the clip (the launch's X0_NOISE; needs a noise mode, not with thresholding). ``via_op``: go
    through the registered op ``torch.ops.fastrev.reverse_step`` (default: only while torch.compile traces the
    call; eager calls launch directly, tens of µs less per step where the step is launch-bound).
    """
    if via_op is None:
        via_op = _is_compiling()
    if via_op:
        _op(*ts, int(sample_offset), int(clip_mode), int(var_mode), int(noise_mode), bool(force_int64),
            bool(x0_noise))
    else:
        _launch(_reverse_step_kernel, ts, sample_offset, clip_mode, var_mode, noise_mode, force_int64, x0_noise)


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _register():
    """Register through ``torch.library.triton_op`` so torch.compile'd code calls the kernel without a graph
    break (the compiler sees the Triton kernel itself). The op's schema is StepTensors' fields, then the modes."""
    triton_op = getattr(torch.library, "triton_op", None)
    wrap = getattr(torch.library, "wrap_triton", None)
    if triton_op is None or wrap is None:  # pragma: no cover - torch < 2.6
        n = len(StepTensors._fields)
        return lambda *a: _launch(_reverse_step_kernel, StepTensors(*a[:n]), *a[n:])

    @triton_op("fastrev::reverse_step", mutates_args={"prev", "x0", "aux"})
    def _reverse_step_op(x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, t: torch.Tensor, prev: torch.Tensor,
                         var: torch.Tensor | None, noise: torch.Tensor | None, base: torch.Tensor | None,
                         thresh: torch.Tensor | None, step: torch.Tensor | None, seed: torch.Tensor | None,
                         x0: torch.Tensor | None, cond: torch.Tensor | None, guide: torch.Tensor | None,
                         h1: torch.Tensor | None, h2: torch.Tensor | None, h3: torch.Tensor | None,
                         aux: torch.Tensor | None, sample_offset: int, clip_mode: int, var_mode: int, noise_mode: int,
                         force_int64: bool, x0_noise: bool) -> None:
        ts = StepTensors(x, out, table, t, prev, var, noise, base, thresh, step, seed, x0, cond, guide, h1, h2, h3,
                         aux)
        _launch(wrap(_reverse_step_kernel), ts, sample_offset, clip_mode, var_mode, noise_mode, force_int64,
                x0_noise)

    return _reverse_step_op


_op = _register()
