"""The evaluate stage's logic: validation loss against the unigram baseline, perplexity, bits per byte, the
loss at each position of the window (and at twice the trained length), and samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
    longer = score_at_length(model, val_tokens, 2 * seq_len, params, log)
    if longer is not None:
        metrics["val_loss_at_2x_seq_len"] = round(longer.loss, 6)
        by_position.update(position_2x=list(range(2 * seq_len)), loss_2x=_rounded(longer.position_loss),
                           tokens_2x=list(longer.position_tokens))
    processor = load_tokenizer(tokenizer_dir)
    return Evaluation(metrics, by_position, samples_markdown(model, processor, params))


def score_at_length(model, val_tokens, length: int, params: Params, log) -> Score | None:
    """The loss on windows of `length` tokens (past the trained length: positions extended by their closed
    form); None, with the reason in the log, when the variant has no positions there or the split is short."""
    if model.cfg.pe == "learned":
        log(f"[evaluate] no loss at {length} tokens: model.pe=learned has no positions past "
            f"model.seq_len={model.cfg.seq_len}")
        return None
    if not params.eval.length_test_tokens:
        log(f"[evaluate] no loss at {length} tokens: eval.length_test_tokens is 0")
        return None
    if len(val_tokens) < length + 1:
        log(f"[evaluate] no loss at {length} tokens: the validation split has only {len(val_tokens):,} tokens")
        return None
    starts = eval_starts(len(val_tokens), length, params.eval.length_test_tokens)
    batch_size = max(1, params.eval.batch_size * model.cfg.seq_len // length)  # the same tokens per batch
    with longer_context(model, length):
        return score_windows(model, val_tokens, starts, length, batch_size, progress=True)


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

