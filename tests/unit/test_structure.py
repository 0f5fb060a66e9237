"""The shape of the code: dvc.yaml deps cover everything each stage runs (and nothing it does not), no import
cycles (in attnlab, in benchmarks/), short functions, small folders. Read from the source, so they run in a
second."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from structure import BENCHMARKS, ROOT, find_cycle, import_graph, long_functions, needed_deps

MAX_FUNCTION_LINES = 80
MAX_MODULES_PER_FOLDER = 12


def stage_definitions() -> dict[str, dict]:
    """Every stage of dvc.yaml, the foreach stage once (its deps do not depend on the item)."""
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def script_of(name: str, stage: dict) -> str:
    body = stage.get("do", stage)
    words = body["cmd"].split()
    assert words[0] == "python" and words[1].startswith("stages/"), f"{name}: cmd must be python stages/<name>.py"
    return words[1]


@pytest.mark.parametrize("name", sorted(stage_definitions()))
def test_each_stage_depends_on_every_folder_it_imports_and_no_other(name):
    stage = stage_definitions()[name]
    body = stage.get("do", stage)
    script = script_of(name, stage)
    deps = [d if isinstance(d, str) else next(iter(d)) for d in body["deps"]]
    assert script in deps, f"stage {name}: its own script {script} is not in its deps"
    src_deps = {d for d in deps if d.startswith("src/")}
    needed = needed_deps(ROOT / script)
    missing = sorted(needed - src_deps)
    assert not missing, f"stage {name} runs code from {missing} but its deps in dvc.yaml miss it"
    unused = sorted(src_deps - needed)
    assert not unused, f"stage {name} lists {unused} in its deps but imports nothing from it"


@pytest.mark.parametrize("package", ["src/attnlab", "benchmarks"])
def test_there_are_no_import_cycles(package):
    cycle = find_cycle(import_graph(ROOT / package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_catches_benchmarks_that_import_each_other(tmp_path):
    """The check itself can fail: one bench importing another at module level, the other importing it back
    inside a function, is a cycle."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "a.py").write_text("from benchmarks.b import f\n")
    (tmp_path / "benchmarks" / "b.py").write_text("import torch\n\ndef f():\n    from benchmarks import a\n")
    (tmp_path / "benchmarks" / "c.py").write_text("import benchmarks.b\nfrom attnlab.core import params\n")
    graph = import_graph(tmp_path / "benchmarks", {"benchmarks": tmp_path})
    assert graph["benchmarks.c"] == {"benchmarks.b"}  # attnlab is not in this graph: not one of `packages`
    assert find_cycle(graph) == ["benchmarks.a", "benchmarks.b", "benchmarks.a"]
    assert find_cycle(import_graph(BENCHMARKS)) is None


def test_no_function_is_longer_than_80_lines():
    too_long = long_functions([ROOT / "src", ROOT / "stages", ROOT / "benchmarks"], MAX_FUNCTION_LINES)
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)


def test_no_folder_under_src_holds_more_than_12_modules():
    for folder in [p for p in (ROOT / "src").rglob("*") if p.is_dir() and p.name != "__pycache__"]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES_PER_FOLDER, f"{folder.relative_to(ROOT)} holds {len(modules)} modules"


def test_every_sub_package_says_what_it_is_for():
    for init in (ROOT / "src/attnlab").glob("*/__init__.py"):
        doc = init.read_text().strip()
        assert doc.startswith('"""') and len(doc) > 80, f"{init.relative_to(ROOT)} needs a one-paragraph docstring"


def test_the_deps_check_catches_a_missing_folder(tmp_path):
    """The check itself can fail: a stage script that imports attnlab.model needs src/attnlab/model."""
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from attnlab.model.transformer import Transformer\n")
    assert "src/attnlab/model" in needed_deps(script)
    assert "src/attnlab/core" in needed_deps(script)  # transformer imports core.params
    assert "src/attnlab/report" not in needed_deps(script)


def test_the_config_cli_is_where_users_expect_it():
    proc = subprocess.run([sys.executable, "-m", "attnlab.config", str(ROOT / "params.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "n_params" in proc.stdout


def expanded_stages() -> dict[str, dict]:
    """Every stage of dvc.yaml, a foreach stage once per item (name@item), as dvc runs them."""
    stages = {}
    for name, stage in stage_definitions().items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        for item in stage["foreach"]:
            stages[f"{name}@{item}"] = yaml.safe_load(yaml.safe_dump(stage["do"]).replace("${item}", str(item)))
    return stages


def _paths(entries) -> set[str]:
    return {e if isinstance(e, str) else next(iter(e)) for e in entries or []}


def data_paths_problems(stage: dict) -> list[str]:
    """What a stage's data deps and its command disagree on: a dep the command never names (directly or as a
    folder holding it), or a project path the command reads that is not a dep."""
    args = [w for w in stage["cmd"].split()[2:] if not w.startswith("-")]
    named = [w for w in args if "/" in w]  # project paths the command reads or writes
    outs = _paths(stage.get("outs")) | _paths(stage.get("metrics")) | _paths(stage.get("plots"))
    deps = {d for d in _paths(stage["deps"]) if not d.startswith(("src/", "stages/"))}
    # a dep is read when the cmd names it, a folder holding it (--reports reports), or a file in it
    problems = [f"dep {d} is not named in the cmd" for d in sorted(deps)
                if not any(d == w or d.startswith(w + "/") or w.startswith(d + "/") for w in args)]
    for w in named:
        if w in outs or any(o.startswith(w.rstrip("/") + "/") for o in outs):
            continue  # an output (or the folder of outputs)
        if not any(d == w or d.startswith(w.rstrip("/") + "/") or w.startswith(d + "/") for d in deps):
            problems.append(f"the cmd reads {w}, which is not a dep")
    return problems


@pytest.mark.parametrize("name", sorted(expanded_stages()))
def test_each_stage_depends_on_the_data_its_command_names_and_no_other(name):
    problems = data_paths_problems(expanded_stages()[name])
    assert not problems, f"stage {name}: " + "; ".join(problems)


def test_the_data_deps_check_catches_a_dep_the_command_does_not_read():
    stage = {"cmd": "python stages/x.py --in data/a --out reports/x.json", "deps": ["stages/x.py", "data/a", "data/b"],
             "outs": ["reports/x.json"]}
    assert data_paths_problems(stage) == ["dep data/b is not named in the cmd"]
    stage["deps"] = ["stages/x.py"]
    assert data_paths_problems(stage) == ["the cmd reads data/a, which is not a dep"]
