"""Command line of fastrev.

    fastrev demo       sample a 2-D Gaussian mixture with every method; print quality, wall time and the fused vs
                       reference step throughput; write a PNG of the samples over the true density
    fastrev sample     one sampling run of the demo model, saved with torch.save (--demo gmm)
    fastrev selfcheck  a short self-check of the reference (and of the fused kernel on CUDA) on this device
    fastrev bench ...  the benchmarks (fastrev.bench; the remaining arguments are passed on)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

from . import __version__
from .ops import BACKENDS  # --backend accepts the library's one vocabulary

# steps per method in the demo: about 100 model evaluations each (Heun costs 2N − 1, PC with one corrector step 2N)
DEMO_STEPS = {"ddpm": 100, "ddim": 100, "sde": 100, "ode": 50, "pc": 50, "euler": 100, "euler_a": 100,
              "flow_euler": 100, "dpmpp_2m": 100, "dpmpp_3m": 100, "dpmpp_2m_sde": 100, "dpmpp_3m_sde": 100,
              "unipc": 100}
DEMO_MODELS = ("gmm",)


class CliError(Exception):
    """A command line that cannot work, found before any sampling starts: ``main`` prints it as one line
    (``fastrev <command>: <message>``) on stderr and returns 2, without a traceback."""


def _device(name) -> torch.device:
    """``--device`` as a torch.device that exists on this machine (default: cuda if available, else cpu)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device must be a device like 'cpu', 'cuda' or 'cuda:1', got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CliError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CliError(f"--device {name}: MPS is not available in this torch build or on this machine; "
                           f"use --device cpu")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is None or not getattr(module, "is_available", lambda: False)():
            raise CliError(f"--device {name}: no {device.type!r} device is available; use --device cpu or cuda")
    return device


def _check_backend(backend: str, device: torch.device) -> None:
    """``--backend`` can run on ``device`` (the library's own rule, fastrev.ops.resolve_backend)."""
    from .ops import resolve_backend
    try:
        resolve_backend(backend, device)
    except (RuntimeError, ValueError, TypeError) as e:
        if backend == "triton" and device.type == "cpu":
            raise CliError("--backend triton needs a CUDA device, or on CPU the Triton interpreter "
                           "(TRITON_INTERPRET=1 in the environment); use --backend auto, torch or reference "
                           "on CPU") from None
        raise CliError(f"--backend {backend} cannot run on --device {device} ({e}); use --backend auto") from None


def _check_writable(option: str, path) -> None:
    """``path`` can be written (a file in an existing folder): checked before sampling, so a run is not lost to a
    typo at the very end. Probes by opening for append (an existing file is left unchanged, a new one removed)."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise CliError(f"{option} {path}: is a folder, expected a file name")
    if not p.parent.is_dir():
        raise CliError(f"{option} {path}: the folder {str(p.parent)!r} does not exist")
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as e:
        raise CliError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    if not existed:
        p.unlink(missing_ok=True)


def _nfe(method, steps, corrector_steps=1, ode_solver="heun"):
    if method == "ode" and ode_solver == "heun":
        return 2 * steps - 1
    if method == "pc":
        return steps * (1 + corrector_steps)
    return steps


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ConstModel:
    """A model that costs nothing: returns one fixed tensor (per shape), so a run times the sampler's steps alone."""

    def __init__(self, dim, device, dtype):
        self.cache = {}
        self.device, self.dtype, self.dim = device, dtype, dim

    def __call__(self, x, t):
        out = self.cache.get(x.shape)
        if out is None:
            g = torch.Generator().manual_seed(0)
            out = (0.5 * torch.randn(x.shape, generator=g)).to(self.device, self.dtype)
            self.cache[x.shape] = out
        return out


def _step_us(method, schedule, n, device, backend, steps, repeats=3):
    """Microseconds per sampling step (launches + their host overhead, no model) of a run with ``backend``."""
    from .samplers import sample
    model = _ConstModel(2, device, torch.float32)
    kw = dict(method=method, num_steps=steps, seed=0, device=device, backend=backend)
    sample(model, (n, 2), schedule, **{**kw, "num_steps": 2})          # warm-up: compile, caches
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        sample(model, (n, 2), schedule, **kw)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1e6


def _fused_available(device) -> bool:
    return device.type == "cuda"


def _plot(path, gmm, panels, title=None) -> bool:
    """Scatter plots of samples over the true density; False (with a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastrev: matplotlib is not installed (pip install 'fastrev[bench]'): skipping the PNG",
              file=sys.stderr)
        return False
    lim = 2.4
    grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    logp = gmm.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)).reshape(gx.shape)
    dens = logp.clamp(min=-8.0)                     # log density: the tails of the mixture stay visible
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels, strict=True):
        ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=16, cmap="Blues")
        p = pts.detach().to("cpu", torch.float64)[:2000]
        ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=2, c="tab:red", alpha=0.5, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ commands
def _cmd_demo(args) -> int:
    from .models import GaussianMixture, sliced_wasserstein
    from .samplers import FLOW_METHODS, METHODS, sample
    from .schedule import Schedule

    device = _device(args.device)
    if not args.no_plot:
        _check_writable("--png", args.png)
    schedule = Schedule.linear()
    gmm = GaussianMixture.demo_2d(schedule)
    n = args.num_samples
    methods = args.methods or list(METHODS)
    fused = _fused_available(device)
    backend = "triton" if fused else "torch"         # the default path of the device (ops.resolve_backend)
    refs = [gmm.sample(n, torch.Generator().manual_seed(args.seed + 1 + j)) for j in range(4)]
    data = refs[0]
    dd = 0.5 * (sliced_wasserstein(refs[0], refs[1]) + sliced_wasserstein(refs[2], refs[3]))
    print(f"fastrev demo: 2-D Gaussian mixture ({gmm.num_components} components), {n} samples, linear schedule "
          f"(1000 steps), device {device} ({'fused kernel' if fused else 'float32 torch path'}), "
          f"torch {torch.__version__}")
    header = (f"{'method':<13}{'steps':>6}{'NFE':>6}{'SW1 vs data':>13}{'data vs data':>14}{'wall s':>9}"
              f"{'fastrev us/step':>16}{'ref us/step':>13}{'speedup':>9}")
    print(header)
    print("-" * len(header))
    panels = [("data", data)]
    for m in methods:
        steps = args.num_steps or DEMO_STEPS[m]
        _sync(device)
        t0 = time.perf_counter()
        model = GaussianMixture.demo_2d(schedule, "flow_prediction") if m in FLOW_METHODS else gmm
        x = sample(model, (n, 2), schedule, method=m, num_steps=steps, seed=args.seed, device=device,
                   backend=backend)
        _sync(device)
        wall = time.perf_counter() - t0
        sw = sum(sliced_wasserstein(x, r) for r in refs) / len(refs) if torch.isfinite(x).all() else float("inf")
        tsteps, reps = (steps, 3) if device.type == "cuda" else (min(steps, 20), 1)
        ref_us = fus_us = None
        if not args.no_throughput:
            ref_us = _step_us(m, schedule, n, device, "reference", tsteps, reps)
            fus_us = _step_us(m, schedule, n, device, backend, tsteps, reps)
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        speed = f"{ref_us / fus_us:.1f}x" if fus_us and ref_us else "n/a"
        print(f"{m:<13}{steps:>6}{_nfe(m, steps):>6}{sw:>13.4f}{dd:>14.4f}{wall:>9.2f}{fmt(fus_us):>16}"
              f"{fmt(ref_us):>13}{speed:>9}")
        panels.append((f"{m} ({steps} steps): SW1 {sw:.3f}", x))
    print(f"(SW1: sliced Wasserstein-1 over 256 projections, mean against 4 fresh draws of {n} data points; data vs "
          f"data: the same distance between independent draws of the data, the floor at this sample size. "
          f"us/step: one sampling step without the model (launches and host overhead), best of "
          f"{3 if device.type == 'cuda' else 1}; fastrev: the {'fused kernel' if fused else 'float32 torch path'}, "
          f"ref: the float64 reference{'' if fused else '; the fused kernel needs a CUDA device'}.)")
    if not args.no_plot:
        if _plot(args.png, gmm, panels, title=f"fastrev samplers on a 2-D Gaussian mixture ({n} samples)"):
            print(f"wrote {args.png}")
    return 0


def _cmd_sample(args) -> int:
    from .models import GaussianMixture, sliced_wasserstein
    from .samplers import FLOW_METHODS, sample
    from .schedule import Schedule

    device = _device(args.device)
    _check_backend(args.backend, device)
    _check_writable("--out", args.out)
    if args.plot:
        _check_writable("--plot", args.plot)
    schedule = Schedule.linear()
    gmm = GaussianMixture.demo_2d(schedule, "flow_prediction" if args.method in FLOW_METHODS else "epsilon")
    steps = args.num_steps or DEMO_STEPS[args.method]
    kw = {}
    if args.eta is not None:
        kw["eta"] = args.eta
    kw.update(method=args.method, num_steps=steps, timestep_spacing=args.timestep_spacing, seed=args.seed,
              batch_size=args.batch_size, progress=args.progress, cuda_graph=args.cuda_graph, backend=args.backend)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = 0
    try:
        if world > 1 or args.shard_dir is not None:
            # under torchrun: each rank samples its share of the global indices (fastrev.distributed); the
            # gathered result is the one-process result bit for bit; rank 0 writes --out
            from . import distributed
            if args.device is not None:
                kw["device"] = device
            x = distributed.sample(gmm, (args.num_samples, 2), schedule, shard_dir=args.shard_dir, **kw)
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank()
                dist.barrier()
                dist.destroy_process_group()
        else:
            x = sample(gmm, (args.num_samples, 2), schedule, device=device, **kw)
    except (ValueError, TypeError) as e:
        print(f"fastrev sample: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    torch.save(x.cpu(), args.out)
    data = gmm.sample(args.num_samples, torch.Generator().manual_seed(args.seed + 1))
    dd = sliced_wasserstein(data, gmm.sample(args.num_samples, torch.Generator().manual_seed(args.seed + 2)))
    sw = sliced_wasserstein(x, data)
    print(f"wrote {args.num_samples} samples ({args.method}, {steps} steps, seed {args.seed}) to {args.out}: "
          f"sliced W1 vs data {sw:.4f} (data vs data {dd:.4f})")
    if args.plot:
        if _plot(args.plot, gmm, [("data", data), (f"{args.method} ({steps} steps): SW1 {sw:.3f}", x)]):
            print(f"wrote {args.plot}")
    return 0


def _cmd_selfcheck(args) -> int:
    from .selfcheck import selfcheck
    return selfcheck(device=_device(args.device))


def _cmd_bench(argv) -> int:
    from . import bench
    return int(bench.main(list(argv)) or 0)


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .samplers import METHODS

    parser = argparse.ArgumentParser(prog="fastrev", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastrev {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="sample a 2-D Gaussian mixture with every method; table and PNG")
    p.add_argument("--num-samples", type=_positive_int, default=4096)
    p.add_argument("--num-steps", type=_positive_int, default=None,
                   help="steps for every method (default: about 100 model evaluations per method)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--png", default="fastrev_demo.png", help="where to write the plot (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-throughput", action="store_true", help="skip the step-throughput columns")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sample", help="one sampling run of a demo model, saved with torch.save")
    p.add_argument("--demo", choices=DEMO_MODELS, required=True, help="the model: gmm (the demo's 2-D mixture)")
    p.add_argument("--method", choices=METHODS, default="ddpm")
    p.add_argument("--num-samples", type=_positive_int, default=1000)
    p.add_argument("--num-steps", type=_positive_int, default=None, help="default: the demo's for the method")
    p.add_argument("--timestep-spacing", default=None, help="default: leading (not for flow_euler)")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta (method ddim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: the fused kernel on CUDA, a torch path elsewhere; triton: the fused kernel; torch: "
                        "float32 eager torch; reference: the float64 oracle (default: %(default)s)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--out", required=True, help="FILE.pt: the samples tensor (torch.save)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot the samples over the true density")
    p.add_argument("--shard-dir", default=None, metavar="DIR",
                   help="under torchrun: also write each rank's shard there (fastrev.distributed)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("selfcheck", help="self-check of the reference and the kernel on this device")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_selfcheck)

    sub.add_parser("bench", help="benchmarks (fastrev.bench): remaining arguments are passed on", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"fastrev {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
