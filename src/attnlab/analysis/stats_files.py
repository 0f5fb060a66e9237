"""The files of the attention_stats, attention_dynamics and head_roles stages (data/attention/) and their loaders,
without importing torch, so the figure and report stages start fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from attnlab.core.errors import ConfigError

STATS_FILE = "stats.parquet"  # one row per (split, example, layer, head, position)
PATTERNS_FILE = "mean_patterns.npy"  # (L, H, T query position, T key offset) float32, NaN beyond the position
EXAMPLES_FILE = "examples.npz"  # splits (2,), starts (2, N), tokens (2, N, T) uint16
DYNAMICS_FILE = "dynamics.parquet"  # attention_dynamics: one row per (weight snapshot, layer, head), val examples
HEAD_ROLES_FILE = "head_roles.parquet"  # head_roles: one row per (layer, head, role), its score and what it scored


def load_stats(attention_dir: str | Path) -> pd.DataFrame:
    path = Path(attention_dir) / STATS_FILE
    if not path.exists():
        raise ConfigError(str(path), "attention statistics not found: run the attention_stats stage first")
    return pq.read_table(path).to_pandas()


def load_mean_patterns(attention_dir: str | Path) -> np.ndarray:
    path = Path(attention_dir) / PATTERNS_FILE
    if not path.exists():
        raise ConfigError(str(path), "mean attention patterns not found: run the attention_stats stage first")
    return np.load(path)


def load_dynamics(attention_dir: str | Path) -> pd.DataFrame:
    path = Path(attention_dir) / DYNAMICS_FILE
    if not path.exists():
        raise ConfigError(str(path), "attention across training not found: run the attention_dynamics stage first")
    return pq.read_table(path).to_pandas()


def load_head_roles(attention_dir: str | Path) -> pd.DataFrame:
    path = Path(attention_dir) / HEAD_ROLES_FILE
    if not path.exists():
        raise ConfigError(str(path), "head role scores not found: run the head_roles stage first")
    return pq.read_table(path).to_pandas()
