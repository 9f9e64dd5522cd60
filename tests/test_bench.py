"""Tests of the benchmark harness (fastrev.bench): the registry, the same-work check, the exit status, where results
go, the JSON/markdown it writes, the busy warning. Tiny shapes; never a speed."""

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

import fastrev.bench as fb
from fastrev import cli
from fastrev.bench import registry, report, timing
from fastrev.bench.registry import StepBench

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"device", "torch", "triton", "date", "copy_gbps", "results", "failures", "check", "skipped"}
ENTRY = {"bench", "shape", "dtype", "provider", "median_us", "gbps"}
HAS_DIFFUSERS = fb.diffusers_available()[0]
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
TINY = ["--quick", "--device", "cpu", "--shapes", "1x4x8x8", "--no-plot", "--min-time", "0.01"]


def _validate(doc):
    assert REQUIRED <= set(doc), f"missing keys: {REQUIRED - set(doc)}"
    assert isinstance(doc["device"], str) and doc["device"]
    assert isinstance(doc["date"], str) and len(doc["date"]) >= 10
    assert isinstance(doc["copy_gbps"], float) and doc["copy_gbps"] > 0
    assert isinstance(doc["results"], list) and doc["results"]
    for r in doc["results"]:
        assert ENTRY <= set(r), f"entry missing {ENTRY - set(r)}: {r}"
        assert isinstance(r["median_us"], float) and r["median_us"] > 0 and math.isfinite(r["median_us"])
        if r["bench"] == "loop":
            assert r["gbps"] is None and r["provider"] in fb.LOOP_PROVIDERS
        else:
            assert r["bench"] in fb.REGISTRY and r["provider"] in fb.PROVIDERS and r["dtype"] in fb.DTYPES
            assert r["bytes"] == fb.bytes_moved(r["bench"], r["shape"], r["dtype"])
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_us"] * 1e-6) / 1e9)


def _run(tmp_path, *args):
    rc = fb.main([*TINY, "--out", str(tmp_path), *args])
    doc = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    return rc, doc


@pytest.fixture
def temp_entry():
    """Register entries for one test, then remove them."""
    names = []

    def add(**kw):
        e = StepBench(**{"what": "test entry", "reads": 2, "writes": 2, **kw})
        registry.register(e)
        names.append(e.name)
        return e
    yield add
    for n in names:
        registry.unregister(n)


def _eager_ddim(device, dtype):            # a deterministic step: DDIM η=0 at t=500 of 50 leading steps
    return registry.eager_ddim(0.0)(device, dtype)


# ------------------------------------------------------------------------------------------------ registry
def test_bytes_are_the_documented_minimum():
    b = fb.REGISTRY
    assert b["ddpm_step"].bytes_per_elem("float32") == 16 and b["ddim_step"].bytes_per_elem("bfloat16") == 8
    assert b["learned_range_step"].bytes_per_elem("float32") == 20
    assert b["learned_range_step"].bytes_per_elem("float16") == 10
    assert b["ddpm_dropin_exact"].bytes_per_elem("float32") == 20      # the generator's noise is read
    assert b["ddim_dropin_fast"].bytes_per_elem("float32") == 16
    assert fb.bytes_moved("ddpm_step", "64x3x256x256", "float32") == 64 * 3 * 256 * 256 * 16


def test_registry_holds_the_drop_in_entries_of_issue_12():
    assert {"ddpm_step", "ddpm_dropin_exact", "ddpm_dropin_fast", "ddim_dropin_exact",
            "ddim_dropin_fast"} <= set(fb.step_benches())
    for name in fb.step_benches():
        e = fb.REGISTRY[name]
        assert e.fastrev is not None and e.what and e.reads >= 2
    with pytest.raises(ValueError, match="already registered"):
        registry.register(fb.REGISTRY["ddpm_step"])
    with pytest.raises(ValueError, match="unknown bench"):
        registry.get("nope")


def test_the_package_is_installed_with_fastrev():
    """fastrev.bench is a subpackage: the wheel must list it (setuptools' explicit package list)."""
    assert '"fastrev.bench"' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "fastrev" / "bench" / "__main__.py").exists()       # python -m fastrev.bench (gpu_check.sh)


def test_every_steps_module_is_discovered():
    """A new family of steps is a new fastrev/bench/steps_<family>.py: imported with fastrev.bench, no other edit."""
    mods = sorted(p.stem for p in (ROOT / "fastrev" / "bench").glob("steps_*.py"))
    assert {"steps_ddpm_ddim", "steps_dropins"} <= set(mods)
    assert all(f"fastrev.bench.{m}" in sys.modules for m in mods)


def test_parse_shape():
    assert fb.parse_shape("1x4x64x64") == (1, 4, 64, 64)
    assert fb.parse_shape("16×3×256×256") == (16, 3, 256, 256)
    assert fb.shape_label((4, 4, 128, 128)) == "4x4x128x128"
    with pytest.raises(ValueError, match="B×C×H×W"):
        fb.parse_shape("4x64x64")
    with pytest.raises(ValueError, match="1x4x64x64"):
        fb.parse_shape("axbxcxd")


@pytest.mark.parametrize("bench", fb.step_benches())
def test_providers_compute_the_same_step(bench):
    """x̂₀ of every provider equals fastrev's; x_{t−1} too where the entry says so (DDIM η=0; exact mode with the
    same generator seed as diffusers)."""
    errs = fb.check_agreement(bench, "cpu", ["eager", "diffusers"], shape=(2, 3, 8, 8))
    if not HAS_DIFFUSERS:
        assert errs["diffusers"].startswith("unavailable")
        errs.pop("diffusers")
    for p, e in errs.items():
        assert isinstance(e, float) and e < 1e-5, (bench, p, e)


def test_the_check_catches_a_wrong_step(temp_entry):
    """A deliberately wrong fastrev (x̂₀ off by 1e-4 relative; or NaN) is a disagreement."""
    def off(scale):
        def build(device, dtype):
            f = _eager_ddim(device, dtype)
            return lambda inp: tuple(v * scale for v in f(inp.x, inp.t, inp.out))
        return build
    t = registry.schedules()[2]
    temp_entry(name="t_off", fastrev=off(1.0001), eager=_eager_ddim, t_index=t)
    temp_entry(name="t_nan_eager", fastrev=off(1.0), eager=lambda d, dt: lambda x, t, o: (x * math.nan, x * math.nan),
               t_index=t)
    tol = fb.runner.CHECK_TOL
    errs = fb.check_agreement("t_off", "cpu", ["eager"])
    assert errs["eager"] > tol and fb.cases.disagreements(errs, tol) == {"eager": errs["eager"]}
    errs = fb.check_agreement("t_nan_eager", "cpu", ["eager"])
    assert fb.cases.disagreements(errs, tol)                           # NaN never passes


def test_inputs_rotate():
    case = fb.make_case("ddpm_step", (1, 4, 8, 8), "float32", "eager", "cpu")
    assert len(case.inputs) >= 2
    for _ in range(len(case.inputs)):
        prev, x0 = case.call()
        assert prev.shape == (1, 4, 8, 8) and prev.dtype == torch.float32
    assert len({id(i) for i in case.inputs}) == len(case.inputs)


# ------------------------------------------------------------------------------------------------ Euler, guided
EULER_GUIDED = ["euler_dropin", "euler_a_dropin_exact", "euler_a_dropin_fast", "flow_euler_dropin", "guided_ddpm_step"]


def test_euler_and_guided_entries_bytes():
    b = fb.REGISTRY
    assert {n: b[n].bytes_per_elem("float32") for n in EULER_GUIDED} == {
        "euler_dropin": 16, "euler_a_dropin_exact": 20, "euler_a_dropin_fast": 16, "flow_euler_dropin": 12,
        "guided_ddpm_step": 20}     # exact: the generator's noise is read; flow: no x̂₀; guided: 2 halves read
    assert b["guided_ddpm_step"].bytes_per_elem("bfloat16") == 10
    inp = b["guided_ddpm_step"].inputs((2, 3, 4, 4), "float32", "cpu", torch.Generator().manual_seed(0))
    assert inp.out.shape == (4, 3, 4, 4) and inp.x.shape == (2, 3, 4, 4)


@needs_diffusers
@pytest.mark.parametrize("bench", ["euler_dropin", "euler_a_dropin_fast", "flow_euler_dropin"])
@pytest.mark.parametrize("provider", ["fastrev", "diffusers"])
def test_stateful_schedulers_run_the_same_step_every_call(bench, provider):
    """The step index is reset inside the callable: repeated calls on one input give the same x̂₀ (and x_{t−1} where
    no noise is drawn); without the reset the second call would be the next step."""
    case = fb.make_case(bench, (1, 3, 8, 8), "float32", provider, "cpu", n_sets=1)
    a, b = case.call(), case.call()
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    if bench != "euler_a_dropin_fast":
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_the_check_catches_a_wrong_guidance_scale(temp_entry):
    """A fused guided step at w·1.001 is a disagreement with the guided entry's eager combine + step."""
    from fastrev.bench import steps_guided as G
    from fastrev.ops import ddpm_step

    def wrong(device, dtype):
        base = registry.schedules()[0]
        return lambda inp: ddpm_step(inp.out, inp.t, inp.x, base, clip_sample=True, seed=0,
                                     guidance_scale=G.GUIDANCE * 1.001)
    g = fb.REGISTRY["guided_ddpm_step"]
    temp_entry(name="t_wrong_w", fastrev=wrong, eager=g.eager, make_inputs=g.make_inputs, model_channels=2)
    errs = fb.check_agreement("t_wrong_w", "cpu", ["eager"], shape=(2, 3, 8, 8))
    assert fb.cases.disagreements(errs, fb.runner.CHECK_TOL), errs


@needs_diffusers
def test_euler_and_guided_entries_run_and_pass(tmp_path):
    rc, doc = _run(tmp_path, "--benches", ",".join(EULER_GUIDED), "--providers", "fastrev,diffusers,eager")
    assert rc == 0, doc["failures"]
    _validate(doc)
    assert {r["bench"] for r in doc["results"]} == set(EULER_GUIDED)
    for n in EULER_GUIDED:
        assert all(isinstance(e, float) and e < 1e-5 for e in doc["check"][n].values()), doc["check"][n]


# ------------------------------------------------------------------------------------------------ exit status
def test_a_new_entry_is_benchmarked_and_the_run_passes(tmp_path, temp_entry):
    """Registering one StepBench is all a new step needs: it is timed against its providers and checked."""
    t = registry.schedules()[2]
    temp_entry(name="t_good", fastrev=lambda d, dt: (lambda f: lambda inp: f(inp.x, inp.t, inp.out))(
        _eager_ddim(d, dt)), eager=_eager_ddim, t_index=t, compare_prev=("eager",))
    rc, doc = _run(tmp_path, "--benches", "t_good", "--providers", "fastrev,eager")
    assert rc == 0, doc["failures"]
    _validate(doc)
    assert {(r["bench"], r["provider"]) for r in doc["results"]} == {("t_good", "fastrev"), ("t_good", "eager")}
    assert doc["check"]["t_good"]["eager"] == 0.0 and doc["failures"] == []


@pytest.mark.parametrize("how", ["raises", "disagrees", "nan"])
def test_exit_status_is_nonzero_when_fastrev_fails_or_disagrees(tmp_path, temp_entry, how, capsys):
    t = registry.schedules()[2]

    def bad(device, dtype):
        f = _eager_ddim(device, dtype)

        def g(inp):
            if how == "raises":
                raise RuntimeError("deliberately broken")
            prev, x0 = f(inp.x, inp.t, inp.out)
            return prev, x0 * (1.01 if how == "disagrees" else math.nan)
        return g
    temp_entry(name="t_bad", fastrev=bad, eager=_eager_ddim, t_index=t)
    rc = cli.main(["bench", *TINY, "--out", str(tmp_path), "--benches", "t_bad", "--providers", "fastrev,eager"])
    assert rc == 1
    doc = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert doc["failures"] and all("t_bad" in f for f in doc["failures"])
    assert "FAILED" in capsys.readouterr().out
    assert "**FAILURES**" in (tmp_path / "RESULTS.md").read_text()


def test_bad_arguments_exit_2(tmp_path, capsys):
    for args in (["--benches", "nope"], ["--providers", "nope"], ["--shapes", "1x2"], ["--device", "mps"]):
        with pytest.raises(SystemExit) as e:
            fb.main([*TINY, "--out", str(tmp_path), *args])
        assert e.value.code == 2
    assert "unknown bench 'nope'" in capsys.readouterr().err


def test_missing_diffusers_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)        # import diffusers → ImportError
    with pytest.raises(fb.Unavailable, match="diffusers"):
        fb.make_case("ddpm_step", (1, 4, 8, 8), "float32", "diffusers", "cpu")
    rc, doc = _run(tmp_path, "--benches", "ddpm_step,ddpm_dropin_fast", "--providers", "fastrev,diffusers")
    assert rc == 0, doc["failures"]
    _validate(doc)
    assert {(r["bench"], r["provider"]) for r in doc["results"]} == {("ddpm_step", "fastrev")}
    assert any(s["provider"] == "diffusers" and "diffusers" in s["reason"] for s in doc["skipped"])
    assert any("diffusers missing" in n for n in doc["notes"])


# ------------------------------------------------------------------------------------------------ outputs
def test_quick_cli_writes_json_markdown_ratios_and_plot(tmp_path):
    """`fastrev bench --quick` in small: every step and the loop, the providers that need no compiler."""
    providers = "fastrev,eager" + (",diffusers" if HAS_DIFFUSERS else "")
    rc = fb.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--shapes", "1x4x8x8", "--min-time", "0.01",
                  "--providers", providers, "--loop-shape", "1x4x8x8", "--loop-steps", "3"])
    assert rc == 0
    (jf,) = tmp_path.glob("cpu-*.json")
    doc = json.loads(jf.read_text())
    _validate(doc)
    assert {r["bench"] for r in doc["results"]} == set(fb.step_benches()) | {"loop"}
    assert any("not the fused" in n for n in doc["notes"])          # the CPU caveat is stated
    for r in doc["results"]:
        if r["provider"] == "fastrev" and r["bench"] != "loop":
            assert set(r["speedup_vs"]) >= {"eager"}
            assert r["frac_copy"] == pytest.approx(r["gbps"] / doc["copy_gbps"])
            assert r["reps"] >= 5
    loop = {r["provider"]: r for r in doc["results"] if r["bench"] == "loop"}
    assert {"model", "fastrev", "eager"} <= set(loop) and "overhead_us_per_step" in loop["fastrev"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| bench | shape | dtype |" in text and "copy ceiling" in text and "docs/benchmarks.md" in text
    if HAS_DIFFUSERS:
        assert "diffusers' time / fastrev's time" in text and "| ddpm_dropin_exact | float32 |" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / doc["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_go_outside_the_checkout_by_default(tmp_path, monkeypatch):
    """Without --out: $XDG_CACHE_HOME/fastrev/bench; the tracked bench/RESULTS.md is untouched."""
    monkeypatch.delenv("FASTREV_BENCH_OUT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    tracked = (ROOT / "bench" / "RESULTS.md").read_bytes()
    rc = fb.main([*TINY, "--benches", "ddim_step", "--providers", "fastrev,eager"])
    assert rc == 0
    out = tmp_path / "cache" / "fastrev" / "bench"
    assert list(out.glob("cpu-*.json")) and (out / "RESULTS.md").exists()
    assert (ROOT / "bench" / "RESULTS.md").read_bytes() == tracked


def test_update_results_replaces_only_this_devices_section(tmp_path):
    md = tmp_path / "bench" / "RESULTS.md"
    report.update_results(md, "## gpu run\n| a |\n", "nvidia-h200")
    report.update_results(md, "## cpu run 1\n", "cpu")
    report.update_results(md, "## cpu run 2\n", "cpu")
    text = md.read_text()
    assert text.startswith("# fastrev benchmark results") and "docs/benchmarks.md" in text
    assert "cpu run 2" in text and "cpu run 1" not in text and "## gpu run" in text
    assert text.count("<!-- fastrev-bench:cpu -->") == 1
    rc = fb.main([*TINY, "--out", str(tmp_path / "o"), "--benches", "ddim_step", "--providers", "fastrev,eager",
                  "--update-results", str(md)])
    assert rc == 0
    text = md.read_text()
    assert "## gpu run" in text and "cpu run 2" not in text and "| ddim_step | 1x4x8x8 | float32 |" in text
    assert (tmp_path / "bench" / "results" / "cpu.json").exists()


def test_busy_machine_is_warned(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert timing.machine_load()["busy"] and "busy" in timing.busy_warning()
    rc, doc = _run(tmp_path, "--benches", "ddim_step", "--providers", "fastrev")
    assert rc == 0
    assert "WARNING: the machine is busy" in capsys.readouterr().out
    assert any(n.startswith("Noisy run") for n in doc["notes"])


def test_interleaved_timing_gives_every_case_its_reps():
    calls = [lambda: None, lambda: sum(range(1000))]
    res = timing.time_interleaved(calls, min_time=0.01, min_reps=7, max_reps=50)
    assert [r["reps"] for r in res] == [res[0]["reps"]] * 2 and res[0]["reps"] >= 7
    assert res[1]["median_us"] > res[0]["median_us"]
    # the paired ratio cancels a slow spell that hits both providers of a round; the ratio of medians does not
    a, b = [1, 10, 1, 10, 1], [2, 20, 2, 20, 20]          # b is 2× a in every round but a spell in its last
    assert timing.paired_ratio(b, a) == 2.0
    assert statistics.median(b) / statistics.median(a) == 20.0


# ------------------------------------------------------------------------------------------------ compile
def _cxx_or_skip():
    """torch.compile's CPU backend compiles C++: skip only when this machine has no C++ compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        cxx = get_cpp_compiler()
    except Exception as e:
        pytest.skip(f"torch.compile cannot run here: no C++ compiler for Inductor's CPU backend ({e})")
    if not shutil.which(cxx):
        pytest.skip(f"torch.compile cannot run here: Inductor's C++ compiler {cxx!r} is not on PATH")


@pytest.mark.slow
def test_compile_provider_compiles_and_matches_eager():
    """torch.compile of the naive step compiles (a compile error fails this test), reports its warm-up apart, and
    computes what eager computes."""
    _cxx_or_skip()
    case = fb.make_case("ddim_step", (1, 4, 8, 8), "float32", "compile", "cpu", n_sets=2)
    case.warmup()
    assert case.compile_s > 0
    eager = fb.make_case("ddim_step", (1, 4, 8, 8), "float32", "eager", "cpu", n_sets=2)
    for _ in range(2):
        a, b = case.call(), eager.call()
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_quick_bench_and_graph_loop(tmp_path):
    """On a GPU: the CUDA path of the harness writes valid JSON, and the CUDA-graph loop (t read from device
    tensors) reproduces the plain loop."""
    rc = fb.main(["--device", "cuda", "--benches", "ddpm_step,ddpm_dropin_fast,loop", "--shapes", "1x4x64x64",
                  "--dtypes", "float32", "--providers", "fastrev,eager", "--loop-providers", "fastrev,fastrev+graph",
                  "--loop-steps", "10", "--out", str(tmp_path), "--no-plot"])
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
