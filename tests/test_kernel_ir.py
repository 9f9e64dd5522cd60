"""bench/kernel_ir.py: the offline compile report (sm_90 with Triton's bundled ptxas, no GPU) runs and its JSON has
every field docs/kernel.md describes. No timing or instruction count is asserted here (those are predictions); what
the compiler allocates is: no variant spills registers, and DDPM with the in-kernel noise fits full occupancy (≤ 32
registers at its launch shape, fp32 and bf16: issue 15)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernel_ir.py"


def _kir():
    spec = importlib.util.spec_from_file_location("kernel_ir_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    env = os.environ.get("TRITON_INTERPRET")
    try:
        spec.loader.exec_module(mod)          # sets TRITON_INTERPRET=0 for its own compiles
    finally:
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env
    return mod


def test_json_report_lists_every_variant():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    records = json.loads(res.stdout)
    got = {(r["variant"], r["dtype"]) for r in records}
    want = {(v, d) for v in ("ddpm", "ddpm_noise", "ddim", "learned_range", "ddpm_cfg", "hist2_aux", "ddpm_noise_x0",
                             "ddpm_x0") for d in ("fp32", "bf16")}
    assert want <= got
    for r in records:
        assert "error" not in r, r
        assert r["regs"] > 0 and 0 < r["occupancy"] <= 1
        assert 0 < r["instr_per_elem"] <= r["sass_static"]
        assert sum(r["classes_per_elem"].values()) == pytest.approx(r["instr_per_elem"], abs=0.05)
        for gpu in ("h100", "h200"):
            assert 0 < r[f"pred_copy_frac_{gpu}"] <= 1
        assert r["approx_math"] == 0                  # the accurate libdevice functions: the stream contract
        assert r["local_bytes"] == 0, r               # no register spills
    by = {(r["variant"], r["dtype"]): r for r in records}
    assert by[("ddpm", "fp32")]["bytes_per_elem"] == 16 and by[("ddpm_noise", "bf16")]["bytes_per_elem"] == 10
    assert by[("hist2_aux", "fp32")]["bytes_per_elem"] == 28 and by[("ddpm_noise_x0", "bf16")]["bytes_per_elem"] == 10
    assert by[("ddpm_x0", "fp32")]["bytes_per_elem"] == 16
    for dt in ("fp32", "bf16"):
        assert by[("ddpm", dt)]["regs"] <= 32 and by[("ddpm", dt)]["occupancy"] == 1.0, by[("ddpm", dt)]
    assert (by[("ddpm", "fp32")]["block_n"], by[("ddpm", "fp32")]["num_warps"]) == (256, 2)   # the launcher's shape


def test_text_report_runs():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--variants", "ddim", "--dtypes", "fp32"], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "executed instr/elem" in res.stdout and "predicted copy fraction" in res.stdout


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   FSETP.GT.AND P0, PT, |R2|, 105615, PT ;
        /*0020*/               @P0 BRA 0x0060 ;
        /*0030*/                   FFMA R3, R2, R2, R2 ;
        /*0040*/              @!P1 BRA 0x0030 ;
        /*0050*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0060*/                   MUFU.SIN R5, R2 ;
        /*0070*/              @!P2 EXIT ;
        /*0080*/                   STG.E [R6.64], R5 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
        /*00b0*/                   NOP;
"""


def test_executed_path_rules():
    """A forward branch over a loop (the large-argument reduction) is taken, predicated EXITs fall through, the
    padding after the last EXIT is never reached."""
    kir = _kir()
    path = kir.executed_path(kir.parse_sass(SASS))
    assert [op for _a, _p, op, _m, _o in path] == ["LDC", "FSETP", "BRA", "MUFU", "EXIT", "STG", "EXIT"]
    assert kir.roofline(178.0, 16)["pred_copy_frac_h100"] == pytest.approx(177.5 / 178, abs=1e-3)
    assert kir.roofline(10.0, 8)["pred_copy_frac_h200"] == 1.0
