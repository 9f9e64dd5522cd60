"""The kernel compiles for a real GPU target (sm_90), checked on a machine without a GPU.

The Triton interpreter that runs the numerical tests here accepts code the compiler rejects (a non-constexpr
global read inside the kernel, say), so every mode of the kernel is compiled to a cubin with Triton's bundled
ptxas, in a subprocess without TRITON_INTERPRET (see bench/kernel_ir.py).
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES = [  # dtype, constexprs
    ("fp32", dict(CLIP_MODE=0, VAR_MODE=0, NOISE_MODE=2)),
    ("fp32", dict(CLIP_MODE=1, VAR_MODE=2, NOISE_MODE=2, INT64=True)),
    ("fp32", dict(CLIP_MODE=2, VAR_MODE=1, NOISE_MODE=1, HAS_BASE=True)),
    ("fp32", dict(CLIP_MODE=1, VAR_MODE=3, NOISE_MODE=0, WRITE_X0=False, SAMPLES=256, BLOCK_N=4)),
    ("bf16", dict(CLIP_MODE=1, VAR_MODE=0, NOISE_MODE=2)),
    ("fp16", dict(CLIP_MODE=0, VAR_MODE=2, NOISE_MODE=1, SAMPLES=8, BLOCK_N=128)),
]

SCRIPT = """
import sys, json, importlib.util
spec = importlib.util.spec_from_file_location("kernel_ir", sys.argv[1])
kir = importlib.util.module_from_spec(spec); spec.loader.exec_module(kir)
from fastrev.kernels import reverse_step as K
for dtype, consts in json.loads(sys.argv[2]):
    block_n = consts.pop("BLOCK_N", 1024)
    ck = kir.compile_variant(K, dtype, consts, 90, block_n, 4)
    assert ck.asm.get("cubin"), "no cubin"
    print("ok", dtype, consts)
"""


def test_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    import json

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "bench" / "kernel_ir.py"), json.dumps(CASES)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("ok") == len(CASES)
