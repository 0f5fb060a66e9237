"""Every figure of the report, listed once: its file name, the page section and caption, the dvc.yaml stage that
writes it and, for the figures of stages/figure.py, what it reads and the params it takes.

Derived from FIGURES: the report page (sections, captions, order), figures.FIGURES (what stages/figure.py
draws, with the params each reads), plots_interventions.INTERVENTION_FIGURES (the files the interventions stage
writes) and plots_pe.PE_FIGURES. The functions that draw them are imported where they are called, by file name:
figures.DRAW for stages/figure.py, plots_interventions.DRAW for the interventions stage. dvc.yaml is static:
tests/unit/test_report.py checks it and those DRAW tables against this list (each figure an out of its stage and
a dep of `report`; the `figure` foreach list = the param-free figure-stage ones).

Pure data: importing it runs no attnlab code, so every stage may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("Training", "Attention", "Head roles", "Interventions", "Positional encoding")  # the page's order
FIGURE_STAGE = "figure"  # dvc.yaml's foreach stage (figure@<name>): figures of stages/figure.py of stats.parquet alone
READS = ("stats", "mean_patterns", "model", "dynamics", "roles")  # what stages/figure.py loads (see figures.py)


@dataclass(frozen=True)
class Figure:
    name: str  # file name in reports/figures/
    section: str  # the page section it appears in (one of SECTIONS, or a new one appended after them)
    caption: str  # one line for the page: what to look for
    stage: str  # the dvc.yaml stage whose outs hold reports/figures/<name>
    reads: str = ""  # stages/figure.py figures only: their input, one of READS
    params: tuple[str, ...] = ()  # stages/figure.py figures only: params passed to draw, after the input, in order

    @property
    def file(self) -> str:
        """Path relative to the reports folder."""
        return f"figures/{self.name}"

    @property
    def by_figure_stage(self) -> bool:
        """Drawn by stages/figure.py (one figure@<name> or figure_<...> stage each)."""
        return bool(self.reads)


def _attention(name: str, caption: str, reads: str = "stats", params: tuple[str, ...] = (),
               stage: str = FIGURE_STAGE) -> Figure:  # fmt: skip
    return Figure(name, "Attention", caption, stage, reads, params)


def _intervention(name: str, caption: str) -> Figure:
    return Figure(name, "Interventions", caption, "interventions")


FIGURES: tuple[Figure, ...] = (
    Figure(
        "loss_curve.png", "Training",
        "Training and validation loss against tokens seen: both should fall and flatten; a widening gap means "
        "overfitting.",
        stage="loss_curve",
    ),
    Figure(
        "loss_by_position.png", "Training",
        "Left: validation loss at each position of the window, how much the model gains from more context, and "
        "(red) past the trained length, where a positional encoding that does not generalize breaks down. Right: "
        "the paired length test, the same targets scored with m x seq_len tokens of context for each m of "
        "eval.context_multiples: a point below the 1x one means the longer context helps.",
        stage="loss_curve",
    ),
    _attention(
        "attn_weights_support.png",
        "Support (effective number of attended tokens) for one batch: look for heads that stay dark (focused) "
        "at every position versus heads that brighten with position (spread out).",
        params=("attention.batch_size",), stage="figure_weights_support",
    ),
    _attention(
        "attn_support_hist_all.png",
        "Normalized support = support / (position + 1) over all heads and query positions (left; 1 = uniform over "
        "every visible token, mass near 0 = sharp attention), with raw support in tokens beside it (right); "
        "train and val should overlap.",
    ),
    _attention(
        "attn_support_vs_seq_len.png",
        "Support against query position, with the maximum (position + 1): how far below the diagonal attention "
        "stays as the context grows.",
    ),
    _attention(
        "attn_support_hist_by_block_head_w_seq_len_filter.png",
        "Per-head histograms of normalized support = support / (position + 1) for query positions in "
        "[start, stop) of attention.seq_len_filter: heads differ most here, some peaked near 0 (a few tokens), "
        "others broad or near 1 (uniform).",
        params=("attention.seq_len_filter",), stage="figure_support_hist_by_head",
    ),
    _attention(
        "attn_entropy_heatmap.png",
        "Mean entropy (bits) and normalized support per layer and head: dark cells are the focused heads.",
    ),
    _attention(
        "attn_head_diversity.png",
        "Earth mover's distance (in tokens) between heads' attention distributions over key offsets, each the "
        "mean over query positions, train and val examples pooled: bright off-diagonal cells are heads that look "
        "at very different distances.",
        reads="mean_patterns", stage="figure_head_diversity",
    ),
    _attention(
        "attn_mean_patterns.png",
        "Mean attention by query position and key offset, train and val examples pooled: a bright column at offset 1 is a previous-token head, "
        "a bright diagonal attends to the first token.",
        reads="mean_patterns", stage="figure_mean_patterns",
    ),
    _attention(
        "attn_support_over_training.png",
        "Each head's mean normalized support on the validation examples at initialization and every validation point of training, "
        "against tokens seen: when heads sharpen (falling lines) or spread out, and whether they settle before "
        "training ends.",
        reads="dynamics", stage="figure_support_over_training",
    ),
    Figure(
        "attn_tokens.html", "Attention",
        "Source tokens coloured by one head's attention from one query position, for the examples with the most "
        "and the least support.",
        stage="figure_tokens", reads="model",
        params=("attention.token_view_layer", "attention.token_view_head", "attention.token_view_position"),
    ),
    Figure(
        "head_roles.png", "Head roles",
        "Each head's mean attention to the key of each role (0 to 1): induction and duplicate-token on random tokens "
        "repeated once, previous-token and sink on validation text; a bright cell is a head that does that job.",
        stage="figure_head_roles", reads="roles",
    ),
    Figure(
        "induction_over_training.png", "Head roles",
        "The val loss, each head's induction and previous-token scores, and in-context learning at every weight "
        "snapshot against tokens seen: an induction head forming shows as a jump of its score with a drop of the "
        "repeated copy's loss at the same tokens.",
        stage="figure_induction_over_training", reads="dynamics",
    ),
    _intervention(
        "intervention_temperature.png",
        "Validation loss and mean attention entropy when every head's scores are divided by tau: how far from "
        "tau = 1 (the trained model) can attention be sharpened (tau < 1) or flattened (tau > 1) before the loss "
        "rises?",
    ),
    _intervention(
        "intervention_top_k.png",
        "Validation loss when every head keeps only its k largest scores per query: the k at which the curve meets "
        "the baseline is how many keys the model really needs; top-1 is hard attention.",
    ),
    _intervention(
        "head_importance.png",
        "Loss increase when one head's output is replaced by its mean (train split): large cells are heads the "
        "model relies on, cells near 0 are heads it can do without.",
    ),
    _intervention(
        "intervention_uniform.png",
        "Validation loss of the model, of every head attending uniformly to its past, and of one layer at a time "
        "made uniform: which layers' attention patterns carry the most.",
    ),
    Figure(
        "pe_heatmap.png", "Positional encoding",
        "The sinusoidal positional encoding (position x dimension). The early dimensions turn fast with "
        "position; the late ones barely change, so position lives mostly in the first part of the vector.",
        stage="pe_heatmap",
    ),
    Figure(
        "pe_dimension_variance.png", "Positional encoding",
        "For the trained model, per residual dimension (embedding output and each layer's output): the share "
        "of the dimension's variance explained by the position and by the token, chance-corrected.",
        stage="position_analysis",
    ),
    Figure(
        "position_probe.png", "Positional encoding",
        "A ridge-regression probe per layer predicting the absolute position from the residual stream; "
        "R^2 on held-out windows. How much each layer knows where it is.",
        stage="position_analysis",
    ),
)


def by_name(name: str) -> Figure | None:
    return next((f for f in FIGURES if f.name == name), None)


def of_stage(stage: str) -> list[Figure]:
    return [f for f in FIGURES if f.stage == stage]


def in_section(section: str) -> list[Figure]:
    return [f for f in FIGURES if f.section == section]


def figure_stage_figures() -> list[Figure]:
    """The figures of stages/figure.py, in page order."""
    return [f for f in FIGURES if f.by_figure_stage]
