"""The quality section of `make bench`: attnlab's recipe against the plain reference GPT (benchmarks/reference.py).

Both train on the project's own token files (data/tokens) with the same shape, token budget, batch size and
batch sequence; both are scored by attnlab.scoring on exactly the windows that `evaluate` scores. The
figure that matters is ``quality_vs_reference`` = attnlab val_loss / reference val_loss (goal <= 1.0).

The same run gives the speed of the train stage's loop at that shape (``train_loop_tok_s``: the stage's own
``train()`` with data, schedule, logging and checkpoints, validation left out) against the bare fwd+bwd+AdamW step
of the same model (``train_loop_vs_step``, goal >= 0.95) and against the reference GPT's training loop
(``stage_vs_reference_speed``, goal >= 1.0). These machines' speed drifts by 10-20% over minutes, so whole runs
made one after the other gave ratios 0.2 apart. The three are therefore timed side by side (`Interleaved`): each
window of the stage's loop between two log flushes is followed by as many bare steps and as many reference
steps, and each figure sums its windows, so a drift hits all three alike.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnlab.model.scoring import score_windows, unigram_loss, window_targets
from attnlab.core.device import pick_device
from attnlab.core.params import Params
from attnlab.data.tokens import batch_starts, eval_starts, load_meta, load_tokens, windows
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer
from attnlab.training.loop import Run, TrainPaths, train
from attnlab.training.schedule import autocast_dtype, make_budget
from benchmarks.bench import BenchSetup, sync, train_step_fn
from benchmarks.reference import ReferenceShape, ReferenceTrainer, train_reference

PARTNER_WARMUP = 2  # untimed steps of each partner before its first timed window


class Interleaved:
    """Times the train stage's loop side by side with other training steps, through ``train(on_flush=...)``.

    The loop is timed in the windows between two log flushes (its own host syncs), validation left out. Right
    after each window, each partner runs as many steps as the window had, timed; the partners' order is reversed
    every other window. The first window (set-up and warm-up) is not counted. ``tok_s()`` sums the windows.
    """

    def __init__(self, partners: dict[str, Callable[[int], None]], tokens_per_step: int, device: torch.device):
        self.partners, self.tokens_per_step, self.device = partners, tokens_per_step, device
        self.seconds = {"loop": 0.0, **{name: 0.0 for name in partners}}
        self.steps = 0  # loop steps timed (each partner ran as many)
        self.windows = 0
        self._mark: tuple[float, int, float] | None = None  # (time, steps done, eval seconds) after the last call
        self._partner_step = 0

    def on_flush(self, run: Run) -> None:
        now, done = time.perf_counter(), len(run.rows)
        if self._mark is None:
            for step in self.partners.values():
                for i in range(PARTNER_WARMUP):
                    step(self._partner_step + i)
            self._partner_step += PARTNER_WARMUP
        else:
            mark_time, mark_done, mark_eval = self._mark
            n = done - mark_done
            self.seconds["loop"] += now - mark_time - (run.eval_seconds - mark_eval)
            names = list(self.partners) if self.windows % 2 == 0 else list(reversed(self.partners))
            for name in names:
                start = time.perf_counter()
                for i in range(n):
                    self.partners[name](self._partner_step + i)
                sync(self.device)
                self.seconds[name] += time.perf_counter() - start
            self._partner_step += n
            self.steps += n
            self.windows += 1
        self._mark = (time.perf_counter(), done, run.eval_seconds)

    def tok_s(self) -> dict[str, float]:
        if not self.windows:
            raise RuntimeError("bench: the train loop flushed its log only once; no window to time")
        return {name: self.steps * self.tokens_per_step / seconds for name, seconds in self.seconds.items()}


def bare_step(params: Params, vocab_size: int, batches: list[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device) -> Callable[[int], None]:
    """The bare fwd+bwd+AdamW step (benchmarks/bench.py's train_step_fn) of a fresh copy of the train stage's model,
    at the precision of `params`, cycling over `batches` already on the device: no data, schedule, clipping or
    logging. (On CUDA the stage compiles its model and this step does not.)"""
    torch.manual_seed(params.seed)
    model = Transformer(params.model, vocab_size).to(device)
    step = train_step_fn(model, device, bf16=autocast_dtype(params.train, device) is not None)
    return lambda i: step(*batches[i % len(batches)])


def train_attnlab(params: Params, tokens_dir: str | Path,
                  on_flush: Callable[[Run], None] | None = None) -> tuple[dict, Transformer]:
    """The train stage's own function in a temporary folder: (train.json's metrics, the trained model)."""
    with tempfile.TemporaryDirectory(prefix="attnlab-quality-") as tmp:
        out = Path(tmp)
        paths = TrainPaths(tokens=Path(tokens_dir), model=out / "model.pt", checkpoints=out / "checkpoints",
                           log=out / "log.tsv", val_log=out / "val.tsv", metrics=out / "train.json",
                           snapshots=out / "snapshots")
        metrics = train(params, paths, on_flush=on_flush)
        model, _ = load_model(paths.model, "cpu")
    return metrics, model


def quality_comparison(params: Params, tokens_dir: str | Path, log=print) -> dict:
    """Trains the reference, then attnlab (the train stage's own function) with the bare step and the reference's
    step interleaved; returns the flat bench keys."""
    meta = load_meta(tokens_dir)
    params = dataclasses.replace(
        params, tokenizer=dataclasses.replace(params.tokenizer, vocab_size=int(meta["vocab_size"])),
        train=dataclasses.replace(params.train, device="cpu" if not torch.cuda.is_available() else "auto"),
    )
    m, vocab, device = params.model, params.tokenizer.vocab_size, pick_device(params.train.device)
    budget = make_budget(params, vocab)
    train_tokens, val_tokens = load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val")
    shape = ReferenceShape(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.seq_len)
    batch_size = params.train.batch_size

    log(f"quality: training the reference GPT ({budget.steps} steps of {batch_size} x {m.seq_len})")
    reference, reference_whole_tok_s = train_reference(shape, train_tokens, budget.steps, batch_size, params.seed,
                                                       device=device)
    log("quality: training attnlab; after each window of its loop, as many bare steps and reference steps")

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T) inputs and targets, drawn as the stage draws
        starts = batch_starts(len(train_tokens), m.seq_len, batch_size, params.seed, i)
        x, y = windows(train_tokens, starts, m.seq_len)
        return x.to(device), y.to(device)

    batches = [batch(i) for i in range(4)]
    partner = ReferenceTrainer(shape, train_tokens, budget.steps, batch_size, params.seed + 1, device=device)
    timer = Interleaved({"bare_step": bare_step(params, vocab, batches, device), "reference": partner.step},
                        budget.tokens_per_step, device)
    metrics, model = train_attnlab(params, tokens_dir, on_flush=timer.on_flush)
    speeds = timer.tok_s()

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
        "quality_reference_tok_s": round(reference_whole_tok_s, 1),  # its whole run, alone
        "train_loop_tok_s": round(speeds["loop"], 1),  # the stage's loop without validation, in the timed windows
        "train_loop_eval_seconds": metrics["eval_seconds"],  # the validation time it leaves out
        "train_loop_windows": timer.windows,
        "train_loop_steps_timed": timer.steps,
        "bare_step_tok_s": round(speeds["bare_step"], 1),  # interleaved with the loop's windows
        "reference_loop_tok_s": round(speeds["reference"], 1),  # interleaved with the loop's windows
        "train_loop_vs_step": round(speeds["loop"] / speeds["bare_step"], 4),
        "stage_vs_reference_speed": round(speeds["loop"] / speeds["reference"], 4),
    }


LOOP_STEPS, LOOP_LOG_EVERY = 20, 5  # train stage steps timed at the bench shape, in windows of this many


def train_loop_at_bench_shape(setup: BenchSetup, results: dict) -> dict:
    """The train stage's own loop (attnlab.training.loop.train) for LOOP_STEPS steps at the bench shape, on the
    bench's token stream written as a token folder, interleaved with the bare step of the same model as above:
    ``train_loop_tok_s_bench_shape`` and ``train_loop_vs_step_bench_shape``. The run saves one checkpoint halfway
    (a real run saves one every 10% of thousands of steps; at 10% of 20 steps the 44 MB checkpoint every 2 steps
    would be most of what is timed)."""
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
                                      log_every=LOOP_LOG_EVERY,
                                      checkpoint_every_frac=0.5),  # one mid-run checkpoint, not one every 2 steps
        )
        batches = [setup.batch(i) for i in range(4)]
        timer = Interleaved({"bare_step": bare_step(run_params, setup.vocab_size, batches, setup.device)},
                            setup.tokens_per_step, setup.device)
        train_attnlab(run_params, tokens, on_flush=timer.on_flush)
    speeds = timer.tok_s()
    return {
        "train_loop_tok_s_bench_shape": round(speeds["loop"], 1),
        "bare_step_tok_s_bench_shape": round(speeds["bare_step"], 1),
        "train_loop_vs_step_bench_shape": round(speeds["loop"] / speeds["bare_step"], 4),
    }
