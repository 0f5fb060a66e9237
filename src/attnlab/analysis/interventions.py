"""Change what chosen heads do during a forward pass, without touching the weights: a small, typed API.

    with intervene(model, {(0, 1): Temperature(2.0), (1, 3): TopK(4), (1, 0): MeanAblate(means)}):
        logits = model(idx)

Each intervention is a frozen dataclass, applied to the heads named by the (layer, head) keys:

- ``Uniform()``: every allowed key gets the same score, so query position t attends 1/(t+1) to keys 0..t and
  the head's output becomes the running mean of V.
- ``Temperature(tau)``: scores / tau before the softmax (tau -> 0 approaches hard attention, tau = 1 is the model).
- ``TopK(k)``: keep the k largest scores of each query row, the others become -inf; ties go to the lowest
  key position; k >= t + 1 keeps every allowed key.
- ``MeanAblate(means)``: replace the head's output (before the output projection) with its mean over
  positions and examples, ``means[layer, head]``, from :func:`head_means` on the train split.

The softmax interventions edit the pre-softmax scores on ``hook_scores`` (entries masked by the causal mask are
-inf and stay -inf); mean-ablation edits ``hook_head_out``. Both go through attnlab.capture.edit_point, so
hooks are removed when the block exits, also on error. Nothing is monkeypatched.

The second half of this module is the interventions stage: one batched evaluation loop (:func:`evaluate`) over
fixed, seeded random validation windows (the
same choice as attention_stats), run once per intervention, and :func:`run_interventions`, which builds every row.

Shapes: B batch, H heads, h chosen heads of a layer, T sequence, Dh head dimension, L layers, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Union

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from attnlab.analysis.capture import capture_attention, capture_points, edit_point, explicit_attention
from attnlab.analysis.generate import generate, prompt_seed
from attnlab.model.scoring import Batch, iter_batches, score_batches
from attnlab.core.errors import ConfigError
from attnlab.core.params import Params
from attnlab.data.tokens import example_starts
from attnlab.model.transformer import Transformer

# --------------------------------------------------------------------------------------- the interventions


@dataclass(frozen=True)
class Uniform:
    """All allowed keys get score 0: softmax gives 1/(t+1) to each of keys 0..t."""

    def edit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, h, T, T), -inf where masked
        return torch.where(torch.isneginf(scores), scores, torch.zeros_like(scores))  # (B, h, T, T)


@dataclass(frozen=True)
class Temperature:
    """Scores divided by tau (> 0); -inf / tau stays -inf."""

    tau: float

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"Temperature.tau must be > 0, got {self.tau}")

    def edit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.tau  # (B, h, T, T)


@dataclass(frozen=True)
class TopK:
    """Keep the k largest scores per query row (lowest key position wins ties), set the others to -inf."""

    k: int

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"TopK.k must be an integer >= 1, got {self.k!r}")

    def edit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, h, T, T), -inf where masked
        if self.k >= scores.shape[-1]:
            return scores  # every allowed key is among the k largest
        kth = torch.topk(scores, self.k, dim=-1).values[..., -1:]  # (B, h, T, 1) the k-th largest score per row
        above = scores > kth  # (B, h, T, T) kept whatever the ties
        tied = scores == kth  # (B, h, T, T) candidates for the remaining places
        places = self.k - above.sum(-1, keepdim=True)  # (B, h, T, 1) how many tied keys still fit
        keep = above | (tied & (tied.cumsum(-1) <= places))  # ties go to the lowest key positions
        # A row with fewer than k allowed keys has kth = -inf: it keeps all of them, masked keys stay -inf.
        return scores.masked_fill(~keep, float("-inf"))  # (B, h, T, T)


@dataclass(frozen=True, eq=False)  # eq=False: compared (and grouped) by identity, tensors have no plain ==
class MeanAblate:
    """Replace the head's output with means[layer, head]; means: (L, H, Dh), e.g. from :func:`head_means`."""

    means: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.means, torch.Tensor) or self.means.dim() != 3:
            raise ValueError("MeanAblate.means must be a (n_layers, n_heads, d_head) tensor")


ScoreIntervention = Union[Uniform, Temperature, TopK]
Intervention = Union[Uniform, Temperature, TopK, MeanAblate]
HeadKey = tuple[int, int]  # (layer, head)


@contextlib.contextmanager
def intervene(model: Transformer, edits: Mapping[HeadKey, Intervention]) -> Iterator[None]:
    """Apply each intervention to its (layer, head) during forward passes inside the block.

    Heads of one layer that share an intervention are edited together, in one indexed operation.
    Hooks are registered on entry and removed on exit; the model's weights are never written.
    """
    cfg = model.cfg
    score_groups: dict[int, dict[ScoreIntervention, list[int]]] = {}  # layer -> intervention -> heads
    out_groups: dict[int, dict[MeanAblate, list[int]]] = {}
    for (layer, head), intervention in edits.items():
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(
                f"(layer={layer}, head={head}) does not exist: the model has {cfg.n_layers} layers of "
                f"{cfg.n_heads} heads"
            )
        if isinstance(intervention, MeanAblate):
            expected = (cfg.n_layers, cfg.n_heads, cfg.d_head)
            if tuple(intervention.means.shape) != expected:
                raise ValueError(f"MeanAblate.means has shape {tuple(intervention.means.shape)}, expected {expected}")
            out_groups.setdefault(layer, {}).setdefault(intervention, []).append(head)
        elif isinstance(intervention, (Uniform, Temperature, TopK)):
            score_groups.setdefault(layer, {}).setdefault(intervention, []).append(head)
        else:
            raise TypeError(f"unknown intervention {intervention!r} for (layer={layer}, head={head})")

    device = next(model.parameters()).device
    score_edits = {layer: _score_edit(groups) for layer, groups in score_groups.items()}
    out_edits = {layer: _mean_edit(layer, groups, device) for layer, groups in out_groups.items()}
    with edit_point(model, score_edits, "hook_scores"), edit_point(model, out_edits, "hook_head_out"):
        yield


def _score_edit(groups: dict[ScoreIntervention, list[int]]):
    def edit(scores: torch.Tensor) -> torch.Tensor:
        if len(groups) == 1:
            (intervention, heads), = groups.items()
            if sorted(heads) == list(range(scores.shape[1])):  # every head alike: no gather/scatter needed
                return intervention.edit_scores(scores)  # (B, H, T, T)
        scores = scores.clone()  # (B, H, T, T)
        for intervention, heads in groups.items():  # one step per distinct intervention, not per head
            scores[:, heads] = intervention.edit_scores(scores[:, heads])  # (B, h, T, T)
        return scores

    return edit


def _mean_edit(layer: int, groups: dict[MeanAblate, list[int]], device: torch.device):
    means = [(ablate.means[layer, heads].to(device), heads) for ablate, heads in groups.items()]  # (h, Dh) each

    def edit(head_out: torch.Tensor) -> torch.Tensor:
        head_out = head_out.clone()  # (B, H, T, Dh)
        for mean, heads in means:
            head_out[:, heads] = mean.to(head_out.dtype)[None, :, None, :]  # (1, h, 1, Dh) broadcast over B, T
        return head_out

    return edit


# ----------------------------------------------------------------------------------- measuring on batches


def entropy_bits(pattern: torch.Tensor) -> torch.Tensor:
    """Entropy of each attention row in bits, -sum_j p_j log2 p_j with 0 log 0 = 0. (..., T, T) -> (..., T)."""
    return -torch.special.xlogy(pattern, pattern).sum(-1) / math.log(2.0)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats/token
    mean_entropy_bits: float  # mean over layers, heads, examples and query positions of the attention entropy
    n_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def evaluate(
    model: Transformer, batches: list[Batch], edits: Mapping[HeadKey, Intervention] | None = None
) -> EvalResult:
    """Loss (attnlab.scoring.score_batches, the one scoring function) and mean attention entropy over fixed
    batches, on the explicit path. The attention weights are captured in the same forward pass that gives the
    loss."""
    device = next(model.parameters()).device
    entropy_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_rows = 0
    with torch.no_grad(), explicit_attention(model), intervene(model, edits or {}), \
            capture_attention(model) as patterns:

        def add_entropy() -> None:
            nonlocal entropy_sum, n_rows
            for pattern in patterns.values():  # (B, H, T, T) per layer
                entropy_sum += entropy_bits(pattern).sum(dtype=torch.float64)  # over (B, H, T)
                n_rows += pattern.shape[:-1].numel()

        score = score_batches(model, batches, after_forward=add_entropy)
    return EvalResult(loss=score.loss, mean_entropy_bits=(entropy_sum / n_rows).item(), n_tokens=score.n_tokens)


@torch.no_grad()
def head_means(model: Transformer, batches: list[Batch]) -> torch.Tensor:
    """Each head's mean output over positions and examples: (L, H, Dh) float32 (the MeanAblate table)."""
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_head_out" for layer in range(L)]
    device = next(model.parameters()).device
    sums = torch.zeros(L, model.cfg.n_heads, model.cfg.d_head, dtype=torch.float64, device=device)  # (L, H, Dh)
    count = 0
    with explicit_attention(model), capture_points(model, names) as cache:
        for inputs, _ in batches:
            model(inputs)
            for layer, name in enumerate(names):
                sums[layer] += cache[name].double().sum(dim=(0, 2))  # (B, H, T, Dh) -> (H, Dh)
            count += inputs.numel()  # B * T positions
    return (sums / count).float()


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


def results_table(rows: list[Row], results: list[EvalResult]) -> pd.DataFrame:
    """One line per row: kind, setting, layer, head, loss, ppl, mean_entropy_bits, delta (loss - baseline)."""
    baseline = next(res.loss for row, res in zip(rows, results) if row.kind == "baseline")
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
            metrics["mean_ablate"][row.setting] = {"loss": float(row.loss), "delta": float(row.delta)}
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

    means = head_means(model, mean_batches)  # (L, H, Dh), from the train split only
    rows = sweep_rows(model.cfg.n_layers, model.cfg.n_heads, cfg.temperatures, cfg.top_k, means)
    results = [evaluate(model, val_batches, row.edits) for row in tqdm(rows, desc="interventions", unit="row")]
    table = results_table(rows, results)
    return InterventionRun(
        table=table,
        metrics=with_token_counts(metrics_from_table(table), results[0].n_tokens,
                                  sum(x.numel() for x, _ in mean_batches)),
        samples_md=samples_markdown(model, sp, params, table),
        n_eval_tokens=results[0].n_tokens,
        n_mean_tokens=sum(x.numel() for x, _ in mean_batches),
        seconds=time.perf_counter() - start,
    )


def samples_markdown(model: Transformer, sp, params: Params, table: pd.DataFrame) -> str:
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
