"""numba kernels of :mod:`fastrev._cpu` (imported on first use, so that ``import fastrev`` does not import numba)."""

import numpy as np
from numba import njit

_GROUPS_PER_BLOCK = 1024                # 4096 elements per work item: big enough to amortise, small enough to balance

_M32 = np.uint64(0xFFFFFFFF)
_RA, _RB = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KA, _KB = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_SH = np.uint64(32)
_HALF = np.uint64(0x80000000)
_SCALE = np.float32(4.6566127342e-10)
_TWO_PI = np.float32(6.283185307179586)
_TINY = np.float32(1.0e-7)
_M2 = np.float32(-2.0)


@njit(inline="always", cache=True, error_model="numpy")
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 values holding uint32 words (products fit in 64 bits)."""
    for _ in range(10):
        p0 = _RB * c2
        p1 = _RA * c0
        n0 = (p0 >> _SH) ^ c1 ^ k0
        n1 = p0 & _M32
        n2 = (p1 >> _SH) ^ c3 ^ k1
        n3 = p1 & _M32
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + _KA) & _M32
        k1 = (k1 + _KB) & _M32
    return c0, c1, c2, c3


@njit(inline="always", cache=True, error_model="numpy")
def _uniform(w):
    """uint32 word → float32 in [0, 1), as Triton's uint_to_uniform_float (int32 bitcast, ~x if negative)."""
    v = w if w < _HALF else _M32 - w
    return np.float32(v) * _SCALE


@njit(inline="always", cache=True, error_model="numpy")
def _log64(u):
    """ln(u), float64, for u in [2^-31, 1]: u·2^31 = m·2^k with m in [√½, √2) by exact power-of-two scalings,
    then ln m = 2·atanh(s), s = (m − 1)/(m + 1), |s| < 0.172 (series to s^15: relative error < 1e-12).
    Branch-free, so the loop around it vectorizes (libm's logf does not)."""
    q = u * 2147483648.0
    c = q >= 65536.0
    q = q * (1.52587890625e-05 if c else 1.0)
    k = 16.0 if c else 0.0
    c = q >= 256.0
    q = q * (0.00390625 if c else 1.0)
    k = k + (8.0 if c else 0.0)
    c = q >= 16.0
    q = q * (0.0625 if c else 1.0)
    k = k + (4.0 if c else 0.0)
    c = q >= 4.0
    q = q * (0.25 if c else 1.0)
    k = k + (2.0 if c else 0.0)
    c = q >= 2.0
    q = q * (0.5 if c else 1.0)
    k = k + (1.0 if c else 0.0)
    c = q > 1.4142135623730951
    q = q * (0.5 if c else 1.0)
    k = k + (1.0 if c else 0.0)
    s = (q - 1.0) / (q + 1.0)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p + (k - 31.0) * 0.6931471805599453


@njit(inline="always", cache=True, error_model="numpy")
def _sincos64(th):
    """(sin θ, cos θ), float64, for θ in [0, 2π]: quadrant reduction with a two-part π/2 (Cody–Waite), then
    Taylor polynomials on |r| ≤ π/4 (to r^15 / r^16: error < 1e-15). Branch-free."""
    kq = np.floor(th * 0.6366197723675814 + 0.5)
    r = (th - kq * 1.5707963267948966) - kq * 6.123233995736766e-17
    r2 = r * r
    sp = -1.0 / 1307674368000.0
    sp = sp * r2 + 1.0 / 6227020800.0
    sp = sp * r2 - 1.0 / 39916800.0
    sp = sp * r2 + 1.0 / 362880.0
    sp = sp * r2 - 1.0 / 5040.0
    sp = sp * r2 + 1.0 / 120.0
    sp = sp * r2 - 1.0 / 6.0
    sn = r + r * r2 * sp
    cp = 1.0 / 20922789888000.0
    cp = cp * r2 - 1.0 / 87178291200.0
    cp = cp * r2 + 1.0 / 479001600.0
    cp = cp * r2 - 1.0 / 3628800.0
    cp = cp * r2 + 1.0 / 40320.0
    cp = cp * r2 - 1.0 / 720.0
    cp = cp * r2 + 1.0 / 24.0
    cp = cp * r2 - 0.5
    cs = 1.0 + r2 * cp
    q = kq - 4.0 * np.floor(kq * 0.25)          # quadrant 0..3: sin = s, c, −s, −c; cos = c, −s, −c, s
    odd = q - 2.0 * np.floor(q * 0.5)
    s_ = cs * odd + sn * (1.0 - odd)
    c_ = sn * odd + cs * (1.0 - odd)
    s_ = s_ * (-1.0 if q >= 2.0 else 1.0)
    c_ = c_ * (-1.0 if (q == 1.0) | (q == 2.0) else 1.0)
    return s_, c_


@njit(inline="always", cache=True, error_model="numpy")
def _fill_normals(Z, i, t, g0, g1, k0, k1, UA, UB):
    """Z[0 : 4·(g1 − g0)] = the counter-stream normals of groups g0..g1 of sample i at step t.

    Three vectorizable loops: Philox words → float32 uniforms (pairs (w0, w1) and (w2, w3) side by side),
    then Box–Muller exactly as fastrev.noise.box_muller: u1 = max(u1, 1e-7), θ = fl32(2π·u2),
    r = fl32(√fl32(−2·fl32(ln u1))), n = r·fl32(cos θ), r·fl32(sin θ) — the transcendentals in float64 and
    rounded once to float32 (torch's SLEEF versions are within 1 ulp of that)."""
    i = np.uint64(i) & _M32
    t = np.uint64(t) & _M32
    n = g1 - g0
    for j in range(n):
        w0, w1, w2, w3 = _philox(np.uint64(g0 + j) & _M32, i, t, np.uint64(0), k0, k1)
        UA[2 * j] = _uniform(w0)
        UB[2 * j] = _uniform(w1)
        UA[2 * j + 1] = _uniform(w2)
        UB[2 * j + 1] = _uniform(w3)
    for p in range(2 * n):
        u1 = max(UA[p], _TINY)
        th = _TWO_PI * UB[p]
        r = np.sqrt(_M2 * np.float32(_log64(np.float64(u1))))
        sn, cs = _sincos64(np.float64(th))
        Z[2 * p] = r * np.float32(cs)
        Z[2 * p + 1] = r * np.float32(sn)


@njit(nogil=True, cache=True, error_model="numpy")
def _normals_kernel(out, sidx, steps, k0, k1, job0, job1):
    B, N = out.shape
    G = (N + 3) // 4
    nblk = (G + _GROUPS_PER_BLOCK - 1) // _GROUPS_PER_BLOCK
    UA = np.empty(2 * _GROUPS_PER_BLOCK, np.float32)
    UB = np.empty(2 * _GROUPS_PER_BLOCK, np.float32)
    Z = np.empty(4 * _GROUPS_PER_BLOCK, np.float32)
    for job in range(job0, job1):
        b = job // nblk
        g0 = (job % nblk) * _GROUPS_PER_BLOCK
        g1 = min(g0 + _GROUPS_PER_BLOCK, G)
        _fill_normals(Z, sidx[b], steps[b], g0, g1, k0, k1, UA, UB)
        e0 = 4 * g0
        e1 = min(4 * g1, N)
        for e in range(e0, e1):
            out[b, e] = Z[e - e0]


@njit(inline="always", cache=True, error_model="numpy")
def _add_history(ps, As, hs, d, ah, want_aux):
    """One history term over a block: x_{t−1} += d·h (and aux += ah·h), a straight loop LLVM vectorizes."""
    for j in range(ps.shape[0]):
        hv = hs[j]
        ps[j] = ps[j] + d * hv
        if want_aux:
            As[j] = As[j] + ah * hv


@njit(nogil=True, cache=True, error_model="numpy")
def _step_kernel(x, o, v, z, h0, h1, h2, h3, coef, thresh, sidx, steps, k0, k1, prev, x0, aux, clip_mode, var_mode,
                 noise_mode, n_hist, want_x0, want_aux, x0_noise, job0, job1):
    """The table update of fastrev.tables.apply_table, float32, one pass over work items [job0, job1) of
    B × ceil(N / 4 / _GROUPS_PER_BLOCK); [B, N] views, coef float32 [B, NCOL]. Same operation order as
    apply_table (no fast-math), so the results are the eager float32 update's. ``n_hist``: the history h_0..h_3
    read (0-4), with coef's columns 9..12 (D0..D3); ``want_aux``: write aux = AX0·x̂₀ + AX·x + Σ_j AHj·h_j
    (columns 13, 14, 15..18); ``x0_noise``: x̂₀ += Z0·z before the clip (column 19). Columns past 11 are read only
    when used (an older 12-column table serves the rest)."""
    B, N = x.shape
    G = (N + 3) // 4
    nblk = (G + _GROUPS_PER_BLOCK - 1) // _GROUPS_PER_BLOCK
    UA = np.empty(2 * _GROUPS_PER_BLOCK, np.float32)
    UB = np.empty(2 * _GROUPS_PER_BLOCK, np.float32)
    Z = np.empty(4 * _GROUPS_PER_BLOCK, np.float32)
    X0S = np.empty(4 * _GROUPS_PER_BLOCK, np.float32)
    PS = np.empty(4 * _GROUPS_PER_BLOCK, np.float32)
    AUXS = np.empty(4 * _GROUPS_PER_BLOCK, np.float32)
    one = np.float32(1.0)
    half = np.float32(0.5)
    for job in range(job0, job1):
        b = job // nblk
        g0 = (job % nblk) * _GROUPS_PER_BLOCK
        g1 = min(g0 + _GROUPS_PER_BLOCK, G)
        e0 = 4 * g0
        e1 = min(4 * g1, N)
        a, bb, c0, c1, c2 = coef[b, 0], coef[b, 1], coef[b, 2], coef[b, 3], coef[b, 4]
        sig, lo, hi, r = coef[b, 5], coef[b, 6], coef[b, 7], coef[b, 8]
        d0 = coef[b, 9] if n_hist >= 1 else np.float32(0.0)
        d1 = coef[b, 10] if n_hist >= 2 else np.float32(0.0)
        d2 = coef[b, 11] if n_hist >= 3 else np.float32(0.0)
        d3 = coef[b, 12] if n_hist >= 4 else np.float32(0.0)
        ax0 = coef[b, 13] if want_aux else np.float32(0.0)
        axc = coef[b, 14] if want_aux else np.float32(0.0)
        ah0 = coef[b, 15] if want_aux and n_hist >= 1 else np.float32(0.0)
        ah1 = coef[b, 16] if want_aux and n_hist >= 2 else np.float32(0.0)
        ah2 = coef[b, 17] if want_aux and n_hist >= 3 else np.float32(0.0)
        ah3 = coef[b, 18] if want_aux and n_hist >= 4 else np.float32(0.0)
        z0c = coef[b, 19] if x0_noise else np.float32(0.0)
        if clip_mode == 2:
            r = thresh[b]
        add_noise = noise_mode != 0 and sig != 0
        if (add_noise or x0_noise) and noise_mode == 2:
            _fill_normals(Z, sidx[b], steps[b], g0, g1, k0, k1, UA, UB)
        xb, ob, pb = x[b], o[b], prev[b]
        if var_mode == 0 and (n_hist > 0 or want_aux):
            # a multistep solver's step (history, aux) as straight loops over the block, in apply_table's order:
            # x̂₀, the base of x_{t−1} and aux; then each history term; then the noise — into scratch blocks, written
            # out last, so an output may alias any input element by element (Heun writes over its `base`), as in
            # the per-element loop below
            n = e1 - e0
            rr = r if clip_mode != 0 else np.float32(np.inf)
            ss = r if clip_mode == 2 else one
            xs, os_ = xb[e0:e1], ob[e0:e1]
            zs = z[b, e0:e1] if noise_mode == 1 else Z[:n]
            P, AS, XS = PS[:n], AUXS[:n], X0S[:n]
            for j in range(n):
                xv = xs[j]
                ov = os_[j]
                xh = a * xv + bb * ov
                if x0_noise:
                    xh = xh + z0c * zs[j]
                xh = rr if xh > rr else xh
                xh = -rr if xh < -rr else xh
                xh = xh / ss
                AS[j] = ax0 * xh + axc * xv
                P[j] = c0 * xh + c1 * xv + c2 * ov
                XS[j] = xh
            if n_hist >= 1:
                _add_history(P, AS, h0[b, e0:e1], d0, ah0, want_aux)
            if n_hist >= 2:
                _add_history(P, AS, h1[b, e0:e1], d1, ah1, want_aux)
            if n_hist >= 3:
                _add_history(P, AS, h2[b, e0:e1], d2, ah2, want_aux)
            if n_hist >= 4:
                _add_history(P, AS, h3[b, e0:e1], d3, ah3, want_aux)
            if add_noise:
                for j in range(n):
                    P[j] = P[j] + sig * zs[j]
            pb[e0:e1] = P
            if want_x0:
                x0[b, e0:e1] = XS
            if want_aux:
                aux[b, e0:e1] = AS
            continue
        if var_mode == 0 and n_hist == 0 and not want_aux:
            # the common case as straight loops over the block that LLVM vectorizes: clipping as selects (an
            # infinite range when off; NaN passes through both), thresholding's 1/s division (by 1.0 otherwise:
            # exact), x̂₀ into a scratch block when not wanted
            n = e1 - e0
            rr = r if clip_mode != 0 else np.float32(np.inf)
            ss = r if clip_mode == 2 else one
            xs, os_, ps = xb[e0:e1], ob[e0:e1], pb[e0:e1]
            x0s = x0[b, e0:e1] if want_x0 else X0S[:n]
            if x0_noise:                    # Euler's churn: the same z in x̂₀ (before the clip) and x_{t−1}
                zs = z[b, e0:e1] if noise_mode == 1 else Z[:n]
                for j in range(n):
                    xv = xs[j]
                    ov = os_[j]
                    zv = zs[j]
                    xh = a * xv + bb * ov
                    xh = xh + z0c * zv
                    xh = rr if xh > rr else xh
                    xh = -rr if xh < -rr else xh
                    xh = xh / ss
                    p = c0 * xh + c1 * xv + c2 * ov
                    ps[j] = p + sig * zv if add_noise else p
                    x0s[j] = xh
            elif add_noise:
                zs = z[b, e0:e1] if noise_mode == 1 else Z[:n]
                for j in range(n):
                    xv = xs[j]
                    ov = os_[j]
                    xh = a * xv + bb * ov
                    xh = rr if xh > rr else xh
                    xh = -rr if xh < -rr else xh
                    xh = xh / ss
                    ps[j] = (c0 * xh + c1 * xv + c2 * ov) + sig * zs[j]
                    x0s[j] = xh
            else:
                for j in range(n):
                    xv = xs[j]
                    ov = os_[j]
                    xh = a * xv + bb * ov
                    xh = rr if xh > rr else xh
                    xh = -rr if xh < -rr else xh
                    xh = xh / ss
                    ps[j] = c0 * xh + c1 * xv + c2 * ov
                    x0s[j] = xh
            continue
        for e in range(e0, e1):
            xv = xb[e]
            ov = ob[e]
            xh = a * xv + bb * ov
            if noise_mode != 0:
                zv = z[b, e] if noise_mode == 1 else Z[e - e0]
            else:
                zv = np.float32(0.0)
            if x0_noise:                    # the same z as x_{t−1}'s, before the clip
                xh = xh + z0c * zv
            if clip_mode != 0:              # NaN stays NaN (both comparisons false), like torch.maximum/minimum
                xh = r if xh > r else xh
                xh = -r if xh < -r else xh
                if clip_mode == 2:
                    xh = xh / r
            p = c0 * xh + c1 * xv + c2 * ov
            av = ax0 * xh + axc * xv if want_aux else np.float32(0.0)
            if n_hist >= 1:                 # h_0..h_3 in order, as apply_table and the Triton kernel
                hv = h0[b, e]
                p = p + d0 * hv
                if want_aux:
                    av = av + ah0 * hv
            if n_hist >= 2:
                hv = h1[b, e]
                p = p + d1 * hv
                if want_aux:
                    av = av + ah1 * hv
            if n_hist >= 3:
                hv = h2[b, e]
                p = p + d2 * hv
                if want_aux:
                    av = av + ah2 * hv
            if n_hist >= 4:
                hv = h3[b, e]
                p = p + d3 * hv
                if want_aux:
                    av = av + ah3 * hv
            if want_aux:
                aux[b, e] = av
            if add_noise:
                if var_mode == 0:
                    sigma = sig
                elif var_mode == 1:
                    sigma = sig * np.exp(half * v[b, e])
                elif var_mode == 2:
                    f = (v[b, e] + one) * half
                    sigma = sig * np.exp(half * (f * hi + (one - f) * lo))
                else:
                    sigma = sig * np.sqrt(v[b, e])
                p = p + sigma * zv
            pb[e] = p
            if want_x0:
                x0[b, e] = xh
