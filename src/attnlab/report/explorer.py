"""reports/explorer.html: every head's attention on a few validation examples, token by token, in the browser.

One self-contained file (templates/explorer.html): the data sits in a <script type="application/json"> and the
script inline, no CDN and no network request, so it opens from disk. The reader picks an example, a layer and a
head (select#example, select#layer, select#head, whose option values are the example, layer and head numbers of
stats.parquet) and clicks a token: it becomes the query (class `query`), every token (class `tok`, `data-pos`
its position in the window) gets `data-weight`, the weight the head pays from the query to it (0 after the
query), shown as its background, and a layers x heads grid shows each head's support at that query. The arrow
keys move the query. With the head_roles stage's scores (reports/head_roles.json) each grid cell also carries its
head's role scores: `data-roles` and the cell's title list all four, and a short tag names the roles whose score
passes ROLE_TAGS' threshold.

Weights are stored compactly: per example, the lower triangle of every head's (n, n) matrix (row t holds keys
0..t, rows in order), as little-endian float16, base64. float16 keeps 11 significant bits, so a row sums to 1
within about 1e-3 and its entropy within a few thousandths of a bit; the page renormalises each row it shows.
Size: about N x L x H x n^2 / 2 x 2 bytes x 4/3 (base64), see explorer_size_bytes.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from markupsafe import Markup

from attnlab.analysis.explorer import ExplorerData
from attnlab.core.errors import ConfigError
from attnlab.report.templating import render
from attnlab.report.token_view import piece_text

WEIGHT_DTYPE = "<f2"  # little-endian float16, as the page decodes it
# role -> (tag shown in a grid cell, the score above which it is shown): the head_roles stage's induction threshold
# and Gu et al.'s sink epsilon; previous and duplicate token as sharp as a sink
ROLE_TAGS = {"induction": ("ind", 0.1), "duplicate": ("dup", 0.3), "previous_token": ("prev", 0.3),
             "sink": ("sink", 0.3)}


def lower_triangle(weights: np.ndarray) -> np.ndarray:
    """(..., n, n) -> (..., n(n+1)/2): row t's keys 0..t, rows in order, so row t starts at t(t+1)/2."""
    n = weights.shape[-1]
    rows, cols = np.tril_indices(n)
    return weights[..., rows, cols]


def pack_weights(weights: np.ndarray) -> str:
    """One example's (L, H, n, n) weights as base64 of float16 lower triangles, layer by layer, head by head."""
    return base64.b64encode(lower_triangle(weights).astype(WEIGHT_DTYPE).tobytes()).decode("ascii")


def explorer_size_bytes(n_examples: int, n_layers: int, n_heads: int, n_tokens: int) -> int:
    """The weights' share of the page in bytes (base64 of float16 lower triangles); the rest is a few KB plus
    the token text."""
    raw = n_examples * n_layers * n_heads * n_tokens * (n_tokens + 1) // 2 * 2
    return 4 * ((raw + 2) // 3)


def script_json(obj) -> str:
    """JSON safe inside <script>: <, > and & as \\u escapes, so no source text can close the element."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def token_pieces(sp, tokens: np.ndarray) -> list[list[str]]:
    """Display text of every token (N, n), checked against the tokenizer's vocabulary."""
    if tokens.size and int(tokens.max()) >= sp.get_piece_size():
        raise ConfigError(
            "--tokenizer",
            f"has {sp.get_piece_size()} pieces but the examples hold token id {int(tokens.max())}: the tokenizer "
            "and the examples come from different runs",
        )
    return [[piece_text(sp, int(t)) for t in row] for row in tokens]


def role_labels(roles: dict | None, n_layers: int, n_heads: int) -> dict:
    """"L<layer>H<head>" -> {"title": every role score, "tag": the roles past their ROLE_TAGS threshold} from
    head_roles.json's "heads"; {} without it. ConfigError when it holds other heads than the model's."""
    heads = (roles or {}).get("heads")
    if not isinstance(heads, dict):
        return {}
    expected = {f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)}
    if set(heads) != expected:
        raise ConfigError("--roles", f"holds the heads {sorted(heads)}, not the model's {n_layers} layers x "
                          f"{n_heads} heads: rerun head_roles")
    labels = {}
    for key, scores in heads.items():
        shown = [(role, float(scores[role])) for role in ROLE_TAGS if role in scores]
        labels[key] = {"title": ", ".join(f"{role.replace('_', ' ')} {score:.2f}" for role, score in shown),
                       "tag": " ".join(ROLE_TAGS[role][0] for role, score in shown if score > ROLE_TAGS[role][1])}
    return labels


def explorer_payload(data: ExplorerData, pieces: list[list[str]], roles: dict | None = None) -> dict:
    """Everything the page's script reads; roles: head_roles.json, for the grid's role labels."""
    _, n_layers, n_heads, n_tokens, _ = data.weights.shape
    return {
        "split": data.split,
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "n_tokens": int(n_tokens),
        "seq_len": int(data.seq_len),
        "dtype": "float16",
        "roles": role_labels(roles, int(n_layers), int(n_heads)),
        "examples": [
            {"example": int(e), "start": int(start), "pieces": pieces[i], "weights": pack_weights(data.weights[i])}
            for i, (e, start) in enumerate(zip(data.examples, data.starts))
        ],
    }


def explorer_html(data: ExplorerData, sp, roles: dict | None = None) -> str:
    """The whole page. sp: the SentencePiece processor (attnlab.data.tokenizer.load_tokenizer) for token text;
    roles: reports/head_roles.json, for the role labels of the grid (none without it)."""
    payload = explorer_payload(data, token_pieces(sp, data.tokens), roles)
    return render(
        "explorer.html",
        split=data.split,
        examples=[(e, int(s)) for e, s in zip(data.examples, data.starts)],
        layers=range(payload["n_layers"]),
        heads=range(payload["n_heads"]),
        n_tokens=payload["n_tokens"],
        with_roles=bool(payload["roles"]),
        seq_len=payload["seq_len"],
        data_json=Markup(script_json(payload)),  # escaped for <script> by script_json, not for HTML text
    )
