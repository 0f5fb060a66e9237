"""Bad params through the real command line: `python -m attnlab.config <file>` exits 2 with one line
`error: <key>: ...` naming the key (or the file), and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_config(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "attnlab.config", str(path)], capture_output=True, text=True, env=env, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, key: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: {key}: "), lines[0]
    return lines[0]


BAD_PARAMS = {
    "unknown key": ({"model": {"d_modle": 64}}, "model.d_modle", "unknown key"),
    "unknown section": ({"modle": {"d_model": 64}}, "modle", "unknown section"),
    "section not a mapping": ({"model": 5}, "model", "expected a section"),
    "wrong type int": ({"model": {"n_layers": "four"}}, "model.n_layers", "expected an integer"),
    "wrong type bool": ({"train": {"compile": "yes"}}, "train.compile", "expected true or false"),
    "wrong type list": ({"corpus": {"sources": "/tmp"}}, "corpus.sources", "expected a list"),
    "zero layers": ({"model": {"n_layers": 0}}, "model.n_layers", "> 0"),
    "negative d_ff": ({"model": {"d_ff": -64}}, "model.d_ff", "> 0"),
    "zero seq_len": ({"model": {"seq_len": 0}}, "model.seq_len", "> 0"),
    "negative batch": ({"train": {"batch_size": -1}}, "train.batch_size", "> 0"),
    "zero sample_mb": ({"tokenizer": {"sample_mb": 0}}, "tokenizer.sample_mb", "> 0"),
    "d_model not divisible": ({"model": {"d_model": 250, "n_heads": 4}}, "model.d_model", "not divisible"),
    "odd head dim with rope": ({"model": {"d_model": 36, "n_heads": 4, "pe": "rope"}}, "model.d_model", "odd"),
    "vocab too small": ({"tokenizer": {"vocab_size": 100}}, "tokenizer.vocab_size", "outside"),
    "vocab above uint16": ({"tokenizer": {"vocab_size": 70000}}, "tokenizer.vocab_size", "uint16"),
    "corpus max_mb zero": ({"corpus": {"max_mb": 0}}, "corpus.max_mb", "> 0"),
    "corpus max_mb negative": ({"corpus": {"max_mb": -5}}, "corpus.max_mb", "> 0"),
    "corpus max_file_kb zero": ({"corpus": {"max_file_kb": 0}}, "corpus.max_file_kb", "> 0"),
    "val_fraction one": ({"corpus": {"val_fraction": 1.0}}, "corpus.val_fraction", "between 0 and 1"),
    "missing source folder": (
        {"corpus": {"sources": ["/nonexistent/attnlab-corpus"]}}, "corpus.sources[0]", "does not exist"
    ),
    "explorer no examples": ({"explorer": {"n_examples": 0}}, "explorer.n_examples", "> 0"),
    "explorer more examples than attention_stats": (
        {"explorer": {"n_examples": 9}, "attention": {"n_examples": 8}}, "explorer.n_examples",
        "more than attention.n_examples=8",
    ),
    "explorer too few tokens": ({"explorer": {"max_tokens": 10}}, "explorer.max_tokens", "at least 20 tokens"),
    "context multiples without 1": ({"eval": {"context_multiples": [2, 4]}}, "eval.context_multiples", "start at 1"),
    "context multiples not increasing": (
        {"eval": {"context_multiples": [1, 4, 2]}}, "eval.context_multiples", "increase"),
    "negative length test": ({"eval": {"length_test_tokens": -1}}, "eval.length_test_tokens", ">= 0"),
    "zero points per pass": ({"interventions": {"points_per_pass": 0}}, "interventions.points_per_pass", "> 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_give_one_line_error_naming_the_key(tmp_path, case):
    params, key, expected = BAD_PARAMS[case]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    line = assert_one_line_error(run_config(path), key)
    assert expected in line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: [1, 2\nseed: 3\n", "is not valid YAML"),
        ("model:\n  d_model: 64\n   n_heads: 4\n", "is not valid YAML"),
        ("- model\n- train\n", "must be a YAML mapping"),
        ("42\n", "must be a YAML mapping"),
    ],
)
def test_bad_params_file_names_the_file(tmp_path, text, expected):
    path = tmp_path / "broken params.yaml"
    path.write_text(text)
    line = assert_one_line_error(run_config(path), str(path))
    assert expected in line


def test_missing_params_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert_one_line_error(run_config(path), str(path))


def test_missing_source_folder_is_named_by_index(tmp_path):
    params = {"corpus": {"sources": [str(tmp_path), str(tmp_path / "gone")]}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    line = assert_one_line_error(run_config(path), "corpus.sources[1]")
    assert "gone" in line


def test_default_params_print_resolved_config_and_parameter_count(tmp_path):
    result = run_config(ROOT / "params.yaml")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["params"]["model"]["d_model"] == yaml.safe_load((ROOT / "params.yaml").read_text())["model"][
        "d_model"
    ]
    assert printed["params"]["corpus"]["sources"] == []
    assert isinstance(printed["implied"]["n_params"], int) and printed["implied"]["n_params"] > 1_000_000


def test_the_code_defaults_are_params_yaml():
    """A field left out of a params file means what params.yaml says (compare.seeds: 3 in both)."""
    from attnlab.core.params import Params, load_params

    assert Params() == load_params(ROOT / "params.yaml")
    assert Params().compare.seeds == yaml.safe_load((ROOT / "params.yaml").read_text())["compare"]["seeds"] == 3
