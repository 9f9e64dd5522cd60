"""Compatibility home of the samplers: everything lives in :mod:`fastrev.sampling` (see its doc for the methods,
the tables, the noise keys, CUDA graphs and backends); the names below stay importable from here."""

from .sampling import (
    CORRECTOR_NORMS,
    FLOW_METHODS,
    FLOW_PREDICTION,
    METHODS,
    MULTISTEP_METHODS,
    ODE_SOLVERS,
    SAMPLER_BACKENDS,
    VP_METHODS,
    SampleOptions,
    beta_dt,
    dpmpp_table,
    euler_ancestral_table,
    euler_table,
    flow_euler_table,
    flow_sigmas,
    noise_keys,
    ode_euler_table,
    ode_heun_table,
    pc_corrector_table,
    pc_predictor_table,
    sample,
    sample_range,
    sde_table,
    unipc_table,
)
from .sampling.api import check_shape as _check_shape
from .sampling.api import sample_range as _sample_range

__all__ = ["sample", "sample_range", "SampleOptions", "METHODS", "VP_METHODS", "FLOW_METHODS", "FLOW_PREDICTION",
           "MULTISTEP_METHODS", "ODE_SOLVERS", "CORRECTOR_NORMS", "SAMPLER_BACKENDS", "noise_keys", "beta_dt",
           "sde_table", "dpmpp_table", "unipc_table", "ode_euler_table", "ode_heun_table", "pc_corrector_table",
           "pc_predictor_table", "euler_table",
           "euler_ancestral_table", "flow_sigmas", "flow_euler_table", "_check_shape", "_sample_range"]
