"""The figure stages: one figure per call, by file name. Loads the input a figure reads, passes the params it
reads (both from the registry, attnlab.report.registry), draws it with its function in DRAW and writes the file
atomically.

FIGURES maps each file name stages/figure.py draws to the params it reads; dvc.yaml lists the same params for
that figure's stage (tests/unit/test_report.py checks), so changing one figure's params reruns only that figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.analysis.stats_files import EXAMPLES_FILE, load_dynamics, load_head_roles, load_mean_patterns, load_stats
from attnlab.core.errors import ConfigError
from attnlab.core.io import write_text
from attnlab.core.params import Params
from attnlab.report import plots_attention as plots
from attnlab.report import plots_roles, registry
from attnlab.report.style import save_figure

FIGURES = {f.name: list(f.params) for f in registry.figure_stage_figures()}  # file name -> params it reads
LOADERS = {"stats": load_stats, "mean_patterns": load_mean_patterns,  # Figure.reads -> loader(attention_dir)
           "dynamics": load_dynamics, "roles": load_head_roles}
# PNG file name -> its function, called with the loaded input and then the figure's params (the registry's order).
# attn_tokens.html, the figure that reads the model, is drawn by token_view.token_view_html in render().
DRAW: dict[str, Callable[..., plt.Figure]] = {
    "attn_weights_support.png": plots.weights_support,
    "attn_support_hist_all.png": plots.support_hist_all,
    "attn_support_vs_seq_len.png": plots.support_vs_seq_len,
    "attn_support_hist_by_block_head_w_seq_len_filter.png": plots.support_hist_by_head,
    "attn_entropy_heatmap.png": plots.entropy_heatmap,
    "attn_head_diversity.png": plots.head_diversity,
    "attn_mean_patterns.png": plots.mean_patterns,
    "attn_support_over_training.png": plots.support_over_training,
    "head_roles.png": plots_roles.head_roles_heatmap,
    "induction_over_training.png": plots_roles.induction_over_training,
}


def figure_spec(name: str) -> registry.Figure:
    """The registry entry of a figure stages/figure.py draws, or a ConfigError naming the choices."""
    if name not in FIGURES:
        raise ConfigError("--name", f"{name!r} is not a figure; expected one of: {', '.join(FIGURES)}")
    return registry.by_name(name)


def check_seq_len_filter(params: Params, seq_len: int, source: str) -> tuple[int, int]:
    start, stop = params.attention.seq_len_filter
    if stop > seq_len:
        raise ConfigError(
            "attention.seq_len_filter",
            f"[{start}, {stop}) reaches beyond seq_len={seq_len} of the analysed model ({source}); "
            f"use a stop <= {seq_len}",
        )
    return start, stop


def param_value(params: Params, key: str, data, attention_dir: str | Path):
    """The value of a dotted param for drawing, checked against the analysed model where it must fit it."""
    if key == "attention.seq_len_filter":
        _, _, seq_len = plots.shape_of(data)
        return check_seq_len_filter(params, seq_len, f"{Path(attention_dir) / 'stats.parquet'}, from the model file")
    section, field = key.split(".")
    return getattr(getattr(params, section), field)


def build_figure(name: str, params: Params, attention_dir: str | Path) -> plt.Figure:
    """The Figure for one of the PNG names in FIGURES."""
    spec = figure_spec(name)
    if spec.reads not in LOADERS:
        raise ConfigError("--name", f"{name!r} is not a PNG figure")
    data = LOADERS[spec.reads](attention_dir)
    args = [param_value(params, key, data, attention_dir) for key in spec.params]
    return DRAW[name](data, *args)


def token_panels(
    params: Params, attention_dir: str | Path, model_path: str | Path, tokenizer_path: str | Path
) -> tuple[list, str]:
    """The panels and heading of the attn_tokens.html page for attention.token_view_{layer,head,position}."""
    import torch

    from attnlab.core.device import pick_device
    from attnlab.data.tokenizer import load_tokenizer
    from attnlab.model.checkpoint import load_model
    from attnlab.report.token_view import (
        TokenPanel,
        attention_rows,
        extreme_examples,
        piece_text,
        resolve_view,
    )

    sp = load_tokenizer(tokenizer_path)
    examples_path = Path(attention_dir) / EXAMPLES_FILE
    if not examples_path.exists():
        raise ConfigError(str(examples_path), "example tokens not found: run the attention_stats stage first")
    model, _ = load_model(model_path, pick_device(params.train.device))
    layer, head, position = resolve_view(params.attention, model, model_path)
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
    return panels, heading


def render(
    name: str,
    params: Params,
    attention_dir: str | Path,
    out: str | Path,
    model_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
) -> None:
    """Write figure `name` to `out` (the figure stage's one call)."""
    spec = figure_spec(name)
    if spec.reads == "model":
        if model_path is None or tokenizer_path is None:
            raise ConfigError("--model", f"{name} needs --model and --tokenizer")
        from attnlab.report.token_view import token_view_html  # torch: only for this figure

        page = token_view_html(*token_panels(params, attention_dir, model_path, tokenizer_path))
        write_text(out, page)
        return
    save_figure(build_figure(name, params, attention_dir), out)
