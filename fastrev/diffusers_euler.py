"""Drop-in diffusers Euler-family schedulers: :class:`FastEulerDiscreteScheduler`,
:class:`FastEulerAncestralDiscreteScheduler` and :class:`FastFlowMatchEulerDiscreteScheduler`.

One line in a pipeline (SDXL, SD 1.x "Euler" / "Euler a", SD3, Flux, LTX-Video, HunyuanVideo ...)::

    from fastrev.diffusers_euler import FastEulerDiscreteScheduler
    pipe.scheduler = FastEulerDiscreteScheduler.from_config(pipe.scheduler.config)

Each class is a ``SchedulerMixin, ConfigMixin`` subclass with the diffusers class's ``__init__`` signature (config
names and defaults, plus ``fastrev_fixes``) and compatibles, so ``from_config`` works in both directions. The
schedule itself (``set_timesteps``: spacing, Karras / exponential / beta sigmas, shift, dynamic shifting with ``mu``,
``invert_sigmas``, ``shift_terminal``, custom ``sigmas`` / ``timesteps``, zero terminal SNR ...) is built by an
internal instance of the diffusers class, so ``timesteps`` and ``sigmas`` are diffusers' own float32 values, bit for
bit.

How a step runs. Every one of these steps is linear in (sample, model output) plus noise::

    x̂₀ = A·x + B·out [+ Z0·z]            prev = C1·x + C2·out + SIGMA·z

with one row of float64 coefficients per step index, built on the host from diffusers' float32 sigmas when the chain
is set, cast to float32 and kept on the device (``fastrev.tables`` layout, ``fastrev.ops.fused_step``: one fused kernel
launch on CUDA). The row is the **step index**, which lives on the device: ``step`` gathers the row with a device
counter and advances it in place, so no ``.item()``, no ``nonzero()``, no Python branch on a device value — a step can
be captured in a CUDA graph. ``timestep`` may also be a ``[B]`` tensor (per-sample timesteps, a fastrev extension):
each sample's row is found by matching its timestep in ``timesteps`` on the device.

Two noise modes (stochastic steps only: Euler with ``s_churn``, Euler-ancestral, flow matching with
``stochastic_sampling``):
  * **exact** (``generator`` given, a list of generators too): the noise is diffusers' ``randn_tensor`` draw, the same
    shape / dtype / device / generator consumption, so a whole loop matches diffusers to float32 rounding;
  * **fast** (no generator): :mod:`fastrev.noise`'s counter stream keyed by (seed, sample index, step index), generated
    inside the kernel. The seed is ``scheduler.noise_seed`` if set, else drawn once per ``set_timesteps`` from torch's
    default generator (on the host) at the first fast stochastic step.

Where the host is still needed (documented, never silent):
  * the *first* step / ``scale_model_input`` of a chain finds the step index from ``timestep``: on the host (diffusers'
    rule, the second match for a duplicated timestep) when the timestep is a Python number or a CPU tensor or when
    ``set_begin_index`` was called; on the device (no sync) when it is a device tensor.
  * reading ``scheduler.step_index`` after a device-side start reads the device counter back (one sync, then cached);
    under CUDA-graph replay the device counter is the truth and the host mirror is not advanced.
  * exact mode with ``s_churn`` whose γ is zero on some steps and not others reads the step index on the host (as
    diffusers), to know whether to draw noise (not with ``fastrev_fixes=True``).
  * ``add_noise`` / ``scale_noise`` are diffusers' own methods (they look timesteps up on the host).
  * ``per_token_timesteps`` (flow matching, LTX-Video) gives each element its own σ: that is not a table row, so that
    step runs diffusers' eager arithmetic (same numbers, no fusion).

Churn (``EulerDiscreteScheduler.step(s_churn=...)``): diffusers adds c·z (c = s_noise·√(σ̂² − σ²)) to the sample and
computes x̂₀ from the churned sample, so the noise enters both outputs. prev = C1·(x + c·z) + C2·out puts C1·c in the
SIGMA column, x̂₀ = A·(x + c·z) + B·out puts A·c in the Z0 column, and the step is still **one launch**: the kernel's
``x0_noise`` mode (X0_NOISE, a compile-time property of the launch) adds Z0·z to x̂₀ with the *same* z as prev's (the
same tensor in exact mode, the same counter in fast mode). Exact mode launches without noise at a step whose γ is 0
(diffusers draws nothing there); fast mode always generates it (times 0 there). Every step is one launch.

Backends (``scheduler.backend``, an attribute, not config; see :func:`fastrev.ops.resolve_backend`): ``"auto"`` runs
the fused Triton kernel on CUDA and ``fastrev.ops.fused_step``'s torch update elsewhere (CPU, float64 inputs,
autograd); ``"triton"`` forces the kernel (CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"`` / ``"reference"``
force the torch update.

CPU host overhead. On the CPU the step index is read and advanced on the host (the counter is a CPU tensor written
through its numpy view: no torch op), the rows tensor and ``scale_model_input``'s divisor are cached per row, and a
step on plain float32 contiguous CPU tensors ("torch" backend, index known on the host) calls the one-pass CPU update
(:func:`fastrev._cpu.table_step`, what ``fused_step`` runs for such tensors) directly with coefficient rows gathered
once per chain: the same pass and the same bits as through ``fused_step``, without its per-call dispatch. Anything
else (other dtypes, layouts, autograd, per-sample timesteps, the device path) goes through ``fused_step``.

Differences from diffusers (everything else matches):
  * ``pred_original_sample`` has the sample's dtype (diffusers: float32 after its upcast, or ``model_output`` itself
    for ``prediction_type="sample"``); ``prev_sample`` has ``model_output``'s dtype as in diffusers.
  * Coefficients are float64 from diffusers' float32 sigmas (σ̂ and flow matching's dt rounded to float32 as diffusers
    rounds them); Euler-ancestral's σ_down is σ_next²/σ (algebraically diffusers' √(σ_next² − σ_up²), without its
    float32 cancellation when σ_next ≪ σ).
  * Stepping past the end of the chain: diffusers raises IndexError; here too when the step index is known on the
    host, NaN outputs when it lives only on the device. A device timestep that is not in ``timesteps`` gives NaN
    (diffusers: IndexError).
  * Per-sample ``[B]`` timesteps take the first match and neither read nor advance the step index.
  * Without a generator the noise is fastrev's counter stream, not ``torch.randn`` from the global generator.

``fastrev_fixes`` (a config key of all three, default False, as in fastrev's other drop-ins; saved, loaded and kept
through diffusers' classes) turns on fastrev's changes to diffusers' results:
  * FlowMatch: diffusers' default ``set_timesteps`` path shifts σ twice (huggingface/diffusers#13243: ``sigma_min`` /
    ``sigma_max`` are stored after the shift in ``__init__`` and shifted again), which moves the last σ (e.g. 0.0030
    → 0.0089 for shift 3 and 10 steps); the fix builds the linspace from the unshifted bounds: one shift.
  * Euler with ``s_churn`` in exact mode, γ > 0 on some steps only: the noise is drawn at every step (multiplied by 0
    where γ = 0) instead of reading the step index on the host to skip the draw: no sync, capturable; only the
    generator's state (hence later noise) differs from diffusers.
  * Euler-ancestral: no change (the key is accepted for a uniform config).

This module imports diffusers (an optional dependency: ``pip install 'fastrev[diffusers]'``).
"""

from __future__ import annotations

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
        EulerAncestralDiscreteScheduler,
        EulerAncestralDiscreteSchedulerOutput,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler, EulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
        FlowMatchEulerDiscreteSchedulerOutput,
    )
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import logging as _dlogging
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fastrev.diffusers_euler needs the optional dependency `diffusers` (>= 0.30): install it with "
        f"`pip install 'fastrev[diffusers]'` or `pip install diffusers` (import failed with: {e})") from e

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import _cpu  # noqa: E402
from . import noise as _noise  # noqa: E402
from . import ops as _ops  # noqa: E402
from . import tables as _T  # noqa: E402
from .reference import PREDICTION_TYPES  # noqa: E402

__all__ = ["FastEulerDiscreteScheduler", "FastEulerAncestralDiscreteScheduler", "FastFlowMatchEulerDiscreteScheduler"]

logger = _dlogging.get_logger(__name__)

BACKENDS = ("auto", "torch", "reference", "triton")
_F64 = torch.float64
_NAN_ROW = float("nan")
#: Device types whose tensors are read on the host without a synchronisation (tests set it to () to run the
#: device code path, and check that it never reads a value back, on CPU tensors).
_HOST_DEVICES = ("cpu",)


def _check_fixes(fastrev_fixes) -> None:
    if not isinstance(fastrev_fixes, bool):
        raise TypeError(f"fastrev_fixes must be a bool, got {type(fastrev_fixes).__name__}")


def _is_host_number(x) -> bool:
    return isinstance(x, (float, np.floating)) or (isinstance(x, (int, np.integer)) and not isinstance(x, bool))


_CPU = torch.device("cpu")
#: Whether a host-indexed step on plain float32 CPU tensors calls the one-pass CPU update directly (the same result as
#: through fused_step; tests turn it off to compare).
_CPU_FAST = True
_ROWS: dict = {}
_ARANGE: dict = {}
_BACKENDS: dict = {}


def _resolve_backend(backend: str, device: torch.device, any_f64: bool, needs_grad: bool) -> str:
    """:func:`fastrev.ops.resolve_backend`, memoized (a pure function of its arguments; errors are not cached)."""
    key = (backend, device, any_f64, needs_grad)
    r = _BACKENDS.get(key)
    if r is None:
        r = _ops.resolve_backend(backend, device, any_f64=any_f64, needs_grad=needs_grad)
        if len(_BACKENDS) > 256:
            _BACKENDS.clear()
        _BACKENDS[key] = r
    return r


_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _plain(t) -> bool:
    return type(t) is torch.Tensor and t.dtype is torch.float32 and t.is_cpu and not t.requires_grad \
        and t.is_contiguous() and not (_functorch_wrapped is not None and _functorch_wrapped(t))


def _cpu_plain(sample, model_output, z) -> bool:
    """The tensors (``z`` may be None) can go to the one-pass CPU update as they are: numba present, not tracing,
    plain (not a subclass, not a functorch wrapper), float32, CPU, contiguous, no autograd — a subset of what
    :func:`fastrev._cpu.eligible` accepts (contiguous rather than per-sample contiguous), checked more cheaply."""
    return _cpu.AVAILABLE and _plain(sample) and _plain(model_output) and (z is None or _plain(z)) \
        and not torch.compiler.is_compiling()


def _arange(B: int) -> torch.Tensor:
    """int64 [B] CPU arange (the counter noise's sample indices), cached and never written."""
    t = _ARANGE.get(B)
    if t is None:
        if len(_ARANGE) > 256:
            _ARANGE.clear()
        t = _ARANGE[B] = torch.arange(B, dtype=torch.int64)
    return t


def _row_tensor(B: int, row: int) -> torch.Tensor:
    """int64 [B] CPU tensor filled with ``row``, cached and never written (the rows of a host-indexed step)."""
    t = _ROWS.get((B, row))
    if t is None:
        if len(_ROWS) > 4096:
            _ROWS.clear()
        t = _ROWS[(B, row)] = torch.full((B,), row, dtype=torch.int64)
    return t


# ------------------------------------------------------------------------------------------------ shared machinery
class _FastEulerBase:
    """What the three drop-ins share: the internal diffusers scheduler that builds the chain, device state (tables,
    step-index counter, seed) rewritten in place per chain, the step index, the fused step."""

    order = 1
    #: "auto" (fused kernel on CUDA, torch elsewhere), "triton" or "torch"/"reference". Not part of the config.
    backend = "auto"
    #: Seed of the fast-mode counter noise; None: drawn from torch's default generator once per set_timesteps.
    noise_seed = None
    _stock_cls: type = None
    _has_x0 = True          # step returns pred_original_sample

    # -------------------------------------------------------------------- construction
    def _init_from_stock(self, stock) -> None:
        self._stock = stock
        self._dstate: dict = {}         # (name, device, ...) -> [tensor, host builder]; rewritten in place per chain
        self._idx = None                # int64 [1] device counter of the step index (None: not on any device yet)
        self._idx_host = (None, None)   # (the CPU counter, its numpy view): host-side reads/writes of a CPU counter
        self._idx_known = False         # whether the device counter holds the current chain's index
        self._host_step = None          # diffusers' host step index (mirror of the device counter when known)
        self._begin_index = None
        self._drawn_seed = None
        self._copy_chain_from_stock(device=None)

    def _copy_chain_from_stock(self, device) -> None:
        st = self._stock
        self.timesteps = st.timesteps
        self.sigmas = st.sigmas
        if hasattr(st, "num_inference_steps"):         # FlowMatch sets it only in set_timesteps
            self.num_inference_steps = st.num_inference_steps
        self._ts_host = st.timesteps.detach().cpu()                       # for host look-ups
        self._sig_host = st.sigmas.detach().cpu().to(torch.float32)      # diffusers' float32 sigmas
        self._sig_np = self._sig_host.numpy().copy()
        self._rows = int(self._sig_host.numel()) - 1                      # valid step rows 0..R-1; row R is NaN
        self._host_cache: dict = {}
        self._host_step = None
        self._begin_index = None
        self._idx_known = False
        self._drawn_seed = None
        for key, entry in list(self._dstate.items()):                     # rewrite what earlier steps put on devices
            new = entry[1]()
            if new.shape == entry[0].shape and new.dtype == entry[0].dtype:
                entry[0].copy_(new)
            else:
                entry[0] = new.to(key[1])

    # -------------------------------------------------------------------- device state
    def _device_value(self, name: tuple, device: torch.device, build) -> torch.Tensor:
        key = (name, device if type(device) is torch.device else torch.device(device))
        entry = self._dstate.get(key)
        if entry is None:
            entry = self._dstate[key] = [build().to(device).contiguous(), build]
        return entry[0]

    def _ts_dev(self, device) -> torch.Tensor:
        return self._device_value(("timesteps",), device, lambda: self._ts_host)

    def _denominators_host(self) -> torch.Tensor:
        """(σ² + 1)^½ in float32 as diffusers computes it, per step index 0..R."""
        s = self._sig_host
        return (s**2 + 1) ** 0.5

    def _seed_tensor(self, device) -> torch.Tensor:
        if self.noise_seed is not None:
            seed = int(self.noise_seed)
            return self._device_value(("fixed_seed", seed), device, lambda: _noise.as_seed_tensor(seed, "cpu"))

        def drawn():
            if self._drawn_seed is None:
                self._drawn_seed = _ops.draw_seed(None, "cpu")
            return self._drawn_seed
        return self._device_value(("seed",), device, drawn)

    def _table(self, key: tuple, device, dtype) -> torch.Tensor:
        return self._device_value(("table", key, dtype), device, lambda: self._host_table(key).to(dtype))

    def _host_table(self, key: tuple) -> torch.Tensor:
        """float64 [R + 1, NCOL]: rows 0..R-1 the steps, row R NaN (past the end of the chain)."""
        t = self._host_cache.get(key)
        if t is None:
            rows = self._build_rows(key)
            nan = torch.full((1, _T.NCOL), _NAN_ROW, dtype=_F64)
            t = self._host_cache[key] = torch.cat([rows, nan]) if rows.numel() else nan
        return t

    def _sig64(self):
        """(σ_i, σ_{i+1}) for the R step rows, float64 views of diffusers' float32 sigmas."""
        s = self._sig_host.to(_F64)
        return s[:-1], s[1:]

    # -------------------------------------------------------------------- step index
    @property
    def step_index(self):
        """The current step index (diffusers). After a start on the device it is read back once (a sync)."""
        if self._host_step is None and self._idx_known:
            self._host_step = int(self._idx.item())
        return self._host_step

    @property
    def _step_index(self):
        """diffusers' private attribute, for code that reads or writes it (e.g. LEDITS++ advances it by hand): reads
        are :attr:`step_index`; writes set the device counter too (None restarts the chain's index)."""
        return self.step_index

    @_step_index.setter
    def _step_index(self, value) -> None:
        if value is None:
            self._host_step, self._idx_known = None, False
            return
        value = int(value)
        counter = self._idx if self._idx is not None else self._counter("cpu")
        idx, arr = self._idx_host
        if arr is not None and idx is counter and "cpu" in _HOST_DEVICES:
            arr[0] = min(max(value, 0), self._rows)             # a CPU counter: written through numpy, no torch op
        else:
            counter.fill_(min(max(value, 0), self._rows))
        self._host_step, self._idx_known = value, True

    def _init_step_index(self, timestep) -> None:
        """diffusers' private ``_init_step_index`` (used by some pipelines directly)."""
        device = timestep.device if isinstance(timestep, torch.Tensor) else (
            self._idx.device if self._idx is not None else torch.device("cpu"))
        self._init_index(timestep, device)

    @property
    def begin_index(self):
        """The index of the first timestep, set by pipelines with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Set the step index the next chain starts from (diffusers' img2img / inpaint pipelines call this)."""
        self._begin_index = begin_index

    def _counter(self, device) -> torch.Tensor:
        device = torch.device(device)
        if self._idx is None:
            self._idx = torch.zeros(1, dtype=torch.int64, device=device)
        elif self._idx.device != device:
            self._idx = self._idx.to(device)
        if self._idx_host[0] is not self._idx:
            self._idx_host = (self._idx, self._idx.numpy() if self._idx.device.type == "cpu" else None)
        return self._idx

    def _host_row(self, device):
        """The current row as a Python int when the counter is a CPU tensor that may be read on the host (a numpy
        read, no torch op) and the host mirror of the index is known; else None (the device path)."""
        if self._host_step is None or device != _CPU or "cpu" not in _HOST_DEVICES:
            return None
        idx, arr = self._idx_host
        if arr is None or idx is not self._idx:
            return None
        return int(arr[0])

    def _host_lookup(self, timestep) -> int:
        """diffusers' ``index_for_timestep``: the second match if the timestep occurs more than once."""
        t = timestep.detach().cpu() if isinstance(timestep, torch.Tensor) else timestep
        idx = (self._ts_host == t).nonzero()
        if len(idx) == 0:
            raise IndexError(f"timestep {float(t)} is not one of scheduler.timesteps (call set_timesteps and step "
                             "with its timesteps)")
        return int(idx[1 if len(idx) > 1 else 0])

    def _timestep_on_host(self, timestep) -> bool:
        """Whether the first step's timestep is read on the host (a Python number, or a tensor on a device of
        ``_HOST_DEVICES``: a read without a sync)."""
        return _is_host_number(timestep) or (isinstance(timestep, torch.Tensor)
                                             and timestep.device.type in _HOST_DEVICES)

    def _missing_index(self, n_timesteps: int) -> int:
        """The step index a device-side look-up gives a timestep that is not in ``timesteps``: here the NaN row past
        the end (a subclass whose diffusers class falls back to another index returns that)."""
        return self._rows

    def _device_lookup(self, ts: torch.Tensor, eq: torch.Tensor) -> torch.Tensor:
        """diffusers' look-up rule on the device, no sync: ``eq`` [..., T] compares timesteps with ``ts``; the second
        match of a duplicated timestep, else the first, else :meth:`_missing_index`."""
        cnt = eq.sum(-1)
        ei = eq.to(torch.int32)
        first = torch.argmax(ei, dim=-1)
        second = torch.argmax(((ei.cumsum(-1) == 2) & eq).to(torch.int32), dim=-1)
        idx = torch.where(cnt > 1, second, first)
        return torch.where(cnt == 0, torch.full_like(idx, self._missing_index(ts.numel())), idx)

    def _init_index(self, timestep, device) -> None:
        """Start the step index (diffusers' ``_init_step_index``), on the device without a sync when the timestep
        lives there."""
        counter = self._counter(device)
        if self._begin_index is not None:
            host = int(self._begin_index)
        elif self._timestep_on_host(timestep):
            host = self._host_lookup(timestep)
        else:                                                   # device lookup: no sync
            ts = self._ts_dev(counter.device)
            counter.copy_(self._device_lookup(ts, ts == timestep.reshape(()).to(counter.device)).reshape(1))
            self._host_step = None
            self._idx_known = True
            return
        counter.fill_(min(max(host, 0), self._rows))
        self._host_step = host
        self._idx_known = True

    def _resolve_rows(self, timestep, B: int, device, for_step: bool):
        """Rows of the table for this call: (int64 [B] rows, per_sample). The rows are read-only: with the counter
        on the host they are a cached tensor of the current row, on a device a copy of the counter."""
        rows, per_sample, _ = self._locate(timestep, B, device, for_step)
        return rows, per_sample

    def _locate(self, timestep, B: int, device, for_step: bool):
        """:meth:`_resolve_rows` plus the row as a Python int when it is known on the host (:meth:`_host_row`; None
        for per-sample rows and on the device path): (rows, per_sample, row)."""
        if type(timestep) is torch.Tensor:              # the common case first (a 0-dim tensor of `timesteps`)
            if not timestep.dtype.is_floating_point:
                self._integer_timestep_error()
            if timestep.dim() >= 1 and timestep.numel() > 1:
                return self._per_sample_rows(timestep, B, device), True, None
        elif isinstance(timestep, bool) or isinstance(timestep, (int, np.integer)) or (
                isinstance(timestep, torch.Tensor) and not timestep.dtype.is_floating_point):
            self._integer_timestep_error()
        elif isinstance(timestep, torch.Tensor):
            if timestep.dim() >= 1 and timestep.numel() > 1:
                return self._per_sample_rows(timestep, B, device), True, None
        elif not _is_host_number(timestep):
            raise TypeError(f"timestep must be a float or a float tensor, got {type(timestep).__name__}")
        if not self._idx_known:
            self._init_index(timestep, device)
        if for_step and self._host_step is not None and self._host_step >= self._rows:
            raise IndexError(f"step index {self._host_step} is out of range: the chain has {self._rows} steps "
                             "(call set_timesteps again to start a new chain)")
        row = self._host_row(device)
        if row is not None:                             # CPU counter read on the host: a cached rows tensor
            return _row_tensor(B, row), False, row
        return self._counter(device).expand(B).contiguous(), False, None   # int64 [B] (a copy kernel for B > 1)

    def _integer_timestep_error(self):
        raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                         f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                         f"`scheduler.timesteps` as a timestep.")

    def _per_sample_rows(self, timestep, B: int, device) -> torch.Tensor:
        """int64 [B] rows of a [B] timestep tensor, matched on its device (first match; no match: the NaN row)."""
        if timestep.dim() != 1 or timestep.numel() != B:
            raise ValueError(f"timestep must be a scalar or a [B] tensor with B = {B} (one per sample), got "
                             f"shape {tuple(timestep.shape)}")
        ts = self._ts_dev(device)
        eq = timestep.to(device=device, dtype=ts.dtype).reshape(-1, 1) == ts.reshape(1, -1)
        rows = torch.argmax(eq.to(torch.int32), dim=1)
        return torch.where(eq.any(dim=1), rows, torch.full_like(rows, self._rows))

    def _advance(self) -> None:
        idx, arr = self._idx_host
        if arr is not None and idx is self._idx and "cpu" in _HOST_DEVICES:
            arr[0] = min(int(arr[0]) + 1, self._rows)     # a CPU counter: written through numpy, no torch op
        else:
            self._idx.add_(1).clamp_(max=self._rows)      # saturates at the NaN row: never gathers out of bounds
        if self._host_step is not None:
            self._host_step += 1

    # -------------------------------------------------------------------- the step
    def _check_tensors(self, model_output, sample, same_shape: bool = True):
        """The step's input checks (``same_shape=False``: the caller checks the model output's shape itself)."""
        _ops._check_choice("backend", self.backend, BACKENDS)
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors, got "
                            f"{type(model_output).__name__} and {type(sample).__name__}")
        if not sample.dtype.is_floating_point or not model_output.dtype.is_floating_point:
            raise TypeError(f"model_output and sample must be floating tensors, got {model_output.dtype} and "
                            f"{sample.dtype}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension (shape [B, ...])")
        if same_shape and model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        if not (model_output.is_cpu and sample.is_cpu) and model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")

    def _run(self, model_output, timestep, sample, *, key, stochastic, draw, noise_shape_dtype, generator,
             x0_key=None, x0_noise=False):
        """One step: rows, noise, backend, one fused_step. ``draw(rows, per_sample)`` tells, in exact mode, whether
        diffusers would draw noise now; ``noise_shape_dtype`` is (shape, dtype, device) of its draw (None:
        ``model_output``'s). ``x0_noise``: x̂₀ carries the step's noise too, through the table's Z0 column (Euler's
        churn), in the same launch — applied when the step draws noise. ``x0_key``: x̂₀ written instead by a second
        launch on that key's table (C1, C2, SIGMA as x̂₀'s A, B, noise coefficient) with the same noise; one launch
        with ``x0_noise`` is cheaper."""
        self._check_tensors(model_output, sample)
        device, B = sample.device, sample.shape[0]
        rows, per_sample, row = self._locate(timestep, B, device, for_step=True)

        z, seed = None, None
        if generator is not None:
            if draw(rows, per_sample):
                shape, dtype, zdev = noise_shape_dtype or (model_output.shape, model_output.dtype,
                                                           model_output.device)
                z = randn_tensor(shape, generator=generator, device=zdev, dtype=dtype)
                stochastic = True
            else:
                stochastic = False
        elif stochastic:
            seed = self._seed_tensor(device)

        sdtype, out_dtype = sample.dtype, model_output.dtype
        any_f64 = sdtype is _F64 or out_dtype is _F64 or (z is not None and z.dtype is _F64)
        needs_grad = torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad)
        backend = _resolve_backend(self.backend, device, any_f64, needs_grad)
        tdtype = _ops.table_dtype(backend, any_f64)
        x0_noise = bool(x0_noise) and stochastic          # a step that draws no noise adds none to x̂₀ either
        split_x0 = self._has_x0 and x0_key is not None and stochastic
        if row is not None and backend == "torch" and _CPU_FAST and out_dtype is sdtype:
            if _cpu_plain(sample, model_output, z):
                prev, x0 = self._cpu_step(key, x0_key if split_x0 else None, row, rows, sample, model_output, z,
                                          seed, stochastic, tdtype, x0_noise)
                self._advance()
                return prev, x0
        table = self._table(key, device, tdtype)
        out = None if out_dtype is sdtype else torch.empty_like(sample, dtype=out_dtype,
                                                                memory_format=torch.contiguous_format)
        prev, x0 = _ops.fused_step(table, rows, sample, model_output, noise=z, seed=seed, stochastic=stochastic,
                                   out=out, return_x0=self._has_x0 and not split_x0, backend=backend,
                                   x0_noise=x0_noise)
        if split_x0:
            x0 = torch.empty_like(sample, memory_format=torch.contiguous_format)
            _ops.fused_step(self._table(x0_key, device, tdtype), rows, sample, model_output, noise=z, seed=seed,
                            stochastic=True, out=x0, return_x0=False, backend=backend)
        if not per_sample:
            self._advance()
        return prev, x0

    def _cpu_step(self, key, x0_key, row, rows, sample, model_output, z, seed, stochastic, tdtype, x0_noise=False):
        """The "torch" backend's one-pass CPU update (:func:`fastrev._cpu.table_step`, what ``fused_step`` runs for
        these tensors), called directly for a host-indexed step on plain float32 CPU tensors: the same kernel, the
        same float32 coefficient rows (gathered once per chain and row, not per call) and the same noise, without
        ``fused_step``'s per-call dispatch (eligibility checks, row gather, output routing). Bit for bit the
        ``fused_step`` result (tested). ``x0_key``: the churn's x̂₀ table (a second pass), or None."""
        B = sample.shape[0]
        coef = self._coef_rows(key, row, B, tdtype)
        philox = stochastic and z is None
        noise_kw = dict(seed=seed, sample_index=_arange(B), step=rows) if philox else {}
        prev = torch.empty_like(sample)                                 # sample is contiguous: so are these
        x0 = torch.empty_like(sample) if self._has_x0 else None
        _cpu.table_step(coef, sample, model_output, z=z, stochastic=stochastic, prev=prev,
                        x0=x0 if x0_key is None else None, x0_noise=x0_noise, **noise_kw)
        if x0_key is not None:                                          # churn: x̂₀ from its own table, same noise
            _cpu.table_step(self._coef_rows(x0_key, row, B, tdtype), sample, model_output, z=z,
                            stochastic=True, prev=x0, **noise_kw)
        return prev, x0

    def _coef_rows(self, key, row, B, tdtype) -> torch.Tensor:
        """[B, NCOL]: B copies of row ``row`` of the CPU table of ``key``, a contiguous view of the table (B = 1) or
        of its rows repeated B times (made once per chain), so a step gathers nothing."""
        ck = ("rows", key, B, tdtype)
        rep = self._host_cache.get(ck)
        if rep is None:
            table = self._table(key, _CPU, tdtype)
            rep = self._host_cache[ck] = table if B == 1 else table.repeat_interleave(B, dim=0)
        return rep[row * B:(row + 1) * B]

    def _host_rows(self, rows, per_sample) -> torch.Tensor:
        """The current rows on the host (exact mode only: may read the device back, as diffusers does)."""
        if per_sample:
            return rows.cpu()
        return torch.tensor([min(self.step_index, self._rows)])

    # -------------------------------------------------------------------- diffusers API
    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _stock_kwargs(cls, fast_cls, config) -> dict:
    """The config entries for the internal diffusers scheduler: everything but fastrev's own options. A config key the
    installed diffusers class does not take (an older diffusers) raises unless it has its default value, so no option
    is silently dropped."""
    import inspect
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ours = inspect.signature(fast_cls.__init__).parameters
    kwargs = {}
    for k, v in dict(config).items():
        if k.startswith("_") or k == "fastrev_fixes":
            continue
        if k in names:
            kwargs[k] = v
        elif k in ours and v != ours[k].default:
            raise ValueError(f"{k}={v!r} needs a newer diffusers: the installed {cls.__name__} does not take `{k}`")
    return kwargs


# ------------------------------------------------------------------------------------------------ σ-space Euler
class _SigmaEulerBase(_FastEulerBase):
    """Euler and Euler-ancestral: σ-space, ``scale_model_input`` divides by √(σ² + 1)."""

    def _after_init(self) -> None:
        self.betas = self._stock.betas
        self.alphas = self._stock.alphas
        self.alphas_cumprod = self._stock.alphas_cumprod
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self):
        """σ_max ("linspace" / "trailing") or √(σ_max² + 1) ("leading"), as diffusers."""
        max_sigma = max(self.sigmas) if isinstance(self.sigmas, list) else self.sigmas.max()
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """``sample / √(σ² + 1)`` at the current step index (a device gather: no sync); per-sample for a [B]
        timestep tensor."""
        if not isinstance(sample, torch.Tensor) or not sample.dtype.is_floating_point:
            raise TypeError(f"sample must be a floating torch.Tensor, got {type(sample).__name__}")
        device, dim = sample.device, sample.dim()
        B = sample.shape[0] if dim else 1
        rows, _, row = self._locate(timestep, B, device, for_step=False)
        if row is not None:                 # host-indexed CPU step: a view of the divisors, shaped once per chain
            key = ("scale", B, dim)
            ds = self._host_cache.get(key)
            if ds is None:
                ds = self._host_cache[key] = self._scale_divisor(
                    torch.arange(self._rows + 1).repeat_interleave(B), device, dim)
            d = ds[row * B:(row + 1) * B]
        else:
            d = self._scale_divisor(rows, device, dim)
        self.is_scale_input_called = True
        scaled = sample / d
        return scaled if scaled.dtype == sample.dtype else scaled.to(sample.dtype)

    def _scale_divisor(self, rows, device, dim) -> torch.Tensor:
        """√(σ² + 1) of ``rows`` (a device gather), shaped [B, 1, ...] to divide a sample of ``dim`` dimensions."""
        denom = self._device_value(("denominators",), device, self._denominators_host)
        return denom.index_select(0, rows.reshape(-1)).reshape((-1,) + (1,) * max(dim - 1, 0))

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """diffusers' ``set_timesteps`` (run by the internal diffusers scheduler); then the tables are rebuilt and,
        where they already live on a device, rewritten in place."""
        kwargs = {} if self._stock_cls is EulerAncestralDiscreteScheduler else dict(timesteps=timesteps,
                                                                                   sigmas=sigmas)
        self._stock.set_timesteps(num_inference_steps, device=None, **kwargs)
        self._copy_chain_from_stock(device)
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self._ts_dev(torch.device(device))

    def _x0_coefficients(self, sig, sig_hat):
        """(A, B) of x̂₀ = A·x + B·out for diffusers' prediction types (x the possibly churned sample)."""
        pt = self.config.prediction_type
        if pt in ("sample", "original_sample"):
            return torch.zeros_like(sig), torch.ones_like(sig)
        if pt == "epsilon":
            return torch.ones_like(sig), -sig_hat
        if pt == "v_prediction":                 # diffusers uses σ here, also when churn makes σ̂ ≠ σ
            return 1.0 / (sig**2 + 1), -sig / torch.sqrt(sig**2 + 1)
        raise ValueError(f"prediction_type given as {pt} must be one of `epsilon`, or `v_prediction`")

    add_noise = EulerDiscreteScheduler.add_noise
    index_for_timestep = EulerDiscreteScheduler.index_for_timestep


# ------------------------------------------------------------------------------------------------ Euler
class FastEulerDiscreteScheduler(_SigmaEulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``EulerDiscreteScheduler`` (SDXL's default): same config (plus ``fastrev_fixes``), API and numbers,
    one fused launch per step (``s_churn`` included). See the module doc for exact/fast noise, the device step index,
    per-sample timesteps and ``fastrev_fixes``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _stock_cls = EulerDiscreteScheduler

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
        fastrev_fixes: bool = False,
    ):
        _check_fixes(fastrev_fixes)
        _ops._check_choice("prediction_type", prediction_type, PREDICTION_TYPES + ("original_sample",))
        self._init_from_stock(EulerDiscreteScheduler(**_stock_kwargs(EulerDiscreteScheduler, type(self), self.config)))
        self._after_init()
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    _sigma_to_t = EulerDiscreteScheduler._sigma_to_t
    _convert_to_karras = EulerDiscreteScheduler._convert_to_karras
    _convert_to_exponential = EulerDiscreteScheduler._convert_to_exponential
    _convert_to_beta = EulerDiscreteScheduler._convert_to_beta
    get_velocity = EulerDiscreteScheduler.get_velocity

    def _churn_flags(self, churn):
        """(γ per row as float64 numpy with a 0 for the NaN row, any γ > 0, all γ > 0), cached per chain and computed
        in numpy on the host copy of the sigmas: no per-step host work, no tensor read."""
        flags = self._host_cache.get(("gamma", churn))
        if flags is None:
            s_churn, s_tmin, s_tmax, _ = churn
            sig = self._sig_np[:-1]                               # float32, compared as diffusers compares them
            g = min(s_churn / (len(self._sig_host) - 1), 2**0.5 - 1)
            gamma = np.where((s_tmin <= sig) & (sig <= s_tmax), g, 0.0).astype(np.float64)
            pos = gamma > 0
            flags = self._host_cache[("gamma", churn)] = (np.append(gamma, 0.0), bool(pos.any()),
                                                          bool(pos.all()) and bool(pos.size))
        return flags

    def _churn(self, key):
        """(σ, σ_next, σ̂, γ, c) per row for churn options ``key`` = (s_churn, s_tmin, s_tmax, s_noise)."""
        sig, nxt = self._sig64()
        sig32 = self._sig_host[:-1]
        gamma = torch.from_numpy(self._churn_flags(key)[0][:-1].copy())
        sig_hat = (sig32 * (gamma + 1).to(torch.float32)).to(_F64)          # float32 as diffusers rounds σ̂
        sig_hat = torch.where(gamma > 0, sig_hat, sig)
        c = key[3] * torch.sqrt((sig_hat**2 - sig**2).clamp_min(0)) * (gamma > 0)
        return sig, nxt, sig_hat, gamma, c

    def _build_rows(self, key) -> torch.Tensor:
        """The step on the churned sample x̂ = x + c·z: x̂₀ = A·x̂ + B·out = A·x + B·out + (Z0 = A·c)·z and
        prev = x̂ + (x̂ − x̂₀)·r = C1·x + C2·out + (SIGMA = C1·c)·z, one z in both (c = 0 without churn)."""
        _, churn = key
        sig, nxt, sig_hat, gamma, c = self._churn(churn)
        A, B = self._x0_coefficients(sig, sig_hat)
        zero = torch.zeros_like(sig)
        r = (nxt - sig_hat) / sig_hat  # prev = x + (x − x̂₀)·(σ_next − σ̂)/σ̂, x the churned sample
        C1, C2 = 1 + r * (1 - A), -r * B
        return _T.finish_table(A, B, zero, C1, C2, C1 * c, clip=False, Z0=A * c)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        """One Euler step σ → σ_next (diffusers' signature and outputs).

        Args:
            model_output: ε, x₀ or v (``prediction_type``), shaped like ``sample``.
            timestep: one of ``self.timesteps`` (a float or a 0-dim tensor), or a [B] tensor of them (per-sample).
            sample: x at σ (the unscaled sample).
            s_churn / s_tmin / s_tmax / s_noise: churn (γ = min(s_churn / (len(sigmas) − 1), √2 − 1) where
                s_tmin ≤ σ ≤ s_tmax), as diffusers.
            generator: a torch.Generator or a list (exact mode: diffusers' noise); None: fast counter noise.
            return_dict: False returns ``(prev_sample, pred_original_sample)``.
        """
        if type(s_churn) is float and type(s_tmin) is float and type(s_tmax) is float and type(s_noise) is float:
            churn = (s_churn, s_tmin, s_tmax, s_noise)          # the common case (the defaults): no conversions
        else:
            for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError(f"{name} must be a Python number, got {type(v).__name__}")
            churn = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        if s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn}")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        gamma, any_churn, all_churn = self._churn_flags(churn)

        def draw(rows, per_sample):             # exact mode: diffusers draws iff γ > 0 at this step
            if not any_churn or all_churn or self.config.fastrev_fixes:     # fixes: draw at every step, no sync
                return any_churn
            return bool((gamma[self._host_rows(rows, per_sample).numpy()] > 0).any())

        prev, x0 = self._run(model_output, timestep, sample, key=("prev", churn), stochastic=any_churn, draw=draw,
                             noise_shape_dtype=None,
                             generator=generator, x0_noise=any_churn)
        if not return_dict:
            return (prev, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ------------------------------------------------------------------------------------------------ Euler ancestral
class FastEulerAncestralDiscreteScheduler(_SigmaEulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``EulerAncestralDiscreteScheduler`` ("Euler a"): same config (plus ``fastrev_fixes``, no effect here),
    API and numbers, one fused launch per step with the noise generated in the kernel (fast mode) or diffusers' draw
    (exact mode, with a generator)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _stock_cls = EulerAncestralDiscreteScheduler

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        fastrev_fixes: bool = False,
    ) -> None:
        _check_fixes(fastrev_fixes)
        _ops._check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self._init_from_stock(EulerAncestralDiscreteScheduler(
            **_stock_kwargs(EulerAncestralDiscreteScheduler, type(self), self.config)))
        self._after_init()

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' ``set_timesteps`` (spacing from the config)."""
        super().set_timesteps(num_inference_steps, device=device)

    def _build_rows(self, key) -> torch.Tensor:
        sig, nxt = self._sig64()
        A, B = self._x0_coefficients(sig, sig)
        up = torch.sqrt(nxt**2 * (sig**2 - nxt**2) / sig**2)
        down = nxt**2 / sig                         # √(σ_next² − σ_up²) = σ_next²/σ, without the cancellation
        r = (down - sig) / sig                      # prev = x + (x − x̂₀)/σ·(σ_down − σ) + σ_up·z
        zero = torch.zeros_like(sig)
        return _T.finish_table(A, B, zero, 1 + r * (1 - A), -r * B, up, clip=False)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One ancestral Euler step σ → σ_down, plus σ_up·z (diffusers' signature and outputs).

        Args:
            model_output: ε or v (``prediction_type``; "sample" raises NotImplementedError, as diffusers).
            timestep: one of ``self.timesteps``, or a [B] tensor of them (per-sample).
            sample: x at σ.
            generator: exact mode (diffusers' noise, drawn at every step); None: fast counter noise in the kernel.
            return_dict: False returns ``(prev_sample, pred_original_sample)``.
        """
        if self.config.prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        prev, x0 = self._run(model_output, timestep, sample, key=("ancestral",), stochastic=True,
                             draw=lambda rows, per_sample: True,
                             noise_shape_dtype=None,
                             generator=generator)
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ------------------------------------------------------------------------------------------------ flow matching
class FastFlowMatchEulerDiscreteScheduler(_FastEulerBase, SchedulerMixin, ConfigMixin):
    """Drop-in ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, LTX-Video, HunyuanVideo): same config (plus
    ``fastrev_fixes``), API and numbers; x + (σ_next − σ)·v, or with ``stochastic_sampling``
    (1 − σ_next)·(x − σ·v) + σ_next·z, as one fused launch. ``fastrev_fixes=True`` applies the shift once in the
    default ``set_timesteps`` path (diffusers#13243).
    """

    # diffusers' class lists itself through `compatibles` (its own name); this one lists diffusers' class the same way
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    _stock_cls = FlowMatchEulerDiscreteScheduler
    _has_x0 = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        fastrev_fixes: bool = False,
    ):
        _check_fixes(fastrev_fixes)
        self._init_from_stock(FlowMatchEulerDiscreteScheduler(
            **_stock_kwargs(FlowMatchEulerDiscreteScheduler, type(self), self.config)))
        self.sigma_min = self._stock.sigma_min
        self.sigma_max = self._stock.sigma_max

    @property
    def shift(self):
        """The shift applied by ``set_timesteps`` (the config's, or the last :meth:`set_shift`)."""
        return self._stock.shift

    def set_shift(self, shift: float):
        """Set the shift used by the next ``set_timesteps``."""
        self._stock.set_shift(shift)

    scale_noise = FlowMatchEulerDiscreteScheduler.scale_noise
    index_for_timestep = FlowMatchEulerDiscreteScheduler.index_for_timestep
    _sigma_to_t = FlowMatchEulerDiscreteScheduler._sigma_to_t
    time_shift = FlowMatchEulerDiscreteScheduler.time_shift
    _time_shift_exponential = FlowMatchEulerDiscreteScheduler._time_shift_exponential
    _time_shift_linear = FlowMatchEulerDiscreteScheduler._time_shift_linear
    stretch_shift_to_terminal = FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal
    _convert_to_karras = FlowMatchEulerDiscreteScheduler._convert_to_karras
    _convert_to_exponential = FlowMatchEulerDiscreteScheduler._convert_to_exponential
    _convert_to_beta = FlowMatchEulerDiscreteScheduler._convert_to_beta

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """diffusers' ``set_timesteps`` (shift, dynamic shifting with ``mu``, shift_terminal, Karras / exponential /
        beta sigmas, invert_sigmas, custom sigmas / timesteps), run by the internal diffusers scheduler. With
        ``fastrev_fixes`` the default path starts from the unshifted σ range so the shift is applied once."""
        st = self._stock
        saved = st.sigma_min, st.sigma_max
        if self.config.fastrev_fixes and not self.config.use_dynamic_shifting:
            N = self.config.num_train_timesteps
            st.sigma_min, st.sigma_max = 1.0 / N, 1.0       # the unshifted ends of linspace(1, N, N) / N
        try:
            st.set_timesteps(num_inference_steps, device=None, sigmas=sigmas, mu=mu, timesteps=timesteps)
        finally:
            st.sigma_min, st.sigma_max = saved
        self._copy_chain_from_stock(device)
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self.sigmas = self.sigmas.to(device)
            self._ts_dev(torch.device(device))

    def _build_rows(self, key) -> torch.Tensor:
        sig, nxt = self._sig64()
        zero, one = torch.zeros_like(sig), torch.ones_like(sig)
        if self.config.stochastic_sampling:          # x̂₀ = x − σ·v; prev = (1 − σ_next)·x̂₀ + σ_next·z
            return _T.finish_table(one, -sig, zero, 1 - nxt, -(1 - nxt) * sig, nxt, clip=False)
        dt = (self._sig_host[1:] - self._sig_host[:-1]).to(_F64)      # diffusers' float32 dt
        return _T.finish_table(one, -sig, zero, one, dt, zero, clip=False)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: torch.Tensor | None = None, return_dict: bool = True):
        """One flow-matching Euler step σ → σ_next (diffusers' signature and outputs; ``s_*`` are accepted and unused,
        as in diffusers).

        Args:
            model_output: the velocity v, shaped like ``sample``.
            timestep: one of ``self.timesteps``, or a [B] tensor of them (per-sample).
            sample: x at σ.
            generator: exact mode for ``stochastic_sampling`` (diffusers' float32 draw); None: fast counter noise.
            per_token_timesteps: per-element timesteps (diffusers' eager arithmetic; see the module doc).
            return_dict: False returns ``(prev_sample,)``.
        """
        if per_token_timesteps is not None:
            prev = self._per_token_step(model_output, timestep, sample, generator, per_token_timesteps)
        else:
            st = bool(self.config.stochastic_sampling)
            prev, _ = self._run(model_output, timestep, sample, key=("flow", st), stochastic=st,
                                draw=lambda rows, per_sample: st,
                                noise_shape_dtype=None if generator is None else (sample.shape, torch.float32,
                                                                                  sample.device), generator=generator)
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)

    def _per_token_step(self, model_output, timestep, sample, generator, per_token_timesteps):
        """diffusers' per-token arithmetic, eager (each element has its own σ: not a table row)."""
        self._check_tensors(model_output, sample)
        self._resolve_rows(timestep, sample.shape[0], sample.device, for_step=True)
        sample = sample.to(torch.float32)
        pts = per_token_timesteps / self.config.num_train_timesteps
        sig = self.sigmas.to(pts.device)[:, None, None]
        lower = ((sig < pts[None] - 1e-6) * sig).max(dim=0)[0]
        cur, nxt = pts[..., None], lower[..., None]
        if self.config.stochastic_sampling:
            x0 = sample - cur * model_output
            z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = (1.0 - nxt) * x0 + nxt * z
        else:
            prev = sample + (cur - nxt) * model_output
        self._advance()
        return prev
