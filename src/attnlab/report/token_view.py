"""attn_tokens.html: source tokens coloured by the attention one head pays from one query position.

Shows, per split, the examples with the most and the least support for the chosen (layer, head, position)
(attention.token_view_*). The page (templates/attn_tokens.html) is offline and self-contained (inline CSS, no
script), and the template HTML-escapes every piece of source text and every label: the source is code, full
of `<`, `&`, quotes and `</script>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attnlab.analysis.capture import capture_attention
from attnlab.core.errors import ConfigError
from attnlab.core.params import AttentionConfig
from attnlab.model.transformer import Transformer
from attnlab.report.templating import render


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


@dataclass(frozen=True)
class TokenCell:
    """One token as the page shows it (templates/attn_tokens.html)."""

    text: str
    key: int  # key position
    weight: str  # e.g. "0.0123"
    alpha: str  # background opacity: weight / the row's largest weight
    css_class: str  # "tok", or "tok query" for the query token (the last one)


def token_cells(panel: TokenPanel) -> list[TokenCell]:
    top = float(panel.weights.max()) if len(panel.weights) else 1.0
    last = len(panel.pieces) - 1
    return [
        TokenCell(text, key, f"{weight:.4f}", f"{weight / top if top > 0 else 0.0:.3f}",
                  "tok query" if key == last else "tok")
        for key, (text, weight) in enumerate(zip(panel.pieces, panel.weights))
    ]  # fmt: skip


def token_view_html(panels: list[TokenPanel], heading: str) -> str:
    """The whole page. Token background: red with opacity = weight / the row's largest weight."""
    views = [{"title": panel.title, "tokens": token_cells(panel)} for panel in panels]
    return render("attn_tokens.html", heading=heading, panels=views)
