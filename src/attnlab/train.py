"""The training loop: device, budget, AdamW with warmup + cosine, checkpoints that resume exactly.

Runs as one process, or as several under torchrun (DistributedDataParallel): the global batch is the
param, each process takes a disjoint slice of the same global sequence of batches (attnlab.data), and only
rank 0 logs, evaluates, checkpoints and writes outputs. Batch `step` is a pure function of (seed, step) and
dropout is reseeded per step, so a run resumed from a checkpoint — under any number of processes — takes
the same steps as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from attnlab.checkpoint import save_model, unwrap
from attnlab.config import AttnlabError, ConfigError, Params, TrainConfig
from attnlab.data import batch_starts, check_length, eval_starts, load_meta, load_tokens, rank_slice, windows
from attnlab.device import pick_device
from attnlab.io import atomic_path, write_json
from attnlab.model import Transformer, count_parameters, flops_per_token, lm_loss
from attnlab.scoring import autocast, score_windows, unigram_loss, window_targets

LOG_COLUMNS = ("step", "tokens", "loss", "lr")
KILL_ENV = "ATTNLAB_KILL_AT_STEP"  # test hook: SIGKILL this process right after that step, as a dying machine


class TrainingError(AttnlabError):
    pass


# ------------------------------------------------------------------------------------------ device, dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain process is rank 0 of 1."""
    return Dist(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def check_world(cfg: TrainConfig, device: torch.device, nproc_per_node: int, world_size: int) -> str:
    """Refuse bad process/device/backend combinations before any work starts; returns the backend."""
    if nproc_per_node > 1 and device.type == "cuda" and nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            "train.nproc_per_node",
            f"{nproc_per_node} processes per node but only {torch.cuda.device_count()} GPU(s) on this machine",
        )
    if world_size > 1 and device.type == "mps":
        raise ConfigError("train.nproc_per_node", "data-parallel training is not supported on MPS; use 1")
    if cfg.batch_size % world_size:
        raise ConfigError("train.batch_size", f"{cfg.batch_size} is not divisible by the {world_size} processes")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("train.backend", f"nccl needs CUDA devices, but training runs on {device.type}; use gloo")
    return backend


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked for (auto: on CUDA that supports it); None = plain fp32."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ------------------------------------------------------------------------------------- budget, optimiser


@dataclass(frozen=True)
class Budget:
    n_params: int
    total_tokens: int
    steps: int
    tokens_per_step: int
    warmup_steps: int


def make_budget(params: Params, vocab_size: int) -> Budget:
    cfg = params.train
    n_params = count_parameters(params.model, vocab_size)
    total = cfg.max_tokens or int(cfg.tokens_per_param * n_params)
    per_step = cfg.batch_size * params.model.seq_len
    steps = max(1, total // per_step)
    return Budget(n_params, steps * per_step, steps, per_step, warmup_steps(cfg, steps))


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """warmup_frac of the run, but at least train.warmup_steps, and never more than half the run.

    The floor matters for short runs: 2% of a 1,000-step run is 19 steps, too few for a post-norm model at
    lr 3e-3, which then sits at the unigram loss for hundreds of steps (docs/training.md).
    """
    return min(max(int(cfg.warmup_frac * steps), cfg.warmup_steps), steps // 2)


def lr_at(step: int, budget: Budget, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay that reaches cfg.lr * min_lr_ratio at the last step.

    Steps run from 0 to budget.steps - 1: the first step after warmup has the peak lr, the last one the floor.
    """
    if step < budget.warmup_steps:
        return cfg.lr * (step + 1) / budget.warmup_steps
    span = max(1, budget.steps - 1 - budget.warmup_steps)
    progress = min(1.0, (step - budget.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def decays(name: str, decay_embedding: bool) -> bool:
    """Whether AdamW decays the parameter of this name: weight matrices yes; biases (the non-linear heads'
    2-D `mlp_*_bias` too), LayerNorm weights and positional tables no; the token embedding if asked."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("bias") or ".ln" in f".{name}" or name.startswith("pos_emb"):
        return False
    if name.startswith("tok_emb"):
        return decay_embedding
    return leaf.endswith("weight")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay chosen by parameter name (see `decays`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decays(n, cfg.decay_embedding)]
    no_decay = [p for n, p in named if not decays(n, cfg.decay_embedding)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)


def fingerprint(params: Params, vocab_size: int, tokens_meta: dict) -> str:
    """What a checkpoint must match to be resumed: everything that changes the optimisation."""
    train = dataclasses.asdict(params.train)
    for key in ("device", "compile", "log_every", "checkpoint_every_frac", "checkpoint_every_min",
                "nproc_per_node", "backend", "micro_batch_size", "eval_every_frac", "eval_tokens"):
        train.pop(key)
    blob = {
        "seed": params.seed,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "vocab_size": vocab_size,
        "tokens": {s: tokens_meta[s]["tokens"] for s in ("train", "val")},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, optimizer, step: int, fp: str, rows: list, val_rows: list) -> None:
    state = {
        "fingerprint": fp,
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "rows": rows,
        "val_rows": val_rows,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fp: str, log) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is not a reason to lose the run: start fresh
        log(f"checkpoint {path} is unreadable ({exc.__class__.__name__}); starting fresh")
        return None
    if state.get("fingerprint") != fp:
        log(f"checkpoint {path} is from other params or data; starting fresh")
        return None
    return state


# ------------------------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainPaths:
    tokens: Path
    model: Path  # final model file (attnlab.checkpoint format)
    checkpoints: Path  # persistent folder: survives a rerun, so a killed run resumes
    log: Path  # per-step TSV for `dvc plots`
    val_log: Path  # validation loss against tokens seen
    metrics: Path  # reports/train.json


def train(params: Params, paths: TrainPaths) -> dict:
    world = dist_from_env()
    cfg = params.train
    device = pick_device(cfg.device, world.local_rank)
    backend = check_world(cfg, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), world.world_size)
    meta = load_meta(paths.tokens)
    vocab_size = params.tokenizer.vocab_size
    if meta["vocab_size"] > vocab_size:
        raise ConfigError("tokenizer.vocab_size", f"{vocab_size} is below the tokenizer's {meta['vocab_size']}")
    train_tokens = load_tokens(paths.tokens, "train")
    val_tokens = load_tokens(paths.tokens, "val")
    check_length(train_tokens, params.model.seq_len, "train")
    check_length(val_tokens, params.model.seq_len, "val")
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def log(msg: str) -> None:
        if world.is_main:
            tqdm.write(f"[train] {msg}", file=sys.stderr)

    budget = make_budget(params, vocab_size)
    amp = autocast_dtype(cfg, device)
    fp = fingerprint(params, vocab_size, meta)
    per_rank = cfg.batch_size // world.world_size
    micro = cfg.micro_batch_size or per_rank
    n_micro = per_rank // micro
    log(
        f"device {device} ({'bf16 autocast' if amp else 'fp32'}), {world.world_size} process(es); "
        f"{budget.n_params:,} params, {budget.total_tokens:,} tokens = {budget.steps:,} steps of "
        f"{budget.tokens_per_step:,} ({budget.total_tokens / budget.n_params:.1f} tokens/param)"
    )

    torch.manual_seed(params.seed)
    model = Transformer(params.model, vocab_size).to(device)
    optimizer = make_optimizer(model, cfg, device)
    ckpt_path = paths.checkpoints / "ckpt.pt"
    rows: list[list[float]] = []
    val_rows: list[list[float]] = []
    start_step = 0
    state = load_checkpoint(ckpt_path, fp, log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        rows, val_rows = [list(r) for r in state["rows"]], [list(r) for r in state["val_rows"]]
        log(f"resuming from checkpoint at step {start_step:,}/{budget.steps:,}")
    if world.is_main:
        _write_log(paths.log, LOG_COLUMNS, rows)  # cut back to the checkpoint: no step appears twice

    train_model: torch.nn.Module = model
    if device.type == "cuda" and cfg.compile:
        train_model = torch.compile(model)
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    val_starts = eval_starts(len(val_tokens), params.model.seq_len, cfg.eval_tokens)
    unigram = unigram_loss(train_tokens, window_targets(val_tokens, val_starts, params.model.seq_len), vocab_size)
    watch = LearningWatch(unigram, budget.steps)
    ckpt_every = max(1, int(round(cfg.checkpoint_every_frac * budget.steps)))
    eval_every = max(1, int(round(cfg.eval_every_frac * budget.steps)))
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    pending = torch.zeros(cfg.log_every, device=device)  # losses of steps not yet logged (no host sync)
    pending_steps: list[tuple[int, float]] = []
    t0, timed_tokens = time.time(), 0
    last_ckpt_time, first_flush = t0, None
    bar = tqdm(total=budget.steps, initial=start_step, unit="step", disable=not world.is_main, dynamic_ncols=True)

    def flush_logs() -> None:
        """Move the pending losses to the host (one sync per log_every steps) and append them to the log."""
        if world.world_size > 1:
            dist.all_reduce(pending, op=dist.ReduceOp.AVG)
        values = pending[: len(pending_steps)].tolist()
        new_rows = []
        for (s, lr), loss in zip(pending_steps, values):
            if not math.isfinite(loss):
                raise TrainingError(f"train: loss is {loss} at step {s} (lr {lr:.3g}); lower train.lr or "
                                    "check the data. Stopping before a broken model is saved")
            new_rows.append([s, (s + 1) * budget.tokens_per_step, loss, lr])
        rows.extend(new_rows)
        pending_steps.clear()
        if world.is_main:
            _append_log(paths.log, new_rows)
            bar.set_postfix(loss=f"{values[-1]:.3f}", tok_s=f"{timed_tokens / (time.time() - t0):,.0f}")

    def time_for_checkpoint() -> bool:
        """Every checkpoint_every_min minutes; decided by rank 0 and shared, so all ranks agree."""
        due = torch.tensor(float(time.time() - last_ckpt_time > 60 * cfg.checkpoint_every_min), device=device)
        if world.world_size > 1:
            dist.broadcast(due, src=0)
        return bool(due.item())

    step = start_step
    try:
        for step in range(start_step, budget.steps):
            lr = lr_at(step, budget, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(params.seed * 1_000_003 + step * 101 + world.rank)  # dropout, same on resume
            starts = rank_slice(batch_starts(len(train_tokens), params.model.seq_len, cfg.batch_size,
                                             params.seed, step), world.rank, world.world_size)
            train_model.train()
            step_loss = torch.zeros((), device=device)
            for m in range(n_micro):
                x, y = windows(train_tokens, starts[m * micro : (m + 1) * micro], params.model.seq_len)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (b, T) each
                accumulate_only = world.world_size > 1 and m < n_micro - 1
                with train_model.no_sync() if accumulate_only else nullcontext():
                    with autocast(device, amp):
                        logits = train_model(x)  # (b, T, V)
                    loss = lm_loss(logits, y) / n_micro
                    loss.backward()
                step_loss += loss.detach()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending[len(pending_steps)] = step_loss
            pending_steps.append((step, lr))
            timed_tokens += budget.tokens_per_step
            bar.update(1)
            done = step + 1
            at_checkpoint = done % ckpt_every == 0
            if len(pending_steps) == cfg.log_every or done == budget.steps or at_checkpoint:
                flush_logs()
                if first_flush is None:
                    first_flush = (time.time(), done)
                elif first_flush[1] is not None:  # warn once, from the measured speed, if the run is long
                    sec_per_step = (time.time() - first_flush[0]) / (done - first_flush[1])
                    _warn_if_long(log, budget, done, sec_per_step)
                    first_flush = (first_flush[0], None)
                at_checkpoint = at_checkpoint or time_for_checkpoint()
            if world.is_main and (done % eval_every == 0 or done == budget.steps):
                val_loss = score_windows(model, val_tokens, val_starts, params.model.seq_len, per_rank, amp).loss
                val_rows.append([done, done * budget.tokens_per_step, val_loss])
                log(f"step {done:,}: val loss {val_loss:.4f} (unigram baseline {unigram:.4f})")
                watch.check(done, val_loss, log)
            if at_checkpoint and done < budget.steps:
                if world.is_main:
                    save_checkpoint(ckpt_path, model, optimizer, done, fp, rows, val_rows)
                last_ckpt_time = time.time()
            if kill_at and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        log(f"interrupted at step {step:,}; `dvc repro` resumes from the last checkpoint")
        raise
    finally:
        bar.close()

    elapsed = time.time() - t0
    tokens_per_sec = timed_tokens / max(1e-9, elapsed) if timed_tokens else 0.0
    metrics = {
        "device": str(device.type),
        "precision": "bf16" if amp else "fp32",
        "world_size": world.world_size,
        "n_params": budget.n_params,
        "train_tokens": budget.total_tokens,
        "tokens_per_param": round(budget.total_tokens / budget.n_params, 3),
        "steps": budget.steps,
        "final_train_loss": rows[-1][2] if rows else float("nan"),
        "final_val_loss": val_rows[-1][2] if val_rows else float("nan"),
        "val_tokens_scored": len(val_starts) * params.model.seq_len,
        "unigram_loss": round(unigram, 6),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu_flops_per_sec": round(tokens_per_sec * flops_per_token(params.model, budget.n_params), 1),
        "wall_seconds": round(elapsed, 2),
        "resumed_from_step": start_step,
    }
    if world.is_main:
        save_checkpoint(ckpt_path, model, optimizer, budget.steps, fp, rows, val_rows)
        save_model(paths.model, model, meta={"fingerprint": fp, "train_metrics": metrics})
        _write_log(paths.val_log, ("step", "tokens", "val_loss"), val_rows)
        write_json(paths.metrics, metrics)
        log(f"done: {budget.steps:,} steps, {budget.total_tokens:,} tokens in {elapsed:.1f} s "
            f"({tokens_per_sec:,.0f} tokens/s); train loss {metrics['final_train_loss']:.4f}, "
            f"val loss {metrics['final_val_loss']:.4f}")
    if world.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


class LearningWatch:
    """Warns once when, past 30% of the budget, the validation loss is still within 0.1 nats of the unigram
    baseline: the model has learned token frequencies and nothing else."""

    FROM_FRAC = 0.3
    MARGIN = 0.1

    def __init__(self, unigram: float, steps: int):
        self.unigram, self.steps, self.warned = unigram, steps, False

    def check(self, done: int, val_loss: float, log) -> bool:
        if self.warned or done < self.FROM_FRAC * self.steps:
            return False
        if val_loss < self.unigram - self.MARGIN:
            return False
        self.warned = True
        log(f"warning: not learning: at step {done:,} of {self.steps:,} the validation loss {val_loss:.3f} is "
            f"within {self.MARGIN} nats of the unigram baseline {self.unigram:.3f}. Likely causes: train.lr too "
            "high or too low, too short a warmup (train.warmup_frac, train.warmup_steps), or a post-norm model "
            "(model.norm: post) that needs more warmup than pre-norm")
        return True


def _warn_if_long(log, budget: Budget, done: int, sec_per_step: float) -> None:
    eta = sec_per_step * (budget.steps - done)
    if eta > 30 * 60:
        log(f"at the measured {sec_per_step:.2f} s/step this run needs about {eta / 3600:.1f} more hours. "
            "For a quick look on this machine, stop it (Ctrl-C keeps a checkpoint) and run `make quick`.")


def _write_log(path: Path, columns, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("\t".join(columns) + "\n")
            for row in rows:
                f.write("\t".join(_fmt(v) for v in row) + "\n")


def _append_log(path: Path, rows) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write("\t".join(_fmt(v) for v in row) + "\n")


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
