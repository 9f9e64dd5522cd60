"""Counter-based Gaussian noise: the reference generator of the stream the fused kernel reproduces.

The normal number for element ``e`` (flattened, per sample) of sample ``i`` at step ``t`` is

    w0, w1, w2, w3 = Philox4x32-10(key = seed (64 bit: k0 = low word, k1 = high word),
                                   counter = (e // 4, i, t, 0))
    u_k = uniform(w_k)                      # Triton's uint_to_uniform_float, in float32
    (n0, n1) = BoxMuller(u0, u1); (n2, n3) = BoxMuller(u2, u3)      # as tl.randn4x
    z[i, t, e] = n_{e % 4}

so it depends only on (seed, sample index, step, element): never on how a batch is split, on the number of GPUs or
on the backend. ``x_T`` of a sampling run uses step ``t = num_timesteps``. Counter words are 32-bit: sample
indices and steps are taken mod 2³² (samples i and i + 2³² share noise), and one sample may hold up to 2³⁴ elements.

Everything here is plain int64 / float32 torch arithmetic, so it runs on any device (MPS included: no float64, only
int64 add/multiply/shift/and/xor/compare) and gives the same uint32 words everywhere; the float32 normals agree with
the kernel's to a few ulp (libm vs. libdevice ``log``/``cos``). On the CPU the "torch" backend's compiled step
draws the same stream inline (:mod:`fastrev._cpu`, ≤ 1e-6 from :func:`randn`, which stays the pure-torch reference).
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "uniform_from_words", "box_muller", "randn", "noise_like", "as_seed_tensor",
           "PHILOX_ROUNDS"]

PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10   # Triton: largest s with (2^31 − 1)·s < 1 in float32
_TWO_PI = 6.283185307179586


def _u32(x, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=torch.int64) & _M32
    return torch.full((), int(x) & _M32, dtype=torch.int64, device=like.device)


def philox4x32(c0, c1, c2, c3, key0, key1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 (Salmon et al. 2011) on int64 tensors holding uint32 values; broadcasting.

    Returns the four output words as int64 tensors in [0, 2³²). Bit-exact with Random123 and with
    ``tl.philox(seed, c0, c1, c2, c3)`` for ``seed = key1 << 32 | key0``.
    """
    like = next(v for v in (c0, c1, c2, c3, key0, key1) if isinstance(v, torch.Tensor)) \
        if any(isinstance(v, torch.Tensor) for v in (c0, c1, c2, c3, key0, key1)) else torch.zeros(())
    c0, c1, c2, c3 = (_u32(c, like) for c in (c0, c1, c2, c3))
    k0, k1 = _u32(key0, like), _u32(key1, like)
    for _ in range(rounds):
        p0 = _ROUND_B * c2          # < 2^64: may wrap in int64, the low/high 32-bit words stay exact
        p1 = _ROUND_A * c0
        hi0, lo0 = (p0 >> 32) & _M32, p0 & _M32
        hi1, lo1 = (p1 >> 32) & _M32, p1 & _M32
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, lo0, hi1 ^ c3 ^ k1, lo1
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform_from_words(w: torch.Tensor) -> torch.Tensor:
    """uint32 words → float32 in [0, 1), exactly as Triton's ``uint_to_uniform_float``."""
    x = torch.where(w >= 2**31, w - 2**32, w)      # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)               # ~x
    return x.to(torch.float32) * _UNIFORM_SCALE          # a Python scalar: multiplied in float32, no H2D copy


def box_muller(u1: torch.Tensor, u2: torch.Tensor):
    """Two float32 uniforms → two float32 normals (Triton's ``pair_uniform_to_normal``)."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = _TWO_PI * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def as_seed_tensor(seed, device) -> torch.Tensor:
    """A seed (int in [−2⁶³, 2⁶⁴) or an int64 tensor of one element) as an int64 tensor of shape [1] on ``device``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed tensor must be int64, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed tensor must hold one element, got shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if seed >= 2**63:
        seed -= 2**64
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _seed_words(seed, device):
    s = as_seed_tensor(seed, device)[0]
    return s & _M32, (s >> 32) & _M32


def randn(seed, sample_index, step, numel: int, device=None) -> torch.Tensor:
    """Normals of the counter stream, float32, shape ``[B, numel]``.

    Args:
        seed: int or int64 tensor (one element).
        sample_index: int64 [B] global sample indices ``i``.
        step: int64 [B] (or a scalar / int) steps ``t``.
        numel: elements per sample.
    """
    sample_index = torch.as_tensor(sample_index, dtype=torch.int64, device=device)
    device = sample_index.device
    sample_index = sample_index.reshape(-1)
    B = sample_index.numel()
    step = torch.as_tensor(step, dtype=torch.int64, device=device).reshape(-1).expand(B)
    k0, k1 = _seed_words(seed, device)
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    w = philox4x32(g, sample_index[:, None], step[:, None], 0, k0, k1)
    u = [uniform_from_words(x) for x in w]
    n0, n1 = box_muller(u[0], u[1])
    n2, n3 = box_muller(u[2], u[3])
    z = torch.stack([n0, n1, n2, n3], dim=-1).reshape(B, groups * 4)
    return z[:, :numel]


def noise_like(x: torch.Tensor, seed, step, sample_offset: int = 0) -> torch.Tensor:
    """Counter-stream noise shaped like ``x`` (dim 0 is the batch), float32, for samples
    ``sample_offset + arange(B)`` at per-sample ``step``."""
    B = x.shape[0] if x.dim() else 1
    idx = torch.arange(B, dtype=torch.int64, device=x.device) + int(sample_offset)
    numel = x[0].numel() if x.dim() and B else (x.numel() if not x.dim() else 0)
    if B == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return randn(seed, idx, step, numel, device=x.device).reshape(x.shape)
