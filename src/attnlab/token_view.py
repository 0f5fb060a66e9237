"""attn_tokens.html: source tokens coloured by the attention one head pays from one query position.

Shows, per split, the examples with the most and the least support for the chosen (layer, head, position)
(attention.token_view_*). The page is offline and self-contained (inline CSS, no script), and every piece of
source text and every label is HTML-escaped: the source is code, full of `<`, `&`, quotes and `</script>`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attnlab.capture import capture_attention
from attnlab.config import AttentionConfig, ConfigError
from attnlab.model import Transformer


@dataclass(frozen=True)
class TokenPanel:
    title: str  # e.g. "val example 3: most support (41.2 tokens)"
    pieces: list[str]  # display text of tokens 0..position
    weights: np.ndarray  # (position + 1,) attention weights over those keys


def resolve_view(cfg: AttentionConfig, model: Transformer, model_path: str | Path) -> tuple[int, int, int]:
    """(layer, head, position) of the view, checked against the model file's shape (not params.yaml model.*)."""
    m = model.cfg
    where = f"the model in {model_path} has"
    if not 0 <= cfg.token_view_layer < m.n_layers:
        raise ConfigError("attention.token_view_layer", f"{cfg.token_view_layer}: {where} {m.n_layers} layers")
    if not 0 <= cfg.token_view_head < m.n_heads:
        raise ConfigError("attention.token_view_head", f"{cfg.token_view_head}: {where} {m.n_heads} heads")
    if not -m.seq_len <= cfg.token_view_position < m.seq_len:
        raise ConfigError(
            "attention.token_view_position", f"{cfg.token_view_position}: {where} seq_len={m.seq_len}"
        )
    return cfg.token_view_layer, cfg.token_view_head, cfg.token_view_position % m.seq_len


def extreme_examples(df: pd.DataFrame, layer: int, head: int, position: int) -> list[tuple[str, int, str, float]]:
    """Per split, the examples with the most and the least support at (layer, head, position).

    Returns [(split, example, "most" | "least", support)], ordered by split then most, least.
    """
    rows = df[(df["layer"] == layer) & (df["head"] == head) & (df["position"] == position)]
    chosen = []
    for split, part in rows.groupby("split", observed=True, sort=True):
        part = part.sort_values(["support", "example"], kind="stable")
        for label, row in (("most", part.iloc[-1]), ("least", part.iloc[0])):
            chosen.append((str(split), int(row["example"]), label, float(row["support"])))
    return chosen


def attention_rows(model: Transformer, tokens: torch.Tensor, layer: int, head: int, position: int) -> np.ndarray:
    """Weights the head pays from `position` to keys 0..position: tokens (N, T) int64 -> (N, position + 1)."""
    device = next(model.parameters()).device
    with torch.inference_mode(), capture_attention(model, layers=[layer]) as cache:
        model(tokens[:, : position + 1].to(device))  # causal: later tokens do not change this row
        weights = cache[layer][:, head, position, : position + 1]  # (N, position + 1)
    return weights.float().cpu().numpy()


def piece_text(sp, token_id: int) -> str:
    """What a SentencePiece token shows in source: "▁" is a space, <0xNN> byte pieces their character."""
    if sp.is_byte(token_id):
        byte = int(sp.id_to_piece(token_id)[3:5], 16)
        return chr(byte) if byte < 128 else f"\\x{byte:02x}"
    if sp.is_control(token_id):
        return f"[{sp.id_to_piece(token_id)}]"
    return sp.id_to_piece(token_id).replace("\u2581", " ")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.panel { margin-bottom: 2em; }
.code { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.6;
        border: 1px solid #ddd; padding: 0.8em; background: #fff; }
.tok { border-radius: 2px; }
.query { outline: 2px solid #1f77b4; }
.legend span { padding: 0 0.6em; }
"""


def token_view_html(panels: list[TokenPanel], heading: str) -> str:
    """The whole page. Token background: red with opacity = weight / the row's largest weight."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(heading)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(heading)}</h1>",
        "<p>Each token's background shows the attention weight the head pays to it from the outlined query "
        "token (darker = more weight, scaled to the largest weight in the row; hover for the value).</p>",
    ]
    for panel in panels:
        top = float(panel.weights.max()) if len(panel.weights) else 1.0
        spans = []
        for key_pos, (text, weight) in enumerate(zip(panel.pieces, panel.weights)):
            alpha = weight / top if top > 0 else 0.0
            cls = "tok query" if key_pos == len(panel.pieces) - 1 else "tok"
            spans.append(
                f'<span class="{cls}" style="background: rgba(214, 39, 40, {alpha:.3f})" '
                f'title="key {key_pos}: weight {weight:.4f}">{html.escape(text)}</span>'
            )
        parts.append(
            f'<div class="panel"><h2>{html.escape(panel.title)}</h2><div class="code">{"".join(spans)}</div></div>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
