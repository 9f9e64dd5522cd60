"""The command line: fastrev demo / sample / selfcheck / bench."""

import argparse
import os
import pathlib
import runpy
import sys
import types

import pytest
import torch

import fastrev
import fastrev.kernels.reverse_step as K
import fastrev.samplers
from fastrev.cli import build_parser, main
from fastrev.models import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sample_command(tmp_path, capsys):
    out, png = tmp_path / "x.pt", tmp_path / "x.png"
    rc = main(["sample", "--demo", "gmm", "--method", "ddim", "--num-samples", "64", "--num-steps", "10",
               "--seed", "3", "--batch-size", "16", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    x = torch.load(out)
    assert x.shape == (64, 2) and x.dtype == torch.float32
    s = fastrev.Schedule.linear()
    want = fastrev.sample(GaussianMixture.demo_2d(s), (64, 2), s, method="ddim", num_steps=10, seed=3)
    assert torch.equal(x, want)                     # batch size 16 on the command line, one batch here
    text = capsys.readouterr().out
    assert "wrote 64 samples (ddim, 10 steps, seed 3)" in text and "sliced W1 vs data" in text
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 1000
    except ImportError:
        assert not png.exists()


def test_sample_command_defaults_and_errors(tmp_path, capsys):
    out = tmp_path / "y.pt"
    assert main(["sample", "--demo", "gmm", "--method", "pc", "--num-samples", "8", "--num-steps", "3",
                 "--out", str(out)]) == 0
    assert torch.load(out).shape == (8, 2)
    assert main(["sample", "--demo", "gmm", "--method", "sde", "--eta", "0.5", "--num-samples", "4",
                 "--out", str(out)]) == 2
    assert "eta only applies to method='ddim'" in capsys.readouterr().err
    for bad in (["--method", "heun"], ["--num-samples", "0"], ["--demo", "mnist"]):
        argv = ["sample", "--demo", "gmm", "--out", str(out)] + bad
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["sample", "--demo", "gmm"])           # --out is required


def test_demo_command(tmp_path, capsys):
    png = tmp_path / "demo.png"
    rc = main(["demo", "--num-samples", "128", "--num-steps", "4", "--png", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for col in ("steps", "NFE", "SW1 vs data", "data vs data", "wall s", "fastrev us/step", "ref us/step"):
        assert col in lines[header]
    rows = [line.split() for line in lines[header + 2: header + 7]]
    assert [r[0] for r in rows] == ["ddpm", "ddim", "sde", "ode", "pc"]
    assert [int(r[2]) for r in rows] == [4, 4, 4, 7, 8]               # NFE: Heun 2N − 1, PC 2N
    for r in rows:
        assert float(r[3]) < 1.0 and float(r[4]) > 0                  # finite distances
        assert float(r[7]) > 0                                        # the reference step was timed
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 1000 and f"wrote {png}" in text
    except ImportError:
        assert not png.exists()


def test_demo_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "none.png"
    assert main(["demo", "--num-samples", "64", "--num-steps", "2", "--methods", "ddim", "--no-throughput",
                 "--png", str(png)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err and "skipping the PNG" in captured.err
    assert not png.exists()
    assert "ddim" in captured.out


def test_selfcheck_command(capsys):
    assert main(["selfcheck"]) == 0
    assert "self-check" in capsys.readouterr().out


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("fastrev.bench")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fastrev.bench", fake)
    monkeypatch.setattr(fastrev, "bench", fake, raising=False)
    assert main(["bench", "--size", "64", "--help"]) == 7
    assert seen == [["--size", "64", "--help"]]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("demo", "sample", "selfcheck", "bench"):
        assert cmd in text


def test_python_dash_m(tmp_path, monkeypatch):
    """``python -m fastrev`` runs the CLI (fastrev/__main__.py), in process: a subprocess would spend seconds
    importing torch and triton again."""
    out = tmp_path / "z.pt"
    monkeypatch.setattr(sys, "argv", ["fastrev", "sample", "--demo", "gmm", "--method", "ode", "--num-samples", "16",
                                      "--num-steps", "3", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("fastrev", run_name="__main__", alter_sys=True)
    assert e.value.code == 0
    assert torch.load(out).shape == (16, 2)


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def no_sampling(monkeypatch):
    """Bad command lines must be refused before any sampling starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the command line was checked")
    monkeypatch.setattr(fastrev.samplers, "sample", refuse)


def _one_line_error(capsys, argv, *needles):
    """``main(argv)`` fails with exit status 2 and exactly one line on stderr, naming the problem, no traceback."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"fastrev {argv[0]}: ") and "Traceback" not in err + captured.out
    for needle in needles:
        assert needle in err, (needle, err)
    return err


SAMPLE = ["sample", "--demo", "gmm", "--num-samples", "4", "--num-steps", "2"]


def test_device_cuda_without_cuda(tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, SAMPLE + ["--device", "cuda", "--out", str(tmp_path / "x.pt")],
                    "--device cuda", "CUDA is not available", "--device cpu")
    _one_line_error(capsys, ["demo", "--device", "cuda:0", "--no-plot"], "CUDA is not available")
    _one_line_error(capsys, ["selfcheck", "--device", "cuda"], "CUDA is not available")
    assert not (tmp_path / "x.pt").exists()


def test_device_mps_without_mps(tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _one_line_error(capsys, SAMPLE + ["--device", "mps", "--out", str(tmp_path / "x.pt")],
                    "--device mps", "MPS is not available")


def test_device_not_a_device(tmp_path, capsys, no_sampling):
    _one_line_error(capsys, SAMPLE + ["--device", "gpu0", "--out", str(tmp_path / "x.pt")], "'gpu0'")
    _one_line_error(capsys, SAMPLE + ["--device", "meta", "--out", str(tmp_path / "x.pt")], "--device meta")


def test_backend_triton_on_cpu_without_interpreter(tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(K, "INTERPRET", False)       # as if TRITON_INTERPRET were unset when fastrev was imported
    _one_line_error(capsys, SAMPLE + ["--device", "cpu", "--backend", "triton", "--out", str(tmp_path / "x.pt")],
                    "--backend triton", "TRITON_INTERPRET=1")


def test_backend_triton_on_mps(tmp_path, capsys, monkeypatch, no_sampling):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    _one_line_error(capsys, SAMPLE + ["--device", "mps", "--backend", "triton", "--out", str(tmp_path / "x.pt")],
                    "--backend triton cannot run on --device mps", "--backend auto")


def test_backend_choices_are_the_library_vocabulary():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    backend = next(a for a in sub.choices["sample"]._actions if a.dest == "backend")
    assert tuple(backend.choices) == fastrev.ops.BACKENDS
    assert set(backend.choices) == {"auto", "triton", "torch", "reference"}


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "file-as-folder"])
def test_unwritable_out_and_plot_before_sampling(tmp_path, capsys, no_sampling, where):
    (tmp_path / "file").write_text("")
    bad = {"missing-folder": tmp_path / "nowhere" / "x", "a-folder": tmp_path / "dir",
           "file-as-folder": tmp_path / "file" / "x"}[where]
    if where == "a-folder":
        bad.mkdir()
        pt = png = str(bad)
    else:
        pt, png = f"{bad}.pt", f"{bad}.png"
    good = tmp_path / "new.pt"
    _one_line_error(capsys, SAMPLE + ["--out", pt], f"--out {pt}")
    _one_line_error(capsys, SAMPLE + ["--out", str(good), "--plot", png], f"--plot {png}")
    assert not good.exists()                         # the probe of --out left nothing behind
    _one_line_error(capsys, ["demo", "--png", png], f"--png {png}")


def test_out_probe_keeps_an_existing_file(tmp_path, capsys, no_sampling):
    out = tmp_path / "old.pt"
    out.write_bytes(b"keep me")
    _one_line_error(capsys, SAMPLE + ["--out", str(out), "--plot", str(tmp_path / "no" / "x.png")], "--plot")
    assert out.read_bytes() == b"keep me"


@pytest.mark.skipif(not pathlib.Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder nobody can write)")
def test_out_in_a_folder_nobody_can_write(capsys, no_sampling):
    _one_line_error(capsys, SAMPLE + ["--out", "/proc/fastrev-x.pt"], "--out /proc/fastrev-x.pt", "cannot write")


def test_out_in_a_read_only_folder(tmp_path, capsys, no_sampling):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root) can write to read-only folders")
        _one_line_error(capsys, SAMPLE + ["--out", str(ro / "x.pt")], "cannot write", "Permission denied")
    finally:
        ro.chmod(0o755)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastrev {fastrev.__version__}"
