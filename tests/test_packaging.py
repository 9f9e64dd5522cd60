"""Layout: ``kernels/`` is installed as ``fastrev.kernels`` (setuptools package-dir), editable and as a wheel."""

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

import fastrev
import fastrev.kernels.reverse_step as rs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_dir():
    # in the source tree (editable install), fastrev.kernels is the top-level kernels/ folder
    if pathlib.Path(fastrev.__file__).resolve().parent != ROOT / "fastrev":
        pytest.skip("fastrev is not imported from this checkout (not an editable install)")
    assert pathlib.Path(rs.__file__).resolve() == ROOT / "kernels" / "reverse_step.py"


def test_built_wheel_imports_kernels(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob(f"fastrev-{fastrev.__version__}-*.whl")   # version from fastrev.__version__
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastrev/kernels/reverse_step.py" in names and "fastrev/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fastrev, fastrev.kernels.reverse_step as k; "
            "print(fastrev.__file__); print(k.__file__)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(str(tmp_path / "site") in line for line in out.stdout.split())


def test_version_in_one_place():
    """The version lives in fastrev/__init__.py only: pyproject reads it (setuptools dynamic), the CLI prints it."""
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \["version"\]', project, re.M) and not re.search(r"^version\s*=", project, re.M)
    assert 'version = { attr = "fastrev.__version__" }' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", fastrev.__version__)
    if pathlib.Path(fastrev.__file__).resolve().parent == ROOT / "fastrev":     # installed from this checkout
        assert importlib.metadata.version("fastrev") == fastrev.__version__


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "fastrev", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout
    text = (ROOT / "pyproject.toml").read_text()
    assert 'fastrev = "fastrev.cli:main"' in text


def test_readme_quick_start_matches_ci():
    """The README's Quick start holds exactly two commands; the second is a whole line of .ci/run, which lints
    with ruff before it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines()[1:] if ln.strip()]
    assert len(lines) == 2, lines
    assert "fastrev demo" in lines[0] and "pytest" in lines[1]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines[1].strip() in ci
    assert ".venv/bin/ruff check ." in ci and ci.index(".venv/bin/ruff check .") < ci.index(lines[1].strip())
