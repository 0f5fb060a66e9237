"""Small builders shared by tests: synthetic token files in the tokenize stage's format, tiny params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

PROJECT = Path(__file__).resolve().parents[1]


def write_tokens(folder: Path, vocab_size: int = 512, n_train: int = 40_000, n_val: int = 6_000, seed: int = 0):
    """A token stream with structure (repeated phrases), so a tiny model's loss falls when it learns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phrases = rng.integers(2, vocab_size, size=(64, 24))  # (n_phrases, phrase_len)

    def stream(n):
        picks = rng.integers(0, len(phrases), size=n // phrases.shape[1] + 1)
        return phrases[picks].reshape(-1)[:n].astype(np.uint16)

    train, val = stream(n_train), stream(n_val)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    meta = {
        "vocab_size": vocab_size, "eos_id": 1,
        "train": {"tokens": n_train, "bytes": 3 * n_train, "files": 10},
        "val": {"tokens": n_val, "bytes": 3 * n_val, "files": 2},
        "bytes_per_token": {"train": 3.0, "val": 3.0},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


TINY_TRAIN_PARAMS = {
    "tokenizer": {"vocab_size": 512},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 32},
    "train": {"max_tokens": 8192, "batch_size": 8, "eval_tokens": 1024, "log_every": 4, "lr": 0.003},
    "attention": {"seq_len_filter": [8, 16]},
    "interventions": {"n_eval_tokens": 512, "mean_tokens": 512},
}


def write_params(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def run_stage(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run stages/<script> as a real subprocess with this interpreter."""
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, str(PROJECT / "stages" / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600,
    )
