"""Counter-based noise: Philox known-answer vectors, bit-exactness against Triton, and the stream's statistics."""

import pytest
import torch

from fastrev import noise

M = 0xFFFFFFFF
# Random123 kat_vectors, philox4x32 with 10 rounds: (counter c0..c3, key k0 k1) -> output words
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr, key, expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    words = noise.philox4x32(*ctr, *key)
    assert tuple(int(w) for w in words) == expected


def _triton_philox_words(seed: int, c0, c1, c2):
    import triton
    import triton.language as tl

    @triton.jit
    def k(out_ptr, seed_ptr, c0_ptr, c1_ptr, c2_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        s = tl.load(seed_ptr)
        a = tl.load(c0_ptr + i).to(tl.uint32)
        b = tl.load(c1_ptr + i).to(tl.uint32)
        c = tl.load(c2_ptr + i).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(s, a, b, c, a * 0)
        tl.store(out_ptr + 4 * i, w0.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 4 * i + 1, w1.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 4 * i + 2, w2.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 4 * i + 3, w3.to(tl.int32, bitcast=True))

    n = c0.numel()
    out = torch.zeros(4 * n, dtype=torch.int32)
    k[(1,)](out, noise.as_seed_tensor(seed, "cpu"), c0, c1, c2, BLOCK=n)
    return (out.to(torch.int64) & M).reshape(n, 4)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**63 + 99, 2**64 - 1])
def test_words_match_triton_philox(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    c0 = torch.randint(0, 2**31, (32,), generator=g, dtype=torch.int64)
    c1 = torch.randint(0, 2**20, (32,), generator=g, dtype=torch.int64)
    c2 = torch.randint(0, 1001, (32,), generator=g, dtype=torch.int64)
    ours = torch.stack(noise.philox4x32(c0, c1, c2, 0, seed & M, seed >> 32), dim=1)
    assert torch.equal(ours, _triton_philox_words(seed, c0.to(torch.int32), c1.to(torch.int32), c2.to(torch.int32)))


def test_normals_match_triton_randn4x():
    """For sample 0 at step 0 the counter is (g, 0, 0, 0): exactly tl.randn4x(seed, g)."""
    import triton
    import triton.language as tl

    @triton.jit
    def k(out_ptr, seed_ptr, BLOCK: tl.constexpr):
        g = tl.arange(0, BLOCK)
        n0, n1, n2, n3 = tl.randn4x(tl.load(seed_ptr), g)
        tl.store(out_ptr + 4 * g, n0)
        tl.store(out_ptr + 4 * g + 1, n1)
        tl.store(out_ptr + 4 * g + 2, n2)
        tl.store(out_ptr + 4 * g + 3, n3)

    out = torch.empty(256, dtype=torch.float32)
    k[(1,)](out, noise.as_seed_tensor(77, "cpu"), BLOCK=64)
    ours = noise.randn(77, torch.tensor([0]), 0, 256)[0]
    torch.testing.assert_close(ours, out, rtol=1e-6, atol=1e-6)


def test_stream_depends_only_on_its_keys():
    x = torch.empty(8, 3, 5)
    whole = noise.noise_like(x, seed=5, step=torch.arange(8))
    a = noise.noise_like(x[:3], seed=5, step=torch.arange(3))
    b = noise.noise_like(x[3:], seed=5, step=torch.arange(3, 8), sample_offset=3)
    assert torch.equal(whole, torch.cat([a, b]))
    assert not torch.equal(noise.noise_like(x, 6, 0), noise.noise_like(x, 5, 0))
    assert not torch.equal(noise.noise_like(x, 5, 1), noise.noise_like(x, 5, 0))
    # the element count per sample does not change the numbers of the first elements
    assert torch.equal(noise.randn(5, torch.arange(2), 3, 7), noise.randn(5, torch.arange(2), 3, 100)[:, :7])


def _stream():
    return noise.randn(2024, torch.arange(64), torch.full((64,), 17), 4096).double()


def test_moments():
    z = _stream()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(((z - z.mean()) ** 3).mean().item()) < 5 * (15 / n) ** 0.5          # skewness ~ 0
    assert abs((z**4).mean().item() - 3) < 5 * (96 / n) ** 0.5                     # kurtosis ~ 3


def test_kolmogorov_smirnov():
    scipy_stats = pytest.importorskip("scipy.stats")        # in the test extra: CI always runs this
    res = scipy_stats.kstest(_stream().flatten()[:50000].numpy(), "norm")
    assert res.pvalue > 1e-4


def test_no_correlation_across_samples_steps_elements():
    n = 8192
    z = noise.randn(3, torch.arange(4), torch.tensor([5, 5, 6, 6]), n).double()
    bound = 5 / n**0.5
    corr = torch.corrcoef(z)
    off = corr - torch.diag(torch.diag(corr))
    assert off.abs().max().item() < bound                # samples 0/1 (same step), 0/2 (other step and sample) ...
    same_sample_other_step = noise.randn(3, torch.tensor([0]), 6, n)[0].double()
    assert abs(torch.corrcoef(torch.stack([z[0], same_sample_other_step]))[0, 1].item()) < bound
    for lag in (1, 2, 3, 4):                             # neighbouring elements, incl. within a Philox group
        c = torch.corrcoef(torch.stack([z[0, :-lag], z[0, lag:]]))[0, 1].item()
        assert abs(c) < bound


def test_uniform_and_box_muller_edge_cases():
    w = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])
    u = noise.uniform_from_words(w)
    assert (u >= 0).all() and (u < 1).all()
    n1, n2 = noise.box_muller(torch.zeros(1), torch.zeros(1))     # u1 = 0 is clamped to 1e-7: finite
    assert torch.isfinite(n1).all() and torch.isfinite(n2).all()


@pytest.mark.parametrize("seed, exc", [(1.5, TypeError), (True, TypeError), (2**64, ValueError),
                                        (torch.tensor([1.0]), TypeError), (torch.tensor([1, 2]), ValueError)])
def test_bad_seed(seed, exc):
    with pytest.raises(exc, match="seed"):
        noise.as_seed_tensor(seed, "cpu")


def test_seed_two_complement():
    assert noise.as_seed_tensor(2**64 - 1, "cpu").item() == -1
    assert torch.equal(noise.randn(2**64 - 1, [0], 0, 8), noise.randn(torch.tensor([-1]), [0], 0, 8))
