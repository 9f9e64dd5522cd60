"""``fastrev bench`` / ``python -m fastrev.bench``: parse the arguments, run the plan, write the reports."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

import torch

from . import registry
from .common import DTYPES, PROVIDERS, diffusers_available, dtype_name, parse_shape, resolve_device, shape_label
from .kernel_report import kernel_report
from .loop import LOOP_PROVIDERS
from .plan import default_out_dir, default_plan, env_info, repo_root
from .report import derive, markdown, plot, update_results, write_json
from .runner import Runner
from .timing import Timing, busy_warning, machine_load, measure_copy


def _csv(s, cast=str):
    return [cast(v.strip()) for v in s.split(",") if v.strip()] if s else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrev bench", description=(
        "Time fastrev's steps against diffusers, naive eager PyTorch and torch.compile of it (the registry in "
        "fastrev.bench.registry); write the JSON, a markdown table and a plot to --out. Method: docs/benchmarks.md. "
        "Exits 1 when fastrev fails or disagrees with another provider."))
    p.add_argument("--quick", action="store_true", help="the small plan (about a minute on an idle 2-core CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--out", "--out-dir", dest="out", default=None, metavar="DIR",
                   help=f"where the JSON, RESULTS.md and PNG go (default: $FASTREV_BENCH_OUT or {default_out_dir()})")
    p.add_argument("--update-results", nargs="?", const="", default=None, metavar="MD",
                   help="also rewrite this device's section of the tracked bench/RESULTS.md (or of MD) and copy "
                        "the JSON/PNG beside it as results/<device>.*")
    p.add_argument("--benches", default=None, help="comma list of " + ",".join(registry.step_benches() + ["loop"]))
    p.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)}")
    p.add_argument("--loop-providers", default=None, help=f"comma list of {','.join(LOOP_PROVIDERS)}")
    p.add_argument("--shapes", default=None, help="comma list like 1x4x64x64,16x3x256x256")
    p.add_argument("--dtypes", default=None, help=f"comma list of {','.join(DTYPES)}")
    p.add_argument("--compile-shapes", default=None, help="run the compile provider at these shapes only")
    p.add_argument("--loop-shape", default=None, help="shape of the sampling loop")
    p.add_argument("--loop-steps", type=int, default=50)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-check", action="store_true", help="skip the same-work agreement check")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (the rest is reported as skipped)")
    p.add_argument("--kernel-report", default=None, metavar="FILE",
                   help="CUDA: write registers/spills/layout conversions/vector widths of the kernel's variants")
    p.add_argument("--min-time", type=float, default=None, metavar="S",
                   help="CPU: seconds each row's providers are timed together, at least (default 0.5 quick, 2 full)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="explicit JSON path (default: DIR/<device>-<date>.json)")
    return p


def _resolve_plan(args, parser, device) -> dict:
    plan = default_plan(device, args.quick)
    try:
        shapes = _csv(args.shapes, parse_shape)
        compile_shapes = _csv(args.compile_shapes, parse_shape)
        dtypes = [dtype_name(d) for d in (_csv(args.dtypes) or plan["dtypes"])]
        loop_shape = parse_shape(args.loop_shape) if args.loop_shape else tuple(plan["loop_shape"])
    except ValueError as e:
        parser.error(str(e))
    benches = _csv(args.benches) or plan["benches"]
    providers = _csv(args.providers) or plan["providers"]
    for b in benches:
        if b != "loop" and b not in registry.REGISTRY:
            parser.error(f"--benches: unknown bench {b!r} (choose from {', '.join(plan['benches'])})")
    for p in providers:
        if p not in PROVIDERS:
            parser.error(f"--providers: unknown provider {p!r} (choose from {', '.join(PROVIDERS)})")
    loop_providers = _csv(args.loop_providers) or [
        p for p in plan["loop_providers"] if p.split("+")[0] == "model" or p.split("+")[0] in providers]
    for p in loop_providers:
        if p not in LOOP_PROVIDERS:
            parser.error(f"--loop-providers: unknown provider {p!r} (choose from {', '.join(LOOP_PROVIDERS)})")
    if shapes is None:
        shapes = [tuple(s) for s in plan["shapes"]]
    if compile_shapes is None and plan.get("compile_shapes"):
        # the plan restricts compile (CPU --quick): to its shapes among those that run, else the first that runs
        compile_shapes = [s for s in shapes if s in [tuple(c) for c in plan["compile_shapes"]]] or shapes[:1]
    compile_benches = None if args.benches else plan.get("compile_benches")
    return dict(benches=benches, providers=providers, shapes=shapes, dtypes=dtypes, loop_shape=loop_shape,
                loop_providers=loop_providers, compile_shapes=compile_shapes, compile_benches=compile_benches)


def main(argv=None) -> int:
    """``fastrev bench``: 0 when fastrev ran and agreed with every provider, 1 when it failed or disagreed, 2 for bad
    arguments (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, plan, out_dir, results_md = _setup(args, parser)
    timing = Timing.for_mode(args.quick)
    if args.min_time is not None:
        timing = dataclasses.replace(timing, cpu_min_time=args.min_time)
    doc = _new_doc(device, args, plan, timing, out_dir)
    json_path = Path(args.json) if args.json else out_dir / f"{doc['stem']}.json"
    runner = Runner(device, timing, budget_s=args.budget_s, log=lambda s: print(s, flush=True),
                    on_result=lambda: write_json(_snapshot(doc, runner), json_path, partial=True))
    steps = [b for b in plan["benches"] if b != "loop"]
    try:
        if not args.no_check and "fastrev" in plan["providers"]:
            runner.run_check(steps, plan["providers"])
        if "loop" in plan["benches"]:
            runner.run_loop(plan["loop_providers"], plan["loop_shape"], args.loop_steps)
        runner.run_steps(steps, plan["shapes"], plan["dtypes"], plan["providers"], plan["compile_shapes"],
                         plan["compile_benches"])
    except KeyboardInterrupt:          # gpu_check.sh's timeout sends SIGINT: keep and write what was measured
        doc["notes"].append("interrupted (SIGINT / time limit): the cases not reached are missing")
        print("interrupted: writing what was measured", flush=True)
    _write_reports(_snapshot(doc, runner), args, out_dir, json_path, results_md)
    if runner.failures:
        print("fastrev bench: FAILED: " + "; ".join(runner.failures), flush=True)
        return 1
    return 0


def _setup(args, parser):
    """(device, plan, out_dir, RESULTS.md to update or None); argument errors exit 2 with one line."""
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    plan = _resolve_plan(args, parser, device)
    results_md = None
    if args.update_results is not None:
        root = repo_root()
        if args.update_results == "" and root is None:
            parser.error("--update-results without a path needs a fastrev checkout (bench/RESULTS.md) here")
        results_md = Path(args.update_results) if args.update_results else root / "bench" / "RESULTS.md"
    out_dir = Path(args.out) if args.out else default_out_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out_dir}: cannot create it ({e})")
    return device, plan, out_dir, results_md


def _new_doc(device, args, plan, timing, out_dir) -> dict:
    """The run's record before any case: environment, plan, notes (busy warning included), copy ceiling."""
    env = env_info(device)
    notes = _notes(device, args, plan)
    load_start = machine_load()
    print(f"fastrev bench on {env['device']} ({env['device_name']}), torch {env['torch']}, triton {env['triton']}; "
          f"results go to {out_dir}", flush=True)
    warn = busy_warning()
    if warn:
        print(warn, flush=True)
        notes.append(warn.replace("WARNING: ", "Noisy run: "))
    copy = measure_copy(device, timing=timing)
    print(f"copy ceiling: {copy['copy_gbps']:.1f} GB/s", flush=True)
    steps = [b for b in plan["benches"] if b != "loop"]
    return dict(env, stem=f"{env['device']}-{env['date'][:16].replace(':', '')}", busy_at_start=bool(warn),
                copy_gbps=copy["copy_gbps"], copy_bytes=copy["copy_bytes"], notes=notes,
                load={"start": load_start["load1"]}, quick=args.quick, timing=dataclasses.asdict(timing),
                plan={k: ([shape_label(s) for s in v] if k in ("shapes", "compile_shapes") and v else
                          shape_label(v) if k == "loop_shape" else v) for k, v in plan.items()},
                works={b: registry.get(b).what for b in steps},
                bytes_per_elem={b: {d: registry.get(b).bytes_per_elem(d) for d in plan["dtypes"]} for b in steps})


def _write_reports(doc, args, out_dir: Path, json_path: Path, results_md) -> None:
    """Derived figures, PNG, JSON, the run's RESULTS.md; the tracked RESULTS.md only with --update-results."""
    derive(doc["results"], doc["copy_gbps"])
    if not doc["busy_at_start"] and (busy_end := busy_warning()):
        doc["notes"].append(busy_end.replace("WARNING: ", "Noisy run (by its end): "))
    png = None if args.no_plot else plot(doc, out_dir / f"{doc['stem']}.png")
    doc["plot"] = png.name if png else None
    write_json(doc, json_path)
    md = markdown(doc)
    (out_dir / "RESULTS.md").write_text(md)
    if results_md is not None:
        update_results(results_md, md, doc["device"])
        dest = results_md.parent / "results"
        dest.mkdir(exist_ok=True)
        shutil.copyfile(json_path, dest / f"{doc['device']}.json")
        if png:
            shutil.copyfile(png, dest / f"{doc['device']}.png")
        print(f"updated {results_md} and {dest}/{doc['device']}.*", flush=True)
    if args.kernel_report and doc["device"] != "cpu":
        rep = kernel_report()
        Path(args.kernel_report).write_text(rep)
        print(rep, flush=True)
    print("\n" + md, flush=True)
    print(f"wrote {json_path}, {out_dir / 'RESULTS.md'}" + (f" and {png}" if png else "") +
          f" in {doc['elapsed_s']:.0f} s", flush=True)


def _snapshot(doc: dict, runner: Runner) -> dict:
    return dict(doc, results=runner.results, skipped=runner.skipped, check=runner.check, failures=runner.failures,
                elapsed_s=runner.elapsed(), load=dict(doc.get("load", {}), end=machine_load()["load1"]))


def _notes(device, args, plan) -> list:
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: `fastrev` is the op / drop-in with backend='auto', which off CUDA is not the fused "
                     "Triton kernel (docs/devices.md says what runs where): these figures say nothing about the "
                     "kernel. Providers of a row are timed in interleaved rounds; medians of perf_counter times.")
    else:
        notes.append("CUDA run: `fastrev` is the fused Triton kernel; median_us from triton.testing.do_bench "
                     "(event-timed, L2 flushed before each call, median); wall_us = back-to-back calls, host "
                     "overhead included.")
    if args.quick:
        notes.append("--quick: the reduced plan (shapes " + ", ".join(shape_label(s) for s in plan["shapes"]) +
                     "; dtypes " + ", ".join(plan["dtypes"]) + ").")
    if "compile" in plan["providers"] and (plan["compile_benches"] or plan["compile_shapes"]):
        notes.append("compile planned for " + ", ".join(plan["compile_benches"] or ["every step"]) + " at " +
                     ", ".join(shape_label(s) for s in plan["compile_shapes"] or plan["shapes"]) +
                     " (each compile costs seconds; --providers compile --compile-shapes ... for more).")
    ok, dv = diffusers_available()
    notes.append(f"diffusers {dv}" if ok else f"diffusers missing: {dv}")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        notes.append(f"OMP_NUM_THREADS={threads}")
    return notes
