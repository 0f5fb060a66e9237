"""The Makefile's venv: installs the EXTRAS asked for (the lens extra in CI), reinstalls when they change and only
then, and never lets an extra replace the installed torch. Run with a fake .venv/bin/python that logs its calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builders import PROJECT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$(dirname "$0")/../calls.log"
if [ "$1" = "-c" ]; then echo "torch==2.13.0+cpu"; fi
"""


@pytest.fixture
def project(tmp_path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copyfile(PROJECT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


# What a calling make hands down: its flags, and the Makefile's own variables set on its command line.
MAKE_STATE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "EXTRAS", "TORCH", "PYTHON", "VENV")


def make(project: Path, *args: str) -> list[str]:
    """Run make in the copy; the fake python's calls it made."""
    log = project / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    # A make that runs this test (`make test EXTRAS=dev,lens`) passes its command-line variables down, both
    # through MAKEFLAGS and as environment variables (which `EXTRAS ?= dev` reads); the copy must see only the
    # arguments given here.
    env = {k: v for k, v in os.environ.items() if k not in MAKE_STATE}
    proc = subprocess.run(["make", *args], cwd=project, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines() if log.exists() else []


def project_install(calls: list[str]) -> list[str]:
    return [call for call in calls if " -e " in call]


def test_the_venv_installs_the_extras_and_reinstalls_only_when_they_change(project):
    first = make(project, "venv")
    assert project_install(first) == ["python -m pip install -q -c .venv/bin/.torch-constraint -e .[dev]"]
    assert "python -m pip install -q torch==2.13.0" in first
    assert make(project, "venv") == []  # up to date
    assert project_install(make(project, "venv", "EXTRAS=dev,lens")) == [
        "python -m pip install -q -c .venv/bin/.torch-constraint -e .[dev,lens]"]
    assert make(project, "venv", "EXTRAS=dev,lens") == []
    assert project_install(make(project, "venv")) != []  # back to dev alone: a change too


def test_the_installed_torch_constrains_the_project_install(project):
    make(project, "venv")
    assert (project / ".venv" / "bin" / ".torch-constraint").read_text() == "torch==2.13.0+cpu\n"


def test_make_lens_installs_the_lens_extra_and_exports_the_model(project):
    calls = make(project, "lens")
    assert project_install(calls) == ["python -m pip install -q -c .venv/bin/.torch-constraint -e .[dev,lens]"]
    assert calls[-1] == ("python -m attnlab.export models/model.pt --tokenizer data/tokenizer "
                         "--out models/model_lens.pt")


def test_ci_runs_the_readme_test_command_with_the_lens_extra():
    assert "make test EXTRAS=dev,lens" in (PROJECT / ".ci" / "run").read_text()
    assert "make test " in (PROJECT / "README.md").read_text()
