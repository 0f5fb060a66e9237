"""The attention explorer and the report page of the shared pipeline run (dvc_project), in a real browser:
headless Chromium (the system's, Debian's `chromium` package) driven by Playwright for Python.

`playwright install` downloads a browser, which CI cannot, so the tests launch the chromium on PATH. Without
it (or without the playwright package) they fail when the environment variable CI is set, and skip with the
reason otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field

import pandas as pd
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

BROWSERS = ("chromium", "chromium-browser")  # Debian's package, and Ubuntu's name for it


def chromium_or_skip() -> str:
    """The system Chromium's path; without it or without playwright: fail under CI, skip elsewhere."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    executable = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if executable is None:
        reason = reason or "no chromium on PATH (Debian/Ubuntu: apt-get install chromium)"
    if reason is None:
        return executable
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, and the browser tests cannot run: {reason}")
    pytest.skip(f"browser tests need the system Chromium and playwright: {reason}")


@pytest.fixture(scope="session")  # session, and first in the tests' arguments: no browser skips before the pipeline
def browser():
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)  # headless
        yield browser
        browser.close()


@dataclass
class Watched:
    """A page with every console error, uncaught exception and request it made."""

    page: object
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def open_file(browser, path) -> Watched:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watched = Watched(page, path.resolve().as_uri())
    page.on("console", lambda msg: watched.errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: watched.errors.append(str(exc)))
    page.on("request", lambda request: watched.requests.append(request.url))
    page.goto(watched.url)
    page.wait_for_load_state("load")
    return watched


def row_of(page) -> tuple[list[str], list[float], list[int]]:
    """The tokens' data-weight as shown, as numbers, and the positions carrying class `query`."""
    shown = page.eval_on_selector_all(".tok", "els => els.map(e => e.dataset.weight)")
    queries = page.eval_on_selector_all(".tok.query", "els => els.map(e => Number(e.dataset.pos))")
    return shown, [float(w) for w in shown], queries


def entropy_bits(weights: list[float]) -> float:
    return -sum(w * math.log2(w) for w in weights if w > 0)


@pytest.fixture(scope="module")
def val_stats(dvc_project) -> pd.DataFrame:
    stats = pd.read_parquet(dvc_project.path / "data/attention/stats.parquet")
    return stats[stats["split"] == "val"].set_index(["example", "layer", "head", "position"]).sort_index()


def check_row(page, stats: pd.DataFrame, example: int, layer: int, head: int, query: int) -> list[float]:
    """The shown row is the head's attention from `query`: sums to 1, zero after it, and has the entropy
    attention_stats measured for that example, layer, head and position."""
    shown, weights, queries = row_of(page)
    assert queries == [query]
    assert abs(sum(weights[: query + 1]) - 1.0) <= 1e-3, sum(weights)
    assert all(w == "0" for w in shown[query + 1 :]), "weights after the query must be 0"
    assert all(w >= 0 for w in weights) and all("e" not in w.lower() for w in shown), "plain decimals"
    want = float(stats.loc[(example, layer, head, query), "entropy_bits"])
    assert entropy_bits(weights) == pytest.approx(want, abs=0.05), (example, layer, head, query)
    return weights


def test_the_explorer_shows_what_attention_stats_measured(browser, dvc_project, val_stats):
    path = dvc_project.path / "reports/explorer.html"
    watched = open_file(browser, path)
    page = watched.page
    n_layers, n_heads = int(val_stats.index.levels[1].max()) + 1, int(val_stats.index.levels[2].max()) + 1
    for select, count in (("#example", 2), ("#layer", n_layers), ("#head", n_heads)):  # TINY_PARAMS
        values = page.eval_on_selector_all(f"{select} option", "os => os.map(o => o.value)")
        assert values == [str(i) for i in range(count)], select
    example, layer, head = 1, n_layers - 1, n_heads - 1
    page.select_option("#example", str(example))
    page.select_option("#layer", str(layer))
    page.select_option("#head", str(head))
    positions = page.eval_on_selector_all(".tok", "els => els.map(e => Number(e.dataset.pos))")
    assert positions == list(range(48))  # explorer.max_tokens of TINY_PARAMS: only this example's tokens, >= 20

    page.click('.tok[data-pos="30"]')
    row = check_row(page, val_stats, example, layer, head, 30)
    page.keyboard.press("ArrowLeft")  # the arrow keys move the query
    check_row(page, val_stats, example, layer, head, 29)
    page.keyboard.press("ArrowRight")
    assert check_row(page, val_stats, example, layer, head, 30) == row

    grid = page.eval_on_selector_all("#grid td", "tds => tds.map(td => [+td.dataset.layer, +td.dataset.head, "
                                     "+td.dataset.support])")  # fmt: skip
    assert len(grid) == n_layers * n_heads
    for cell_layer, cell_head, support in grid:  # every head's support at the query, as attention_stats has it
        want = float(val_stats.loc[(example, cell_layer, cell_head, 30), "entropy_bits"])
        assert math.log2(support) == pytest.approx(want, abs=0.05), (cell_layer, cell_head)

    page.select_option("#head", str(head - 1))
    other = check_row(page, val_stats, example, layer, head - 1, 30)
    assert max(abs(a - b) for a, b in zip(row, other)) > 1e-3, "changing the head must change the row"
    page.click('.tok[data-pos="0"]')
    check_row(page, val_stats, example, layer, head - 1, 0)

    assert watched.errors == []
    assert watched.requests == [watched.url], "the explorer must make no request but its own file"


def test_the_report_opens_on_findings_then_a_figure_before_any_unfolded_table(browser, dvc_project):
    reports = dvc_project.path / "reports"
    watched = open_file(browser, reports / "index.html")
    page = watched.page
    val_loss = json.loads((reports / "eval.json").read_text())["val_loss"]
    findings = page.locator("#findings")
    assert findings.is_visible()
    assert f"validation loss of {val_loss:.2f} nats/token" in findings.inner_text()
    order = page.evaluate(
        """() => {
            const findings = document.getElementById("findings");
            const figure = document.querySelector("figure img, figure iframe");
            const before = (a, b) => Boolean(a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING);
            const tables = Array.from(document.querySelectorAll("table")).filter((t) => before(t, figure));
            return {
                findingsFirst: before(findings, figure),
                figureShown: figure.checkVisibility(),
                shownTablesBefore: tables.filter((t) => t.checkVisibility()).length,
                foldedTablesBefore: tables.length,
                metricTables: document.querySelectorAll("details.metrics table").length,
            };
        }"""
    )
    assert order["findingsFirst"] and order["figureShown"]
    assert order["shownTablesBefore"] == 0 and order["foldedTablesBefore"] == 1  # the baseline table, folded
    assert order["metricTables"] == 7  # train, eval, attention, attention_dynamics, head_roles, interventions, position_probe
    href = page.get_attribute('#findings a[href="explorer.html"]', "href")
    assert href == "explorer.html" and (reports / href).is_file()
    assert watched.errors == []
    assert [url for url in watched.requests if not url.startswith("data:")] == [watched.url]
