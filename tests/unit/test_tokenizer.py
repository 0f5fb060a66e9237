"""The tokenizer (real SentencePiece) is lossless on code, and the token files follow the contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import TRICKY_FILES

from attnlab.core.errors import ConfigError
from attnlab.core.io import read_json
from attnlab.core.params import CorpusConfig, TokenizerConfig
from attnlab.data.corpus import build_corpus, read_documents
from attnlab.data.tokenizer import (
    CHUNK_CHARS,
    MODEL_FILE,
    build_tokenizer,
    chunk_lines,
    tokenize_corpus,
    train_tokenizer,
    training_sample,
)
from attnlab.data.tokens import load_meta, load_tokens

ROOT = Path(__file__).resolve().parents[2]
SEED = 1337

# Strings the tokenizer never saw in training, in the style of the corpus and beyond it.
UNSEEN = [
    "",
    "\n",
    "\n\n\n",
    "   ",
    "x = 1",
    "\tif a:\r\n\t\treturn b\r\n",
    "def ƒ(ψ, 日本):\n    return ψ ** 日本  # ∑∫ 🐍🔥\n",
    "  leading and trailing spaces   \n   \n",
    "mixed\r\nline\rends\n\r\n",
    "a" * 20_000 + "\n" + "b = [" + "1, " * 5000 + "]\n",
    "\ufeff# BOM first\nx = '\\x00 escaped'\n",
    "s = 'ÆØÅ ŒŸ ß ﬁ ①②③ ｆｕｌｌｗｉｄｔｈ'  # NFKC would change these\n",
    "\x0c\x0b\x1b[31m control\x7f chars\n",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_corpus):
    """The tiny corpus, its tokenizer (vocab 512) and its token files, built by the stage functions."""
    out = tmp_path_factory.mktemp("tok")
    build_corpus(CorpusConfig(sources=(str(tiny_corpus),), max_mb=1), out / "corpus")
    info = build_tokenizer(out / "corpus", TokenizerConfig(vocab_size=512, sample_mb=1), SEED, out / "tokenizer")
    meta = tokenize_corpus(out / "corpus", out / "tokenizer", out / "tokens")
    return {"dir": out, "info": info, "meta": meta}


@pytest.fixture(scope="module")
def sp(built) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(built["dir"] / "tokenizer" / MODEL_FILE))


def test_model_loads_with_plain_sentencepiece_and_has_the_expected_special_ids(built):
    path = built["dir"] / "tokenizer" / MODEL_FILE
    code = (
        "import sentencepiece as spm, sys; sp = spm.SentencePieceProcessor(model_file=sys.argv[1]); "
        "print(sp.get_piece_size(), sp.unk_id(), sp.eos_id(), sp.bos_id(), sp.pad_id())"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    size, unk, eos, bos, pad = map(int, result.stdout.split())
    assert 384 <= size <= 512
    assert (unk, eos, bos, pad) == (0, 1, -1, -1)


@pytest.mark.parametrize("name", sorted(TRICKY_FILES))
def test_round_trip_on_tricky_files(sp, name):
    text = TRICKY_FILES[name]
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.unk_id() not in ids


@pytest.mark.parametrize("text", UNSEEN, ids=range(len(UNSEEN)))
def test_round_trip_on_unseen_text_uses_byte_fallback_not_unk(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.unk_id() not in ids


def test_round_trip_on_every_corpus_file(built, sp):
    for split in ("train", "val"):
        docs = read_documents(built["dir"] / "corpus", split)
        for doc, ids in zip(docs, sp.encode(docs)):
            assert sp.decode(ids) == doc


def test_indentation_becomes_whole_pieces(sp):
    ids = sp.encode("        return x\n")  # eight spaces: fewer pieces than characters of indentation
    assert len(ids) < 8


def test_chunk_lines_keeps_whole_lines_and_cuts_only_long_ones():
    text = "a = 1\n\n" + "b" * 25 + "\r\n" + "c = 3"
    chunks = chunk_lines(text, max_chars=10)
    assert "".join(chunks) == text
    assert all(len(c) <= 10 for c in chunks)
    assert chunks == ["a = 1\n\n", "b" * 10, "b" * 10, "bbbbb\r\n", "c = 3"]
    assert chunk_lines("x\n" * 3, max_chars=CHUNK_CHARS) == ["x\nx\nx\n"]


def test_training_sample_is_seeded_and_bounded():
    docs = [f"line_{i} = {i}\n" * 50 for i in range(200)]
    a = training_sample(docs, 0.01, SEED)
    assert a == training_sample(docs, 0.01, SEED)
    assert a != training_sample(docs, 0.01, SEED + 1)
    size = sum(len(c.encode()) for c in a)
    assert 10_000 <= size < 10_000 + CHUNK_CHARS * 4
    assert set(a) <= {c for d in docs for c in chunk_lines(d)}


def test_training_is_deterministic(built):
    docs = read_documents(built["dir"] / "corpus", "train")
    sample = training_sample(docs, 0.2, SEED)
    assert train_tokenizer(sample, 400, SEED) == train_tokenizer(sample, 400, SEED)


def test_empty_train_split_is_a_config_error():
    with pytest.raises(ConfigError):
        train_tokenizer([], 512, SEED)


def test_token_files_follow_the_contract(built, sp):
    tokens_dir = built["dir"] / "tokens"
    meta = read_json(tokens_dir / "meta.json")
    assert set(meta) == {"vocab_size", "eos_id", "train", "val", "bytes_per_token"}
    assert meta["vocab_size"] == sp.get_piece_size() and meta["eos_id"] == sp.eos_id() == 1
    assert load_meta(tokens_dir) == meta
    manifest = read_json(built["dir"] / "corpus" / "manifest.json")
    for split in ("train", "val"):
        tokens = np.fromfile(tokens_dir / f"{split}.bin", dtype=np.uint16)
        assert (tokens_dir / f"{split}.bin").stat().st_size == 2 * len(tokens)
        assert np.array_equal(load_tokens(tokens_dir, split), tokens)
        docs = read_documents(built["dir"] / "corpus", split)
        assert set(meta[split]) == {"tokens", "bytes", "files"}
        assert meta[split]["tokens"] == len(tokens)
        assert meta[split]["files"] == len(docs) == manifest["totals"][split]["files"]
        assert meta[split]["bytes"] == sum(len(d.encode("utf-8")) for d in docs) == manifest["totals"][split]["bytes"]
        assert meta["bytes_per_token"][split] == pytest.approx(meta[split]["bytes"] / meta[split]["tokens"], 1e-3)
        assert int(tokens.max()) < meta["vocab_size"]
        # each document is followed by eos; decoding each piece gives the documents back exactly
        assert tokens[-1] == meta["eos_id"] and int((tokens == meta["eos_id"]).sum()) == len(docs)
        ends = np.flatnonzero(tokens == meta["eos_id"])
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded = [sp.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]
        assert decoded == docs


def test_tokenize_stage_without_tokenizer_reports_one_line(tmp_path, built):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "tokenize_corpus.py"), "--params", str(params),
         "--corpus", str(built["dir"] / "corpus"), "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'none' / MODEL_FILE}: ")
    assert not (tmp_path / "o").exists()
