"""The evaluate stage's logic: validation loss against the unigram baseline, perplexity, bits per byte, the
loss at each position of the window, the loss against context length on the same targets, and samples.

The length test is paired. Its targets are the seq_len targets of evaluate's windows (eval_starts) that have
(M - 1) * seq_len tokens before them, M the largest of eval.context_multiples. The m x view scores each of those
targets with the m * seq_len tokens that end at its window: a window of m * seq_len tokens starting
(m - 1) * seq_len before evaluate's, of which only the last seq_len targets count. So the views score the same
tokens, each with the same tokens before it as in the shorter views plus seq_len more per step: what differs
between them is the context and the positions it sits at, never the targets. The 1x view is evaluate's own
windows (with M = 1 and eval.length_test_tokens >= eval.max_tokens, all of them: its loss is val_loss).
eval.length_test_tokens caps the targets (evenly spread), since view m costs m times their tokens. Past the
trained length the positions are extended by their closed forms (attnlab.model.transformer.longer_context);
model.pe=learned has none, so it gets the 1x view only, with a note in the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnlab.analysis.generate import generate, prompt_seed
from attnlab.model.scoring import Score, score_windows, unigram_loss, window_targets
from attnlab.core.device import pick_device
from attnlab.core.params import Params
from attnlab.data.tokenizer import load_tokenizer
from attnlab.data.tokens import check_length, eval_starts, load_meta, load_tokens
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import longer_context


@dataclass(frozen=True)
class Evaluation:
    metrics: dict  # reports/eval.json
    by_position: dict  # reports/loss_by_position.json: equal-length lists per curve
    samples: str  # reports/samples.md


def evaluate(params: Params, model_path: Path, tokens_dir: Path, tokenizer_dir: Path, log=print) -> Evaluation:
    """Scores the model on evaluate's windows (and at 2 x seq_len where its positions allow), samples text."""
    device = pick_device(params.train.device)
    model, meta = load_model(model_path, device)
    train_metrics = meta.get("train_metrics", {})
    val_tokens = load_tokens(tokens_dir, "val")
    seq_len = model.cfg.seq_len
    check_length(val_tokens, seq_len, "val")
    starts = eval_starts(len(val_tokens), seq_len, params.eval.max_tokens)
    score = score_windows(model, val_tokens, starts, seq_len, params.eval.batch_size, progress=True)
    loss, n_tokens = score.loss, score.n_tokens
    unigram = unigram_loss(load_tokens(tokens_dir, "train"), window_targets(val_tokens, starts, seq_len),
                           model.vocab_size)
    bytes_per_token = load_meta(tokens_dir)["bytes_per_token"]["val"]
    metrics = {
        "val_loss": round(loss, 6),
        "unigram_loss": round(unigram, 6),
        "val_loss_vs_unigram": round(unigram - loss, 6),
        "val_ppl": round(math.exp(loss), 4),
        "val_bpb": round(loss / math.log(2) / bytes_per_token, 6),
        "val_tokens_scored": n_tokens,
        "n_params": train_metrics.get("n_params", sum(p.numel() for p in model.parameters())),
        "train_tokens": train_metrics.get("train_tokens"),
        "tokens_per_param": train_metrics.get("tokens_per_param"),
        "tokens_per_sec": train_metrics.get("tokens_per_sec"),
        "device": train_metrics.get("device", device.type),
    }
    by_position = {"position": list(range(seq_len)), "loss": _rounded(score.position_loss),
                   "tokens": list(score.position_tokens)}
    if params.eval.length_test_tokens:
        paired = paired_length_losses(model, val_tokens, starts, params.eval.context_multiples,
                                      params.eval.batch_size, log, max_targets=params.eval.length_test_tokens)
        metrics.update(paired_metrics(paired))
        by_position.update(paired_curves(paired, seq_len))
    else:
        log("[evaluate] no length test: eval.length_test_tokens is 0")
    processor = load_tokenizer(tokenizer_dir)
    return Evaluation(metrics, by_position, samples_markdown(model, processor, params))


@dataclass(frozen=True)
class PairedLengths:
    """The length test. View m (each of multiples) scores windows of m * seq_len tokens: scores[m] is its loss at
    every position of them, loss[m] the mean over their last seq_len positions, the n_targets targets every view
    shares."""

    multiples: tuple[int, ...]
    loss: dict[int, float]
    scores: dict[int, Score]
    n_targets: int


def usable_multiples(model, n_tokens: int, starts: np.ndarray, multiples: tuple[int, ...], log) -> tuple[int, ...]:
    """The context multiples the model and the split allow: 1 only for model.pe=learned, and without those whose
    windows no evaluate window has room for before it (the reason of each left out goes to the log)."""
    seq_len = model.cfg.seq_len
    kept = []
    for m in multiples:
        if m > 1 and model.cfg.pe == "learned":
            log(f"[evaluate] no loss at {m * seq_len} tokens: model.pe=learned has no positions past "
                f"model.seq_len={seq_len}")
        elif m > 1 and not (starts >= (m - 1) * seq_len).any():
            log(f"[evaluate] no loss at {m * seq_len} tokens: the validation split ({n_tokens:,} tokens) has no "
                f"evaluate window with {(m - 1) * seq_len} tokens before it")
        else:
            kept.append(m)
    return tuple(kept)


def paired_length_losses(model, val_tokens: np.ndarray, starts: np.ndarray, multiples: tuple[int, ...],
                         batch_size: int, log=print, max_targets: int = 0) -> PairedLengths:
    """The paired length test (module docstring) on evaluate's windows `starts` (each seq_len + 1 tokens):
    the targets of the windows with (M - 1) * seq_len tokens before them, M the largest usable multiple, each
    scored with m * seq_len tokens of context for every usable m. At most max_targets targets (whole windows,
    spread evenly over those; 0 = all): view m scores m times as many tokens. batch_size is per 1x window: view m
    batches batch_size // m windows, the same tokens per batch."""
    seq_len = model.cfg.seq_len
    multiples = usable_multiples(model, len(val_tokens), starts, multiples, log)
    targets = starts[starts >= (max(multiples) - 1) * seq_len]  # (n,) starts of the 1x windows scored
    n_windows = max(1, max_targets // seq_len)
    if max_targets and n_windows < len(targets):
        targets = targets[np.floor(np.arange(n_windows) * (len(targets) / n_windows)).astype(np.int64)]
    loss, scores = {}, {}
    for m in multiples:
        length = m * seq_len
        with longer_context(model, length):
            score = score_windows(model, val_tokens, targets - (m - 1) * seq_len, length,
                                  max(1, batch_size // m), progress=True)
        scores[m], loss[m] = score, last_block_loss(score, (m - 1) * seq_len)
    return PairedLengths(multiples, loss, scores, len(targets) * seq_len)


def last_block_loss(score: Score, first: int) -> float:
    """The mean loss over the positions from `first` on (each position weighted by its targets); the whole
    score's loss for first = 0."""
    if first == 0:
        return score.loss
    losses = np.asarray(score.position_loss[first:], dtype=np.float64)
    counts = np.asarray(score.position_tokens[first:], dtype=np.float64)
    return float((losses * counts).sum() / counts.sum())


def paired_metrics(paired: PairedLengths) -> dict:
    """eval.json's val_loss_at_<m>x_seq_len for every view (the same targets in each) and their count."""
    out = {f"val_loss_at_{m}x_seq_len": round(paired.loss[m], 6) for m in paired.multiples}
    return {**out, "paired_tokens_scored": paired.n_targets}


def paired_curves(paired: PairedLengths, seq_len: int) -> dict:
    """loss_by_position.json's paired part: the curve (context length -> loss on the shared targets) and, per view
    past 1x, the loss at every position of its windows (position_<m>x, loss_<m>x, tokens_<m>x)."""
    out = {"context_multiples": list(paired.multiples),
           "context_length": [m * seq_len for m in paired.multiples],
           "paired_loss": [round(paired.loss[m], 6) for m in paired.multiples],
           "paired_tokens": paired.n_targets}
    for m in paired.multiples[1:]:
        score = paired.scores[m]
        out.update({f"position_{m}x": list(range(m * seq_len)), f"loss_{m}x": _rounded(score.position_loss),
                    f"tokens_{m}x": list(score.position_tokens)})
    return out


def _rounded(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def samples_markdown(model, processor, params: Params, title: str = "Samples") -> str:
    cfg = params.eval
    lines = [f"# {title}", "",
             f"{cfg.sample_tokens} tokens per prompt, temperature {cfg.sample_temperature}, "
             f"top-k {cfg.sample_top_k or 'off'}; prompt i is sampled with seed {params.analysis.seed} + i.", ""]
    for i, prompt in enumerate(cfg.prompts):
        text = generate(model, processor, prompt, cfg.sample_tokens, cfg.sample_temperature, cfg.sample_top_k,
                        seed=prompt_seed(params.analysis.seed, i))
        lines += [f"## Prompt {i + 1}: `{prompt.strip() or repr(prompt)}`", "", "```python", text.rstrip("\n"),
                  "```", ""]
    return "\n".join(lines)

