"""Drop-in diffusers schedulers: :class:`FastDDPMScheduler` and :class:`FastDDIMScheduler`.

One line in a diffusers pipeline::

    from fastrev.diffusers import FastDDPMScheduler
    pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)

Both are ``SchedulerMixin, ConfigMixin`` subclasses with ``DDPMScheduler`` / ``DDIMScheduler``'s exact config names and
defaults, plus one fastrev option, ``fastrev_fixes`` (default ``False``), so ``from_config`` works in both directions
and ``save_config`` / ``from_pretrained`` round-trip. docs/diffusers.md is the long form of this docstring.

**diffusers' semantics by default.** With ``fastrev_fixes=False`` a step gives what the diffusers class gives, to
float32 rounding, for every input diffusers accepts and computes finitely — in exact mode (a ``generator``, a list of
them, or ``variance_noise``), where the noise is drawn exactly as diffusers draws it (same shape, dtype, device and
generator consumption). That includes:
  * steps from any t in [0, num_train_timesteps): DDIM steps to t − N // n (N = num_train_timesteps, n = the
    number of inference steps) for every ``timestep_spacing``, on the chain or off it (img2img, inversion, custom
    loops); DDPM steps to ``previous_timestep(t)`` — t − 1 before ``set_timesteps``, the next entry of ``timesteps``
    after it (a timestep that is not in ``timesteps`` raises, as in diffusers);
  * ``timesteps`` equal to diffusers' (its ``np.arange`` for "trailing", a "leading" ``steps_offset`` that reaches
    past N accepted at ``set_timesteps`` as diffusers accepts it); the final timestep −1 that diffusers' "trailing"
    spacing gives for some n (61, 103, 121, …) steps as diffusers steps it, from ``alphas_cumprod[-1]`` to the end
    (DDPM: no noise), also as a device timestep;
  * ``variance_type`` values diffusers falls through on (e.g. ``"other"``): a warning (once per value) names the
    known ones and the step computes what diffusers computes, the clamped posterior variance β̃;
  * schedules whose float32 ᾱ underflows to 0 (e.g. ``beta_start=0.01, beta_end=0.2``: ᾱ_t = 0 for t ≥ 959) or
    turns negative: finite wherever diffusers is finite.

**Where diffusers has no finite answer** (its result is NaN or ±inf) fastrev gives one where the mathematics has one,
and otherwise refuses:
  * ``variance_type="fixed_large_log"``: diffusers takes the square root of a log-variance (NaN, #14569); here
    the noise scale is exp(½·log β'_t) = √β'_t, as ``"fixed_large"``.
  * ᾱ_t = ᾱ_prev = 0 in float32 (underflow): diffusers' α'_t = 0/0 is NaN; here α'_t is the float64 product of
    diffusers' float32 α over (prev, t] — the limit of its own formula.
  * Zero terminal SNR / underflow with ε-prediction (ᾱ_t = 0, x̂₀ = (x − ε)/0): the x̂₀ columns use 2¹⁰⁰ for 1/√0,
    so a clipped x̂₀ is diffusers' ±clip_sample_range (and ±1 under thresholding, where diffusers' quantile of ±inf
    is NaN). Unclipped, x̂₀ is infinite: a step whose result depends on it has no answer (below).
  * DDIM √(1 − ᾱ_prev − σ²) is computed in float64 (exactly 0 at ᾱ_t = 0 with η = 1, where diffusers' float32
    rounds to √(negative) = NaN).
  * A step with no finite answer — an η for which 1 − ᾱ_prev − σ² < 0, a negative ᾱ (a beta above 1), an
    unclipped ε-prediction x̂₀ at ᾱ_t = 0 — raises a ValueError naming your config and the timestep when the
    timestep is known on the host (int, numpy int, CPU tensor); a device timestep gets a NaN row (as diffusers gets
    NaN), since checking it would need a host sync.

**Other differences** (not results): ``sample`` / ``model_output`` must be floating tensors (an int or bool tensor
raises a TypeError naming the argument; diffusers silently computes with it); ``prediction_type`` and
``timestep_spacing`` are checked where diffusers checks them (at ``step`` / ``set_timesteps``), with clear messages;
``timestep`` may be a [B] tensor (per-sample steps); DDPM's ``step`` takes ``variance_noise``; DDIM's
``set_timesteps`` takes custom ``timesteps`` (each then steps to the next entry); "learned" / "learned_range"
without the variance channels computes the noiseless t = 0 step (as diffusers) and raises a ValueError at t > 0
(diffusers: a TypeError); with neither ``generator`` nor ``variance_noise`` the noise is fastrev's counter stream
(:mod:`fastrev.noise`, keyed by (seed, sample, timestep) and generated inside the fused kernel; seed
``scheduler.noise_seed`` or one draw from torch's default generator per ``set_timesteps``), not ``torch.randn`` from
the global generator.

**fastrev_fixes=True** (a config key: saved, loaded, and kept through diffusers' classes) turns on fastrev's
improvements that change a finite diffusers result:
  * DDIM steps to the next entry of ``timesteps`` (as DDPM does) instead of t − N // n, which is wrong for
    "linspace" (diffusers #12633) and for "trailing" when n does not divide N (its last step lands on ᾱ_0 instead of
    ``final_alpha_cumprod``); off the chain, to the largest scheduled timestep below t;
  * DDPM accepts a timestep that is not in ``timesteps`` and steps it to the largest scheduled timestep below it;
  * "trailing" ``timesteps`` are exactly n points N − 1 − round(i·N/n) (never a −1, no float ``arange`` drift),
    and a timestep −1 raises;
  * with a generator and a device timestep, DDPM draws its noise without reading the timestep back (no host sync,
    capturable); the draw at t = 0 is multiplied by 0, only the generator's state afterwards differs.

How a step runs. One float64 coefficient table per step configuration, built once on the host from diffusers' own
float32 ᾱ (with its float32 α'_t = ᾱ_t/ᾱ_prev, the one rounding of diffusers' that moves results beyond float32
noise) and indexed by the training timestep: ``num_train_timesteps`` rows, row t holding the step diffusers takes from
t (see :mod:`fastrev.tables` for the update). ``step`` gathers each sample's row by its timestep on the device: no
``.item()``, no ``nonzero()``, no Python branch on a device value, so a step can be captured in a CUDA graph, and any
timestep works without a host sync (one exception, as in diffusers: by default DDPM with a generator reads a device
timestep back to skip its draw at t = 0). Validation and table building stay on the host. The table is float32 for
every backend except ``"reference"`` (float64; the backend name :func:`fastrev.ops.resolve_backend` returns decides).

Backends (``scheduler.backend``, an attribute, not part of the config): ``"auto"`` (the fused Triton kernel on
CUDA, the eager torch update of the same table elsewhere), ``"triton"``, ``"torch"``, ``"reference"`` (float64
oracle); see :func:`fastrev.ops.resolve_backend`.

CUDA graphs: capture ``step`` with a device ``timestep`` tensor in fast mode (or with ``variance_noise`` from a static
tensor, or a generator with ``fastrev_fixes=True``) after one eager step (PyTorch's usual warm-up); replay after
writing the next timestep into the captured tensor. Tables live on the device for the scheduler's life and
``set_timesteps`` rewrites them in place, so the graph stays valid for a new chain.

This module is the only part of fastrev that imports diffusers (an optional dependency: ``pip install
'fastrev[diffusers]'``); ``import fastrev`` does not import it.
"""

from __future__ import annotations

if __name__ == "diffusers":  # pragma: no cover - only when fastrev/ itself is on sys.path
    raise ImportError("fastrev/diffusers.py was imported as the top-level module 'diffusers' because the fastrev/ "
                      "package directory is on sys.path (e.g. a script run from inside it); run from the project root "
                      "or use `python -m`, and import it as `fastrev.diffusers`")

try:
    import diffusers as _diffusers  # noqa: F401  (absolute import: the real package, never this module)
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised by a test that hides diffusers
    raise ImportError(
        "fastrev.diffusers needs the optional dependency `diffusers` (>= 0.30): install it with "
        f"`pip install 'fastrev[diffusers]'` or `pip install diffusers` (import failed with: {e})") from e

import math  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import ops as _ops  # noqa: E402
from . import tables as _T  # noqa: E402
from .noise import as_seed_tensor as _as_seed_tensor  # noqa: E402
from .reference import PREDICTION_TYPES  # noqa: E402
from .schedule import TIMESTEP_SPACINGS, spaced_timesteps  # noqa: E402

__all__ = ["FastDDPMScheduler", "FastDDIMScheduler", "FastEulerDiscreteScheduler",
           "FastEulerAncestralDiscreteScheduler", "FastFlowMatchEulerDiscreteScheduler", "DDPM_VARIANCE_TYPES",
           "BACKENDS", "FastDPMSolverMultistepScheduler", "FastUniPCMultistepScheduler"]

#: diffusers' DDPM variance types (others are accepted with a warning and computed as diffusers does: β̃)
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                       "learned_range")
BACKENDS = _ops.BACKENDS
_INV_SQRT_ZERO = 2.0 ** 100   # finite stand-in for 1/√ᾱ where ᾱ = 0 (zero terminal SNR); a power of two: exact
_F64 = torch.float64
_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_WARNED_VARIANCE_TYPES: set = set()

# why a table row has no finite value (for the error of a host timestep that lands on it)
_OK, _NEG_ALPHA, _EPS_INF, _ETA, _NONFINITE = 0, 1, 2, 3, 4


def _check_float(name: str, x) -> None:
    """TypeError naming ``name`` unless ``x`` is a floating tensor (what fastrev.ddpm_step requires too)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")


def _diffusers_timesteps(N: int, n, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers' ``set_timesteps(n)`` timesteps for ``timestep_spacing`` (descending int64), with its numpy
    arithmetic: "trailing" is its float ``np.arange``, which for some n rounds differently from N − i·N/n and adds a
    final −1 (n = 61, 103, …); "leading" keeps a ``steps_offset`` that reaches N (stepping there then fails)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {n!r}")
    if not 1 <= n <= N:
        raise ValueError(f"num_inference_steps must be in [1, {N}], got {n}")
    if spacing == "linspace":
        asc = np.linspace(0, N - 1, n).round()
    elif spacing == "leading":
        asc = np.arange(0, n) * (N // n) + int(steps_offset)
    else:
        return (np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1).copy()
    return asc[::-1].astype(np.int64).copy()


class _Pairs:
    """Per-row (ᾱ_t, ᾱ_prev, α'_t) in float64, with the attributes :func:`fastrev.tables.x0_coefficients` and
    :func:`fastrev.tables.eps_linear` read from a Schedule — each row its own pair, not a chain."""

    def __init__(self, ab: torch.Tensor, ab_prev: torch.Tensor, alpha: torch.Tensor):
        self.alpha_bars, self.alpha_bars_prev, self.alphas = ab, ab_prev, alpha
        self.betas = 1.0 - alpha                                   # β'_t = 1 − α'_t (exact in float64)
        self.sqrt_alpha_bars = torch.sqrt(ab)
        self.sqrt_one_minus_alpha_bars = torch.sqrt(1.0 - ab)
        self.sqrt_recip_alpha_bars = 1.0 / self.sqrt_alpha_bars
        self.sqrt_recipm1_alpha_bars = self.sqrt_one_minus_alpha_bars / self.sqrt_alpha_bars
        self.sqrt_alpha_bars_prev = torch.sqrt(ab_prev)


def _x0_columns(p: _Pairs, prediction_type: str):
    """(A, B) with x̂₀ = A·x + B·out, with the finite stand-in for 1/√0 (ε-prediction at ᾱ_t = 0)."""
    A, B = _T.x0_coefficients(p, prediction_type)
    A = torch.where(torch.isinf(A), torch.full_like(A, _INV_SQRT_ZERO), A)
    B = torch.where(torch.isinf(B), torch.full_like(B, -_INV_SQRT_ZERO), B)
    return A, B


def ddpm_rows(p: _Pairs, t: torch.Tensor, prediction_type: str, variance_type: str, clip: bool,
              clip_range: float):
    """float64 [R, NCOL] rows of diffusers' DDPM step for the pairs ``p`` (``t``: the raw timesteps), and an int8
    [R] reason code per row (0: finite). Mean: the posterior mean μ̃(x̂₀, x) with the pair's ᾱ_prev and β'_t. Noise
    iff the raw timestep is > 0 (diffusers' rule: "trailing"'s last step, t = 142 for 7 steps, is noisy). β̃ is
    clamped at 1e-20 as diffusers clamps it."""
    A, B = _x0_columns(p, prediction_type)
    ab, ab_prev, beta = p.alpha_bars, p.alpha_bars_prev, p.betas
    C0 = torch.sqrt(ab_prev) * beta / (1.0 - ab)                            # diffusers' pred_original_sample_coeff
    C1 = torch.sqrt(p.alphas) * (1.0 - ab_prev) / (1.0 - ab)                # diffusers' current_sample_coeff
    post = ((1.0 - ab_prev) / (1.0 - ab) * beta).clamp_min(1e-20)           # β̃, NaN stays NaN
    if variance_type in ("fixed_large", "fixed_large_log"):                # fixed_large_log: exp(½ log β') (#14569)
        sigma = torch.sqrt(beta)
    elif variance_type in ("learned", "learned_range"):                    # learned: √v; learned_range: log-interp.
        sigma = torch.ones_like(beta)
    else:                                                                  # fixed_small(_log), and the fall-through
        sigma = torch.sqrt(post)
    sigma = sigma * (t > 0).to(_F64)
    rows = _T.finish_table(A, B, C0, C1, torch.zeros_like(A), sigma, clip=clip, clip_range=clip_range,
                           log_lo=torch.log(post), log_hi=torch.log(beta))
    reason = _reasons(rows, p, prediction_type, clip, C0, check_logs=variance_type == "learned_range")
    return rows, reason


def ddim_rows(p: _Pairs, prediction_type: str, eta: float, clip: bool, clip_range: float,
              use_clipped_model_output: bool):
    """float64 [R, NCOL] rows of diffusers' DDIM(η) step for the pairs ``p``, and the reason code per row.

    σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t) · β'_t) with diffusers' β'_t = 1 − fl32(ᾱ_t/ᾱ_prev); prev = √ᾱ_prev x̂₀ +
    √(1 − ᾱ_prev − σ²) ε̂ + σ z, ε̂ linear in (x, out) — or in (x, x̂₀) when re-derived from the clipped x̂₀ — so it
    folds into C0..C2. A row whose 1 − ᾱ_prev − σ² is negative (beyond float64 rounding) has no real answer."""
    A, B = _x0_columns(p, prediction_type)
    ab, ab_prev = p.alpha_bars, p.alpha_bars_prev
    sigma = eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab) * p.betas)
    d2 = 1.0 - ab_prev - sigma ** 2
    neg = d2 < -1e-12
    d = torch.sqrt(d2.clamp_min(0.0))
    Kx, K0, Ko = _T.eps_linear(p, prediction_type, clip and use_clipped_model_output)
    C0 = torch.sqrt(ab_prev) + d * K0
    rows = _T.finish_table(A, B, C0, d * Kx, d * Ko, sigma, clip=clip, clip_range=clip_range)
    reason = _reasons(rows, p, prediction_type, clip, C0, check_logs=False)
    reason[neg & (reason == _OK)] = _ETA
    return rows, reason


def _reasons(rows, p: _Pairs, prediction_type: str, clip: bool, C0, check_logs: bool) -> torch.Tensor:
    """int8 [R]: why each row has no finite value (_OK where it has one)."""
    cols = [_T.COL[c] for c in ("A", "B", "C0", "C1", "C2", "SIGMA", "CLIP")]
    if check_logs:
        cols += [_T.COL["LOG_LO"]]
    finite = torch.isfinite(rows[:, cols]).all(dim=1)
    if check_logs:
        finite &= ~torch.isnan(rows[:, _T.COL["LOG_HI"]])
    reason = torch.where(finite, _OK, _NONFINITE).to(torch.int8)
    if prediction_type == "epsilon" and not clip:           # x̂₀ = (x − ε)/0 carried into the result
        reason[(p.alpha_bars == 0) & (C0 != 0)] = _EPS_INF
    reason[(p.alpha_bars < 0) | (p.alpha_bars_prev < 0)] = _NEG_ALPHA
    return reason


# ------------------------------------------------------------------------------------------------ shared machinery
class _FastSchedulerBase:
    """The part FastDDPMScheduler and FastDDIMScheduler share: previous timesteps, tables, noise, backend, the step."""

    order = 1
    #: "auto", "triton", "torch" or "reference" (see the module doc). Not part of the config.
    backend = "auto"
    #: Seed of the fast-mode counter noise; None: drawn from torch's default generator once per set_timesteps.
    noise_seed = None
    _kind = ""

    # -------------------------------------------------------------------- construction helpers
    def _init_common(self, stock, final_alpha) -> None:
        cfg = self.config
        if not isinstance(cfg.fastrev_fixes, bool):
            raise TypeError(f"fastrev_fixes must be a bool, got {cfg.fastrev_fixes!r}")
        self._fixes = cfg.fastrev_fixes
        pt = cfg.prediction_type
        # diffusers raises for an unknown prediction_type at step (and accepts it until then): so does fastrev
        self._config_error = None if isinstance(pt, str) and pt in PREDICTION_TYPES else (
            f"prediction_type given as {pt!r} must be one of {PREDICTION_TYPES} for the {type(self).__name__}")
        # diffusers' own float32 tables, from diffusers' own constructor (every beta_schedule, trained_betas and
        # rescale_betas_zero_snr exactly as diffusers builds them)
        self.betas = stock.betas
        self.alphas = stock.alphas
        self.alphas_cumprod = stock.alphas_cumprod
        self._abar = stock.alphas_cumprod.detach().cpu().to(torch.float32).clone()   # add_noise may move the public one
        self._alpha = stock.alphas.detach().cpu().to(torch.float32).clone()
        self._final = torch.as_tensor(final_alpha, dtype=torch.float32).reshape(())
        self._N = N = int(cfg.num_train_timesteps)
        self._clip = bool(cfg.thresholding or cfg.clip_sample)
        self._thresholding = bool(cfg.thresholding)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(0, N)[::-1].copy().astype(np.int64))
        self._device_state: dict = {}       # device tensors that live as long as the scheduler (see _install)
        self._tables: dict = {}             # (key, device, dtype) → its device_state tensor: one lookup per step
        self._t_cache: dict = {}            # (t, B, device) → int64 [B]: a host timestep's rows, made once
        self._drawn_seed = None
        self._minus_one_scheduled = False   # diffusers' "trailing" spacing ends with t = −1 for some n
        self._install(np.arange(N, dtype=np.int64) - 1, None)     # before set_timesteps: t → t − 1

    def _install(self, prev: np.ndarray, on_chain: np.ndarray | None) -> None:
        """Install the previous timestep of every training timestep (``prev``: int64 [N], −1 = past the end) and
        the timesteps a host timestep may step from (``on_chain``: bool [N], None = all).

        Device tensors (tables, previous-timestep lookup, drawn fast-mode seed) keep their storage for the
        scheduler's life and are rewritten in place — every table has num_train_timesteps rows whatever the chain —
        so a step captured in a CUDA graph stays valid across ``set_timesteps`` calls."""
        self._prev = prev
        self._prev_t = torch.from_numpy(np.append(prev, -1))            # [N + 1]: a device t = −1 wraps to −1
        if on_chain is not None:
            on_chain = np.append(on_chain, bool(self._minus_one_scheduled))
        self._on_chain = on_chain                                      # [N + 1]: host index N is t = −1
        self._pairs = None
        self._host_tables: dict = {}
        self._drawn_seed = None
        for ck, tensor in self._device_state.items():               # rewrite what earlier steps put on devices
            tensor.copy_(self._host_value(ck))

    def _chain_prev(self, desc: np.ndarray) -> np.ndarray:
        """Every t's previous timestep by the chain ``desc``: the largest scheduled timestep below t (the next entry
        of ``timesteps`` for a scheduled t), −1 below the smallest."""
        asc = np.unique(desc)
        pos = np.searchsorted(asc, np.arange(self._N), side="left") - 1
        return np.where(pos >= 0, asc[np.maximum(pos, 0)], -1).astype(np.int64)

    def _pair_values(self) -> _Pairs:
        """(ᾱ_t, ᾱ_prev, α'_t) of every row in float64, from diffusers' float32 values: α'_t = fl32(ᾱ_t/ᾱ_prev) as
        diffusers' step rounds it; where both are 0 in float32 (underflow; diffusers: 0/0 = NaN) the float64 product
        of diffusers' float32 α over (prev, t]."""
        if self._pairs is None:
            # entry N is timestep −1, which diffusers evaluates at alphas_cumprod[-1], stepping to the end
            ab = torch.cat([self._abar, self._abar[-1:]])
            p = torch.from_numpy(np.append(self._prev, -1))
            ab_prev = torch.where(p >= 0, ab[p.clamp_min(0)], self._final)
            alpha = (ab / ab_prev).to(_F64)                                 # the float32 quotient, as diffusers
            both0 = torch.nonzero((ab == 0) & (ab_prev == 0)).reshape(-1).tolist()
            if both0:
                a64 = self._alpha.to(_F64)
                for t in both0:
                    alpha[t] = torch.prod(a64[int(p[t]) + 1:t + 1]) if p[t] >= 0 else float("nan")
            self._pairs = _Pairs(ab.to(_F64), ab_prev.to(_F64), alpha)
        return self._pairs

    def _host_table(self, key: tuple):
        """(float64 [N + 2, NCOL] buffer, int8 numpy [N + 1] reasons) for ``key``.

        Buffer row t + 1 is the step from training timestep t to ``previous_timestep(t)``; rows 0 and N + 1 are both
        the step from t = −1 (diffusers' "trailing" spacing ends there for some n, and reads alphas_cumprod[-1]).
        The table a step reads is the view ``buffer[1:]``: a host t = −1 indexes it at N, a device t = −1 reaches
        row 0 through the kernel's pointer arithmetic and row N + 1 through torch's negative indexing — every
        timestep diffusers' schedules produce is in bounds without a host sync. Reasons are indexed like the view
        (t, or N for −1). Rows without a finite value (reason ≠ 0) are NaN."""
        entry = self._host_tables.get(key)
        if entry is None:
            rows, reason = self._build_rows(self._pair_values(), key)
            rows[reason != _OK] = float("nan")
            entry = self._host_tables[key] = (torch.cat([rows[-1:], rows]), reason.numpy())
        return entry

    def _host_value(self, ck: tuple) -> torch.Tensor:
        """The current host value of device-state entry ``ck``: ("table", key, device, dtype) | ("prev_t", device)
        | ("fixed_seed", seed, device) | ("seed", device)."""
        kind = ck[0]
        if kind == "table":
            return self._host_table(ck[1])[0].to(ck[3])
        if kind == "prev_t":
            return self._prev_t
        if kind == "fixed_seed":
            return _as_seed_tensor(ck[1], "cpu")
        if self._drawn_seed is None:
            self._drawn_seed = _ops.draw_seed(None, "cpu")                 # host RNG, no device sync
        return self._drawn_seed

    def _device_value(self, ck: tuple, device: torch.device) -> torch.Tensor:
        full = ck[:2] + (device,) + ck[2:] if ck[0] == "table" else ck + (device,)
        t = self._device_state.get(full)
        if t is None:
            t = self._host_value(full).to(device).contiguous()
            self._device_state[full] = t
        return t

    def _table(self, key: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The table for ``key`` on ``device`` in ``dtype`` (uploaded once, then rewritten in place per chain)."""
        table = self._tables.get((key, device, dtype))
        if table is None:
            table = self._tables[key, device, dtype] = self._device_value(("table", key, dtype), device)[1:]
        return table

    def _seed_tensor(self, device: torch.device) -> torch.Tensor:
        """The fast-mode seed as an int64 [1] tensor on ``device`` (no transfer per step): ``noise_seed`` if set, else
        drawn from torch's default generator once per chain (at its first fast step, or at set_timesteps when an
        earlier chain already used fast mode on that device)."""
        if self.noise_seed is not None:
            return self._device_value(("fixed_seed", int(self.noise_seed)), device)
        return self._device_value(("seed",), device)

    def _prepare(self, device) -> None:
        """Build the default table (and the previous-timestep lookup) on ``device`` ahead of the first step."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = self._default_key()
        if key is not None and self._config_error is None:
            self._table(key, device, _ops.table_dtype(_ops.resolve_backend(self.backend, device)))
        self._device_value(("prev_t",), device)

    # -------------------------------------------------------------------- errors that name the user's config
    def _describe_config(self) -> str:
        cfg = self.config
        parts = [f"num_train_timesteps={cfg.num_train_timesteps}"]
        if cfg.trained_betas is not None:
            parts.append("trained_betas=[...]")
        else:
            parts.append(f"beta_schedule={cfg.beta_schedule!r}")
            if cfg.beta_schedule != "squaredcos_cap_v2":
                parts += [f"beta_start={cfg.beta_start}", f"beta_end={cfg.beta_end}"]
        if cfg.rescale_betas_zero_snr:
            parts.append("rescale_betas_zero_snr=True")
        parts.append(f"prediction_type={cfg.prediction_type!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _no_answer(self, t: int, code: int, key: tuple) -> ValueError:
        p = int(self._prev[t]) if t < self._N else -1
        t = t if t < self._N else -1
        where = f"the step from timestep {t} (to {p if p >= 0 else 'the end'})"
        if code == _NEG_ALPHA:
            why = (f"this schedule's alphas_cumprod is negative there (a beta above 1: betas reach "
                   f"{float(self.betas.max()):.4g}), and its square root has no real value")
        elif code == _EPS_INF:
            why = (f"alphas_cumprod[{t}] is 0 in float32 (the schedule's signal has vanished by then), so the "
                   "ε-prediction x̂₀ = (x − √(1−ᾱ)·ε)/√ᾱ is infinite and this config does not clip it; enable "
                   "clip_sample or thresholding, use prediction_type='v_prediction' or 'sample', or start later")
        elif code == _ETA:
            why = (f"eta={key[2]} makes 1 − ᾱ_prev − σ² negative there (DDIM needs 0 <= eta <= 1 at this stride; "
                   "diffusers returns NaN)")
        else:
            ap = float(self._abar[p]) if p >= 0 else float(self._final)
            why = (f"alphas_cumprod is {float(self._abar[t]):.6g} at {t} and {ap:.6g} at the previous timestep: "
                   "the step's coefficients are not finite (diffusers returns NaN or inf)")
        return ValueError(f"{self._describe_config()}: {where} has no finite value: {why}")

    def _check_host_timesteps(self, host, key: tuple, reason: np.ndarray) -> None:
        """Host-known timesteps (int or int64 numpy [B]): scheduled (DDPM, as diffusers requires) and with an
        answer."""
        if isinstance(host, int):
            if self._on_chain is not None and not self._on_chain[host]:
                raise self._not_scheduled(host if host < self._N else -1)
            if reason[host]:
                raise self._no_answer(host, int(reason[host]), key)
            return
        if self._on_chain is not None and not self._on_chain[host].all():
            t = int(host[~self._on_chain[host]][0])
            raise self._not_scheduled(t if t < self._N else -1)
        bad = reason[host]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._no_answer(int(host[i]), int(bad[i]), key)

    def _not_scheduled(self, t: int) -> ValueError:
        return ValueError(f"timestep {t} is not one of scheduler.timesteps (DDPMScheduler cannot step from it "
                          "either: call set_timesteps first and step with its timesteps, or set fastrev_fixes=True "
                          "to step it to the largest scheduled timestep below it)")

    # -------------------------------------------------------------------- diffusers API
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """No scaling (diffusers' DDPM/DDIM): returns ``sample``."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _spaced(self, n) -> np.ndarray:
        """diffusers' timesteps for ``n`` inference steps (descending; fastrev's exact n points for "trailing" with
        fastrev_fixes)."""
        cfg = self.config
        N = self._N
        if cfg.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={cfg.timestep_spacing!r} is not supported. Please make sure to choose "
                             f"one of {TIMESTEP_SPACINGS}")
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > N:
            raise ValueError(
                f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: {N} as the unet "
                f"model trained with this scheduler can only handle maximal {N} timesteps.")
        if self._fixes and cfg.timestep_spacing == "trailing":
            return spaced_timesteps(N, n, "trailing").numpy()[::-1].copy()
        return _diffusers_timesteps(N, n, cfg.timestep_spacing, cfg.steps_offset)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        """Set the inference chain, as diffusers: ``num_inference_steps`` spaced by ``config.timestep_spacing`` (with
        ``steps_offset`` for "leading"), or custom descending ``timesteps``. ``self.timesteps`` (descending int64) is
        put on ``device``; when ``device`` is given the step tables are built there now (not at the first step)."""
        N = self._N
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = np.asarray(timesteps.cpu().numpy() if isinstance(timesteps, torch.Tensor) else list(timesteps))
            if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
                raise ValueError(f"`timesteps` must be a non-empty 1-D sequence of ints, got {timesteps!r}")
            desc = ts.astype(np.int64)
            if (np.diff(desc) >= 0).any():
                raise ValueError("`custom_timesteps` must be in descending order.")
            if desc[0] >= N:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {N}.")
            if desc[-1] < 0:
                raise ValueError(f"`timesteps` must be >= 0, got {int(desc[-1])}")
            self.custom_timesteps = True
            if self._kind == "ddim":
                self.num_inference_steps = int(desc.size)
        else:
            if num_inference_steps is None:
                raise ValueError("pass `num_inference_steps` or `timesteps`")
            desc = self._spaced(num_inference_steps)
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
        self._minus_one_scheduled = bool((desc == -1).any())
        self._install(*self._prev_rule(desc))
        self.timesteps = torch.from_numpy(desc.copy()).to(device)
        if device is not None:
            self._prepare(device)

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` lands on (−1: past the end). A tensor gives a tensor on its
        device (a device gather, no sync)."""
        if isinstance(timestep, torch.Tensor):
            return self._device_value(("prev_t",), timestep.device)[timestep.long()]
        return int(self._prev_t[int(timestep)])

    # -------------------------------------------------------------------- the step
    def _resolve_t(self, timestep, B: int, device: torch.device):
        """(int64 [B] rows on ``device``, the host value: an int, an int64 numpy [B], or None for a device tensor
        — read back only with ``fastrev.set_device_checks(True)``)."""
        N = self._N
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            t = int(timestep)
            if not 0 <= t < N:
                if t != -1 or self._fixes:
                    raise ValueError(f"timestep must be in [0, {N}), got {t}")
                t = N                            # diffusers' t = −1 (alphas_cumprod[-1]): the table's row N
            ck = (t, B, device)
            rows = self._t_cache.get(ck)
            if rows is None:
                if len(self._t_cache) > 8192:
                    self._t_cache.clear()
                rows = self._t_cache[ck] = torch.full((B,), t, dtype=torch.int64, device=device)
            return rows, t
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        if timestep.device.type == "cpu" and timestep.numel() == 1 and timestep.dim() <= 1 and \
                not (timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool):
            return self._resolve_t(int(timestep), B, device)
        if timestep.device.type == "cpu":
            if not self._fixes and bool((timestep == -1).any()):
                timestep = torch.where(timestep == -1, N, timestep)     # diffusers' t = −1: the table's row N
                N += 1
            rows = _ops.resolve_timestep(timestep, B, N, device)    # dtype, shape and range checks
            return rows, timestep.reshape(-1).expand(B).numpy().astype(np.int64)
        if not _ops._CHECK_DEVICE_TIMESTEPS:
            return _ops.resolve_timestep(timestep, B, N, device), None    # dtype and shape checks, no sync
        # opt-in device checks (fastrev.set_device_checks): read the timesteps back, check them as host ones
        _, host = self._resolve_t(timestep.cpu(), B, torch.device("cpu"))
        return timestep.to(device=device, dtype=torch.int64).reshape(-1).expand(B).contiguous(), host

    def _run_step(self, model_output, timestep, sample, *, key, var_mode, learned, stochastic, generator,
                  variance_noise, ddpm_draw_rule):
        _check_float("model_output", model_output)
        _check_float("sample", sample)
        if self._config_error is not None:
            raise ValueError(self._config_error)
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension (shape [B, ...])")
        device = sample.device
        if model_output.device != device:
            raise ValueError(f"model_output is on {model_output.device} but sample is on {device}")
        out_part = model_output[:, :sample.shape[1]] if learned else model_output
        if out_part.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        if sample.dtype != model_output.dtype:
            # diffusers' arithmetic promotes (fp16 sample + fp32 output → fp32 results): so do the outputs here
            sample = sample.to(torch.promote_types(sample.dtype, model_output.dtype))
        B = sample.shape[0]
        t, host = self._resolve_t(timestep, B, device)
        reason = self._host_table(key)[1]
        if host is not None:
            self._check_host_timesteps(host, key, reason)

        # ---- noise: exact (diffusers' randn_tensor or the caller's tensor) or fast (the counter stream)
        z, seed = None, None
        if stochastic:
            if generator is not None and variance_noise is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            if variance_noise is not None:
                _check_float("variance_noise", variance_noise)
                try:
                    z = variance_noise if variance_noise.shape == sample.shape and variance_noise.device == device \
                        else variance_noise.to(device).expand(sample.shape)
                except RuntimeError:
                    raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)} (or "
                                     f"broadcast to it), got {tuple(variance_noise.shape)}") from None
            elif generator is not None:
                if ddpm_draw_rule:               # diffusers draws iff t > 0 (a host read of a device t, as diffusers)
                    if host is not None:                 # (host index N is t = −1: no draw, as diffusers)
                        N = self._N
                        stochastic = 0 < host < N if isinstance(host, int) else bool(((host > 0) & (host < N)).any())
                    elif not self._fixes and timestep.numel() == 1:
                        stochastic = bool(timestep.reshape(()) > 0)
                if stochastic:
                    z = randn_tensor(out_part.shape, generator=generator, device=device, dtype=model_output.dtype)
            else:
                seed = self._seed_tensor(device)

        # ---- backend and its table
        any_f64 = sample.dtype == _F64 or model_output.dtype == _F64 or (z is not None and z.dtype == _F64)
        needs_grad = (sample.requires_grad or model_output.requires_grad) and torch.is_grad_enabled()
        backend = _ops.resolve_backend(self.backend, device, any_f64=any_f64, needs_grad=needs_grad)
        table = self._table(key, device, _ops.table_dtype(backend, any_f64))
        cfg = self.config
        return _ops.fused_step(
            table, t, sample, model_output, learned=learned, var_mode=var_mode, clip=self._clip,
            thresholding=self._thresholding, dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
            sample_max_value=cfg.sample_max_value, noise=z, seed=seed, stochastic=stochastic, return_x0=True,
            backend=backend)


# ------------------------------------------------------------------------------------------------ DDPM
class FastDDPMScheduler(_FastSchedulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``DDPMScheduler``: same config (plus ``fastrev_fixes``), same API, same numbers (see the module doc),
    one fused step.

    ``pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)``. Extras: ``timestep`` may be a [B]
    tensor (per-sample steps); ``step`` takes ``variance_noise``; without a generator the noise is the in-kernel
    counter stream; ``backend`` / ``noise_seed`` attributes.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _kind = "ddpm"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        fastrev_fixes: bool = False,
    ):
        stock = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr)
        if variance_type not in DDPM_VARIANCE_TYPES and repr(variance_type) not in _WARNED_VARIANCE_TYPES:
            _WARNED_VARIANCE_TYPES.add(repr(variance_type))
            warnings.warn(f"variance_type={variance_type!r} is not one of {DDPM_VARIANCE_TYPES}; like diffusers' "
                          "DDPMScheduler, the step uses the clamped posterior variance β̃ for it (as 'fixed_small')",
                          UserWarning, stacklevel=3)
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self._init_common(stock, 1.0)

    # diffusers' own forward-process helpers and variance, reused as they are
    add_noise = DDPMScheduler.add_noise
    get_velocity = DDPMScheduler.get_velocity
    _get_variance = DDPMScheduler._get_variance

    def _prev_rule(self, desc: np.ndarray):
        """diffusers' previous_timestep: the next entry of ``timesteps``; only scheduled timesteps may step (unless
        fastrev_fixes: any t, to the largest scheduled timestep below it)."""
        prev = self._chain_prev(desc)
        if self._fixes:
            return prev, None
        on_chain = np.zeros(self._N, dtype=bool)
        on_chain[desc[(desc >= 0) & (desc < self._N)]] = True
        return prev, on_chain

    def _key(self):
        vt = self.variance_type
        return ("ddpm", self.config.prediction_type, vt if vt in DDPM_VARIANCE_TYPES else "fixed_small", self._clip,
                float(self.config.clip_sample_range))

    _default_key = _key

    def _build_rows(self, p: _Pairs, key):
        _, pt, vt, clip, rng = key
        return ddpm_rows(p, torch.cat([torch.arange(self._N), torch.tensor([-1])]), pt, vt, clip, rng)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None):
        """One DDPM step x_t → x_{previous_timestep(t)} (diffusers' signature and outputs).

        Args:
            model_output: ε, x₀ or v (``prediction_type``); 2C channels (output, then variance values) for
                ``variance_type`` "learned" / "learned_range".
            timestep: an int, a 0-dim tensor or a [B] tensor of timesteps from ``self.timesteps`` (per-sample steps).
            sample: x_t, [B, C, ...].
            generator: a torch.Generator or a list of them (one per sample): exact mode, the noise drawn as diffusers
                draws it. None (and no ``variance_noise``): fast mode, fastrev's counter-stream noise.
            return_dict: False returns ``(prev_sample, pred_original_sample)``.
            variance_noise: (fastrev extension) the noise z itself, shaped like ``sample``.
        """
        vt = self.variance_type
        learned = vt == "learned" or vt == "learned_range"
        if learned and not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
                            and model_output.dim() >= 2 and sample.dim() >= 2
                            and model_output.shape[1] == 2 * sample.shape[1]):
            # diffusers splits only a 2C-channel output; without the variance channels it fails where it adds noise
            # (t > 0) and computes the noiseless t = 0 step: so does this
            if not _host_all_zero(timestep):
                raise ValueError(f"variance_type={vt!r} needs a model_output with twice the sample's channels "
                                 "(output, then variance values): sample "
                                 f"{tuple(getattr(sample, 'shape', ()))}, model_output "
                                 f"{tuple(getattr(model_output, 'shape', ()))}")
            learned = False
        var_mode = (_T.VAR_LINEAR if vt == "learned" else _T.VAR_RANGE) if learned else _T.VAR_FIXED
        prev, x0 = self._run_step(model_output, timestep, sample, key=self._key(), var_mode=var_mode,
                                  learned=learned, stochastic=True, generator=generator,
                                  variance_noise=variance_noise, ddpm_draw_rule=True)
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _host_all_zero(timestep) -> bool:
    if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
        return int(timestep) == 0
    return isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel() > 0 and \
        not timestep.dtype.is_floating_point and bool((timestep == 0).all())


# ------------------------------------------------------------------------------------------------ DDIM
class FastDDIMScheduler(_FastSchedulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``DDIMScheduler``: same config (plus ``fastrev_fixes``), same API, same numbers (see the module doc),
    one fused step.

    ``pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)`` (after the pipeline is built:
    ``DDIMPipeline.__init__`` converts its scheduler to a DDIMScheduler). Extras: per-sample ``timestep`` [B];
    custom ``timesteps`` in ``set_timesteps``; fast counter-stream noise without a generator.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _kind = "ddim"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        fastrev_fixes: bool = False,
    ):
        stock = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.final_alpha_cumprod = stock.final_alpha_cumprod
        self._init_common(stock, stock.final_alpha_cumprod)

    add_noise = DDIMScheduler.add_noise
    get_velocity = DDIMScheduler.get_velocity
    _get_variance = DDIMScheduler._get_variance

    def _prev_rule(self, desc: np.ndarray):
        """diffusers: t − N // n for every t (any spacing, on the chain or off it). fastrev_fixes (and custom
        timesteps, which diffusers' DDIM does not take): the next entry of ``timesteps``."""
        if self._fixes or self.custom_timesteps:
            return self._chain_prev(desc), None
        prev = np.arange(self._N, dtype=np.int64) - self._N // self.num_inference_steps
        return np.maximum(prev, -1), None

    def _key(self, eta: float, use_clipped_model_output: bool):
        return ("ddim", self.config.prediction_type, float(eta), self._clip, float(self.config.clip_sample_range),
                bool(use_clipped_model_output) and self._clip)

    def _default_key(self):
        return self._key(0.0, False) if self.num_inference_steps is not None else None

    def _build_rows(self, p: _Pairs, key):
        _, pt, eta, clip, rng, use_clipped = key
        return ddim_rows(p, pt, eta, clip, rng, use_clipped)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """One DDIM(η) step x_t → x_{previous_timestep(t)} (diffusers' signature and outputs): t − N // n, or the
        next entry of ``timesteps`` with fastrev_fixes.

        Args:
            model_output: ε, x₀ or v (``prediction_type``).
            timestep: an int, a 0-dim tensor or a [B] tensor of timesteps in [0, num_train_timesteps).
            sample: x_t.
            eta: η (0: deterministic DDIM; 1: DDPM-like). Noise is added (and drawn) iff η > 0.
            use_clipped_model_output: re-derive ε̂ from the clipped x̂₀ (None counts as False, as pipelines pass it).
            generator / variance_noise: exact mode (diffusers' noise, or the given z); neither: fast counter noise.
            return_dict: False returns ``(prev_sample, pred_original_sample)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if isinstance(eta, torch.Tensor) and eta.numel() == 1 and eta.dtype.is_floating_point:
            eta = float(eta)                      # diffusers takes a tensor η too (and branches on it: a host read)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"eta must be a number (or a one-element floating tensor), got {type(eta).__name__}")
        if not math.isfinite(eta):
            raise ValueError(f"eta must be finite, got {eta}")
        prev, x0 = self._run_step(model_output, timestep, sample, key=self._key(eta, use_clipped_model_output),
                                  var_mode=_T.VAR_FIXED, learned=False, stochastic=eta > 0, generator=generator,
                                  variance_noise=variance_noise, ddpm_draw_rule=False)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# the σ-space and flow-matching drop-ins (fastrev/diffusers_euler.py) and the multistep DPM-Solver and UniPC
# drop-ins (fastrev/diffusers_dpm.py, fastrev/diffusers_unipc.py), re-exported here: one import for every drop-in
from .diffusers_dpm import FastDPMSolverMultistepScheduler  # noqa: E402
from .diffusers_euler import (  # noqa: E402
    FastEulerAncestralDiscreteScheduler,
    FastEulerDiscreteScheduler,
    FastFlowMatchEulerDiscreteScheduler,
)
from .diffusers_unipc import FastUniPCMultistepScheduler  # noqa: E402
