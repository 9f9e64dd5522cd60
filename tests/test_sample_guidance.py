"""Classifier-free guidance in ``fastrev.sample``: a guided run (one model call per step on [x; x] with
[negative; cond] conditioning, the halves combined by the fused step) equals an unguided run of a model that returns
uncond + w·(cond − uncond) itself, with the same seed, for every method, on the torch, reference and Triton
backends."""

import pytest
import torch
from _graph import EmulatedGraph

import fastrev
from fastrev.models import GaussianMixture
from fastrev.sampling import plan as plan_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (5, 2, 3, 3)            # 5 samples of 2 channels × 3 × 3 (d = 18)
D = 18
SCHED = fastrev.Schedule.linear(100)


class ClassModel:
    """A class-conditional analytic model: ``model(x, t, label)`` with int64 labels [B], 0 the null class (the whole
    mixture), k ≥ 1 the mixture's component k − 1 alone. Optional learned-variance channels (a bounded function of
    x and the label), as a learned_range model returns them. Per sample: no sample depends on its batch-mates."""

    def __init__(self, prediction_type="epsilon", learned=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(3, D, generator=g, dtype=torch.float64)
        stds = [0.3, 0.5, 0.4]
        kw = dict(schedule=SCHED, prediction_type=prediction_type)
        self.parts = [GaussianMixture(means, stds, **kw)] + [GaussianMixture(means[k:k + 1], stds[k], **kw)
                                                           for k in range(3)]
        self.learned = learned
        self.calls = []

    def __call__(self, x, t, label):
        self.calls.append(x.shape[0])
        out = torch.empty_like(x)
        for k in label.unique().tolist():
            m = label == k
            out[m] = self.parts[k](x[m], t[m])
        if not self.learned:
            return out
        var = torch.tanh(0.3 * x + 0.1 * label.reshape(-1, 1, 1, 1).to(x.dtype))
        return torch.cat([out, var], dim=1)


def combined(model, negative, cond, w, rescale=0.0):
    """The guided prediction computed by the model itself: model(x, t) = u + w·(c − u) (optionally rescaled as in
    Lin et al. 2023), the variance channels from the conditional call. ``w``: float or [B] tensor."""

    def f(x, t):
        B = x.shape[0]
        u = model(x, t, negative.expand(B))
        c = model(x, t, cond)
        ww = w.reshape((B,) + (1,) * (x.dim() - 1)).to(x.dtype) if isinstance(w, torch.Tensor) else w
        if model.learned:
            C = x.shape[1]
            u, c, var = u[:, :C], c[:, :C], c[:, C:]
        g = u + ww * (c - u)
        if rescale:
            std_c = c.reshape(B, -1).std(dim=1)
            std_g = g.reshape(B, -1).std(dim=1)
            g = g * (rescale * std_c / std_g + 1 - rescale).reshape((B,) + (1,) * (x.dim() - 1))
        return torch.cat([g, var], dim=1) if model.learned else g

    return f


COND = torch.tensor([1, 2, 3, 1, 2])
NULL = torch.tensor([0])


def run_pair(method, backend, w=3.0, rescale=0.0, num_steps=6, **kw):
    model = ClassModel("flow_prediction" if method == "flow_euler" else kw.pop("prediction_type", "epsilon"),
                       learned=kw.get("variance_type", "").startswith("learned"))
    common = dict(method=method, num_steps=num_steps, seed=7, backend=backend, **kw)
    guided = fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL, guidance_scale=w,
                            guidance_rescale=rescale, **common)
    want = fastrev.sample(combined(model, NULL, COND, w, rescale), SHAPE, SCHED, **common)
    return guided, want, model


def assert_close(a, b, tol=2e-5):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


METHODS = [("ddpm", {}), ("ddim", {"eta": 0.5}), ("sde", {}), ("ode", {}), ("ode", {"ode_solver": "euler"}),
           ("pc", {}), ("pc", {"corrector_norms": "sample"}), ("euler", {}), ("euler_a", {}), ("flow_euler", {}),
           ("ddpm", {"variance_type": "learned_range"}), ("ddim", {"prediction_type": "v_prediction",
                                                                   "clip_sample": True})]


@pytest.mark.parametrize("method,kw", METHODS, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in METHODS])
def test_guided_equals_combined_model_torch(method, kw):
    guided, want, model = run_pair(method, "torch", **kw)
    assert_close(guided, want)
    assert 2 * SHAPE[0] in model.calls and all(n == 2 * SHAPE[0] for n in model.calls[:1])


@pytest.mark.parametrize("method,kw", [("ddpm", {}), ("ode", {}), ("ddpm", {"variance_type": "learned_range"})])
def test_guided_equals_combined_model_reference(method, kw):
    guided, want, _ = run_pair(method, "reference", **kw)
    assert_close(guided, want, 1e-6)


def test_one_model_call_per_step_on_the_doubled_batch():
    model = ClassModel()
    fastrev.sample(model, SHAPE, SCHED, method="ddim", num_steps=4, conditioning=COND, negative_conditioning=NULL,
                   guidance_scale=2.0, backend="torch")
    assert model.calls == [2 * SHAPE[0]] * 4


def test_guidance_rescale():
    guided, want, _ = run_pair("ddim", "torch", w=5.0, rescale=0.7)
    assert_close(guided, want)
    plain, _, _ = run_pair("ddim", "torch", w=5.0)
    assert (guided - plain).abs().max() > 1e-2          # the rescale does something


def test_scale_one_is_the_conditional_model():
    model = ClassModel()
    kw = dict(method="ddpm", num_steps=5, seed=3, backend="torch")
    guided = fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL, guidance_scale=1.0,
                            **kw)
    cond = fastrev.sample(model, SHAPE, SCHED, conditioning=COND, **kw)          # model(x, t, cond), unguided
    assert torch.equal(guided, cond)
    assert model.calls[-1] == SHAPE[0]


def test_per_sample_scale_and_chunks():
    w = torch.tensor([0.0, 1.0, 2.5, 4.0, 7.0])
    guided, want, _ = run_pair("euler_a", "torch", w=w)
    assert_close(guided, want)
    model = ClassModel()
    chunked = fastrev.sample(model, SHAPE, SCHED, method="euler_a", num_steps=6, seed=7, backend="torch",
                             conditioning=COND, negative_conditioning=NULL, guidance_scale=w, batch_size=2)
    assert_close(chunked, guided, 1e-6)
    # a per-sample w is per sample: sample 3 alone with w[3] is the same sample
    one = fastrev.sampling.sample_range(model, SHAPE[1:], SCHED, method="euler_a", num_steps=6, seed=7,
                                        backend="torch", conditioning=COND[3:4], negative_conditioning=NULL,
                                        guidance_scale=w[3:4], start=3, count=1)
    assert_close(one[0], guided[3], 1e-6)


def test_a_wrong_combine_fails(monkeypatch):
    """The test would catch a combine with the halves swapped (conditional first)."""
    real = plan_module.split_guided

    def swapped(out, x, w, phi, learned=False):
        B = x.shape[0]
        return real(torch.cat([out[B:], out[:B]]), x, w, phi, learned=learned)

    monkeypatch.setattr(plan_module, "split_guided", swapped)
    guided, want, _ = run_pair("ddpm", "torch")
    assert ((guided - want).abs().max() / want.abs().max()).item() > 1e-2


@pytest.mark.parametrize("method,kw,rescale", [("ddpm", {"variance_type": "learned_range"}, 0.0), ("ode", {}, 0.6)])
def test_guided_fused_kernel(kernel_device, method, kw, rescale, monkeypatch):
    """The Triton backend (the interpreter on CPU): the halves are combined in the kernel, one launch a step."""
    from fastrev.kernels import reverse_step as K

    launches = []
    real = K.reverse_step

    def counting(ts, **kwargs):
        launches.append(ts.cond is not None and ts.guide is not None)
        return real(ts, **kwargs)

    monkeypatch.setattr(K, "reverse_step", counting)
    if kernel_device.type == "cpu":
        shape, steps = (2, 2, 3, 3), 2
    else:
        shape, steps = SHAPE, 6
    model = ClassModel(learned="variance_type" in kw)
    cond, w = COND[:shape[0]].to(kernel_device), torch.tensor([2.0, 4.5, 1.5, 3.0, 0.5])[:shape[0]].to(kernel_device)
    null = NULL.to(kernel_device)
    common = dict(method=method, num_steps=steps, seed=11, device=kernel_device, **kw)
    guided = fastrev.sample(model, shape, SCHED, conditioning=cond, negative_conditioning=null, guidance_scale=w,
                            guidance_rescale=rescale, backend="triton", **common)
    assert launches == [True] * (2 * steps - 1 if method == "ode" else steps)     # guided launches, no combine
    want = fastrev.sample(combined(model, null, cond, w, rescale), shape, SCHED, backend="torch", **common)
    assert_close(guided, want, 2e-5)


def test_errors_name_the_argument():
    model = ClassModel()
    base = dict(method="ddpm", num_steps=2, backend="torch")
    with pytest.raises(ValueError, match="guidance_scale needs conditioning"):
        fastrev.sample(model, SHAPE, SCHED, guidance_scale=2.0, negative_conditioning=NULL, **base)
    with pytest.raises(ValueError, match="guidance_scale needs negative_conditioning"):
        fastrev.sample(model, SHAPE, SCHED, guidance_scale=2.0, conditioning=COND, **base)
    with pytest.raises(ValueError, match="negative_conditioning .* needs guidance_scale"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL, **base)
    with pytest.raises(ValueError, match="guidance_rescale .* needs guidance_scale"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, guidance_rescale=0.5, **base)
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL, guidance_scale=2.0,
                       guidance_rescale=1.5, **base)
    with pytest.raises(TypeError, match="guidance_scale must be"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL, guidance_scale="2",
                       **base)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL,
                       guidance_scale=float("nan"), **base)
    with pytest.raises(ValueError, match=r"guidance_scale tensor must have shape \[num_samples\]"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=NULL,
                       guidance_scale=torch.ones(4), **base)
    with pytest.raises(ValueError, match="conditioning must have 5 rows"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND[:3], **base)
    with pytest.raises(ValueError, match="negative_conditioning must have 5 rows"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=torch.zeros(2, dtype=torch.int64),
                       guidance_scale=2.0, **base)
    with pytest.raises(ValueError, match="negative_conditioning must match conditioning's shape"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=COND, negative_conditioning=torch.zeros(1, 2),
                       guidance_scale=2.0, **base)
    with pytest.raises(TypeError, match="conditioning must be a tensor"):
        fastrev.sample(model, SHAPE, SCHED, conditioning=[1, 2, 3, 4, 5], **base)


class EmbedModel:
    """A capturable conditional model (no host syncs): out = tanh(t/N)·0.8·x + emb[label]."""

    learned = False

    def __init__(self, device):
        self.emb = torch.randn((4,) + SHAPE[1:], generator=torch.Generator().manual_seed(1)).to(device)

    def __call__(self, x, t, label):
        s = torch.tanh(t.to(x.dtype) / SCHED.num_train_timesteps).reshape((-1,) + (1,) * (x.dim() - 1))
        return 0.8 * s * x + self.emb[label]


GRAPH_RUNS = [dict(method="ddpm"), dict(method="ode"), dict(method="pc", corrector_norms="sample")]


@pytest.mark.parametrize("kw", GRAPH_RUNS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_guided_graph_step_reads_everything_from_device_buffers(monkeypatch, kw):
    from fastrev.sampling import graph as SG

    monkeypatch.setattr(SG, "GRAPH_IMPL", EmulatedGraph)
    monkeypatch.setattr(SG, "check_graph_support", lambda device, fused: None)
    model = EmbedModel("cpu")
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    run = dict(num_steps=4, seed=2, batch_size=3, backend="torch", conditioning=COND, negative_conditioning=NULL,
               guidance_scale=w, guidance_rescale=0.3, **kw)
    a = fastrev.sample(model, SHAPE, SCHED, **run)
    b = fastrev.sample(model, SHAPE, SCHED, cuda_graph=True, **run)
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("kw", GRAPH_RUNS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_guided_cuda_graph_matches_eager_and_combined_model(kw):
    model = EmbedModel("cuda")
    cond, null = COND.cuda(), NULL.cuda()
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], device="cuda")
    run = dict(num_steps=6, seed=2, batch_size=3, device="cuda", **kw)
    guided = dict(conditioning=cond, negative_conditioning=null, guidance_scale=w)
    a = fastrev.sample(model, SHAPE, SCHED, **run, **guided)
    b = fastrev.sample(model, SHAPE, SCHED, cuda_graph=True, **run, **guided)
    assert_close(b, a, 1e-6)
    want = fastrev.sample(combined(model, null, cond, w), SHAPE, SCHED, backend="torch", **run)
    assert_close(a, want, 2e-5)


def test_rank_shares_of_per_sample_conditioning_equal_the_whole_run():
    """fastrev.distributed gives each rank its rows of the per-sample options: the ranks' shares, stacked, equal the
    single-process guided run (shared rows and scalars pass through unchanged)."""
    from fastrev import distributed, samplers
    model = ClassModel()
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kw = dict(method="ddpm", num_steps=4, seed=2, conditioning=COND, negative_conditioning=NULL, guidance_scale=w)
    whole = fastrev.sample(model, SHAPE, SCHED, **kw)
    parts = []
    for rank in range(2):
        start, count = distributed.shard_range(SHAPE[0], rank, 2)
        rkw = distributed.rank_options(kw, SHAPE[0], start, count)
        assert rkw["negative_conditioning"] is NULL and rkw["conditioning"].shape[0] == count
        parts.append(samplers._sample_range(model, SHAPE[1:], SCHED, start=start, count=count, **rkw))
    assert torch.equal(torch.cat(parts), whole)
