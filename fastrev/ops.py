"""Public ops: one reverse step, DDPM or DDIM, as one coefficient-table update.

Backends — one vocabulary shared by the ops, the samplers and the diffusers drop-ins (:data:`BACKENDS`):

* ``"triton"``: the fused Triton kernel (CUDA, and ROCm through Triton's AMD backend; on CPU tensors only under the
  Triton interpreter, ``TRITON_INTERPRET=1`` set before fastrev is imported — how CI tests it).
* ``"torch"``: the same table update in eager torch, in float32 (float64 only when an input is float64), output in
  the sample's storage dtype; float32 CPU tensors run it as one compiled pass with the counter noise inline
  (:mod:`fastrev._cpu`). Runs on every device torch supports (CPU, MPS, XPU, CUDA), and under autograd.
* ``"reference"``: the explicit float64 oracle, :mod:`fastrev.reference` straight from the schedule (an independent
  path from the coefficient tables), cast to the sample's dtype. Needs float64 on the sample's device (not MPS).
* ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` elsewhere, for float64 inputs and under autograd.

Dtype rule: the output has the sample's dtype; model output, noise and sample may be any mix of float16, bfloat16,
float32 (and float64 on the torch and reference backends); the kernel and the torch backend compute in float32.
Coefficient tables are built once in float64 on the host and cast there (float32 on the device; float64 only for
float64 inputs and the reference): no float64 tensor is created on the sample's device by the float32 paths.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from . import _cpu
from . import noise as _noise
from . import reference as R
from . import tables as T
from .kernels.guidance import split_guided
from .schedule import Schedule

__all__ = ["StepOutput", "ddpm_step", "ddim_step", "BACKENDS", "resolve_timestep", "resolve_backend", "table_dtype",
           "draw_seed", "fused_step", "set_device_checks"]

BACKENDS = ("auto", "triton", "torch", "reference")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class StepOutput(NamedTuple):
    """``prev_sample`` is x_{t−1}; ``pred_original_sample`` is x̂₀ (None when not requested)."""
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor]


# ------------------------------------------------------------------------------------------------ validation
def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_float_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")


def _check_positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")


_CHECK_DEVICE_TIMESTEPS = False


def set_device_checks(enabled: bool = True) -> bool:
    """Opt in (or out) of validating timesteps that live on an accelerator. Off by default: the check reads the
    values back to the host (a synchronisation), which a sync-free / CUDA-graph step must not do. Python ints and
    CPU tensors are always checked. Returns the previous setting."""
    global _CHECK_DEVICE_TIMESTEPS
    prev, _CHECK_DEVICE_TIMESTEPS = _CHECK_DEVICE_TIMESTEPS, bool(enabled)
    return prev


def resolve_timestep(timestep, B: int, num_timesteps: int, device) -> torch.Tensor:
    """``timestep`` (int, 0-dim or [B] int tensor) → int64 [B] on ``device``. Range-checked on the host when it is
    a Python int or a CPU tensor; a device tensor is used as is (no host sync) unless :func:`set_device_checks`."""
    if isinstance(timestep, bool):
        raise TypeError("timestep must be an int or an integer tensor, got bool")
    if isinstance(timestep, int):
        if not 0 <= timestep < num_timesteps:
            raise ValueError(f"timestep must be in [0, {num_timesteps}), got {timestep}")
        return torch.full((B,), timestep, dtype=torch.int64, device=device)
    if not isinstance(timestep, torch.Tensor):
        if isinstance(timestep, np.integer):
            return resolve_timestep(int(timestep), B, num_timesteps, device)
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
    if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
        raise TypeError(f"timestep must have an integer dtype, got {timestep.dtype}")
    if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, B)):
        raise ValueError(f"timestep must be a scalar or have shape [{B}] (one step per sample), "
                         f"got shape {tuple(timestep.shape)}")
    if (timestep.device.type == "cpu" or _CHECK_DEVICE_TIMESTEPS) and timestep.numel():
        lo, hi = int(timestep.min()), int(timestep.max())
        if lo < 0 or hi >= num_timesteps:
            raise ValueError(f"timestep must be in [0, {num_timesteps}), got values in [{lo}, {hi}]")
    if timestep.device.type == "cpu" and torch.device(device).type == "cuda":
        _check_not_capturing("a CPU timestep tensor (a host-to-device copy)")
    t = timestep.to(device=device, dtype=torch.int64, non_blocking=True)
    return t.reshape(-1).expand(B).contiguous() if t.numel() != B or t.dim() != 1 else t.contiguous()


def resolve_backend(backend: str, device, *, any_f64: bool = False, needs_grad: bool = False) -> str:
    """"triton", "torch" or "reference" for a backend name of :data:`BACKENDS` on ``device``.

    "auto" is the kernel on CUDA unless float64 or autograd asks for the torch update, and the torch update (float32)
    everywhere else. An explicit "triton" raises a clear error on a CPU without ``TRITON_INTERPRET=1``, on other
    devices, and for float64; with autograd it falls back to the differentiable torch update. "torch" and
    "reference" are returned as they are. Shared by the ops, the samplers and the diffusers drop-ins.
    """
    if backend == "auto":
        if not any_f64 and not needs_grad and torch.device(device).type == "cuda":
            return "triton"
        return "torch"
    if backend == "torch" or backend == "reference":
        return backend
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    from .kernels import reverse_step as K
    if device.type == "cpu" and not K.INTERPRET:
        raise RuntimeError("backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before importing fastrev, or use backend='torch' / 'auto'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' supports CUDA (and CPU under TRITON_INTERPRET=1), got {device}; "
                         "use backend='torch' / 'auto'")
    if any_f64:
        raise TypeError("backend='triton' computes in float32; float64 tensors need backend='torch' or 'reference' "
                        "(or 'auto', which picks 'torch')")
    return "torch" if needs_grad else "triton"


def table_dtype(backend: str, any_f64: bool = False) -> torch.dtype:
    """The dtype of the device coefficient table :func:`fused_step` wants for a resolved ``backend``: float32 for
    "triton" and "torch" (float64 for "torch" only when an input is float64), float64 for "reference"."""
    if backend == "reference" or (backend == "torch" and any_f64):
        return torch.float64
    return torch.float32


_SEEDS: dict = {}


def _int_seed(seed, device) -> torch.Tensor:
    """An int seed as a device tensor, cached (never written): a loop passing ``seed=0`` does not pay a host-to-device
    copy per step. Pass an int64 device tensor to change the seed inside a captured CUDA graph."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return _noise.as_seed_tensor(seed, device)          # raises the clear TypeError
    key = (seed, torch.device(device))
    t = _SEEDS.get(key)
    if t is None:              # never evicted (8 bytes each): a captured graph may still read it
        _check_not_capturing("an int seed seen for the first time (a host-to-device copy)")
        t = _SEEDS[key] = _noise.as_seed_tensor(seed, device)
    return t


def _check_not_capturing(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"cannot capture a step in a CUDA graph with {what}: pass seed= (and timestep=) as int64 "
                         "device tensors, run the step once before capturing, and update them between replays")


def _check_not_terminal(timestep, t, last):
    """Zero-terminal-SNR schedules have ᾱ = 0 at the last step, where x̂₀ = (x − ε)/√ᾱ is undefined for
    ε-prediction (checked where the timestep is known on the host, or with device checks on)."""
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu":
        hit = bool((timestep == last).any())                       # the host copy: no device sync
    elif isinstance(timestep, torch.Tensor):
        hit = _CHECK_DEVICE_TIMESTEPS and bool((t == last).any())  # opt-in: reads the device back
    else:
        hit = int(timestep) == last
    if hit and t.numel():
        raise ValueError(f"prediction_type='epsilon' is undefined at timestep {last}: this schedule has zero terminal "
                         "SNR (ᾱ = 0 there, x̂₀ = (x − √(1−ᾱ) ε)/√ᾱ divides by 0); use 'v_prediction' or 'sample', "
                         "or start sampling one step later")


def draw_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    """A seed in [0, 2⁶²) drawn from ``generator`` (or torch's default generator), as an int64 [1] tensor on ``device``
    (drawn on the generator's device: no host sync for a CUDA generator)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    s = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return s.to(device, non_blocking=True)


_per_sample_contiguous = _cpu.per_sample_contiguous      # contiguous within each sample, any batch stride


def _flat_view(x: torch.Tensor) -> torch.Tensor:
    """The tensor itself if the kernel can read it in place, else an explicit contiguous copy (documented: a
    layout the kernel's [B, N] view cannot express, e.g. channels_last or a transposed view)."""
    return x if _per_sample_contiguous(x) else x.contiguous()


# ------------------------------------------------------------------------------------------------ the op
def _step(kind, model_output, timestep, sample, schedule, *, prediction_type, variance_type, clip_sample,
          clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value, noise, seed,
          sample_offset, generator, out, backend, return_x0, eta=0.0, use_clipped_model_output=False, guidance=None):
    # ---- validation (every message names the argument and the expectation)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastrev.Schedule, got {type(schedule).__name__}")
    _check_float_tensor("sample", sample)
    _check_float_tensor("model_output", model_output)
    _check_choice("prediction_type", prediction_type, R.PREDICTION_TYPES)
    _check_choice("variance_type", variance_type, R.VARIANCE_TYPES)
    _check_choice("backend", backend, BACKENDS)
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension (shape [B, ...]), got a 0-dim tensor")
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
    learned = variance_type in ("learned", "learned_range")
    if learned:
        if sample.dim() < 2:
            raise ValueError(f"variance_type={variance_type!r} needs a channel dimension: sample [B, C, ...]")
        want = (sample.shape[0], 2 * sample.shape[1]) + tuple(sample.shape[2:])
        if tuple(model_output.shape) != want:
            raise ValueError(f"model_output must have shape {want} (2C channels: output then variance values) for "
                             f"variance_type={variance_type!r}, got {tuple(model_output.shape)}")
    elif model_output.shape != sample.shape:
        raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)}, "
                         f"got {tuple(model_output.shape)}")
    if clip_sample:
        _check_positive("clip_sample_range", clip_sample_range)
    if thresholding:
        if not (isinstance(dynamic_thresholding_ratio, (int, float)) and 0 < dynamic_thresholding_ratio <= 1):
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
        _check_positive("sample_max_value", sample_max_value)
    if kind == "ddim":
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"eta must be a number, got {type(eta).__name__}")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1] (DDIM needs 1 − ᾱ_prev − σ² >= 0), got {eta}")
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
    if noise is not None:
        _check_float_tensor("noise", noise)
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
        if noise.device != sample.device:
            raise ValueError(f"noise is on {noise.device} but sample is on {sample.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != sample.shape or out.dtype != sample.dtype or out.device != sample.device:
            raise ValueError(f"out must match sample (shape {tuple(sample.shape)}, {sample.dtype}, {sample.device}), "
                             f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    B = sample.shape[0]
    device = sample.device
    t = resolve_timestep(timestep, B, schedule.num_timesteps, device)
    if prediction_type == "epsilon" and schedule.zero_terminal_snr:
        _check_not_terminal(timestep, t, schedule.num_timesteps - 1)
    stochastic = kind == "ddpm" or eta > 0
    clip = bool(thresholding or clip_sample)

    # ---- backend
    needs_grad = torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad)
    any_f64 = torch.float64 in (sample.dtype, model_output.dtype) or (
        noise is not None and noise.dtype == torch.float64)
    backend = resolve_backend(backend, device, any_f64=any_f64, needs_grad=needs_grad)
    if guidance is not None and backend != "triton":     # eager paths: combine the halves, then the ordinary update
        model_output, guidance = guidance.combine(), None

    # ---- noise source (the counter stream unless a tensor is given)
    seed_t = None
    if stochastic and noise is None:
        if seed is None:
            if device.type == "cuda":
                _check_not_capturing("no seed (a seed drawn from a generator would be frozen into the graph)")
            seed_t = draw_seed(generator, device)
        elif isinstance(seed, torch.Tensor):
            seed_t = _noise.as_seed_tensor(seed, device)
        else:
            seed_t = _int_seed(seed, device)

    if backend == "reference":
        prev, x0 = _reference_step(kind, model_output, t, sample, schedule, prediction_type, variance_type,
                                   clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                   sample_max_value, noise, seed_t, sample_offset, stochastic, eta,
                                   use_clipped_model_output, learned)
        prev = prev.to(sample.dtype)
        if out is not None:
            out.copy_(prev)
            prev = out
        return StepOutput(prev, x0.to(sample.dtype) if return_x0 else None)

    # ---- the table update (kernel or torch)
    if kind == "ddpm":
        key = ("ddpm", prediction_type, variance_type, clip, float(clip_sample_range))
        build = lambda: T.ddpm_table(schedule, prediction_type, variance_type, clip, clip_sample_range)  # noqa: E731
    else:
        key = ("ddim", prediction_type, float(eta), clip, float(clip_sample_range), bool(use_clipped_model_output))
        build = lambda: T.ddim_table(schedule, prediction_type, eta, clip, clip_sample_range,  # noqa: E731
                                     use_clipped_model_output)
    table = T.device_table(schedule, key, build, device, table_dtype(backend, any_f64))
    return fused_step(table, t, sample, model_output, learned=learned, variance_type=variance_type,
                      clip=clip, thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                      sample_max_value=sample_max_value, noise=noise if stochastic else None,
                      seed=seed_t, sample_offset=sample_offset, stochastic=stochastic, out=out, return_x0=return_x0,
                      backend=backend, guidance=guidance)


def fused_step(table, t, sample, model_output, *, learned=False, variance_type="fixed_small", clip=False,
               thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, noise=None, seed=None,
               sample_offset=0, stochastic=True, out=None, return_x0=True, var_mode=None, step=None,
               base=None, backend="triton", guidance=None, history=None, x0_out=None, aux_out=None,
               x0_noise=False) -> StepOutput:
    """One table step, x̂₀ = A·x + B·out [+ Z0·z] (clip/threshold), x_{t−1} = C0·x̂₀ + C1·x + C2·out + Σ_j Dj·h_j + σ·z
    and optionally aux = AX0·x̂₀ + AX·x + Σ_j AHj·h_j (:mod:`fastrev.tables` has the columns), on a resolved backend
    (:func:`resolve_backend`) — the same inputs, the same counter noise on each:

    * ``"triton"``: the fused kernel; ``table`` float32 on the sample's device.
    * ``"torch"``: the same update in eager torch in float32 (float64 when an input is float64), output in the
      sample's dtype; ``table`` float32 on the sample's device (:func:`table_dtype`; a float64 table is accepted
      and cast once per table version, never gathered in float64 per step). Plain float32 CPU tensors without
      autograd (per-sample contiguous) run it as one compiled pass (:mod:`fastrev._cpu`); anything else
      (float16/bfloat16, MPS, XPU, autograd) as torch ops (:func:`fastrev.tables.apply_table`).
    * ``"reference"``: the float64 twin (:func:`fastrev.tables.apply_table` in float64) on the float64 table.

    The building block of the ops, the samplers and the diffusers schedulers: a new sampler is a new table.
    ``t``: int64 [B] table rows. ``var_mode`` overrides the variance mode implied by ``variance_type`` (e.g.
    ``tables.VAR_LINEAR``); ``step`` (int64 [B]) is the noise step of the counter stream when it differs from the
    row ``t``; ``history``: the solver history, a tuple of 0–4 tensors (h_0..h_3) shaped like ``sample`` with
    table columns D0..D3 (and AH0..AH3 in aux), read in the same pass (on "triton" the launch is compiled for that
    many: never a per-step value); ``base=h`` is the same as ``history=(h,)`` (column D = D0; give one or the
    other). ``seed``: int64 [1] device tensor (counter noise when ``noise`` is None and ``stochastic``).
    ``guidance``: a :class:`fastrev.kernels.guidance.Guidance` (then ``model_output`` is its unconditional half),
    combined in the kernel.

    ``x0_out``: a tensor shaped like ``sample`` (same device, any float dtype) that x̂₀ is written into and returned
    as ``pred_original_sample`` (``return_x0`` is then implied): a multistep solver double-buffers its x̂₀ history
    with no copies. ``aux_out``: likewise, written with aux (e.g. UniPC's corrected sample, or ε̂ for an
    ε-history); the caller keeps it (StepOutput is unchanged). Neither may overlap a tensor read in the same pass
    (sample, model_output, noise, the history) nor ``out`` or each other (ValueError). ``x0_noise``: add Z0·z to x̂₀
    before the clip — the same z as x_{t−1}'s (Euler's churn); needs a stochastic step, not with thresholding.
    On "triton", aux and x0_noise are compile-time properties of the launch (AUX, X0_NOISE), as the history length.

    Light validation only (the public ops validate the rest): the history's form, x0_out/aux_out's shape, device
    and aliasing, and x0_noise's conditions are checked here.
    """
    hist = T.history_tuple(base, history)
    if x0_noise and thresholding:
        raise ValueError("x0_noise cannot be combined with thresholding: the threshold's quantile pre-pass does not "
                         "see the noise added to x̂₀")
    if x0_noise and not stochastic:
        raise ValueError("x0_noise=True needs a stochastic step (stochastic=True: a noise tensor or the counter "
                         "stream), got stochastic=False")
    _check_extra_outputs(sample, x0_out, aux_out, out, (sample, model_output, noise, *hist) + (
        guidance.parts() if guidance is not None else ()))
    if x0_out is not None:
        return_x0 = True
    if guidance is not None and backend != "triton":
        model_output, guidance = guidance.combine(), None
    if var_mode is None:   # the variance channels only count when the output carries them (learned=True)
        var_mode = T.VAR_MODES[variance_type] if learned else T.VAR_FIXED
    extra = dict(x0_out=x0_out, aux_out=aux_out, x0_noise=bool(x0_noise))
    if backend == "torch":
        return _table_step_torch(table, t, sample, model_output, learned=learned, var_mode=var_mode, clip=clip,
                                 thresholding=thresholding, ratio=dynamic_thresholding_ratio,
                                 max_value=sample_max_value, noise=noise, seed=seed, sample_offset=sample_offset,
                                 stochastic=stochastic, out=out, return_x0=return_x0, step=step, hist=hist, **extra)
    if backend == "reference":
        return _table_step_reference(table, t, sample, model_output, learned=learned, var_mode=var_mode, clip=clip,
                                     thresholding=thresholding, ratio=dynamic_thresholding_ratio,
                                     max_value=sample_max_value, noise=noise, seed=seed, sample_offset=sample_offset,
                                     stochastic=stochastic, out=out, return_x0=return_x0, step=step, hist=hist,
                                     **extra)
    from .kernels import reverse_step as K
    t = t.contiguous()                       # free when it already is (the kernel reads t[b] at b)
    if step is not None:
        step = step.contiguous()
    C = sample.shape[1] if sample.dim() > 1 else 0
    x = _flat_view(sample)
    if learned:
        eps_part, var_part = _flat_view(model_output[:, :C]), _flat_view(model_output[:, C:])
    else:
        eps_part, var_part = _flat_view(model_output), None
    cond = guide = None
    if guidance is not None:          # classifier-free guidance: both halves go to the kernel, combined in registers
        eps_u, eps_c, var_c = guidance.parts()
        eps_part, cond, guide = _flat_view(eps_u), _flat_view(eps_c), guidance.kernel_guide()
        var_part = None if var_c is None or not learned else _flat_view(var_c)
    if noise is not None:
        noise_mode, z = K.NOISE_TENSOR, _flat_view(noise)
    elif stochastic:
        noise_mode, z = K.NOISE_PHILOX, None
    else:
        noise_mode, z = K.NOISE_NONE, None
    thresh = None
    if thresholding:
        clip_mode = K.CLIP_THRESHOLD
        thresh = _threshold_scale(table, t, x, eps_part if guidance is None else guidance.combine_output(),
                                  dynamic_thresholding_ratio, sample_max_value)
    else:
        clip_mode = K.CLIP_RANGE if clip else K.CLIP_NONE
    # outputs: write straight into `out` when the kernel can address it (in place over `sample` included); an `out`
    # whose samples overlap in memory (an expanded tensor) goes through copy_, which rejects it like torch does
    N = sample[0].numel() if sample.shape[0] else 0
    prev = out if _addressable(out, N) else _alloc(sample)
    x0 = x0_out if _addressable(x0_out, N) else (_alloc(sample) if return_x0 else None)
    aux = aux_out if _addressable(aux_out, N) else (None if aux_out is None else _alloc(sample))
    hs = tuple(_flat_view(h) for h in hist) + (None,) * (T.MAX_HISTORY - len(hist))
    K.reverse_step(K.StepTensors(x, eps_part, table, t, prev, var=var_part, noise=z, thresh=thresh, step=step,
                                 seed=seed, x0=x0, base=hs[0], cond=cond, guide=guide, h1=hs[1], h2=hs[2],
                                 h3=hs[3], aux=aux),
                   sample_offset=sample_offset, clip_mode=clip_mode, var_mode=var_mode, noise_mode=noise_mode,
                   x0_noise=x0_noise)
    return _deliver(prev, x0, aux, out, x0_out, aux_out)


def _addressable(buf, N: int) -> bool:
    """``buf`` can be written by the kernel in place: per-sample contiguous, samples not overlapping."""
    return buf is not None and _per_sample_contiguous(buf) and (buf.shape[0] <= 1 or buf.stride(0) >= N)


def _deliver(prev, x0, aux, out, x0_out, aux_out) -> StepOutput:
    """Copy results computed elsewhere into the caller's buffers (``out``, ``x0_out``, ``aux_out``: copy_ rejects an
    expanded buffer as torch does), and return the StepOutput with those buffers in it."""
    if out is not None and prev is not out:
        out.copy_(prev)
        prev = out
    if x0_out is not None and x0 is not x0_out:
        x0_out.copy_(x0)
        x0 = x0_out
    if aux_out is not None and aux is not aux_out:
        aux_out.copy_(aux)
    return StepOutput(prev, x0)


def _byte_span(a: torch.Tensor):
    """(lowest, one past the highest) byte address ``a`` can touch."""
    lo = hi = 0
    for size, stride in zip(a.shape, a.stride(), strict=True):
        ext = (size - 1) * stride
        lo, hi = (lo + ext, hi) if ext < 0 else (lo, hi + ext)
    item = a.element_size()
    return a.data_ptr() + lo * item, a.data_ptr() + (hi + 1) * item


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory. Exact for two per-sample contiguous tensors with one batch stride
    (e.g. the two channel halves of one [B, 2C, ...] buffer do not overlap), conservative (by address range)
    otherwise. No device sync: only the tensors' metadata is read."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (alo, ahi), (blo, bhi) = _byte_span(a), _byte_span(b)
    if not (alo < bhi and blo < ahi):
        return False
    if a.dim() < 1 or b.dim() < 1 or a.shape[0] != b.shape[0] or a.stride(0) != b.stride(0) or a.shape[0] <= 1 or \
            not (_per_sample_contiguous(a) and _per_sample_contiguous(b)):
        return True
    s = a.stride(0) * a.element_size()
    la, lb = a[0].numel() * a.element_size(), b[0].numel() * b.element_size()
    if s < max(la, lb):
        return True
    # sample i of a: [pa + i·s, pa + i·s + la); sample j of b: [pb + j·s, ...): they meet iff −lb < d + k·s < la for
    # some k = j − i with |k| < B, d = pb − pa
    d, B = b.data_ptr() - a.data_ptr(), a.shape[0]
    k_lo = max(-(B - 1), (-lb - d) // s + 1)
    return k_lo <= B - 1 and d + k_lo * s < la


def _check_extra_outputs(sample, x0_out, aux_out, out, reads) -> None:
    """x0_out / aux_out: tensors shaped like ``sample`` on its device, overlapping no tensor read in the same pass,
    not ``out``, not each other."""
    writes = []
    tracing = torch.compiler.is_compiling()         # fake tensors have no addresses: the checks run eagerly
    for name, buf in (("x0_out", x0_out), ("aux_out", aux_out)):
        if buf is None:
            continue
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
        if buf.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {buf.dtype}")
        if buf.shape != sample.shape or buf.device != sample.device:
            raise ValueError(f"{name} must have the sample's shape {tuple(sample.shape)} on {sample.device}, got "
                             f"shape {tuple(buf.shape)} on {buf.device}")
        if tracing:
            continue
        for r in reads:
            if r is not None and _overlap(buf, r):
                raise ValueError(f"{name} overlaps a tensor read in the same pass (sample, model_output, noise or "
                                 "the history): give a buffer that is not read by this step (double-buffer it)")
        for other_name, other in writes + [("out", out)]:
            if other is not None and _overlap(buf, other):
                raise ValueError(f"{name} overlaps {other_name}: each output needs its own buffer")
        writes.append((name, buf))


def _f32_table(table: torch.Tensor) -> torch.Tensor:
    """``table`` as float32: itself, or a cast copy kept on the table object and redone when the table is rewritten
    (its version counter moves on in-place writes), so a float64 table costs one cast, not a float64 gather per
    step on the device."""
    if table.dtype == torch.float32:
        return table
    entry = getattr(table, "_fastrev_f32", None)
    if entry is None or entry[0] != table._version:
        entry = (table._version, table.to(torch.float32))
        table._fastrev_f32 = entry
    return entry[1]


def _table_step_torch(table, t, sample, model_output, *, learned, var_mode, clip, thresholding, ratio, max_value,
                      noise, seed, sample_offset, stochastic, out, return_x0, step, hist, x0_out=None, aux_out=None,
                      x0_noise=False) -> StepOutput:
    """:func:`fused_step` on the "torch" backend: float32 (float64 when an input is), the sample's dtype out."""
    C = sample.shape[1] if sample.dim() > 1 else 0
    o, var = (model_output[:, :C], model_output[:, C:]) if learned else (model_output, None)
    z = noise if stochastic else None
    if _cpu.eligible(sample, o, var, z, *hist) and t.device.type == "cpu" and not (
            torch.is_grad_enabled() and model_output.requires_grad) and table.device.type == "cpu":
        return _table_step_cpu(table, t, sample, o, var, z, hist, var_mode=var_mode, clip=clip,
                               thresholding=thresholding, ratio=ratio, max_value=max_value, seed=seed,
                               sample_offset=sample_offset, stochastic=stochastic, out=out, return_x0=return_x0,
                               step=step, x0_out=x0_out, aux_out=aux_out, x0_noise=x0_noise)
    f64 = torch.float64
    cd = f64 if f64 in (sample.dtype, model_output.dtype) or (z is not None and z.dtype == f64) or any(
        h.dtype == f64 for h in hist) else torch.float32
    if cd == torch.float32:
        table = _f32_table(table)
    if stochastic and z is None:
        z = _noise.noise_like(sample, seed, t if step is None else step, sample_offset)     # float32
    prev, x0, *aux = T.apply_table(table, t, sample, o, var=var, z=z, history=hist, clip=clip,
                                   thresholding=thresholding, ratio=ratio, max_value=max_value, var_mode=var_mode,
                                   dtype=cd, aux=aux_out is not None, x0_noise=x0_noise)
    return _deliver(prev.to(sample.dtype), x0.to(sample.dtype) if return_x0 else None, aux[0] if aux else None, out,
                    x0_out, aux_out)


_ARANGE: dict = {}


def _sample_index(B: int, offset: int) -> torch.Tensor:
    """int64 [B] CPU tensor offset + arange(B), cached (read-only)."""
    key = (B, offset)
    idx = _ARANGE.get(key)
    if idx is None:
        if len(_ARANGE) > 256:
            _ARANGE.clear()
        idx = _ARANGE[key] = torch.arange(offset, offset + B, dtype=torch.int64)
    return idx


def _table_step_cpu(table, t, sample, o, var, z, hist, *, var_mode, clip, thresholding, ratio, max_value, seed,
                    sample_offset, stochastic, out, return_x0, step, x0_out=None, aux_out=None,
                    x0_noise=False) -> StepOutput:
    """The torch backend's update for float32 CPU tensors: one compiled pass (:func:`fastrev._cpu.table_step`)."""
    coef = _f32_table(table).index_select(0, t)
    thresh = None
    if thresholding:
        B = sample.shape[0]
        shape = (B,) + (1,) * (sample.dim() - 1)
        x0 = coef[:, T.COL["A"]].reshape(shape) * sample + coef[:, T.COL["B"]].reshape(shape) * o
        if x0[0].numel() if B else 0:
            thresh = R.per_sample_quantile(x0.reshape(B, -1).abs(), ratio).clamp(min=1.0, max=max_value)
        else:
            thresh = torch.ones(B, dtype=torch.float32)
    N = sample[0].numel() if sample.shape[0] else 0

    def buffer(buf, wanted=True):       # the caller's buffer when the pass can write it in place, else a new one
        if buf is not None and _cpu.eligible(buf) and _addressable(buf, N):
            return buf
        return torch.empty_like(sample, memory_format=torch.contiguous_format) if wanted or buf is not None else None

    prev, x0, aux = buffer(out), buffer(x0_out, return_x0), buffer(aux_out, False)
    philox = stochastic and z is None
    _cpu.table_step(coef, sample, o, var=var, z=z, history=hist, thresh=thresh, clip=clip, var_mode=var_mode,
                    seed=seed if philox else None,
                    sample_index=_sample_index(sample.shape[0], sample_offset) if philox else None,
                    step=(t if step is None else step.contiguous()) if philox else None,
                    stochastic=stochastic, prev=prev, x0=x0, aux=aux, x0_noise=x0_noise)
    return _deliver(prev, x0, aux, out, x0_out, aux_out)


def _table_step_reference(table, t, sample, model_output, *, learned, var_mode, clip, thresholding, ratio, max_value,
                          noise, seed, sample_offset, stochastic, out, return_x0, step, hist, x0_out=None,
                          aux_out=None, x0_noise=False) -> StepOutput:
    """:func:`fused_step` in eager float64 torch (:func:`fastrev.tables.apply_table`), cast to the sample's dtype."""
    C = sample.shape[1] if sample.dim() > 1 else 0
    o, var = (model_output[:, :C], model_output[:, C:]) if learned else (model_output, None)
    z = None
    if stochastic:
        z = noise if noise is not None else _noise.noise_like(sample, seed, t if step is None else step,
                                                                sample_offset)
    prev, x0, *aux = T.apply_table(table, t, sample, o, var=var, z=z, history=hist, clip=clip,
                                   thresholding=thresholding, ratio=ratio, max_value=max_value, var_mode=var_mode,
                                   dtype=torch.float64, aux=aux_out is not None, x0_noise=x0_noise)
    return _deliver(prev.to(sample.dtype), x0.to(sample.dtype) if return_x0 else None,
                    aux[0].to(sample.dtype) if aux else None, out, x0_out, aux_out)


def _alloc(like: torch.Tensor) -> torch.Tensor:
    """Output buffers of the kernel (tests replace this to poison them with NaN before the launch)."""
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _threshold_scale(table, t, x, out, ratio, max_value):
    """The dynamic-thresholding pre-pass: s_b = clamp(quantile(|x̂₀_b|, ratio), 1, max_value), float32 [B].

    Costs one extra read of x and out (8 B/elem in fp32), a float32 x̂₀ temporary (4 B written + read) and the
    quantile's sort (torch.quantile: a few passes over |x̂₀|): roughly 2–3× the fused step's own traffic.
    """
    B = x.shape[0]
    coef = table[t]                                               # [B, NCOL] gather on the device
    a = coef[:, T.COL["A"]].reshape((B,) + (1,) * (x.dim() - 1))
    b = coef[:, T.COL["B"]].reshape((B,) + (1,) * (x.dim() - 1))
    x0 = (a * x.float() + b * out.float()).reshape(B, -1)
    if x0.shape[1] == 0:
        return torch.ones(B, dtype=torch.float32, device=x.device)
    return R.per_sample_quantile(x0.abs(), ratio).clamp(min=1.0, max=max_value).float().contiguous()


def _reference_step(kind, model_output, t, sample, schedule, prediction_type, variance_type, clip_sample,
                    clip_sample_range, thresholding, ratio, max_value, noise, seed_t, sample_offset, stochastic,
                    eta, use_clipped_model_output, learned):
    dev = sample.device
    f64 = torch.float64
    ab = schedule.device_tensor("alpha_bars", dev)
    betas = schedule.device_tensor("betas", dev)
    x = sample.to(f64)
    o = model_output.to(f64)
    var_values = None
    if learned:
        C = sample.shape[1]
        o, var_values = o[:, :C], o[:, C:]
    if stochastic:
        if noise is None:
            z = _noise.noise_like(sample, seed_t, t, sample_offset).to(f64)
        else:
            z = noise.to(f64)
    else:
        z = None
    threshold = (ratio, max_value) if thresholding else None
    clip_range = clip_sample_range if clip_sample else None
    if kind == "ddpm":
        return R.ddpm_step(x, t, o, ab, betas, prediction_type=prediction_type, variance_type=variance_type,
                           model_var_values=var_values, clip_range=clip_range, threshold=threshold, noise=z)
    return R.ddim_step(x, t, o, ab, eta=eta, prediction_type=prediction_type, clip_range=clip_range,
                       threshold=threshold, use_clipped_model_output=use_clipped_model_output, noise=z)


_DOC_ARGS = """
    Args:
        model_output: the model's output for ``sample`` at ``timestep``: ε, x₀ or v (``prediction_type``), with
            2C channels (output, then variance values) for learned variances.
        timestep: schedule index t: an int, a 0-dim tensor or a [B] int tensor (per-sample steps).
        sample: x_t, [B, ...].
        schedule: a :class:`fastrev.Schedule` (respace it for fewer steps).
        clip_sample / clip_sample_range: clamp x̂₀ to ±range. thresholding / dynamic_thresholding_ratio /
            sample_max_value: Imagen's dynamic thresholding (diffusers semantics; takes precedence over clipping).
        noise: z, shaped like sample; else the counter stream of ``seed`` (an int or an int64 device tensor) for
            samples ``sample_offset + arange(B)`` at step t (:mod:`fastrev.noise`); else a seed drawn from
            ``generator`` (or torch's default generator).
        out: where to write x_{t−1} (may be ``sample`` itself: in place).
        backend: "auto" (triton on CUDA, torch elsewhere), "triton" (the fused kernel), "torch" (the same table
            update in eager float32 torch), "reference" (the float64 oracle); see the module doc.
        return_x0: also write x̂₀ (16 B/elem in fp32 instead of 12).
        guidance_scale: classifier-free guidance w (a float, or a [B] tensor per sample): ``model_output`` is then
            the [2B, ...] concatenation of the unconditional and the conditional outputs (unconditional first), and
            the step uses u + w·(c − u), combined in the kernel's registers (learned variances: the conditional
            half's variance channels). guidance_rescale: φ in [0, 1] of Lin et al. 2023 (a per-sample statistics
            pre-pass). See :mod:`fastrev.kernels.guidance`.
    Returns:
        StepOutput(prev_sample, pred_original_sample)
"""


def ddpm_step(model_output, timestep, sample, schedule, *, prediction_type="epsilon", variance_type="fixed_small",
              clip_sample=False, clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995,
              sample_max_value=1.0, noise=None, seed=None, sample_offset=0, generator=None, out=None,
              backend="auto", return_x0=True, guidance_scale=None, guidance_rescale=0.0) -> StepOutput:
    model_output, guidance = split_guided(model_output, sample, guidance_scale, guidance_rescale,
                                          variance_type in ("learned", "learned_range"))
    return _step("ddpm", model_output, timestep, sample, schedule, prediction_type=prediction_type,
                 variance_type=variance_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                 thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                 sample_max_value=sample_max_value, noise=noise, seed=seed, sample_offset=sample_offset,
                 generator=generator, out=out, backend=backend, return_x0=return_x0, guidance=guidance)


def ddim_step(model_output, timestep, sample, schedule, *, eta=0.0, use_clipped_model_output=False,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, thresholding=False,
              dynamic_thresholding_ratio=0.995, sample_max_value=1.0, noise=None, seed=None, sample_offset=0,
              generator=None, out=None, backend="auto", return_x0=True, guidance_scale=None,
              guidance_rescale=0.0) -> StepOutput:
    model_output, guidance = split_guided(model_output, sample, guidance_scale, guidance_rescale)
    return _step("ddim", model_output, timestep, sample, schedule, prediction_type=prediction_type,
                 variance_type="fixed_small", clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                 thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                 sample_max_value=sample_max_value, noise=noise, seed=seed, sample_offset=sample_offset,
                 generator=generator, out=out, backend=backend, return_x0=return_x0, eta=eta,
                 use_clipped_model_output=use_clipped_model_output, guidance=guidance)


ddpm_step.__doc__ = ("One ancestral DDPM step: x_{t−1} = μ̃_t(x_t, x̂₀) + σ_t z (no noise where t = 0); "
                     "variance_type ∈ fixed_small (β̃), fixed_large (β), learned (log σ² channels), learned_range "
                     "(v ∈ [−1, 1] interpolating log β̃ and log β).\n" + _DOC_ARGS)
ddim_step.__doc__ = ("One DDIM(η) step: x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ²) ε̂ + σ z with "
                     "σ = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}); ε̂ from the raw output, or from the clipped x̂₀ "
                     "with use_clipped_model_output.\n" + _DOC_ARGS)
