"""The options of a sampling run, as one frozen, validated value: :class:`SampleOptions`.

Every check that needs neither the model nor the schedule happens here, once, when the object is built; method-
specific defaults (``None`` fields) are resolved here too, so the rest of the sampler reads plain values. The checks
that need the schedule (``num_steps`` against its length, zero terminal SNR) live with the grid
(:mod:`fastrev.sampling.plan`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from .. import ops
from ..ops import _check_choice as _choice
from ..reference import PREDICTION_TYPES, VARIANCE_TYPES
from ..schedule import TIMESTEP_SPACINGS

__all__ = ["SampleOptions", "METHODS", "VP_METHODS", "FLOW_METHODS", "MULTISTEP_METHODS", "CORRECTOR_NORMS",
           "ODE_SOLVERS", "SAMPLER_BACKENDS", "FLOW_PREDICTION", "DTYPES", "UNIPC_ORDERS"]

MULTISTEP_METHODS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc")
"""The multistep solvers (DPM-Solver++ 2M / 3M and their SDE variants, UniPC bh2): one launch per step that reads
earlier x̂₀'s in the same pass (:mod:`fastrev.sampling.multistep`)."""
VP_METHODS = ("ddpm", "ddim", "sde", "ode", "pc", "euler", "euler_a") + MULTISTEP_METHODS
"""Methods for a model of the VP (DDPM) forward process x_t = √ᾱ x₀ + √(1 − ᾱ) ε, fed int training timesteps."""
FLOW_METHODS = ("flow_euler",)
"""Methods for a velocity model of the rectified-flow path x_σ = (1 − σ) x₀ + σ ε, fed float timesteps σ·N."""
METHODS = VP_METHODS + FLOW_METHODS
CORRECTOR_NORMS = ("expected", "sample")
ODE_SOLVERS = ("heun", "euler")
SAMPLER_BACKENDS = ops.BACKENDS                 # one vocabulary: exactly the ops' backends
FLOW_PREDICTION = "flow_prediction"             # diffusers' name for a velocity (ε − x₀) output
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_SNR = 0.16
DEFAULT_CORRECTOR_STEPS = 1
UNIPC_ORDERS = (1, 2, 3)
DEFAULT_UNIPC_ORDER = 2


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _only_for(name, value, method, methods):
    if value is not None and method not in methods:
        allowed = " or ".join(f"method={m!r}" for m in methods)
        raise ValueError(f"{name} only applies to {allowed}, got {name}={value!r} with method={method!r}")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How to sample: every option of :func:`fastrev.sample` but the model, the shape and the schedule.

    Built once and validated on construction (``TypeError``/``ValueError`` naming the option); fields left ``None``
    take the method's default here (``prediction_type``, ``timestep_spacing``, ``snr``, ``corrector_steps``,
    ``corrector_norms``, ``ode_solver``, ``shift``, ``solver_order``), so a built object holds the values the run
    uses. Derive a variant with :meth:`replace` (validated again; method defaults the caller left unset are
    re-derived for the new method, which ``dataclasses.replace`` would carry over). See :func:`fastrev.sample` for
    the meaning of each field.
    """

    method: str = "ddpm"
    num_steps: Optional[int] = None
    timestep_spacing: Optional[str] = None
    eta: float = 0.0
    prediction_type: Optional[str] = None
    variance_type: str = "fixed_small"
    clip_sample: bool = False
    seed: object = 0
    batch_size: Optional[int] = None
    device: object = None
    dtype: torch.dtype = torch.float32
    progress: bool = False
    cuda_graph: bool = False
    callback: Optional[Callable] = None
    snr: Optional[float] = None
    corrector_steps: Optional[int] = None
    corrector_norms: Optional[str] = None
    ode_solver: Optional[str] = None
    shift: Optional[float] = None
    solver_order: Optional[int] = None
    backend: str = "auto"
    check_finite: bool = False
    conditioning: Optional[torch.Tensor] = None
    negative_conditioning: Optional[torch.Tensor] = None
    guidance_scale: object = None
    guidance_rescale: float = 0.0

    def __post_init__(self):
        # the values as given (before the method defaults are filled in), for replace()
        object.__setattr__(self, "_given", {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        m = self.method
        _choice("method", m, METHODS)
        flow = m in FLOW_METHODS
        if self.num_steps is not None:
            if not _is_int(self.num_steps):
                raise TypeError(f"num_steps must be an int or None, got {type(self.num_steps).__name__}")
            # its range, [1, the schedule's length], is checked with the schedule (plan.VPGrid / plan.FlowGrid)
        self._timestep_spacing(flow)
        if not _is_number(self.eta):
            raise TypeError(f"eta must be a number, got {type(self.eta).__name__}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta != 0 and m != "ddim":
            raise ValueError(f"eta only applies to method='ddim', got eta={self.eta} with method={m!r}")
        self._set("eta", float(self.eta))
        self._prediction_type(flow)
        _choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.variance_type == "fixed_large" and m != "ddpm":
            raise ValueError(f"variance_type='fixed_large' only applies to method='ddpm' (the other methods fix "
                             f"their own noise), got method={m!r}")
        if self.variance_type in ("learned", "learned_range") and flow:
            raise ValueError(f"variance_type={self.variance_type!r} does not apply to method={m!r} (a deterministic "
                             "flow has no variance to learn)")
        for name in ("clip_sample", "progress", "cuda_graph", "check_finite"):
            _flag(name, getattr(self, name))
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"callback must be callable as callback(i, t, x, x0) or None, got "
                            f"{type(self.callback).__name__}")
        if not (isinstance(self.seed, torch.Tensor) or _is_int(self.seed)):
            raise TypeError(f"seed must be an int or an int64 tensor of one element, got {type(self.seed).__name__}")
        if self.batch_size is not None:
            if not _is_int(self.batch_size):
                raise TypeError(f"batch_size must be an int or None, got {type(self.batch_size).__name__}")
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, torch.float64, "
                            f"got {self.dtype!r}")
        _choice("backend", self.backend, ops.BACKENDS)       # the ops' vocabulary, read at call time
        self._guidance()
        self._pc()
        _only_for("ode_solver", self.ode_solver, m, ("ode",))
        if m == "ode":
            self._set("ode_solver", "heun" if self.ode_solver is None else self.ode_solver)
            _choice("ode_solver", self.ode_solver, ODE_SOLVERS)
        _only_for("solver_order", self.solver_order, m, ("unipc",))
        if m == "unipc":
            order = DEFAULT_UNIPC_ORDER if self.solver_order is None else self.solver_order
            if not _is_int(order):
                raise TypeError(f"solver_order must be an int, got {type(order).__name__}")
            if order not in UNIPC_ORDERS:
                raise ValueError(f"solver_order must be one of {UNIPC_ORDERS} (UniPC's order; history up to "
                                 f"x^c and 3 earlier x̂₀'s), got {order}")
            self._set("solver_order", order)
        _only_for("shift", self.shift, m, FLOW_METHODS)
        if flow:
            shift = 1.0 if self.shift is None else self.shift
            if not _is_number(shift):
                raise TypeError(f"shift must be a number, got {type(shift).__name__}")
            if not (shift > 0 and math.isfinite(shift)):
                raise ValueError(f"shift must be a finite number > 0, got {shift}")
            self._set("shift", float(shift))

    # ----------------------------------------------------------------------------------------- pieces
    def _set(self, name, value):
        object.__setattr__(self, name, value)          # frozen: resolved defaults are written once, here

    def _timestep_spacing(self, flow: bool):
        ts = self.timestep_spacing
        if flow:
            if ts is not None:
                raise ValueError(f"timestep_spacing does not apply to method={self.method!r} (its σ grid is "
                                 f"linspace(1, 0) with an optional shift), got {ts!r}")
            return
        # the multistep solvers extrapolate x̂₀ in λ: a grid that visits t = 0 (λ ≈ 4.6 for the linear schedule)
        # makes the step into it huge against the one before, so their default is "trailing" (as diffusers' grids,
        # which never visit t = 0); the others keep "leading"
        ts = ("trailing" if self.method in MULTISTEP_METHODS else "leading") if ts is None else ts
        if not isinstance(ts, str):
            raise TypeError(f"timestep_spacing must be a str, got {type(ts).__name__}")
        if ts not in TIMESTEP_SPACINGS and not (ts.startswith("ddim") or (ts and set(ts) <= set("0123456789,"))):
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS} or an improved-diffusion section "
                             f"string like 'ddim50' or '10,15,20', got {ts!r}")
        self._set("timestep_spacing", ts)

    def _prediction_type(self, flow: bool):
        pt = self.prediction_type
        if flow:
            pt = FLOW_PREDICTION if pt is None else pt
            _choice("prediction_type", pt, (FLOW_PREDICTION,))
        else:
            pt = "epsilon" if pt is None else pt
            _choice("prediction_type", pt, PREDICTION_TYPES)
        self._set("prediction_type", pt)

    def _pc(self):
        m = self.method
        if m != "pc":
            for name in ("snr", "corrector_steps", "corrector_norms"):
                _only_for(name, getattr(self, name), m, ("pc",))
            return
        snr = DEFAULT_SNR if self.snr is None else self.snr
        steps = DEFAULT_CORRECTOR_STEPS if self.corrector_steps is None else self.corrector_steps
        norms = "expected" if self.corrector_norms is None else self.corrector_norms
        if not _is_number(snr):
            raise TypeError(f"snr must be a number, got {type(snr).__name__}")
        if not (snr > 0 and math.isfinite(snr)):
            raise ValueError(f"snr must be a finite number > 0, got {snr}")
        if not _is_int(steps):
            raise TypeError(f"corrector_steps must be an int, got {type(steps).__name__}")
        if steps < 0:
            raise ValueError(f"corrector_steps must be >= 0, got {steps}")
        _choice("corrector_norms", norms, CORRECTOR_NORMS)
        self._set("snr", snr)
        self._set("corrector_steps", steps)
        self._set("corrector_norms", norms)

    def _guidance(self):
        """Conditioning and classifier-free guidance (shapes against the sample count are checked per run, in
        :class:`fastrev.sampling.plan.Conditioning`)."""
        for name in ("conditioning", "negative_conditioning"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, torch.Tensor) or v.dim() < 1):
                got = f"a {v.dim()}-d tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                raise TypeError(f"{name} must be a tensor with a leading batch dimension (one row per sample, or one "
                                f"row shared by all) or None, got {got}")
        w, phi = self.guidance_scale, self.guidance_rescale
        if isinstance(w, torch.Tensor):
            if not w.is_floating_point() or w.dim() != 1:
                raise TypeError(f"guidance_scale must be a float or a floating [num_samples] tensor (one scale per "
                                f"sample), got a {w.dtype} tensor of shape {tuple(w.shape)}")
        elif w is not None:
            if not _is_number(w):
                raise TypeError(f"guidance_scale must be a float, a floating [num_samples] tensor or None, got "
                                f"{type(w).__name__}")
            if not math.isfinite(w):
                raise ValueError(f"guidance_scale must be finite, got {w!r}")
            self._set("guidance_scale", float(w))
        if not _is_number(phi):
            raise TypeError(f"guidance_rescale must be a number in [0, 1], got {type(phi).__name__}")
        if not 0.0 <= phi <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {phi!r}")
        self._set("guidance_rescale", float(phi))
        if w is None:
            if phi != 0:
                raise ValueError(f"guidance_rescale applies to classifier-free guidance: it needs guidance_scale, "
                                 f"got guidance_rescale={phi!r} without it")
            if self.negative_conditioning is not None:
                raise ValueError("negative_conditioning is the unconditional half of classifier-free guidance: it "
                                 "needs guidance_scale (without guidance the model is called with conditioning alone)")
            return
        for name in ("conditioning", "negative_conditioning"):
            if getattr(self, name) is None:
                raise ValueError(f"guidance_scale needs {name}: each step calls model([x; x], [t; t], "
                                 f"[negative_conditioning; conditioning]) once on the doubled batch")
        c, n = self.conditioning, self.negative_conditioning
        if tuple(c.shape[1:]) != tuple(n.shape[1:]):
            raise ValueError(f"negative_conditioning must match conditioning's shape after the batch dimension (they "
                             f"are concatenated along it): got {tuple(n.shape)} and {tuple(c.shape)}")
        if c.dtype != n.dtype:
            raise TypeError(f"negative_conditioning must have conditioning's dtype (they are concatenated), got "
                            f"{n.dtype} and {c.dtype}")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (``guidance_scale`` given)."""
        return self.guidance_scale is not None

    def replace(self, **changes) -> "SampleOptions":
        """A new validated object with ``changes`` applied to the options as originally given (so switching
        ``method`` re-derives the defaults it depends on)."""
        return SampleOptions(**{**self._given, **changes})

    # ----------------------------------------------------------------------------------------- derived
    @property
    def flow(self) -> bool:
        """True for the methods that integrate the rectified-flow path with a velocity model."""
        return self.method in FLOW_METHODS

    @property
    def learned(self) -> bool:
        """The model's output carries 2C channels (prediction, then variance values)."""
        return self.variance_type in ("learned", "learned_range")

    def table_key(self) -> tuple:
        """The options a method's coefficient tables depend on (the cache key on the grid's schedule)."""
        return (self.method, self.prediction_type, self.variance_type, self.clip_sample, self.eta, self.snr,
                self.ode_solver, self.shift, self.solver_order)
