"""Token arrays on disk and seeded batches drawn from them.

The tokenize stage writes, per split, a flat array of uint16 token ids (`<split>.bin`, memory-mappable) and
`meta.json` with counts. Files are separated by the tokenizer's end-of-text id.

Training batches are a pure function of (seed, step): batch `step` of the run is the same whatever the
number of processes, and a resumed run continues exactly where it stopped. Each process takes a disjoint
slice of the global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attnlab.core.errors import ConfigError
from attnlab.core.io import read_json

SPLITS = ("train", "val")


def load_tokens(tokens_dir: str | Path, split: str) -> np.ndarray:
    """The token ids of one split as a read-only memory map, shape (N,), dtype uint16."""
    path = Path(tokens_dir) / f"{split}.bin"
    if not path.exists():
        raise ConfigError(str(path), "token file not found: run the tokenize stage first (dvc repro tokenize)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / "meta.json"
    if not path.exists():
        raise ConfigError(str(path), "token metadata not found: run the tokenize stage first")
    return read_json(path)


def check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise ConfigError(
            "model.seq_len",
            f"{seq_len} needs at least {seq_len + 1} tokens but the {what} split has {len(tokens)}: "
            "gather a larger corpus (corpus.max_mb) or use a shorter model.seq_len",
        )


def batch_starts(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the global batch number `step`: (batch_size,) ints in [0, n_tokens - seq_len - 1]."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=batch_size)


def rank_slice(starts: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's disjoint, contiguous share of the global batch."""
    per_rank = len(starts) // world_size
    return starts[rank * per_rank : (rank + 1) * per_rank]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts`: two (B, T) int64 tensors."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]


def eval_starts(n_tokens: int, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Non-overlapping windows covering up to max_tokens (0 = the whole split), spread evenly over the split.

    The split is files concatenated in path order, so the first max_tokens would score one corner of the
    corpus; evenly spaced windows score all of it. Deterministic, so every run scores the same windows.
    """
    n_all = (n_tokens - 1) // seq_len
    all_starts = np.arange(n_all, dtype=np.int64) * seq_len
    if not max_tokens or max_tokens // seq_len >= n_all:
        return all_starts
    n_windows = max(1, max_tokens // seq_len)
    picks = np.floor(np.arange(n_windows) * (n_all / n_windows)).astype(np.int64)  # strictly increasing
    return all_starts[picks]


def example_starts(n_tokens: int, seq_len: int, n_examples: int, seed: int) -> np.ndarray:
    """A fixed, seeded selection of n_examples windows (sorted), for analyses that need the same data."""
    candidates = eval_starts(n_tokens, seq_len)
    rng = np.random.default_rng(seed)
    if len(candidates) >= n_examples:
        return np.sort(rng.choice(candidates, size=n_examples, replace=False))
    return np.sort(rng.integers(0, n_tokens - seq_len, size=n_examples))
