"""What the compiler made of the fused kernel's variants compiled in this process (CUDA): ``fastrev bench
--kernel-report FILE``. Static counts read from the compiled artefacts; costs no device time beyond the run."""

from __future__ import annotations

import re


def _kernel_stats(ck) -> str:
    """One compiled variant (a triton CompiledKernel) → two report lines."""
    try:
        ck._init_handles()             # loads the binary: fills n_regs / n_spills (needs the driver)
    except Exception:
        pass
    asm = ck.asm
    ttgir = asm["ttgir"] if "ttgir" in asm else ""
    ptx = asm["ptx"] if "ptx" in asm else ""
    src = getattr(ck, "src", None)
    consts = {}
    if src is not None and hasattr(src, "constants"):
        for k, v in src.constants.items():
            name = src.fn.arg_names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)
            if name.isupper() and name not in ("B", "N"):
                consts[name] = v
    sig = getattr(src, "signature", {}) or {}
    types = "/".join(str(sig.get(n, "?")) for n in ("x_ptr", "out_ptr", "prev_ptr"))
    md = ck.metadata

    def count(pattern):
        return len(re.findall(pattern, ptx))
    stats = {
        "regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None),
        "shared_B": getattr(md, "shared", None), "warps": getattr(md, "num_warps", None),
        "convert_layout": ttgir.count("convert_layout"), "local_alloc": ttgir.count("local_alloc"),
        "ld.v4": count(r"ld\.global[\w.]*\.v4"), "ld.v2": count(r"ld\.global[\w.]*\.v2"),
        "ld.scalar": count(r"ld\.global(?![\w.]*\.v[24])[\w.]*\s"),
        "st.v4": count(r"st\.global[\w.]*\.v4"), "st.v2": count(r"st\.global[\w.]*\.v2"),
        "st.scalar": count(r"st\.global(?![\w.]*\.v[24])[\w.]*\s"),
        "shared_ld/st": count(r"(?:ld|st)\.shared"), "bar.sync": count(r"bar\.sync"),
        "mul.hi": count(r"mul\.hi\.u32"), "lg2.approx": count(r"lg2\.approx"),
        "sin/cos.approx": count(r"(?:sin|cos)\.approx"), "ex2.approx": count(r"ex2\.approx"),
        "ptx_lines": ptx.count("\n"),
    }
    return (f"- {types} " + " ".join(f"{k}={v}" for k, v in consts.items()) + "\n    " +
            " ".join(f"{k}={v}" for k, v in stats.items()))


def kernel_report() -> str:
    """What the compiler made of every variant of the fused kernel compiled in this process (CUDA): registers,
    spills, shared memory, layout conversions in TTGIR (shared_B > 0 with bar.sync: a shared-memory round trip),
    and static counts of vector vs scalar global accesses and special-function instructions in the PTX (libdevice's
    accurate log/sin/cos show no .approx). Costs no device time beyond the run."""
    try:
        from ..kernels import reverse_step as K
    except Exception as e:  # pragma: no cover
        return f"kernel report unavailable: {e}\n"
    fn = K._reverse_step_kernel
    lines = ["fused kernel variants compiled in this run (static PTX counts, not dynamic):"]
    for _dev, caches in getattr(fn, "device_caches", {}).items():
        cache = caches[0] if isinstance(caches, tuple) else caches
        for ck in list(getattr(cache, "values", lambda: [])()):
            try:
                lines.append(_kernel_stats(ck))
            except Exception as e:  # pragma: no cover - report, never fail the run
                lines.append(f"- (variant not readable: {type(e).__name__}: {e})")
    if len(lines) == 1:
        lines.append("(none: the kernel did not run in this process)")
    return "\n".join(lines) + "\n"
