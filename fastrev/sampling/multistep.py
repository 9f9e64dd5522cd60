"""The multistep methods' tables: DPM-Solver++ (2M, 3M, their SDE variants) and UniPC (bh2), float64 on the host.

Both are exponential integrators in λ = log(α/σ) (α = √ᾱ, σ = √(1 − ᾱ)) of the data prediction m = x̂₀ (clipped
when ``clip_sample``), on the respaced schedule R. Step k (k = 0 … N − 1, table row i = N − 1 − k) goes from R's
index i to i − 1 (after the last step: α = 1, σ = 0, λ = +∞). Every update is linear in the step's x (the model's
input), its x̂₀ m_k and the history — earlier x̂₀'s m_{k−1}, m_{k−2}, … and, for UniPC, the previous corrected
sample x^c_{k−1} — so each step is one table row of the fused kernel's update (``fastrev.tables``)::

    prev = C0·m_k + C1·x + C2·out + Σ_j Dj·h_j + σ·z        aux = AX0·m_k + AX·x + Σ_j AHj·h_j   (UniPC)

The coefficients are built here as vectors over a basis (x, x^c_{k−1}, m_k, m_{k−1}, …) and mapped to columns.
Orders follow diffusers' defaults (``lower_order_final=True``, ``final_sigmas_type="zero"``): the first steps warm
up (order min(p, k + 1)); the last step of DPM++ is first order (it lands on m_k), and DPM++ 3M takes the
second-to-last step at order 2 when N < 15; UniPC's predictor uses order min(p, N − k, k + 1) and its corrector
the previous predictor's order. The formulas are in docs/samplers.md.
"""

from __future__ import annotations

import math

import torch

from .. import tables as T
from ..schedule import Schedule

__all__ = ["DPMPP_METHODS", "UNIPC_ORDERS", "lambdas", "dpmpp_orders", "unipc_orders", "dpmpp_vectors",
           "unipc_vectors", "dpmpp_table", "unipc_table", "dpmpp_history", "unipc_history"]

DPMPP_METHODS = {"dpmpp_2m": (2, False), "dpmpp_3m": (3, False), "dpmpp_2m_sde": (2, True),
                 "dpmpp_3m_sde": (3, True)}
"""method name → (order, stochastic)."""
UNIPC_ORDERS = (1, 2, 3)

# basis of the coefficient vectors: the step's x, the previous corrected sample, then m_k, m_{k−1}, m_{k−2}, m_{k−3}
X, XC, M0 = 0, 1, 2
NBASIS = M0 + 4


def _m(j: int) -> int:
    return M0 + j


def lambdas(R: Schedule) -> list:
    """λ_k = log(α/σ) at step k's source (R's index N − 1 − k), k = 0 … N, with λ_N = +∞ (python floats), and
    (α_k, σ_k) likewise (α_N = 1, σ_N = 0)."""
    ab = R.alpha_bars.tolist()[::-1]
    alpha = [math.sqrt(a) for a in ab] + [1.0]
    sigma = [math.sqrt(1.0 - a) for a in ab] + [0.0]
    lam = [0.5 * (math.log(a) - math.log1p(-a)) for a in ab] + [math.inf]
    return lam, alpha, sigma


def dpmpp_orders(N: int, order: int) -> list:
    """The order of each step k of DPM-Solver++(order)M (diffusers' rule with its defaults)."""
    out = []
    for k in range(N):
        o = min(order, k + 1)
        if k == N - 1:
            o = 1
        elif order == 3 and k == N - 2 and N < 15:
            o = min(o, 2)
        out.append(o)
    return out


def unipc_orders(N: int, order: int) -> list:
    """The predictor order of each step k of UniPC-p (diffusers: min(p, N − k), warm-up min(·, k + 1))."""
    return [min(order, N - k, k + 1) for k in range(N)]


def _phi(H: float):
    """(φ1, φ2, φ3) of the exponential integrator over H (H = h for the ODE, 2h for the SDE): φ1 = 1 − e^{−H},
    φ2 = (e^{−H} − 1)/H + 1, φ3 = φ2/H − ½ (φ2, φ3 only for finite H)."""
    p1 = -math.expm1(-H)
    if math.isinf(H):
        return p1, None, None
    p2 = math.expm1(-H) / H + 1.0
    return p1, p2, p2 / H - 0.5


def dpmpp_vectors(R: Schedule, order: int, sde: bool):
    """Per step k: (vector over the basis, noise σ_k) of DPM-Solver++(order)M (SDE variant when ``sde``):

    x' = (σ'/σ)e^{−(H−h)}·x + α'φ1(H)·D0 [+ ½α'φ1(H)·D1 (order 2)] [+ α'φ2(H)·D1 − α'φ3(H)·D2 (order 3)]
         [+ σ'√(1 − e^{−2h})·z (SDE)],   H = h (ODE) or 2h (SDE),

    with D0 = m_k, r0 = h_{k−1}/h, r1 = h_{k−2}/h, D1_0 = (m_k − m_{k−1})/r0, D1_1 = (m_{k−1} − m_{k−2})/r1,
    order 2: D1 = D1_0; order 3: D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0 + r1)."""
    N = R.num_timesteps
    lam, alpha, sigma = lambdas(R)
    orders = dpmpp_orders(N, order)
    rows = []
    for k in range(N):
        o = orders[k]
        h = lam[k + 1] - lam[k]
        H = 2.0 * h if sde else h
        p1, p2, p3 = _phi(H)
        a_t = alpha[k + 1]
        v = [0.0] * NBASIS
        # e^{−h} = σ'α/(α'σ): 0 at the last step
        v[X] = sigma[k + 1] / sigma[k] * (sigma[k + 1] * alpha[k] / (a_t * sigma[k]) if sde else 1.0)
        d0 = [0.0] * NBASIS
        d0[_m(0)] = 1.0
        terms = [(a_t * p1, d0)]
        if o >= 2:
            r0 = (lam[k] - lam[k - 1]) / h
            d1_0 = [0.0] * NBASIS
            d1_0[_m(0)], d1_0[_m(1)] = 1.0 / r0, -1.0 / r0
            if o == 2:
                terms.append((0.5 * a_t * p1, d1_0))
            else:
                r1 = (lam[k - 1] - lam[k - 2]) / h
                d1_1 = [0.0] * NBASIS
                d1_1[_m(1)], d1_1[_m(2)] = 1.0 / r1, -1.0 / r1
                diff = [a - b for a, b in zip(d1_0, d1_1, strict=True)]
                d1 = [a + r0 / (r0 + r1) * d for a, d in zip(d1_0, diff, strict=True)]
                d2 = [d / (r0 + r1) for d in diff]
                terms += [(a_t * p2, d1), (-a_t * p3, d2)]
        for c, vec in terms:
            v = [a + c * b for a, b in zip(v, vec, strict=True)]
        noise = sigma[k + 1] * math.sqrt(-math.expm1(-2.0 * h)) if sde else 0.0
        rows.append((v, noise))
    return rows


def _unipc_rhos(hh: float, rks: list, order: int, corrector: bool):
    """UniPC's ρ (bh2: B(h) = e^{hh} − 1 with hh = −h): the solution of R ρ = b with R_{ij} = r_j^i,
    b_i = i!·h φ_{i+1}(hh)/B(h) (the predictor drops the last row and column); the closed forms ρ = ½ for the
    order-1 corrector and the order-2 predictor, as diffusers."""
    if corrector and order == 1:
        return [0.5]
    if not corrector and order == 2:
        return [0.5]
    B_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    fact = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    n = order if corrector else order - 1
    Rm = torch.tensor([[rks[j] ** i for j in range(n)] for i in range(n)], dtype=torch.float64)
    return torch.linalg.solve(Rm, torch.tensor(b[:n], dtype=torch.float64)).tolist()


def unipc_vectors(R: Schedule, order: int = 2):
    """Per step k: (prev vector, aux vector) of UniPC-p bh2 with its corrector (the aux is x^c_k, the corrected
    sample the next step's corrector starts from; at k = 0 it is x itself).

    Corrector at k ≥ 1 (order p_c = the previous predictor's, h = λ_k − λ_{k−1}, hh = −h, B = e^{hh} − 1):
        x^c_k = (σ_k/σ_{k−1})·x^c_{k−1} − α_k(e^{hh} − 1)·m_{k−1} − α_k B·(Σ_i ρ_i D_i + ρ_{p_c}(m_k − m_{k−1}))
        with r_i = (λ_{k−1−i} − λ_{k−1})/h, D_i = (m_{k−1−i} − m_{k−1})/r_i (i = 1 … p_c − 1).
    Predictor (order p, h = λ_{k+1} − λ_k):
        x_{k+1} = (σ_{k+1}/σ_k)·x^c_k − α_{k+1}(e^{hh} − 1)·m_k − α_{k+1} B·Σ_i ρ_i D_i,
        r_i = (λ_{k−i} − λ_k)/h, D_i = (m_{k−i} − m_k)/r_i (i = 1 … p − 1)."""
    N = R.num_timesteps
    lam, alpha, sigma = lambdas(R)
    orders = unipc_orders(N, order)
    rows = []
    for k in range(N):
        # the corrected sample x^c_k as a vector over (x, x^c_{k−1}, m_k, m_{k−1}, ...)
        xc = [0.0] * NBASIS
        if k == 0:
            xc[X] = 1.0
        else:
            pc = orders[k - 1]
            h = lam[k] - lam[k - 1]
            hh = -h
            B_h = math.expm1(hh)
            rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, pc)] + [1.0]
            rho = _unipc_rhos(hh, rks, pc, corrector=True)
            xc[XC] = sigma[k] / sigma[k - 1]
            xc[_m(1)] -= alpha[k] * math.expm1(hh)
            for i in range(1, pc):                       # D_i = (m_{k−1−i} − m_{k−1})/r_i
                c = -alpha[k] * B_h * rho[i - 1] / rks[i - 1]
                xc[_m(1 + i)] += c
                xc[_m(1)] -= c
            c = -alpha[k] * B_h * rho[-1]                 # ρ_{p_c}·(m_k − m_{k−1})
            xc[_m(0)] += c
            xc[_m(1)] -= c
        p = orders[k]
        h = lam[k + 1] - lam[k]
        hh = -h
        ratio = sigma[k + 1] / sigma[k]
        prev = [ratio * v for v in xc]
        prev[_m(0)] -= alpha[k + 1] * math.expm1(hh)      # −α'(e^{−h} − 1)·m_k: +α' m_k at the last step
        if p >= 2:
            B_h = math.expm1(hh)
            rks = [(lam[k - i] - lam[k]) / h for i in range(1, p)] + [1.0]
            rho = _unipc_rhos(hh, rks, p, corrector=False)
            for i in range(1, p):                         # D_i = (m_{k−i} − m_k)/r_i
                c = -alpha[k + 1] * B_h * rho[i - 1] / rks[i - 1]
                prev[_m(i)] += c
                prev[_m(0)] -= c
        rows.append((prev, xc))
    return rows


def dpmpp_history(order: int) -> int:
    """How many earlier x̂₀'s DPM-Solver++(order)M reads: order − 1 (h_j = m_{k−1−j}, columns D0, D1)."""
    return order - 1


def unipc_history(order: int) -> int:
    """How many history tensors UniPC-p reads: x^c_{k−1} (h_0) and m_{k−1} … m_{k−p} (h_1 … h_p)."""
    return order + 1


def _stack(rows_k, get):
    """Per-row (row i = N − 1 − k) float64 column from the per-step list."""
    return torch.tensor([get(r) for r in rows_k[::-1]], dtype=torch.float64)


def dpmpp_table(R: Schedule, order: int = 2, sde: bool = False, prediction_type="epsilon", clip=False):
    """DPM-Solver++(order)M on R, float64 [N, NCOL]: C0 (m_k), C1 (x), D0 (m_{k−1}), D1 (m_{k−2}), SIGMA (SDE:
    σ'√(1 − e^{−2h}), 0 on the last step); C0 folded into C1/C2 without clipping."""
    steps = dpmpp_vectors(R, order, sde)
    A, B = T.x0_coefficients(R, prediction_type)
    col = lambda j: _stack(steps, lambda r: r[0][j])  # noqa: E731
    zeros = torch.zeros_like(A)
    hist = {T.HISTORY_COLS[j]: col(_m(1 + j)) for j in range(dpmpp_history(order))}
    return T.finish_table(A, B, col(_m(0)), col(X), zeros, _stack(steps, lambda r: r[1]), clip=clip, **hist)


def unipc_table(R: Schedule, order: int = 2, prediction_type="epsilon", clip=False):
    """UniPC-p bh2 with its corrector on R, float64 [N, NCOL]: prev's C0 (m_k), C1 (x: the first step only),
    D0 (x^c_{k−1}), D1 … Dp (m_{k−1} … m_{k−p}); the aux (x^c_k) in AX0, AX, AH0 … AHp. No noise."""
    steps = unipc_vectors(R, order)
    A, B = T.x0_coefficients(R, prediction_type)
    zeros = torch.zeros_like(A)
    pv = lambda j: _stack(steps, lambda r: r[0][j])  # noqa: E731
    av = lambda j: _stack(steps, lambda r: r[1][j])  # noqa: E731
    n = unipc_history(order)
    basis = [XC] + [_m(j) for j in range(1, n)]       # h_0 = x^c_{k−1}, h_j = m_{k−j}
    kw = {T.HISTORY_COLS[j]: pv(b) for j, b in enumerate(basis)}
    kw.update({T.AUX_HISTORY_COLS[j]: av(b) for j, b in enumerate(basis)})
    return T.finish_table(A, B, pv(_m(0)), pv(X), zeros, zeros, clip=clip, AX0=av(_m(0)), AX=av(X), **kw)
