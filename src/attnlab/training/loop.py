"""The training loop: set-up, one step, logging and checkpointing, finish.

Runs as one process, or as several under torchrun (DistributedDataParallel): the global batch is the
param, each process takes a disjoint slice of the same global sequence of batches (attnlab.data.tokens), and
only rank 0 logs, evaluates, checkpoints and writes outputs. Batch `step` is a pure function of (seed, step)
and dropout (when model.dropout > 0) is reseeded per step, so a run resumed from a checkpoint — under any
number of processes — takes the same steps as one that never stopped.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from attnlab.core.progress import progress_bar
from attnlab.model.scoring import score_windows, unigram_loss, window_targets
from attnlab.core.device import pick_device
from attnlab.core.errors import AttnlabError, ConfigError
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import Params
from attnlab.data.tokens import batch_starts, check_length, eval_starts, load_meta, load_tokens, rank_slice, windows
from attnlab.model.checkpoint import save_model
from attnlab.model.loss import NextTokenLoss
from attnlab.model.transformer import Transformer, flops_per_token
from attnlab.training.checkpoints import fingerprint, load_checkpoint, save_checkpoint
from attnlab.training.distributed import Dist, check_world, dist_from_env
from attnlab.training.monitor import LOG_COLUMNS, VAL_COLUMNS, LearningWatch, append_log, warn_if_long, write_log
from attnlab.training.schedule import (Budget, autocast, lr_at, make_budget, make_optimizer, precision_choice,
                                      precision_name)
from attnlab.model.snapshots import prune_snapshots, save_snapshot


class TrainingError(AttnlabError):
    pass


@dataclass(frozen=True)
class TrainPaths:
    tokens: Path
    model: Path  # final model file (attnlab.model.checkpoint format)
    checkpoints: Path  # persistent folder: survives a rerun, so a killed run resumes
    log: Path  # per-step TSV for `dvc plots`
    val_log: Path  # validation loss against tokens seen
    metrics: Path  # reports/train.json
    snapshots: Path  # persistent folder: float16 weights at init and every validation point (attnlab.model.snapshots)

    @classmethod
    def under(cls, folder: str | Path, tokens: str | Path) -> TrainPaths:
        """One run's outputs laid out in `folder` (model.pt, checkpoints/, log.tsv, val.tsv, train.json,
        snapshots/), for runs outside the pipeline (benchmarks, tests); the train stage names each path."""
        folder = Path(folder)
        return cls(tokens=Path(tokens), model=folder / "model.pt", checkpoints=folder / "checkpoints",
                   log=folder / "log.tsv", val_log=folder / "val.tsv", metrics=folder / "train.json",
                   snapshots=folder / "snapshots")


@dataclass
class Run:
    """Everything one training run holds: what it reads, what it updates, what it has logged."""

    params: Params
    paths: TrainPaths
    world: Dist
    device: torch.device
    amp: torch.dtype | None
    budget: Budget
    fingerprint: str
    meta: dict
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_starts: np.ndarray  # the periodic validation windows
    model: Transformer
    train_model: torch.nn.Module  # what a step calls: NextTokenLoss(model), (x, y) -> loss; compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    watch: LearningWatch
    start_step: int = 0
    rows: list = field(default_factory=list)  # [step, tokens, loss, lr]
    val_rows: list = field(default_factory=list)  # [step, tokens, val_loss]
    pending: list = field(default_factory=list)  # [(step, lr, loss tensor)] not yet moved to the host
    eval_seconds: float = 0.0
    precision_reason: str = ""  # why the precision is what it is (schedule.precision_choice)
    warned_long: bool = False
    last_checkpoint_time: float = field(default_factory=time.time)

    def log(self, msg: str) -> None:
        if self.world.is_main:
            tqdm.write(f"[train] {msg}", file=sys.stderr)

    @property
    def ckpt_path(self) -> Path:
        return self.paths.checkpoints / "ckpt.pt"


@dataclass(frozen=True)
class LogEvent:
    """What train() hands its `on_log` callback after each log flush, a host sync point: the time between two
    events is the time of the steps between them (plus whatever the callback itself took)."""

    step: int  # steps done
    tokens: int  # training tokens seen (global batch)
    train_seconds: float  # wall time since the loop started, validation excluded
    loss: float  # training loss of the latest step


def train(params: Params, paths: TrainPaths, on_log: Callable[[LogEvent], None] | None = None) -> dict:
    """Trains the model of `params` on the token files; writes the model, logs, metrics; returns the metrics.

    on_log(event), if given, runs after each log flush (every train.log_every steps, and at checkpoints and the
    end) with a LogEvent, e.g. to time windows of steps or to watch the loss.
    """
    run = set_up(params, paths)
    if run.start_step == 0 and run.world.is_main:  # the weights at initialization: attention before any training
        save_snapshot(paths.snapshots, run.model, 0, 0, run.fingerprint)
    cfg = params.train
    ckpt_every = max(1, int(round(cfg.checkpoint_every_frac * run.budget.steps)))
    eval_every = max(1, int(round(cfg.eval_every_frac * run.budget.steps)))
    bar = progress_bar(total=run.budget.steps, initial=run.start_step, unit="step", disable=not run.world.is_main,
               dynamic_ncols=True)
    started, step = time.time(), run.start_step
    run.train_model.train()  # once here, and again after each validation's eval-mode passes
    try:
        for step in range(run.start_step, run.budget.steps):
            run.pending.append((step, lr_at(step, run.budget, cfg), train_step(run, step)))
            bar.update(1)
            done = step + 1
            at_checkpoint = done % ckpt_every == 0
            if len(run.pending) == cfg.log_every or done == run.budget.steps or at_checkpoint:
                flush_logs(run, bar, started)
                if on_log is not None:
                    on_log(LogEvent(done, done * run.budget.tokens_per_step,
                                    time.time() - started - run.eval_seconds, run.rows[-1][2]))
                at_checkpoint = at_checkpoint or time_for_checkpoint(run)
            if done % eval_every == 0 or done == run.budget.steps:
                validate(run, done)
                run.train_model.train()
            if at_checkpoint and done < run.budget.steps:
                checkpoint(run, done)
    except KeyboardInterrupt:
        run.log(f"interrupted at step {step:,}; `dvc repro` resumes from the last checkpoint")
        raise
    finally:
        bar.close()
    return finish(run, time.time() - started)


# --------------------------------------------------------------------------------------------------- set-up


def set_up(params: Params, paths: TrainPaths) -> Run:
    """Checks the inputs, then builds the model and optimizer, resuming from a matching checkpoint."""
    world, cfg = dist_from_env(), params.train
    device = pick_device(cfg.device, world.local_rank)
    backend = check_world(cfg, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), world.world_size)
    meta = load_meta(paths.tokens)
    vocab_size = params.tokenizer.vocab_size
    if meta["vocab_size"] > vocab_size:
        raise ConfigError("tokenizer.vocab_size", f"{vocab_size} is below the tokenizer's {meta['vocab_size']}")
    train_tokens, val_tokens = load_tokens(paths.tokens, "train"), load_tokens(paths.tokens, "val")
    check_length(train_tokens, params.model.seq_len, "train")
    check_length(val_tokens, params.model.seq_len, "val")
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on each step's large buffers, for every caller (attnlab.core.memory)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    budget = make_budget(params, vocab_size)
    amp, why = precision_choice(cfg, params.model, device)
    torch.manual_seed(params.seed)
    model = Transformer(params.model, vocab_size).to(device)
    val_starts = eval_starts(len(val_tokens), params.model.seq_len, cfg.eval_tokens)
    unigram = unigram_loss(train_tokens, window_targets(val_tokens, val_starts, params.model.seq_len), vocab_size)
    run = Run(
        params=params, paths=paths, world=world, device=device, amp=amp, budget=budget,
        fingerprint=fingerprint(params, vocab_size, paths.tokens, precision_name(amp)), meta=meta,
        train_tokens=train_tokens,
        val_tokens=val_tokens, val_starts=val_starts, model=model, train_model=NextTokenLoss(model),
        optimizer=make_optimizer(model, cfg, device), watch=LearningWatch(unigram, budget.steps),
        precision_reason=why,
    )
    run.log(
        f"device {device} ({'bf16 autocast' if run.amp else 'fp32'}: {why}), {world.world_size} process(es); "
        f"{budget.n_params:,} params, {budget.total_tokens:,} tokens = {budget.steps:,} steps of "
        f"{budget.tokens_per_step:,} ({budget.total_tokens / budget.n_params:.1f} tokens/param); "
        f"unigram baseline {unigram:.4f} nats"
    )
    resume(run)
    if device.type == "cuda" and cfg.compile:
        run.train_model = torch.compile(run.train_model)
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.train_model = DDP(run.train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def resume(run: Run) -> None:
    """Loads the checkpoint of an unfinished run of the same fingerprint, if any, and cuts the step log and the
    snapshots back to it; a fresh run removes every snapshot of an earlier run."""
    state = load_checkpoint(run.ckpt_path, run.fingerprint, run.budget.steps, run.log)
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.start_step = int(state["step"])
        run.rows, run.val_rows = [list(r) for r in state["rows"]], [list(r) for r in state["val_rows"]]
        run.log(f"resuming from checkpoint at step {run.start_step:,}/{run.budget.steps:,}")
    if run.world.is_main:
        write_log(run.paths.log, LOG_COLUMNS, run.rows)  # cut back to the checkpoint: no step appears twice
        keep_up_to = run.start_step if state is not None else -1  # a fresh run keeps none, not even step 0
        prune_snapshots(run.paths.snapshots, keep_up_to, run.fingerprint)


# ------------------------------------------------------------------------------------------------ one step


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step on global batch `step` (this process's slice); returns its loss, still on device."""
    cfg, seq_len = run.params.train, run.params.model.seq_len
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, run.budget, cfg)
    if run.params.model.dropout:  # the step's only random draw: reseeded so a resumed run draws the same masks
        torch.manual_seed(run.params.seed * 1_000_003 + step * 101 + run.world.rank)
    starts = rank_slice(batch_starts(len(run.train_tokens), seq_len, cfg.batch_size, run.params.seed, step),
                        run.world.rank, run.world.world_size)
    per_rank = cfg.batch_size // run.world.world_size
    micro = cfg.micro_batch_size or per_rank
    n_micro = per_rank // micro
    step_loss = None
    for m in range(n_micro):
        x, y = windows(run.train_tokens, starts[m * micro : (m + 1) * micro], seq_len)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)  # (b, T) each
        accumulate_only = run.world.world_size > 1 and m < n_micro - 1
        with run.train_model.no_sync() if accumulate_only else nullcontext():
            with autocast(run.device, run.amp):
                loss = run.train_model(x, y) / n_micro  # NextTokenLoss: the forward pass and its loss
            loss.backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss


# ----------------------------------------------------------------------------- logging, validation, checkpoints


def flush_logs(run: Run, bar: tqdm, started: float) -> None:
    """Moves the pending losses to the host (one sync per train.log_every steps) and appends them to the log."""
    losses = torch.stack([loss for _, _, loss in run.pending])  # (n,)
    if run.world.world_size > 1:
        dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    new_rows = []
    for (step, lr, _), loss in zip(run.pending, losses.tolist()):
        if not math.isfinite(loss):
            raise TrainingError(f"train: loss is {loss} at step {step} (lr {lr:.3g}); lower train.lr or "
                                "check the data. Stopping before a broken model is saved")
        new_rows.append([step, (step + 1) * run.budget.tokens_per_step, loss, lr])
    run.rows.extend(new_rows)
    run.pending.clear()
    done = new_rows[-1][0] + 1
    train_seconds = max(1e-9, time.time() - started - run.eval_seconds)
    tok_s = (done - run.start_step) * run.budget.tokens_per_step / train_seconds
    if run.world.is_main:
        append_log(run.paths.log, new_rows)
        bar.set_postfix(loss=f"{new_rows[-1][2]:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)  # drawn at the bar's own pace
    if done - run.start_step >= 2 * run.params.train.log_every and not run.warned_long:  # a measured speed
        warn_if_long(run.log, run.budget, done, run.budget.tokens_per_step / tok_s)
        run.warned_long = True


def time_for_checkpoint(run: Run) -> bool:
    """Every train.checkpoint_every_min minutes; decided by rank 0 and shared, so all ranks agree."""
    minutes = run.params.train.checkpoint_every_min
    due = torch.tensor(float(time.time() - run.last_checkpoint_time > 60 * minutes), device=run.device)
    if run.world.world_size > 1:
        dist.broadcast(due, src=0)
    return bool(due.item())


def validate(run: Run, done: int) -> None:
    """Validation loss on the periodic windows (rank 0, in fp32 as every reported loss), logged against the
    unigram baseline; a weight snapshot."""
    if not run.world.is_main:
        return
    start = time.time()
    per_rank = run.params.train.batch_size // run.world.world_size
    loss = score_windows(run.model, run.val_tokens, run.val_starts, run.params.model.seq_len, per_rank).loss
    run.val_rows.append([done, done * run.budget.tokens_per_step, loss])
    run.log(f"step {done:,}: val loss {loss:.4f} (unigram baseline {run.watch.unigram:.4f})")
    run.watch.check(done, loss, run.log)
    save_snapshot(run.paths.snapshots, run.model, done, done * run.budget.tokens_per_step, run.fingerprint)
    run.eval_seconds += time.time() - start


def checkpoint(run: Run, done: int) -> None:
    if run.world.is_main:
        save_checkpoint(run.ckpt_path, run.model, run.optimizer, done, run.fingerprint, run.rows, run.val_rows)
    run.last_checkpoint_time = time.time()


# -------------------------------------------------------------------------------------------------- finish


def finish(run: Run, elapsed: float) -> dict:
    """The run's metrics; rank 0 writes the final checkpoint, the model, the validation log and train.json."""
    budget, rows, val_rows = run.budget, run.rows, run.val_rows
    trained_tokens = (budget.steps - run.start_step) * budget.tokens_per_step
    train_seconds = max(1e-9, elapsed - run.eval_seconds)
    tokens_per_sec = trained_tokens / train_seconds if trained_tokens else 0.0
    metrics = {
        "device": str(run.device.type),
        "precision": precision_name(run.amp),
        "precision_reason": run.precision_reason,
        "val_precision": "fp32",  # validation scores in fp32 whatever the training precision (model.scoring)
        "world_size": run.world.world_size,
        "n_params": budget.n_params,
        "train_tokens": budget.total_tokens,
        "tokens_per_param": round(budget.total_tokens / budget.n_params, 3),
        "steps": budget.steps,
        "final_train_loss": rows[-1][2] if rows else float("nan"),
        "final_val_loss": val_rows[-1][2] if val_rows else float("nan"),
        "val_tokens_scored": len(run.val_starts) * run.params.model.seq_len,
        "unigram_loss": round(run.watch.unigram, 6),
        "tokens_per_sec": round(tokens_per_sec, 1),  # training only: validation time is eval_seconds
        "mfu_flops_per_sec": round(tokens_per_sec * flops_per_token(run.params.model, budget.n_params), 1),
        "wall_seconds": round(elapsed, 2),
        "eval_seconds": round(run.eval_seconds, 2),
        "resumed_from_step": run.start_step,
    }
    if run.world.is_main:
        save_checkpoint(run.ckpt_path, run.model, run.optimizer, budget.steps, run.fingerprint, rows, val_rows)
        save_model(run.paths.model, run.model, meta={"fingerprint": run.fingerprint, "train_metrics": metrics})
        write_log(run.paths.val_log, VAL_COLUMNS, val_rows)
        write_json(run.paths.metrics, metrics)
        run.log(f"done: {budget.steps:,} steps, {budget.total_tokens:,} tokens in {elapsed:.1f} s "
                f"({tokens_per_sec:,.0f} tokens/s, validation {run.eval_seconds:.1f} s); train loss "
                f"{metrics['final_train_loss']:.4f}, val loss {metrics['final_val_loss']:.4f}")
    if run.world.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics
