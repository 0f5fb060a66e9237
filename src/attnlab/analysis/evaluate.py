"""The evaluate stage's logic: validation loss, perplexity, bits per byte, and samples."""

from __future__ import annotations

import math
from pathlib import Path

from attnlab.analysis.generate import generate, prompt_seed
from attnlab.analysis.scoring import score_windows, unigram_loss, window_targets
from attnlab.core.device import pick_device
from attnlab.core.params import Params
from attnlab.data.tokenizer import load_tokenizer
from attnlab.data.tokens import check_length, eval_starts, load_meta, load_tokens
from attnlab.model.checkpoint import load_model


def evaluate(params: Params, model_path: Path, tokens_dir: Path, tokenizer_dir: Path) -> tuple[dict, str]:
    """Returns (metrics, samples markdown)."""
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
    processor = load_tokenizer(tokenizer_dir)
    samples = samples_markdown(model, processor, params)
    return metrics, samples


def samples_markdown(model, processor, params: Params, title: str = "Samples") -> str:
    cfg = params.eval
    lines = [f"# {title}", "",
             f"{cfg.sample_tokens} tokens per prompt, temperature {cfg.sample_temperature}, "
             f"top-k {cfg.sample_top_k or 'off'}; prompt i is sampled with seed {params.seed} + i.", ""]
    for i, prompt in enumerate(cfg.prompts):
        text = generate(model, processor, prompt, cfg.sample_tokens, cfg.sample_temperature, cfg.sample_top_k,
                        seed=prompt_seed(params.seed, i))
        lines += [f"## Prompt {i + 1}: `{prompt.strip() or repr(prompt)}`", "", "```python", text.rstrip("\n"),
                  "```", ""]
    return "\n".join(lines)

