"""How much each attention head attends to: per-row statistics of the attention weights, streamed to parquet.

For one head, example and query position t, the weights p_0..p_t over keys 0..t form a distribution:
- entropy_bits = -sum_j p_j log2 p_j, in [0, log2(t+1)] (0 log 0 = 0, so exact 0/1 weights are safe);
- support = 2 ** entropy_bits, the effective number of keys attended to, in [1, t+1];
- normalized_support = support / (t + 1), in (0, 1];
- max_weight = max_j p_j;
- mean_distance = sum_j p_j (t - j), the expected distance back to the attended key, in tokens;
- weight_on_first = p_0, the weight on the first token of the window.

`row_stats` computes them for every row of a (B, H, T, T) tensor at once, and refuses (ValueError) a row with
weight on keys after t rather than silently folding it in. `stream_attention_stats` runs the model over seeded
examples of each split, batch by batch, through capture_attention; only one batch's weights are alive at a time,
and rows go to a sink (a parquet writer) as arrow tables, so memory stays bounded whatever attention.n_examples
is. It also accumulates each head's mean attention pattern and the summary metrics (per split, and per head for
the val split).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attnlab.core.progress import progress_bar
from attnlab.analysis.capture import capture_attention
from attnlab.analysis.stats_files import EXAMPLES_FILE, PATTERNS_FILE, STATS_FILE
from attnlab.core.device import pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import atomic_path
from attnlab.core.memory import release_freed_memory
from attnlab.core.params import Params
from attnlab.data.tokens import SPLITS, check_length, example_starts, load_tokens
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer

STAT_NAMES = ("entropy_bits", "support", "normalized_support", "max_weight", "mean_distance", "weight_on_first")
METRIC_NAMES = ("entropy_bits", "support", "normalized_support")  # reported as mean_<name> per split
HEAD_METRIC_NAMES = ("support", "normalized_support")  # reported per head, as mean_<name>, for HEADS_SPLIT only
HEADS_SPLIT = "val"
SPLIT_TYPE = pa.dictionary(pa.int8(), pa.string())  # pandas category



# --------------------------------------------------------------------------------------- row statistics


CAUSAL_TOLERANCE = 1e-6  # most weight a row may put on keys after its query before row_stats refuses it


class RowConstants(NamedTuple):
    """What row_stats needs of T alone, made once per (T, dtype, device)."""

    upper: torch.Tensor  # (T*T,) 1 where key > query, in the weights' dtype
    position: torch.Tensor  # (T,) query position t
    visible: torch.Tensor  # (T,) t + 1, the number of keys a row may attend to
    max_bits: torch.Tensor  # (T,) log2(t + 1)


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # plain tensors, usable whether the caller runs under inference mode or autograd
def row_constants(T: int, dtype: torch.dtype, device: torch.device) -> RowConstants:
    position = torch.arange(T, device=device, dtype=torch.float32)
    return RowConstants(
        upper=torch.ones(T, T, dtype=dtype, device=device).triu_(1).reshape(T * T),
        position=position,
        visible=position + 1.0,
        max_bits=torch.log2(position + 1.0),
    )


def check_causal(p: torch.Tensor) -> None:
    """Raise ValueError naming the first row of p (..., T, T) with more than CAUSAL_TOLERANCE weight on keys after
    its query position. NaN rows pass: row_stats returns NaN for them rather than hiding them.

    First, one matrix-vector product sums each (T, T) matrix's weight after the diagonal, reading p once and
    writing nothing; for weights >= 0 (a negative weight makes its row's entropy NaN) no row can exceed the
    tolerance when its matrix's sum does not. Only a matrix over it is searched row by row.
    """
    T = p.shape[-1]
    upper = row_constants(T, p.dtype, p.device).upper  # (T*T,)
    if not bool((p.reshape(-1, T * T) @ upper > CAUSAL_TOLERANCE).any()):  # (N,) each matrix's weight after t
        return
    after = torch.triu(p, diagonal=1).abs_().sum(-1)  # (..., T) weight on keys j > t
    bad = after > CAUSAL_TOLERANCE
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])  # (..., t) of the first offending row
        t = index[-1]
        raise ValueError(
            f"attention row at index {index} (query position {t}) puts {float(after[index]):.3g} of its weight on "
            f"keys after position {t}; row_stats needs causal rows (at most {CAUSAL_TOLERANCE:g} after the query)"
        )


ENTROPY_BLOCK = 1 << 18  # weights per block of rows on the CPU (1 MB in fp32): the block's temporary stays in cache


def row_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log2 p_j of each row of p (..., T, T) float -> (..., T), with 0 log 0 = 0; NaN for a row with a
    weight below 0, whose entropy is undefined.

    Adding the smallest normal float makes ln of a zero weight finite (ln of an exact 0 takes a slow path, and
    half of a causal matrix is 0) and leaves every other weight as it is, or moves it by less than that float;
    ln of a negative weight stays NaN, and so does its row's sum. On the CPU the rows go a block at a time, each
    block's p ln p made in one temporary that stays in cache while it is summed; elsewhere all rows at once.
    """
    T = p.shape[-1]
    rows = p.reshape(-1, T)  # (N, T)
    block = max(1, ENTROPY_BLOCK // T) if p.device.type == "cpu" else max(1, rows.shape[0])
    tiny = torch.finfo(p.dtype).tiny
    sums = [weights.add(tiny).log_().mul_(weights).sum(-1) for weights in rows.split(block)]  # (C,) each
    return torch.cat(sums).mul_(-1.0 / math.log(2.0)).view(p.shape[:-1])  # (..., T)


def row_stats(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of every attention row. weights (..., T, T), rows = query positions, causal, rows sum to 1.

    Returns a dict of STAT_NAMES -> (..., T) float32 tensors. Vectorised: no loop over rows, heads or batch.
    Raises ValueError if a row puts weight on keys after its query (see check_causal): the statistics are
    defined over keys 0..t, and a non-causal row would otherwise pass silently, its entropy clamped.
    """
    p = weights.float()  # (..., T, T)
    T = p.shape[-1]
    check_causal(p)
    c = row_constants(T, p.dtype, p.device)
    # Rounding can step a hair outside the exact bounds [0, log2(t+1)]; NaN stays NaN (clamp keeps it).
    entropy_bits = torch.minimum(row_entropy_bits(p).clamp_min_(0.0), c.max_bits)
    support = torch.exp2(entropy_bits)
    # sum_j p_j (t - j) = t sum_j p_j - sum_j p_j j: a row sum and a matrix-vector product
    mean_distance = c.position * p.sum(-1) - p @ c.position  # (..., T)
    return {
        "entropy_bits": entropy_bits,
        "support": support,
        "normalized_support": support / c.visible,
        "max_weight": p.amax(-1),
        "mean_distance": mean_distance,
        "weight_on_first": p[..., 0],
    }


def offset_patterns(pattern_sums: np.ndarray) -> np.ndarray:
    """Re-index (..., T query, T key_pos) to (..., T query, T offset t - key_pos); offsets beyond t are NaN."""
    T = pattern_sums.shape[-1]
    position = np.arange(T)[:, None]  # (T, 1)
    offset = np.arange(T)[None, :]  # (1, T)
    key_pos = position - offset  # (T, T)
    valid = key_pos >= 0
    out = np.take_along_axis(pattern_sums, np.broadcast_to(np.where(valid, key_pos, 0), pattern_sums.shape), -1)
    return np.where(valid, out, np.nan)


# ---------------------------------------------------------------------------------------------- streaming


def _int_type(max_value: int, small: pa.DataType) -> pa.DataType:
    """`small` (int8 or int16) where max_value fits, else int32."""
    return small if max_value <= np.iinfo(small.to_pandas_dtype()).max else pa.int32()


def stats_schema(n_examples: int, n_layers: int, n_heads: int, seq_len: int) -> pa.Schema:
    """Columns of stats.parquet: one row per (split, example, layer, head, position)."""
    return pa.schema(
        [
            ("split", SPLIT_TYPE),
            ("example", _int_type(n_examples - 1, pa.int16())),
            ("layer", _int_type(n_layers - 1, pa.int8())),
            ("head", _int_type(n_heads - 1, pa.int8())),
            ("position", _int_type(seq_len - 1, pa.int16())),
        ]
        + [(name, pa.float32()) for name in STAT_NAMES]
    )


def per_head_sums(stats: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """name -> (L, H) float64: stats[name] (B, L, H, T) summed over the batch and the positions."""
    return {name: stats[name].double().sum((0, 3)).cpu().numpy() for name in names}


@dataclass
class Summary:
    """What the stream accumulates besides the rows."""

    n_layers: int
    n_heads: int
    seq_len: int
    pattern_sums: np.ndarray | None = None  # (L, H, T, T) float64 sum of attention weights over examples, at the end
    n_patterns: int = 0  # examples summed into pattern_sums
    stat_sums: dict = field(default_factory=dict)  # split -> {name: float sum}
    stat_counts: dict = field(default_factory=dict)  # split -> number of rows
    head_sums: dict = field(default_factory=dict)  # split -> {name in HEAD_METRIC_NAMES: (L, H) float64 sum}
    n_rows: int = 0

    def add(self, split: str, stats: dict[str, torch.Tensor]) -> None:
        """Fold one batch's statistics (name -> (B, L, H, T)) into the split's per-head sums."""
        sums = self.head_sums.setdefault(split, {name: np.zeros((self.n_layers, self.n_heads)) for name in
                                                 HEAD_METRIC_NAMES})  # fmt: skip
        for name, total in per_head_sums(stats, HEAD_METRIC_NAMES).items():
            sums[name] += total

    @property
    def mean_patterns(self) -> np.ndarray:
        """(L, H, T query position, T key offset t - key_pos) mean weight; NaN where the offset exceeds t."""
        return offset_patterns(self.pattern_sums / max(self.n_patterns, 1)).astype(np.float32)

    @property
    def metrics(self) -> dict:
        """{split: {mean_<name> for METRIC_NAMES}}, and for HEADS_SPLIT also "heads": {"L<layer>H<head>":
        {mean_<name> for HEAD_METRIC_NAMES}} (every head has the same number of rows, so the mean of the heads'
        means is the split's mean)."""
        metrics = {
            split: {f"mean_{name}": self.stat_sums[split][name] / self.stat_counts[split] for name in METRIC_NAMES}
            for split in self.stat_sums
        }
        if HEADS_SPLIT in metrics and HEADS_SPLIT in self.head_sums:
            rows_per_head = self.stat_counts[HEADS_SPLIT] / (self.n_layers * self.n_heads)
            sums = self.head_sums[HEADS_SPLIT]
            metrics[HEADS_SPLIT]["heads"] = {
                f"L{layer}H{head}": {f"mean_{name}": float(sums[name][layer, head] / rows_per_head)
                                     for name in HEAD_METRIC_NAMES}
                for layer in range(self.n_layers) for head in range(self.n_heads)
            }  # fmt: skip
        return metrics


def batch_stats(
    model: Transformer, batch: torch.Tensor, on_weights: Callable[[int, torch.Tensor], None] | None = None
) -> dict[str, torch.Tensor]:
    """row_stats of every layer for one batch of token ids (B, T) on the model's device: STAT_NAMES -> (B, L, H, T).

    Only one layer's weights are taken at a time; on_weights(layer, weights (B, H, T, T)), if given, sees each
    before it is freed.
    """
    with torch.inference_mode(), capture_attention(model) as cache:
        model.attend(batch)  # every layer's attention, and nothing after the last layer's
        per_layer = []
        for layer in range(model.cfg.n_layers):
            weights = cache.pop(layer)  # (B, H, T, T); freed once its stats are taken
            if on_weights is not None:
                on_weights(layer, weights)
            per_layer.append(row_stats(weights))
            del weights
    return {name: torch.stack([s[name] for s in per_layer], 1) for name in STAT_NAMES}  # (B, L, H, T)


def stream_attention_stats(
    model: Transformer,
    examples: dict[str, torch.Tensor],
    batch_size: int,
    sink: Callable[[pa.Table], None],
    progress: bool = False,
) -> Summary:
    """Run `model` over each split's examples (split -> (N, T) int64 token ids) in batches of `batch_size`.

    Each batch's rows (ordered split, example, layer, head, position, whatever the batch size) go to
    sink(arrow table). Only one batch's attention weights are alive at a time.
    """
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    T = next(iter(examples.values())).shape[1]
    device = next(model.parameters()).device
    n_max = max(len(ex) for ex in examples.values())
    schema = stats_schema(n_max, L, H, T)
    summary = Summary(L, H, T)
    pattern_sums = torch.zeros(L, H, T, T, dtype=torch.float64, device=device)

    def add_pattern(layer: int, weights: torch.Tensor) -> None:
        pattern_sums[layer] += weights.sum(0)  # (H, T, T), added into float64 in place

    # each example's rows in (layer, head, position) order, and the dictionary of split names
    grid = {name: np.asarray(column, dtype=schema.field(name).type.to_pandas_dtype())
            for name, column in zip(("layer", "head", "position"), _grid(L, H, T))}
    split_names = pa.array(list(examples))
    example_type = schema.field("example").type.to_pandas_dtype()
    n_batches = sum(math.ceil(len(ex) / batch_size) for ex in examples.values())
    n_done = 0
    bar = progress_bar(total=n_batches, desc="attention stats", unit="batch", disable=not progress)
    for split_code, (split, idx) in enumerate(examples.items()):
        sums = {name: 0.0 for name in STAT_NAMES}
        for first in range(0, len(idx), batch_size):
            batch = idx[first : first + batch_size].to(device)  # (B, T)
            B = batch.shape[0]
            stats = batch_stats(model, batch, add_pattern)  # (B, L, H, T) each
            summary.add(split, stats)
            columns = {name: stats[name].reshape(-1).cpu().numpy() for name in STAT_NAMES}
            for name in STAT_NAMES:
                sums[name] += float(columns[name].sum(dtype=np.float64))
            n = B * L * H * T
            arrays = [
                pa.DictionaryArray.from_arrays(pa.array(np.full(n, split_code, dtype=np.int8)), split_names),
                pa.array(np.repeat(np.arange(first, first + B, dtype=example_type), L * H * T)),
                *(pa.array(np.tile(grid[name], B)) for name in ("layer", "head", "position")),
                *(pa.array(columns[name]) for name in STAT_NAMES),
            ]
            table = pa.Table.from_arrays(arrays, schema=schema)
            sink(table)
            del table, arrays, columns, stats
            n_done += 1
            if n_done % TRIM_EVERY == 0:
                release_freed_memory()
            summary.n_rows += n
            summary.n_patterns += B
            bar.update(1)
        summary.stat_sums[split] = sums
        summary.stat_counts[split] = len(idx) * L * H * T
    bar.close()
    summary.pattern_sums = pattern_sums.cpu().numpy()
    return summary


TRIM_EVERY = 8  # batches between returns of freed heap memory to the OS


def _grid(L: int, H: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer, head, position = np.meshgrid(np.arange(L), np.arange(H), np.arange(T), indexing="ij")  # (L, H, T)
    return layer.reshape(-1), head.reshape(-1), position.reshape(-1)


def select_examples(tokens: np.ndarray, seq_len: int, n_examples: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """The fixed, seeded examples of one split: start offsets (N,) and token ids (N, T) int64."""
    starts = example_starts(len(tokens), seq_len, n_examples, seed)
    idx = starts[:, None] + np.arange(seq_len)[None, :]  # (N, T)
    return starts, torch.from_numpy(tokens[idx].astype(np.int64))


def stage_examples(
    params: Params, tokens_dir: str | Path, model: Transformer, splits: tuple[str, ...] = SPLITS
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """The examples the attention stages analyse, per split: start offsets (N,) and token ids (N, T) int64, with
    N = attention.n_examples and T the model's seq_len. ConfigError if a split is too short or holds token ids
    beyond the model's vocabulary. Each split's examples depend on that split and params.analysis.seed only."""
    T = model.cfg.seq_len
    tokens = {split: load_tokens(tokens_dir, split) for split in splits}
    for split, toks in tokens.items():
        check_length(toks, T, split)
        if int(toks.max()) >= model.vocab_size:
            raise ConfigError(
                str(Path(tokens_dir) / f"{split}.bin"),
                f"holds token id {int(toks.max())} but the model's vocabulary has {model.vocab_size} ids: "
                "the model and the token files come from different tokenizers",
            )
    starts, examples = {}, {}
    for split in splits:
        starts[split], examples[split] = select_examples(tokens[split], T, params.attention.n_examples,
                                                         params.analysis.seed)
    return starts, examples


# ------------------------------------------------------------------------------------------------- stage


def attention_stats(params: Params, model_path: str | Path, tokens_dir: str | Path, out_dir: str | Path) -> dict:
    """The attention_stats stage: writes out_dir/{stats.parquet, mean_patterns.npy, examples.npz}.

    Returns the metrics {split: {mean_entropy_bits, mean_support, mean_normalized_support}}, with the val split's
    per-head means under "heads" ({"L0H0": {mean_support, mean_normalized_support}, ...}), and a few counts.
    """
    cfg = params.attention
    model, _ = load_model(model_path, pick_device(params.train.device))
    T = model.cfg.seq_len  # the model file's shape, never params.yaml model.*
    starts, examples = stage_examples(params, tokens_dir, model)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = stats_schema(cfg.n_examples, model.cfg.n_layers, model.cfg.n_heads, T)
    with atomic_path(out_dir / STATS_FILE) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        summary = stream_attention_stats(model, examples, cfg.batch_size, writer.write_table, progress=True)
    with atomic_path(out_dir / PATTERNS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, summary.mean_patterns)
    with atomic_path(out_dir / EXAMPLES_FILE) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            splits=np.array(SPLITS),
            starts=np.stack([starts[s] for s in SPLITS]),  # (2, N)
            tokens=np.stack([examples[s].numpy().astype(np.uint16) for s in SPLITS]),  # (2, N, T)
        )
    return {
        "metrics": summary.metrics,
        "n_rows": summary.n_rows,
        "seq_len": T,
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
    }
