"""Drop-in diffusers schedulers: :class:`FastDDPMScheduler` and :class:`FastDDIMScheduler`.

One line in a diffusers pipeline::

    from fastrev.diffusers import FastDDPMScheduler
    pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)

Both are ``SchedulerMixin, ConfigMixin`` subclasses with ``DDPMScheduler`` / ``DDIMScheduler``'s exact config names and
defaults, so ``from_config`` works in both directions and ``save_config`` / ``from_pretrained`` round-trip.

How a step runs. ``set_timesteps`` fixes the chain of inference timesteps; each step is one row of a per-timestep
float64 coefficient table (:mod:`fastrev.tables`) built once on the host from diffusers' own float32 ᾱ values and
indexed by the **training timestep** (``num_train_timesteps`` rows; rows of timesteps that are not in the chain are
NaN). ``step`` gathers each sample's row by its timestep on the device: no ``.item()``, no ``nonzero()``, no Python
branch on a device value, so a step can be captured in a CUDA graph. ``timestep`` may be an int, a 0-dim tensor or a
``[B]`` tensor (one step per sample).

Two noise modes:
  * **exact** (a ``generator`` — a list of generators too — or ``variance_noise``): the noise is drawn exactly as
    diffusers' ``randn_tensor`` draws it (same shape, dtype, device, same generator consumption), so outputs match
    diffusers to float32 rounding;
  * **fast** (neither): :mod:`fastrev.noise`'s counter stream, keyed by (seed, sample index, timestep) and generated
    inside the fused kernel. The seed is ``scheduler.noise_seed`` if set, else drawn once per ``set_timesteps`` from
    torch's default generator at the first fast step.

Backends (``scheduler.backend``, an attribute, not part of the config): ``"auto"`` runs the fused Triton kernel on CUDA
(float16/bfloat16/float32) and the float64 torch update of the same table elsewhere (CPU, float64 inputs, autograd);
``"triton"`` forces the kernel (on CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"`` forces the torch update.

Deliberate differences from diffusers (everything else matches):
  * ``variance_type="fixed_large_log"``: diffusers takes the square root of a log-variance and returns NaN
    (huggingface/diffusers#14569); here the noise scale is exp(½·log β_t) = √β_t, as ``fixed_large``.
  * DDIM's previous timestep is the next entry of ``timesteps`` (as DDPM does), not ``t − N // n``: diffusers' formula
    is wrong for ``timestep_spacing="linspace"`` (#12633) and for ``"trailing"`` when n does not divide N (its last
    step then lands on ᾱ_0 instead of ``final_alpha_cumprod``). Identical for ``"leading"`` and divisible trailing.
  * DDIM ``step`` before ``set_timesteps`` raises, as in diffusers; DDPM steps the full chain (t → t − 1), as in
    diffusers. A timestep that is not in ``timesteps`` raises (host timestep) or gives NaN (device timestep), where
    diffusers raises an IndexError (DDPM) or uses the stride formula (DDIM).
  * An ``eta`` for which 1 − ᾱ_prev − σ² < 0 raises a ValueError instead of returning NaN.
  * ``set_timesteps`` checks its arguments up front (e.g. a "leading" ``steps_offset`` that pushes a timestep past
    ``num_train_timesteps`` raises there, not at the first step); unknown ``variance_type`` / ``prediction_type`` /
    ``timestep_spacing`` raise at construction. DDIM also accepts custom ``timesteps``.
  * Zero terminal SNR (``rescale_betas_zero_snr``, ᾱ_999 = 0): with ε-prediction x̂₀ = (x − ε)/√0 is ±inf in
    diffusers; the table uses 2¹⁰⁰ for 1/√0, so a clipped x̂₀ is the same ±clip_sample_range (and with thresholding
    ±1, where diffusers' quantile of ±inf gives NaN); an unclipped one is huge but finite. DDIM with η > 0 at
    ᾱ_t = 0: √(1 − ᾱ_prev − σ²) is exactly 0, which diffusers' float32 arithmetic rounds to √(negative) = NaN.
  * Coefficients are float64, computed from diffusers' float32 ᾱ (with its float32 α'_t = ᾱ_t/ᾱ_prev, the one
    rounding of diffusers' that moves results beyond float32 noise). Where diffusers' float32 arithmetic cancels
    — x̂₀ at t ≈ 999 (1/√ᾱ up to 1.6e4 on the cosine schedule), DDIM's √(1 − ᾱ_prev − σ²) for η ≈ 1 as ᾱ_t → 0 —
    fastrev's value is the accurate one; the two agree to within diffusers' own rounding there.
  * With a device timestep and a generator, DDPM draws its noise also at t = 0 (diffusers skips the draw there, which
    needs a host sync); the noise is multiplied by 0, only the generator's state after the last step differs.
  * Without a generator the noise is fastrev's counter stream, not ``torch.randn`` from the global generator.

CUDA graphs: capture ``step`` with a device ``timestep`` tensor in fast mode (or with ``variance_noise`` from a static
tensor) after one eager step (PyTorch's usual warm-up); replay after writing the next timestep into the captured
tensor. Tables live on the device for the scheduler's life and ``set_timesteps`` rewrites them in place, so the graph
stays valid for a new chain.

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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import noise as _noise  # noqa: E402
from . import ops as _ops  # noqa: E402
from . import tables as _T  # noqa: E402
from .schedule import Schedule, spaced_timesteps  # noqa: E402

__all__ = ["FastDDPMScheduler", "FastDDIMScheduler", "DDPM_VARIANCE_TYPES", "BACKENDS"]

DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                       "learned_range")
BACKENDS = ("auto", "torch", "reference", "triton")
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("linspace", "leading", "trailing")
_INV_SQRT_ZERO = 2.0 ** 100   # finite stand-in for 1/√ᾱ where ᾱ = 0 (zero terminal SNR); a power of two: exact
_F64 = torch.float64


_check_in = _ops._check_choice


# ------------------------------------------------------------------------------------------------ tables
def _chain_schedule(alphas_cumprod: torch.Tensor, chain: torch.Tensor, final_alpha: float, N: int) -> Schedule:
    """The :class:`Schedule` of the inference chain: row r is the r-th smallest inference timestep, its
    ``alpha_bars_prev`` the ᾱ of the previous chain entry (``final_alpha`` before the first one).

    Built from diffusers' float32 ᾱ, with α'_t = fl32(ᾱ_t / ᾱ_prev) rounded as diffusers' step rounds its
    ``current_alpha_t`` and β'_t = 1 − α'_t exact in float64, so that the Schedule's α' (= 1 − β') is diffusers'
    α' too (a float64 quotient would put β' up to 5e-4 relative away from diffusers' at small t; a float32 β' would
    lose α' where it is tiny, e.g. 1e-3 relative at t = 999 of the cosine schedule). When ``final_alpha`` is not 1
    (DDIM, ``set_alpha_to_one=False``) a leading dummy row holds it. β' is floored at a tiny positive number where
    it is 0 (ᾱ_prev = ᾱ_t: only DDIM's dummy case, whose table does not use β).
    """
    ab = alphas_cumprod[chain].to(torch.float32)
    if final_alpha != 1.0:
        ab = torch.cat([torch.tensor([final_alpha], dtype=torch.float32), ab])
    prev = torch.cat([torch.ones(1, dtype=torch.float32), ab[:-1]])
    beta = (1.0 - (ab / prev).to(_F64)).clamp_min(1e-300)        # α' = the float32 quotient, as diffusers
    ts = chain if final_alpha == 1.0 else torch.cat([torch.zeros(1, dtype=torch.int64), chain])
    return Schedule(beta, alpha_bars=ab.to(_F64), timesteps=ts, num_train_timesteps=N)


def _x0_coefficients(s: Schedule, prediction_type: str):
    A, B = _T.x0_coefficients(s, prediction_type)
    # ᾱ_t = 0 (zero terminal SNR): 1/√ᾱ is inf, and inf·x − inf·ε would be NaN where diffusers' (x − ε)/0 is ±inf
    A = torch.where(torch.isinf(A), torch.full_like(A, _INV_SQRT_ZERO), A)
    B = torch.where(torch.isinf(B), torch.full_like(B, -_INV_SQRT_ZERO), B)
    return A, B


def ddpm_rows(s: Schedule, train_t: torch.Tensor, prediction_type: str, variance_type: str, clip: bool,
              clip_range: float) -> torch.Tensor:
    """float64 [R, NCOL] rows of diffusers' DDPM step on the chain schedule ``s`` (``train_t``: the raw timesteps).

    Mean: the posterior mean μ̃(x̂₀, x) with the chain's ᾱ_prev and β'. Noise iff the raw timestep is > 0 (diffusers'
    rule, so "trailing"'s last step, t = 142 for 7 steps, is noisy). β̃ is clamped at 1e-20 like diffusers'.
    """
    A, B = _x0_coefficients(s, prediction_type)
    beta = s.betas                                          # β'_t of the chain
    post = s.posterior_variance.clamp_min(1e-20)            # β̃_t, clamped as diffusers clamps it
    noisy = (train_t > 0).to(_F64)
    if variance_type in ("fixed_small", "fixed_small_log"):
        sigma = torch.sqrt(post)
    elif variance_type in ("fixed_large", "fixed_large_log"):   # fixed_large_log: exp(½ log β') (diffusers: NaN)
        sigma = torch.sqrt(beta)
    else:                                                   # learned: √v; learned_range: log-interpolation
        sigma = torch.ones_like(beta)
    return _T.finish_table(A, B, s.posterior_mean_coef1, s.posterior_mean_coef2, torch.zeros_like(A),
                           sigma * noisy, clip=clip, clip_range=clip_range, log_lo=torch.log(post),
                           log_hi=torch.log(beta))


def ddim_rows(s: Schedule, prediction_type: str, eta: float, clip: bool, clip_range: float,
              use_clipped_model_output: bool) -> torch.Tensor:
    """float64 [R, NCOL] rows of DDIM(η) on the chain schedule ``s``: :func:`fastrev.tables.ddim_table`, with the
    finite stand-in for 1/√0 in the x̂₀ columns (zero terminal SNR with ε-prediction)."""
    # ddim_table builds σ from the chain's β' (diffusers' 1 − fl32(ᾱ_t/ᾱ_prev)): diffusers' σ, no cancellation
    rows = _T.ddim_table(s, prediction_type, eta, clip, clip_range, use_clipped_model_output)
    rows[:, _T.COL["A"]], rows[:, _T.COL["B"]] = _x0_coefficients(s, prediction_type)
    return rows


# ------------------------------------------------------------------------------------------------ shared machinery
class _FastSchedulerBase:
    """The part FastDDPMScheduler and FastDDIMScheduler share: chain, tables, noise, backend, the step itself."""

    order = 1
    #: "auto" (fused kernel on CUDA, float64 torch update elsewhere), "triton" or "torch". Not part of the config.
    backend = "auto"
    #: Seed of the fast-mode counter noise; None: drawn from torch's default generator once per set_timesteps.
    noise_seed = None
    _kind = ""
    _final_alpha = 1.0

    # -------------------------------------------------------------------- construction helpers
    def _init_common(self, stock) -> None:
        cfg = self.config
        _check_in("prediction_type", cfg.prediction_type, _PREDICTION_TYPES)
        _check_in("timestep_spacing", cfg.timestep_spacing, _SPACINGS)
        # diffusers' own float32 tables, from diffusers' own constructor (every beta_schedule, trained_betas and
        # rescale_betas_zero_snr exactly as diffusers builds them)
        self.betas = stock.betas
        self.alphas = stock.alphas
        self.alphas_cumprod = stock.alphas_cumprod
        self._abar = stock.alphas_cumprod.detach().clone().cpu()     # private: add_noise may move the public one
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        N = cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(np.arange(0, N)[::-1].copy().astype(np.int64))
        self._device_state: dict = {}       # device tensors that live as long as the scheduler (see _set_chain)
        self._set_chain(np.arange(N, dtype=np.int64))

    def _set_chain(self, ascending: np.ndarray) -> None:
        """Install the inference chain (ascending training timesteps).

        Device tensors (tables, previous-timestep lookup, drawn fast-mode seed) keep their storage for the
        scheduler's life and are rewritten in place for the new chain — every table has num_train_timesteps rows
        whatever the chain — so a step captured in a CUDA graph stays valid across ``set_timesteps`` calls."""
        N = self.config.num_train_timesteps
        asc = np.ascontiguousarray(ascending, dtype=np.int64)
        self._chain = torch.from_numpy(asc)
        self._scheduled = torch.zeros(N, dtype=torch.bool)
        self._scheduled[self._chain] = True
        pos = np.searchsorted(asc, np.arange(N)) - 1                  # the previous chain entry of every t
        self._prev_t = torch.from_numpy(np.where(pos >= 0, asc[np.maximum(pos, 0)], -1).astype(np.int64))
        self._schedule = None
        self._host_tables: dict = {}
        self._drawn_seed = None
        for ck, tensor in list(self._device_state.items()):           # rewrite what earlier steps put on devices
            try:
                tensor.copy_(self._host_value(ck))
            except ValueError:          # e.g. an η > 1 that this chain's strides cannot take: NaN for a captured
                tensor.fill_(float("nan"))  # graph, and the next eager step with it rebuilds it (and raises)
                del self._device_state[ck]

    def _host_value(self, ck: tuple) -> torch.Tensor:
        """The current host value of device-state entry ``ck`` (its device is in it too): ("table", key, device,
        dtype) | ("prev_t", device) | ("fixed_seed", seed, device) | ("seed", device)."""
        kind = ck[0]
        if kind == "table":
            return self._host_table(ck[1]).to(ck[3])
        if kind == "prev_t":
            return self._prev_t
        if kind == "fixed_seed":
            return _noise.as_seed_tensor(ck[1], "cpu")
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

    def _chain_schedule(self) -> Schedule:
        if self._schedule is None:
            self._schedule = _chain_schedule(self._abar, self._chain, self._final_alpha,
                                             self.config.num_train_timesteps)
        return self._schedule

    def _host_table(self, key: tuple) -> torch.Tensor:
        """float64 [num_train_timesteps, NCOL] for ``key``: row t is the step from training timestep t to its previous
        chain entry; NaN where t is not in the chain (so an unscheduled device timestep cannot pass silently)."""
        host = self._host_tables.get(key)
        if host is None:
            rows = self._build_rows(self._chain_schedule(), key)
            host = torch.full((self.config.num_train_timesteps, _T.NCOL), float("nan"), dtype=_F64)
            host[self._chain] = rows[rows.shape[0] - self._chain.numel():]
            self._host_tables[key] = host
        return host

    def _table(self, key: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The table for ``key`` on ``device`` in ``dtype`` (uploaded once, then rewritten in place per chain)."""
        return self._device_value(("table", key, dtype), device)

    def _seed_tensor(self, device: torch.device) -> torch.Tensor:
        """The fast-mode seed as an int64 [1] tensor on ``device`` (no transfer per step): ``noise_seed`` if set, else
        drawn from torch's default generator once per chain (at its first fast step, or at set_timesteps when an
        earlier chain already used fast mode on that device)."""
        if self.noise_seed is not None:
            return self._device_value(("fixed_seed", int(self.noise_seed)), device)
        return self._device_value(("seed",), device)

    def _prepare(self, device) -> None:
        """Build the default tables (and the previous-timestep lookup) on ``device`` ahead of the first step."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = self._default_key()
        if key is not None:
            self._table(key, device, torch.float32 if device.type == "cuda" else _F64)
        self._device_value(("prev_t",), device)

    # -------------------------------------------------------------------- diffusers API
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """No scaling (diffusers' DDPM/DDIM): returns ``sample``."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        """Set the inference chain, as diffusers: ``num_inference_steps`` spaced by ``config.timestep_spacing`` (with
        ``steps_offset`` for "leading"), or custom descending ``timesteps``. ``self.timesteps`` (descending int64) is
        put on ``device``; when ``device`` is given the step tables are built there now (not at the first step)."""
        N = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = np.asarray(torch.as_tensor(timesteps).cpu().numpy() if isinstance(timesteps, torch.Tensor)
                            else list(timesteps))
            if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
                raise ValueError(f"`timesteps` must be a non-empty 1-D sequence of ints, got {timesteps!r}")
            ts = ts.astype(np.int64)
            if (np.diff(ts) >= 0).any():
                raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= N:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {N}.")
            if ts[-1] < 0:
                raise ValueError(f"`timesteps` must be >= 0, got {int(ts[-1])}")
            self.custom_timesteps = True
            if self._kind == "ddim":
                self.num_inference_steps = int(ts.size)
            desc = ts
        else:
            if num_inference_steps is None:
                raise ValueError("pass `num_inference_steps` or `timesteps`")
            if isinstance(num_inference_steps, (int, np.integer)) and not isinstance(num_inference_steps, bool) \
                    and num_inference_steps > N:
                raise ValueError(
                    f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                    f" {N} as the unet model trained with this scheduler can only handle maximal {N} timesteps.")
            asc = spaced_timesteps(N, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
            desc = asc.numpy()[::-1].copy()
        self._set_chain(desc[::-1].copy())
        self.timesteps = torch.from_numpy(desc.copy()).to(device)
        if device is not None:
            self._prepare(device)

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` lands on: the next entry of ``timesteps`` (−1 after the last;
        t − 1 before set_timesteps for DDPM). A tensor gives a tensor on its device (a device gather, no sync)."""
        if isinstance(timestep, torch.Tensor):
            return self._device_value(("prev_t",), timestep.device)[timestep.long()]
        return int(self._prev_t[int(timestep)])

    # -------------------------------------------------------------------- the step
    def _run_step(self, model_output, timestep, sample, *, key, var_mode, learned, stochastic, generator,
                  variance_noise, noise_only_if_t_positive):
        _check_in("backend", self.backend, BACKENDS)
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors, got "
                            f"{type(model_output).__name__} and {type(sample).__name__}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension (shape [B, ...])")
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
        if learned:
            out_part, var_part = model_output[:, :sample.shape[1]], model_output[:, sample.shape[1]:]
        else:
            out_part, var_part = model_output, None
        if out_part.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        if sample.dtype != model_output.dtype and sample.dtype.is_floating_point and \
                model_output.dtype.is_floating_point:
            # diffusers' arithmetic promotes (fp16 sample + fp32 output → fp32 results): so do the outputs here
            sample = sample.to(torch.promote_types(sample.dtype, model_output.dtype))
        device, B, N = sample.device, sample.shape[0], self.config.num_train_timesteps
        t = _ops.resolve_timestep(timestep, B, N, device)

        # host-known timesteps (int, numpy int, CPU tensor) are checked against the chain; device ones only with
        # fastrev.set_device_checks(True) (a host sync)
        host_t = None
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            host_t = torch.tensor([int(timestep)])
        elif isinstance(timestep, torch.Tensor) and (timestep.device.type == "cpu" or _ops._CHECK_DEVICE_TIMESTEPS):
            host_t = timestep.reshape(-1).long().cpu()
        if host_t is not None and not bool(self._scheduled[host_t].all()):
            bad = host_t[~self._scheduled[host_t]][:4].tolist()
            raise ValueError(f"timestep {bad if len(bad) > 1 else bad[0]} is not one of scheduler.timesteps "
                             f"(call set_timesteps first, and step with its timesteps)")

        # ---- noise: exact (diffusers' randn_tensor or the caller's tensor) or fast (the counter stream)
        z, seed = None, None
        if stochastic:
            if generator is not None and variance_noise is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            if variance_noise is not None:
                if not isinstance(variance_noise, torch.Tensor):
                    raise TypeError(f"variance_noise must be a torch.Tensor, got {type(variance_noise).__name__}")
                if not variance_noise.dtype.is_floating_point:
                    raise TypeError(f"variance_noise must be a floating tensor, got {variance_noise.dtype}")
                try:
                    z = variance_noise.to(device).expand(sample.shape)
                except RuntimeError:
                    raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)} (or "
                                     f"broadcast to it), got {tuple(variance_noise.shape)}") from None
            elif generator is not None:
                if noise_only_if_t_positive and host_t is not None and not bool((host_t > 0).any()):
                    stochastic = False                  # diffusers draws nothing at t = 0
                else:
                    z = randn_tensor(out_part.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
            else:
                seed = self._seed_tensor(device)

        # ---- backend
        any_f64 = _F64 in (sample.dtype, model_output.dtype) or (z is not None and z.dtype == _F64)
        needs_grad = torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad)
        backend = _ops.resolve_backend(self.backend, device, any_f64=any_f64, needs_grad=needs_grad)
        cfg = self.config
        table = self._table(key, device, torch.float32 if backend == "triton" else _F64)
        prev, x0 = _ops.fused_step(
            table, t, sample, model_output, learned=learned, var_mode=var_mode,
            clip=bool(cfg.thresholding or cfg.clip_sample), thresholding=bool(cfg.thresholding),
            dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio, sample_max_value=cfg.sample_max_value,
            noise=z, seed=seed, stochastic=stochastic, return_x0=True, backend=backend)
        return prev, x0


# ------------------------------------------------------------------------------------------------ DDPM
class FastDDPMScheduler(_FastSchedulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``DDPMScheduler``: same config, same API, same numbers (see the module doc), one fused step.

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
    ):
        _check_in("variance_type", variance_type, DDPM_VARIANCE_TYPES)
        stock = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self._init_common(stock)

    # diffusers' own forward-process helpers and variance, reused as they are
    add_noise = DDPMScheduler.add_noise
    get_velocity = DDPMScheduler.get_velocity
    _get_variance = DDPMScheduler._get_variance

    def _default_key(self):
        cfg = self.config
        return ("ddpm", cfg.prediction_type, cfg.variance_type, bool(cfg.thresholding or cfg.clip_sample),
                float(cfg.clip_sample_range))

    def _build_rows(self, s: Schedule, key):
        _, pt, vt, clip, rng = key
        return ddpm_rows(s, s.timesteps, pt, vt, clip, rng)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None):
        """One DDPM step x_t → x_{t_prev} (diffusers' signature and outputs).

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
        learned = vt in ("learned", "learned_range")
        if learned and (model_output.dim() < 2 or sample.dim() < 2
                        or model_output.shape[1] != 2 * sample.shape[1]):
            raise ValueError(f"variance_type={vt!r} needs a model_output with twice the sample's channels "
                             f"(output, then variance values): sample {tuple(sample.shape)}, model_output "
                             f"{tuple(model_output.shape)}")
        var_mode = _T.VAR_LINEAR if vt == "learned" else _T.VAR_RANGE if vt == "learned_range" else _T.VAR_FIXED
        prev, x0 = self._run_step(model_output, timestep, sample, key=self._default_key(), var_mode=var_mode,
                                  learned=learned, stochastic=True, generator=generator,
                                  variance_noise=variance_noise, noise_only_if_t_positive=True)
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ------------------------------------------------------------------------------------------------ DDIM
class FastDDIMScheduler(_FastSchedulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``DDIMScheduler``: same config, same API, same numbers (see the module doc for the previous-timestep
    fix), one fused step.

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
    ):
        stock = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.final_alpha_cumprod = stock.final_alpha_cumprod
        self._final_alpha = float(stock.final_alpha_cumprod)
        self._init_common(stock)

    add_noise = DDIMScheduler.add_noise
    get_velocity = DDIMScheduler.get_velocity
    _get_variance = DDIMScheduler._get_variance

    def _key(self, eta: float, use_clipped_model_output: bool):
        cfg = self.config
        clip = bool(cfg.thresholding or cfg.clip_sample)
        return ("ddim", cfg.prediction_type, float(eta), clip, float(cfg.clip_sample_range),
                bool(use_clipped_model_output) and clip)

    def _default_key(self):
        return self._key(0.0, False) if self.num_inference_steps is not None else None

    def _build_rows(self, s: Schedule, key):
        _, pt, eta, clip, rng, use_clipped = key
        return ddim_rows(s, pt, eta, clip, rng, use_clipped)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """One DDIM(η) step x_t → x_{t_prev} (diffusers' signature and outputs); t_prev is the next entry of
        ``timesteps``.

        Args:
            model_output: ε, x₀ or v (``prediction_type``).
            timestep: an int, a 0-dim tensor or a [B] tensor of timesteps from ``self.timesteps``.
            sample: x_t.
            eta: η (0: deterministic DDIM; 1: DDPM-like). Noise is added (and drawn) iff η > 0.
            use_clipped_model_output: re-derive ε̂ from the clipped x̂₀ (None counts as False, as pipelines pass it).
            generator / variance_noise: exact mode (diffusers' noise, or the given z); neither: fast counter noise.
            return_dict: False returns ``(prev_sample, pred_original_sample)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if isinstance(eta, torch.Tensor) or isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"eta must be a Python number, got {type(eta).__name__}")
        if not math.isfinite(eta):
            raise ValueError(f"eta must be finite, got {eta}")
        key = self._key(eta, bool(use_clipped_model_output))
        prev, x0 = self._run_step(model_output, timestep, sample, key=key, var_mode=_T.VAR_FIXED, learned=False,
                                  stochastic=eta > 0, generator=generator, variance_noise=variance_noise,
                                  noise_only_if_t_positive=False)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

