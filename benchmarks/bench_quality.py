"""The quality section of `make bench`: attnlab's recipe against the plain reference GPT (benchmarks/reference.py).

Both train on the project's token files with the same shape, token budget, batch size and batch sequence; both
are scored by attnlab's one scoring function, on the same device in fp32, on exactly the windows `evaluate`
scores: ``quality_vs_reference`` = attnlab val_loss / reference val_loss (goal <= 1.0).

The same run times the train stage's loop (its own ``train()`` at its own precision, validation left out)
against the stage's step alone (``train_loop_vs_step``, goal >= 0.95: what the loop's bookkeeping costs) and
against the reference's training loop at its faster precision, fp32 or (where bf16 is native) bf16 autocast
(``stage_vs_reference_speed``, goal >= 1.0). A machine's speed drifts over minutes, so they are timed side by
side (common.LoopTimer): after each window of the loop, as many steps of each of the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnlab.core.cli import run_cli
from attnlab.core.io import write_json
from attnlab.core.params import Params, load_params
from attnlab.model.checkpoint import load_model
from attnlab.model.scoring import Score, score_windows, unigram_loss, window_targets
from attnlab.core.errors import ConfigError
from attnlab.core.progress import progress_bar
from attnlab.data.tokens import eval_starts, load_meta, load_tokens
from attnlab.training.schedule import Budget, make_budget
from benchmarks.common import LoopTimer, loop_speed_keys, reference_steps, stage_step, sync, train_stage
from benchmarks.reference import ReferenceShape, ReferenceTrainer


def log(line: str) -> None:
    print(f"bench quality: {line}", file=sys.stderr)


def quality_comparison(params: Params, tokens: str | Path, reference_bf16: bool = False) -> dict:
    """Trains the reference alone, then attnlab (the train stage's own function) with the stage's step and the
    reference's step (also under bf16 autocast, if reference_bf16) interleaved; scores both; returns the flat
    bench keys."""
    vocab = int(load_meta(tokens)["vocab_size"])
    params = dataclasses.replace(
        params, tokenizer=dataclasses.replace(params.tokenizer, vocab_size=vocab),
        train=dataclasses.replace(params.train, device="cuda" if torch.cuda.is_available() else "cpu"),
    )
    m, device, batch_size = params.model, torch.device(params.train.device), params.train.batch_size
    budget = make_budget(params, vocab)
    train_tokens, val_tokens = load_tokens(tokens, "train"), load_tokens(tokens, "val")
    shape = ReferenceShape(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.seq_len)

    reference, reference_tok_s = train_reference(shape, train_tokens, budget, batch_size, params.seed, device, "fp32")

    log("training attnlab; after each window of its loop, as many stage steps and reference steps")
    with tempfile.TemporaryDirectory(prefix="attnlab-quality-") as tmp:
        partners = {"bare_step": stage_step(params, tokens, Path(tmp)),
                    **reference_steps(shape, train_tokens, budget.steps, batch_size, params.seed + 1, device,
                                      reference_bf16)}
        timer = LoopTimer(partners, device)
        metrics, model = train_stage(params, tokens, on_log=timer)
    speeds = timer.tok_s()

    ours, theirs, unigram = score_both(model.to(device), reference.model, train_tokens, val_tokens, params, vocab)
    return {
        "quality_shape": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, "
                         f"seq {m.seq_len}, vocab {vocab}, {budget.total_tokens:,} tokens, seed {params.seed}",
        "quality_val_tokens": ours.n_tokens,
        "quality_unigram_loss": round(unigram, 4),
        "quality_attnlab_val_loss": round(ours.loss, 4),
        "quality_reference_val_loss": round(theirs.loss, 4),
        "quality_vs_reference": round(ours.loss / theirs.loss, 4),
        "quality_reference_tok_s": round(reference_tok_s, 1),  # its whole run, alone, fp32
        "train_loop_eval_seconds": metrics["eval_seconds"],  # the validation time the loop's speed leaves out
        "train_loop_windows": len(timer.windows),
        "train_loop_steps_timed": sum(w["steps"] for w in timer.windows),
        **loop_speed_keys(speeds, metrics["precision"]),
    }


def train_reference(shape: ReferenceShape, train_tokens, budget: Budget, batch_size: int, seed: int,
                    device: torch.device, precision: str) -> tuple[ReferenceTrainer, float]:
    """The reference GPT trained alone for the budget's steps: (its trainer, tokens/s over the whole run)."""
    log(f"training the reference GPT in {precision} ({budget.steps} steps of {batch_size} x {shape.seq_len})")
    reference = ReferenceTrainer(shape, train_tokens, budget.steps, batch_size, seed, device, precision)
    start = time.perf_counter()
    for i in progress_bar(range(budget.steps), desc="reference", unit="step"):
        reference.step(i)
    sync(device)
    return reference, budget.total_tokens / (time.perf_counter() - start)


def score_both(model, reference, train_tokens, val_tokens, params: Params, vocab: int) -> tuple[Score, Score, float]:
    """attnlab's model and the reference scored (fp32, the reference moved to the model's device) on exactly the
    windows `evaluate` scores at the model's seq_len, and the unigram loss of those targets."""
    seq_len = model.cfg.seq_len
    starts = eval_starts(len(val_tokens), seq_len, params.eval.max_tokens)
    device = next(model.parameters()).device
    ours, theirs = (score_windows(net.to(device), val_tokens, starts, seq_len, params.eval.batch_size)
                    for net in (model, reference))
    return ours, theirs, unigram_loss(train_tokens, window_targets(val_tokens, starts, seq_len), vocab)


def reference_against_model(params: Params, tokens: str | Path, model_path: str | Path, precision: str) -> dict:
    """The reference GPT trained alone (in `precision`, auto = the model's) at the shape, budget, batch size and
    seed of the model file's training run, on its token files; both scored on evaluate's windows in fp32."""
    model, meta = load_model(model_path)
    m, vocab = model.cfg, model.vocab_size
    if int(load_meta(tokens)["vocab_size"]) != vocab:
        raise ConfigError(str(tokens), f"holds tokens of another vocabulary than {model_path} ({vocab})")
    trained = meta.get("train_metrics", {})
    precision = trained.get("precision", "fp32") if precision == "auto" else precision
    budget = make_budget(params, vocab)
    if trained.get("train_tokens") not in (None, budget.total_tokens):
        raise ConfigError(str(model_path), f"trained on {trained['train_tokens']:,} tokens, params.yaml's budget "
                                           f"is {budget.total_tokens:,}: run it with the params it was trained with")
    train_tokens, val_tokens = load_tokens(tokens, "train"), load_tokens(tokens, "val")
    shape = ReferenceShape(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.seq_len)
    reference, reference_tok_s = train_reference(shape, train_tokens, budget, params.train.batch_size, params.seed,
                                                 torch.device("cpu"), precision)
    ours, theirs, unigram = score_both(model, reference.model, train_tokens, val_tokens, params, vocab)
    return {
        "shape": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, seq {m.seq_len}, "
                 f"vocab {vocab}, {budget.total_tokens:,} tokens, batch {params.train.batch_size}, seed {params.seed}",
        "val_tokens": ours.n_tokens,
        "unigram_loss": round(unigram, 4),
        "attnlab_val_loss": round(ours.loss, 4),
        "attnlab_precision": trained.get("precision"),
        "reference_val_loss": round(theirs.loss, 4),
        "reference_precision": precision,
        "attnlab_vs_reference": round(ours.loss / theirs.loss, 4),
        "reference_n_params": sum(p.numel() for p in reference.model.parameters()),
        "reference_tok_s": round(reference_tok_s, 1),
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[-1])
    p.add_argument("--model", default="models/model.pt", help="the train stage's model file")
    p.add_argument("--params", default="params.yaml", help="the params it was trained with")
    p.add_argument("--tokens", default="data/tokens", help="the token files it was trained on")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the reference's; auto = the precision the model trained in")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = reference_against_model(load_params(args.params), args.tokens, args.model, args.precision)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
