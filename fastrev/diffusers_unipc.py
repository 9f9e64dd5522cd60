"""Drop-in diffusers UniPC: :class:`FastUniPCMultistepScheduler` (``UniPCMultistepScheduler``: SD 1.x/2.x/XL "UniPC",
Wan 2.x with ``use_flow_sigmas``), every step one pass of fastrev's fused kernel.

One line in a pipeline::

    from fastrev.diffusers_unipc import FastUniPCMultistepScheduler
    pipe.scheduler = FastUniPCMultistepScheduler.from_config(pipe.scheduler.config)

The class is a ``SchedulerMixin, ConfigMixin`` subclass with diffusers' ``__init__`` signature (names and defaults, plus
``fastrev_fixes``) and compatibles, so ``from_config`` works both ways. The chain (``set_timesteps``: spacing,
``steps_offset``, Karras / exponential / beta / flow sigmas, ``flow_shift``, dynamic shifting with ``mu``,
``shift_terminal``, ``final_sigmas_type``, zero terminal SNR, custom flow ``sigmas``) is built by an internal instance
of diffusers' class, so ``timesteps`` and ``sigmas`` are diffusers' own values, bit for bit. docs/diffusers-unipc.md is
the long form of this docstring.

How a step runs. diffusers' step at index i (call number c of the chain) first *corrects* the previous result (UniC:
the corrected sample x_c is a combination of ``last_sample``, the earlier x̂₀'s m_{c−1}, m_{c−2}, m_{c−3} and the
current x̂₀ m_c, which is converted at the *uncorrected* sample x) and then *predicts* from x_c (UniP: x_c, m_c,
m_{c−1}, m_{c−2}). All of it is linear, so one pass computes::

    m_c  = A·x + B·out                                   (then dynamic thresholding, as diffusers)
    x_c  = AX0·m_c + AX·x + AH0·last + AH1·m_{c−1} + AH2·m_{c−2} + AH3·m_{c−3}          (aux)
    prev = C0·m_c  + C1·x + D0·last  + D1·m_{c−1}  + D2·m_{c−2}  + D3·m_{c−3}            (σ_t/σ_s0·x_c folded in)

with one float64 row per step index, built on the host from diffusers' float32 sigmas, cast to float32 and kept on the
device. The pass writes prev (returned), m_c (into the x̂₀ history buffer this step does not read) and x_c (the next
step's ``last_sample``): double-buffered, nothing copied. Where the corrector is off (the first call of a chain,
``disable_corrector``) the row says x_c = x. ``predict_x0=False`` keeps an ε history instead (the same slots).

What is a row and what is host state:
  * per step index (a row): the corrector's order (the previous step's predictor order), the predictor's order
    (``lower_order_final``), ``disable_corrector``, the λ steps h and ratios r_k, the ρ's of UniC / UniP (B(h) = h for
    bh1, eᴴ − 1 for bh2), the final-step limits;
  * per call (the host counts calls; no device value is read): the warm-up level w = min(c, solver_order) (diffusers'
    ``lower_order_nums``), which selects one of solver_order + 1 tables, and the number of history tensors the launch
    reads (0 at c = 0, else 1 + w: a compile-time constant of the kernel, never a per-step value).

The step index lives on the device (an int64 counter gathered for the row and advanced in place): no ``.item()``, no
``nonzero()``, no Python branch on a device value. Capture the *whole* loop in a CUDA graph (each call reads and writes
different history buffers and may use a different table, so one captured step cannot be replayed as the next).
``timestep`` may be a ``[B]`` tensor (per-sample timesteps, a fastrev extension): each sample's row is found on the
device; the history and the warm-up level are shared by the batch, and the step index is neither read nor advanced.

Where the host is still needed (as in the Euler drop-ins): the first step of a chain finds its index from ``timestep``
on the host for a Python number / CPU tensor / after ``set_begin_index`` (on the device for a device tensor);
reading ``step_index`` after a device start reads the counter back once; ``add_noise`` is diffusers' own; with
``solver_p`` (another scheduler as the predictor) the step is diffusers' eager step.

Differences from diffusers (UniPC draws no noise, so the drop-in and diffusers differ only in rounding):
  * coefficients are float64 from diffusers' float32 sigmas (diffusers computes λ, h, the φ recursion and the ρ
    solves in float32: its coefficients carry relative errors ~1e-7·|λ|/h, growing like 1e-7/hᵏ for order k);
  * the math is float32 whatever the storage dtype (diffusers computes in the storage dtype: float16 for half inputs);
  * where diffusers has no finite answer fastrev gives the mathematical limit where there is one: the last step to
    σ = 0 with bh1 (diffusers: −inf·0 = NaN) gives x̂₀, with ``predict_x0=False`` (diffusers: 0·inf) the DDIM step to
    σ = 0; a predictor of order ≥ 2 to σ = 0 (``lower_order_final=False``) has none: a ValueError when the step index
    is known on the host, NaN otherwise (diffusers: inf, or a singular ``linalg.solve`` at order 3);
  * ``model_outputs`` / ``last_sample`` are views of the live history buffers (the next steps overwrite them).

``fastrev_fixes`` (a config key, default False, kept for a uniform config across fastrev's drop-ins) changes nothing
here. Backends: ``scheduler.backend`` (``"auto"``, ``"triton"``, ``"torch"``, ``"reference"``), as in
:mod:`fastrev.diffusers_euler`.

This module imports diffusers (an optional dependency: ``pip install 'fastrev[diffusers]'``).
"""

from __future__ import annotations

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fastrev.diffusers_unipc needs the optional dependency `diffusers` (>= 0.30): install it with "
        f"`pip install 'fastrev[diffusers]'` or `pip install diffusers` (import failed with: {e})") from e

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import ops as _ops  # noqa: E402
from . import tables as _T  # noqa: E402
from .diffusers_euler import _check_fixes, _FastEulerBase, _is_host_number, _stock_kwargs  # noqa: E402

__all__ = ["FastUniPCMultistepScheduler"]

_F64 = torch.float64
#: Device types whose tensors are read on the host without a synchronisation (tests set it to () to run the device
#: code path, and check that it never reads a value back, on CPU tensors).
_HOST_DEVICES = ("cpu",)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
SOLVER_TYPES = ("bh1", "bh2")

_COL, _NCOL = _T.COL, _T.NCOL
_X0_HIST = _T.HISTORY_COLS[1:]         # prev's columns of m_{c−1}, m_{c−2}, m_{c−3} (h_1..h_3); D0: last_sample
_AUX_HIST = _T.AUX_HISTORY_COLS[1:]    # x_c's columns of the same; AH0: last_sample


# ------------------------------------------------------------------------------------------------ the coefficients
class _Chain:
    """float64 views of one chain's schedule: α, σ (diffusers' ``_sigma_to_alpha_sigma_t``) and λ = log α − log σ per
    sigma index, from diffusers' float32 sigmas."""

    def __init__(self, sig32: np.ndarray, flow: bool):
        s = sig32.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            if flow:
                self.alpha, self.sigma = 1.0 - s, s
            else:
                self.alpha = 1.0 / np.sqrt(s * s + 1.0)
                self.sigma = s * self.alpha
            self.lam = np.log(self.alpha) - np.log(self.sigma)


def _rhos(rks, hh, B_h, order: int, corrector: bool):
    """diffusers' ρ of UniC (``corrector``) or UniP: the φ recursion and the (R, b) system, in float64."""
    if corrector and order == 1:
        return np.array([0.5])
    if not corrector and order == 2:
        return np.array([0.5])
    h_phi_k = np.expm1(hh) / hh - 1.0
    factorial = 1.0
    R, b = [], []
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b = np.array(R), np.array(b)
    if not corrector:
        R, b = R[:-1, :-1], b[:-1]
    try:
        return np.linalg.solve(R, b)
    except np.linalg.LinAlgError:
        return np.full(len(b), np.nan)


def _bh_update(ch: _Chain, t: int, s0: int, past: list, order: int, *, corrector: bool, predict_x0: bool,
               bh1: bool):
    """One UniP / UniC update from sigma index ``s0`` to ``t`` as coefficients:

        result = base·x_base + k0·m0 + Σ_k kk[k]·m_{past[k]} (+ kt·m_t for the corrector)

    (diffusers' ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``; m0 the x̂₀ (or ε) at s0, ``past`` the
    sigma indices of the earlier ones, ``order`` the p of UniP-p / UniC-p). Returns (base, k0, kk, kt)."""
    a_t, s_t, a_s, s_s = ch.alpha[t], ch.sigma[t], ch.alpha[s0], ch.sigma[s0]
    with np.errstate(all="ignore"):
        h = ch.lam[t] - ch.lam[s0]
        hh = -h if predict_x0 else h
        h_phi_1 = np.expm1(hh)
        B_h = hh if bh1 else np.expm1(hh)
        if predict_x0:
            base, kt_ = s_t / s_s, a_t
        else:
            base, kt_ = a_t / a_s, s_t
        if s_t == 0 and not predict_x0:          # σ_t·(eʰ − 1) → α_t·σ_s/α_s − σ_t as σ_t → 0 (diffusers: 0·inf)
            k0 = -(a_t * s_s / a_s - s_t)
        else:
            k0 = -kt_ * h_phi_1
        rks = np.array([(ch.lam[si] - ch.lam[s0]) / h for si in past[:order - 1]] + [1.0])
        n_past = order - 1
        kk = np.zeros(n_past)
        kt = 0.0
        if corrector or n_past:
            rhos = _rhos(rks, hh, B_h, order, corrector)
            g = kt_ * B_h                                 # result −= g·(Σ ρ_k·(m_k − m0)/r_k [+ ρ_last·(m_t − m0)])
            for k in range(n_past):
                kk[k] = -g * rhos[k] / rks[k]
                k0 = k0 + g * rhos[k] / rks[k]
            if corrector:
                kt = -g * rhos[-1]
                k0 = k0 + g * rhos[-1]
    return base, k0, kk, kt


def unipc_rows(sig32: np.ndarray, level: int, *, solver_order: int, predict_x0: bool, bh1: bool, flow: bool,
               lower_order_final: bool, disable_corrector, x0_coefficients) -> tuple:
    """float64 [N + 1, NCOL] table for warm-up level ``level`` (= min(calls so far, solver_order)), and the rows with
    no finite answer. Row i (i < N, N = len(sig32) − 1 steps) is diffusers' step at step index i on the
    ``level``-th call or later; row N is NaN. History order: h_0 = last_sample, h_j = the x̂₀ (or ε) of j calls ago.

    ``x0_coefficients(σ_i) -> (A, B)``: the conversion of the model output at σ_i (x̂₀, or ε when not predict_x0).
    """
    N = len(sig32) - 1
    ch = _Chain(sig32, flow)
    out = np.full((N + 1, _NCOL), np.nan)
    bad = []
    disabled = set(disable_corrector or ())
    C = _COL
    for i in range(N):
        if i < level:            # unreachable: the level-th call is at step index >= level
            continue
        row = np.zeros(_NCOL)
        row[C["A"]], row[C["B"]] = x0_coefficients(i)
        row[C["CLIP"]] = 1.0
        # corrector (UniC) of the previous step's result; its order is the previous step's predictor order
        lof_prev = min(solver_order, N - (i - 1)) if lower_order_final else solver_order
        q = min(lof_prev, level)
        aux = dict.fromkeys(("AX0", "AX", "AH0") + _AUX_HIST, 0.0)
        if level >= 1 and i >= 1 and (i - 1) not in disabled:
            base, k0, kk, kt = _bh_update(ch, i, i - 1, [i - 1 - k for k in range(1, q)], q, corrector=True,
                                          predict_x0=predict_x0, bh1=bh1)
            aux["AH0"], aux["AH1"], aux["AX0"] = base, k0, kt
            for k, v in enumerate(kk):
                aux[_AUX_HIST[k + 1]] = v
        else:
            aux["AX"] = 1.0
        # predictor (UniP) from x_c: prev = base·x_c + k0·m_c + Σ kk·m_{c−k}
        lof = min(solver_order, N - i) if lower_order_final else solver_order
        p = min(lof, level + 1)
        base, k0, kk, _ = _bh_update(ch, i + 1, i, [i - k for k in range(1, p)], p, corrector=False,
                                     predict_x0=predict_x0, bh1=bh1)
        row[C["C0"]] = base * aux["AX0"] + k0
        row[C["C1"]] = base * aux["AX"]
        row[C["D0"]] = base * aux["AH0"]
        for j, name in enumerate(_X0_HIST):
            row[C[name]] = base * aux[_AUX_HIST[j]] + (kk[j] if j < len(kk) else 0.0)
        for k, v in aux.items():
            row[C[k]] = v
        if not np.isfinite(row).all():
            bad.append(i)
            row[:] = np.nan
        out[i] = row
    return torch.from_numpy(out), tuple(bad)


# ------------------------------------------------------------------------------------------------ the fused pass
def _fused_pass(table, rows, sample, model_output, hist, x0_out, aux_out, *, thresholding, ratio, max_value,
                backend):
    """One pass: prev (returned), x̂₀ → ``x0_out``, x_c → ``aux_out`` (:func:`fastrev.ops.fused_step`)."""
    return _ops.fused_step(table, rows, sample, model_output, clip=False, thresholding=thresholding,
                           dynamic_thresholding_ratio=ratio, sample_max_value=max_value, stochastic=False,
                           history=tuple(hist), x0_out=x0_out, aux_out=aux_out, return_x0=True,
                           backend=backend).prev_sample


def _new_buffer(like: torch.Tensor) -> torch.Tensor:
    """A history buffer shaped like the sample (tests replace this to poison the buffers with NaN)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


class _HistoryList(list):
    """``model_outputs``: a list whose item assignments write through to the scheduler's history."""

    def __init__(self, items, setter):
        super().__init__(items)
        self._setter = setter

    def __setitem__(self, i, value):
        super().__setitem__(i, value)
        self._setter(i, value)


# ------------------------------------------------------------------------------------------------ the scheduler
class FastUniPCMultistepScheduler(_FastEulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``UniPCMultistepScheduler``: same config (plus ``fastrev_fixes``, no effect here), API and numbers; each
    step (UniC corrector of the previous result + UniP predictor) is one fused pass. See the module doc."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _stock_cls = UniPCMultistepScheduler
    _has_x0 = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' default, kept for an identical signature
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: bool | None = None,
        shift_terminal: bool | None = None,
        fastrev_fixes: bool = False,
    ) -> None:
        _check_fixes(fastrev_fixes)
        _ops._check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if isinstance(solver_order, bool) or not isinstance(solver_order, (int, np.integer)) or solver_order < 1:
            raise ValueError(f"solver_order must be an int >= 1, got {solver_order!r}")
        if solver_order > 3 and solver_p is None:
            raise ValueError(f"solver_order={solver_order}: FastUniPCMultistepScheduler supports orders 1 to 3 "
                             "(the kernel reads at most 4 history tensors); use diffusers' UniPCMultistepScheduler")
        stock = UniPCMultistepScheduler(**_stock_kwargs(UniPCMultistepScheduler, type(self), self.config))
        if stock.config.solver_type != solver_type:           # diffusers maps midpoint / heun / logrho to bh2
            self.register_to_config(solver_type=stock.config.solver_type)
        self._init_from_stock(stock)
        self.betas, self.alphas, self.alphas_cumprod = stock.betas, stock.alphas, stock.alphas_cumprod
        self.alpha_t, self.sigma_t, self.lambda_t = stock.alpha_t, stock.sigma_t, stock.lambda_t
        self.init_noise_sigma = 1.0
        self.predict_x0 = predict_x0
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        self.num_inference_steps = None
        self._calls = 0                  # calls of step in this chain (host): diffusers' lower_order_nums uncapped
        self._ring = None                # x̂₀ (or ε) history: solver_order + 1 buffers, m_c in ring[c % len]
        self._last = None                # last_sample: two buffers, x_c of call c in last[c % 2]

    # diffusers' helpers that pipelines and tests call (the stock class's own code)
    _sigma_to_t = UniPCMultistepScheduler._sigma_to_t
    _sigma_to_alpha_sigma_t = UniPCMultistepScheduler._sigma_to_alpha_sigma_t
    _convert_to_karras = UniPCMultistepScheduler._convert_to_karras
    _convert_to_exponential = UniPCMultistepScheduler._convert_to_exponential
    _convert_to_beta = UniPCMultistepScheduler._convert_to_beta
    _threshold_sample = UniPCMultistepScheduler._threshold_sample
    time_shift = UniPCMultistepScheduler.time_shift
    _time_shift_exponential = UniPCMultistepScheduler._time_shift_exponential
    _time_shift_linear = UniPCMultistepScheduler._time_shift_linear
    stretch_shift_to_terminal = UniPCMultistepScheduler.stretch_shift_to_terminal
    index_for_timestep = UniPCMultistepScheduler.index_for_timestep
    add_noise = UniPCMultistepScheduler.add_noise

    # -------------------------------------------------------------------- chain
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None):
        """diffusers' ``set_timesteps`` (spacing, Karras / exponential / beta / flow sigmas, ``mu`` for dynamic
        shifting, custom flow ``sigmas``), run by the internal diffusers scheduler; the history restarts."""
        self._stock.set_timesteps(num_inference_steps, device=None, sigmas=sigmas, mu=mu)
        self._copy_chain_from_stock(device)
        self.num_inference_steps = self._stock.num_inference_steps
        self._calls = 0
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self._ts_dev(torch.device(device))

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The step index the next chain starts from (img2img / inpaint pipelines call this)."""
        self._begin_index = begin_index
        self._stock.set_begin_index(begin_index)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """UniPC does not scale the model input: ``sample`` itself, as diffusers."""
        return sample

    @property
    def lower_order_nums(self) -> int:
        """diffusers' warm-up counter: min(calls of ``step`` in this chain, solver_order)."""
        return min(self._calls, self.config.solver_order)

    @property
    def last_sample(self):
        """The corrected sample of the last step (the next corrector's base): the live history buffer (the next steps
        overwrite it); None before the first step of a chain. Assigning a tensor replaces it (a copy), e.g. ChronoEdit
        slicing the history to fewer frames mid-chain."""
        if self.solver_p is not None:
            return self._stock.last_sample
        if self._calls == 0 or self._last is None:
            return None
        return self._last[(self._calls - 1) % 2]

    @last_sample.setter
    def last_sample(self, value) -> None:
        if self.solver_p is not None:
            self._stock.last_sample = value
            return
        if self._calls == 0 or self._last is None:
            if value is not None:
                raise ValueError("last_sample can be assigned only in the middle of a chain (after a step)")
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"last_sample must be a torch.Tensor, got {type(value).__name__} (None, which turns the "
                            "next corrector off in diffusers, is not supported mid-chain)")
        self._last[(self._calls - 1) % 2] = value.detach().clone(memory_format=torch.contiguous_format)

    @property
    def model_outputs(self) -> list:
        """diffusers' list of the last ``solver_order`` converted outputs (x̂₀, or ε when not predict_x0), oldest
        first, None where the chain has none yet: the live history buffers (the next steps overwrite them). Assigning
        the list, or an item of it, replaces the held entries (a copy; diffusers' tests and ChronoEdit do); entries
        the chain does not hold yet are never read (diffusers' warm-up shifts them out unread) and are ignored."""
        so = self.config.solver_order
        if self.solver_p is not None:
            return self._stock.model_outputs
        w = min(self._calls, so) if self._ring is not None else 0
        held = [None] * (so - w) + [self._ring[(self._calls - k) % len(self._ring)] for k in range(w, 0, -1)]
        return _HistoryList(held, self._set_model_output)

    @model_outputs.setter
    def model_outputs(self, values) -> None:
        if self.solver_p is not None:
            self._stock.model_outputs = values
            return
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"model_outputs must be a list of tensors, got {type(values).__name__}")
        so = self.config.solver_order
        values = list(values)[-so:]
        for j, v in enumerate(values):
            self._set_model_output(so - len(values) + j, v)

    def _set_model_output(self, pos: int, value) -> None:
        so = self.config.solver_order
        pos = pos + so if pos < 0 else pos
        k = so - pos                                    # the entry of k calls ago
        if self._ring is None or not 1 <= k <= min(self._calls, so) or value is None:
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_outputs entries must be torch.Tensors, got {type(value).__name__}")
        self._ring[(self._calls - k) % len(self._ring)] = value.detach().clone(memory_format=torch.contiguous_format)

    # -------------------------------------------------------------------- step index (diffusers' UniPC rules)
    def _host_lookup(self, timestep) -> int:
        """diffusers' ``index_for_timestep``: the second match of a duplicated timestep; the last index when none."""
        t = timestep.detach().cpu() if isinstance(timestep, torch.Tensor) else timestep
        idx = (self._ts_host == t).nonzero()
        if len(idx) == 0:
            return len(self._ts_host) - 1
        return int(idx[1 if len(idx) > 1 else 0])

    def _missing_index(self, n_timesteps: int) -> int:
        return n_timesteps - 1             # as _host_lookup: diffusers falls back to the last index

    def _timestep_on_host(self, timestep) -> bool:      # this module's _HOST_DEVICES (the tests' switch)
        return _is_host_number(timestep) or (isinstance(timestep, torch.Tensor)
                                             and timestep.device.type in _HOST_DEVICES)

    def _resolve_rows(self, timestep, B: int, device, for_step: bool):
        """Rows for this call: (int64 [B] rows, per_sample)."""
        if isinstance(timestep, bool):
            raise TypeError("timestep must be a number or a tensor, got bool")
        if isinstance(timestep, torch.Tensor) and timestep.dim() >= 1 and timestep.numel() > 1:
            if timestep.dim() != 1 or timestep.numel() != B:
                raise ValueError(f"timestep must be a scalar or a [B] tensor with B = {B} (one per sample), got "
                                 f"shape {tuple(timestep.shape)}")
            ts = self._ts_dev(device)
            eq = timestep.to(device).reshape(-1, 1) == ts.reshape(1, -1)
            rows = torch.argmax(eq.to(torch.int32), dim=1)
            return torch.where(eq.any(dim=1), rows, torch.full_like(rows, ts.numel() - 1)), True
        if not (_is_host_number(timestep) or isinstance(timestep, torch.Tensor)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if not self._idx_known:
            self._init_index(timestep, device)
        if for_step and self._host_step is not None and self._host_step >= self._rows:
            raise IndexError(f"step index {self._host_step} is out of range: the chain has {self._rows} steps "
                             "(call set_timesteps again to start a new chain)")
        return self._counter(device).expand(B).contiguous(), False

    # -------------------------------------------------------------------- tables
    def _x0_coefficients(self, ch: _Chain):
        """(A, B) per sigma index: x̂₀ = A·x + B·out (predict_x0), or ε = A·x + B·out."""
        pt = self.config.prediction_type
        sig = self._sig_np.astype(np.float64)
        a, s = ch.alpha, ch.sigma
        if self.predict_x0:
            if pt == "epsilon":
                return lambda i: (1.0 / a[i], -s[i] / a[i])
            if pt == "sample":
                return lambda i: (0.0, 1.0)
            if pt == "v_prediction":
                return lambda i: (a[i], -s[i])
            return lambda i: (1.0, -sig[i])                  # flow_prediction: x − σ·v
        if pt == "epsilon":
            return lambda i: (0.0, 1.0)
        if pt == "sample":
            return lambda i: (1.0 / s[i], -a[i] / s[i])
        if pt == "v_prediction":
            return lambda i: (s[i], a[i])
        raise ValueError(f"prediction_type given as {pt} must be one of `epsilon`, `sample`, or `v_prediction` for "
                         "the UniPCMultistepScheduler.")

    def _table_key(self, level: int) -> tuple:
        return ("unipc", level, bool(self.predict_x0), tuple(sorted(set(self.disable_corrector or ()))))

    def _build(self, key):
        _, level, predict_x0, disabled = key
        flow = bool(self.config.use_flow_sigmas)
        ch = _Chain(self._sig_np, flow)
        return unipc_rows(self._sig_np, level, solver_order=int(self.config.solver_order), predict_x0=predict_x0,
                          bh1=self.config.solver_type == "bh1", flow=flow,
                          lower_order_final=bool(self.config.lower_order_final), disable_corrector=disabled,
                          x0_coefficients=self._x0_coefficients(ch))

    def _host_table(self, key: tuple) -> torch.Tensor:
        t = self._host_cache.get(key)
        if t is None:
            t, bad = self._build(key)
            self._host_cache[key] = t
            self._host_cache[("bad",) + key] = bad
        return t

    def _bad_rows(self, key: tuple) -> tuple:
        self._host_table(key)
        return self._host_cache[("bad",) + key]

    # -------------------------------------------------------------------- history buffers
    def _history_buffers(self, sample: torch.Tensor, level: int):
        """(history read by this call, x̂₀ target, x_c target). The buffers are allocated at the first step of a
        chain (kept across chains of the same shape: a captured graph stays valid) and reused: the x̂₀ ring has
        solver_order + 1 entries (the pass writes the one it does not read), last_sample two."""
        c = self._calls
        n = int(self.config.solver_order) + 1

        def fits(t):
            return (t is not None and t.shape == sample.shape and t.dtype == sample.dtype
                    and t.device == sample.device and t.is_contiguous())

        def new():
            return _new_buffer(sample)
        if self._ring is None or len(self._ring) != n or (c == 0 and not all(map(fits, self._ring + self._last))):
            self._ring, self._last = [new() for _ in range(n)], [new(), new()]
        hist = () if level == 0 else (self._last[(c - 1) % 2],) + tuple(self._ring[(c - k) % n]
                                                                         for k in range(1, level + 1))
        for h in hist:
            if not (h.shape == sample.shape and h.dtype == sample.dtype and h.device == sample.device):
                raise ValueError(f"sample (shape {tuple(sample.shape)}, {sample.dtype}, {sample.device}) does not "
                                 f"match the history of this chain (shape {tuple(h.shape)}, {h.dtype}, {h.device}): "
                                 "call set_timesteps to start a new chain, or assign model_outputs / last_sample to "
                                 "match")
        for buf, i in ((self._ring, c % n), (self._last, c % 2)):   # write targets (new after a history edit)
            if not fits(buf[i]):
                buf[i] = new()
        return hist, self._ring[c % n], self._last[c % 2]

    # -------------------------------------------------------------------- the step
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UniPC step: UniC corrects the previous result, UniP predicts from it (diffusers' signature and
        outputs), as one fused pass.

        Args:
            model_output: the model's output at ``sample`` (ε, x₀, v or flow velocity: ``prediction_type``).
            timestep: one of ``self.timesteps`` (a number or a 0-dim tensor; the first step of a chain finds the step
                index from it, the last index when it is not one of them, as diffusers), or a [B] tensor of them
                (per-sample).
            sample: x at the current step (the uncorrected result of the previous step).
            return_dict: False returns ``(prev_sample,)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self.solver_p is not None:
            prev = self._eager_step(model_output, timestep, sample)
        else:
            prev = self._fused(model_output, timestep, sample)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _fused(self, model_output, timestep, sample):
        self._check_tensors(model_output, sample)
        if not self.predict_x0 and self.config.prediction_type == "flow_prediction":
            raise ValueError("prediction_type given as flow_prediction must be one of `epsilon`, `sample`, or "
                             "`v_prediction` for the UniPCMultistepScheduler.")
        device, B = sample.device, sample.shape[0]
        rows, per_sample = self._resolve_rows(timestep, B, device, for_step=True)
        c = self._calls
        level = min(c, int(self.config.solver_order))
        key = self._table_key(level)
        bad = self._bad_rows(key)
        if bad and not per_sample and self._host_step is not None and self._host_step in bad:
            raise ValueError(
                f"UniPC step {self._host_step} (timestep {int(self._ts_host[self._host_step])}) has no finite answer "
                f"for this config: {self._why_bad(self._host_step)} (diffusers gives inf/NaN or a singular solve)")
        hist, x0_out, aux_out = self._history_buffers(sample, level)
        any_f64 = _F64 in (sample.dtype, model_output.dtype)
        needs_grad = torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad)
        backend = _ops.resolve_backend(self.backend, device, any_f64=any_f64, needs_grad=needs_grad)
        table = self._table(key, device, _ops.table_dtype(backend, any_f64))
        thr = bool(self.config.thresholding) and bool(self.predict_x0)
        prev = _fused_pass(table, rows, sample, model_output, hist, x0_out, aux_out,
                           thresholding=thr, ratio=float(self.config.dynamic_thresholding_ratio),
                           max_value=float(self.config.sample_max_value), backend=backend)
        if not per_sample:
            self._advance()
        self._calls += 1
        return prev

    def _why_bad(self, i: int) -> str:
        if float(self._sig_np[i + 1]) == 0.0 and not self.config.lower_order_final:
            return ("a predictor of order >= 2 to sigma = 0 (final_sigmas_type='zero' with lower_order_final=False); "
                    "use lower_order_final=True or final_sigmas_type='sigma_min'")
        return "a coefficient is not finite (e.g. two equal sigmas in the chain)"

    def _eager_step(self, model_output, timestep, sample):
        """``solver_p`` (any scheduler as the predictor): diffusers' own step on the internal scheduler."""
        st = self._stock
        if self._idx_known and st.step_index is None and self._host_step is not None:
            st._step_index = self._host_step
        prev = st.step(model_output, timestep, sample, return_dict=False)[0]
        self._step_index = st.step_index
        self._calls += 1
        return prev
