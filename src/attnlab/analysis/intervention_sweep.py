"""The interventions stage's sweep: every intervention setting (uniform heads, temperature and top-k sweeps,
per-head mean-ablation) scored with attnlab.analysis.interventions on the same fixed, seeded random validation
windows (chosen as attention_stats chooses its examples, with analysis.seed), its table and metrics, and the
generated samples under the main variants.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from attnlab.core.progress import progress_bar
from attnlab.analysis.capture import explicit_attention
from attnlab.analysis.generate import generate, prompt_seed
from attnlab.analysis.interventions import (
    HeadKey,
    Intervention,
    InterventionScore,
    MeanAblate,
    Temperature,
    TopK,
    Uniform,
    intervene,
    mean_head_outputs,
    score_intervened_together,
)
from attnlab.core.errors import ConfigError
from attnlab.core.params import Params
from attnlab.data.tokens import example_starts
from attnlab.model.scoring import Batch, iter_batches
from attnlab.model.transformer import Transformer


def make_batches(tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int, device) -> list[Batch]:
    """Fixed batches of windows, kept in memory on the device so every intervention reuses them."""
    return list(iter_batches(tokens, starts, seq_len, batch_size, device))


def intervention_starts(tokens: np.ndarray, seq_len: int, n_tokens: int, seed: int) -> np.ndarray:
    """Seeded random windows from the whole split, chosen as attention_stats chooses its examples
    (attnlab.data.example_starts), enough of them to cover n_tokens."""
    return example_starts(len(tokens), seq_len, max(1, n_tokens // seq_len), seed)


# ------------------------------------------------------------------------------------ the stage's sweep


@dataclass(frozen=True)
class Row:
    """One intervention setting of the stage: what it is, and the edits that realise it."""

    kind: str  # baseline | uniform_all | uniform_layer | temperature | top_k | mean_ablate
    setting: str  # the json key: "" for baseline/uniform_all, "0" for a layer, "0.25" for tau, "L0H1" for a head
    layer: int | None = None
    head: int | None = None
    edits: Mapping[HeadKey, Intervention] = field(default_factory=dict)


def sweep_rows(n_layers: int, n_heads: int, temperatures, top_k, means: torch.Tensor | None) -> list[Row]:
    """Every row of the stage, in table order; mean_ablate rows only when `means` is given."""
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    rows = [Row("baseline", ""), Row("uniform_all", "", edits={key: Uniform() for key in heads})]
    for layer in range(n_layers):
        layer_heads = {(layer, head): Uniform() for head in range(n_heads)}
        rows.append(Row("uniform_layer", str(layer), layer=layer, edits=layer_heads))
    for tau in dict.fromkeys(float(t) for t in temperatures):  # ordered, without repeats
        rows.append(Row("temperature", str(tau), edits={key: Temperature(tau) for key in heads}))
    for k in dict.fromkeys(int(k) for k in top_k):
        rows.append(Row("top_k", str(k), edits={key: TopK(k) for key in heads}))
    if means is not None:
        ablate = MeanAblate(means)
        for layer, head in heads:
            rows.append(Row("mean_ablate", f"L{layer}H{head}", layer=layer, head=head, edits={(layer, head): ablate}))
    return rows


def sample_variants(n_layers: int, n_heads: int) -> list[tuple[str, tuple[str, str], dict[HeadKey, Intervention]]]:
    """The variants of intervention_samples.md as (title, (kind, setting) of its table row, edits)."""
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    return [
        ("baseline", ("baseline", ""), {}),
        ("all heads uniform", ("uniform_all", ""), {key: Uniform() for key in heads}),
        ("all heads temperature 0.25", ("temperature", "0.25"), {key: Temperature(0.25) for key in heads}),
        ("all heads top-1", ("top_k", "1"), {key: TopK(1) for key in heads}),
    ]


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(values: np.ndarray, seed: int, level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (n,): `resamples` means of n values drawn with
    replacement, seeded, and their (1 - level) / 2 and (1 + level) / 2 quantiles."""
    values = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))  # (R, n)
    means = values[picks].mean(axis=1)  # (R,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def results_table(rows: list[Row], results: list[InterventionScore], seed: int = 0) -> pd.DataFrame:
    """One line per row: kind, setting, layer, head, loss, ppl, mean_entropy_bits, delta (loss - baseline), and
    delta_low, delta_high: the 95% bootstrap interval of delta over the validation windows, each window's change
    against the unchanged model on the same window (the same resampled windows for every row: seeded)."""
    baseline_result = next(res for row, res in zip(rows, results) if row.kind == "baseline")
    baseline, baseline_windows = baseline_result.loss, np.asarray(baseline_result.window_loss)
    intervals = [bootstrap_interval(np.asarray(res.window_loss) - baseline_windows, seed) for res in results]
    return pd.DataFrame(
        {
            "kind": [row.kind for row in rows],
            "setting": [row.setting for row in rows],
            "layer": pd.array([row.layer for row in rows], dtype="Int64"),
            "head": pd.array([row.head for row in rows], dtype="Int64"),
            "loss": [res.loss for res in results],
            "ppl": [res.ppl for res in results],
            "mean_entropy_bits": [res.mean_entropy_bits for res in results],
            "delta": [res.loss - baseline for res in results],
            "delta_low": [low for low, _ in intervals],
            "delta_high": [high for _, high in intervals],
        }
    )


def metrics_from_table(table: pd.DataFrame) -> dict:
    """The nested metrics JSON: baseline, uniform_all, uniform_layer, temperature, top_k, mean_ablate."""

    def summary(row) -> dict:
        return {"loss": float(row.loss), "ppl": float(row.ppl), "mean_entropy_bits": float(row.mean_entropy_bits)}

    metrics: dict = {"uniform_layer": {}, "temperature": {}, "top_k": {}, "mean_ablate": {}}
    for row in table.itertuples(index=False):
        if row.kind in ("baseline", "uniform_all"):
            metrics[row.kind] = summary(row)
        elif row.kind == "mean_ablate":
            # the interval's ends as two numbers: `dvc exp show` and `dvc metrics diff` drop lists
            metrics["mean_ablate"][row.setting] = {"loss": float(row.loss), "delta": float(row.delta),
                                                   "delta_low": float(row.delta_low),
                                                   "delta_high": float(row.delta_high)}
        else:
            metrics[row.kind][row.setting] = summary(row)
    order = ("baseline", "uniform_all", "uniform_layer", "temperature", "top_k", "mean_ablate")
    return {key: metrics[key] for key in order}


def with_token_counts(metrics: dict, n_eval_tokens: int, n_mean_tokens: int) -> dict:
    """The metrics plus what every loss in them scored: seeded random validation windows (as attention_stats
    picks its examples), and the train tokens behind the mean-ablation means."""
    return {**metrics, "tokens_scored": {"val": n_eval_tokens, "train_for_means": n_mean_tokens}}


@dataclass
class InterventionRun:
    table: pd.DataFrame  # every row, see results_table
    metrics: dict  # the nested metrics JSON
    samples_md: str  # reports/intervention_samples.md
    n_eval_tokens: int  # validation tokens scored per row
    n_mean_tokens: int  # train tokens behind the head means
    seconds: float


def run_interventions(
    params: Params, model_path: str | Path, tokens_dir: str | Path, tokenizer_path: str | Path
) -> InterventionRun:
    """The interventions stage: every row on the same fixed validation batches, plus generated samples.
    Runs on params.train.device, as every stage that runs the model."""
    from attnlab.core.device import pick_device
    from attnlab.data.tokenizer import load_tokenizer
    from attnlab.data.tokens import check_length, load_tokens
    from attnlab.model.checkpoint import load_model

    start = time.perf_counter()
    cfg = params.interventions
    # Inputs are checked before any heavy work.
    sp = load_tokenizer(tokenizer_path)
    val, train = load_tokens(tokens_dir, "val"), load_tokens(tokens_dir, "train")
    dev = pick_device(params.train.device)
    model, _ = load_model(model_path, dev)
    T = model.cfg.seq_len
    for key, n in (("interventions.n_eval_tokens", cfg.n_eval_tokens), ("interventions.mean_tokens", cfg.mean_tokens)):
        if n < T:
            raise ConfigError(key, f"{n} is below one sequence (the model in {model_path} has seq_len={T})")
    check_length(val, T, "val")
    check_length(train, T, "train")
    if sp.get_piece_size() > model.vocab_size:  # not the tokenizer the model was trained with
        raise ConfigError(
            str(tokenizer_path), f"has {sp.get_piece_size()} pieces, more than the model's vocabulary {model.vocab_size}"
        )

    val_starts = intervention_starts(val, T, cfg.n_eval_tokens, params.analysis.seed)
    mean_starts = intervention_starts(train, T, cfg.mean_tokens, params.analysis.seed)
    val_batches = make_batches(val, val_starts, T, cfg.batch_size, dev)
    mean_batches = make_batches(train, mean_starts, T, cfg.batch_size, dev)
    for split, batches in (("val", val_batches), ("train", mean_batches)):
        top = max(int(torch.maximum(x.max(), y.max())) for x, y in batches)
        if top >= model.vocab_size:
            path = str(Path(tokens_dir) / f"{split}.bin")
            raise ConfigError(path, f"token id {top} >= the model's vocabulary {model.vocab_size}")

    means = mean_head_outputs(model, mean_batches)  # (L, H, Dh), from the train split only
    rows = sweep_rows(model.cfg.n_layers, model.cfg.n_heads, cfg.temperatures, cfg.top_k, means)
    results = sweep(model, val_batches, rows, cfg.points_per_pass)
    table = results_table(rows, results, params.analysis.seed)
    return InterventionRun(
        table=table,
        metrics=with_token_counts(metrics_from_table(table), results[0].n_tokens,
                                  sum(x.numel() for x, _ in mean_batches)),
        samples_md=intervention_samples(model, sp, params, table),
        n_eval_tokens=results[0].n_tokens,
        n_mean_tokens=sum(x.numel() for x, _ in mean_batches),
        seconds=time.perf_counter() - start,
    )


def sweep(model: Transformer, batches: list[Batch], rows: list[Row], points_per_pass: int) -> list[InterventionScore]:
    """Every row's score, points_per_pass rows at a time in the same forward passes (score_intervened_together:
    the same numbers as one row at a time)."""
    results: list[InterventionScore] = []
    with progress_bar(total=len(rows), desc="interventions", unit="row") as bar:
        for first in range(0, len(rows), points_per_pass):
            group = rows[first : first + points_per_pass]
            results += score_intervened_together(model, batches, [row.edits for row in group])
            bar.update(len(group))
    return results


def intervention_samples(model: Transformer, sp, params: Params, table: pd.DataFrame) -> str:
    """Generated text for baseline, all-uniform, tau = 0.25 and top-1: the same prompts and seed, as markdown."""
    ev, n_tokens = params.eval, params.interventions.sample_tokens
    losses = dict(zip(zip(table.kind, table.setting), table.loss))
    lines = [
        "# Generated samples under attention interventions",
        "",
        f"Each variant continues the same prompts with the same seeds as samples.md (prompt i: seed "
        f"{params.analysis.seed} + i): {n_tokens} tokens, "
        f"sampling temperature {ev.sample_temperature}, top-k {ev.sample_top_k or 'off'}. "
        "The interventions change the model's attention, not the sampler.",
        "",
    ]
    for title, key, edits in sample_variants(model.cfg.n_layers, model.cfg.n_heads):
        loss = f" (validation loss {losses[key]:.3f} nats/token)" if key in losses else ""  # tau/k may be unswept
        lines += [f"## {title}{loss}", ""]
        with explicit_attention(model), intervene(model, edits):
            for i, prompt in enumerate(ev.prompts):
                text = generate(model, sp, prompt, n_tokens, ev.sample_temperature, ev.sample_top_k,
                                prompt_seed(params.analysis.seed, i))
                fence = "`" * max([3] + [len(run) + 1 for run in re.findall("`+", text)])  # outlasts any ``` in text
                lines += [f"Prompt {i + 1}: `{prompt!r}`", "", f"{fence}python", text, fence, ""]
    return "\n".join(lines)
