"""The report page: self-contained, optional inputs skipped with a note, registry extensible, escaped."""

from __future__ import annotations

import base64
import json

from attnlab.report import FIGURES, METRICS, SAMPLES, FigureEntry, build_report, flatten, markdown_lite

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_empty_reports_folder_gives_a_page_of_notes(tmp_path):
    page = build_report(tmp_path)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("not produced in this run") == len(FIGURES) + len(METRICS) + len(SAMPLES)


def test_figures_metrics_and_samples_are_embedded_and_escaped(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "loss_curve.png").write_bytes(PNG)
    (tmp_path / "figures" / "attn_tokens.html").write_text('<p>x = "</script>&"</p>')
    (tmp_path / "train.json").write_text(json.dumps({"final_val_loss": 2.3456789, "tokens": 1234567, "cfg": {"lr": 0.001}}))
    (tmp_path / "samples.md").write_text("# Samples\n\n```python\nif a < b and c > d: print('</script>')\n```\n")
    page = build_report(tmp_path)
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in page
    assert "final_val_loss" in page and "2.346" in page and "1,234,567" in page and "cfg.lr" in page
    assert "</script>" not in page and "&lt;/script&gt;" in page
    assert "if a &lt; b and c &gt; d" in page
    assert 'sandbox=""' in page and "srcdoc=" in page


def test_registry_entries_appended_by_other_issues_appear_in_their_section(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "interventions_temperature.png").write_bytes(PNG)
    extra = FIGURES + [FigureEntry("figures/interventions_temperature.png", "Loss against temperature.", "Interventions"),
                       FigureEntry("figures/new.png", "A new kind.", "Extra section")]  # fmt: skip
    page = build_report(tmp_path, extra)
    assert "<h2>Interventions</h2>" in page and "Loss against temperature." in page
    assert "<h2>Extra section</h2>" in page and "figures/new.png not produced" in page
    assert page.index("<h2>Attention</h2>") < page.index("<h2>Interventions</h2>") < page.index("<h2>Extra section</h2>")


def test_flatten_and_markdown_lite():
    assert flatten({"train": {"a": 1, "b": [1, 2]}, "c": 2.5}) == [("train.a", 1), ("train.b", "[1, 2]"), ("c", 2.5)]
    out = markdown_lite("## Prompt `<x>`\ntext & more\n\n```\na<b\n```")
    assert out == "<h4>Prompt `&lt;x&gt;`</h4>\n<p>text &amp; more</p>\n<pre>a&lt;b</pre>"


def test_the_page_opens_on_the_loss_against_the_unigram_baseline_with_tokens_scored(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(
        {"val_loss": 3.3012, "unigram_loss": 6.3456, "val_loss_vs_unigram": 3.0444, "val_tokens_scored": 22656}))
    (tmp_path / "train.json").write_text(json.dumps({"final_val_loss": 3.28, "val_tokens_scored": 16384}))
    (tmp_path / "interventions.json").write_text(json.dumps(
        {"baseline": {"loss": 3.41}, "tokens_scored": {"val": 16384, "train_for_means": 16384}}))
    page = build_report(tmp_path)
    head = page[: page.index("<h2>Metrics</h2>")]
    assert "Validation loss 3.301 nats/token" in head and "6.346" in head and "3.04 nats below" in head
    assert "22,656" in head and "16,384" in head and "seeded random validation windows" in head
    (tmp_path / "eval.json").write_text(json.dumps({"val_loss": 6.2, "unigram_loss": 6.34, "val_tokens_scored": 10}))
    assert "learned little beyond token frequencies" in build_report(tmp_path)
