"""Classifier-free guidance as data for the fused step (host side; the kernel combines in registers).

The model output of a guided step is the [2B, ...] concatenation of the unconditional and the conditional outputs
(unconditional half first, as diffusers' pipelines batch it). The step uses

    out = u + w·(c − u) = g_u·u + g_c·c,     g_u = f·(1 − w),  g_c = f·w

per sample, with w the guidance scale (a float, or a [B] tensor) and f = 1 unless ``guidance_rescale`` φ > 0
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4):

    f = φ·std(c)/std(u + w·(c − u)) + (1 − φ)       (std over each sample's elements, unbiased, as diffusers)

which needs a statistics pre-pass over both halves (one read of each and a temporary of the combination); the step
itself then reads both halves once. Only the first C channels (ε, x₀ or v) are guided; with learned variances the
variance channels come from the conditional half, as diffusers' DeepFloyd IF pipeline takes them.

The fused kernel receives the two halves as views and (g_u, g_c) as a float32 [B, 2] device tensor
(``StepTensors.cond`` / ``StepTensors.guide``); the eager backends combine first (:meth:`Guidance.combine`) and run
the ordinary update on the [B, ...] result.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["Guidance", "split_guided"]


class Guidance(NamedTuple):
    """The two halves of a guided model output and the per-sample coefficients (g_u, g_c)."""
    uncond: torch.Tensor            # model_output[:B]
    cond: torch.Tensor              # model_output[B:]
    coef: torch.Tensor              # [B, 2] (g_u, g_c), float64 for float64 outputs else float32
    channels: int | None            # C when the output also carries variance channels, else None

    def parts(self):
        """(unconditional output, conditional output, conditional variance channels or None): views, no copy."""
        C = self.channels
        if C is None:
            return self.uncond, self.cond, None
        return self.uncond[:, :C], self.cond[:, :C], self.cond[:, C:]

    def combine_output(self) -> torch.Tensor:
        """g_u·u + g_c·c on the guided channels, in float32 (float64 for float64 outputs): [B, C, ...]."""
        u, c, _ = self.parts()
        shape = (u.shape[0],) + (1,) * (u.dim() - 1)
        dt = self.coef.dtype
        return self.coef[:, 0].reshape(shape) * u.to(dt) + self.coef[:, 1].reshape(shape) * c.to(dt)

    def combine(self) -> torch.Tensor:
        """The combined model output [B, ...] for the ordinary (unguided) update: the guided channels, then the
        conditional half's variance channels when there are any."""
        out = self.combine_output()
        _, _, var = self.parts()
        return out if var is None else torch.cat([out, var.to(out.dtype)], dim=1)

    def kernel_guide(self) -> torch.Tensor:
        """(g_u, g_c) as the kernel reads them: float32 [B, 2] contiguous."""
        return self.coef.to(torch.float32).contiguous()


def split_guided(model_output, sample, guidance_scale, guidance_rescale=0.0, learned=False):
    """(the unconditional half, :class:`Guidance`) for a guided step, or (model_output, None) without guidance.

    Validates ``guidance_scale`` (a finite float, or a floating [B] tensor on the sample's device),
    ``guidance_rescale`` (a number in [0, 1]) and the model output's batch (2B). Other checks of the tensors are the
    step's own (a bad tensor is returned unchanged for the step to reject).
    """
    if guidance_scale is None:
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or guidance_rescale:
            raise ValueError(f"guidance_rescale needs guidance_scale (classifier-free guidance), got "
                             f"guidance_rescale={guidance_rescale!r} without it")
        return model_output, None
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
        raise TypeError(f"guidance_rescale must be a number in [0, 1], got {type(guidance_rescale).__name__}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor) or sample.dim() < 1:
        return model_output, None          # the step's own checks name the bad argument
    B = sample.shape[0]
    if model_output.dim() < 1 or model_output.shape[0] != 2 * B:
        got = tuple(model_output.shape)
        raise ValueError(f"with guidance_scale, model_output must be the [2B, ...] concatenation of the unconditional "
                         f"and the conditional outputs (unconditional first): batch {2 * B} for a sample batch of "
                         f"{B}, got shape {got}")
    dt = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    device = model_output.device
    if isinstance(guidance_scale, torch.Tensor):
        if not guidance_scale.is_floating_point():
            raise TypeError(f"guidance_scale tensor must be floating point, got {guidance_scale.dtype}")
        if guidance_scale.shape != (B,):
            raise ValueError(f"guidance_scale tensor must have shape [B] = ({B},) (one scale per sample), got "
                             f"{tuple(guidance_scale.shape)}")
        if guidance_scale.device != device:
            raise ValueError(f"guidance_scale is on {guidance_scale.device} but model_output is on {device}")
        w = guidance_scale.to(dt)
    elif isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a float or a [B] tensor, got {type(guidance_scale).__name__}")
    elif not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    else:
        w = torch.full((B,), float(guidance_scale), dtype=dt, device=device)   # a fill: no host-to-device copy
    C = sample.shape[1] if learned and sample.dim() > 1 else None
    g = Guidance(model_output[:B], model_output[B:], torch.stack([1.0 - w, w], dim=1), C)
    if guidance_rescale > 0:
        g = g._replace(coef=g.coef * _rescale_factor(g, float(guidance_rescale))[:, None])
    return g.uncond, g


def _rescale_factor(g: Guidance, phi: float) -> torch.Tensor:
    """The statistics pre-pass of guidance rescale: f = φ·std(c)/std(g_u·u + g_c·c) + (1 − φ) per sample."""
    _, c, _ = g.parts()
    B = c.shape[0]
    cfg = g.combine_output().reshape(B, -1)
    std_c = c.to(cfg.dtype).reshape(B, -1).std(dim=1)
    return phi * (std_c / cfg.std(dim=1)) + (1.0 - phi)
