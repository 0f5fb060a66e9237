"""attnlab's recipe against the plain reference GPT (benchmarks/reference.py) on the same token files, shape,
budget, batch size and batches, both scored on evaluate's windows: `make bench`'s quality section (with the loop
timed against its step and the reference's, common.LoopTimer) and `make reference-study-cpu` (a model file).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnlab.core.cli import run_cli
from attnlab.core.errors import ConfigError
from attnlab.core.io import write_json
from attnlab.core.params import Params, load_params
from attnlab.core.progress import progress_bar
from attnlab.data.tokens import eval_starts, load_meta, load_tokens
from attnlab.model.checkpoint import load_model
from attnlab.model.scoring import score_windows, unigram_loss, window_targets
from attnlab.model.transformer import Transformer
from attnlab.training.schedule import make_budget
from benchmarks.common import LoopTimer, loop_speed_keys, reference_steps, stage_step, sync, train_stage
from benchmarks.reference import ReferenceTrainer


def log(line: str) -> None:
    print(f"bench quality: {line}", file=sys.stderr)


def quality_comparison(params: Params, tokens: str | Path, reference_bf16: bool = False) -> dict:
    """attnlab trained by the train stage's own function, with the stage's step and the reference's step (also
    under bf16 autocast, if reference_bf16) interleaved; then the reference alone in fp32; both scored. Returns
    the flat bench keys."""
    device = torch.device(params.train.device)
    log("training attnlab; after each window of its loop, as many stage steps and reference steps")
    with tempfile.TemporaryDirectory(prefix="attnlab-quality-") as tmp:
        steps = make_budget(params, params.tokenizer.vocab_size).steps
        partners = {"bare_step": stage_step(params, tokens, Path(tmp)),
                    **reference_steps(params.model, params.tokenizer.vocab_size, load_tokens(tokens, "train"), steps,
                                      params.train.batch_size, params.seed + 1, device, reference_bf16)}
        timer = LoopTimer(partners, device)
        metrics, model = train_stage(params, tokens, on_log=timer)
    scored = against_reference(model.to(device), params, tokens, "fp32")
    return {
        **{f"quality_{key}": scored[key] for key in ("shape", "val_tokens", "unigram_loss", "attnlab_val_loss",
                                                     "reference_val_loss")},
        "quality_vs_reference": scored["attnlab_vs_reference"],
        "quality_reference_tok_s": scored["reference_tok_s"],  # its whole run, alone
        "train_loop_eval_seconds": metrics["eval_seconds"],  # the validation time the loop's speed leaves out
        "train_loop_windows": len(timer.windows),
        "train_loop_steps_timed": sum(w["steps"] for w in timer.windows),
        **loop_speed_keys(timer.tok_s(), metrics["precision"]),
    }


def against_reference(model: Transformer, params: Params, tokens: str | Path, precision: str,
                      progress: bool = False) -> dict:
    """The reference GPT trained alone (in `precision`) on the model's device at its shape and the budget, batch
    size and seed of `params`, on the token files; both scored in fp32 on exactly the windows `evaluate` scores
    at the model's seq_len, beside the unigram loss of those targets."""
    m, vocab, device = model.cfg, model.vocab_size, next(model.parameters()).device
    budget, batch_size = make_budget(params, vocab), params.train.batch_size
    train_tokens, val_tokens = load_tokens(tokens, "train"), load_tokens(tokens, "val")
    log(f"training the reference GPT in {precision} ({budget.steps} steps of {batch_size} x {m.seq_len})")
    reference = ReferenceTrainer(m, vocab, train_tokens, budget.steps, batch_size, params.seed, device, precision)
    start = time.perf_counter()
    for i in progress_bar(range(budget.steps), desc="reference", unit="step"):
        reference.step(i)
    sync(device)
    reference_tok_s = budget.total_tokens / (time.perf_counter() - start)
    starts = eval_starts(len(val_tokens), m.seq_len, params.eval.max_tokens)
    ours, theirs = (score_windows(net, val_tokens, starts, m.seq_len, params.eval.batch_size, progress=progress)
                    for net in (model, reference.model))
    return {
        "shape": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, seq {m.seq_len}, "
                 f"vocab {vocab}, {budget.total_tokens:,} tokens, batch {batch_size}, seed {params.seed}",
        "val_tokens": ours.n_tokens,
        "unigram_loss": round(unigram_loss(train_tokens, window_targets(val_tokens, starts, m.seq_len), vocab), 4),
        "attnlab_val_loss": round(ours.loss, 4),
        "reference_val_loss": round(theirs.loss, 4),
        "reference_precision": precision,
        "attnlab_vs_reference": round(ours.loss / theirs.loss, 4),
        "reference_n_params": sum(p.numel() for p in reference.model.parameters()),
        "reference_tok_s": round(reference_tok_s, 1),
    }


def reference_against_model(params: Params, tokens: str | Path, model_path: str | Path, precision: str) -> dict:
    """against_reference on the CPU for a model file, at the budget of its training run (auto: in the precision
    it trained in); refuses token files of another vocabulary and params of another budget."""
    model, meta = load_model(model_path, "cpu")
    if int(load_meta(tokens)["vocab_size"]) != model.vocab_size:
        raise ConfigError(str(tokens), f"holds tokens of another vocabulary than {model_path} ({model.vocab_size})")
    trained = meta.get("train_metrics", {})
    budget = make_budget(params, model.vocab_size)
    if trained.get("train_tokens") not in (None, budget.total_tokens):
        raise ConfigError(str(model_path), f"trained on {trained['train_tokens']:,} tokens, params.yaml's budget "
                                           f"is {budget.total_tokens:,}: run it with the params it was trained with")
    precision = trained.get("precision", "fp32") if precision == "auto" else precision
    scored = against_reference(model, params, tokens, precision, progress=True)
    return {**scored, "attnlab_precision": trained.get("precision")}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="the reference GPT against a model file (`make reference-study-cpu`)")
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
