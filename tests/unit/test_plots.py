"""Earth mover's distance against a loop reference and closed forms; plotting functions on a small table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnlab.core.errors import ConfigError
from attnlab.core.params import AttentionConfig, Params
from attnlab.report import figures, registry
from attnlab.report import plots_attention as plots


def emd_loop(a, b) -> float:
    """Integral of |F_a - F_b| over the merged sample points, CDFs counted one element at a time."""
    points = sorted(list(a) + list(b))
    total = 0.0
    for left, right in zip(points[:-1], points[1:]):
        fa = sum(1 for x in a if x <= left) / len(a)
        fb = sum(1 for x in b if x <= left) / len(b)
        total += abs(fa - fb) * (right - left)
    return total


def distribution_samples(distribution: np.ndarray, n: int) -> np.ndarray:
    """n samples of key offsets whose counts are distribution * n (an integer for each offset)."""
    counts = np.rint(distribution * n).astype(int)
    assert counts.sum() == n
    return np.repeat(np.arange(len(distribution)), counts).astype(np.float64)


def test_offset_emd_matches_the_loop_over_samples_and_closed_forms():
    rng = np.random.default_rng(0)
    n, T = 60, 9
    dists = np.stack([rng.multinomial(n, rng.dirichlet(np.ones(T))) / n for _ in range(4)])  # (4, T)
    got = plots.pairwise_offset_emd(dists)
    for i in range(4):
        for j in range(4):
            want = emd_loop(distribution_samples(dists[i], n), distribution_samples(dists[j], n))
            assert got[i, j] == pytest.approx(want, abs=1e-12), (i, j)
    point = np.eye(T)  # all mass at one offset each
    assert plots.pairwise_offset_emd(point[[0, 5]])[0, 1] == pytest.approx(5.0)  # moved 5 tokens
    uniform = np.r_[np.ones(5) / 5, np.zeros(T - 5)]  # offsets 0..4
    assert plots.pairwise_offset_emd(np.stack([uniform, point[0]]))[0, 1] == pytest.approx(2.0)  # mean offset


def test_offset_distributions_average_the_query_rows():
    from attnlab.analysis.stats import offset_patterns

    T = 6
    previous = np.eye(T, k=-1)  # (T query, T key): each query on the token before it
    previous[0, 0] = 1.0
    first = np.zeros((T, T))
    first[:, 0] = 1.0  # every query on token 0
    patterns = offset_patterns(np.stack([previous, first])[None])  # (1, 2, T, T offsets)
    dists = plots.offset_distributions(patterns)[0]  # (2, T)
    np.testing.assert_allclose(dists.sum(-1), 1.0)
    np.testing.assert_allclose(dists[0], np.r_[1, T - 1, np.zeros(T - 2)] / T)  # offset 1 but at query 0
    np.testing.assert_allclose(dists[1], np.ones(T) / T)  # query t at offset t


def small_table(L=2, H=2, T=12, n=3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    split, example, layer, head, position = np.meshgrid(range(2), range(n), range(L), range(H), range(T), indexing="ij")
    position = position.ravel()
    entropy = rng.random(position.size) * np.log2(position + 1)
    support = np.exp2(entropy)
    return pd.DataFrame(
        {
            "split": pd.Categorical.from_codes(split.ravel(), ["train", "val"]),
            "example": example.ravel().astype(np.int16),
            "layer": layer.ravel().astype(np.int8),
            "head": head.ravel().astype(np.int8),
            "position": position.astype(np.int16),
            "entropy_bits": entropy.astype(np.float32),
            "support": support.astype(np.float32),
            "normalized_support": (support / (position + 1)).astype(np.float32),
        }
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda df: plots.weights_support(df, 2),
        plots.support_hist_all,
        plots.support_vs_seq_len,
        lambda df: plots.support_hist_by_head(df, (4, 10)),
        plots.entropy_heatmap,
        lambda df: plots.head_diversity(np.full((2, 2, 12, 12), 1 / 12)),
        lambda df: plots.mean_patterns(np.full((2, 2, 12, 12), 1 / 12)),
    ],
)
def test_plot_functions_return_titled_figures_at_fixed_dpi(make):
    import matplotlib.pyplot as plt

    fig = make(small_table())
    try:
        assert fig.dpi == plots.DPI
        assert fig.get_suptitle() or any(ax.get_title() for ax in fig.axes), "a figure needs a title"
        labelled = [ax for ax in fig.axes if ax.get_xlabel()]
        assert labelled, "axes need labels"
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ support histograms


def bars(ax) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split label: (lefts, widths, heights)} of every histogram (BarContainer) drawn on `ax`; ax.hist puts
    its label on the first bar."""
    out = {}
    for container in ax.containers:
        patches = container.patches
        out[patches[0].get_label()] = tuple(
            np.array([getattr(p, f"get_{attr}")() for p in patches]) for attr in ("x", "width", "height")
        )
    return out


def height_at(lefts, widths, heights, value: float) -> float:
    """Height of the bar whose [left, left + width) holds `value`."""
    (i,) = np.nonzero((lefts <= value) & (value < lefts + widths))
    return float(heights[i[0]])


def hand_table(T: int, n: int, H: int, normalized, support=None) -> pd.DataFrame:
    """One layer, H heads, both splits, n examples, T positions; normalized(head, position) sets each row."""
    split, example, head, position = np.meshgrid(range(2), range(n), range(H), range(T), indexing="ij")
    head, position = head.ravel(), position.ravel()
    norm = np.array([normalized(h, t) for h, t in zip(head, position)], dtype=np.float32)
    return pd.DataFrame(
        {
            "split": pd.Categorical.from_codes(split.ravel(), ["train", "val"]),
            "example": example.ravel().astype(np.int16),
            "layer": np.zeros(position.size, dtype=np.int8),
            "head": head.astype(np.int8),
            "position": position.astype(np.int16),
            "support": (norm * (position + 1) if support is None else support(head, position)).astype(np.float32),
            "normalized_support": norm,
        }
    )


def test_rows_in_positions_keeps_start_drops_stop():
    df = small_table(T=12)
    part = plots.rows_in_positions(df, 4, 10)
    assert sorted(part["position"].unique()) == list(range(4, 10))  # 4 (== start) in, 10 (== stop) out
    assert len(part) == (df["position"].between(4, 9)).sum() == len(df) // 12 * 6
    assert part.columns.equals(df.columns) and part.index.isin(df.index).all()
    assert plots.rows_in_positions(df, 0, 12).equals(df)
    assert plots.rows_in_positions(df, 11, 12)["position"].eq(11).all()


START, STOP, N_EXAMPLES = 4, 10, 3
IN_WINDOW = {0: 0.41, 1: 0.61}  # head -> normalized support of positions start + 1 .. stop - 1 (bin centres)
AT_START, AT_STOP, BEFORE, AFTER = 0.81, 0.91, 0.01, 0.99  # markers: only AT_START may reach the histogram


def window_marker(head: int, position: int) -> float:
    if position < START:
        return BEFORE
    if position == START:
        return AT_START
    if position == STOP:
        return AT_STOP
    if position > STOP:
        return AFTER
    return IN_WINDOW[head]


def test_support_hist_by_head_draws_only_rows_in_window():
    import matplotlib.pyplot as plt

    df = hand_table(T=12, n=N_EXAMPLES, H=2, normalized=window_marker)
    fig = plots.support_hist_by_head(df, (START, STOP))
    try:
        n_in_window = N_EXAMPLES * (STOP - START)  # rows per (head, split): 3 examples x positions 4..9
        for head in (0, 1):
            ax = fig.axes[head]
            assert ax.get_title() == f"layer 0 head {head}"
            drawn = bars(ax)
            assert set(drawn) == {"train", "val"}
            for split, (lefts, widths, heights) in drawn.items():
                expected = np.array([AT_START] + [IN_WINDOW[head]] * (STOP - START - 1)).repeat(N_EXAMPLES)
                want, edges = np.histogram(expected.astype(np.float32), plots.NORMALIZED_BINS, density=True)
                np.testing.assert_allclose(lefts, edges[:-1], atol=1e-12)
                np.testing.assert_allclose(heights, want)
                # the start marker carries exactly N_EXAMPLES of n_in_window rows: recover the row count from it
                at_start = height_at(lefts, widths, heights, AT_START) * widths[0]  # share of rows in that bin
                assert N_EXAMPLES / at_start == pytest.approx(n_in_window)
                # positions start + 1 .. stop - 1 share one bin: that many of the window's positions
                in_window = height_at(lefts, widths, heights, IN_WINDOW[head]) * widths[0]
                assert in_window == pytest.approx((STOP - START - 1) / (STOP - START))
                for outside in (BEFORE, AT_STOP, AFTER, IN_WINDOW[1 - head]):
                    assert height_at(lefts, widths, heights, outside) == 0, (head, split, outside)
        assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # one density scale for all heads
        assert "normalized support = support / (position + 1)" in fig.axes[-1].get_xlabel()
        assert "normalized support = support / (position + 1)" in fig.get_suptitle()
        assert f"query positions {START} to {STOP - 1}" in fig.get_suptitle()
    finally:
        plt.close(fig)


def test_support_hist_all_main_panel_is_normalized_support():
    import matplotlib.pyplot as plt

    T = 64
    rng = np.random.default_rng(3)
    # disjoint ranges: normalized support in [0.1, 0.3], raw support in [20, 30] tokens
    df = hand_table(T=T, n=4, H=2, normalized=lambda h, t: rng.uniform(0.1, 0.3),
                    support=lambda head, position: rng.uniform(20, 30, head.size))
    fig = plots.support_hist_all(df)
    try:
        main, raw = fig.axes[:2]
        assert main.get_xlabel().startswith("normalized support = support / (position + 1)")
        assert "normalized support = support / (position + 1)" in main.get_title()
        for split, (lefts, widths, heights) in bars(main).items():
            drawn = heights > 0
            assert drawn.any()
            assert lefts[drawn].min() >= 0.1 - widths[0] and (lefts + widths)[drawn].max() <= 0.3 + widths[0]
            values = df.loc[df["split"] == split, "normalized_support"]
            want, _ = np.histogram(values, plots.NORMALIZED_BINS, density=True)
            np.testing.assert_allclose(heights, want)
        assert main.get_xlim() == (0.0, 1.0)
        assert raw.get_xlabel().startswith("support")
        for lefts, widths, heights in bars(raw).values():
            drawn = heights > 0
            assert lefts[drawn].min() >= 20 - widths[0] and (lefts + widths)[drawn].max() <= 30 + widths[0]
    finally:
        plt.close(fig)


def test_normalized_values_caps_rounding_above_one():
    values = pd.Series(np.array([0.5, 1.0, np.nextafter(np.float32(1), np.float32(2))], dtype=np.float32))
    capped = plots.normalized_values(values)
    assert capped.max() == 1.0 and capped[0] == 0.5
    counts, _ = np.histogram(capped, plots.NORMALIZED_BINS)
    assert counts.sum() == 3  # uncapped, np.histogram would drop the last row


# ------------------------------------------------------------------------------------ attention across training


def small_dynamics(L=2, H=3, steps=(3, 6, 9, 10), tokens_per_step=256) -> pd.DataFrame:
    """dynamics.parquet rows: one per (snapshot, layer, head); head h of layer l sharpens at its own rate."""
    step, layer, head = np.meshgrid(np.asarray(steps), np.arange(L), np.arange(H), indexing="ij")
    support = 0.9 * np.exp(-step * (1 + layer + head) / 20.0) + 0.05
    induction = np.where((layer == 1) & (head == 2), np.clip((step - 5) / 4.0, 0.0, 1.0), 0.02)  # forms at step 6-9
    per_step = {"val_loss": 6.0 - 0.3 * step, "icl_score_nats": -0.01 * step, "repeat_icl_nats": -0.4 * induction.max(
        axis=(1, 2), keepdims=True) * np.ones_like(support)}  # fmt: skip
    return pd.DataFrame({
        "train_tokens": (step * tokens_per_step).ravel().astype(np.int64), "step": step.ravel().astype(np.int64),
        "split": pd.Categorical(["val"] * step.size), "layer": layer.ravel().astype(np.int16),
        "head": head.ravel().astype(np.int16), "mean_entropy_bits": np.log2(support.ravel() * 12),
        "mean_support": support.ravel() * 12, "mean_normalized_support": support.ravel(),
        "induction_score": induction.ravel(), "duplicate_score": 0.01 + 0 * support.ravel(),
        "previous_token_score": (0.1 * (1 + head) * step / 10.0).ravel(), "sink_score": 0.2 + 0 * support.ravel(),
        **{name: values.ravel() for name, values in per_step.items()},
    })  # fmt: skip


def small_roles(L=2, H=3) -> pd.DataFrame:
    """head_roles.parquet rows: one per (layer, head, role), score = role index / 10 + layer / 100 + head / 1000."""
    roles = ["induction", "duplicate", "previous_token", "sink"]
    role, layer, head = np.meshgrid(np.arange(4), np.arange(L), np.arange(H), indexing="ij")
    return pd.DataFrame({
        "layer": layer.ravel().astype(np.int16), "head": head.ravel().astype(np.int16),
        "role": pd.Categorical([roles[r] for r in role.ravel()]), "score": (role / 10 + layer / 100 + head / 1000).ravel(),
        "measured_on": pd.Categorical(["repeated random tokens" if r < 2 else "validation text" for r in role.ravel()]),
        "n_sequences": 4, "seq_len": 12,
    })  # fmt: skip


def test_support_over_training_has_a_panel_per_layer_and_a_line_per_head_against_tokens(tmp_path):
    import matplotlib.pyplot as plt

    from attnlab.analysis.stats_files import DYNAMICS_FILE
    from attnlab.report.style import save_figure

    df = small_dynamics()
    fig = plots.support_over_training(df)
    try:
        assert fig.dpi == plots.DPI and len(fig.axes) == 2
        for layer, ax in enumerate(fig.axes):
            assert ax.get_xlabel() == "tokens seen" and ax.get_title() == f"layer {layer}"  # as the loss curve
            assert [line.get_label() for line in ax.get_lines()] == ["head 0", "head 1", "head 2"]
            for head, line in enumerate(ax.get_lines()):
                part = df[(df["layer"] == layer) & (df["head"] == head)]
                np.testing.assert_array_equal(line.get_xdata(), part["train_tokens"])
                np.testing.assert_allclose(line.get_ydata(), part["mean_normalized_support"])
    finally:
        plt.close(fig)
    # the stage's path: dynamics.parquet in the attention folder -> a PNG
    df.to_parquet(tmp_path / DYNAMICS_FILE, index=False)
    out = tmp_path / "figures" / "attn_support_over_training.png"
    save_figure(figures.build_figure("attn_support_over_training.png", Params(), tmp_path), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="attention_dynamics"):
        figures.build_figure("attn_support_over_training.png", Params(), tmp_path / "empty")


# ---------------------------------------------------------------------------------- drawing from the registry

PNG_FIGURES = [f for f in registry.figure_stage_figures() if f.reads in figures.LOADERS]


@pytest.mark.parametrize("figure", PNG_FIGURES, ids=lambda f: f.name)
def test_build_figure_draws_each_registry_png_with_its_input_and_params(figure, tmp_path, monkeypatch):
    """The registry's draw function, input and params fit together (the stage test draws them from real files)."""
    import matplotlib.pyplot as plt

    inputs = {"stats": small_table(T=12), "mean_patterns": np.full((2, 2, 12, 12), 1 / 12),
              "dynamics": small_dynamics(), "roles": small_roles()}
    monkeypatch.setitem(figures.LOADERS, figure.reads, lambda _dir: inputs[figure.reads])
    params = Params(attention=AttentionConfig(batch_size=2, seq_len_filter=(4, 10)))
    fig = figures.build_figure(figure.name, params, tmp_path)
    try:
        assert fig.dpi == plots.DPI and fig.axes
    finally:
        plt.close(fig)


def test_build_figure_checks_the_seq_len_filter_against_the_stats(tmp_path, monkeypatch):
    monkeypatch.setitem(figures.LOADERS, "stats", lambda _dir: small_table(T=12))
    params = Params(attention=AttentionConfig(seq_len_filter=(4, 20)))
    with pytest.raises(ConfigError, match="seq_len=12"):
        figures.build_figure("attn_support_hist_by_block_head_w_seq_len_filter.png", params, tmp_path)
    with pytest.raises(ConfigError, match="expected one of"):
        figures.build_figure("loss_curve.png", params, tmp_path)  # in the registry, but drawn by its own stage (stages/loss_curve.py)


# ------------------------------------------------------------------------------------------ loss by position


def test_loss_by_position_draws_every_view_and_the_paired_curve():
    import matplotlib.pyplot as plt

    from attnlab.report.plots_train import loss_by_position_figure

    T = 8
    curves = {"position": list(range(T)), "loss": [4.0 - 0.1 * t for t in range(T)], "tokens": [5] * T,
              "context_multiples": [1, 2, 4], "context_length": [T, 2 * T, 4 * T], "paired_loss": [3.5, 3.4, 3.45],
              "paired_tokens": 40}
    for m in (2, 4):
        curves.update({f"position_{m}x": list(range(m * T)), f"loss_{m}x": [3.0 + 0.01 * t for t in range(m * T)],
                       f"tokens_{m}x": [5] * (m * T)})
    metrics = {"val_loss": 3.6, "unigram_loss": 6.0, "val_loss_at_2x_seq_len": 3.4, "val_loss_at_4x_seq_len": 3.45}
    fig = loss_by_position_figure(curves, metrics)
    try:
        by_position, paired = fig.axes
        lengths = sorted(len(line.get_xdata()) for line in by_position.get_lines() if len(line.get_xdata()) > 2)
        assert lengths == [T, 2 * T, 4 * T]  # 1x, 2x and 4x views
        assert any("3.450" in text.get_text() for text in by_position.get_legend().get_texts())
        (curve,) = [line for line in paired.get_lines() if len(line.get_xdata()) == 3]
        np.testing.assert_array_equal(curve.get_xdata(), [T, 2 * T, 4 * T])
        np.testing.assert_array_equal(curve.get_ydata(), [3.5, 3.4, 3.45])
        assert "40 targets" in curve.get_label()
    finally:
        plt.close(fig)
    # an older file without the paired test still draws its left panel
    old = {key: curves[key] for key in ("position", "loss", "tokens")}
    plt.close(loss_by_position_figure(old, metrics))


# ------------------------------------------------------------------------------------------------ head roles


def test_head_roles_heatmap_has_a_panel_per_role_with_the_scores_of_each_head(tmp_path):
    import matplotlib.pyplot as plt

    from attnlab.analysis.stats_files import HEAD_ROLES_FILE
    from attnlab.report import plots_roles
    from attnlab.report.style import save_figure

    table = small_roles()
    fig = plots_roles.head_roles_heatmap(table)
    try:
        panels = [ax for ax in fig.axes if ax.get_xlabel() == "head"]
        assert len(panels) == 4 and fig.dpi == plots.DPI
        for ax, role in zip(panels, ["induction", "duplicate", "previous_token", "sink"]):
            shown = {text.get_text() for text in ax.texts}  # the annotated cells
            rows = table[table["role"] == role]
            assert shown == {f"{score:.2f}" for score in rows["score"]}, role
            assert rows["measured_on"].iloc[0] in ax.get_title()
        assert not any("0.30" in text.get_text() for text in panels[0].texts)  # sink's scores are not induction's
    finally:
        plt.close(fig)
    table.to_parquet(tmp_path / HEAD_ROLES_FILE, index=False)
    out = tmp_path / "head_roles.png"
    save_figure(figures.build_figure("head_roles.png", Params(), tmp_path), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="head_roles stage"):
        figures.build_figure("head_roles.png", Params(), tmp_path / "empty")


def test_induction_over_training_draws_each_head_and_the_loss_against_tokens():
    import matplotlib.pyplot as plt

    from attnlab.report import plots_roles

    df = small_dynamics()
    fig = plots_roles.induction_over_training(df)
    try:
        loss, induction, previous, icl = fig.axes
        assert all(ax.get_xlabel() in ("", "tokens seen") for ax in fig.axes) and icl.get_xlabel() == "tokens seen"
        snapshots = df.drop_duplicates("step")
        (line,) = loss.get_lines()
        np.testing.assert_array_equal(line.get_xdata(), snapshots["train_tokens"])
        np.testing.assert_allclose(line.get_ydata(), snapshots["val_loss"])
        lines = {line.get_label(): line for line in induction.get_lines()}
        assert len(lines) == 6 and "L1H2 (highest at the end)" in lines  # the head that forms
        np.testing.assert_allclose(lines["L1H2 (highest at the end)"].get_ydata(), [0.0, 0.25, 1.0, 1.0])
        assert lines["L1H2 (highest at the end)"].get_linewidth() > lines["L0H0"].get_linewidth()
        assert len(previous.get_lines()) == 6
        np.testing.assert_allclose(icl.get_lines()[0].get_ydata(), snapshots["repeat_icl_nats"])
    finally:
        plt.close(fig)


def test_the_top_k_figure_draws_every_k_from_seq_len_on_as_one_all_keys_point():
    import matplotlib.pyplot as plt

    from attnlab.report.plots_interventions import plot_top_k

    ks = [1, 2, 4, 8, 16, 512]
    table = pd.DataFrame({"kind": ["baseline"] + ["top_k"] * len(ks), "setting": [""] + [str(k) for k in ks],
                          "loss": [3.0, 4.0, 3.5, 3.2, 3.1, 3.05, 3.0]})
    for seq_len, labels, xs in ((16, ["1", "2", "4", "8", "all keys\n(k >= 16)"], [1, 2, 4, 8, 16]),
                                (1024, [str(k) for k in ks], ks)):
        fig = plot_top_k(table, seq_len)
        try:
            ax = fig.axes[0]
            assert [t.get_text() for t in ax.get_xticklabels()] == labels
            assert list(ax.lines[0].get_xdata()) == xs
            assert ax.lines[0].get_ydata()[-1] == (3.05 if seq_len == 16 else 3.0)  # k = 16: the first of them
        finally:
            plt.close(fig)
