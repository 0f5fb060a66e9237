"""Builders shared by the interventions tests: a tiny random-init model, a tiny SentencePiece model trained on
a few KB of stdlib source, and a token folder written per the data contract (uint16 .bin files + meta.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from attnlab.checkpoint import save_model
from attnlab.config import ModelConfig
from attnlab.model import Transformer

TOKENIZER_VOCAB = 384


def tiny_model(vocab_size: int = 61, seed: int = 0, **overrides) -> Transformer:
    cfg = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=24)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**cfg), vocab_size).eval()


def training_text(max_chars: int = 24_000) -> str:
    """A few KB of real Python source from the standard library."""
    import argparse
    import json as json_module
    import textwrap

    parts = [Path(mod.__file__).read_text(encoding="utf-8") for mod in (textwrap, json_module.decoder, argparse)]
    return "".join(parts)[:max_chars]


def train_sentencepiece(path: Path, vocab_size: int = TOKENIZER_VOCAB) -> spm.SentencePieceProcessor:
    """A lossless-on-code BPE model with byte fallback, written to `path` (a .model file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = training_text().splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_prefix=str(path.with_suffix("")),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        character_coverage=1.0,
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(path))


def write_tokens(tokens_dir: Path, sp: spm.SentencePieceProcessor, text: str, val_fraction: float = 0.4) -> dict:
    """Encode text, split it into train/val by characters and write {train,val}.bin and meta.json."""
    tokens_dir.mkdir(parents=True, exist_ok=True)
    cut = int(len(text) * (1 - val_fraction))
    meta = {"vocab_size": sp.get_piece_size(), "eos_id": sp.eos_id()}
    bpt = {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.asarray(sp.encode(part) + [sp.eos_id()], dtype=np.uint16)
        ids.tofile(tokens_dir / f"{split}.bin")
        n_bytes = len(part.encode("utf-8"))
        meta[split] = {"tokens": int(len(ids)), "bytes": n_bytes, "files": 1}
        bpt[split] = n_bytes / len(ids)
    meta["bytes_per_token"] = bpt
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    return meta


def write_model(path: Path, vocab_size: int, **overrides) -> Transformer:
    model = tiny_model(vocab_size=vocab_size, **overrides)
    save_model(path, model)
    return model
