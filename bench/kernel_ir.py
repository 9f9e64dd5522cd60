"""Compile the fused kernel for a GPU target on a machine WITHOUT a GPU and report what the compiler made of it.

Triton compiles to PTX and cubin with its bundled ptxas and needs no driver for that, so registers, shared memory,
layout conversions, vector widths and the SASS instruction mix of every variant can be read here, at no device time:

    python bench/kernel_ir.py                       # DDPM/DDIM/learned_range variants, fp32 and bf16, sm_90
    python bench/kernel_ir.py --arch 90 --dtypes fp32 --module path/to/reverse_step.py   # a patched copy

``--module`` loads another copy of the kernel file (to compare a change before a device run). Each line gives the
variant, SASS instructions per thread (static count), instructions per element, MUFU (special-function unit) count,
registers, shared memory and the PTX readout of :func:`fastrev.bench._kernel_stats`. A compile error (for instance a
non-constexpr global read inside the kernel, which Triton >= 3.0 rejects and the interpreter does not) is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
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

_PTRS = ("x_ptr", "out_ptr", "var_ptr", "noise_ptr", "base_ptr", "prev_ptr", "x0_ptr")
_DIV16 = ("N", "stride_x", "stride_out", "stride_var", "stride_noise", "stride_base", "stride_prev", "stride_x0")
VARIANTS = {   # name: constexprs (see kernels/reverse_step.py)
    "ddpm": dict(CLIP_MODE=1, VAR_MODE=0, NOISE_MODE=2),
    "ddim": dict(CLIP_MODE=1, VAR_MODE=0, NOISE_MODE=0),
    "learned_range": dict(CLIP_MODE=1, VAR_MODE=2, NOISE_MODE=2),
}


def _load(module: str | None):
    if module is None:
        from fastrev.kernels import reverse_step as K
        return K
    spec = importlib.util.spec_from_file_location("reverse_step_under_test", module)
    K = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(K)
    return K


def compile_variant(K, dtype: str, consts: dict, arch: int, block_n: int, num_warps: int):
    fn = K._reverse_step_kernel
    names = fn.arg_names
    constexprs = {**dict(WRITE_X0=True, HAS_BASE=False, SAMPLES=1, BLOCK_N=block_n, INT64=False), **consts}
    sig = {}
    for n in names:
        if n in _PTRS:
            sig[n] = "*" + dtype
        elif n in ("thresh_ptr", "table_ptr"):
            sig[n] = "*fp32"
        elif n in ("t_ptr", "step_ptr", "seed_ptr"):
            sig[n] = "*i64"
        elif n in constexprs:
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in _DIV16}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _sass_stats(cubin: bytes) -> str:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = tools / "cuobjdump"
    if not cuobjdump.exists():
        return "(no cuobjdump in the triton wheel)", 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    instr = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
    usage = " ".join(re.findall(r"(?:REG|SHARED|LOCAL):\d+", res)[:3])
    return (f"sass={instr} MUFU={sass.count('MUFU')} IMAD={len(re.findall(r'IMAD', sass))} "
            f"FFMA={sass.count('FFMA')} BRA={sass.count('BRA')} {usage}", instr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--block-n", type=int, default=None, help="elements per program (default: the module's _TILE)")
    p.add_argument("--num-warps", type=int, default=None, help="default: the module's _NUM_WARPS")
    p.add_argument("--module", default=None, help="another copy of kernels/reverse_step.py to compile")
    args = p.parse_args(argv)
    K = _load(args.module)
    block_n = args.block_n or getattr(K, "_TILE", 1024)
    warps = args.num_warps or getattr(K, "_NUM_WARPS", 4)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fastrev.bench import _kernel_stats
    rc = 0
    for v in args.variants.split(","):
        for dt in args.dtypes.split(","):
            tag = f"{v} {dt} BLOCK_N={block_n} warps={warps} sm_{args.arch}"
            try:
                ck = compile_variant(K, dt, VARIANTS[v], args.arch, block_n, warps)
            except Exception as e:
                msg = str(e).strip().splitlines()
                print(f"{tag}: COMPILE FAILED: {type(e).__name__}: {msg[-1] if msg else ''}")
                rc = 1
                continue
            sass, instr = _sass_stats(ck.asm["cubin"])
            per_thread = block_n // (32 * warps)
            print(f"{tag}: {sass}  ~{instr / max(per_thread, 1):.0f} static SASS instr/element")
            print("   " + _kernel_stats(ck).split("\n", 1)[1].strip())
    return rc


if __name__ == "__main__":
    sys.exit(main())
