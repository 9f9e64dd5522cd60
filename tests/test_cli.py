"""The command line: fastrev demo / sample / selfcheck / bench."""

import runpy
import sys
import types

import pytest
import torch

import fastrev
from fastrev.cli import main
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
    for col in ("steps", "NFE", "SW1 vs data", "data vs data", "wall s", "fused us/step", "ref us/step"):
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


def test_bench_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastrev.bench", None)
    monkeypatch.delattr(fastrev, "bench", raising=False)
    assert main(["bench"]) == 2
    assert "fastrev.bench is not available" in capsys.readouterr().err


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
