"""The error bound every kernel test holds the fused step to (shared by test_kernel.py and test_fuzz.py).

Per element and per prediction type, from the float64 table the step uses: the float32 rounding error of a sum is
bounded by a small multiple of the sum of the magnitudes of its terms, so

    |x̂₀ − x̂₀_ref|        ≤ rtol · (|x̂₀_ref| + |A·x| + |B·out|)
    |x_{t−1} − x_ref|    ≤ rtol · (|x_ref| + |C0|·(|A·x| + |B·out|) + |C1·x| + |C2·out| + |D·base| + |σ·z|)

element by element, each sample with its own row t. Clipping and thresholding (clamp to ±r, divide by s ≥ 1) only
shrink x̂₀'s error. σ is per element for learned variances (from the variance channels). ``atol`` only covers the
storage format's subnormals (fp16: 2⁻²⁴). NaN never passes: the NaN and ±inf patterns must match exactly.
"""

from __future__ import annotations

import torch

from fastrev import tables


def _col(c, name, ndim):
    return c[:, tables.COL[name]].reshape((-1,) + (1,) * (ndim - 1))


def sigma64(table64, t, var, var_mode, ndim):
    """|σ| (float64, broadcastable to the sample's ``ndim`` dims) for the table's variance mode; ``var``: the
    learned-variance channels, or None."""
    c = table64[t.cpu()].to(t.device)
    sig = _col(c, "SIGMA", ndim)
    if var_mode == tables.VAR_FIXED or var is None:
        return sig.abs()
    v = var.double()
    if var_mode == tables.VAR_LOG:
        return (sig * torch.exp(0.5 * v)).abs()
    if var_mode == tables.VAR_RANGE:
        f = (v + 1.0) * 0.5
        lo, hi = _col(c, "LOG_LO", v.dim()), _col(c, "LOG_HI", v.dim())
        return (sig * torch.exp(0.5 * (f * hi + (1.0 - f) * lo))).abs()
    return (sig * v.clamp_min(0).sqrt()).abs()


def step_terms(table64, t, x, o, z=None, sigma=None, base=None):
    """(x̂₀ terms, x_{t−1} terms): float64 per-element sums of the magnitudes of each output's terms.

    ``table64``: the float64 table of the step; ``t``: int64 [B] rows; ``o``: the model output (its first C channels
    are used); ``z``: the noise (None: deterministic); ``sigma``: per-element |σ| (default: the table's SIGMA).
    """
    c = table64[t.cpu()].to(x.device)
    col = lambda k: _col(c, k, x.dim())  # noqa: E731
    C = x.shape[1] if x.dim() > 1 else None
    o = (o[:, :C] if C is not None else o).double()
    x = x.double()
    x0_terms = (col("A") * x).abs() + (col("B") * o).abs()
    prev_terms = col("C0").abs() * x0_terms + (col("C1") * x).abs() + (col("C2") * o).abs()
    if base is not None:
        prev_terms = prev_terms + (col("D") * base.double()).abs()
    if z is not None:
        s = col("SIGMA").abs() if sigma is None else sigma
        prev_terms = prev_terms + (s * z.double()).abs()
    return x0_terms, prev_terms


def worst_ratio(got, want, terms, rtol, atol=0.0, round_rtol=0.0) -> float:
    """max over elements of |got − want| / (rtol·(|want| + terms) + round_rtol·|want| + atol), over the finite
    elements of ``want``; inf when the NaN / ±inf patterns differ. ``round_rtol``: one rounding of the output to the
    storage format when ``want`` is rounded too (fp16: 2⁻¹⁰, a whole ulp between two roundings)."""
    a, b = got.double(), want.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    inf = torch.isinf(b)
    if not torch.equal(torch.isinf(a), inf) or not torch.equal(a[inf], b[inf]):
        return float("inf")
    fin = torch.isfinite(b)
    if not fin.any():
        return 0.0
    err = (a - b)[fin].abs()
    bound = rtol * (b[fin].abs() + terms.expand_as(b)[fin]) + round_rtol * b[fin].abs() + atol + 1e-300
    return (err / bound).max().item()


def check(got, want, terms, rtol=1e-6, atol=0.0, name="output"):
    """Assert ``got`` is within the bound of ``want`` (see the module docstring); NaN never passes."""
    assert not (torch.isnan(got) & ~torch.isnan(want.to(got.device))).any(), \
        f"{name}: NaN in kernel output (an element was not written)"
    worst = worst_ratio(got, want.to(got.device), terms, rtol, atol)
    err = (got.double() - want.double().to(got.device)).abs().nan_to_num(0.0, 0.0, 0.0).max().item()
    assert worst <= 1.0, f"{name}: max error {err:.3e} is {worst:.2f}x the bound"
