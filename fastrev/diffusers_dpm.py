"""Drop-in diffusers ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M / 3M, SDE-DPM++, DPM-Solver):
:class:`FastDPMSolverMultistepScheduler`.

One line in a pipeline (SD 1.x / SDXL "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", ...)::

    from fastrev.diffusers import FastDPMSolverMultistepScheduler
    pipe.scheduler = FastDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

A ``SchedulerMixin, ConfigMixin`` subclass with diffusers' ``__init__`` signature (every config name and default, plus
``fastrev_fixes``) and compatibles, so ``from_config`` works in both directions. The chain (``set_timesteps``: spacing,
``steps_offset``, Karras / exponential / beta / Lu sigmas, flow sigmas with ``flow_shift`` or ``mu``,
``final_sigmas_type``, ``lambda_min_clipped``, custom ``timesteps``, zero terminal SNR ...) is built by an internal
diffusers instance: ``timesteps`` and ``sigmas`` are diffusers' own values, bit for bit. docs/diffusers-dpm.md is the
long form of this docstring.

How a step runs. Every DPM-Solver step (orders 1-3, midpoint / heun, ODE or SDE, data or noise prediction) is

    m₀   = A·x + B·out                          (x̂₀ for dpmsolver++; ε for dpmsolver; thresholded if configured)
    prev = C0·m₀ + C1·x + C2·out + D0·m₋₁ + D1·m₋₂ + SIGMA·z

with m₋₁, m₋₂ the converted outputs of the two previous steps (diffusers' ``model_outputs``). diffusers' D0/D1/D2
differences (D1 = (m₀ − m₋₁)/r₀, ...) are expanded into coefficients of m₀, m₋₁, m₋₂ on the host. One float64 row per
step index and **warm-up level** (how many earlier steps this chain has taken, capped: diffusers' ``lower_order_nums``,
known on the host without a sync) holds the coefficients of the order actually used at that step (warm-up,
``lower_order_final``, ``euler_at_final``, ``final_sigmas_type="zero"``); the rows are cast to float32 and kept on the
device, and one fused launch per step (:func:`fastrev.ops.fused_step` with ``history=``) reads x, out and the level's
history tensors (a compile-time count: 0, 1 or 2) and writes prev and m₀. m₀ is the next step's history: nothing is
copied. The step index is a device counter (no ``.item()``, no host branch on a device value): a chain can be captured
in a CUDA graph once its tables are on the device (after one eager step).

The scalar coefficients (α, σ, λ = log α − log σ, h, r₀, r₁, exp(−h) − 1, ...) are computed with diffusers' float32
arithmetic, in its operation order, from its float32 sigmas — h = λ_t − λ_s cancels in float32 (1e-5 relative at 25
steps), and that rounding is part of diffusers' result — and combined in float64. With ``fastrev_fixes=True`` they
are computed in float64 throughout (see below).

Noise (``algorithm_type`` "sde-dpmsolver++" / "sde-dpmsolver"):
  * **exact** (``generator``, a list of them, or ``variance_noise``): diffusers' float32 ``randn_tensor`` draw (same
    shape, device, generator consumption) or the given tensor: whole loops match diffusers to float32 rounding;
  * **fast** (neither): fastrev's counter stream keyed by (seed, sample index, step index), generated inside the
    kernel; seed ``scheduler.noise_seed`` or one draw from torch's default generator per ``set_timesteps``.

Differences from diffusers (everything else matches):
  * learned variances (``variance_type`` "learned" / "learned_range", ε-prediction): the first C channels of the
    output are kept, C = the sample's channels (diffusers keeps the first 3: the same for 3-channel samples, an error
    in diffusers otherwise). Other prediction types take an output shaped like the sample (as diffusers).
  * the history (``model_outputs``) holds tensors in the sample's dtype (diffusers: the converted output's dtype,
    which differs only for a float16 sample with a float32 output).
  * ``timestep`` may be a [B] tensor (per-sample timesteps, a fastrev extension): each sample steps from its own row
    (the same warm-up level and history for all); the step index is neither read nor advanced.
  * stepping past the end of the chain: IndexError when the step index is known on the host (as diffusers), NaN outputs
    when it lives only on the device. "sde-dpmsolver" with ``solver_order=3`` has no third-order update in diffusers
    (an UnboundLocalError at the first third-order step): here a NotImplementedError at that step (NaN when the step
    index is only on the device).
  * without a generator the SDE noise is the counter stream, not ``torch.randn`` from the global generator.
  * the tensors in ``model_outputs`` are the scheduler's buffers: a buffer that falls out of the history is reused
    for a later step's m₀ (diffusers allocates new tensors).

``fastrev_fixes`` (config key, default False): the scalar coefficients in float64 from diffusers' float32 sigmas
(no float32 cancellation in h = λ_t − λ_s and in the heun / third-order terms (e^−h − 1 + h)/h² − ½); results move by
~1e-5 relative at 25 steps, more at hundreds of steps.
"""

from __future__ import annotations

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fastrev.diffusers_dpm needs the optional dependency `diffusers` (>= 0.30): install it with "
        f"`pip install 'fastrev[diffusers]'` or `pip install diffusers` (import failed with: {e})") from e


import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import ops as _ops  # noqa: E402
from . import tables as _T  # noqa: E402
from .diffusers_euler import _check_fixes, _FastEulerBase, _is_host_number, _stock_kwargs  # noqa: E402

__all__ = ["FastDPMSolverMultistepScheduler", "ALGORITHM_TYPES", "dpm_orders", "dpm_rows"]

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
_DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")
_SDE = ("sde-dpmsolver++", "sde-dpmsolver")
_F64 = torch.float64
_NAN = float("nan")
#: Device types whose tensors are read on the host without a synchronisation (tests set it to () to run the device
#: code path, and check that it never reads a value back, on CPU tensors).
_HOST_DEVICES = ("cpu",)



# ------------------------------------------------------------------------------------------------ coefficients
def dpm_orders(R: int, level: int, solver_order: int, lower_order_final: bool, euler_at_final: bool,
               final_sigmas_type: str) -> np.ndarray:
    """The solver order diffusers uses at each step index 0..R−1 of an R-step chain after ``level`` earlier steps
    (its ``lower_order_nums``): int64 [R]."""
    i = np.arange(R)
    final = (i == R - 1) & bool(euler_at_final or (lower_order_final and R < 15) or final_sigmas_type == "zero")
    second = (i == R - 2) & bool(lower_order_final and R < 15)
    if solver_order == 1 or level < 1:
        return np.ones(R, dtype=np.int64)
    order = np.where(final, 1, 2)
    if solver_order == 2 or level < 2:
        return order.astype(np.int64)
    return np.where(final, 1, np.where(second, 2, 3)).astype(np.int64)


def _alpha_sigma(sig: torch.Tensor, flow: bool):
    """diffusers' ``_sigma_to_alpha_sigma_t`` in the dtype of ``sig``."""
    if flow:
        return 1 - sig, sig
    alpha = 1 / ((sig**2 + 1) ** 0.5)
    return alpha, sig * alpha


def dpm_rows(sigmas: torch.Tensor, level: int, *, algorithm_type: str, solver_order: int, solver_type: str,
             prediction_type: str, thresholding: bool, lower_order_final: bool, euler_at_final: bool,
             final_sigmas_type: str, flow: bool, float64: bool = False):
    """The step rows of one warm-up ``level``: (table float64 [R, NCOL], orders int64 [R]).

    ``sigmas``: diffusers' float32 sigmas (R + 1 of them). The scalars diffusers computes per step (α, σ, λ, h, r₀,
    r₁ and the exp(±h) terms) are computed here in its float32 arithmetic (float64 with ``float64=True``), in its
    operation order, and combined into the coefficients of m₀ (this step's converted output), m₋₁, m₋₂ in float64.
    For the thresholded dpmsolver the table's aux columns give ε = (x − α·x̂₀)/σ (AX = 1/σ, AX0 = −α/σ), the
    history entry, written in the same pass. A row whose order diffusers has no update for (sde-dpmsolver, order 3) is
    NaN."""
    cd = _F64 if float64 else torch.float32
    S = sigmas.detach().to("cpu", torch.float32).to(cd)
    R = S.numel() - 1
    i = torch.arange(R)
    wrap = lambda k: S[(i + k) % (R + 1)]          # noqa: E731  diffusers' sigmas[step_index - k]: Python wraps at 0
    a_t, s_t = _alpha_sigma(S[1:], flow)
    a_s0, s_s0 = _alpha_sigma(S[:-1], flow)
    a_s1, s_s1 = _alpha_sigma(wrap(-1), flow)
    a_s2, s_s2 = _alpha_sigma(wrap(-2), flow)
    lam_t = torch.log(a_t) - torch.log(s_t)
    lam_s0 = torch.log(a_s0) - torch.log(s_s0)
    lam_s1 = torch.log(a_s1) - torch.log(s_s1)
    lam_s2 = torch.log(a_s2) - torch.log(s_s2)
    h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
    r0, r1 = h_0 / h, h_1 / h
    inv_r0, inv_r1 = 1.0 / r0, 1.0 / r1
    u, w = r0 / (r0 + r1), 1.0 / (r0 + r1)
    zero = torch.zeros_like(h)
    noise = zero
    heun = solver_type == "heun"
    # (cx, k0, k1 of order 2, k1 and k2 of order 3): prev = cx·x + k0·D0 + k1·D1 + k2·D2 [+ noise·z], diffusers' forms
    if algorithm_type == "dpmsolver++":
        cx = s_t / s_s0
        em1 = torch.exp(-h) - 1.0
        k0 = -(a_t * em1)
        k1_2 = a_t * (em1 / h + 1.0) if heun else -0.5 * (a_t * em1)
        k1_3 = a_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        k2_3 = -(a_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    elif algorithm_type == "dpmsolver":
        cx = a_t / a_s0
        ep1 = torch.exp(h) - 1.0
        k0 = -(s_t * ep1)
        k1_2 = -(s_t * (ep1 / h - 1.0)) if heun else -0.5 * (s_t * ep1)
        k1_3 = -(s_t * ((torch.exp(h) - 1.0) / h - 1.0))
        k2_3 = -(s_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
    elif algorithm_type == "sde-dpmsolver++":
        cx = s_t / s_s0 * torch.exp(-h)
        e2 = 1 - torch.exp(-2.0 * h)
        k0 = a_t * e2
        k1_2 = a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) if heun else 0.5 * (a_t * e2)
        k1_3 = a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        k2_3 = a_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        noise = s_t * torch.sqrt(1.0 - torch.exp(-2 * h))
    elif algorithm_type == "sde-dpmsolver":
        cx = a_t / a_s0
        ep1 = torch.exp(h) - 1.0
        k0 = -2.0 * (s_t * ep1)
        k1_2 = -2.0 * (s_t * (ep1 / h - 1.0)) if heun else -(s_t * ep1)
        k1_3 = k2_3 = torch.full_like(h, _NAN)          # diffusers has no third-order sde-dpmsolver update
        noise = s_t * torch.sqrt(torch.exp(2 * h) - 1.0)
    else:
        raise ValueError(f"algorithm_type must be one of {ALGORITHM_TYPES}, got {algorithm_type!r}")

    d = lambda v: v.to(_F64)                        # noqa: E731  the combinations are float64
    cx, k0, k1_2, k1_3, k2_3, noise = map(d, (cx, k0, k1_2, k1_3, k2_3, noise))
    inv_r0, inv_r1, u, w = map(d, (inv_r0, inv_r1, u, w))
    orders = dpm_orders(R, level, solver_order, lower_order_final, euler_at_final, final_sigmas_type)
    o = torch.from_numpy(orders)
    # order 2: D1 = (1/r0)(m0 − m1); order 3: D1 = (1 + u)·D1_0 − u·D1_1, D2 = w·(D1_0 − D1_1),
    # D1_0 = (1/r0)(m0 − m1), D1_1 = (1/r1)(m1 − m2)
    p, q = k1_3 * (1 + u) + k2_3 * w, -k1_3 * u - k2_3 * w
    z64 = torch.zeros(R, dtype=_F64)
    c_m0 = torch.where(o == 1, k0, torch.where(o == 2, k0 + k1_2 * inv_r0, k0 + p * inv_r0))
    c_m1 = torch.where(o == 1, z64, torch.where(o == 2, -k1_2 * inv_r0, -p * inv_r0 + q * inv_r1))
    c_m2 = torch.where(o == 3, -q * inv_r1, z64)
    # the unused branches of the where may be inf/NaN (e.g. 1/r0 at the final σ = 0); the chosen ones are diffusers'

    # m0 = A·x + B·out: diffusers' convert_model_output at σ_s0
    a0, s0 = d(a_s0), d(s_s0)
    sig0 = d(S[:-1])
    data = algorithm_type in _DATA_PREDICTION
    pt = prediction_type
    if data:
        if pt == "epsilon":
            A, B = 1 / a0, -s0 / a0
        elif pt == "sample":
            A, B = z64, torch.ones_like(z64)
        elif pt == "v_prediction":
            A, B = a0, -s0
        elif pt == "flow_prediction":
            A, B = torch.ones_like(z64), -sig0
        else:
            raise ValueError(f"prediction_type given as {pt} must be one of `epsilon`, `sample`, `v_prediction`, "
                             "or `flow_prediction` for the DPMSolverMultistepScheduler.")
    else:
        if pt == "epsilon":
            Ex, Eo = z64, torch.ones_like(z64)
        elif pt == "sample":
            Ex, Eo = 1 / s0, -a0 / s0
        elif pt == "v_prediction":
            Ex, Eo = s0, a0
        else:
            raise ValueError(f"prediction_type given as {pt} must be one of `epsilon`, `sample`, or `v_prediction` "
                             "for the DPMSolverMultistepScheduler.")
        A, B = Ex, Eo
        if thresholding:                       # x̂₀ = (x − σ·ε)/α, thresholded; ε = (x − α·x̂₀)/σ
            A, B = (1 - s0 * Ex) / a0, -(s0 * Eo) / a0
    if thresholding and not data:
        C0, C1 = -c_m0 * a0 / s0, cx + c_m0 / s0
    else:
        C0, C1 = c_m0, cx
    eps = dict(AX0=-a0 / s0, AX=1 / s0) if thresholding and not data else {}    # ε for the history: aux
    table = _T.finish_table(A, B, C0, C1, z64, noise, clip=bool(thresholding), D=c_m1, D1=c_m2, **eps)
    bad = torch.isnan(c_m0) if algorithm_type == "sde-dpmsolver" else torch.zeros(R, dtype=torch.bool)
    table[bad] = _NAN
    return table, orders


# ------------------------------------------------------------------------------------------------ the scheduler
class FastDPMSolverMultistepScheduler(_FastEulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``DPMSolverMultistepScheduler``: same config (plus ``fastrev_fixes``), API and numbers (see the module
    doc), one fused launch per step with the solver history read in the same pass."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _stock_cls = DPMSolverMultistepScheduler
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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        fastrev_fixes: bool = False,
    ):
        _check_fixes(fastrev_fixes)
        if isinstance(solver_order, bool) or not isinstance(solver_order, (int, np.integer)) or \
                solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        stock = DPMSolverMultistepScheduler(**_stock_kwargs(DPMSolverMultistepScheduler, type(self), self.config))
        # diffusers maps "deis" → "dpmsolver++" and "logrho"/"bh1"/"bh2" → "midpoint" in its config: so does this one
        remap = {k: stock.config[k] for k in ("algorithm_type", "solver_type") if stock.config[k] != self.config[k]}
        if remap:
            self.register_to_config(**remap)
        self._init_from_stock(stock)
        for name in ("betas", "alphas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
            setattr(self, name, getattr(stock, name))
        self.init_noise_sigma = 1.0
        self.model_outputs = [None] * int(solver_order)
        self.lower_order_nums = 0
        self._pool: list = []               # m₀ buffers this scheduler allocated (reused once out of the history)
        self._chain_tables: dict = {}       # (device, dtype) -> every level's (table, eps table), this chain

    # diffusers' own helpers, reused as they are (they read sigmas / timesteps / step_index / config)
    index_for_timestep = DPMSolverMultistepScheduler.index_for_timestep
    add_noise = DPMSolverMultistepScheduler.add_noise
    convert_model_output = DPMSolverMultistepScheduler.convert_model_output
    dpm_solver_first_order_update = DPMSolverMultistepScheduler.dpm_solver_first_order_update
    multistep_dpm_solver_second_order_update = DPMSolverMultistepScheduler.multistep_dpm_solver_second_order_update
    multistep_dpm_solver_third_order_update = DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update
    _threshold_sample = DPMSolverMultistepScheduler._threshold_sample
    _sigma_to_t = DPMSolverMultistepScheduler._sigma_to_t
    _sigma_to_alpha_sigma_t = DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t
    _convert_to_karras = DPMSolverMultistepScheduler._convert_to_karras
    _convert_to_lu = DPMSolverMultistepScheduler._convert_to_lu
    _convert_to_exponential = DPMSolverMultistepScheduler._convert_to_exponential
    _convert_to_beta = DPMSolverMultistepScheduler._convert_to_beta

    # -------------------------------------------------------------------- chain
    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None):
        """diffusers' ``set_timesteps`` (spacing, Karras / Lu / exponential / beta / flow sigmas, ``mu``, custom
        ``timesteps``) run by the internal diffusers scheduler; the history and warm-up restart, the tables are
        rebuilt and, where they already live on a device, rewritten in place."""
        st = self._stock
        st.set_timesteps(num_inference_steps, device=None, mu=mu, timesteps=timesteps)
        if mu is not None:                   # diffusers sets the attribute (not the dict entry) of its config
            self.config.flow_shift = st.config.flow_shift
        self._copy_chain_from_stock(device)
        self._chain_tables = {}              # a new chain may have replaced device tables (another length)
        self.model_outputs = [None] * int(self.config.solver_order)
        self.lower_order_nums = 0
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self._ts_dev(torch.device(device))

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The sample itself (DPM-Solver does not scale the model input), as diffusers."""
        return sample

    # -------------------------------------------------------------------- step index (diffusers' rules)
    def _host_lookup(self, timestep) -> int:
        """diffusers' ``index_for_timestep``: the second match of a duplicated timestep; an unknown timestep is the
        last index."""
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

    def _resolve_rows(self, timestep, B: int, device, for_step: bool = True):
        """Rows of this call: (int64 [B] step indices, per_sample)."""
        if isinstance(timestep, bool) or not (_is_host_number(timestep) or isinstance(timestep, torch.Tensor)):
            raise TypeError(f"timestep must be a number or a tensor (one of scheduler.timesteps), got "
                            f"{type(timestep).__name__}")
        if isinstance(timestep, torch.Tensor) and timestep.dim() >= 1 and timestep.numel() > 1:
            if timestep.dim() != 1 or timestep.numel() != B:
                raise ValueError(f"timestep must be a scalar or a [B] tensor with B = {B} (one per sample), got "
                                 f"shape {tuple(timestep.shape)}")
            ts = self._ts_dev(device)
            eq = timestep.to(device=device).reshape(-1, 1) == ts.reshape(1, -1)
            return self._device_lookup(ts, eq).contiguous(), True
        if not self._idx_known:
            self._init_index(timestep, device)
        if for_step and self._host_step is not None and self._host_step >= self._rows:
            raise IndexError(f"step index {self._host_step} is out of range: the chain has {self._rows} steps "
                             "(call set_timesteps again to start a new chain)")
        return self._counter(device).expand(B).contiguous(), False

    # -------------------------------------------------------------------- tables
    def _level(self) -> int:
        """Warm-up level of the next step: diffusers' lower_order_nums, capped where the order stops changing."""
        return min(int(self.lower_order_nums), int(self.config.solver_order) - 1)

    def _rows_of(self, level: int):
        key = ("rows", level)
        r = self._host_cache.get(key)
        if r is None:
            c = self.config
            r = self._host_cache[key] = dpm_rows(
                self._sig_host, level, algorithm_type=c.algorithm_type, solver_order=int(c.solver_order),
                solver_type=c.solver_type, prediction_type=c.prediction_type, thresholding=bool(c.thresholding),
                lower_order_final=bool(c.lower_order_final), euler_at_final=bool(c.euler_at_final),
                final_sigmas_type=c.final_sigmas_type, flow=bool(c.use_flow_sigmas),
                float64=bool(c.fastrev_fixes))
        return r

    def _build_rows(self, key) -> torch.Tensor:
        _, level = key
        return self._rows_of(level)[0]

    def _tables(self, device, dtype):
        """Every level's table on ``device`` (all uploaded at the first step, so later steps copy nothing to the
        device: a chain can be captured in a CUDA graph after one eager step). Cached per chain."""
        key = (device, dtype)
        tabs = self._chain_tables.get(key)
        if tabs is None:
            tabs = self._chain_tables[key] = [self._table(("step", lv), device, dtype)
                                              for lv in range(int(self.config.solver_order))]
        return tabs

    # -------------------------------------------------------------------- the step
    def _out_dtype(self, sample_dtype, out_dtype):
        """diffusers returns prev in the converted output's dtype."""
        c = self.config
        data = c.algorithm_type in _DATA_PREDICTION
        if (data and c.prediction_type == "sample") or (not data and c.prediction_type == "epsilon"
                                                        and not c.thresholding):
            return out_dtype
        return torch.promote_types(sample_dtype, out_dtype)

    def _model_part(self, model_output, sample):
        self._check_tensors(model_output, sample, same_shape=False)
        c = self.config
        o = model_output
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range") and o.dim() >= 2 \
                and sample.dim() >= 2:
            o = o[:, :sample.shape[1]]             # the ε channels (diffusers: [:, :3])
        if o.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)} (or, for "
                             "variance_type learned/learned_range with ε-prediction, the sample's channels first), "
                             f"got {tuple(model_output.shape)}")
        return o

    def _history(self, level: int, sample: torch.Tensor) -> tuple:
        """h_j = the (j+1)-th most recent converted output, for the level's j < level."""
        hist = []
        for j in range(level):
            h = self.model_outputs[-1 - j] if j < len(self.model_outputs) else None
            if not isinstance(h, torch.Tensor):
                raise ValueError(f"model_outputs[{-1 - j}] must be a tensor at warm-up level {level} "
                                 f"(lower_order_nums={self.lower_order_nums}), got {type(h).__name__}")
            if h.shape != sample.shape or h.device != sample.device:
                raise ValueError(f"model_outputs[{-1 - j}] must have the sample's shape {tuple(sample.shape)} on "
                                 f"{sample.device}, got {tuple(h.shape)} on {h.device}")
            hist.append(h)
        return tuple(hist)

    def _x0_buffer(self, sample, hist, model_output):
        """A buffer for m₀ that no tensor read in this step aliases: the one falling out of the history if this
        scheduler allocated it, else a new one."""
        out = self.model_outputs[0] if self.model_outputs else None
        if out is not None and any(out is b for b in self._pool) and out.shape == sample.shape and \
                out.dtype == sample.dtype and out.device == sample.device and out.is_contiguous() and \
                all(out is not h for h in hist) and out is not sample and out is not model_output:
            return out
        buf = torch.empty_like(sample, memory_format=torch.contiguous_format)
        self._pool = [b for b in self._pool if any(b is m for m in self.model_outputs)] + [buf]
        return buf

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """One multistep DPM-Solver step (diffusers' signature and outputs).

        Args:
            model_output: ε, x₀, v or flow velocity (``prediction_type``), shaped like ``sample`` (learned
                variances with ε-prediction: the first C channels are used).
            timestep: one of ``self.timesteps`` (int, float or a 0-dim tensor), or a [B] tensor of them (per-sample
                rows, a fastrev extension).
            sample: x at the current step.
            generator: SDE variants: a torch.Generator or a list (exact mode: diffusers' float32 draw); None: fast
                mode, the counter stream in the kernel. Unused by the ODE variants (as diffusers).
            variance_noise: SDE variants: the noise itself (exact mode).
            return_dict: False returns ``(prev_sample,)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        o = self._model_part(model_output, sample)
        cfg = self.config
        device, B = sample.device, sample.shape[0]
        level = self._level()
        rows, per_sample = self._resolve_rows(timestep, B, device)
        self._rows_of(level)                       # prediction_type errors (at the step, as diffusers)
        if cfg.algorithm_type == "sde-dpmsolver" and level >= 2 and self._host_step is not None \
                and self._rows_of(level)[1][min(self._host_step, self._rows - 1)] == 3:
            raise NotImplementedError("algorithm_type='sde-dpmsolver' has no third-order update in diffusers' "
                                      "DPMSolverMultistepScheduler (use solver_order <= 2 or 'sde-dpmsolver++')")
        hist = self._history(level, sample)

        z, seed, stochastic = None, None, cfg.algorithm_type in _SDE
        if stochastic:
            if variance_noise is not None:
                if not isinstance(variance_noise, torch.Tensor):
                    raise TypeError(f"variance_noise must be a tensor, got {type(variance_noise).__name__}")
                z = variance_noise.to(device=device, dtype=torch.float32)
                if z.shape != sample.shape:
                    try:
                        z = z.expand(sample.shape)
                    except RuntimeError:
                        raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)} (or "
                                         f"broadcast to it), got {tuple(variance_noise.shape)}") from None
            elif generator is not None:
                z = randn_tensor(o.shape, generator=generator, device=device, dtype=torch.float32)
            else:
                seed = self._seed_tensor(device)

        any_f64 = _F64 in (sample.dtype, o.dtype) or any(h.dtype == _F64 for h in hist)
        needs_grad = torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad)
        backend = _ops.resolve_backend(self.backend, device, any_f64=any_f64, needs_grad=needs_grad)
        table = self._tables(device, _ops.table_dtype(backend, any_f64))[level]
        out_dtype = self._out_dtype(sample.dtype, model_output.dtype)
        out = None if out_dtype == sample.dtype else torch.empty_like(sample, dtype=out_dtype,
                                                                      memory_format=torch.contiguous_format)
        thr = bool(cfg.thresholding)
        kw = dict(clip=thr, thresholding=thr, dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                  sample_max_value=cfg.sample_max_value, noise=z, seed=seed, stochastic=stochastic, out=out,
                  backend=backend, history=hist)
        # the new history entry goes straight into a buffer this step does not read: x̂₀, or for the thresholded
        # dpmsolver ε = (x − α·x̂₀)/σ through the table's aux columns
        m0 = self._x0_buffer(sample, hist, model_output)
        if thr and cfg.algorithm_type not in _DATA_PREDICTION:
            prev = _ops.fused_step(table, rows, sample, o, return_x0=False, aux_out=m0, **kw).prev_sample
        else:
            prev = _ops.fused_step(table, rows, sample, o, return_x0=True, x0_out=m0, **kw).prev_sample

        # diffusers' bookkeeping: shift the history (in place, as diffusers), count the warm-up, advance the index
        n = int(cfg.solver_order)
        for i in range(n - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = m0
        if self.lower_order_nums < n:
            self.lower_order_nums += 1
        if not per_sample:
            self._advance()
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
