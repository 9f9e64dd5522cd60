"""Whole sampling runs on the fused step: ``fastrev.sample(model, shape, schedule, method=...)``.

Layout: :mod:`~fastrev.sampling.options` (:class:`SampleOptions`, the one validated options object),
:mod:`~fastrev.sampling.coefficients` (the methods' tables), :mod:`~fastrev.sampling.methods` (one small step unit
per method), :mod:`~fastrev.sampling.plan` (grid, tables, model checks, per-sample corrector),
:mod:`~fastrev.sampling.graph` (the step loop and CUDA-graph capture), :mod:`~fastrev.sampling.api` (``sample``).
``fastrev.samplers`` re-exports the public names.

Every method is a per-step coefficient table for the one generic fused kernel (:mod:`fastrev.tables`,
:func:`fastrev.ops.fused_step`); a sampling step is one model call plus one launch, except where a method needs
more (Heun's second stage, the Langevin corrector's reduction). Notation of ``shared/seed/reverse-process.md``.

Time and β(t)
-------------
The user's schedule S (the training schedule, or any schedule) is respaced to ``num_steps`` indices
k_{N−1} > … > k_0 (``spaced_timesteps``); R = S.respace(k) is what ``ddpm``/``ddim``/``pc`` step on, and the model is
fed the training timestep ``R.timesteps[i]``. The continuous-time methods (``sde``, ``ode``) measure time τ in units of
S's steps and take β(τ) piecewise constant, β(τ) = −log α_k on (k − 1, k], so that exp(−∫₀^k β) = ᾱ_k exactly at every
grid point: the model's ε at timestep k is then exactly the noise of the SDE's marginal at τ = k (the data are at
τ = −1). Step i goes from τ = k_i to k_{i−1} (k_{−1} = −1) with dt_i = k_i − k_{i−1}.

The methods (tables, row i = respaced index; the per-sample corrector is the one exception)
-------------------------------------------------------------------------------------------
Write ε̂ = Kx·x + K0·x̂₀ + Ko·out for the noise estimate (from the raw output; with ``clip_sample`` re-derived from the
clipped x̂₀, ε̂ = (x − √ᾱ x̂₀)/√(1 − ᾱ), as improved-diffusion does) and s = −ε̂/√(1 − ᾱ_i) for the score.

* ``ddpm``: ancestral sampling, ``tables.ddpm_table`` on R (variance_type as there, learned ones included).
* ``ddim``: DDIM(η), ``tables.ddim_table`` on R (ε̂ from the clipped x̂₀ when ``clip_sample``).
* ``sde``: Euler–Maruyama on the reverse VP-SDE dx = [−½β x − β ∇log p]dt + √β dW̄ backwards in time:
  x ← (1 + ½β dt)x + β dt·s + √(β dt)·z with β = β(k_i), dt = dt_i; no noise on the last step (score_sde's
  ``denoise``: the last step returns its mean).
* ``ode``: the probability-flow ODE dx/dτ = −½β x − ½β ∇log p, integrated backwards with Heun's method (default) or
  Euler (``ode_solver="euler"``). With d(x, τ) = ½β(τ)x + ½β(τ)s(x, τ) (the backward derivative), stage 1 is the
  Euler table x' = x + dt·d(x, k_i); stage 2 is a second table x ← ½x + ½x' + ½dt·d(x', k_{i−1}), linear in
  (x', ε̂(x', k_{i−1}), x): one launch with sample = x', out = the model at (x', k_{i−1}) and the kernel's third state
  ``base`` = x (column D = ½). The last step (to τ = −1, where there is no score) is Euler, so Heun costs 2N − 1
  model calls.
* ``pc``: score_sde's predictor–corrector. Predictor: reverse diffusion on R, x ← (2 − √α'_i)x + β'_i s + √β'_i z
  (no noise on the last step). Before it, ``corrector_steps`` Langevin steps at the same i,
  x ← x + ε s + √(2ε) z, with score_sde's step size ε = 2α'_i (snr ‖z‖ / ‖s‖)² — whose norms score_sde takes as
  **batch means**, so a sample depends on its batch-mates. Here it never does; ``corrector_norms`` picks how:

  - ``"expected"`` (default): the norms are replaced by their per-sample expectations, ‖z‖² → d and
    ‖s‖² → d/(1 − ᾱ_i) (‖ε̂‖² → E‖ε‖² = d), so ε_i = 2α'_i snr² (1 − ᾱ_i) depends on i alone: a table, one fused
    launch. For large d this is what the batch means converge to.
  - ``"sample"``: each sample's own norms, ε_b = 2α'_i (snr ‖z_b‖ / ‖s_b‖)² (0 where ‖s_b‖ = 0). This corrector
    is not a single pass: ε_b needs the norms of the whole sample's score and noise before any element can move
    (a grid-wide reduction). So each step is a reduction pass (ε̂, z and their per-sample norms, in torch), a
    per-sample [B, NCOL] table built on the device with torch ops (no host sync, graph-safe), and one fused launch
    over rows t = arange(B) with that z passed in as the noise tensor (z is the counter stream at the corrector's
    key: drawn by the kernel itself on the fused backend — one launch, graph-safe — and by fastrev.noise on the
    reference).
    Caveat: a step size that depends on the current state (through ‖s_b(x)‖) and on the noise (through ‖z_b‖) is
    no longer a Langevin step with invariant p_t. In high dimension the norms concentrate and it agrees with
    "expected"; in 2-D it is visibly biased (the demo mixture with snr = 0.16: sliced W1 ≈ 0.14 against ≈ 0.03
    for "expected" or data-vs-data, worse with more steps).

* ``euler``: σ-space Euler (k-diffusion ``sample_euler``; diffusers ``EulerDiscreteScheduler`` without churn) on
  σ_i = √((1 − ᾱ_i)/ᾱ_i) of R, ending at σ = 0: x̃ ← x̃ + (σ' − σ)·ε̂ on x̃ = x₀ + σε. The state is kept in the
  model's input coordinates x = x̃/√(σ² + 1) = √ᾱ·x̃ (what diffusers' ``scale_model_input`` feeds the model), so the
  scalings fold into the table: x' = √(ᾱ'/ᾱ)·x + √ᾱ'(σ' − σ)·ε̂ (ᾱ' = ᾱ_{i−1}, 1 after the last step; σ' likewise,
  0 after the last). x_T = z here is x̃_T = √(σ_max² + 1)·z: diffusers' ``init_noise_sigma`` for "leading" spacing
  (for "linspace"/"trailing" diffusers starts from σ_max·z, which differs by the factor √(1 − ᾱ_max)). In exact
  arithmetic this is DDIM(η = 0) (tests hold the two to float64 rounding). The timesteps are the integer respaced
  ones of every VP method: for "leading"/"trailing" diffusers' Euler schedulers visit the same σ (checked against
  diffusers 0.42 loops: equal to float32 rounding); its "linspace" keeps fractional timesteps and interpolates σ.
* ``euler_a``: σ-space Euler-ancestral with η = 1 (k-diffusion ``sample_euler_ancestral``, diffusers
  ``EulerAncestralDiscreteScheduler``): σ_up = σ'·√((σ² − σ'²)/σ²), σ_down = √(σ'² − σ_up²),
  x̃ ← x̃ + (σ_down − σ)·ε̂ + σ_up·z, i.e. x' = √(ᾱ'/ᾱ)·x + √ᾱ'(σ_down − σ)·ε̂ + √ᾱ'σ_up·z; no noise on the last
  step (σ' = 0). In exact arithmetic this is ancestral DDPM with β̃ (same noise keys). Both need σ finite: no zero
  terminal SNR.
* ``flow_euler``: flow-matching Euler for a velocity model v(x, σ) ≈ E[ε − x₀ | x_σ] on the rectified-flow path
  x_σ = (1 − σ)x₀ + σε (diffusers ``FlowMatchEulerDiscreteScheduler``'s update, SD3/Flux): grid
  σ_j = shift·u_j/(1 + (shift − 1)u_j), u = linspace(0, 1, N + 1) (diffusers' own grid is linspace(1, σ_min, N)
  then 0; its drop-in is :mod:`fastrev.diffusers`), step i from σ = σ_{i+1} to σ' = σ_i: x' = x + (σ' − σ)·v,
  x̂₀ = x − σ·v (with ``clip_sample``: v̂ = (x − clip(x̂₀))/σ). The model is fed t = σ·num_train_timesteps
  (float32). x_T = z is exact (the path's marginal at σ = 1 is N(0, I)); no noise after it.

* ``dpmpp_2m``, ``dpmpp_3m``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``: DPM-Solver++ multistep (data prediction,
  midpoint 2nd order), diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type`` "dpmsolver++" /
  "sde-dpmsolver++" and its defaults (first order on the first and the last step, which lands on σ = 0; 3M at
  order ≤ 2 on the second-to-last step when N < 15). The SDE variants draw noise at key i. Default spacing
  "trailing". Tables: :func:`fastrev.sampling.multistep.dpmpp_table`.
* ``unipc``: UniPC bh2 with its corrector (``solver_order`` 1, 2 (default) or 3), diffusers'
  ``UniPCMultistepScheduler``: the corrector of step k and the predictor of step k + 1 in one launch, the corrected
  sample written as the kernel's aux output for the next step's corrector. Default spacing "trailing". Tables:
  :func:`fastrev.sampling.multistep.unipc_table`.

  The multistep methods read their history (earlier x̂₀'s, UniPC's previous corrected sample) in the same pass as
  the step and write the new x̂₀ into a ring buffer that the step does not read (no copies); formulas, table columns
  and bytes per element: docs/samplers.md.

Conditioning and classifier-free guidance
-----------------------------------------
With ``conditioning`` the model is ``model(x, t, cond)`` (cond: the chunk's rows of the conditioning). With
``guidance_scale`` w every model evaluation is one call on the doubled batch, ``model([x; x], [t; t],
[negative_conditioning; conditioning])``, whose [2B, ...] output (unconditional half first) goes to the fused step
with a :class:`fastrev.kernels.guidance.Guidance`: the step runs on u + w·(c − u) (times the ``guidance_rescale``
factor), the halves combined in the kernel's registers on the Triton backend and by
:meth:`~fastrev.kernels.guidance.Guidance.combine` on the eager ones. Each of the steps above is linear in the model
output, so guidance is the same table update on the combined output for every method, Heun's second stage and the
PC corrector included (its per-sample variant combines in its torch reduction pass). A guided run equals an
unguided run of a model that returns u + w·(c − u) itself, with the same seed.

Noise keys (never repeated within a run)
----------------------------------------
The normal for element e of global sample j = start + position at noise step k is Philox(seed; e//4, j, k, 0)
(:mod:`fastrev.noise`). With N = the respaced length: x_T uses k = N; the step at respaced index i (ddpm, ddim, sde,
the pc predictor, euler_a) uses k = i; the pc corrector's j-th step (j = 0, 1, …) at index i uses
k = i + (j + 1)(N + 1). The SDE variants of DPM-Solver++ use k = i too. The ODE, euler, flow_euler, DPM-Solver++
2M/3M and UniPC draw only x_T. A sample therefore depends on (seed, its global
index) alone: never on ``batch_size``, on
the chunk it lands in, or on the backend (the kernel's Philox and torch's agree to a few ulp).

CUDA graphs
-----------
``cuda_graph=True`` captures one whole step (model call(s), the reductions and launches) per chunk, after a warm-up
on a side stream, and replays it with the step index copied into a device buffer: everything per-step (table rows,
model timesteps, noise keys) is computed on the device from that buffer, nothing is a Python scalar frozen into the
graph except the chunk's global sample offset (hence one capture per chunk). The ODE's last (Euler) step runs
eagerly. The multistep methods cycle through ring buffers: one graph per ring arrangement (``Plan.phases``: 2 to
6), captured when it first comes up, all sharing one memory pool. It needs the fused backend and a capturable model
(no host syncs).

Backends
--------
``backend`` is one of ``fastrev.ops.BACKENDS``, resolved by ``ops.resolve_backend`` and run by ``ops.fused_step``:
the sampler has no backend logic of its own. ``"triton"`` runs the fused kernel (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``) from a float32 table; the eager backends run the same update in torch (``"reference"``: in
float64 from the float64 table, cast to ``dtype`` after every step). Tables are float64 for the reference and float32
otherwise (``plan.table_dtype``, which defers to ``ops.table_dtype`` when the ops define it). The fused and reference
backends give the same samples to <= 1e-5 relative in float32.
"""

from .api import noise_keys, sample, sample_range
from .coefficients import (
    beta_dt,
    euler_ancestral_table,
    euler_table,
    flow_euler_table,
    flow_sigmas,
    ode_euler_table,
    ode_heun_table,
    pc_corrector_table,
    pc_predictor_table,
    sde_table,
)
from .multistep import dpmpp_table, unipc_table
from .options import (
    CORRECTOR_NORMS,
    FLOW_METHODS,
    FLOW_PREDICTION,
    METHODS,
    MULTISTEP_METHODS,
    ODE_SOLVERS,
    SAMPLER_BACKENDS,
    VP_METHODS,
    SampleOptions,
)

__all__ = ["sample", "sample_range", "SampleOptions", "METHODS", "VP_METHODS", "FLOW_METHODS", "FLOW_PREDICTION",
           "MULTISTEP_METHODS", "ODE_SOLVERS", "CORRECTOR_NORMS", "SAMPLER_BACKENDS", "noise_keys", "beta_dt",
           "sde_table", "dpmpp_table", "unipc_table", "ode_euler_table", "ode_heun_table", "pc_corrector_table",
           "pc_predictor_table", "euler_table",
           "euler_ancestral_table", "flow_sigmas", "flow_euler_table"]
