"""A short self-check of the reference (and of the fused kernel where it can run) on this device."""

from __future__ import annotations

import torch

from . import reference as R
from .ops import ddim_step, ddpm_step
from .schedule import Schedule


def selfcheck(device=None, verbose=True) -> int:
    """Prints one line per check; returns 0 when all pass, 1 otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = Schedule.linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(device)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(device)
    t = torch.tensor([0, 1, 500, 999], device=device)
    ab, betas, alphas = (s.device_tensor(n, device) for n in ("alpha_bars", "betas", "alphas"))
    checks = []
    x0 = R.predict_x0_from_eps(x, t, eps, ab)
    mu_post = R.compute_posterior_params(x0, x, t, ab, betas)[0]
    mu_eps = R.reverse_mean_from_noise(x, t, eps, alphas, ab)
    checks.append(("posterior mean of x̂₀(ε) == seed's ε-mean (float64)", (mu_post - mu_eps).abs().max().item(), 1e-10))
    var = R.compute_posterior_params(x0, x, t, ab, betas)[1]
    checks.append(("β̃_t <= β_t", float((var - betas[t]).clamp_min(0).max()), 0.0))
    out = ddpm_step(eps, t, x, s, seed=0, backend="reference")
    out2 = ddpm_step(eps, t, x, s, seed=0, backend="reference")
    checks.append(("counter noise is reproducible", (out.prev_sample - out2.prev_sample).abs().max().item(), 0.0))
    if device.type == "cuda":
        xf, ef = x.float(), eps.float()
        for name, fn in (("ddpm", ddpm_step), ("ddim", ddim_step)):
            a = fn(ef, t, xf, s, seed=1, backend="triton").prev_sample
            b = fn(ef, t, xf, s, seed=1, backend="reference").prev_sample
            checks.append((f"fused {name} step == float64 reference (fp32, rel)",
                           ((a.double() - b.double()).abs().max() / b.abs().max()).item(), 1e-6))
    ok = True
    print(f"fastrev self-check on {device} (torch {torch.__version__})")
    for name, err, tol in checks:
        good = err <= tol
        ok &= good
        if verbose:
            print(f"  [{'ok' if good else 'FAIL'}] {name}: {err:.2e} (tol {tol:.0e})")
    return 0 if ok else 1
