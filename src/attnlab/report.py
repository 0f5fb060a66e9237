"""reports/index.html: one self-contained page of the whole study — metrics, loss curve, every figure with a
caption saying what to look for, the token view and the generated samples.

Images are embedded as base64 data URIs and HTML pages (attn_tokens.html) as sandboxed iframes (srcdoc), so
the page opens from disk with no server and no network. Every input is optional: a missing one becomes a
short note on the page, never a crash.

To add figures (interventions, positional-encoding variants), append FigureEntry rows to FIGURES (and metrics
files to METRICS); sections appear in the order of SECTIONS, then in order of first use.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from attnlab.plots_interventions import INTERVENTION_FIGURES
from attnlab.plots_pe import PE_FIGURES


@dataclass(frozen=True)
class FigureEntry:
    file: str  # path relative to the reports folder, e.g. "figures/attn_support_hist_all.png"
    caption: str  # one line: what to look for
    section: str


SECTIONS = ("Training", "Attention", "Interventions", "Positional encoding")

FIGURES: list[FigureEntry] = [
    FigureEntry(
        "figures/loss_curve.png",
        "Training and validation loss against tokens seen: both should fall and flatten; a widening gap means overfitting.",
        "Training",
    ),
    FigureEntry(
        "figures/attn_weights_support.png",
        "Support (effective number of attended tokens) for one batch: look for heads that stay dark (focused) "
        "at every position versus heads that brighten with position (spread out).",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_support_hist_all.png",
        "Normalized support = support / (position + 1) over all heads and query positions (left; 1 = uniform over "
        "every visible token, mass near 0 = sharp attention), with raw support in tokens beside it (right); "
        "train and val should overlap.",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_support_vs_seq_len.png",
        "Support against query position, with the maximum (position + 1): how far below the diagonal attention "
        "stays as the context grows.",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_support_hist_by_block_head_w_seq_len_filter.png",
        "Per-head histograms of normalized support = support / (position + 1) for query positions in "
        "[start, stop) of attention.seq_len_filter: heads differ most here, some peaked near 0 (a few tokens), "
        "others broad or near 1 (uniform).",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_entropy_heatmap.png",
        "Mean entropy (bits) and normalized support per layer and head: dark cells are the focused heads.",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_head_diversity.png",
        "Earth mover's distance between heads' support distributions: bright off-diagonal blocks are heads "
        "that behave very differently.",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_mean_patterns.png",
        "Mean attention by query position and key offset: a bright column at offset 1 is a previous-token head, "
        "a bright diagonal attends to the first token.",
        "Attention",
    ),
    FigureEntry(
        "figures/attn_tokens.html",
        "Source tokens coloured by one head's attention from one query position, for the examples with the most "
        "and the least support.",
        "Attention",
    ),
]

FIGURES += [FigureEntry(f"figures/{name}", caption, "Interventions") for name, caption in INTERVENTION_FIGURES]
FIGURES += [FigureEntry(f"figures/{name}", caption, "Positional encoding") for name, caption in PE_FIGURES]

METRICS: list[tuple[str, str]] = [  # (title, file relative to the reports folder)
    ("Training", "train.json"),
    ("Evaluation", "eval.json"),
    ("Attention", "attention.json"),
    ("Interventions", "interventions.json"),
    ("Position probe", "position_probe.json"),
]

SAMPLES = ["samples.md", "intervention_samples.md"]  # markdown files shown at the end, in this order

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: 0.2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; margin-top: 0.3em; }
iframe { width: 100%; height: 600px; border: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.missing { color: #a33; font-style: italic; }
"""


# ------------------------------------------------------------------------------------------------ pieces


def flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """Nested JSON -> [("train.mean_support", 12.3), ...] in file order; lists stay whole."""
    if isinstance(obj, dict):
        rows = []
        for key, value in obj.items():
            rows += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(obj, list):
        return [(prefix, json.dumps(obj))]
    return [(prefix, obj)]


def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def metrics_html(reports: Path) -> str:
    parts = []
    for title, name in METRICS:
        path = reports / name
        if not path.exists():
            parts.append(f'<p class="missing">{html.escape(title)}: {html.escape(name)} not produced in this run.</p>')
            continue
        try:
            rows = flatten(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            parts.append(f'<p class="missing">{html.escape(name)} is not valid JSON ({html.escape(str(exc))}).</p>')
            continue
        body = "".join(
            f'<tr><td>{html.escape(key)}</td><td class="num">{html.escape(format_value(value))}</td></tr>'
            for key, value in rows
        )
        parts.append(f"<h3>{html.escape(title)} <small>({html.escape(name)})</small></h3>")
        parts.append(f"<table><tr><th>metric</th><th>value</th></tr>{body}</table>")
    return "\n".join(parts)


def figure_html(reports: Path, entry: FigureEntry) -> str:
    path = reports / entry.file
    caption = f"<figcaption><b>{html.escape(Path(entry.file).name)}</b> — {html.escape(entry.caption)}</figcaption>"
    if not path.exists():
        return f'<figure><p class="missing">{html.escape(entry.file)} not produced in this run.</p>{caption}</figure>'
    if path.suffix == ".html":
        page = path.read_text(encoding="utf-8")
        body = f'<iframe sandbox="" title="{html.escape(entry.file)}" srcdoc="{html.escape(page, quote=True)}"></iframe>'
    else:
        mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix, "image/png")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body = f'<img alt="{html.escape(entry.file)}" src="data:{mime};base64,{data}">'
    return f"<figure>{body}{caption}</figure>"


def markdown_lite(text: str) -> str:
    """Just enough Markdown for samples.md: #-headings, ``` fences, paragraphs. Everything escaped."""
    out, para, code, in_code = [], [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if in_code:
                out.append(f"<pre>{html.escape(chr(10).join(code))}</pre>")
                code = []
            elif para:
                out.append(f"<p>{html.escape(' '.join(para))}</p>")
                para = []
            in_code = not in_code
        elif in_code:
            code.append(line)
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # under the page's own h2
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            para.append(line.strip())
        elif para:
            out.append(f"<p>{html.escape(' '.join(para))}</p>")
            para = []
    if in_code and code:
        out.append(f"<pre>{html.escape(chr(10).join(code))}</pre>")
    if para:
        out.append(f"<p>{html.escape(' '.join(para))}</p>")
    return "\n".join(out)


def _read(reports: Path, name: str) -> dict:
    try:
        return json.loads((reports / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def baseline_html(reports: Path) -> str:
    """The model's loss against the unigram baseline, and every loss on the page with the tokens it scored:
    they score different windows, so they differ, and the table says why."""
    ev, tr, iv = _read(reports, "eval.json"), _read(reports, "train.json"), _read(reports, "interventions.json")
    if "val_loss" not in ev:
        return '<p class="missing">No validation loss yet (run the evaluate stage): nothing to compare with a baseline.</p>'
    lines = []
    if "unigram_loss" in ev:
        gap = ev["unigram_loss"] - ev["val_loss"]
        verdict = "learned well beyond token frequencies" if gap >= 1.5 else (
            "learned little beyond token frequencies: treat every attention figure below with suspicion"
            if gap < 0.5 else "learned, but modestly")
        lines.append(f"<p><b>Validation loss {ev['val_loss']:.3f} nats/token</b> against a unigram baseline of "
                     f"{ev['unigram_loss']:.3f} (the train split's token frequencies on the same tokens): "
                     f"{gap:.2f} nats below it, so the model {verdict}.</p>")
    rows = [("evaluate: val_loss", ev.get("val_loss"), ev.get("val_tokens_scored"),
             "non-overlapping windows spread evenly over the validation split (eval.max_tokens)"),
            ("evaluate: unigram_loss", ev.get("unigram_loss"), ev.get("val_tokens_scored"), "the same targets")]
    if tr:
        rows.append(("train: final_val_loss", tr.get("final_val_loss"), tr.get("val_tokens_scored"),
                     "the train stage's periodic validation windows (train.eval_tokens), spread the same way"))
    if iv:
        rows.append(("interventions: baseline", iv.get("baseline", {}).get("loss"),
                     iv.get("tokens_scored", {}).get("val"),
                     "seeded random validation windows, chosen as attention_stats chooses its examples"))
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=\"num\">{html.escape(format_value(loss))}</td>"
        f"<td class=\"num\">{html.escape(format_value(n))}</td><td>{html.escape(what)}</td></tr>"
        for name, loss, n, what in rows if loss is not None
    )
    lines.append("<table><tr><th>loss</th><th>nats/token</th><th>tokens scored</th><th>which tokens</th></tr>"
                 f"{body}</table>")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- page


def build_report(reports: str | Path, figures: list[FigureEntry] | None = None) -> str:
    """The whole index.html as a string, from whatever exists under `reports`."""
    reports = Path(reports)
    figures = FIGURES if figures is None else figures
    sections = list(SECTIONS) + [e.section for e in figures if e.section not in SECTIONS]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>attnlab report</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>attnlab: a transformer trained from scratch on Python source, and its attention</h1>",
        "<p>Entropy is in bits; support = 2<sup>entropy</sup> is the effective number of tokens a head attends "
        "to from one query position (at most position + 1).</p>",
        "<h2>Did the model learn?</h2>",
        baseline_html(reports),
        "<h2>Metrics</h2>",
        metrics_html(reports),
    ]
    for section in dict.fromkeys(sections):
        entries = [e for e in figures if e.section == section]
        if entries:
            parts.append(f"<h2>{html.escape(section)}</h2>")
            parts += [figure_html(reports, e) for e in entries]
    parts.append("<h2>Samples</h2>")
    for name in SAMPLES:
        samples = reports / name
        if samples.exists():
            parts.append(markdown_lite(samples.read_text(encoding="utf-8")))
        else:
            parts.append(f'<p class="missing">{name} not produced in this run.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def missing_inputs(reports: str | Path, figures: list[FigureEntry] | None = None) -> list[str]:
    reports = Path(reports)
    names = [e.file for e in (FIGURES if figures is None else figures)] + [n for _, n in METRICS] + SAMPLES
    return [n for n in names if not (reports / n).exists()]
