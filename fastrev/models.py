"""Analytic models: data distributions whose exact noise predictor is known in closed form.

:class:`GaussianMixture` is the demo's model and the end-to-end oracle of the samplers. For clean data
x₀ ~ Σ_k w_k N(μ_k, s_k² I) in d dimensions and the forward process x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, the noised marginal
stays a mixture,

    p_t(x) = Σ_k w_k N(x; √ᾱ_t μ_k, v_k I),    v_k = ᾱ_t s_k² + 1 − ᾱ_t,

so its score needs no training:

    ∇log p_t(x) = −Σ_k r_k(x) (x − √ᾱ_t μ_k) / v_k,    r_k(x) ∝ w_k N(x; √ᾱ_t μ_k, v_k I)  (responsibilities),

and the optimal ε-, x₀- and v-predictors follow (score–noise equivalence of the seed: ε = −√(1 − ᾱ_t)·∇log p_t):

    ε*(x, t)  = −√(1 − ᾱ_t) ∇log p_t(x)
    x₀*(x, t) = E[x₀ | x_t = x] = Σ_k r_k (μ_k + √ᾱ_t s_k² / v_k · (x − √ᾱ_t μ_k))
    v*(x, t)  = √ᾱ_t ε* − √(1 − ᾱ_t) x₀*

Other paths. Every path x = a·x₀ + b·ε keeps the mixture form, p(x) = Σ_k w_k N(x; a μ_k, (a² s_k² + b²) I), and
has the closed-form posterior means (:meth:`GaussianMixture.posterior`)

    E[x₀ | x] = Σ_k r_k (μ_k + a s_k² / V_k · (x − a μ_k)),    E[ε | x] = Σ_k r_k b / V_k · (x − a μ_k),
    V_k = a² s_k² + b².

* Rectified flow (flow matching; SD3, Flux): x_σ = (1 − σ)x₀ + σε, σ ∈ [0, 1], marginal :meth:`flow_marginal`, and
  the exact velocity v*(x, σ) = E[ε − x₀ | x_σ = x] (:meth:`velocity`; well defined at both ends: −x at σ = 0,
  x − E[x₀] at σ = 1). ``prediction_type="flow_prediction"`` makes the model return it, fed diffusers' float
  timesteps t = σ·num_train_timesteps.
* σ-space (VE / EDM, k-diffusion, diffusers' Euler schedulers): x̃ = x₀ + σε with σ = √((1 − ᾱ)/ᾱ), marginal
  :meth:`sigma_marginal`, ε*(x̃, σ) = E[ε | x̃] (:meth:`eps_sigma`). diffusers' Euler schedulers feed the model
  x̃/√(σ² + 1) = √ᾱ·x̃, the VP sample: so ε*(x̃, σ) = ε*_VP(x̃/√(σ² + 1), ᾱ = 1/(σ² + 1)), and the VP model
  serves the σ-space samplers unchanged.

A sampler run with the exact predictor must give back the mixture (up to its discretisation error), which
:func:`sliced_wasserstein` measures against fresh draws of the data.
"""

from __future__ import annotations

import math

import torch

from .reference import PREDICTION_TYPES
from .schedule import Schedule

__all__ = ["GaussianMixture", "sliced_wasserstein"]

_PREDICTIONS = PREDICTION_TYPES + ("flow_prediction",)


def _f64_tensor(v, name):
    if isinstance(v, torch.Tensor):
        if v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got {v.dtype}")
        return v.detach().to("cpu", torch.float64).clone()
    try:
        return torch.tensor(v, dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a tensor or a (nested) sequence of numbers, got {type(v).__name__}") from None


class GaussianMixture:
    """An isotropic Gaussian mixture as a diffusion "model" with the exact optimal prediction.

    Args:
        means: [K, d] component means μ_k (any d ≥ 1).
        stds: component standard deviations s_k > 0: a number (shared) or [K].
        weights: mixture weights w_k ≥ 0 ([K], normalised here); None: uniform.
        schedule: the *training* schedule whose ᾱ the timesteps fed to ``__call__`` index (default: linear, 1000).
        prediction_type: what ``__call__`` returns: "epsilon" (ε*), "sample" (x₀*) or "v_prediction" (v*) of the VP
            process, or "flow_prediction" (the rectified-flow velocity v*(x, σ) = E[ε − x₀ | x_σ]).

    ``model(x, t)`` takes x of shape [B, ...] with d elements per sample (any dtype/device) and int64 training
    timesteps t ([B], or a scalar) — for "flow_prediction" float timesteps t = σ·num_train_timesteps of
    ``schedule`` (diffusers' flow-matching convention) —, computes in float64 and returns the prediction in x's
    dtype, on x's device.
    Each call is per sample: the prediction for a sample never depends on the other samples of the batch.
    ``num_calls`` counts the calls (model evaluations).
    """

    def __init__(self, means, stds=0.1, weights=None, schedule: Schedule | None = None,
                 prediction_type: str = "epsilon"):
        means = _f64_tensor(means, "means")
        if means.dim() == 1:
            means = means[:, None]
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape [K, d] with K, d >= 1, got {tuple(means.shape)}")
        K, d = means.shape
        stds = _f64_tensor(stds, "stds")
        if stds.dim() == 0:
            stds = stds.expand(K).clone()
        if stds.shape != (K,):
            raise ValueError(f"stds must be a number or have shape [{K}] (one per component), got {tuple(stds.shape)}")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = _f64_tensor(weights, "weights")
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape [{K}] (one per component), got {tuple(weights.shape)}")
        for name, v in (("means", means), ("stds", stds), ("weights", weights)):
            if not torch.isfinite(v).all():
                raise ValueError(f"{name} must be finite")
        if (stds <= 0).any():
            raise ValueError(f"stds must be > 0, got {stds.tolist()}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
        if schedule is None:
            schedule = Schedule.linear()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a fastrev.Schedule, got {type(schedule).__name__}")
        if not isinstance(prediction_type, str) or prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {_PREDICTIONS}, got {prediction_type!r}")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.num_components, self.dim = K, d
        self.num_calls = 0
        self._cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def demo_2d(cls, schedule: Schedule | None = None, prediction_type: str = "epsilon") -> "GaussianMixture":
        """The demo's 2-D mixture: five components of unequal weight and width, no symmetry (a mirrored, shrunk or
        sign-flipped sampler shows), spread over about [−2, 2]²."""
        means = [[-1.2, -0.8], [1.3, -0.6], [0.1, 1.4], [-0.5, 0.4], [1.0, 0.9]]
        stds = [0.15, 0.22, 0.12, 0.10, 0.25]
        weights = [0.30, 0.20, 0.25, 0.10, 0.15]
        return cls(means, stds, weights, schedule=schedule, prediction_type=prediction_type)

    def __repr__(self) -> str:
        return (f"GaussianMixture(components={self.num_components}, dim={self.dim}, "
                f"prediction_type={self.prediction_type!r}, schedule={self.schedule!r})")

    # ------------------------------------------------------------------ helpers
    def _params(self, device):
        """(means, variances s², log-weights, alpha_bars) as float64 on ``device``, cached."""
        device = torch.device(device)
        p = self._cache.get(device)
        if p is None:
            p = (self.means.to(device), (self.stds**2).to(device), torch.log(self.weights).to(device),
                 self.schedule.alpha_bars.to(device))
            self._cache[device] = p
        return p

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape [B, ...] with {self.dim} elements per sample, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _alpha_bar(self, alpha_bar, B, device) -> torch.Tensor:
        """ᾱ as float64 [B, 1]."""
        if isinstance(alpha_bar, torch.Tensor):
            a = alpha_bar.to(device=device, dtype=torch.float64).reshape(-1)
            a = a.expand(B) if a.numel() == 1 else a
            if a.shape != (B,):
                raise ValueError(f"alpha_bar must be a number or have shape [{B}], got {tuple(alpha_bar.shape)}")
        else:
            a = torch.full((B,), float(alpha_bar), dtype=torch.float64, device=device)
        return a[:, None]

    def _moments(self, xf, a):
        """Responsibilities r [B, K] and per-component variances v [B, K] at noise level ᾱ = a [B, 1]."""
        mu, s2, logw, _ = self._params(xf.device)
        sa = a.sqrt()                                                    # [B, 1]
        v = a * s2[None, :] + (1.0 - a)                                  # [B, K]
        diff = xf[:, None, :] - sa[:, :, None] * mu[None, :, :]          # [B, K, d]
        sq = diff.pow(2).sum(-1)                                         # [B, K]
        logits = logw[None, :] - 0.5 * sq / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        r = torch.softmax(logits, dim=1)
        return r, v, diff, logits

    # ------------------------------------------------------------------ the closed forms
    def score(self, x: torch.Tensor, alpha_bar) -> torch.Tensor:
        """∇_x log p_t(x) at noise level ᾱ (a number or per-sample [B]); float64, shaped like x."""
        xf = self._flat(x)
        a = self._alpha_bar(alpha_bar, xf.shape[0], xf.device)
        r, v, diff, _ = self._moments(xf, a)
        s = -((r / v)[:, :, None] * diff).sum(1)
        return s.reshape(x.shape)

    def eps(self, x: torch.Tensor, alpha_bar) -> torch.Tensor:
        """The optimal noise prediction ε* = −√(1 − ᾱ)·∇log p_t(x); float64, shaped like x."""
        xf = self._flat(x)
        a = self._alpha_bar(alpha_bar, xf.shape[0], xf.device)
        return (-(1.0 - a).sqrt() * self.score(x, a[:, 0]).reshape(xf.shape)).reshape(x.shape)

    def x0(self, x: torch.Tensor, alpha_bar) -> torch.Tensor:
        """The optimal clean-data prediction E[x₀ | x_t = x]; float64, shaped like x."""
        xf = self._flat(x)
        a = self._alpha_bar(alpha_bar, xf.shape[0], xf.device)
        r, v, diff, _ = self._moments(xf, a)
        mu, s2, _, _ = self._params(xf.device)
        gain = (a.sqrt() * s2[None, :] / v)                              # [B, K]
        post = mu[None, :, :] + gain[:, :, None] * diff                  # [B, K, d]
        return (r[:, :, None] * post).sum(1).reshape(x.shape)

    # ------------------------------------------------------------------ any path x = a·x₀ + b·ε
    def _coef(self, v, B, device, name, lo=0.0, hi=None) -> torch.Tensor:
        """A number or [B] tensor as float64 [B, 1], range-checked when it is a Python number."""
        if not isinstance(v, torch.Tensor):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number or a [B] tensor, got {type(v).__name__}")
            if not (v >= lo and (hi is None or v <= hi)):
                raise ValueError(f"{name} must be in [{lo}, {'∞' if hi is None else hi}], got {v}")
        return self._alpha_bar(v, B, device)

    def posterior(self, x: torch.Tensor, a, b):
        """(E[x₀ | x], E[ε | x]) for the path x = a·x₀ + b·ε (a, b: numbers or per-sample [B]); float64, shaped like
        x. The marginal along the path is the mixture with means a·μ_k and variances a² s_k² + b²."""
        xf = self._flat(x)
        B = xf.shape[0]
        a = self._coef(a, B, xf.device, "a")
        b = self._coef(b, B, xf.device, "b")
        mu, s2, logw, _ = self._params(xf.device)
        V = a * a * s2[None, :] + b * b                                  # [B, K]
        diff = xf[:, None, :] - a[:, :, None] * mu[None, :, :]           # [B, K, d]
        logits = logw[None, :] - 0.5 * diff.pow(2).sum(-1) / V - 0.5 * self.dim * torch.log(2 * math.pi * V)
        r = torch.softmax(logits, dim=1)[:, :, None]                     # [B, K, 1]
        x0 = (r * (mu[None] + (a * s2[None, :] / V)[:, :, None] * diff)).sum(1)
        eps = (r * (b / V)[:, :, None] * diff).sum(1)
        return x0.reshape(x.shape), eps.reshape(x.shape)

    def velocity(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact rectified-flow velocity v*(x, σ) = E[ε − x₀ | x_σ = x] on x_σ = (1 − σ)x₀ + σε, σ ∈ [0, 1]
        (a number or per-sample [B]); float64, shaped like x."""
        xf = self._flat(x)
        s = self._coef(sigma, xf.shape[0], xf.device, "sigma", 0.0, 1.0)
        x0, eps = self.posterior(x, (1.0 - s)[:, 0], s[:, 0])
        return eps - x0

    def eps_sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact σ-space noise prediction ε*(x̃, σ) = E[ε | x̃] on x̃ = x₀ + σε (VE / EDM / k-diffusion; σ a
        number >= 0 or per-sample [B]); float64, shaped like x. Equals :meth:`eps` at x̃/√(σ² + 1), ᾱ = 1/(σ² + 1)
        (diffusers' Euler ``scale_model_input``)."""
        xf = self._flat(x)
        s = self._coef(sigma, xf.shape[0], xf.device, "sigma", 0.0)
        return self.posterior(x, 1.0, s[:, 0])[1]

    def _path_marginal(self, a: float, b: float) -> "GaussianMixture":
        return GaussianMixture(a * self.means, (a * a * self.stds**2 + b * b).sqrt(), self.weights,
                               schedule=self.schedule)

    def flow_marginal(self, sigma: float) -> "GaussianMixture":
        """The exact distribution of x_σ = (1 − σ)x₀ + σε (σ in [0, 1]): the mixture with means (1 − σ)μ_k and
        standard deviations √((1 − σ)² s_k² + σ²), same weights."""
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 1:
            raise ValueError(f"sigma must be a number in [0, 1], got {sigma!r}")
        return self._path_marginal(1.0 - float(sigma), float(sigma))

    def sigma_marginal(self, sigma: float) -> "GaussianMixture":
        """The exact distribution of x̃ = x₀ + σε (σ >= 0): means μ_k, standard deviations √(s_k² + σ²)."""
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < math.inf:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        return self._path_marginal(1.0, float(sigma))

    def log_prob(self, x: torch.Tensor, alpha_bar=1.0) -> torch.Tensor:
        """log p_t(x) per sample (float64 [B]); ``alpha_bar=1`` is the data density itself."""
        xf = self._flat(x)
        a = self._alpha_bar(alpha_bar, xf.shape[0], xf.device)
        return torch.logsumexp(self._moments(xf, a)[3], dim=1)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """The exact prediction (``prediction_type``) for x [B, ...] at training timesteps t ([B] or scalar): ints
        indexing the schedule, or for "flow_prediction" floats t = σ·num_train_timesteps."""
        self.num_calls += 1
        xf = self._flat(x)
        B = xf.shape[0]
        if self.prediction_type == "flow_prediction":
            return self.velocity(x, self._flow_sigma(t, B, x.device)).to(x.dtype)
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((B,), t, dtype=torch.int64, device=x.device)
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t must be an int or an integer tensor of training timesteps, got {t!r}")
        ab = self._params(x.device)[3][t.to(x.device).reshape(-1)]
        a = ab.expand(B) if ab.numel() == 1 else ab
        if self.prediction_type == "epsilon":
            out = self.eps(x, a)
        elif self.prediction_type == "sample":
            out = self.x0(x, a)
        else:
            a2 = a.reshape((B,) + (1,) * (x.dim() - 1))
            out = a2.sqrt() * self.eps(x, a) - (1 - a2).sqrt() * self.x0(x, a)
        return out.to(x.dtype)

    def _flow_sigma(self, t, B, device) -> torch.Tensor:
        """σ = t / num_train_timesteps as float64 [B], checked to lie in [0, 1]."""
        n = float(self.schedule.num_train_timesteps)
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = torch.tensor([float(t)], dtype=torch.float64)
        if not isinstance(t, torch.Tensor) or t.dtype in (torch.bool,) or t.dtype.is_complex:
            raise TypeError(f"t must be a number or a real tensor of flow timesteps σ·{n:g}, got {t!r}")
        sigma = t.to(device=device, dtype=torch.float64).reshape(-1) / n
        if sigma.numel() not in (1, B):
            raise ValueError(f"t must be a scalar or have shape [{B}], got {tuple(t.shape)}")
        if t.device.type == "cpu" and not bool(((sigma >= 0) & (sigma <= 1)).all()):
            raise ValueError(f"flow timesteps t must be in [0, {n:g}] (σ = t/{n:g} in [0, 1]), got {t.tolist()}")
        return sigma.expand(B)

    # ------------------------------------------------------------------ data
    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64,
               device=None) -> torch.Tensor:
        """n fresh draws of the clean data x₀, [n, d] (drawn on the CPU with ``generator``, then moved)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.int64)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k][:, None] * z
        return x.to(device=device or "cpu", dtype=dtype)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two empirical distributions (rows of ``x`` and ``y``, flattened).

    Projects both onto ``num_projections`` random unit directions (fixed by ``seed``, so two calls compare on the
    same directions), and averages the 1-D W1 distances: with equal sample counts the mean |difference| of the sorted
    projections, else the mean |difference| of their quantile functions on a common grid. Float64 throughout.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch.Tensors")
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("x and y must be non-empty [n, ...] tensors")
    xf = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    yf = y.detach().reshape(y.shape[0], -1).to("cpu", torch.float64)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y must have the same number of elements per sample, got {xf.shape[1]} and "
                         f"{yf.shape[1]}")
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be an int >= 1, got {num_projections!r}")
    g = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(xf.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort((dirs.T @ xf.T).contiguous(), dim=1)          # [P, n]: each row sorted, contiguous
    py, _ = torch.sort((dirs.T @ yf.T).contiguous(), dim=1)
    if px.shape[1] != py.shape[1]:
        m = max(px.shape[1], py.shape[1])
        q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        px = torch.quantile(px, q, dim=1)
        py = torch.quantile(py, q, dim=1)
    return float((px - py).abs().mean())
