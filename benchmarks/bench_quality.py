"""The quality section of `make bench`: attnlab's recipe against the plain reference GPT (benchmarks/reference.py).

Both train on the project's own token files (data/tokens) with the same shape, token budget, batch size and
batch sequence; both are scored by attnlab.scoring on exactly the windows that `evaluate` scores. The
figure that matters is ``quality_vs_reference`` = attnlab val_loss / reference val_loss (goal <= 1.0).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from attnlab.analysis.scoring import score_windows, unigram_loss, window_targets
from attnlab.core.params import Params
from attnlab.data.tokens import eval_starts, load_meta, load_tokens
from attnlab.model.checkpoint import load_model
from attnlab.training.loop import TrainPaths, train
from attnlab.training.schedule import make_budget
from benchmarks.reference import ReferenceShape, train_reference


def quality_comparison(params: Params, tokens_dir: str | Path, log=print) -> dict:
    """Trains attnlab (the train stage's own function) and the reference; returns the flat bench keys."""
    meta = load_meta(tokens_dir)
    params = dataclasses.replace(
        params, tokenizer=dataclasses.replace(params.tokenizer, vocab_size=int(meta["vocab_size"])),
        train=dataclasses.replace(params.train, device="cpu" if not torch.cuda.is_available() else "auto"),
    )
    m, vocab = params.model, params.tokenizer.vocab_size
    budget = make_budget(params, vocab)
    with tempfile.TemporaryDirectory(prefix="attnlab-quality-") as tmp:
        out = Path(tmp)
        paths = TrainPaths(tokens=Path(tokens_dir), model=out / "model.pt", checkpoints=out / "checkpoints",
                           log=out / "log.tsv", val_log=out / "val.tsv", metrics=out / "train.json")
        log(f"quality: training attnlab ({budget.steps} steps of {params.train.batch_size} x {m.seq_len})")
        metrics = train(params, paths)
        model, _ = load_model(paths.model, "cpu")
    train_tokens, val_tokens = load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val")
    shape = ReferenceShape(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.seq_len)
    log("quality: training the reference GPT")
    reference, ref_tok_s = train_reference(shape, train_tokens, budget.steps, params.train.batch_size, params.seed)

    starts = eval_starts(len(val_tokens), m.seq_len, params.eval.max_tokens)
    ours = score_windows(model, val_tokens, starts, m.seq_len, params.eval.batch_size)
    theirs = score_windows(reference, val_tokens, starts, m.seq_len, params.eval.batch_size)
    unigram = unigram_loss(train_tokens, window_targets(val_tokens, starts, m.seq_len), vocab)
    return {
        "quality_shape": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, "
                         f"seq {m.seq_len}, vocab {vocab}, {budget.total_tokens:,} tokens, seed {params.seed}",
        "quality_val_tokens": ours.n_tokens,
        "quality_unigram_loss": round(unigram, 4),
        "quality_attnlab_val_loss": round(ours.loss, 4),
        "quality_reference_val_loss": round(theirs.loss, 4),
        "quality_vs_reference": round(ours.loss / theirs.loss, 4),
        "quality_attnlab_tok_s": metrics["tokens_per_sec"],
        "quality_reference_tok_s": round(ref_tok_s, 1),
    }
