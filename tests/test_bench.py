"""Smoke tests of the benchmark harness (fastrev.bench): it runs, the JSON it writes is valid, the byte counts are the
documented minimum, and every provider computes the same step. Never a speed."""

import json
import math
import sys

import pytest
import torch

from fastrev import bench as fb

REQUIRED = {"device", "torch", "triton", "date", "copy_gbps", "results"}
ENTRY = {"bench", "shape", "dtype", "provider", "median_us", "gbps"}


def _validate(doc):
    assert REQUIRED <= set(doc), f"missing keys: {REQUIRED - set(doc)}"
    assert isinstance(doc["device"], str) and doc["device"]
    assert isinstance(doc["torch"], str)
    assert doc["triton"] is None or isinstance(doc["triton"], str)
    assert isinstance(doc["date"], str) and len(doc["date"]) >= 10
    assert isinstance(doc["copy_gbps"], float) and doc["copy_gbps"] > 0
    assert isinstance(doc["results"], list) and doc["results"]
    for r in doc["results"]:
        assert ENTRY <= set(r), f"entry missing {ENTRY - set(r)}: {r}"
        assert r["bench"] in fb.BENCHES
        assert isinstance(r["median_us"], float) and r["median_us"] > 0 and math.isfinite(r["median_us"])
        if r["bench"] == "loop":
            assert r["gbps"] is None
            assert r["provider"] in fb.LOOP_PROVIDERS
        else:
            assert r["provider"] in fb.PROVIDERS
            assert r["dtype"] in fb.DTYPES
            assert fb.parse_shape(r["shape"])
            assert isinstance(r["gbps"], float) and r["gbps"] > 0
            assert r["bytes"] == fb.bytes_moved(r["bench"], r["shape"], r["dtype"])
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_us"] * 1e-6) / 1e9)


def test_bytes_are_the_documented_minimum():
    assert fb.WORKS["ddpm_step"].bytes_per_elem("float32") == 16
    assert fb.WORKS["ddim_step"].bytes_per_elem("float32") == 16
    assert fb.WORKS["learned_range_step"].bytes_per_elem("float32") == 20
    assert fb.WORKS["ddpm_step"].bytes_per_elem("bfloat16") == 8
    assert fb.WORKS["learned_range_step"].bytes_per_elem("float16") == 10
    assert fb.bytes_moved("ddpm_step", "64x3x256x256", "float32") == 64 * 3 * 256 * 256 * 16
    assert fb.bytes_moved("ddpm_step", "64x3x256x256", "float32") >= 256 * 2**20 * 0.75   # the big shape is big


def test_parse_shape():
    assert fb.parse_shape("1x4x64x64") == (1, 4, 64, 64)
    assert fb.parse_shape("16×3×256×256") == (16, 3, 256, 256)
    assert fb.shape_label((4, 4, 128, 128)) == "4x4x128x128"
    with pytest.raises(ValueError, match="B×C×H×W"):
        fb.parse_shape("4x64x64")
    with pytest.raises(ValueError, match="1x4x64x64"):
        fb.parse_shape("axbxcxd")


@pytest.mark.parametrize("bench", fb.STEP_BENCHES)
def test_providers_compute_the_same_step(bench):
    ok, _ = fb.diffusers_available()
    errs = fb._check_agreement(bench, "cpu", ["eager"] + (["diffusers"] if ok else []))
    assert set(errs) == {"eager"} | ({"diffusers"} if ok else set())
    for p, e in errs.items():
        assert isinstance(e, float) and e < 1e-5, (p, e)


def test_inputs_rotate():
    case = fb.make_case("ddpm_step", (1, 4, 8, 8), "float32", "eager", "cpu")
    assert len(case.inputs) >= 2
    ids = set()
    for _ in range(len(case.inputs)):
        ids.add(id(case.inputs[case._i % len(case.inputs)]))
        prev, x0 = case.call()
        assert prev.shape == (1, 4, 8, 8) and prev.dtype == torch.float32
    assert len(ids) == len(case.inputs)


def test_missing_diffusers_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)        # import diffusers → ImportError
    with pytest.raises(fb.Unavailable, match="diffusers"):
        fb.make_case("ddpm_step", (1, 4, 8, 8), "float32", "diffusers", "cpu")
    rc = fb.main(["--quick", "--device", "cpu", "--benches", "ddpm_step", "--shapes", "1x4x16x16",
                  "--providers", "fastrev,diffusers", "--out-dir", str(tmp_path), "--markdown", "none", "--no-plot",
                  "--no-check"])
    assert rc == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    _validate(doc)
    assert {r["provider"] for r in doc["results"]} == {"fastrev"}
    assert any(s["provider"] == "diffusers" and "diffusers" in s["reason"] for s in doc["skipped"])
    assert any("diffusers missing" in n for n in doc["notes"])


def test_quick_cli_writes_valid_json_markdown_and_plot(tmp_path):
    """`fastrev bench --quick` in small: every bench (loop included), the providers that need no compiler."""
    md = tmp_path / "R.md"
    providers = "fastrev,eager" + (",diffusers" if fb.diffusers_available()[0] else "")
    rc = fb.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--markdown", str(md),
                  "--shapes", "1x4x32x32", "--providers", providers, "--loop-shape", "1x4x16x16",
                  "--loop-steps", "5"])
    assert rc == 0
    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    _validate(doc)
    assert {r["bench"] for r in doc["results"]} == set(fb.BENCHES)
    assert any("reference path" in n for n in doc["notes"])          # the CPU caveat is stated
    for r in doc["results"]:
        if r["provider"] == "fastrev" and r["bench"] != "loop":
            assert set(r["speedup_vs"]) >= {"eager"}
            assert r["frac_copy"] == pytest.approx(r["gbps"] / doc["copy_gbps"])
    loop = {r["provider"]: r for r in doc["results"] if r["bench"] == "loop"}
    assert {"model", "fastrev", "eager"} <= set(loop)
    assert "overhead_us_per_step" in loop["fastrev"]
    text = md.read_text()
    assert "| bench | shape | dtype |" in text and "GB/s" in text and "copy ceiling" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = tmp_path / doc["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_compile_provider_runs(tmp_path):
    """torch.compile of the eager step (C++ through the host compiler on the CPU): it runs and its warm-up is
    reported apart from the timing."""
    rc = fb.main(["--quick", "--device", "cpu", "--benches", "ddim_step", "--shapes", "1x4x16x16",
                  "--providers", "fastrev,compile", "--out-dir", str(tmp_path), "--markdown", "none", "--no-plot",
                  "--no-check"])
    assert rc == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    _validate(doc)
    comp = [r for r in doc["results"] if r["provider"] == "compile"]
    if not comp:
        pytest.skip("torch.compile cannot run here: " + "; ".join(s["reason"] for s in doc["skipped"]))
    assert comp[0]["compile_s"] > 0


@pytest.mark.cuda
def test_cuda_quick_bench_and_graph_loop(tmp_path):
    """On a GPU: the CUDA path of the harness writes valid JSON, and the CUDA-graph loop (t read from device
    tensors) reproduces the plain loop."""
    rc = fb.main(["--device", "cuda", "--benches", "ddpm_step,loop", "--shapes", "1x4x64x64",
                  "--dtypes", "float32", "--providers", "fastrev,eager", "--loop-providers", "fastrev,fastrev+graph",
                  "--loop-steps", "10", "--out-dir", str(tmp_path), "--markdown", "none", "--no-plot"])
    assert rc == 0
    _validate(json.loads(next(tmp_path.glob("*.json")).read_text()))
    tf32 = torch.backends.cudnn.allow_tf32           # TF32 convolutions may pick other algorithms per run: off,
    torch.backends.cudnn.allow_tf32 = False          # so that graph and plain loops compute the same numbers
    try:
        plain = fb.make_loop("fastrev", (2, 4, 32, 32), "cuda", steps=10).call_sync()
        graph = fb.make_loop("fastrev+graph", (2, 4, 32, 32), "cuda", steps=10)
        a = graph.call_sync().clone()
        b = graph.call_sync().clone()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, plain, rtol=1e-5, atol=1e-5)
