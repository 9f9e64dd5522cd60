"""Multi-process sampling on torchrun, with results identical to one process.

Every random number fastrev draws is keyed by (seed, *global* sample index, step, element) — see
:mod:`fastrev.noise` — so a sample does not depend on which process computed it or what else was in its batch.
Splitting the samples across ranks by global index, each rank passing its ``start`` as the sample offset, and
gathering them in index order therefore reproduces the single-process run bit for bit (same seed, same device type
and backend; a different batch size or world size changes nothing).

Launch with ``torchrun --nproc-per-node N -m fastrev sample ...`` (the CLI picks this path up from torchrun's
environment) or call :func:`sample` from a script started by torchrun. The process group comes from torchrun's
environment (``env://``): nccl when the ranks sample on CUDA, gloo on CPUs; a timeout on the group turns a dead or
stuck peer into an error instead of a hang.

Memory: rank r holds its own ``count_r ≈ N / world`` samples while sampling (plus the model); with ``gather=True``
(default) every rank then receives all N samples; with ``shard_dir`` each rank also writes its own shard
(``shard-RRRRR-of-WWWWW.pt`` with its ``start``/``count``), which :func:`load_shards` reassembles — use
``gather=False`` with ``shard_dir`` when N samples do not fit one process.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from typing import Optional

import torch
import torch.distributed as dist

from . import samplers

__all__ = ["sample", "shard_range", "load_shards", "world_from_env", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) outside it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"malformed torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"malformed torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def shard_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous share of ``num_samples`` global indices; shares differ by at most one."""
    start = num_samples * rank // world_size
    return start, num_samples * (rank + 1) // world_size - start


def _ensure_group(device: torch.device, timeout_s: float) -> bool:
    """Initialise the default process group from the environment if needed; True if this call created it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {}
    if device.type == "cuda":
        kw["device_id"] = device
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=float(timeout_s)), **kw)
    return True


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


#: options of :func:`fastrev.sample` that may hold one row per sample (or one shared row)
_PER_SAMPLE = ("conditioning", "negative_conditioning", "guidance_scale")


def rank_options(kwargs: dict, num_samples: int, start: int, count: int) -> dict:
    """``kwargs`` for the global samples [start, start + count): the per-sample options (a tensor with one row per
    global sample) sliced to those rows; one shared row and everything else unchanged."""
    out = dict(kwargs)
    for name in _PER_SAMPLE:
        v = out.get(name)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == num_samples and num_samples > 1:
            out[name] = v[start:start + count]
    return out


def sample(model, shape, schedule, *, shard_dir: Optional[str | os.PathLike] = None, gather: bool = True,
           timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> Optional[torch.Tensor]:
    """:func:`fastrev.sample` split across the ranks of a torchrun job (same arguments, plus the ones below).

    Rank r samples the global indices of :func:`shard_range`; the union, in index order, equals the single-process
    result bit for bit. Outside torchrun (WORLD_SIZE unset or 1) this is just :func:`fastrev.sample`.

    Args:
        shard_dir: also write this rank's shard there (``shard-RRRRR-of-WWWWW.pt``: a dict with ``start``,
            ``count``, ``samples``, ``world_size``); reassemble with :func:`load_shards`.
        gather: all-gather the full result on every rank (else return this rank's share only).
        timeout_s: process-group timeout (seconds) when this call creates the group.
    Returns:
        all samples (``gather=True``) or this rank's [count, ...] share.
    """
    shape = samplers._check_shape(shape)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    rank, world, local = world_from_env()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    device = kwargs.pop("device", None)
    device = torch.device(device) if device is not None else _default_device(local)
    if device.type == "cuda" and device.index is None:          # "cuda" (e.g. --device cuda): this rank's GPU
        device = torch.device("cuda", local % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)        # this rank's GPU is the current one (Triton launches on the current)
    if world > 1:
        _ensure_group(device, timeout_s)
    start, count = shard_range(shape[0], rank, world)
    kwargs = rank_options(kwargs, shape[0], start, count)
    if count > 0:
        local_samples = samplers._sample_range(model, shape[1:], schedule, start=start, count=count, device=device,
                                               **kwargs)
    else:   # more ranks than samples: nothing to do here, but the collectives below still need this rank
        local_samples = torch.empty((0,) + shape[1:], dtype=kwargs.get("dtype", torch.float32), device=device)
    if shard_dir is not None:
        d = pathlib.Path(shard_dir)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"start": start, "count": count, "world_size": world, "samples": local_samples.cpu()},
                   d / f"shard-{rank:05d}-of-{world:05d}.pt")
    if not gather or world == 1:
        return local_samples
    return _gather(local_samples, shape, world)


def _gather(local: torch.Tensor, shape: tuple, world: int) -> torch.Tensor:
    """All-gather uneven shares in rank (= global index) order: pad each to the largest share, gather, trim."""
    n = shape[0]
    counts = [shard_range(n, r, world)[1] for r in range(world)]
    biggest = max(counts)
    buf = torch.zeros((biggest,) + shape[1:], dtype=local.dtype, device=local.device)
    buf[: local.shape[0]] = local
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def load_shards(shard_dir: str | os.PathLike) -> torch.Tensor:
    """Reassemble the shards :func:`sample` wrote into one tensor in global index order (checks completeness)."""
    files = sorted(pathlib.Path(shard_dir).glob("shard-*-of-*.pt"))
    if not files:
        raise ValueError(f"shard_dir {str(shard_dir)!r} holds no shard-*-of-*.pt files")
    shards = sorted((torch.load(f, weights_only=True) for f in files), key=lambda s: s["start"])
    worlds = {s["world_size"] for s in shards}
    if len(worlds) != 1 or len(shards) != worlds.pop():
        raise ValueError(f"shard_dir {str(shard_dir)!r} holds an incomplete or mixed set of shards")
    pos = 0
    for s in shards:
        if s["start"] != pos:
            raise ValueError(f"shard_dir {str(shard_dir)!r}: samples {pos}..{s['start'] - 1} are missing")
        pos += s["count"]
    return torch.cat([s["samples"] for s in shards])
