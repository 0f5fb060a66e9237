"""reports/index.html: one self-contained page of the whole study, in the order a reader wants it: the findings
(plain sentences with the run's numbers, each computed from its outputs), then every figure with a caption
saying what to look for, grouped as the pipeline runs (training, attention, head roles, interventions, positional
encoding),
the generated samples, and at the end the full metric tables, folded. It links the attention explorer
(explorer.html, relative, next to it).

Images are embedded as base64 data URIs and HTML pages (attn_tokens.html) as sandboxed iframes (srcdoc), so
the page opens from disk with no server and no network. Every input is optional: a missing one becomes a
short note on the page (a finding says what is missing), never a crash. The HTML is templates/index.html
(autoescaped); the samples' Markdown goes through markdown-it-py.

The figures, their sections and captions come from the registry (attnlab.report.registry): a new figure is one
entry there. Sections appear in the order of registry.SECTIONS, then in order of first use. Metrics files
are METRICS, Markdown files shown at the end SAMPLES, pages the report links LINKED.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path

from attnlab.report import registry
from attnlab.report.registry import Figure
from attnlab.report.templating import markdown_html, render

METRICS: list[tuple[str, str]] = [  # (title, file relative to the reports folder)
    ("Training", "train.json"),
    ("Evaluation", "eval.json"),
    ("Attention", "attention.json"),
    ("Attention across training", "attention_dynamics.json"),
    ("Head roles", "head_roles.json"),
    ("Interventions", "interventions.json"),
    ("Position probe", "position_probe.json"),
]

SAMPLES = ["samples.md", "intervention_samples.md"]  # markdown files shown at the end, in this order
EXPLORER = "explorer.html"  # the attention explorer (the explorer stage), linked, not embedded
LINKED = [EXPLORER]  # pages next to index.html that it links to
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
    """A metrics file's JSON object; {} when it is missing, not JSON or not an object."""
    try:
        obj = json.loads((reports / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _dict(obj: dict, *keys: str) -> dict:
    """obj[keys[0]][keys[1]]... when that is a dict, else {}."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else {}


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


# ---------------------------------------------------------------------------------------------- findings


def _number(obj: dict, *keys: str) -> float | None:
    """obj[keys[0]][keys[1]]... as a finite float, or None when any key is missing or the value is not a number."""
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    if isinstance(obj, bool) or not isinstance(obj, (int, float)) or not math.isfinite(obj):
        return None
    return float(obj)


def finding_learned(ev: dict) -> str:
    """Whether the model learned: val_loss (2 decimals), bits per byte, the gap to the unigram baseline."""
    loss = _number(ev, "val_loss")
    if loss is None:
        return "Whether the model learned is not known yet: reports/eval.json has no val_loss (run the evaluate stage)."
    bpb = _number(ev, "val_bpb")
    text = f"The model reaches a validation loss of {loss:.2f} nats/token"
    text += f" ({bpb:.2f} bits per byte of source)" if bpb is not None else ""
    unigram = _number(ev, "unigram_loss")
    if unigram is None:
        return text + "; evaluate reported no unigram baseline to compare it with."
    gap = _number(ev, "val_loss_vs_unigram")
    gap = unigram - loss if gap is None else gap
    side = "below" if gap >= 0 else "above"
    return (f"{text}, {abs(gap):.2f} nats {side} the unigram baseline of {unigram:.2f} (the train split's token "
            f"frequencies alone): it {verdict(gap)}.")  # fmt: skip


def _head(key: str) -> str:
    """'L1H2' -> 'layer 1 head 2'."""
    layer, _, head = key[1:].partition("H")
    return f"layer {layer} head {head}" if layer.isdigit() and head.isdigit() else key


def finding_heads(att: dict) -> str:
    """The broadest and the narrowest head of the val split, by mean support (and normalized support)."""
    means = {key: (_number(h, "mean_support"), _number(h, "mean_normalized_support"))
             for key, h in _dict(att, "val", "heads").items()}  # fmt: skip
    means = {key: m for key, m in means.items() if None not in m}
    if not means:
        return ("No per-head attention means in reports/attention.json (run the attention_stats stage): "
                "the broadest and the narrowest head are not known.")  # fmt: skip
    broad, narrow = max(means, key=lambda k: means[k][0]), min(means, key=lambda k: means[k][0])
    text = (f"On validation examples the broadest head is {_head(broad)}, spreading its attention over "
            f"{means[broad][0]:.1f} tokens on average (normalized support {means[broad][1]:.2f}), and the narrowest "
            f"is {_head(narrow)} with {means[narrow][0]:.1f} tokens (normalized support {means[narrow][1]:.2f}).")
    broad_n, narrow_n = max(means, key=lambda k: means[k][1]), min(means, key=lambda k: means[k][1])
    if (broad_n, narrow_n) != (broad, narrow):
        text += (f" Relative to the tokens each position can see, the broadest is {_head(broad_n)} "
                 f"({means[broad_n][1]:.2f}) and the narrowest {_head(narrow_n)} ({means[narrow_n][1]:.2f}).")
    return text


def finding_interventions(iv: dict) -> str:
    """How much worse the model gets with uniform and hard top-1 attention, and without its most important head."""
    base = _number(iv, "baseline", "ppl")
    if base is None:
        return "No interventions yet: reports/interventions.json has no baseline (run the interventions stage)."
    uniform, top1 = _number(iv, "uniform_all", "ppl"), _number(iv, "top_k", "1", "ppl")
    parts = []
    if uniform is not None:
        parts.append(f"Uniform attention in every head multiplies the perplexity by {uniform / base:.2f} "
                     f"({base:.1f} to {uniform:.1f})")  # fmt: skip
    parts.append(f"hard top-1 attention (each head keeps only its largest score) by {top1 / base:.2f}"
                 if top1 is not None else "hard top-1 attention was not measured (no 1 in interventions.top_k)")
    ablated = {key: _number(row, "delta") for key, row in _dict(iv, "mean_ablate").items()}
    ablated = {key: delta for key, delta in ablated.items() if delta is not None}
    if ablated:
        key = max(ablated, key=ablated.get)
        parts.append(f"without its most important head, {_head(key)} (replaced by its mean output), the loss "
                     f"rises by {ablated[key]:.3f} nats (perplexity × {math.exp(ablated[key]):.2f})")
    else:
        parts.append("no head was mean-ablated")
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


def finding_position(pp: dict) -> str:
    """Where position lives: the held-out R^2 of the linear position probe at each point of the residual stream."""
    r2 = {point: _number(_dict(pp, "position_probe_r2"), point) for point in _dict(pp, "position_probe_r2")}
    r2 = {point: value for point, value in r2.items() if value is not None}
    if not r2:
        return "No position probe yet: reports/position_probe.json is missing (run the position_analysis stage)."
    best = max(r2, key=r2.get)
    listed = ", ".join(f"{value:.2f} at {point}" for point, value in r2.items())
    text = f"A linear probe reading the absolute position from the residual stream reaches a held-out R² of {listed}."
    if r2[best] >= 0.5:
        return text + f" Position lives in the residual stream, most readably at {best} (R² {r2[best]:.2f})."
    if r2[best] >= 0.1:
        return text + f" Position is only partly in the residual stream (at best R² {r2[best]:.2f}, at {best})."
    return text + (" Position is not linearly readable from the stream anywhere (R² 0 is no better than guessing the "
                   "mean position): what the model knows of position it uses inside attention, as rotary encodings "
                   "apply it, rather than storing it in the stream.")


def finding_induction(roles: dict, dynamics: dict) -> str:
    """The strongest induction head, its score and between which snapshots it rose most; or that no head passed
    the threshold."""
    score, head = _number(roles, "strongest", "induction", "score"), _dict(roles, "strongest", "induction").get("head")
    threshold = _number(roles, "induction_threshold")
    if score is None or not isinstance(head, str) or threshold is None:
        return "No head roles yet: reports/head_roles.json has no induction scores (run the head_roles stage)."
    uniform = _number(roles, "uniform", "induction")
    scale = f"; uniform attention scores {uniform:.3f}" if uniform is not None else ""
    if score <= threshold:
        return (f"No head passed the induction threshold of {threshold:.2f}: the highest induction score, "
                f"{_head(head)}'s, is {score:.3f} on random tokens repeated once{scale}.")
    text = (f"The strongest induction head is {_head(head)}: on random tokens repeated once it puts {score:.2f} of "
            f"its attention on the token after the previous occurrence (threshold {threshold:.2f}{scale})")
    induction = _dict(dynamics, "roles", "induction")
    rise = _dict(induction, "largest_rise")
    numbers = [_number(rise, key) for key in ("from_train_tokens", "to_train_tokens", "from_score", "to_score")]
    if induction.get("strongest_head") == head and None not in numbers:
        start, stop, before, after = numbers
        text += (f"; across training its score rose most between the snapshots at {start:,.0f} and {stop:,.0f} "
                 f"tokens, from {before:.2f} to {after:.2f}")
    elif induction.get("strongest_head"):
        text += f"; at the last weight snapshot {_head(str(induction['strongest_head']))} scores highest instead"
    return text + "."


def finding_copying(roles: dict) -> str:
    """In-context learning on repeated tokens and on text, the causal check of the induction heads, the sink rate."""
    first, second = (_number(roles, "icl", key) for key in ("repeat_first_copy_loss", "repeat_second_copy_loss"))
    if first is None or second is None:
        return "No in-context learning measured yet: reports/head_roles.json is missing (run the head_roles stage)."
    text = f"On random tokens repeated once the loss is {first:.2f} nats on the first copy, {second:.2f} on the second"
    icl = _number(roles, "icl", "icl_score_nats")
    text += f" (on text, late tokens minus early ones: {icl:+.2f} nats)" if icl is not None else ""
    ablation = _dict(roles, "ablation")
    rises = [_number(ablation, *keys) for keys in (("rise_second_copy", "induction_heads"),
                                                   ("rise_first_copy", "induction_heads"),
                                                   ("rise_second_copy", "control_heads"))]  # fmt: skip
    heads = ablation.get("heads")
    if None not in rises and isinstance(heads, list):
        text += (f"; mean-ablating the {len(heads)} heads with the highest induction scores "
                 f"({', '.join(map(str, heads))}) raises the second copy's loss by {rises[0]:.2f} nats, the first "
                 f"copy's by {rises[1]:.2f}, and ablating as many other heads of their layers raises the second "
                 f"copy's by {rises[2]:.2f}")
    rate, threshold = _number(roles, "sink_rate"), _number(roles, "sink_threshold")
    if rate is not None and threshold is not None:
        text += (f". The sink rate (share of heads with over {threshold:.1f} of their attention on the first key) "
                 f"is {rate:.2f}")
    return text + "."


def findings(reports: Path) -> list[tuple[str, str]]:
    """(topic, sentence) for the top of the page, each computed from the run's outputs."""
    roles = _read(reports, "head_roles.json")
    return [
        ("learned", finding_learned(_read(reports, "eval.json"))),
        ("heads", finding_heads(_read(reports, "attention.json"))),
        ("induction", finding_induction(roles, _read(reports, "attention_dynamics.json"))),
        ("copying", finding_copying(roles)),
        ("interventions", finding_interventions(_read(reports, "interventions.json"))),
        ("position", finding_position(_read(reports, "position_probe.json"))),
    ]


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
        findings=findings(reports),
        explorer=EXPLORER if (reports / EXPLORER).exists() else None,
        baseline=baseline(reports),
        metrics=[metric_table(reports, title, name) for title, name in METRICS],
        sections=[(s, [figure_view(reports, f) for f in group]) for s, group in sections(figures)],
        samples=[(name, sample_html(reports, name)) for name in SAMPLES],
    )


def missing_inputs(reports: str | Path, figures: list[Figure] | tuple[Figure, ...] | None = None) -> list[str]:
    reports = Path(reports)
    names = [f.file for f in (registry.FIGURES if figures is None else figures)] + [n for _, n in METRICS] + SAMPLES
    names += LINKED
    return [n for n in names if not (reports / n).exists()]
