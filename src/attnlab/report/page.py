"""reports/index.html: one self-contained page of the whole study — metrics, loss curve, every figure with a
caption saying what to look for, the token view and the generated samples.

Images are embedded as base64 data URIs and HTML pages (attn_tokens.html) as sandboxed iframes (srcdoc), so
the page opens from disk with no server and no network. Every input is optional: a missing one becomes a
short note on the page, never a crash. The HTML is templates/index.html (autoescaped); the samples' Markdown
goes through markdown-it-py.

The figures, their sections and captions come from the registry (attnlab.report.registry): a new figure is one
entry there. Sections appear in the order of registry.SECTIONS, then in order of first use. Metrics files
are METRICS, Markdown files shown at the end SAMPLES.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from attnlab.report import registry
from attnlab.report.registry import Figure
from attnlab.report.templating import markdown_html, render

METRICS: list[tuple[str, str]] = [  # (title, file relative to the reports folder)
    ("Training", "train.json"),
    ("Evaluation", "eval.json"),
    ("Attention", "attention.json"),
    ("Interventions", "interventions.json"),
    ("Position probe", "position_probe.json"),
]

SAMPLES = ["samples.md", "intervention_samples.md"]  # markdown files shown at the end, in this order
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}


@dataclass(frozen=True)
class MetricTable:
    title: str
    name: str  # file relative to the reports folder
    rows: list[tuple[str, str]] | None = None  # (metric, formatted value); None: the file is missing
    error: str = ""  # why the file could not be read


@dataclass(frozen=True)
class FigureView:
    file: str  # relative to the reports folder
    name: str  # its file name
    caption: str
    data_uri: str | None = None  # an image, embedded
    srcdoc: str | None = None  # an HTML page, embedded as an iframe; both None: not produced


@dataclass(frozen=True)
class Baseline:
    rows: list[tuple[str, str, str, str]]  # (loss, nats/token, tokens scored, which tokens), formatted
    val_loss: str = ""
    unigram_loss: str = ""
    gap: str = ""
    verdict: str = ""  # empty: no unigram loss to compare with


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


def metric_table(reports: Path, title: str, name: str) -> MetricTable:
    path = reports / name
    if not path.exists():
        return MetricTable(title, name)
    try:
        rows = flatten(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        return MetricTable(title, name, error=str(exc))
    return MetricTable(title, name, [(key, format_value(value)) for key, value in rows])


def figure_view(reports: Path, figure: Figure) -> FigureView:
    path = reports / figure.file
    view = FigureView(figure.file, figure.name, figure.caption)
    if not path.exists():
        return view
    if path.suffix == ".html":
        return FigureView(view.file, view.name, view.caption, srcdoc=path.read_text(encoding="utf-8"))
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    uri = f"data:{MIME.get(path.suffix, 'image/png')};base64,{data}"
    return FigureView(view.file, view.name, view.caption, data_uri=uri)


def sections(figures: list[Figure] | tuple[Figure, ...]) -> list[tuple[str, list[Figure]]]:
    """(section, its figures) in the order of registry.SECTIONS, then of first use; empty sections left out."""
    order = dict.fromkeys(list(registry.SECTIONS) + [f.section for f in figures])
    groups = [(section, [f for f in figures if f.section == section]) for section in order]
    return [(section, group) for section, group in groups if group]


def _read(reports: Path, name: str) -> dict:
    try:
        return json.loads((reports / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def verdict(gap: float) -> str:
    """What a validation loss `gap` nats below the unigram baseline says about the model."""
    if gap >= 1.5:
        return "learned well beyond token frequencies"
    if gap < 0.5:
        return "learned little beyond token frequencies: treat every attention figure below with suspicion"
    return "learned, but modestly"


def baseline(reports: Path) -> Baseline | None:
    """The model's loss against the unigram baseline, and every loss on the page with the tokens it scored:
    they score different windows, so they differ, and the table says why. None without a validation loss."""
    ev, tr, iv = _read(reports, "eval.json"), _read(reports, "train.json"), _read(reports, "interventions.json")
    if "val_loss" not in ev:
        return None
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
    table = [(name, format_value(loss), format_value(n), what) for name, loss, n, what in rows if loss is not None]
    if "unigram_loss" not in ev:
        return Baseline(table)
    gap = ev["unigram_loss"] - ev["val_loss"]
    return Baseline(table, f"{ev['val_loss']:.3f}", f"{ev['unigram_loss']:.3f}", f"{gap:.2f}", verdict(gap))


def sample_html(reports: Path, name: str) -> str | None:
    """A Markdown file as HTML, its headings under the page's h2; None when it is missing."""
    path = reports / name
    return markdown_html(path.read_text(encoding="utf-8"), heading_shift=2) if path.exists() else None


# -------------------------------------------------------------------------------------------------- page


def build_report(reports: str | Path, figures: list[Figure] | tuple[Figure, ...] | None = None) -> str:
    """The whole index.html as a string, from whatever exists under `reports`."""
    reports = Path(reports)
    figures = registry.FIGURES if figures is None else figures
    return render(
        "index.html",
        baseline=baseline(reports),
        metrics=[metric_table(reports, title, name) for title, name in METRICS],
        sections=[(s, [figure_view(reports, f) for f in group]) for s, group in sections(figures)],
        samples=[(name, sample_html(reports, name)) for name in SAMPLES],
    )


def missing_inputs(reports: str | Path, figures: list[Figure] | tuple[Figure, ...] | None = None) -> list[str]:
    reports = Path(reports)
    names = [f.file for f in (registry.FIGURES if figures is None else figures)] + [n for _, n in METRICS] + SAMPLES
    return [n for n in names if not (reports / n).exists()]
