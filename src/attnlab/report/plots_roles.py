"""The head-role figures: head_roles.png (every head's role scores, layers x heads, one panel per role, from
head_roles.parquet) and induction_over_training.png (the role scores and in-context learning of every weight
snapshot against tokens seen, under the validation loss, from dynamics.parquet). Each function takes the table
and returns a matplotlib Figure; stages/figure.py saves it. Nothing here reads files.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from attnlab.report.style import FIGURE_DPI as DPI  # noqa: E402

# The roles in the order of attnlab.analysis.head_roles.ROLES, with what each measures.
ROLE_LABELS = {
    "induction": "induction: to the token after\nthe previous occurrence",
    "duplicate": "duplicate token: to the\nprevious occurrence",
    "previous_token": "previous token: to the\nkey one back",
    "sink": "sink: to the first key",
}


def head_roles_heatmap(table: pd.DataFrame) -> Figure:
    """head_roles.png: one layers x heads heatmap per role, each cell the head's mean attention to its role's key
    (0 to 1), titled with what the score was measured on."""
    L, H = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    roles = [role for role in ROLE_LABELS if role in set(table["role"].astype(str))]
    with sns.axes_style("white"):
        fig, axes = plt.subplots(1, len(roles), figsize=(1.0 + len(roles) * (1.0 + 0.9 * H), 1.9 + 0.75 * L),
                                 dpi=DPI, squeeze=False)
        for ax, role in zip(axes[0], roles):
            rows = table[table["role"].astype(str) == role]
            grid = rows.pivot(index="layer", columns="head", values="score").reindex(index=range(L), columns=range(H))
            sns.heatmap(grid, ax=ax, annot=True, fmt=".2f", cmap="viridis", vmin=0.0, vmax=1.0, cbar=role == roles[-1],
                        cbar_kws={"label": "mean attention weight"}, annot_kws={"fontsize": 8})
            ax.set(xlabel="head", ylabel="layer", title=f"{ROLE_LABELS[role]}\n({rows['measured_on'].iloc[0]})")
        fig.suptitle("What each head does: its mean attention to the key of each role")
        fig.tight_layout()
    return fig


def _head_lines(ax, dynamics: pd.DataFrame, column: str) -> None:
    """One line per head of `column` against tokens seen; the head highest at the last snapshot drawn thick."""
    last = dynamics[dynamics["step"] == dynamics["step"].max()]
    best = last.loc[last[column].idxmax()]
    heads = dynamics.groupby(["layer", "head"])
    colors = sns.color_palette("husl", heads.ngroups)
    for color, ((layer, head), part) in zip(colors, heads):
        part = part.sort_values("train_tokens")
        strongest = (layer, head) == (best["layer"], best["head"])
        ax.plot(part["train_tokens"], part[column], "o-", ms=2.5, lw=2.6 if strongest else 1.0, color=color,
                label=f"L{layer}H{head}" + (" (highest at the end)" if strongest else ""))


def induction_over_training(dynamics: pd.DataFrame) -> Figure:
    """induction_over_training.png: against tokens seen (the loss curve's axis), per weight snapshot: the val
    loss on the val examples, each head's induction and previous-token scores, and the in-context learning scores
    (late minus early loss on text, second minus first copy of repeated random tokens). A phase change shows as
    a jump of the induction scores and a drop of the repeated-copy loss at the same tokens as a bend in the loss."""
    snapshots = dynamics.drop_duplicates("step").sort_values("train_tokens")
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(4, 1, figsize=(9, 11), dpi=DPI, sharex=True,
                                 gridspec_kw={"height_ratios": (1.0, 1.4, 1.4, 1.0)})
        loss, induction, previous, icl = axes
        loss.plot(snapshots["train_tokens"], snapshots["val_loss"], "o-", color="tab:orange", label="validation")
        loss.set(ylabel="loss (nats/token)", title="Validation loss of each snapshot (attention_stats' val examples)")
        _head_lines(induction, dynamics, "induction_score")
        induction.set(ylabel="induction score", ylim=(0.0, max(0.05, 1.05 * float(dynamics["induction_score"].max()))),
                      title="Induction: attention to the token after the previous occurrence (repeated random tokens)")
        _head_lines(previous, dynamics, "previous_token_score")
        previous.set(ylabel="previous-token score", ylim=(0.0, 1.02), title="Previous token: attention to the key "
                     "one back (val examples)")
        icl.plot(snapshots["train_tokens"], snapshots["repeat_icl_nats"], "o-", color="tab:red",
                 label="repeated tokens: second copy - first copy")
        icl.plot(snapshots["train_tokens"], snapshots["icl_score_nats"], "s-", color="tab:purple",
                 label="text: loss at ~0.9 x seq_len - at ~0.1 x seq_len")
        icl.axhline(0.0, color="gray", lw=0.8)
        icl.set(ylabel="in-context learning (nats)", xlabel="tokens seen",
                title="In-context learning: negative = later tokens gain from the context")
        for ax in axes:
            ax.legend(fontsize=7, ncol=1 if ax in (loss, icl) else 2)
        fig.suptitle("Head roles across training")
        fig.tight_layout()
    return fig

