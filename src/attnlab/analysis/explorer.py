"""The attention explorer's data: the trained model's attention weights, every layer and head, on the first
explorer.n_examples validation examples of attention_stats.

The examples are read from data/attention/examples.npz, so example i and position t here are example i and
position t of the val split in stats.parquet: the same token windows in the same order. The model runs on each
whole window (exactly as attention_stats ran it, so every row is the row whose statistics stats.parquet holds)
and the weights are cropped to the first explorer.max_tokens queries and keys, which is all a causal row of
those queries can see. The page itself is attnlab.report.explorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.stats_files import EXAMPLES_FILE
from attnlab.core.device import pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.params import Params
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer

SPLIT = "val"  # the explorer shows validation examples, as the findings and the per-head means do


@dataclass(frozen=True)
class ExplorerData:
    """What the explorer page shows. N examples, L layers, H heads, n tokens each."""

    split: str  # the split of stats.parquet the examples come from
    examples: list[int]  # their `example` numbers in stats.parquet: 0 .. N-1
    starts: np.ndarray  # (N,) where each window starts in the split's token file
    tokens: np.ndarray  # (N, n) int64 token ids, the window's first n positions
    weights: np.ndarray  # (N, L, H, n, n) float32 attention weights, rows = query positions, causal
    seq_len: int  # the model's window; positions n .. seq_len-1 are cropped

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])


def load_examples(attention_dir: str | Path, n_examples: int, split: str = SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """The first n_examples windows of `split` that attention_stats analysed: starts (N,), tokens (N, T) int64."""
    path = Path(attention_dir) / EXAMPLES_FILE
    if not path.exists():
        raise ConfigError(str(path), "example tokens not found: run the attention_stats stage first")
    with np.load(path) as data:
        splits = [str(s) for s in data["splits"]]
        if split not in splits:
            raise ConfigError(str(path), f"holds the splits {splits}, not {split!r}")
        starts, tokens = data["starts"][splits.index(split)], data["tokens"][splits.index(split)]
    if n_examples > len(tokens):
        raise ConfigError(
            "explorer.n_examples",
            f"{n_examples}, but {path} holds {len(tokens)} examples per split (attention.n_examples when "
            "attention_stats ran): lower explorer.n_examples or rerun attention_stats",
        )
    return starts[:n_examples].astype(np.int64), tokens[:n_examples].astype(np.int64)


def example_attention(model: Transformer, tokens: torch.Tensor, n_tokens: int) -> np.ndarray:
    """Attention weights of every layer and head on each window of tokens (N, T), cropped to the first n_tokens
    queries and keys: (N, L, H, n_tokens, n_tokens) float32. One window per forward pass, so memory stays at
    one window's (L, H, T, T) weights whatever N is."""
    device = next(model.parameters()).device
    n_layers = len(model.attention_layers)
    out = []
    for window in tokens:
        with torch.inference_mode(), capture_attention(model) as cache:
            model(window[None].to(device))
            weights = torch.stack([cache[layer][0, :, :n_tokens, :n_tokens] for layer in range(n_layers)])
        out.append(weights.float().cpu().numpy())  # (L, H, n, n)
    return np.stack(out)


def explorer_data(params: Params, model_path: str | Path, attention_dir: str | Path) -> ExplorerData:
    """The explorer stage's model part: the model (on train.device) over the first explorer.n_examples
    validation examples of attention_stats, cropped to explorer.max_tokens."""
    cfg = params.explorer
    model, _ = load_model(model_path, pick_device(params.train.device))
    starts, tokens = load_examples(attention_dir, cfg.n_examples)
    seq_len = model.cfg.seq_len  # the model file's shape, never params.yaml model.*
    if tokens.shape[1] != seq_len:
        raise ConfigError(
            str(Path(attention_dir) / EXAMPLES_FILE),
            f"holds windows of {tokens.shape[1]} tokens but the model in {model_path} has seq_len={seq_len}: "
            "rerun attention_stats with this model",
        )
    if int(tokens.max()) >= model.vocab_size:
        raise ConfigError(
            str(Path(attention_dir) / EXAMPLES_FILE),
            f"holds token id {int(tokens.max())} but the model's vocabulary has {model.vocab_size} ids",
        )
    n_tokens = min(cfg.max_tokens, seq_len)
    weights = example_attention(model, torch.from_numpy(tokens), n_tokens)
    return ExplorerData(SPLIT, list(range(len(tokens))), starts, tokens[:, :n_tokens], weights, seq_len)
