"""The report page: self-contained, optional inputs skipped with a note, registry extensible, escaped. The
figure registry against dvc.yaml (which is static: this test is what keeps the two in step)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from attnlab.report import figures, plots_interventions, registry
from attnlab.report.figures import FIGURES as FIGURE_STAGE_FIGURES
from attnlab.report.page import LINKED, METRICS, SAMPLES, build_report, flatten
from attnlab.report.plots_interventions import INTERVENTION_FIGURES
from attnlab.report.plots_pe import PE_FIGURES
from attnlab.report.registry import FIGURES, Figure
from attnlab.report.templating import markdown_html

ROOT = Path(__file__).resolve().parents[2]
while not (ROOT / "dvc.yaml").exists() and ROOT != ROOT.parent:  # tests/ or tests/unit/
    ROOT = ROOT.parent

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


def test_registry_entries_added_to_the_list_appear_in_their_section(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "interventions_temperature.png").write_bytes(PNG)
    extra = FIGURES + (Figure("interventions_temperature.png", "Interventions", "Loss against temperature.", "x"),
                       Figure("new.png", "Extra section", "A new kind.", "y"))  # fmt: skip
    page = build_report(tmp_path, extra)
    assert "<h2>Interventions</h2>" in page and "Loss against temperature." in page
    assert "<h2>Extra section</h2>" in page and "figures/new.png not produced" in page
    order = [page.index(f"<h2>{section}</h2>") for section in ("Attention", "Interventions", "Extra section")]
    assert order == sorted(order)


def test_flatten():
    assert flatten({"train": {"a": 1, "b": [1, 2]}, "c": 2.5}) == [("train.a", 1), ("train.b", "[1, 2]"), ("c", 2.5)]


def test_markdown_escapes_raw_html_and_fenced_code():
    text = "## Prompt `<x>`\ntext & more <script>alert(1)</script>\n\n```python\na<b and '</script>'\n```\n"
    out = markdown_html(text, heading_shift=2)
    assert "<script" not in out and "</script" not in out
    assert "<h4>Prompt <code>&lt;x&gt;</code></h4>" in out
    assert "<p>text &amp; more &lt;script&gt;alert(1)&lt;/script&gt;</p>" in out
    assert '<pre><code class="language-python">a&lt;b and \'&lt;/script&gt;\'\n</code></pre>' in out


def test_samples_on_the_page_are_escaped_inside_pre_code(tmp_path):
    markdown = "# Variant\n\n<script>x()</script>\n\n```\n<script>y()</script>\n```\n"
    (tmp_path / "intervention_samples.md").write_text(markdown)
    page = build_report(tmp_path)
    samples = page[page.index("<h2>Samples</h2>"):]
    assert "<script" not in page
    assert "<h3>Variant</h3>" in samples and "<p>&lt;script&gt;x()&lt;/script&gt;</p>" in samples
    assert "<pre><code>&lt;script&gt;y()&lt;/script&gt;\n</code></pre>" in samples
    assert "samples.md not produced in this run" in samples  # the other file, missing


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


# ---------------------------------------------------------------------------------------- the figure registry


def test_registry_names_are_unique_with_known_sections_inputs_and_one_line_captions():
    names = [f.name for f in FIGURES]
    assert len(names) == len(set(names))
    for f in FIGURES:
        assert f.section in registry.SECTIONS, f.name
        assert f.caption.strip() and "\n" not in f.caption, f.name
        assert f.reads in ("",) + registry.READS, f.name
        assert not f.params or f.by_figure_stage, f"{f.name}: params are for figures of stages/figure.py"


def test_every_figure_a_stage_draws_from_the_registry_has_a_draw_function_and_no_other_has():
    png = {f.name for f in FIGURES if f.by_figure_stage and f.reads in figures.LOADERS}
    assert set(figures.DRAW) == png, "figures.DRAW must hold exactly the PNG figures of stages/figure.py"
    assert set(plots_interventions.DRAW) == {f.name for f in FIGURES if f.stage == "interventions"}
    assert all(callable(draw) for draw in [*figures.DRAW.values(), *plots_interventions.DRAW.values()])
    assert [f.name for f in FIGURES if f.by_figure_stage and f.name not in png] == ["attn_tokens.html"]


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage expanded to <name>@<item> as dvc names them."""
    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
            stages[f"{name}@{item}"] = yaml.safe_load(text)
    return stages


def paths(entries) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def figure_outs(stage: dict) -> list[str]:
    """The file names of the figures in a stage's outs (reports/figures/<name>), in dvc.yaml's order."""
    return [out.removeprefix("reports/figures/") for out in paths(stage.get("outs")) if out.startswith("reports/figures/")]


def test_the_lists_each_stage_draws_from_are_the_figures_dvc_yaml_has_it_write():
    """figures.FIGURES (name -> params), INTERVENTION_FIGURES and PE_FIGURES against dvc.yaml, written by hand."""
    stages = dvc_stages()
    by_figure_py = {}
    for stage in stages.values():
        words = " ".join(stage["cmd"].split()).split()
        if words[1] == "stages/figure.py":
            by_figure_py[words[words.index("--name") + 1]] = [k for k in stage.get("params", []) if k != "train.device"]
    assert FIGURE_STAGE_FIGURES == by_figure_py
    assert [name for name, _ in INTERVENTION_FIGURES] == figure_outs(stages["interventions"])
    pe_outs = figure_outs(stages["pe_heatmap"]) + figure_outs(stages["position_analysis"])
    assert [name for name, _ in PE_FIGURES] == pe_outs
    captions = {f.name: f.caption for f in FIGURES}
    assert all(caption == captions[name] for name, caption in INTERVENTION_FIGURES + PE_FIGURES)


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.name)
def test_dvc_yaml_has_each_figure_as_an_out_of_its_stage_and_a_dep_of_report(figure):
    stages, out = dvc_stages(), f"reports/{figure.file}"
    writers = [name for name, stage in stages.items() if out in paths(stage.get("outs"))]
    assert len(writers) == 1, f"{figure.name}: dvc.yaml must list {out} in the outs of one stage, not {writers}"
    expected = f"{registry.FIGURE_STAGE}@{figure.name}" if figure.stage == registry.FIGURE_STAGE else figure.stage
    assert writers == [expected], f"{figure.name}: the registry says stage {expected}, dvc.yaml has {writers[0]}"
    assert out in paths(stages["report"]["deps"]), f"{figure.name}: {out} missing from the report stage's deps"
    if figure.by_figure_stage:
        stage = stages[expected]
        assert f"--name {figure.name} " in " ".join(stage["cmd"].split()) + " ", f"{figure.name}: {expected} cmd"
        drawn = [key for key in stage.get("params", []) if key != "train.device"]  # where the model runs
        assert drawn == list(figure.params), f"{figure.name}: params of {expected} in dvc.yaml"


def test_dvc_yaml_figure_foreach_is_the_param_free_figures_of_the_statistics_alone():
    foreach = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][registry.FIGURE_STAGE]["foreach"]
    expected = [f.name for f in registry.figure_stage_figures() if not f.params and f.reads == "stats"]
    assert foreach == expected, (
        f"figure foreach in dvc.yaml: missing {sorted(set(expected) - set(foreach))}, "
        f"not param-free figures of stats.parquet in the registry {sorted(set(foreach) - set(expected))}"
    )
    assert all(f.stage == registry.FIGURE_STAGE for f in registry.figure_stage_figures() if f.name in expected)


# What each kind of figure input is on disk (registry Figure.reads), for the figure stages' deps.
READS_FILES = {
    "stats": {"data/attention/stats.parquet"},
    "mean_patterns": {"data/attention/mean_patterns.npy"},
    "dynamics": {"data/attention/dynamics.parquet"},
    "roles": {"data/attention/head_roles.parquet"},
    "model": {"data/attention/stats.parquet", "data/attention/examples.npz", "models/model.pt", "data/tokenizer"},
}


@pytest.mark.parametrize("figure", registry.figure_stage_figures(), ids=lambda f: f.name)
def test_each_figure_stage_depends_on_exactly_the_files_its_figure_reads(figure):
    stages = dvc_stages()
    name = f"{registry.FIGURE_STAGE}@{figure.name}" if figure.stage == registry.FIGURE_STAGE else figure.stage
    data_deps = {d for d in paths(stages[name]["deps"]) if not d.startswith(("src/", "stages/"))}
    assert data_deps == READS_FILES[figure.reads], f"{name}: its deps in dvc.yaml against what {figure.name} reads"


def test_report_stage_deps_are_the_registry_metrics_and_samples():
    deps = [d for d in paths(dvc_stages()["report"]["deps"]) if d.startswith("reports/")]
    registered = {f"reports/{f.file}" for f in FIGURES} | {f"reports/{n}" for _, n in METRICS}
    registered |= {f"reports/{n}" for n in SAMPLES + LINKED}
    assert set(deps) == registered, (
        f"report deps in dvc.yaml: missing {sorted(registered - set(deps))}, not in the registry "
        f"(registry.FIGURES, page.METRICS, page.SAMPLES, page.LINKED) {sorted(set(deps) - registered)}"
    )


# ---------------------------------------------------------------------------------------------- findings


def write_run_outputs(folder: Path) -> None:
    """The metrics files of a run, with numbers whose sentences are known."""
    (folder / "eval.json").write_text(json.dumps(
        {"val_loss": 3.337091, "unigram_loss": 6.344362, "val_loss_vs_unigram": 3.007271, "val_bpb": 1.454327}))
    heads = {"L0H0": (12.0, 0.21), "L0H1": (26.8, 0.43), "L1H0": (8.4, 0.30), "L1H1": (10.4, 0.12)}
    (folder / "attention.json").write_text(json.dumps({"val": {"mean_support": 14.4, "heads": {
        key: {"mean_support": s, "mean_normalized_support": n} for key, (s, n) in heads.items()}}}))
    (folder / "interventions.json").write_text(json.dumps({
        "baseline": {"loss": 3.3, "ppl": 27.8}, "uniform_all": {"loss": 4.3, "ppl": 74.7},
        "top_k": {"1": {"loss": 3.6, "ppl": 38.6}, "2": {"loss": 3.4, "ppl": 30.0}},
        "mean_ablate": {"L0H0": {"loss": 3.35, "delta": 0.05}, "L1H1": {"loss": 3.48, "delta": 0.18}}}))
    (folder / "position_probe.json").write_text(json.dumps(
        {"position_probe_r2": {"embed": 0.02, "layer 0": 0.71, "layer 1": 0.93}}))
    (folder / "head_roles.json").write_text(json.dumps({
        "strongest": {"induction": {"head": "L1H0", "score": 0.6234}}, "induction_threshold": 0.1,
        "uniform": {"induction": 0.0108}, "sink_rate": 0.25, "sink_threshold": 0.3,
        "icl": {"repeat_first_copy_loss": 7.712, "repeat_second_copy_loss": 1.046, "icl_score_nats": -0.214},
        "ablation": {"heads": ["L1H0", "L1H3"], "rise_first_copy": {"induction_heads": 0.031, "control_heads": 0.02},
                     "rise_second_copy": {"induction_heads": 2.104, "control_heads": 0.152}}}))
    (folder / "attention_dynamics.json").write_text(json.dumps({"roles": {"induction": {
        "strongest_head": "L1H0", "score_last": 0.61, "largest_rise": {
            "from_step": 30, "to_step": 45, "from_train_tokens": 491520, "to_train_tokens": 737280,
            "from_score": 0.048, "to_score": 0.412}}}}))


def findings_of(page: str) -> dict[str, str]:
    import html
    import re

    section = page[page.index('<section id="findings">') : page.index("</section>")]
    return {topic: html.unescape(text) for topic, text in re.findall(r'<li data-topic="(\w+)">(.*?)</li>', section)}


def test_findings_state_the_runs_numbers_in_sentences(tmp_path):
    write_run_outputs(tmp_path)
    found = findings_of(build_report(tmp_path))
    assert list(found) == ["learned", "heads", "induction", "copying", "interventions", "position"]
    assert "validation loss of 3.34 nats/token (1.45 bits per byte" in found["learned"]
    assert "3.01 nats below the unigram baseline of 6.34" in found["learned"]
    assert "learned well beyond token frequencies" in found["learned"]
    assert "broadest head is layer 0 head 1, spreading its attention over 26.8 tokens" in found["heads"]
    assert "(normalized support 0.43)" in found["heads"] and "narrowest is layer 1 head 0 with 8.4" in found["heads"]
    assert "the narrowest layer 1 head 1 (0.12)" in found["heads"]  # by normalized support, another head
    assert "multiplies the perplexity by 2.69 (27.8 to 74.7)" in found["interventions"]
    assert "top-1 attention (each head keeps only its largest score) by 1.39" in found["interventions"]
    assert "most important head, layer 1 head 1" in found["interventions"] and "0.180 nats" in found["interventions"]
    assert "R² of 0.02 at embed, 0.71 at layer 0, 0.93 at layer 1" in found["position"]
    assert "most readably at layer 1 (R² 0.93)" in found["position"]
    assert found["induction"].startswith("The strongest induction head is layer 1 head 0: on random tokens repeated "
                                         "once it puts 0.62 of its attention on the token after the previous")
    assert "(threshold 0.10; uniform attention scores 0.011)" in found["induction"]
    assert "rose most between the snapshots at 491,520 and 737,280 tokens, from 0.05 to 0.41" in found["induction"]
    assert "7.71 nats on the first copy, 1.05 on the second (on text, late tokens minus early ones: -0.21" in \
        found["copying"]
    assert "ablating the 2 heads with the highest induction scores (L1H0, L1H3) raises the second copy's loss by " \
        "2.10 nats, the first copy's by 0.03, and ablating as many other heads of their layers raises the second " \
        "copy's by 0.15" in found["copying"]
    assert "The sink rate (share of heads with over 0.3 of their attention on the first key) is 0.25." in \
        found["copying"]


def test_the_induction_finding_says_plainly_when_no_head_passed_the_threshold(tmp_path):
    write_run_outputs(tmp_path)
    roles = json.loads((tmp_path / "head_roles.json").read_text())
    roles["strongest"]["induction"]["score"] = 0.0412
    (tmp_path / "head_roles.json").write_text(json.dumps(roles))
    found = findings_of(build_report(tmp_path))["induction"]
    assert found == ("No head passed the induction threshold of 0.10: the highest induction score, layer 1 head 0's, "
                     "is 0.041 on random tokens repeated once; uniform attention scores 0.011.")
    roles["strongest"]["induction"]["score"] = 0.5  # passes, but the last snapshot ranks another head first
    (tmp_path / "head_roles.json").write_text(json.dumps(roles))
    dynamics = json.loads((tmp_path / "attention_dynamics.json").read_text())
    dynamics["roles"]["induction"]["strongest_head"] = "L0H1"
    (tmp_path / "attention_dynamics.json").write_text(json.dumps(dynamics))
    found = findings_of(build_report(tmp_path))["induction"]
    assert "rose most" not in found and "at the last weight snapshot layer 0 head 1 scores highest" in found


def test_findings_follow_the_numbers_not_a_particular_run(tmp_path):
    write_run_outputs(tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps({"val_loss": 6.5, "unigram_loss": 6.3, "val_bpb": 2.0}))
    (tmp_path / "position_probe.json").write_text(json.dumps({"position_probe_r2": {"embed": -0.2, "layer 0": 0.05}}))
    found = findings_of(build_report(tmp_path))
    assert "6.50 nats/token" in found["learned"] and "0.20 nats above the unigram baseline" in found["learned"]
    assert "learned little beyond token frequencies" in found["learned"]
    assert "not linearly readable" in found["position"]


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"val": 3, "baseline": [], "mean_ablate": 1}',
                                     '{"position_probe_r2": {"embed": "x"}, "val_loss": "3"}'])  # fmt: skip
def test_findings_of_missing_or_odd_inputs_are_short_sentences_never_a_crash(tmp_path, content):
    for name in ("eval.json", "attention.json", "interventions.json", "position_probe.json", "head_roles.json",
                 "attention_dynamics.json"):
        if content is not None:
            (tmp_path / name).write_text(content)
    found = findings_of(build_report(tmp_path))
    assert len(found) == 6
    assert "run the head_roles stage" in found["induction"] and "run the head_roles stage" in found["copying"]
    assert "run the evaluate stage" in found["learned"]
    assert "run the attention_stats stage" in found["heads"]
    assert "run the interventions stage" in found["interventions"]
    assert "run the position_analysis stage" in found["position"]
    assert all(len(text) < 160 for text in found.values())


def test_findings_then_figures_then_samples_then_folded_metric_tables(tmp_path):
    write_run_outputs(tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "loss_curve.png").write_bytes(PNG)
    (tmp_path / "train.json").write_text(json.dumps({"final_val_loss": 3.3}))
    (tmp_path / "explorer.html").write_text("<!DOCTYPE html>")
    page = build_report(tmp_path)
    order = [page.index(mark) for mark in ('<section id="findings">', "<img", "<h2>Samples</h2>", "<h2>Metrics</h2>")]
    assert order == sorted(order)
    before_figures = page[: page.index("<img")]
    assert before_figures.count("<table") == before_figures.count("<details") == 1  # the baseline table, folded
    metrics = page[page.index("<h2>Metrics</h2>") :]
    # eval, attention, dynamics, head roles, interventions, probe and train
    assert metrics.count("<table") == metrics.count('<details class="metrics">') == 7
    assert '<a href="explorer.html">' in page


def test_without_the_explorer_the_page_says_so_instead_of_linking(tmp_path):
    page = build_report(tmp_path)
    assert 'href="explorer.html"' not in page and "run the explorer stage" in page
