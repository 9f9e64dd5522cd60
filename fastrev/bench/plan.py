"""What runs by default on a device (the CLI and the pytest-benchmark suite alike), and the run's environment."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path
from typing import Optional

import torch

from . import registry
from .common import resolve_device
from .loop import LOOP_PROVIDERS

ISSUE_SHAPES = [(1, 4, 64, 64), (16, 4, 64, 64), (16, 3, 256, 256)]     # the CPU plan: drop-in ratios at these
CUDA_SHAPES = [(1, 4, 64, 64), (16, 4, 64, 64), (4, 4, 128, 128), (16, 3, 256, 256), (64, 3, 256, 256)]


def default_plan(device, quick: bool) -> dict:
    """benches, shapes, dtypes, providers, compile_shapes / compile_benches (None: all), loop_shape, loop_providers.

    Compile runs the naive eager step through torch.compile; the drop-in entries' naive step is the ops entries'
    one, so compile is planned for the "ops" entries only. Every registered entry is in the plan."""
    device = resolve_device(device)
    benches = registry.step_benches() + ["loop"]
    ops = [b for b in registry.step_benches() if registry.get(b).group != "drop-in"]
    providers = ["fastrev", "diffusers", "eager", "compile"]
    if device.type == "cuda":   # compile (one compile per case, tens of seconds) where the targets need it
        plan = dict(benches=benches, shapes=[CUDA_SHAPES[0], CUDA_SHAPES[3]] if quick else list(CUDA_SHAPES),
                    dtypes=["float32", "bfloat16"] if quick else ["float32", "bfloat16", "float16"],
                    providers=providers, compile_shapes=[CUDA_SHAPES[0], CUDA_SHAPES[3 if quick else 4]],
                    compile_benches=["ddpm_step", "ddim_step"], loop_shape=(1, 4, 64, 64))
    elif quick:   # CPU, about a minute on 2 cores: torch.compile warm-ups (C++ through gcc) cost seconds each
        plan = dict(benches=benches, shapes=list(ISSUE_SHAPES), dtypes=["float32"], providers=providers,
                    compile_shapes=[ISSUE_SHAPES[0]], compile_benches=["ddpm_step", "ddim_step"],
                    loop_shape=(1, 4, 32, 32))
    else:
        plan = dict(benches=benches, shapes=list(ISSUE_SHAPES), dtypes=["float32", "bfloat16"],
                    providers=providers, compile_shapes=None, compile_benches=ops, loop_shape=(1, 4, 64, 64))
    plan["loop_providers"] = [p for p in LOOP_PROVIDERS if device.type == "cuda" or not p.endswith("+graph")]
    return plan


def env_info(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    else:
        name = platform.processor() or platform.machine()
        label = "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    return {"device": label, "device_name": name, "torch": torch.__version__, "triton": tv, "cpus": os.cpu_count(),
            "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def repo_root() -> Optional[Path]:
    """The fastrev checkout holding the current directory, if any."""
    for d in [Path.cwd(), *Path.cwd().parents]:
        pp = d / "pyproject.toml"
        if pp.is_file() and (d / "bench").is_dir():
            try:
                if 'name = "fastrev"' in pp.read_text():
                    return d
            except OSError:
                pass
    return None


def default_out_dir() -> Path:
    """$FASTREV_BENCH_OUT, else $XDG_CACHE_HOME/fastrev/bench (~/.cache/fastrev/bench): outside any checkout."""
    if os.environ.get("FASTREV_BENCH_OUT"):
        return Path(os.environ["FASTREV_BENCH_OUT"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fastrev" / "bench"
