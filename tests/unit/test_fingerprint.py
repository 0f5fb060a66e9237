"""The checkpoint fingerprint: a resumed run must match params, resolved precision, token content and code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml
from builders import PROJECT, write_params, write_tokens

import attnlab
from attnlab.core.params import load_params
from attnlab.training.checkpoints import TRAINING_PACKAGES, file_digest, fingerprint, source_files


def _fp(params, tokens: Path, precision: str = "fp32") -> str:
    return fingerprint(params, params.tokenizer.vocab_size, tokens, precision)


def test_the_fingerprint_follows_the_token_files_content_not_only_their_counts(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", {}))
    a, b = write_tokens(tmp_path / "a"), write_tokens(tmp_path / "b")
    assert _fp(params, a) == _fp(params, b)  # the same content in another folder
    train = np.fromfile(b / "train.bin", dtype=np.uint16)
    train[len(train) // 2] = (int(train[len(train) // 2]) + 1) % 512  # one token changed, the same count
    train.tofile(b / "train.bin")
    assert _fp(params, a) != _fp(params, b)


def test_the_fingerprint_holds_the_resolved_precision_and_the_optimisation_params_only(tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    base = load_params(write_params(tmp_path / "p.yaml", {}))
    assert _fp(base, tokens, "fp32") != _fp(base, tokens, "bf16")
    auto = load_params(write_params(tmp_path / "auto.yaml", {"train": {"precision": "auto"}}))
    fp32 = load_params(write_params(tmp_path / "fp32.yaml", {"train": {"precision": "fp32"}}))
    assert _fp(auto, tokens, "fp32") == _fp(fp32, tokens, "fp32")  # the word "auto" is not what counts
    logging = load_params(write_params(tmp_path / "l.yaml", {"train": {"log_every": 3, "device": "cpu"}}))
    assert _fp(logging, tokens) == _fp(base, tokens)
    lr = load_params(write_params(tmp_path / "lr.yaml", {"train": {"lr": 0.002}}))
    assert _fp(lr, tokens) != _fp(base, tokens)


def test_the_source_digest_changes_with_a_one_line_edit_of_a_module_the_train_stage_runs(tmp_path):
    package = Path(attnlab.__file__).parent
    copy = tmp_path / "attnlab"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    original = file_digest(source_files(package), package)
    assert file_digest(source_files(copy), copy) == original  # names relative to the package: any checkout
    module = copy / "model" / "transformer.py"
    module.write_text(module.read_text() + "# one line\n")
    assert file_digest(source_files(copy), copy) != original
    analysis = copy / "analysis" / "interventions.py"  # not run by training: not in the digest
    module.write_text((package / "model" / "transformer.py").read_text())
    analysis.write_text(analysis.read_text() + "# one line\n")
    assert file_digest(source_files(copy), copy) == original


def test_the_fingerprinted_packages_are_the_train_stage_deps_in_dvc_yaml():
    stage = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["train"]
    src_deps = {d for d in stage["deps"] if d.startswith("src/attnlab/") and d != "src/attnlab/__init__.py"}
    assert src_deps == {f"src/attnlab/{p}" for p in TRAINING_PACKAGES}
