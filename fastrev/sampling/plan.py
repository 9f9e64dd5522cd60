"""What a run needs besides its options, one job per class.

* :class:`VPGrid` / :class:`FlowGrid` — the time grid: the respaced schedule (or the flow's σ grid), the model's
  timesteps on the device, the host copy for callbacks, and where the tables are cached.
* :class:`TableSet` — the method's coefficient tables on the device, in the backend's table dtype, cached.
* :class:`ModelCheck` — calls the model and checks what it returns.
* :class:`Conditioning` — the run's conditioning and classifier-free guidance, sliced per chunk.
* :class:`PerSampleCorrector` — the PC corrector with ``corrector_norms="sample"`` (a reduction, a per-sample table
  built on the device, one launch).
* :class:`Plan` — the above, composed, plus the backend and the seed; ``Plan.step`` runs one step of the method.
* :class:`Chunk` — the state of one chunk of samples.

CUDA-graph capture and the step loop are in :mod:`fastrev.sampling.graph`.
"""

from __future__ import annotations

import weakref

import torch

from .. import noise as _noise
from .. import ops
from .. import tables as T
from ..kernels.guidance import split_guided
from ..schedule import TIMESTEP_SPACINGS, Schedule, spaced_timesteps
from . import coefficients as C
from .methods import METHOD_STEPS
from .options import DTYPES, SampleOptions

__all__ = ["Plan", "Chunk", "VPGrid", "FlowGrid", "TableSet", "ModelCheck", "Conditioning",
           "PerSampleCorrector", "table_dtype"]


def table_dtype(backend: str, any_f64: bool = False) -> torch.dtype:
    """The dtype of the tables (and of the per-sample corrector's arithmetic) on a resolved backend: the ops' rule
    (:func:`fastrev.ops.table_dtype`: float64 for the reference and for float64 runs, float32 otherwise)."""
    return ops.table_dtype(backend, any_f64)


# ------------------------------------------------------------------------------------------------ grids
_RESPACED: "weakref.WeakKeyDictionary[Schedule, dict]" = weakref.WeakKeyDictionary()


def respaced(schedule: Schedule, num_steps, spacing):
    """(indices k into ``schedule`` ascending, the respaced Schedule), cached per (schedule, num_steps, spacing) so
    repeated runs reuse its device tables."""
    per = _RESPACED.setdefault(schedule, {})
    key = (num_steps, spacing)
    hit = per.get(key)
    if hit is None:
        N = schedule.num_timesteps
        if spacing in TIMESTEP_SPACINGS:
            k = spaced_timesteps(N, N if num_steps is None else num_steps, spacing)
        else:
            k = spaced_timesteps(N, num_steps, spacing)
        hit = (k, schedule.respace(k))
        per[key] = hit
    return hit


def _check_num_steps(num_steps, schedule: Schedule):
    if num_steps is not None and not 1 <= num_steps <= schedule.num_timesteps:
        raise ValueError(f"num_steps must be in [1, {schedule.num_timesteps}] (the schedule's length), "
                         f"got {num_steps}")


class VPGrid:
    """The respaced VP schedule R = S.respace(k): row i of every table is respaced index i; the model is fed the
    training timestep ``R.timesteps[i]`` (int64)."""

    flow = False

    def __init__(self, schedule: Schedule, opts: SampleOptions, device):
        _check_num_steps(opts.num_steps, schedule)
        self.S = schedule
        self.k, self.R = respaced(schedule, opts.num_steps, opts.timestep_spacing)
        self.N = self.R.num_timesteps
        if self.R.zero_terminal_snr:         # the run visits ᾱ = 0 (zero terminal SNR, last step kept)
            self._check_zero_terminal_snr(opts)
        self.timesteps = self.R.timesteps.tolist()            # host copy, for callbacks (no device sync)
        self.ts = self.R.device_tensor("timesteps", device, torch.int64)
        self.owner, self.key = self.R, ()

    def _check_zero_terminal_snr(self, opts):
        last = int(self.R.timesteps[-1])
        if opts.prediction_type == "epsilon":
            raise ValueError("prediction_type='epsilon' is undefined at the first step of this run: the schedule "
                             f"has zero terminal SNR (ᾱ = 0 at training timestep {last}, x̂₀ = (x − ε)/√ᾱ); use "
                             "'v_prediction' or 'sample', or a spacing that skips the last timestep ('leading')")
        need = METHOD_STEPS[opts.method].needs
        if need:
            raise ValueError(f"method={opts.method!r} needs {need} finite, but the schedule has zero terminal SNR "
                             f"(ᾱ = 0 at training timestep {last}); use 'ddpm', 'ddim' or 'pc', or a spacing that "
                             "skips the last timestep ('leading')")


class FlowGrid:
    """The rectified-flow grid σ_0 = 0 < … < σ_N = 1 (:func:`coefficients.flow_sigmas`): row i steps from σ_{i+1}
    to σ_i; the model is fed t = σ_{i+1}·num_train_timesteps (float32, diffusers' flow-matching convention). Only
    the schedule's length is used (the scale of t, and the default number of steps)."""

    flow = True

    def __init__(self, schedule: Schedule, opts: SampleOptions, device):
        _check_num_steps(opts.num_steps, schedule)
        self.S = schedule
        self.N = schedule.num_timesteps if opts.num_steps is None else opts.num_steps
        self.sigmas = C.flow_sigmas(self.N, opts.shift)
        scale = float(schedule.num_train_timesteps)
        t = (self.sigmas[1:] * scale).to(torch.float32)
        self.timesteps = t.tolist()
        self.key = ("flow", self.N, opts.shift)
        self.ts = schedule.cached(self.key + ("timesteps",), device, lambda: t)
        self.owner = schedule


# ------------------------------------------------------------------------------------------------ tables
class TableSet(dict):
    """name → the method's coefficient table on the device (``dtype``), built once per (grid, options, dtype)."""

    def __init__(self, grid, opts: SampleOptions, builders: dict, device, dtype: torch.dtype):
        super().__init__()
        self.grid, self.device, self.dtype = grid, device, dtype
        for name, build in builders.items():
            self[name] = self.cached(opts.table_key() + (name,), build)

    def cached(self, key, build):
        """``build()`` (float64, host) as a contiguous ``dtype`` tensor on the device, cached on the grid."""
        full = ("sampler",) + self.grid.key + tuple(key) + (self.dtype,)
        return self.grid.owner.cached(full, self.device, lambda: build().to(self.dtype).contiguous())


# ------------------------------------------------------------------------------------------------ the model
class ModelCheck:
    """``model(x, t)`` (or ``model(x, t, cond)`` for a conditioned run) with its output checked: a tensor of x's
    shape (2C channels for learned variances), floating, on x's device. float64 outputs are cast to float32 on the
    float32 backends."""

    def __init__(self, model, learned: bool, compute_dtype: torch.dtype):
        self.model, self.learned, self.compute_dtype = model, learned, compute_dtype

    def __call__(self, x, t, cond=None):
        out = self.model(x, t) if cond is None else self.model(x, t, cond)
        call = "model(x, t)" if cond is None else "model(x, t, cond)"
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{call} must return a torch.Tensor, got {type(out).__name__}")
        want = tuple(x.shape)
        if self.learned:
            want = (x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:])
        if tuple(out.shape) != want:
            extra = " (2C channels: output, then variance values)" if self.learned else ""
            raise ValueError(f"{call} must return shape {want}{extra}, got {tuple(out.shape)}")
        if out.dtype not in DTYPES:
            raise TypeError(f"{call} must return a floating tensor, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"{call} returned a tensor on {out.device}, expected {x.device}")
        if out.dtype == torch.float64 and self.compute_dtype != torch.float64:
            out = out.to(torch.float32)
        return out

    def pred(self, out):
        """The prediction channels (the first C of a learned-variance output)."""
        return out[:, : out.shape[1] // 2] if self.learned else out


# ------------------------------------------------------------------------------------------------ conditioning
class Conditioning:
    """The run's ``conditioning`` / ``negative_conditioning`` / ``guidance_scale`` on the device, checked against
    the run's sample count (first dimension = ``count``, or 1 for one row shared by every sample), and their
    slices for a chunk (:meth:`chunk`). Moved to the sampling device once per run."""

    def __init__(self, opts: SampleOptions, count: int, device):
        self.guided = opts.guided
        self.rescale = opts.guidance_rescale
        self.count = count

        def rows(name, v):
            if v is None:
                return None
            if v.shape[0] not in (1, count):
                raise ValueError(f"{name} must have {count} rows (one per sample of the run) or 1 (shared), got "
                                 f"shape {tuple(v.shape)}")
            return v.to(device)

        self.cond = rows("conditioning", opts.conditioning)
        self.neg = rows("negative_conditioning", opts.negative_conditioning)
        w = opts.guidance_scale
        if isinstance(w, torch.Tensor):
            if w.shape != (count,):
                raise ValueError(f"guidance_scale tensor must have shape [num_samples] = ({count},) (one scale per "
                                 f"sample of the run), got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError("guidance_scale tensor must be finite")
            w = w.to(device)
        self.scale = w

    def chunk(self, lo: int, n: int):
        """(what the model is called with for local samples lo .. lo + n − 1, their guidance scale): the
        conditioning rows, or with guidance the doubled batch [negative; conditioning] (2n rows)."""
        def take(v):
            return v.expand((n,) + tuple(v.shape[1:])) if v.shape[0] == 1 else v[lo:lo + n]

        if self.cond is None:
            return None, None
        if not self.guided:
            return take(self.cond), None
        w = self.scale[lo:lo + n] if isinstance(self.scale, torch.Tensor) else self.scale
        return torch.cat([take(self.neg), take(self.cond)]), w


# ------------------------------------------------------------------------------------------------ PC, per sample
class PerSampleCorrector:
    """One Langevin step with each sample's own norms, ε_b = 2α'_i (snr ‖z_b‖ / ‖s_b‖)² (0 where ‖s_b‖ = 0): the
    norms need the whole sample before any element moves, so a reduction pass (ε̂, z, their norms, in torch), a
    per-sample [B, NCOL] table built on the device (no host sync, graph-safe) and one launch over rows arange(B)
    with that z passed in as the noise."""

    def __init__(self, plan: "Plan"):
        R, o = plan.grid.R, plan.opts
        self.snr = o.snr

        def build():        # float64 on the host, once: the cache casts it to the tables' dtype for the device
            Kx, K0, Ko = T.eps_linear(R, o.prediction_type, o.clip_sample)
            return torch.stack([Kx, K0, Ko, R.sqrt_one_minus_alpha_bars, R.alphas], dim=1)

        self.aux = plan.tables.cached(("pc_aux", o.prediction_type, o.clip_sample), build)
        self._noise_table = None

    def _kernel_noise(self, plan, ch, x, out, keys):
        """The counter-stream z at noise steps ``keys`` drawn by the kernel into the chunk's float32 buffer: a
        one-row table with σ = 1 and every other coefficient 0 (one launch; capture-safe, unlike eager Philox)."""
        if self._noise_table is None:
            tab = torch.zeros(1, T.NCOL, dtype=torch.float32, device=plan.device)
            tab[0, T.COL["SIGMA"]] = 1.0
            tab[0, T.COL["CLIP"]] = 1.0
            self._noise_table = tab
        ops.fused_step(self._noise_table, ch.zero_rows, x, out, seed=plan.seed, sample_offset=ch.offset,
                       stochastic=True, out=ch.z, return_x0=False, step=keys)
        return ch.z

    def __call__(self, plan: "Plan", ch: "Chunk", rows, out, keys):
        x = ch.x
        B = x.shape[0]
        if plan.fused:
            z = self._kernel_noise(plan, ch, x, out, keys)
        else:
            z = _noise.noise_like(x, plan.seed, keys, ch.offset)               # float32 counter stream
        cdt = plan.tables.dtype
        main = plan.tables["main"][rows].to(cdt)                               # [B, NCOL]: A, B, CLIP at i
        aux = self.aux[rows].to(cdt)                                           # [B, 5]: Kx, K0, Ko, √(1−ᾱ), α'
        A, Bc = main[:, T.COL["A"]], main[:, T.COL["B"]]
        Kx, K0, Ko, s1m, alpha = aux.unbind(1)
        shape = (B,) + (1,) * (x.dim() - 1)
        xc, oc = x.to(cdt), out.to(cdt)
        if plan.opts.clip_sample:
            x0 = A.reshape(shape) * xc + Bc.reshape(shape) * oc
            r = main[:, T.COL["CLIP"]].reshape(shape)
            x0 = x0.clamp(-r, r)
            eps = Kx.reshape(shape) * xc + K0.reshape(shape) * x0
        else:
            eps = Kx.reshape(shape) * xc + Ko.reshape(shape) * oc
        e2 = eps.reshape(B, -1).pow(2).sum(1)                                  # ‖ε̂_b‖²
        z2 = z.to(cdt).reshape(B, -1).pow(2).sum(1)                            # ‖z_b‖²
        # ε_b = 2α (snr ‖z‖/‖s‖)² with ‖s‖ = ‖ε̂‖/√(1−ᾱ); 0 where ‖ε̂‖ = 0
        ok = e2 > 0
        step = torch.where(ok, 2 * alpha * self.snr**2 * z2 * s1m**2 / torch.where(ok, e2, torch.ones_like(e2)),
                           torch.zeros_like(e2))
        Q = -step / s1m                                                        # x += ε_b·s = −ε_b/√(1−ᾱ)·ε̂
        zeros = torch.zeros_like(step)
        cols = [A, Bc, Q * K0, 1 + Q * Kx, Q * Ko, torch.sqrt(2 * step), zeros, zeros,
                main[:, T.COL["CLIP"]], zeros]
        table = torch.stack(cols, dim=1).contiguous()
        plan.apply(table, ch.arange, x, out, dst=x, offset=ch.offset, keys=keys, stochastic=True, noise=z)


# ------------------------------------------------------------------------------------------------ the plan
class Plan:
    """Everything a run needs that does not depend on the chunk: the options, the method's step, the backend, the
    grid, the device tables, the checked model, the seed tensor."""

    def __init__(self, model, sample_shape, schedule: Schedule, opts: SampleOptions, device: torch.device, *,
                 start: int = 0, count: int = 1):
        self.opts = opts
        self.start = start
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.method = METHOD_STEPS[opts.method]
        f64 = opts.dtype == torch.float64
        self.backend = ops.resolve_backend(opts.backend, device, any_f64=f64)
        self.fused = self.backend == "triton"
        self.grid = (FlowGrid if opts.flow else VPGrid)(schedule, opts, device)
        self.N = self.grid.N
        dtype = table_dtype(self.backend, f64)
        self.tables = TableSet(self.grid, opts, self.method.builders(self.grid, opts), device, dtype)
        self.model = ModelCheck(model, opts.learned, dtype)
        self.conditioning = Conditioning(opts, count, device)
        self.seed = _noise.as_seed_tensor(opts.seed, device)
        self.corrector = PerSampleCorrector(self) if self.method.per_sample_corrector(opts) else None

    @property
    def timesteps(self):
        """The model's timestep at each row (host list, for callbacks and messages)."""
        return self.grid.timesteps

    def apply(self, table, rows, x, out, *, dst, offset, keys=None, stochastic, noise=None, base=None,
              return_x0=False, learned=False, guidance=None, history=None, x0_out=None, aux_out=None):
        """x_new = the table update of (x, out[, base | history], z) at ``rows``, written into ``dst``; returns x̂₀
        or None. With ``guidance`` (from :meth:`predict`), ``out`` is the unconditional half and the fused step
        combines the halves (in the kernel's registers on the fused backend). ``x0_out`` / ``aux_out``: buffers the
        step writes x̂₀ / the table's aux output into (a multistep solver's history)."""
        res = ops.fused_step(table, rows, x, out, learned=learned, variance_type=self.opts.variance_type,
                             clip=self.opts.clip_sample, noise=noise, seed=self.seed, sample_offset=offset,
                             stochastic=stochastic, out=dst, return_x0=return_x0 or x0_out is not None, step=keys,
                             base=base, history=history, backend=self.backend, guidance=guidance, x0_out=x0_out,
                             aux_out=aux_out)
        return res.pred_original_sample

    def predict(self, ch: "Chunk", x, t, learned: bool = False):
        """The model at (x, t) for ``apply``: (output, guidance). Unconditioned: ``model(x, t)``; conditioned:
        ``model(x, t, cond)``; guided: one call ``model([x; x], [t; t], [negative; cond])`` on the doubled batch,
        split into the unconditional half (the output) and a :class:`fastrev.kernels.guidance.Guidance` (the
        conditional half and the per-sample combine coefficients). ``learned``: keep the variance channels (the
        conditional half's, with guidance); otherwise only the first C channels are passed on."""
        if ch.guidance_scale is None:
            out = self.model(x, t, ch.cond)
            return (out if learned else self.model.pred(out)), None
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), ch.cond)
        if not learned:
            out = self.model.pred(out)
        return split_guided(out, x, ch.guidance_scale, self.conditioning.rescale, learned=learned)

    def graphable(self, i: int) -> bool:
        return self.method.graphable(self.opts, i)

    @property
    def phases(self) -> int:
        """The number of buffer arrangements the method's steps cycle through (step pos runs phase
        pos % phases; one CUDA graph per phase): 1 except for the multistep solvers' ring buffers."""
        return self.method.phases(self.opts)

    def step(self, ch: "Chunk", i_buf: torch.Tensor, i: int, want_x0: bool, phase: int = 0):
        """One step at row ``i_buf`` (a device buffer: every per-step value is read from it, so the step is
        graph-safe); the host int ``i`` only selects the code path (the ODE's last step), ``phase`` the buffers."""
        rows = i_buf.expand(ch.x.shape[0]).contiguous()
        return self.method.step(self, ch, rows, i, want_x0, phase)


class Chunk:
    """The state of one chunk of samples: x (updated in place; x_T is the counter stream at key N), the scratch its
    method needs (Heun's x', a multistep solver's ring buffers), the chunk's global offset, row indices."""

    def __init__(self, plan: Plan, n: int, offset: int):
        shape = (n,) + plan.sample_shape
        self.offset = offset
        self.cond, self.guidance_scale = plan.conditioning.chunk(offset - plan.start, n)
        empty = torch.empty(shape, dtype=torch.float32, device=plan.device)
        self.x = _noise.noise_like(empty, plan.seed, plan.N, offset).to(plan.opts.dtype)      # x_T: key N
        self.xp = torch.empty_like(self.x) if plan.method.needs_scratch_state(plan.opts) else None
        self.arange = torch.arange(n, dtype=torch.int64, device=plan.device)
        kernel_z = plan.corrector is not None and plan.fused
        self.zero_rows = torch.zeros(n, dtype=torch.int64, device=plan.device) if kernel_z else None
        self.z = torch.empty(shape, dtype=torch.float32, device=plan.device) if kernel_z else None
        self._new_state = lambda x: plan.method.init_state(plan.opts, x)
        self.state = self._new_state(self.x)               # a multistep solver's ring buffers (zeros), or None

    def clone(self) -> "Chunk":
        c = Chunk.__new__(Chunk)
        c.offset, c.arange, c.zero_rows = self.offset, self.arange, self.zero_rows
        c._new_state = self._new_state
        c.cond, c.guidance_scale = self.cond, self.guidance_scale
        c.z = None if self.z is None else torch.empty_like(self.z)
        c.x = self.x.clone()
        c.xp = None if self.xp is None else torch.empty_like(self.xp)
        c.state = c._new_state(c.x)
        return c
