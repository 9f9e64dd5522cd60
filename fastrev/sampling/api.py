"""``fastrev.sample`` and ``sample_range`` (its building block for runs split across processes)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..schedule import Schedule
from . import graph as G
from .options import SampleOptions
from .plan import Plan

__all__ = ["sample", "sample_range", "noise_keys", "check_shape", "resolve_options"]

_FIELDS = tuple(f.name for f in dataclasses.fields(SampleOptions))


def noise_keys(num_steps: int, corrector_steps: int = 0) -> dict:
    """The noise-step keys of a run with ``num_steps`` (respaced) steps, as documented in :mod:`fastrev.sampling`:
    a dict with ``"x_T"`` (int), ``"predictor"`` (list, index i → key) and ``"corrector"`` (list of lists,
    [j][i] → key)."""
    n = int(num_steps)
    return {"x_T": n, "predictor": list(range(n)),
            "corrector": [[i + (j + 1) * (n + 1) for i in range(n)] for j in range(int(corrector_steps))]}


def resolve_options(options: Optional[SampleOptions], kwargs: dict) -> SampleOptions:
    """``options`` (or the defaults) with the keyword options in ``kwargs`` replacing its fields, validated."""
    unknown = sorted(set(kwargs) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling option(s) {', '.join(map(repr, unknown))}; the options are "
                        f"{', '.join(_FIELDS)} (fastrev.sampling.SampleOptions)")
    if options is None:
        return SampleOptions(**kwargs)
    if not isinstance(options, SampleOptions):
        raise TypeError(f"options must be a fastrev.sampling.SampleOptions or None, got {type(options).__name__}")
    return options.replace(**kwargs) if kwargs else options


def _resolve_device(model, device) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device string like 'cuda' or 'cpu', "
                             f"got {device!r}") from None
    if isinstance(model, torch.nn.Module):
        for p in list(model.parameters()) + list(model.buffers()):
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_shape(shape):
    if _is_int(shape):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 1 or not all(_is_int(s) for s in shape):
        raise TypeError(f"shape must be a tuple of ints (num_samples, *sample_shape), got {shape!r}")
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must have entries >= 1, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def sample_range(model: Callable, sample_shape, schedule: Schedule, options: Optional[SampleOptions] = None, *,
                 start: int, count: int, **kwargs) -> torch.Tensor:
    """Samples with global indices ``start .. start + count − 1`` ([count, *sample_shape]): the building block of
    :func:`sample` (start = 0) and of runs split across processes (each takes its own range; the union is the
    single-process run, bit for bit on one backend). Options as :func:`sample`."""
    if not isinstance(sample_shape, (tuple, list, torch.Size)):
        raise TypeError(f"sample_shape must be a tuple of ints, got {sample_shape!r}")
    sample_shape = check_shape((1,) + tuple(sample_shape))[1:]
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t) (model(x, t, cond) with conditioning), got "
                        f"{type(model).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastrev.Schedule, got {type(schedule).__name__}")
    opts = resolve_options(options, kwargs)
    if opts.learned and len(sample_shape) < 1:
        raise ValueError(f"variance_type={opts.variance_type!r} needs a channel dimension: shape (N, C, ...)")
    for name, v in (("start", start), ("count", count)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    device = _resolve_device(model, opts.device)
    if opts.cuda_graph and device.type != "cuda":
        G.check_graph_support(device, True)
    plan = Plan(model, sample_shape, schedule, opts, device, start=start, count=count)
    if opts.cuda_graph:
        G.check_graph_support(plan.device, plan.fused)
    result = torch.empty((count,) + sample_shape, dtype=opts.dtype, device=device)
    bs = count if opts.batch_size is None else min(opts.batch_size, count)
    chunks = [(c, min(bs, count - c)) for c in range(0, count, max(bs, 1))]
    bar = None
    if opts.progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError("progress=True needs tqdm: pip install tqdm (or fastrev[progress])") from None
        bar = tqdm(total=len(chunks) * plan.N, desc=f"fastrev {opts.method}", unit="step")
    from ..kernels.reverse_step import device_guard
    try:
        # sampling never needs gradients (a module's parameters would chain an autograd graph through every step),
        # and CUDA work (launches, graph capture streams) must run on the sampling device, not the current one
        with torch.no_grad(), device_guard(device):
            for c, n in chunks:
                result[c:c + n] = G.run_chunk(plan, n, start + c, callback=opts.callback, bar=bar,
                                              cuda_graph=opts.cuda_graph, check_finite=opts.check_finite)
    finally:
        if bar is not None:
            bar.close()
    return result


def sample(model: Callable, shape, schedule: Schedule, options: Optional[SampleOptions] = None,
           **kwargs) -> torch.Tensor:
    """A whole sampling run: ``shape[0]`` samples of shape ``shape[1:]`` from ``model``.

    Each step is the model call plus one fused launch (see :mod:`fastrev.sampling` for the tables, the noise keying
    and what the ODE's second stage and the PC corrector add).

    Args:
        model: ``model(x, t) -> prediction`` with x [B, *shape[1:]] (``dtype``, on ``device``). For the VP methods t
            is int64 [B] *training* timesteps (respaced runs feed the model the steps it was trained on) and the
            output is ε, x₀ or v (``prediction_type``) shaped like x, or with 2C channels for learned variances. For
            ``flow_euler`` t is float32 [B], σ·num_train_timesteps (diffusers' convention), and the output the
            velocity ε − x₀. With ``conditioning`` the model is called as ``model(x, t, cond)`` instead (see
            below); with ``guidance_scale`` on the doubled batch.
        shape: (num_samples, *sample_shape).
        schedule: the :class:`fastrev.Schedule` the model was trained with (``flow_euler`` uses its length only:
            the scale of t and the default number of steps).
        options: a :class:`fastrev.sampling.SampleOptions` (validated once, reusable); keyword options below replace its
            fields. Without it, the keywords alone (the defaults otherwise).

    Keyword options (the fields of :class:`fastrev.sampling.SampleOptions`):
        method: "ddpm" (default; ancestral), "ddim" (DDIM(η)), "sde" (Euler–Maruyama on the reverse VP-SDE), "ode"
            (probability-flow ODE, Heun by default), "pc" (reverse-diffusion predictor + Langevin corrector),
            "euler" / "euler_a" (σ-space Euler / Euler-ancestral, k-diffusion and diffusers conventions),
            "flow_euler" (flow-matching Euler for a velocity model), "dpmpp_2m" / "dpmpp_3m" (DPM-Solver++ 2M / 3M),
            "dpmpp_2m_sde" / "dpmpp_3m_sde" (their SDE variants) or "unipc" (UniPC bh2 with its corrector): the
            multistep ones read earlier x̂₀'s in the same launch (docs/samplers.md).
        num_steps: respace to this many steps (None: as many as the schedule has).
        timestep_spacing: "leading" (default; "trailing" for the multistep methods, which extrapolate x̂₀ in
            λ = log(α/σ) and suffer from a grid that visits t = 0), "linspace", "trailing" or an improved-diffusion
            string ("ddim50", "10,15,20"); not for "flow_euler".
        eta: DDIM's η in [0, 1] (method "ddim" only; default 0).
        prediction_type: "epsilon" (default), "sample" or "v_prediction"; "flow_prediction" (the default and only
            choice) for "flow_euler".
        variance_type: "fixed_small" (default), "fixed_large" (ddpm), "learned" (extra channels are log σ²) or
            "learned_range" (ddpm's variance; with a learned type every method takes the first C output channels).
        clip_sample: clamp x̂₀ to [−1, 1]; ε̂ (the score, the velocity) are then re-derived from the clipped x̂₀.
        seed: int (or int64 tensor) keying the counter-based noise (default 0; see :mod:`fastrev.sampling`).
        batch_size: chunk size (None: all at once). Results do not depend on it.
        device: where to sample (None: the model's device if it is an nn.Module with parameters, else CUDA if
            available, else the CPU).
        dtype: the state's dtype (float16/bfloat16/float32 (default); float64 runs on the reference backend).
        progress: show a tqdm bar (needs tqdm).
        cuda_graph: capture one step (model call(s) + launches) in a CUDA graph per chunk and replay it (CUDA and
            the fused backend only; the model must be capturable: no host syncs). The last ODE step runs outside.
        callback: ``callback(i, t, x, x0)`` after every step: i counts steps from 0, t is the model's timestep (an
            int; a float for "flow_euler"), x the chunk's new state and x0 its x̂₀ prediction (buffers that the next
            step overwrites: clone to keep). With ``batch_size`` below the sample count it is called per chunk.
        snr, corrector_steps: the PC corrector's signal-to-noise ratio (0.16) and Langevin steps per step (1).
        corrector_norms: how the PC corrector sizes its steps: "expected" (default: ‖z‖², ‖s‖² replaced by their
            expectations d and d/(1 − ᾱ), a table) or "sample" (each sample's own norms, score_sde's rule made
            per-sample: a reduction pass; biased in low dimension, see :mod:`fastrev.sampling`).
        ode_solver: "heun" (default) or "euler" (method "ode" only).
        solver_order: UniPC's order, 1, 2 (default) or 3 (method "unipc" only).
        shift: the flow grid's shift (default 1: none), σ = shift·u/(1 + (shift − 1)·u) (method "flow_euler" only).
        backend: one of ``fastrev.ops.BACKENDS``, resolved by ``ops.resolve_backend`` and run by
            ``ops.fused_step``: "auto" (default; the fused kernel on CUDA), "triton" (the kernel; the Triton
            interpreter on CPU), "torch" (the same table update in eager torch) or "reference" (eager, float64).
        check_finite: after every step, check the state for NaN/Inf (a host sync per step) and raise
            ``FloatingPointError`` naming the step where a non-finite value first appeared.
        conditioning: what a conditional model is conditioned on (class labels, prompt embeddings, ...): a tensor
            whose first dimension is num_samples (row j for sample j) or 1 (shared by all samples), moved to the
            sampling device once. The model is then called as ``model(x, t, cond)`` with ``cond`` the rows of the
            chunk's samples (batch-size independent).
        guidance_scale: classifier-free guidance w (a float, or a floating [num_samples] tensor: one scale per
            sample); None (default): no guidance. Needs ``conditioning`` and ``negative_conditioning``. Each model
            evaluation is then ONE call on the doubled batch, ``model(cat([x, x]), cat([t, t]), cat([negative,
            cond]))`` (unconditional half first, as diffusers' pipelines batch it), returning the [2B, ...]
            concatenation; the step uses u + w·(c − u) on the prediction channels (with learned variances the
            conditional half's variance channels), combined by the fused step itself: in the kernel's registers on
            the Triton backend (no separate combine pass; :mod:`fastrev.kernels.guidance`). w = 1 is the
            conditional model; w = 0 the unconditional one. Every evaluation is guided: Heun's second stage
            (``ode``) and the PC corrector too (the per-sample corrector, ``corrector_norms="sample"``, combines the
            halves in its torch reduction pass).
        negative_conditioning: the unconditional (null) conditioning of classifier-free guidance, diffusers'
            ``negative_prompt_embeds`` (the empty prompt's embedding, a null class label, ...): same shape as
            ``conditioning`` after the first dimension, num_samples or 1 rows, same dtype.
        guidance_rescale: φ in [0, 1] (default 0: none) of Lin et al. 2023, as diffusers' ``guidance_rescale``:
            the guided output is scaled per sample by φ·std(c)/std(u + w·(c − u)) + (1 − φ) (a statistics pre-pass
            per step).

    Returns:
        the samples, ``shape``, ``dtype``, on ``device``.
    """
    shape = check_shape(shape)
    return sample_range(model, shape[1:], schedule, options, start=0, count=shape[0], **kwargs)
