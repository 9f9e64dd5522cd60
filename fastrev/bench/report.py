"""Reporting: derived figures, the markdown table (with the fastrev-vs-diffusers ratios), the plot, the JSON, and
the device sections of bench/RESULTS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from . import registry
from .common import DTYPES, LOOP_STEPS, PROVIDERS

RESULTS_HEADER = ("# fastrev benchmark results\n\n"
                  "Written by `fastrev bench --update-results`: one section per device, replaced by that device's next "
                  "run. How the figures are measured and what the bytes count: [docs/benchmarks.md]"
                  "(../docs/benchmarks.md).\n")


def derive(results: list, copy_gbps: float) -> None:
    """frac_copy for each step entry; speedup_vs (and speedup_vs_wall) for fastrev entries: P's time / fastrev's —
    the median of per-round ratios for providers timed in the same interleaved rounds (CPU), else the ratio of the
    medians (CUDA, and compile, which is timed on its own)."""
    groups = {}
    for r in results:
        if r["bench"] != "loop":
            groups.setdefault((r["bench"], r["shape"], r["dtype"]), {})[r["provider"]] = r
        if r.get("gbps") is not None and copy_gbps:
            r["frac_copy"] = r["gbps"] / copy_gbps
    for g in groups.values():
        f = g.get("fastrev")
        if not f:
            continue
        f["speedup_vs"] = {p: r["median_us"] / f["median_us"] for p, r in g.items() if p != "fastrev"}
        f["speedup_vs"].update(f.get("paired_vs") or {})     # timed in the same rounds: the paired ratio
        if f.get("wall_us"):
            f["speedup_vs_wall"] = {p: r["wall_us"] / f["wall_us"] for p, r in g.items()
                                    if p != "fastrev" and r.get("wall_us")}


def _fmt(v, spec="{:.1f}", missing="—"):
    return missing if v is None else spec.format(v)


def _ordered(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def ratio_table(results: list) -> list:
    """Lines of the fastrev-vs-diffusers table: one row per (bench, dtype), one column per shape."""
    step = [r for r in results if r["bench"] != "loop"]
    rows = _ordered((r["bench"], r["dtype"]) for r in step if r["provider"] == "fastrev"
                    and "diffusers" in r.get("speedup_vs", {}))
    if not rows:
        return []
    shapes = _ordered(r["shape"] for r in step)
    ratio = {(r["bench"], r["dtype"], r["shape"]): r["speedup_vs"]["diffusers"] for r in step
             if r["provider"] == "fastrev" and "diffusers" in r.get("speedup_vs", {})}
    lines = ["fastrev vs diffusers, side by side in this run: **diffusers' time / fastrev's time** "
             "(≥ 1.00× means fastrev is not slower; on the CPU the median over interleaved rounds of the ratio "
             "within a round).", "",
             "| step | dtype | " + " | ".join(shapes) + " |", "|---|---|" + "---|" * len(shapes)]
    for b, d in rows:
        lines.append(f"| {b} | {d} | " + " | ".join(_fmt(ratio.get((b, d, s)), "{:.2f}×") for s in shapes) + " |")
    return lines


def markdown(doc: dict) -> str:
    res = doc["results"]
    load = doc.get("load") or {}
    lines = [f"## {doc['device']} ({doc.get('device_name', '')}) — {doc['date']}", "",
             f"torch {doc['torch']}, triton {doc['triton']}, {doc.get('threads')} torch threads on {doc.get('cpus')} "
             f"CPUs (1-min load average {_fmt(load.get('start'), '{:.1f}')} at start, "
             f"{_fmt(load.get('end'), '{:.1f}')} at end); copy ceiling **{doc['copy_gbps']:.1f} GB/s** "
             f"(dst.copy_(src) of {doc.get('copy_bytes', 0) >> 20} MiB, read + write counted).", ""]
    lines += [f"- {n}" for n in doc.get("notes", [])]
    bpe = doc.get("bytes_per_elem") or {}
    if bpe:
        lines.append("- Bytes moved per element (" + "; ".join(
            f"{b} " + "/".join(f"{v} B {d}" for d, v in per.items()) for b, per in bpe.items()) +
            f"): what is counted is explained in [docs/benchmarks.md](../{registry.BYTES_DOC}).")
    lines.append("")
    rt = ratio_table(res)
    if rt:
        lines += rt + [""]
    step = [r for r in res if r["bench"] != "loop"]
    if step:
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in step)]
        others = [p for p in provs if p != "fastrev"]
        head = (["bench", "shape", "dtype", "MB moved"] + [f"{p} µs" for p in provs] +
                ["fastrev GB/s", "× copy"] + [f"vs {p}" for p in others] + ["spread"])
        lines += ["All cases (median µs; \"vs P\" = P's time / fastrev's, paired per round where timed together; "
                  "spread = largest interquartile range / median among the providers of the row):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in _ordered((r["bench"], r["shape"], r["dtype"]) for r in step):
            g = {r["provider"]: r for r in step if (r["bench"], r["shape"], r["dtype"]) == k}
            f = g.get("fastrev", {})
            spreads = [r["spread"] for r in g.values() if r.get("spread") is not None]
            row = [k[0], k[1], k[2], f"{next(iter(g.values()))['bytes'] / 1e6:.2f}"]
            row += [_fmt(g[p]["median_us"]) if p in g else "—" for p in provs]
            row += [_fmt(f.get("gbps")), _fmt(f.get("frac_copy"), "{:.2f}")]
            row += [_fmt(f.get("speedup_vs", {}).get(p), "{:.2f}×") for p in others]
            row += [f"{max(spreads):.0%}" if spreads else "—"]
            lines.append("| " + " | ".join(row) + " |")
        comp = [r for r in step if r.get("compile_s") is not None]
        if comp:
            lines += ["", "compile warm-up (first call, s): " + ", ".join(
                f"{r['bench']} {r['shape']} {r['dtype']}: {r['compile_s']:.1f}" for r in comp)]
        if doc.get("device") != "cpu" and any(r.get("speedup_vs_wall") for r in step):
            lines += ["", "Back-to-back wall time per call (host overhead included), fastrev speedup:"]
            for r in step:
                if r["provider"] == "fastrev" and r.get("speedup_vs_wall"):
                    lines.append(f"- {r['bench']} {r['shape']} {r['dtype']}: fastrev {r['wall_us']:.1f} µs; " +
                                 ", ".join(f"{p} {v:.2f}×" for p, v in r["speedup_vs_wall"].items()))
    loop = [r for r in res if r["bench"] == "loop"]
    if loop:
        lines += ["", f"Loop: {loop[0].get('steps', LOOP_STEPS)} DDPM steps with a 2-conv model, "
                      f"{loop[0]['shape']} {loop[0]['dtype']}; overhead = (loop − model alone) / steps.", "",
                  "| provider | loop ms | per step µs | sampler overhead µs/step |", "|---|---|---|---|"]
        for r in loop:
            lines.append(f"| {r['provider']} | {r['median_us'] / 1e3:.2f} | {r['per_step_us']:.1f} | "
                         f"{_fmt(r.get('overhead_us_per_step'))} |")
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(
            f"{s.get('bench', '')} {s.get('shape', '')} {s.get('dtype', '')} {s['provider']}: {s['reason']}".strip()
            for s in _dedupe_skips(doc["skipped"]))]
    if doc.get("check"):
        lines += ["", "Same-work check (fp32, relative error against fastrev of x̂₀, and of x_{t−1} where the step is "
                      "deterministic or the noise shared): " + "; ".join(
                          f"{b}: " + ", ".join(f"{p} {_fmt(e, '{:.1e}') if isinstance(e, float) else e}"
                                               for p, e in d.items())
                          for b, d in doc["check"].items())]
    if doc.get("failures"):
        lines += ["", "**FAILURES** (the run exits non-zero): " + "; ".join(doc["failures"])]
    return "\n".join(lines) + "\n"


def _dedupe_skips(skips):
    """Collapse identical (provider, reason) skips over many cases into one line."""
    seen = {}
    for s in skips:
        key = (s["provider"], s["reason"])
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = dict(s, count=1)
    out = []
    for s in seen.values():
        if s["count"] > 1:
            out.append({"provider": s["provider"], "reason": f"{s['reason']} ({s['count']} cases)"})
        else:
            out.append(s)
    return out


def write_json(doc: dict, path: Path, partial: bool = False) -> None:
    """Atomic write (a partial JSON is marked so: a run cut off by a time limit keeps what it measured)."""
    d = dict(doc, partial=True) if partial else doc
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=1, default=str) + "\n")
    tmp.replace(path)


def update_results(path: Path, section: str, device_label: str) -> None:
    """Replace (or append) this device's section of a RESULTS.md, keeping the other devices' sections."""
    begin, end = f"<!-- fastrev-bench:{device_label} -->", f"<!-- /fastrev-bench:{device_label} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        text = RESULTS_HEADER
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot(doc: dict, path: Path) -> Optional[Path]:
    """GB/s against bytes moved per provider, one panel per (bench, dtype); the copy ceiling dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except Exception:
        return None
    step = [r for r in doc["results"] if r["bench"] != "loop" and r.get("gbps")]
    if not step:
        return None
    benches = _ordered(r["bench"] for r in step)
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in step)]
    fig, axes = plt.subplots(len(benches), len(dtypes), figsize=(max(6.0, 4.2 * len(dtypes)), 2.8 * len(benches)),
                             squeeze=False, sharey=True)
    markers = dict(fastrev="o", eager="s", compile="^", diffusers="v")
    colors = dict(fastrev="C0", eager="C1", compile="C2", diffusers="C3")      # the same colour in every panel
    for i, b in enumerate(benches):
        for j, d in enumerate(dtypes):
            ax = axes[i][j]
            for p in PROVIDERS:
                pts = sorted((r["bytes"], r["gbps"]) for r in step
                             if r["bench"] == b and r["dtype"] == d and r["provider"] == p)
                if pts:
                    ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], marker=markers[p], color=colors[p],
                            label=p)
            ax.axhline(doc["copy_gbps"], ls="--", color="gray", lw=1, label="copy")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{b} {d}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(benches) - 1:
                ax.set_xlabel("MB moved per step (minimum)")
            if j == 0:
                ax.set_ylabel("effective GB/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fastrev bench — {doc['device']} — {doc['date'][:10]} (torch {doc['torch']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
