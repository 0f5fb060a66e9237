"""On real dvc: a one-line change in a module makes `dvc status` list every stage that runs it, and only those."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]


def changed_stages(project) -> set[str]:
    return {name.split("@")[0] for name in project.stale_stages()}


@pytest.mark.parametrize(
    "module, must_rerun, must_not_rerun",
    [
        ("src/attnlab/data/tokens.py", {"evaluate", "train", "interventions", "attention_stats"}, {"report"}),
        ("src/attnlab/model/scoring.py", {"evaluate", "train", "interventions"}, {"corpus", "tokenizer", "report"}),
        ("src/attnlab/analysis/interventions.py", {"interventions"}, {"train", "corpus"}),
        ("src/attnlab/report/plots_train.py", {"loss_curve", "report"}, {"train", "evaluate"}),
        ("src/attnlab/report/page.py", {"report"}, {"train", "evaluate", "corpus"}),
        ("src/attnlab/core/io.py", {"corpus", "train", "report"}, set()),
    ],
)
def test_a_one_line_change_reruns_the_stages_that_import_it(dvc_project, module, must_rerun, must_not_rerun):
    path = dvc_project.path / module
    original = path.read_text()
    assert not changed_stages(dvc_project), "the shared pipeline run should be up to date"
    try:
        path.write_text(original + "# a deliberate one-line change\n")
        changed = changed_stages(dvc_project)
    finally:
        path.write_text(original)
    assert must_rerun <= changed, f"{module}: dvc status lists {sorted(changed)}, missing {sorted(must_rerun - changed)}"
    assert not (must_not_rerun & changed), f"{module}: {sorted(must_not_rerun & changed)} should not rerun"
    assert not changed_stages(dvc_project)
