"""Compile the fused kernel for a GPU target on a machine WITHOUT a GPU and report what the compiler made of it.

Triton compiles to PTX and cubin with its bundled ptxas and needs no driver for that, so registers, shared memory,
layout conversions, vector widths and the SASS instruction mix of every variant can be read here, at no device time:

    python bench/kernel_ir.py                       # plain-text report: every variant, fp32 and bf16, sm_90
    python bench/kernel_ir.py --json                # the same as a JSON list (one object per variant and dtype)
    python bench/kernel_ir.py --arch 90 --dtypes fp32 --module path/to/reverse_step.py   # a patched copy

``--module`` loads another copy of the kernel file (to compare a change before a device run). A compile error (for
instance a non-constexpr global read inside the kernel, which Triton >= 3.0 rejects and the interpreter does not) is
reported and makes the exit status 1.

Executed instructions per element (``instr_per_elem``): the SASS is walked from its first instruction along the
path a full tile takes — a conditional branch that jumps forward over a region containing a loop (libdevice's
Payne–Hanek reduction for |x| > 105615 in sinf/cosf, never reached by Box–Muller's arguments in [0, 2π)) is taken,
a backward conditional branch (the kernel's loop over the sub-tiles of a program, when it is not unrolled) is
taken SUBTILES − 1 times, every other conditional branch and every predicated EXIT falls through (all lanes active,
no early exit), an unconditional EXIT ends the walk, and the padding after it (``BRA`` to itself, ``NOP``) is never
reached. Every instruction on the walk counts as one issue slot; the count divided by the elements one thread owns
(BLOCK_N · SUBTILES / (32 · warps)) is ``instr_per_elem``. ``pred_copy_frac_*`` is the roofline prediction of
docs/kernel.md: min(1, budget / instr_per_elem) with budget = issue rate / (copy bandwidth / bytes per element).
A PREDICTION: no GPU has measured it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"                  # compile for real (the interpreter compiles nothing)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_PTRS = ("x_ptr", "out_ptr", "var_ptr", "noise_ptr", "base_ptr", "h0_ptr", "h1_ptr", "h2_ptr", "h3_ptr", "prev_ptr",
         "x0_ptr", "aux_ptr", "cond_ptr")
_DIV16 = ("N", "stride_x", "stride_out", "stride_var", "stride_noise", "stride_base", "stride_h0", "stride_h1",
          "stride_h2", "stride_h3", "stride_prev", "stride_x0", "stride_aux", "stride_cond")
# modes as in fastrev.kernels.modes (plain numbers here: --module may load a copy of the kernel without that module)
CLIP_RANGE, VAR_FIXED, VAR_RANGE, NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 1, 0, 2, 0, 1, 2
VARIANTS = {   # name: constexprs (see kernels/reverse_step.py)
    "ddpm": dict(CLIP_MODE=CLIP_RANGE, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_PHILOX),          # in-kernel noise
    "ddpm_noise": dict(CLIP_MODE=CLIP_RANGE, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_TENSOR),    # caller's noise
    "ddim": dict(CLIP_MODE=CLIP_RANGE, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_NONE),            # η = 0
    "learned_range": dict(CLIP_MODE=CLIP_RANGE, VAR_MODE=VAR_RANGE, NOISE_MODE=NOISE_PHILOX),
    "ddpm_cfg": dict(CLIP_MODE=CLIP_RANGE, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_PHILOX, GUIDED=True),  # guidance
    # the solver history (HISTORY tensors h_j read with columns Dj): a 2M-type multistep step without noise (one
    # earlier x̂₀), and the widest, three with in-kernel noise (run with --variants; not in the default report)
    "hist1_ode": dict(CLIP_MODE=0, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_NONE, HISTORY=1),
    "hist3_sde": dict(CLIP_MODE=0, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_PHILOX, HISTORY=3),
    "hist4_sde": dict(CLIP_MODE=0, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_PHILOX, HISTORY=4),
    # UniPC-like: two earlier x̂₀'s and the aux output (the corrected sample) written in the same pass, no noise
    "hist2_aux": dict(CLIP_MODE=0, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_NONE, HISTORY=2, AUX=True),
    # Euler with churn: the noise enters x̂₀ too (X0_NOISE), the caller's noise tensor / the counter stream
    "ddpm_noise_x0": dict(CLIP_MODE=0, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_TENSOR, X0_NOISE=True),
    "ddpm_x0": dict(CLIP_MODE=0, VAR_MODE=VAR_FIXED, NOISE_MODE=NOISE_PHILOX, X0_NOISE=True),
}
DEFAULT_VARIANTS = ("ddpm", "ddpm_noise", "ddim", "learned_range", "ddpm_cfg", "hist2_aux", "ddpm_noise_x0",
                    "ddpm_x0")
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# the roofline model of docs/kernel.md
ISSUE_RATE = 132 * 4 * 32 * 1.98e9          # H100/H200 SXM: SMs × schedulers × lanes × boost clock, thread-instr/s
HBM = {"h100": 3.35e12, "h200": 4.8e12}     # peak HBM bandwidth, B/s
COPY_EFFICIENCY = 0.9                       # a device-to-device copy reaches ~90 % of HBM peak


def _load(module: str | None):
    if module is None:
        from fastrev.kernels import reverse_step as K
        return K
    spec = importlib.util.spec_from_file_location("reverse_step_under_test", module)
    K = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(K)
    return K


def compile_variant(K, dtype: str, consts: dict, arch, block_n: int, num_warps: int, backend: str = "cuda",
                    subtiles: int | None = None):
    """Compile the kernel for ``backend`` ("cuda": ``arch`` a compute capability, e.g. 90; "hip": an AMD target,
    e.g. "gfx942") with the given storage ``dtype`` and constexprs; returns Triton's CompiledKernel. ``subtiles``:
    tiles per program (default: the module's ``_SUBTILES``; ignored by a kernel without that parameter)."""
    fn = K._reverse_step_kernel
    names = fn.arg_names
    defaults = dict(WRITE_X0=True, SAMPLES=1, BLOCK_N=block_n, INT64=False)
    # the history: HISTORY (0-4 tensors) in this kernel, HAS_BASE (0-1) in older copies (--module)
    if "HISTORY" in names:
        defaults["HISTORY"] = 0
    else:
        defaults["HAS_BASE"] = False
    if "GUIDED" in names:
        defaults["GUIDED"] = False
    for flag in ("AUX", "X0_NOISE"):          # the aux output and x̂₀'s noise term (absent in older copies)
        if flag in names:
            defaults[flag] = False
    if any(k not in names for k in consts):
        raise ValueError(f"this kernel has no constexpr {[k for k in consts if k not in names]}")
    if "SUBTILES" in names:
        defaults["SUBTILES"] = subtiles or getattr(K, "_SUBTILES", 1)
    constexprs = {**defaults, **consts}
    sig = {}
    for n in names:
        if n in _PTRS:
            sig[n] = "*" + dtype
        elif n in ("thresh_ptr", "table_ptr", "guide_ptr"):
            sig[n] = "*fp32"
        elif n in ("t_ptr", "step_ptr", "seed_ptr"):
            sig[n] = "*i64"
        elif n in constexprs:
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in _DIV16}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    warp = 32 if backend == "cuda" else 64
    return triton.compile(src, target=GPUTarget(backend, arch, warp), options={"num_warps": num_warps})


# ------------------------------------------------------------------------------------------------ SASS
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);",
                    re.M)
CLASSES = {    # opcode → class of the per-class breakdown
    "global_mem": ("LDG", "STG", "ATOM", "ATOMG", "RED"),
    "shared_mem": ("LDS", "STS", "LDSM", "ATOMS"),
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET", "FMUL2", "FFMA2", "FADD2", "HFMA2",
             "HADD2", "HMUL2"),
    "int": ("IMAD", "IADD3", "IADD", "LOP3", "SHF", "LEA", "ISETP", "IMNMX", "IABS", "POPC", "FLO", "SEL", "BMSK",
            "SGXT", "PLOP3", "P2R", "R2P", "IMUL", "LOP", "SHL", "SHR", "VIADD", "VIMNMX", "IDP", "BREV"),
    "mufu": ("MUFU",),
    "convert": ("F2F", "I2F", "F2I", "F2FP", "FRND", "I2FP", "F2IP", "I2I"),
    "move": ("MOV", "PRMT", "SHFL", "MOVM"),
    "uniform": ("ULDC", "LDC", "S2R", "S2UR", "CS2R", "R2UR", "UMOV", "UIADD3", "ULOP3", "USHF", "UIMAD", "ULEA",
                "UISETP", "USEL", "UPRMT", "UPLOP3", "USGXT", "UFLO", "UBREV", "UPOPC", "ULDCU"),
    "control": ("BRA", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "CALL", "RET", "NOP", "YIELD", "MEMBAR",
                "ERRBAR", "CCTL", "ELECT", "VOTE", "VOTEU"),
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}


def _class(op: str) -> str:
    if op in _CLASS_OF:
        return _CLASS_OF[op]
    if op.startswith("U"):
        return "uniform"
    return "other"


def parse_sass(sass: str):
    """[(address, predicate or '', opcode, modifiers, operands)] of the first kernel in a cuobjdump listing."""
    return [(int(a, 16), (p or "").strip(), op, mods, ops.strip()) for a, p, op, mods, ops in _INSTR.findall(sass)]


def executed_path(instrs, loop_trips: int = 1) -> list:
    """The instructions a full tile executes, in order (see the module docstring for the rules). A backward
    conditional branch outside a skipped region closes the kernel's own loop over its sub-tiles: it is taken
    ``loop_trips − 1`` times (then falls through)."""
    index = {a: i for i, (a, *_rest) in enumerate(instrs)}

    def target(ops):
        m = re.match(r"(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ops)
        return int(m.group(1), 16) if m and m.group(1) else None

    def has_loop(lo: int, hi: int) -> bool:          # a backward branch inside instrs[lo:hi]
        for a, _p, op, _m, ops in instrs[lo:hi]:
            tgt = target(ops) if op == "BRA" else None
            if tgt is not None and tgt < a:
                return True
        return False

    path, i, guard, taken = [], 0, 0, {}
    while i < len(instrs) and guard < 100_000:
        guard += 1
        a, pred, op, mods, ops = instrs[i]
        path.append(instrs[i])
        if op == "EXIT" and not pred:
            break
        if op == "BRA":
            tgt = target(ops)
            if tgt is None or tgt not in index:
                raise ValueError(f"cannot follow branch at {a:#x}: {ops}")
            j = index[tgt]
            if not pred:
                if j == i:                   # BRA to itself: the padding loop after EXIT
                    path.pop()
                    break
                i = j
                continue
            if j > i and has_loop(i + 1, j):  # skip libdevice's large-argument slow path
                i = j
                continue
            if j < i and taken.get(i, 0) < loop_trips - 1:     # the sub-tile loop: back to its head
                taken[i] = taken.get(i, 0) + 1
                i = j
                continue
        i += 1
    return path


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise FileNotFoundError(f"no cuobjdump in the triton wheel ({tool})")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def occupancy(regs: int, shared: int, num_warps: int) -> float:
    """Resident warps / 64 on an sm_90 SM (65536 registers allocated per warp in 256-register units, 228 KB shared
    memory, at most 32 blocks and 64 warps)."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(32, 65536 // (per_warp * num_warps) if per_warp else 32)
    if shared:
        blocks = min(blocks, (228 * 1024) // (shared + 1024))       # + 1 KB reserved per block
    return min(64, blocks * num_warps) / 64


def bytes_per_element(variant: str, dtype: str, write_x0: bool = True) -> int:
    """Bytes moved per element by a variant: read x and out, write x_{t−1} (and x̂₀), + noise / variance / conditional
    half (guidance) / history reads, + the aux output's write."""
    c = VARIANTS[variant]
    n = 3 + int(write_x0) + int(c["NOISE_MODE"] == NOISE_TENSOR) + int(c["VAR_MODE"] != VAR_FIXED) + \
        int(c.get("GUIDED", False)) + int(c.get("HISTORY", 0)) + int(c.get("AUX", False))
    return n * ELEM_BYTES[dtype]


def roofline(instr_per_elem: float, nbytes: int) -> dict:
    """Predicted fraction of copy bandwidth: min(1, budget / instr_per_elem), budget = ISSUE_RATE · bytes /
    (COPY_EFFICIENCY · HBM) — the instructions per element that fit in the time a copy moves the bytes."""
    res = {}
    for gpu, bw in HBM.items():
        budget = ISSUE_RATE * nbytes / (COPY_EFFICIENCY * bw)
        res[f"budget_{gpu}"] = round(budget, 1)
        res[f"pred_copy_frac_{gpu}"] = round(min(1.0, budget / instr_per_elem), 3)
    return res


def analyse(ck, variant: str, dtype: str, block_n: int, num_warps: int, subtiles: int = 1) -> dict:
    """The JSON record of one compiled sm_90 variant."""
    cubin = ck.asm["cubin"]
    instrs = parse_sass(_cuobjdump(cubin, "-sass"))
    res = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+)", res)
    regs = int(m.group(1)) if m else None
    m = re.search(r"LOCAL:(\d+)", res)
    local = int(m.group(1)) if m else None          # per-thread local memory: register spills
    shared = int(getattr(ck.metadata, "shared", 0) or 0)
    path = executed_path(instrs, loop_trips=subtiles)
    per_thread = max(1, block_n * subtiles // (32 * num_warps))
    classes: dict = {}
    for *_a, op, _m, _o in path:
        c = _class(op)
        classes[c] = classes.get(c, 0) + 1
    ipe = len(path) / per_thread
    nbytes = bytes_per_element(variant, dtype)
    ptx = ck.asm.get("ptx", "")
    return {
        "variant": variant, "dtype": dtype, "block_n": block_n, "subtiles": subtiles, "num_warps": num_warps,
        "regs": regs, "local_bytes": local,
        "shared_bytes": shared, "occupancy": occupancy(regs or 0, shared, num_warps), "elems_per_thread": per_thread,
        "sass_static": len(instrs), "sass_executed": len(path), "instr_per_elem": round(ipe, 2),
        "classes_per_elem": {k: round(v / per_thread, 2) for k, v in sorted(classes.items())},
        "mufu": sum(1 for i in path if i[2] == "MUFU"), "bar_sync": ptx.count("bar.sync"),
        "approx_math": len(re.findall(r"(?:lg2|sin|cos)\.approx", ptx)),
        "bytes_per_elem": nbytes, **roofline(ipe, nbytes),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--block-n", type=int, default=None,
                   help="elements per tile (default: what the module's launcher picks for a large sample)")
    p.add_argument("--num-warps", type=int, default=None, help="default: what the module's launcher picks")
    p.add_argument("--subtiles", type=int, default=None, help="tiles per program (default: the launcher's)")
    p.add_argument("--module", default=None, help="another copy of kernels/reverse_step.py to compile")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the text report")
    args = p.parse_args(argv)
    K = _load(args.module)
    has_subtiles = "SUBTILES" in K._reverse_step_kernel.arg_names
    rc, records = 0, []
    for v in args.variants.split(","):
        for dt in args.dtypes.split(","):
            # the launcher's choice for a large sample (1 sample per program), where the module says it
            if hasattr(K, "launch_config"):
                _s, block_n, subtiles, warps = K.launch_config(1 << 20, ELEM_BYTES[dt], VARIANTS[v]["NOISE_MODE"])
            else:
                block_n, subtiles, warps = getattr(K, "_TILE", 1024), getattr(K, "_SUBTILES", 1), \
                    getattr(K, "_NUM_WARPS", 4)
            block_n, warps = args.block_n or block_n, args.num_warps or warps
            subtiles = (args.subtiles or subtiles) if has_subtiles else 1
            tag = f"{v} {dt} BLOCK_N={block_n}x{subtiles} warps={warps} sm_{args.arch}"
            try:
                ck = compile_variant(K, dt, VARIANTS[v], args.arch, block_n, warps, subtiles=subtiles)
                r = analyse(ck, v, dt, block_n, warps, subtiles)
            except Exception as e:
                msg = str(e).strip().splitlines()
                err = f"{type(e).__name__}: {msg[-1] if msg else ''}"
                records.append({"variant": v, "dtype": dt, "error": err})
                if not args.json:
                    print(f"{tag}: COMPILE FAILED: {err}")
                rc = 1
                continue
            records.append(r)
            if not args.json:
                cls = " ".join(f"{k}={x:g}" for k, x in r["classes_per_elem"].items())
                print(f"{tag}: {r['instr_per_elem']:g} executed instr/elem ({r['sass_executed']} of "
                      f"{r['sass_static']} SASS per thread), regs={r['regs']} occupancy={r['occupancy']:.0%} "
                      f"shared={r['shared_bytes']}B bar.sync={r['bar_sync']} MUFU={r['mufu']}\n"
                      f"   per elem: {cls}\n"
                      f"   {r['bytes_per_elem']} B/elem; budget H100 {r['budget_h100']:g} / H200 {r['budget_h200']:g} "
                      f"instr/elem -> predicted copy fraction H100 {r['pred_copy_frac_h100']:.2f}, "
                      f"H200 {r['pred_copy_frac_h200']:.2f} (a prediction, docs/kernel.md)")
    if args.json:
        print(json.dumps(records, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
