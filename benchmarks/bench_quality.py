"""The quality section of `make bench`: attnlab's recipe against the plain reference GPT (benchmarks/reference.py).

Both train on the project's own token files (data/tokens) with the same shape, token budget, batch size and
batch sequence; both are scored by attnlab.scoring on exactly the windows that `evaluate` scores. The
figure that matters is ``quality_vs_reference`` = attnlab val_loss / reference val_loss (goal <= 1.0).

The same run gives the speed of the train stage's loop at that shape (``train_loop_tok_s``: train.json's
tokens_per_sec, which leaves out the validation passes but keeps data, schedule, logging and checkpoints) against
the bare fwd+bwd+AdamW step of the same model (``train_loop_vs_step``, goal >= 0.95) and against the reference
GPT's bare training loop (``stage_vs_reference_speed``, goal >= 1.0). Each training runs twice, attnlab,
reference, reference, attnlab, between two timings of the bare step, and each figure is the mean of its runs:
on a shared machine speed drifts over minutes, and one run of each in sequence gave ratios 0.2 apart.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from attnlab.analysis.scoring import score_windows, unigram_loss, window_targets
from attnlab.core.device import pick_device
from attnlab.core.params import Params
from attnlab.data.tokens import eval_starts, load_meta, load_tokens
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer
from attnlab.training.loop import TrainPaths, train
from attnlab.training.schedule import autocast_dtype, make_budget
from benchmarks.bench import BenchSetup, side_by_side, train_step_fn
from benchmarks.reference import ReferenceShape, train_reference

STEP_STEPS, STEP_REPS = 10, 3  # the bare step's timing at the quality shape: timed steps per repetition, repetitions


def bare_step_tok_s(params: Params, train_tokens: np.ndarray, steps: int = STEP_STEPS, reps: int = STEP_REPS) -> float:
    """Tokens/s of the bare fwd+bwd+AdamW step (benchmarks/bench.py's train_step_fn) of the train stage's model
    at the shape, batch, device and precision of `params`, on 4 batches already on the device: no data, schedule,
    clipping or logging. (On CUDA the stage compiles its model and this step does not.)"""
    device = pick_device(params.train.device)
    setup = BenchSetup(cfg=params.model, vocab_size=params.tokenizer.vocab_size, batch_size=params.train.batch_size,
                       steps=steps, reps=reps, warmup=2, loss_steps=1, mm_size=1, mm_seconds=1.0, device=device,
                       token_stream=train_tokens, token_source="train.bin", seed=params.seed)
    torch.manual_seed(params.seed)
    model = Transformer(params.model, setup.vocab_size).to(device)
    step = train_step_fn(model, device, bf16=autocast_dtype(params.train, device) is not None)
    batches = [setup.batch(i) for i in range(4)]
    return side_by_side(setup, {"step": lambda i: step(*batches[i % 4])})["step"]


ORDER = ("attnlab", "reference", "reference", "attnlab")


def train_attnlab(params: Params, tokens_dir: str | Path) -> tuple[dict, Transformer]:
    """The train stage's own function in a temporary folder: (train.json's metrics, the trained model)."""
    with tempfile.TemporaryDirectory(prefix="attnlab-quality-") as tmp:
        out = Path(tmp)
        paths = TrainPaths(tokens=Path(tokens_dir), model=out / "model.pt", checkpoints=out / "checkpoints",
                           log=out / "log.tsv", val_log=out / "val.tsv", metrics=out / "train.json",
                           snapshots=out / "snapshots")
        metrics = train(params, paths)
        model, _ = load_model(paths.model, "cpu")
    return metrics, model


def quality_comparison(params: Params, tokens_dir: str | Path, log=print) -> dict:
    """Trains attnlab (the train stage's own function) and the reference; returns the flat bench keys."""
    meta = load_meta(tokens_dir)
    params = dataclasses.replace(
        params, tokenizer=dataclasses.replace(params.tokenizer, vocab_size=int(meta["vocab_size"])),
        train=dataclasses.replace(params.train, device="cpu" if not torch.cuda.is_available() else "auto"),
    )
    m, vocab = params.model, params.tokenizer.vocab_size
    budget = make_budget(params, vocab)
    train_tokens, val_tokens = load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val")
    shape = ReferenceShape(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.seq_len)
    # Speeds drift on a shared machine over minutes, so each training runs twice, in the order attnlab, reference,
    # reference, attnlab, between two timings of the bare step: a drift in either direction hits all three alike.
    step_tok_s, loop_runs, reference_runs = [bare_step_tok_s(params, train_tokens)], [], []
    for who in ORDER:
        if who == "attnlab":
            log(f"quality: training attnlab ({budget.steps} steps of {params.train.batch_size} x {m.seq_len})")
            metrics, model = train_attnlab(params, tokens_dir)
            loop_runs.append(metrics["tokens_per_sec"])
        else:
            log("quality: training the reference GPT")
            reference, tok_s = train_reference(shape, train_tokens, budget.steps, params.train.batch_size,
                                               params.seed, device=pick_device(params.train.device))
            reference_runs.append(tok_s)
    step_tok_s.append(bare_step_tok_s(params, train_tokens))
    loop_tok_s, step_mean = round(statistics.mean(loop_runs), 1), statistics.mean(step_tok_s)
    ref_tok_s = statistics.mean(reference_runs)

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
        "quality_attnlab_tok_s": loop_tok_s,
        "quality_reference_tok_s": round(ref_tok_s, 1),
        "train_loop_tok_s_runs": [round(v, 1) for v in loop_runs],  # in the order of ORDER
        "quality_reference_tok_s_runs": [round(v, 1) for v in reference_runs],
        "train_loop_tok_s": loop_tok_s,  # train.json's tokens_per_sec: the stage's loop without validation
        "train_loop_eval_seconds": metrics["eval_seconds"],  # the validation time it leaves out
        "bare_step_tok_s": round(step_mean, 1),
        "bare_step_tok_s_before_after": [round(v, 1) for v in step_tok_s],
        "train_loop_vs_step": round(loop_tok_s / step_mean, 4),
        "stage_vs_reference_speed": round(loop_tok_s / ref_tok_s, 4),
    }


LOOP_STEPS = 20  # train stage steps timed at the bench shape


def train_loop_at_bench_shape(setup: BenchSetup, results: dict) -> dict:
    """The train stage's own loop (attnlab.training.loop.train) for LOOP_STEPS steps at the bench shape, on the
    bench's token stream written as a token folder: ``train_loop_tok_s_bench_shape`` (train.json's tokens_per_sec,
    validation left out), and against the bare step of the train_fp32 section of the same run. The run saves one
    checkpoint halfway (a real run saves one every 10% of thousands of steps; at 10% of 20 steps the 44 MB
    checkpoint every 2 steps would be most of what is timed)."""
    import json

    params = Params()  # the recipe's defaults; shape, batch and budget from the bench
    with tempfile.TemporaryDirectory(prefix="attnlab-loop-") as tmp:
        out = Path(tmp)
        tokens = out / "tokens"
        tokens.mkdir()
        stream = setup.token_stream.astype(np.uint16)
        split = len(stream) - 4 * setup.cfg.seq_len
        stream[:split].tofile(tokens / "train.bin")
        stream[split:].tofile(tokens / "val.bin")
        meta = {"vocab_size": setup.vocab_size, "eos_id": 1,
                "train": {"tokens": split}, "val": {"tokens": len(stream) - split}}
        (tokens / "meta.json").write_text(json.dumps(meta))
        run_params = dataclasses.replace(
            params, seed=setup.seed, model=setup.cfg,
            tokenizer=dataclasses.replace(params.tokenizer, vocab_size=setup.vocab_size),
            train=dataclasses.replace(params.train, device=str(setup.device), batch_size=setup.batch_size,
                                      micro_batch_size=0, max_tokens=LOOP_STEPS * setup.tokens_per_step,
                                      eval_tokens=setup.cfg.seq_len, precision="fp32", compile=False,
                                      checkpoint_every_frac=0.5),  # one mid-run checkpoint, not one every 2 steps
        )
        loop_tok_s = train_attnlab(run_params, tokens)[0]["tokens_per_sec"]
    step_tok_s = results.get("train_tok_s")
    return {
        "train_loop_tok_s_bench_shape": round(loop_tok_s, 1),
        "train_loop_vs_step_bench_shape": round(loop_tok_s / step_tok_s, 4) if step_tok_s else None,
    }
