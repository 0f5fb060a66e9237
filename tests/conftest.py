"""Shared test fixtures: a tiny corpus, tiny params, and one real `dvc repro` shared by every end-to-end test.

End-to-end tests take the session-scoped `dvc_project` fixture and are marked

    @pytest.mark.e2e
    @pytest.mark.xdist_group("e2e")

so that `pytest -n 2 --dist loadgroup` runs them all on one worker, sharing one pipeline run. The fixture
runs `dvc repro` for whatever dvc.yaml holds, with TINY_PARAMS merged into params.yaml; a new stage adds
its tiny overrides to TINY_PARAMS.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

E2E_DIR = ROOT / "tests" / "e2e"


def pytest_configure(config):
    """Under xdist, each worker and every process it starts (stages, trainings) gets its share of the cores as
    torch threads: otherwise `-n 2` on 2 cores runs 2 x 2 OpenMP threads that spin against each other, and a test
    runs many times slower in the suite than alone. A user's OMP_NUM_THREADS is kept."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    import torch

    torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e is an e2e test (real stages, real dvc, real training runs); a few in
    tests/unit that run a subprocess carry the mark themselves. `make test-fast` (-m "not e2e") leaves them out."""
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


# ------------------------------------------------------------------------------------------------ tiny corpus

# Small standard-library modules present in every Python from 3.10 on (none of the modules removed in 3.13).
STDLIB_FILES = [
    "__future__.py", "_compat_pickle.py", "_markupbase.py", "_py_abc.py", "_threading_local.py",
    "_weakrefset.py", "abc.py", "base64.py", "bisect.py", "bz2.py", "cmd.py", "code.py", "codeop.py",
    "colorsys.py", "compileall.py", "copy.py", "copyreg.py", "csv.py", "filecmp.py", "fileinput.py",
    "fnmatch.py", "genericpath.py", "getopt.py", "getpass.py", "gettext.py", "glob.py", "graphlib.py",
    "hashlib.py", "hmac.py", "linecache.py", "lzma.py", "netrc.py", "numbers.py", "opcode.py", "operator.py",
    "posixpath.py", "pty.py", "py_compile.py", "pyclbr.py", "queue.py", "quopri.py", "reprlib.py",
    "rlcompleter.py", "runpy.py", "sched.py", "selectors.py", "shelve.py", "shlex.py", "stat.py", "string.py",
    "stringprep.py", "symtable.py", "tabnanny.py", "textwrap.py", "timeit.py", "tracemalloc.py", "types.py",
    "warnings.py", "weakref.py", "zipapp.py",
]

# Generated files that stress a tokenizer meant to be lossless on code.
TRICKY_FILES = {
    "tabs_crlf.py": "class Tabbed:\r\n\tdef f(self, x):\r\n\t\tif x:\r\n\t\t\treturn x\t# tab comment\r\n"
    "\t\treturn None\r\n\r\n\r\n",
    "unicode_names.py": "# -*- coding: utf-8 -*-\nπ = 3.14159\nélève = 'naïve café'\n"
    "变量 = \"中文字符串\"\nΩmega_Δ = π * 2\ndef grüße(名前):\n    return f'Hallo {名前} 👋🏽'\n\nσ²= 'x²'\n",
    "long_lines.py": "TABLE = [" + ", ".join(str(i * 7919 % 10007) for i in range(4000)) + "]\n"
    + "S = '" + "abc\\t" * 3000 + "'\n" + "x" * 9000 + " = 1\n",
    "blank_trailing.py": "\n\n\nimport os   \n\n    \n\t\n\ndef f():   \n    pass\t\n\x0c\n\n\n"
    "# no newline at the end   ",
    "leading_space.py": "    indented = 'first line starts with spaces'\n  \n        deeper = 2\n",
}

# Files the corpus stage must skip (and record): invalid UTF-8, binary, empty, a duplicate.
BAD_FILES = {
    "latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
    "binary.py": b"x = 1\n\x00\x01\x02\n",
    "empty.py": b"",
}


def make_tiny_corpus(dest: str | Path) -> Path:
    """A folder of ~0.5 MB of Python: small stdlib modules, the tricky files, and files that must be skipped."""
    dest = Path(dest)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (dest / "stdlib").mkdir(parents=True, exist_ok=True)
    copied = 0
    for name in STDLIB_FILES:
        if (stdlib / name).is_file():
            shutil.copyfile(stdlib / name, dest / "stdlib" / name)
            copied += 1
    assert copied >= 40, f"only {copied} of the tiny corpus's stdlib files exist in {stdlib}"
    (dest / "generated").mkdir(exist_ok=True)
    for name, text in TRICKY_FILES.items():
        (dest / "generated" / name).write_bytes(text.encode("utf-8"))
    (dest / "skipped").mkdir(exist_ok=True)
    for name, data in BAD_FILES.items():
        (dest / "skipped" / name).write_bytes(data)
    (dest / "zz_copies").mkdir(exist_ok=True)  # sorts last: this copy is the duplicate that gets skipped
    shutil.copyfile(dest / "stdlib" / "bisect.py", dest / "zz_copies" / "bisect.py")
    return dest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return make_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


# ------------------------------------------------------------------------------------------------ tiny params

# Overrides that make the whole pipeline tiny (seconds on a CPU); a new section adds its own here.
TINY_PARAMS = {
    "corpus": {"max_mb": 1},
    "tokenizer": {"vocab_size": 512, "sample_mb": 1},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 64},
    "train": {"max_tokens": 30000, "batch_size": 8, "eval_tokens": 2048, "log_every": 5},
    "eval": {"max_tokens": 4096, "sample_tokens": 20},
    "attention": {"n_examples": 4, "batch_size": 2, "seq_len_filter": [16, 32]},
    "interventions": {
        "n_eval_tokens": 1024, "mean_tokens": 1024, "batch_size": 4, "top_k": [1, 2, 64], "sample_tokens": 10,
    },
    "probe": {"n_examples": 4},
    "head_roles": {"n_sequences": 4, "top_k": 1, "batch_size": 2},
    "explorer": {"n_examples": 2, "max_tokens": 48},  # of attention's 4 examples; crops the 64-token windows
}


def merge(base: dict, extra: dict) -> dict:
    """base with extra's values, section by section (extra wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_params(corpus_dir: str | Path, **sections) -> dict:
    """The project's params.yaml with TINY_PARAMS (and any extra sections) merged and the corpus pointed at."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(params, TINY_PARAMS)
    params = merge(params, {"corpus": {"sources": [str(corpus_dir)]}})
    return merge(params, sections)


# ------------------------------------------------------------------------------------------------ dvc project

PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore",
                 "data/README.md"]
PROJECT_DIRS = ["stages", "src"]


class DvcProject:
    """A copy of the project in a temporary git repository, with helpers that run commands inside it."""

    def __init__(self, path: Path):
        self.path = path
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # `python` in stage cmds = this venv's
            "PYTHONPATH": str(path / "src"),  # the copy's library, not the editable install's
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "attnlab tests", "GIT_AUTHOR_EMAIL": "tests@attnlab.invalid",
            "GIT_COMMITTER_NAME": "attnlab tests", "GIT_COMMITTER_EMAIL": "tests@attnlab.invalid",
        }
        dvc = Path(sys.executable).parent / "dvc"
        self.dvc_cmd = [str(dvc)] if dvc.exists() else [sys.executable, "-m", "dvc"]
        self.repro_result: subprocess.CompletedProcess | None = None  # the shared first `dvc repro`

    def run(self, cmd: list[str] | str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        """Run a command (list, or a string for the shell) in the project; on failure show its output."""
        result = subprocess.run(
            cmd, cwd=self.path, env=self.env, capture_output=True, text=True, shell=isinstance(cmd, str),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"command failed with exit status {result.returncode}: {cmd}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            )
        return result

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([*self.dvc_cmd, *args], check=check)

    def stale_stages(self, *targets: str) -> set[str]:
        """The stages `dvc status` reports as changed (foreach stages as name@item). The `sources` stage is
        always_changed, so `dvc status` always names it: it counts only when something else changed in it."""
        status = json.loads(self.dvc("status", "--json", *targets).stdout or "{}")
        return {name for name, reasons in status.items() if reasons != ["always changed"]}

    @property
    def params_path(self) -> Path:
        return self.path / "params.yaml"

    def read_params(self) -> dict:
        return yaml.safe_load(self.params_path.read_text())

    def write_params(self, params: dict) -> None:
        self.params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    @contextlib.contextmanager
    def params_changed(self, overrides: dict):
        """Temporarily merge overrides into params.yaml; the original file is restored afterwards."""
        original = self.params_path.read_text()
        try:
            self.write_params(merge(yaml.safe_load(original), overrides))
            yield self
        finally:
            self.params_path.write_text(original)


def copy_project(dest: Path, corpus_dir: Path, **sections) -> DvcProject:
    """Copy the project into dest, point it at the tiny corpus with tiny params, and commit it to git."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    project = DvcProject(dest)
    project.write_params(tiny_params(corpus_dir, **sections))
    project.run(["git", "init", "-q"])
    project.run(["git", "add", "-A"])
    project.run(["git", "commit", "-q", "-m", "attnlab test copy"])
    return project


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory, tiny_corpus) -> DvcProject:
    """One real `dvc repro` of the whole pipeline on the tiny corpus, shared by every e2e test of a session."""
    project = copy_project(tmp_path_factory.mktemp("project") / "attnlab", tiny_corpus)
    project.repro_result = project.dvc("repro")
    return project
