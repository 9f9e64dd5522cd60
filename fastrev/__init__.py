"""fastrev: fused reverse-diffusion sampling steps, proven against a float64 reference.

Public API: :class:`Schedule`, :func:`spaced_timesteps`, :func:`ddpm_step`, :func:`ddim_step`, :class:`StepOutput`,
:func:`sample`, :func:`set_device_checks`, and the modules :mod:`fastrev.reference` (the float64 oracle),
:mod:`fastrev.noise` (counter-based noise), :mod:`fastrev.tables` (per-timestep coefficient tables),
:mod:`fastrev.models` (an analytic Gaussian-mixture model). Imported on demand: :mod:`fastrev.diffusers` (drop-in
schedulers; needs diffusers), :mod:`fastrev.distributed` (torchrun), :mod:`fastrev.bench`.
"""

from . import models, noise, reference, tables
from .ops import StepOutput, ddim_step, ddpm_step, set_device_checks
from .samplers import sample
from .schedule import Schedule, spaced_timesteps

__version__ = "0.1.0"

__all__ = ["Schedule", "spaced_timesteps", "ddpm_step", "ddim_step", "StepOutput", "sample", "set_device_checks",
           "noise", "reference", "tables", "models", "__version__"]
