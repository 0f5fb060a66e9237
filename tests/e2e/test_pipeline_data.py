"""End to end: the real `dvc repro` on the tiny corpus, for the three data stages corpus, tokenizer, tokenize."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from conftest import copy_project

from attnlab.data.corpus import read_documents

DATA_STAGES = ("corpus", "tokenizer", "tokenize")

pytestmark = pytest.mark.e2e


def stale_stages(project) -> set[str]:
    return project.stale_stages()


@pytest.mark.xdist_group("e2e")
def test_repro_ran_the_data_stages_and_wrote_sane_outputs(dvc_project):
    out = dvc_project.repro_result.stdout
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in out
    data = dvc_project.path / "data"
    manifest = json.loads((data / "corpus" / "manifest.json").read_text())
    skipped = {s["path"].split("/", 1)[1]: s["reason"] for s in manifest["skipped"]}
    assert {"skipped/latin1.py", "skipped/binary.py", "skipped/empty.py", "zz_copies/bisect.py"} <= set(skipped)
    assert manifest["totals"]["train"]["files"] >= 1 and manifest["totals"]["val"]["files"] >= 1
    assert 200_000 < manifest["totals"]["train"]["bytes"] + manifest["totals"]["val"]["bytes"] <= 1_100_000

    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer" / "tokenizer.model"))
    meta = json.loads((data / "tokens" / "meta.json").read_text())
    assert meta["vocab_size"] == sp.get_piece_size() <= 512
    for split in ("train", "val"):
        tokens = np.memmap(data / "tokens" / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(tokens) == meta[split]["tokens"] > 0
        assert meta[split]["files"] == manifest["totals"][split]["files"]
        assert 1.0 < meta["bytes_per_token"][split] < 8.0
        docs = read_documents(data / "corpus", split)
        assert sp.decode(tokens[: np.argmax(tokens == meta["eos_id"])].tolist()) == docs[0]


@pytest.mark.xdist_group("e2e")
def test_second_repro_runs_nothing_but_the_sources_fingerprint(dvc_project):
    result = dvc_project.dvc("repro")
    assert re.findall(r"Running stage '([^']+)'", result.stdout) == ["sources"]
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change" in result.stdout
    assert not stale_stages(dvc_project) & set(DATA_STAGES)


@pytest.mark.xdist_group("e2e")
def test_model_train_and_eval_params_leave_the_data_stages_alone(dvc_project):
    overrides = {"model": {"d_model": 64, "n_layers": 3}, "train": {"lr": 0.01}, "eval": {"batch_size": 3}}
    with dvc_project.params_changed(overrides):
        assert not stale_stages(dvc_project) & set(DATA_STAGES)


@pytest.mark.xdist_group("e2e")
def test_corpus_and_tokenizer_params_make_their_stages_stale(dvc_project):
    with dvc_project.params_changed({"corpus": {"val_fraction": 0.2}, "tokenizer": {"vocab_size": 500}}):
        assert {"corpus", "tokenizer"} <= stale_stages(dvc_project)
    with dvc_project.params_changed({"tokenizer": {"seed": 7}}):  # the tokenizer's sample has its own seed
        stale = stale_stages(dvc_project)
        assert "tokenizer" in stale and "corpus" not in stale
    with dvc_project.params_changed({"seed": 7}):  # the global seed is training's: the data stays
        stale = stale_stages(dvc_project)
        assert not stale & set(DATA_STAGES) and "train" in stale


def test_changing_corpus_params_reruns_all_three_stages(tmp_path, tiny_corpus):
    """A separate copy, so that the shared pipeline run stays as it is."""
    project = copy_project(tmp_path / "attnlab", tiny_corpus)
    project.dvc("repro", "tokenize")
    with project.params_changed({"corpus": {"val_fraction": 0.3}}):
        result = project.dvc("repro", "tokenize")
        for stage in DATA_STAGES:
            assert f"Running stage '{stage}'" in result.stdout
        meta = json.loads((project.path / "data" / "tokens" / "meta.json").read_text())
        assert meta["val"]["files"] > 2  # about 30 % of the ~65 files now


def test_an_edit_in_a_named_source_folder_reruns_the_corpus_and_nothing_else_does(tmp_path, tiny_corpus):
    """The corpus's sources live outside the repo; the always-run `sources` stage makes them a tracked input."""
    corpus = shutil.copytree(tiny_corpus, tmp_path / "corpus")
    project = copy_project(tmp_path / "attnlab", corpus)
    project.dvc("repro", "corpus")
    assert not project.stale_stages("corpus")
    untouched = project.dvc("repro", "corpus")
    assert "Stage 'corpus' didn't change, skipping" in untouched.stdout
    assert not project.stale_stages("corpus")

    edited = corpus / "stdlib" / "bisect.py"
    edited.write_text(edited.read_text() + "\n# an edit in the named folder\n")
    project.dvc("repro", "sources")  # what every `dvc repro` runs first
    assert project.stale_stages("corpus") == {"corpus"}
    rerun = project.dvc("repro", "corpus")
    assert "Running stage 'corpus'" in rerun.stdout
    manifest = json.loads((project.path / "data/corpus/manifest.json").read_text())
    fingerprint = json.loads((project.path / "data/sources.json").read_text())
    assert manifest["sources_fingerprint"] == fingerprint
    assert [s["root"] for s in fingerprint["sources"]] == [str(corpus.resolve())]

    (project.path / "data/sources.json").unlink()  # as after `dvc exp apply` of a run made elsewhere
    project.dvc("checkout", "sources")  # (the later stages have not run in this project)
    assert json.loads((project.path / "data/sources.json").read_text()) == fingerprint  # it is cached
    assert not project.stale_stages("corpus")
