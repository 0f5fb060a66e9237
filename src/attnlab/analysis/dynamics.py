"""Attention across training: the attention statistics and head roles of every weight snapshot of the train stage
(models/snapshots, attnlab.model.snapshots) on the validation examples of the attention_stats stage, per head.

One row per (snapshot, layer, head) -> data/attention/dynamics.parquet: train_tokens, step, split ("val"), layer,
head, mean_entropy_bits, mean_support, mean_normalized_support. The per-row statistics and the examples are
attnlab.analysis.stats's (batch_stats, stage_examples), and each mean is over the examples and query positions,
summed in float64 as stats.Summary sums them, so the numbers are those of reports/attention.json's val section:
at the last snapshot (the final weights, rounded to float16) they agree with it to within TOLERANCE.

The same rows hold each head's role scores (attnlab.analysis.head_roles: induction_score, duplicate_score on the
head_roles stage's repeated random sequences, previous_token_score, sink_score on the val examples) and, the same
on every row of a snapshot, its val_loss on those examples, icl_score_nats (late minus early loss there) and
repeat_icl_nats (second copy minus first copy of the repeated sequences): when induction heads form, the
induction scores jump and repeat_icl_nats drops, next to the loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attnlab.core.progress import progress_bar
from attnlab.analysis.head_roles import ROLES, head_key, repeat_half, repeated_random_tokens, role_scores
from attnlab.analysis.stats import HEADS_SPLIT, batch_stats, per_head_sums, stage_examples
from attnlab.core.device import pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import atomic_path
from attnlab.core.params import Params
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer
from attnlab.model.snapshots import list_snapshots

SPLIT = HEADS_SPLIT  # "val": the split attention.json reports per head
HEAD_STATS = ("entropy_bits", "support", "normalized_support")  # columns mean_<name>
# Most the last snapshot (float16 weights) may differ from attention.json's val means (the float32 model).
TOLERANCE = {"entropy_bits": 0.02, "normalized_support": 0.005}


def head_means(model: Transformer, examples: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """mean_<name> for HEAD_STATS -> (L, H) float64: each head's mean over the examples (N, T) and positions."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    device = next(model.parameters()).device
    sums = {name: np.zeros((L, H)) for name in HEAD_STATS}
    for first in range(0, len(examples), batch_size):
        stats = batch_stats(model, examples[first : first + batch_size].to(device))  # name -> (B, L, H, T)
        for name, total in per_head_sums(stats, HEAD_STATS).items():
            sums[name] += total
    n_rows = examples.shape[0] * examples.shape[1]  # rows per head
    return {f"mean_{name}": total / n_rows for name, total in sums.items()}


def role_columns(model: Transformer, repeats: torch.Tensor, examples: torch.Tensor, batch_size: int
                 ) -> dict[str, np.ndarray]:
    """The role columns of one snapshot's rows -> (L, H) each: <role>_score per head, val_loss, icl_score_nats and
    repeat_icl_nats the same for every head."""
    roles = role_scores(model, repeats, examples, batch_size)
    shape = roles.heads["induction"].shape
    columns = {f"{role}_score": roles.heads[role] for role in ROLES}
    for name, value in (("val_loss", roles.val_loss), ("icl_score_nats", roles.icl_score),
                        ("repeat_icl_nats", roles.repeat_icl)):
        columns[name] = np.full(shape, value)
    return columns


def snapshot_rows(step: int, train_tokens: int, means: dict[str, np.ndarray]) -> pd.DataFrame:
    """The L * H rows of one snapshot, by layer then head."""
    L, H = next(iter(means.values())).shape
    layer, head = np.meshgrid(np.arange(L, dtype=np.int16), np.arange(H, dtype=np.int16), indexing="ij")
    return pd.DataFrame({
        "train_tokens": np.full(L * H, train_tokens, dtype=np.int64),
        "step": np.full(L * H, step, dtype=np.int64),
        "split": SPLIT,
        "layer": layer.reshape(-1),
        "head": head.reshape(-1),
        **{name: values.reshape(-1) for name, values in means.items()},
    })  # fmt: skip


def compare_last(last: pd.DataFrame, reference: dict) -> dict:
    """Max |difference| between the last snapshot's rows and attention.json's val means: the split's mean
    entropy and normalized support, and each head's normalized support."""
    val = reference.get(SPLIT, {})
    diffs = {name: [] for name in TOLERANCE}
    for name, values in diffs.items():
        if f"mean_{name}" in val:
            values.append(abs(last[f"mean_{name}"].mean() - val[f"mean_{name}"]))
    for row in last.itertuples():
        head = val.get("heads", {}).get(f"L{row.layer}H{row.head}", {})
        if "mean_normalized_support" in head:
            diffs["normalized_support"].append(abs(row.mean_normalized_support - head["mean_normalized_support"]))
    out = {f"max_abs_diff_{name}": float(max(values)) for name, values in diffs.items() if values}
    out["within_tolerance"] = all(out.get(f"max_abs_diff_{name}", 0.0) <= tol for name, tol in TOLERANCE.items())
    return out


def dynamics_metrics(table: pd.DataFrame, reference: dict | None) -> dict:
    """reports/attention_dynamics.json: the snapshots' span, the last one's means, and (with attention.json as
    reference) how far the last snapshot is from it."""
    steps = table.drop_duplicates("step")
    first, last = (table[table["step"] == steps["step"].iloc[i]] for i in (0, -1))
    metrics = {
        "n_snapshots": len(steps),
        "first_step": int(steps["step"].iloc[0]),
        "last_step": int(steps["step"].iloc[-1]),
        "first_train_tokens": int(steps["train_tokens"].iloc[0]),
        "last_train_tokens": int(steps["train_tokens"].iloc[-1]),
        "first": {f"mean_{name}": float(first[f"mean_{name}"].mean()) for name in HEAD_STATS},
        "last": {f"mean_{name}": float(last[f"mean_{name}"].mean()) for name in HEAD_STATS},
        "normalized_support_by_layer": {  # first and last snapshot, mean over the layer's heads
            f"L{layer}": {"first": float(first.loc[first["layer"] == layer, "mean_normalized_support"].mean()),
                          "last": float(last.loc[last["layer"] == layer, "mean_normalized_support"].mean())}
            for layer in sorted(table["layer"].unique())
        },
    }
    if "induction_score" in table:
        metrics["roles"] = roles_over_training(table)
    if reference is not None:
        metrics["last_vs_attention_stats"] = compare_last(last, reference)
    return metrics


def largest_rise(part: pd.DataFrame, column: str) -> dict:
    """Between which consecutive snapshots of one head's rows (by step) `column` rose most, and from what to what."""
    part = part.sort_values("step")
    values = part[column].to_numpy()
    i = int(np.argmax(np.diff(values))) if len(values) > 1 else 0
    j = min(i + 1, len(values) - 1)
    tokens = part["train_tokens"]
    return {"from_step": int(part["step"].iloc[i]), "to_step": int(part["step"].iloc[j]),
            "from_train_tokens": int(tokens.iloc[i]), "to_train_tokens": int(tokens.iloc[j]),
            "from_score": float(values[i]), "to_score": float(values[j])}


def roles_over_training(table: pd.DataFrame) -> dict:
    """attention_dynamics.json's "roles": the strongest induction head at the last snapshot, its score and the
    snapshots between which it rose most; the first and last snapshot's ICL scores and val loss."""
    steps = sorted(table["step"].unique())
    first, last = table[table["step"] == steps[0]], table[table["step"] == steps[-1]]
    best = last.loc[last["induction_score"].idxmax()]
    layer, head = int(best["layer"]), int(best["head"])
    part = table[(table["layer"] == layer) & (table["head"] == head)]
    return {
        "induction": {"strongest_head": head_key(layer, head), "score_last": float(best["induction_score"]),
                      "largest_rise": largest_rise(part, "induction_score")},
        **{name: {"first": float(first[name].iloc[0]), "last": float(last[name].iloc[0])}
           for name in ("val_loss", "icl_score_nats", "repeat_icl_nats")},
    }


def attention_dynamics(params: Params, snapshots_dir: str | Path, tokens_dir: str | Path, out: str | Path,
                       reference: dict | None = None, progress: bool = False) -> dict:
    """The attention_dynamics stage: writes `out` (dynamics.parquet); returns {"table", "metrics", "n_examples"}.

    reference: reports/attention.json, for metrics["last_vs_attention_stats"]. ConfigError naming the folder
    when it holds no snapshots.
    """
    snapshots = list_snapshots(snapshots_dir)
    if not snapshots:
        raise ConfigError(str(snapshots_dir), "no weight snapshots (step_*.pt) here: the train stage writes one at "
                          "initialization and every validation point (dvc repro train)")
    device = pick_device(params.train.device)
    frames, examples, shape = [], None, None
    for step, path in progress_bar(snapshots, desc="attention dynamics", unit="snapshot", disable=not progress):
        model, meta = load_model(path, device)  # float16 weights into the float32 model
        if examples is None:
            shape = (model.cfg, model.vocab_size)
            examples = stage_examples(params, tokens_dir, model, splits=(SPLIT,))[1][SPLIT]  # (N, T)
            repeats = repeated_random_tokens(params.head_roles.n_sequences, repeat_half(model), model.vocab_size,
                                             params.analysis.seed)  # (n_sequences, 2n), as the head_roles stage
        if (model.cfg, model.vocab_size) != shape or "train_tokens" not in meta:
            raise ConfigError(str(path), "is not a snapshot of the same run as the others in its folder: rerun the "
                              "train stage (dvc repro --force train)")
        means = head_means(model, examples, params.attention.batch_size)
        means.update(role_columns(model, repeats, examples, params.attention.batch_size))
        frames.append(snapshot_rows(step, int(meta["train_tokens"]), means))
    table = pd.concat(frames, ignore_index=True)
    table["split"] = table["split"].astype("category")
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp, compression="zstd")
    return {"table": table, "metrics": dynamics_metrics(table, reference), "n_examples": len(examples)}
