"""The figure stages: one figure per call, by file name. Loads the inputs a figure needs, checks its params
against the analysed model, calls the plotting function, writes the file atomically.

FIGURES maps each file name in reports/figures/ to the params it reads; dvc.yaml lists the same params for
that figure's stage, so changing one figure's params reruns only that figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab import plots
from attnlab.config import ConfigError, Params
from attnlab.io import save_figure, write_text
from attnlab.stats_io import EXAMPLES_FILE, load_mean_patterns, load_stats

FIGURES = {  # file name -> params it reads (besides the attention_stats outputs)
    "attn_weights_support.png": ["attention.batch_size"],
    "attn_support_hist_all.png": [],
    "attn_support_vs_seq_len.png": [],
    "attn_support_hist_by_block_head_w_seq_len_filter.png": ["attention.seq_len_filter"],
    "attn_entropy_heatmap.png": [],
    "attn_head_diversity.png": [],
    "attn_mean_patterns.png": [],
    "attn_tokens.html": ["attention.token_view_layer", "attention.token_view_head", "attention.token_view_position"],
}


def check_seq_len_filter(params: Params, seq_len: int, source: str) -> tuple[int, int]:
    start, stop = params.attention.seq_len_filter
    if stop > seq_len:
        raise ConfigError(
            "attention.seq_len_filter",
            f"[{start}, {stop}) reaches beyond seq_len={seq_len} of the analysed model ({source}); "
            f"use a stop <= {seq_len}",
        )
    return start, stop


def build_figure(name: str, params: Params, attention_dir: str | Path) -> plt.Figure:
    """The Figure for one of the PNG names in FIGURES."""
    if name == "attn_mean_patterns.png":
        return plots.mean_patterns(load_mean_patterns(attention_dir))
    df = load_stats(attention_dir)
    _, _, seq_len = plots.shape_of(df)
    if name == "attn_weights_support.png":
        return plots.weights_support(df, params.attention.batch_size)
    if name == "attn_support_hist_all.png":
        return plots.support_hist_all(df)
    if name == "attn_support_vs_seq_len.png":
        return plots.support_vs_seq_len(df)
    if name == "attn_support_hist_by_block_head_w_seq_len_filter.png":
        window = check_seq_len_filter(params, seq_len, f"{Path(attention_dir) / 'stats.parquet'}, from the model file")
        return plots.support_hist_by_head(df, window)
    if name == "attn_entropy_heatmap.png":
        return plots.entropy_heatmap(df)
    if name == "attn_head_diversity.png":
        return plots.head_diversity(df)
    raise ConfigError("--name", f"{name!r} is not a figure; expected one of: {', '.join(FIGURES)}")


def token_view(
    params: Params, attention_dir: str | Path, model_path: str | Path, tokenizer_path: str | Path
) -> str:
    """The attn_tokens.html page for attention.token_view_{layer,head,position}."""
    import sentencepiece as spm
    import torch

    from attnlab.checkpoint import load_model
    from attnlab.token_view import TokenPanel, attention_rows, extreme_examples, piece_text, resolve_view, token_view_html

    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.model"
    if not tokenizer_path.exists():
        raise ConfigError(str(tokenizer_path), "tokenizer model not found: run the tokenizer stage first")
    examples_path = Path(attention_dir) / EXAMPLES_FILE
    if not examples_path.exists():
        raise ConfigError(str(examples_path), "example tokens not found: run the attention_stats stage first")
    model, _ = load_model(model_path, "cpu")
    layer, head, position = resolve_view(params.attention, model, model_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    with np.load(examples_path) as data:
        splits = [str(s) for s in data["splits"]]
        tokens = data["tokens"].astype(np.int64)  # (splits, N, T)
    if tokens.shape[-1] != model.cfg.seq_len:
        raise ConfigError(str(examples_path), f"examples of {tokens.shape[-1]} tokens do not match the model's seq_len")
    df = load_stats(attention_dir)
    chosen = extreme_examples(df, layer, head, position)
    ids = torch.from_numpy(np.stack([tokens[splits.index(split), example] for split, example, _, _ in chosen]))
    weights = attention_rows(model, ids, layer, head, position)  # (n, position + 1)
    panels = [
        TokenPanel(
            title=f"{split} example {example}: {label} support ({support:.1f} tokens)",
            pieces=[piece_text(sp, int(t)) for t in ids[i, : position + 1]],
            weights=weights[i],
        )
        for i, (split, example, label, support) in enumerate(chosen)
    ]
    heading = f"Attention of layer {layer} head {head} from query position {position}"
    return token_view_html(panels, heading)


def render(
    name: str,
    params: Params,
    attention_dir: str | Path,
    out: str | Path,
    model_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
) -> None:
    """Write figure `name` to `out` (the figure stage's one call)."""
    if name not in FIGURES:
        raise ConfigError("--name", f"{name!r} is not a figure; expected one of: {', '.join(FIGURES)}")
    if name == "attn_tokens.html":
        if model_path is None or tokenizer_path is None:
            raise ConfigError("--model", "attn_tokens.html needs --model and --tokenizer")
        write_text(out, token_view(params, attention_dir, model_path, tokenizer_path))
        return
    save_figure(build_figure(name, params, attention_dir), out)
