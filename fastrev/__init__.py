"""fastrev: fused reverse-diffusion sampling steps, proven against a float64 reference.

Public API: :class:`Schedule`, :func:`spaced_timesteps`, :func:`ddpm_step`, :func:`ddim_step`, :class:`StepOutput`,
and the modules :mod:`fastrev.reference` (the float64 oracle), :mod:`fastrev.noise` (counter-based noise) and
:mod:`fastrev.tables` (per-timestep coefficient tables).
"""

from . import noise, reference, tables
from .ops import StepOutput, ddim_step, ddpm_step
from .schedule import Schedule, spaced_timesteps

__version__ = "0.1.0"

__all__ = ["Schedule", "spaced_timesteps", "ddpm_step", "ddim_step", "StepOutput", "noise", "reference", "tables",
           "__version__"]
