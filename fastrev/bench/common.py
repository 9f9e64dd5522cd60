"""Shared vocabulary of the benchmark harness: constants, dtypes, shapes, devices, diffusers' availability."""

from __future__ import annotations

import math
import re

import torch

NUM_TRAIN = 1000          # linear β schedule, 1e-4 .. 0.02 (diffusers' DDPM defaults)
T_STEP = 500              # the training timestep every step benchmark runs at (noise is added: t > 0)
DDIM_STEPS = 50           # DDIM runs on the 50 "leading" steps (diffusers' set_timesteps(50)); 500 is one of them
LOOP_STEPS = 50
SEED = 1234

PROVIDERS = ("fastrev", "eager", "compile", "diffusers")
SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (4, 4, 128, 128), (16, 3, 256, 256), (64, 3, 256, 256))
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "f16": "float16", "half": "float16"}


class Unavailable(RuntimeError):
    """A provider that cannot run here (missing package, no CUDA, no counterpart for this step): reported, never
    fatal."""


def to_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = _DTYPE_ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or fp32/bf16/fp16), got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    return str(to_dtype(dtype)).replace("torch.", "")


def parse_shape(s) -> tuple:
    """``"1x4x64x64"`` (or ``×``/``,`` separated, or a tuple) → ``(1, 4, 64, 64)``."""
    if isinstance(s, (tuple, list)):
        return tuple(int(v) for v in s)
    parts = re.split(r"[x×,]", str(s).strip().lower())
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        raise ValueError(f"shape must look like 1x4x64x64, got {s!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be B×C×H×W with positive sizes (like 1x4x64x64), got {s!r}")
    return shape


def shape_label(shape) -> str:
    return "x".join(str(v) for v in shape)


def numel(shape) -> int:
    return math.prod(parse_shape(shape))


def resolve_device(device) -> torch.device:
    """``"auto"``/None → cuda if present, else cpu. Raises ValueError for a device this harness cannot use."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device}")
    return d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffusers_available() -> tuple:
    """(True, version) or (False, why)."""
    try:
        import diffusers
        from diffusers import DDIMScheduler, DDPMScheduler  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"diffusers not importable ({type(e).__name__}: {e})".strip()
    return True, getattr(diffusers, "__version__", "?")


def require_diffusers():
    ok, why = diffusers_available()
    if not ok:
        raise Unavailable(why)
    import diffusers
    return diffusers
