"""Noise schedules and their float64 tables.

Notation follows ``shared/seed/reverse-process.md``: β_t are the forward variances, α_t = 1 − β_t,
ᾱ_t = Π_{s≤t} α_s, ᾱ_{t−1} (``alpha_bars_prev``) is 1 before the first step, and β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
is the variance of the true posterior q(x_{t−1} | x_t, x_0).

Every table is a float64 CPU tensor indexed by the *schedule index* t ∈ [0, num_timesteps). After
:meth:`Schedule.respace`, index i stands for training timestep ``timesteps[i]``; the model is fed that value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["Schedule", "spaced_timesteps", "check_timestep_spacing", "TIMESTEP_SPACINGS"]

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _as_f64(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        try:
            x = torch.tensor(list(x), dtype=torch.float64)
        except TypeError:
            raise TypeError(f"{name} must be a 1-D sequence or tensor of floats, got {type(x).__name__}") from None
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real floating point, got {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(x.shape)}")
    return x.clone()


class Schedule:
    """A discrete variance-preserving noise schedule with all the float64 tables the reverse steps need.

    Build one with :meth:`linear`, :meth:`scaled_linear`, :meth:`cosine`, :meth:`sigmoid` or :meth:`from_betas`.

    Attributes (float64, CPU, length ``num_timesteps``):
        betas: β_t.  alphas: α_t = 1 − β_t.  alpha_bars: ᾱ_t.  alpha_bars_prev: ᾱ_{t−1} (1 at t = 0).
        sqrt_alphas: √α_t.  sqrt_alpha_bars: √ᾱ_t.  sqrt_one_minus_alpha_bars: √(1 − ᾱ_t).
        sqrt_recip_alpha_bars: 1/√ᾱ_t.  sqrt_recipm1_alpha_bars: √(1/ᾱ_t − 1).  sqrt_alpha_bars_prev: √ᾱ_{t−1}.
        posterior_variance: β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)  (0 at t = 0).
        posterior_log_variance_clipped: log β̃_t with entry 0 replaced by β̃_1 (improved-diffusion).
        posterior_mean_coef1: √ᾱ_{t−1} β_t / (1 − ᾱ_t)   (the x̂₀ coefficient of μ̃_t).
        posterior_mean_coef2: √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)  (the x_t coefficient of μ̃_t).
        log_betas: log β_t.
        timesteps: int64, the training timestep each index stands for.
        num_train_timesteps: length of the schedule this one was respaced from (or its own length).
    """

    def __init__(self, betas, *, alpha_bars=None, timesteps=None, num_train_timesteps: int | None = None):
        betas = _as_f64(betas, "betas")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            bad = betas[~(torch.isfinite(betas) & (betas > 0) & (betas <= 1))][:3].tolist()
            raise ValueError(f"betas must be finite and in (0, 1]; found {bad}")
        n = betas.numel()
        if alpha_bars is None:
            alpha_bars = torch.cumprod(1.0 - betas, dim=0)
        else:
            alpha_bars = _as_f64(alpha_bars, "alpha_bars")
            if alpha_bars.numel() != n:
                raise ValueError(f"alpha_bars must have {n} entries like betas, got {alpha_bars.numel()}")
            if not torch.isfinite(alpha_bars).all() or (alpha_bars < 0).any() or (alpha_bars >= 1).any():
                raise ValueError("alpha_bars must be finite and in [0, 1)")
            if (alpha_bars[1:] > alpha_bars[:-1]).any():
                raise ValueError("alpha_bars must be non-increasing (ᾱ_t = Π α_s)")
        if timesteps is None:
            timesteps = torch.arange(n, dtype=torch.int64)
        else:
            timesteps = torch.as_tensor(timesteps, dtype=torch.int64).cpu().clone()
            if timesteps.shape != (n,):
                raise ValueError(f"timesteps must have shape ({n},), got {tuple(timesteps.shape)}")
        self.num_timesteps = n
        #: ᾱ of the last step is 0 (zero terminal SNR): ε-prediction cannot give x̂₀ there
        self.zero_terminal_snr = bool(alpha_bars[-1] == 0)
        self.num_train_timesteps = int(num_train_timesteps if num_train_timesteps is not None else n)
        self.timesteps = timesteps
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = alpha_bars
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        self.log_betas = torch.log(betas)
        self.sqrt_alphas = torch.sqrt(self.alphas)
        self.sqrt_alpha_bars = torch.sqrt(alpha_bars)
        self.sqrt_alpha_bars_prev = torch.sqrt(self.alpha_bars_prev)
        self.sqrt_one_minus_alpha_bars = torch.sqrt(1.0 - alpha_bars)
        self.sqrt_recip_alpha_bars = torch.sqrt(1.0 / alpha_bars)
        self.sqrt_recipm1_alpha_bars = torch.sqrt(1.0 / alpha_bars - 1.0)
        self.posterior_variance = betas * (1.0 - self.alpha_bars_prev) / (1.0 - alpha_bars)
        first = self.posterior_variance[1] if n > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first.reshape(1), self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.sqrt_alpha_bars_prev * betas / (1.0 - alpha_bars)
        self.posterior_mean_coef2 = self.sqrt_alphas * (1.0 - self.alpha_bars_prev) / (1.0 - alpha_bars)
        self._device_cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """A schedule from explicit β_t (float64 copy; ᾱ is their float64 cumulative product)."""
        return cls(betas)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """β linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020; diffusers "linear")."""
        _check_count(num_train_timesteps)
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> "Schedule":
        """√β linear from √beta_start to √beta_end, squared (Stable Diffusion; diffusers "scaled_linear")."""
        _check_count(num_train_timesteps)
        r = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
        return cls(r * r)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal's cosine schedule: ᾱ(τ) = cos²((τ + s)/(1 + s) · π/2),
        β_i = min(1 − ᾱ((i+1)/N) / ᾱ(i/N), max_beta) (improved-diffusion; diffusers "squaredcos_cap_v2")."""
        _check_count(num_train_timesteps)

        def abar(tau: float) -> float:
            return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def sigmoid(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """diffusers' "sigmoid": β = sigmoid(linspace(−6, 6, N)) · (beta_end − beta_start) + beta_start."""
        _check_count(num_train_timesteps)
        z = torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)
        return cls(torch.sigmoid(z) * (beta_end - beta_start) + beta_start)

    # ------------------------------------------------------------------ transforms
    def rescale_zero_terminal_snr(self) -> "Schedule":
        """Lin et al. 2023 (as diffusers ``rescale_zero_terminal_snr``): shift √ᾱ so its last entry is 0, scale so
        its first is unchanged, rebuild β from the ratios. Returns a new schedule whose last ᾱ is exactly 0."""
        sq = self.sqrt_alpha_bars.clone()
        a0, aT = sq[0].clone(), sq[-1].clone()
        sq = (sq - aT) * (a0 / (a0 - aT))
        abar = sq * sq
        alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
        return Schedule(1.0 - alphas, alpha_bars=abar, timesteps=self.timesteps,
                        num_train_timesteps=self.num_train_timesteps)

    def respace(self, timesteps) -> "Schedule":
        """Keep the given strictly increasing timesteps (indices into this schedule).

        improved-diffusion's SpacedDiffusion semantics: ᾱ is kept exactly at the kept steps and
        β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i−1}} (ᾱ before the first kept step is 1). ``timesteps`` of the result maps each
        new index back to the training timestep of this schedule's ``timesteps``.
        """
        if isinstance(timesteps, torch.Tensor):
            if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
                raise TypeError(f"timesteps must be integers, got {timesteps.dtype}")
            keep = timesteps.detach().cpu().to(torch.int64).reshape(-1)
        else:
            vals = list(timesteps)
            if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in vals):
                raise TypeError("timesteps must be a sequence of ints")
            keep = torch.tensor(vals, dtype=torch.int64)
        if keep.numel() == 0:
            raise ValueError("timesteps must not be empty")
        if (keep[1:] <= keep[:-1]).any():
            raise ValueError("timesteps must be strictly increasing (sorted and unique)")
        if keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got [{int(keep[0])}, {int(keep[-1])}]")
        abar = self.alpha_bars[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return Schedule(1.0 - abar / prev, alpha_bars=abar, timesteps=self.timesteps[keep],
                        num_train_timesteps=self.num_train_timesteps)

    # ------------------------------------------------------------------ misc
    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (f"Schedule(num_timesteps={self.num_timesteps}, num_train_timesteps={self.num_train_timesteps}, "
                f"beta=[{self.betas[0].item():.3g} .. {self.betas[-1].item():.3g}], "
                f"alpha_bar_T={self.alpha_bars[-1].item():.3g})")

    def device_tensor(self, name: str, device, dtype=torch.float64) -> torch.Tensor:
        """``getattr(self, name)`` moved to ``device``/``dtype`` once and cached (tables are immutable)."""
        key = (name, torch.device(device), dtype)
        t = self._device_cache.get(key)
        if t is None:
            t = getattr(self, name).to(device=device, dtype=dtype)
            self._device_cache[key] = t
        return t

    def cached(self, key, device, build):
        """Cache ``build()`` (a CPU tensor) on ``device`` under ``key``: built once per (schedule, key, device)."""
        full = (key, torch.device(device))
        t = self._device_cache.get(full)
        if t is None:
            t = build().to(device)
            self._device_cache[full] = t
        return t


def _check_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_train_timesteps must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {n}")


def _section_steps(num_timesteps: int, spec: str) -> list[int]:
    """improved-diffusion ``space_timesteps``: "ddimN" (integer stride) or comma-separated section counts."""
    if spec.startswith("ddim"):
        want = int(spec[len("ddim"):])
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == want:
                return list(range(0, num_timesteps, i))
        if want == num_timesteps:
            return list(range(num_timesteps))
        raise ValueError(f"spacing {spec!r}: cannot create exactly {want} steps with an integer stride "
                         f"from {num_timesteps}")
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"spacing {spec!r}: cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def check_timestep_spacing(spacing) -> str:
    """``spacing`` if :func:`spaced_timesteps` accepts its form — one of :data:`TIMESTEP_SPACINGS` or an
    improved-diffusion section string (``"ddim50"``, ``"10,15,20"``) — else a TypeError / ValueError naming it.
    The one place this rule lives (whether a section string fits a given N is checked when the steps are built)."""
    if not isinstance(spacing, str):
        raise TypeError(f"timestep_spacing must be a str, got {type(spacing).__name__}")
    if spacing in TIMESTEP_SPACINGS or spacing.startswith("ddim") or (spacing and set(spacing) <= set("0123456789,")):
        return spacing
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS} or an improved-diffusion section string "
                     f"like 'ddim50' or '10,15,20', got {spacing!r}")


def spaced_timesteps(num_train_timesteps: int, n: int | None, spacing: str = "leading",
                     steps_offset: int = 0) -> torch.Tensor:
    """The training timesteps a sampler with ``n`` steps visits, **ascending** (int64), ready for
    :meth:`Schedule.respace`; reverse it for the sampling order.

    ``spacing``:
      * ``"linspace"``: round(linspace(0, N−1, n)) (diffusers; steps_offset ignored, as diffusers does).
      * ``"leading"``: arange(n) · (N // n) + steps_offset (diffusers).
      * ``"trailing"``: round(arange(N, 0, −N/n)) − 1 (diffusers).
      * improved-diffusion section strings: ``"ddim50"`` (integer stride) or ``"10,15,20"`` (points per
        equal section); ``n`` must then be None or the total count.
    """
    _check_count(num_train_timesteps)
    N = int(num_train_timesteps)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)):
        raise TypeError(f"steps_offset must be an int, got {steps_offset!r}")
    check_timestep_spacing(spacing)
    if spacing in TIMESTEP_SPACINGS:
        if n is None or isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int for spacing {spacing!r}, got {n!r}")
        if not 1 <= n <= N:
            raise ValueError(f"n must be in [1, {N}], got {n}")
        if spacing == "linspace":
            ts = np.linspace(0, N - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (N // n)).round().astype(np.int64) + int(steps_offset)
        else:
            # diffusers: round(arange(N, 0, −N/n)) − 1, built as exactly n points (arange's float stop can add one)
            ts = (np.round(N - np.arange(n) * (N / n)).astype(np.int64) - 1)[::-1]
        ts = np.sort(ts)
        if (np.diff(ts) <= 0).any() or ts[0] < 0 or ts[-1] >= N:
            raise ValueError(f"spacing {spacing!r} with n={n}, steps_offset={steps_offset} gives repeated or "
                             f"out-of-range timesteps for N={N}")
        return torch.from_numpy(ts.copy())
    try:                                            # an improved-diffusion section string
        steps = _section_steps(N, spacing)
    except ValueError as e:
        if "invalid literal" in str(e):
            raise ValueError(f"spacing {spacing!r} is not a valid section string") from None
        raise
    if n is not None and n != len(steps):
        raise ValueError(f"n={n} disagrees with spacing {spacing!r}, which gives {len(steps)} steps")
    return torch.tensor(steps, dtype=torch.int64)
