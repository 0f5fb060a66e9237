"""`make gpu-check`: one fixed run on a CUDA GPU, whose reports/gpu_check.json fills the GPU section of
docs/performance.md.

    python -m benchmarks.gpu_check              # `make gpu-check`: without CUDA it refuses before doing any work
    python -m benchmarks.gpu_check --dry-run    # `make gpu-check DRY_RUN=1`: the same script on the CPU, tiny shape

What it runs, each part timed (the ``*_seconds`` keys):

1. the data stages: `dvc repro tokenize` when data/tokens is missing (the embedded ~50 MB corpus). The dry run
   builds a tiny corpus of attnlab's own source, its tokenizer and its token files in a temporary folder, with
   the library functions those stages call;
2. ``--steps`` steps of the params.yaml model shape in bf16 with torch.compile (on CUDA), run by the train
   stage's own function (attnlab.training.loop.train) into a temporary folder: tokens/s after the compile
   warm-up, MFU against the dense bf16 peak (the table in benchmarks/bench.py, else a measured bf16 matmul)
   and peak memory;
3. the attention analysis (attnlab.analysis.stats.attention_stats) on the model it trained.

``projected_full_study_minutes`` is the training time of the full study of ``--params`` (its token budget,
211M tokens for the defaults) at the measured tokens/s, validation excluded. The dry run trains the tiny shape
of ``DRY_RUN`` on the CPU: its figures check the script, not a machine.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from typing import Callable
from pathlib import Path

import torch

import attnlab
from attnlab.analysis.stats import attention_stats
from attnlab.core.cli import run_cli
from attnlab.core.errors import AttnlabError, ConfigError
from attnlab.core.io import write_json
from attnlab.core.params import Params, load_params
from attnlab.data.corpus import build_corpus
from attnlab.data.tokenizer import build_tokenizer, tokenize_corpus
from attnlab.data.tokens import load_meta
from attnlab.model.transformer import flops_per_token
from attnlab.training import loop
from attnlab.training.schedule import make_budget
from benchmarks.bench import matmul_flops, table_bf16_peak

TOKENS_DIR = Path("data/tokens")  # what `dvc repro tokenize` writes
STEPS = {False: 300, True: 24}  # default --steps: on the GPU, on the dry run
WARMUP_STEPS = {False: 50, True: 8}  # default --warmup-steps: left out of tokens/s (compile, allocator, clocks)
MATMUL = {"cuda": (8192, 2.0), "cpu": (256, 0.25)}  # n of the n x n bf16 matmul peak, and seconds measuring it
DRY_RUN = {  # params overrides of the dry run: a tiny model on a tiny corpus of attnlab's own source
    "corpus": {"sources": [str(Path(attnlab.__file__).resolve().parent)], "max_mb": 0.5, "val_fraction": 0.2},
    "tokenizer": {"vocab_size": 512, "sample_mb": 0.5},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 32},
    "train": {"batch_size": 4, "eval_tokens": 1024, "log_every": 4},  # bf16 on a CPU without it is slow
    "attention": {"n_examples": 4, "batch_size": 4, "seq_len_filter": [8, 16]},
}


class GpuCheckError(AttnlabError):
    """The check cannot run here: one line, exit status 1."""


def log(line: str) -> None:
    print(f"gpu-check: {line}", file=sys.stderr, flush=True)


def require_cuda(dry_run: bool) -> None:
    """Refuse at once (before any data, model or file) when there is no CUDA device and this is no dry run."""
    if dry_run or torch.cuda.is_available():
        return
    raise GpuCheckError(
        f"gpu-check: CUDA is needed, and torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() "
        "is False); `make gpu-check DRY_RUN=1` runs the same script on the CPU at a tiny shape"
    )


# ------------------------------------------------------------------------------------------------ the parts


def build_data(params: Params, dry_run: bool, tmp: Path) -> Path:
    """The token folder: data/tokens (built by `dvc repro tokenize` when missing), or the dry run's tiny one."""
    if dry_run:
        build_corpus(params.corpus, tmp / "corpus")
        build_tokenizer(tmp / "corpus", params.tokenizer, params.tokenizer.seed, tmp / "tokenizer")
        tokenize_corpus(tmp / "corpus", tmp / "tokenizer", tmp / "tokens")
        return tmp / "tokens"
    if not (TOKENS_DIR / "train.bin").exists():
        log(f"{TOKENS_DIR} is missing: running `dvc repro tokenize` (corpus, tokenizer, tokenize)")
        status = subprocess.run([sys.executable, "-m", "dvc", "repro", "tokenize"], check=False).returncode
        if status != 0:
            raise GpuCheckError(f"gpu-check: `dvc repro tokenize` failed (exit status {status}); see its output above")
    return TOKENS_DIR


def run_params(args: argparse.Namespace, base: Params, vocab_size: int) -> Params:
    """The params of the timed run: the shape of `base`, bf16, torch.compile, a budget of args.steps steps.

    One validation (at the end) and no checkpoint before the last: a few hundred steps are a few percent of the
    full study (about 12,900 steps by default), so its cadence (every 10% of the run) would weigh them tens of
    times more here than there. Validation is left out of tokens/s anyway (train.json's eval_seconds).
    """
    overrides = copy.deepcopy(DRY_RUN) if args.dry_run else {}
    overrides.setdefault("tokenizer", {})["vocab_size"] = vocab_size  # the token files' own vocabulary
    overrides.setdefault("train", {}).update(
        device="cpu" if args.dry_run else "cuda", precision="bf16", compile=True, nproc_per_node=1,
        max_tokens=args.steps * base.train.batch_size * base.model.seq_len,
        eval_every_frac=1.0, checkpoint_every_frac=1.0,
    )
    return load_params(args.params, overrides)


def flush_marks() -> tuple[list[tuple[float, int, float]], Callable[[loop.Run], None]]:
    """A list and the train() on_flush callback that fills it with (time, steps done, validation seconds so far).

    train.json's tokens_per_sec averages over the whole run, so on CUDA it includes torch.compile's first
    step (tens of seconds). Each flush moves the pending losses to the host, a sync point, so the time
    between two flushes is the time of the steps between them: the tokens/s of a window that starts after the
    warm-up is the steady throughput of the very same loop.
    """
    marks: list[tuple[float, int, float]] = []

    def record(run: loop.Run) -> None:
        marks.append((time.time(), int(run.rows[-1][0]) + 1, run.eval_seconds))

    return marks, record


def steady_throughput(marks: list[tuple[float, int, float]], tokens_per_step: int, warmup_steps: int) -> dict:
    """Tokens/s from the first flush at or after `warmup_steps` to the last one, validation time taken out."""
    first = next((mark for mark in marks if mark[1] >= warmup_steps), None)
    if first is None or marks[-1][1] <= first[1]:
        raise GpuCheckError(f"gpu-check: no log flush after the {warmup_steps} warm-up steps to time; "
                            "raise --steps or lower --warmup-steps")
    last = marks[-1]
    seconds = (last[0] - first[0]) - (last[2] - first[2])
    return {"tokens_per_sec": (last[1] - first[1]) * tokens_per_step / seconds,
            "timed_steps": last[1] - first[1], "window_start": first}


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated, training"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "max RSS of the process (no allocator peak on CPU)"


def train_timed(params: Params, tokens_dir: Path, tmp: Path, warmup_steps: int) -> dict:
    """Trains with the train stage's own function; its metrics plus the steady tokens/s and peak memory."""
    device = torch.device(params.train.device)
    paths = loop.TrainPaths(tokens=tokens_dir, model=tmp / "model.pt", checkpoints=tmp / "checkpoints",
                            log=tmp / "train_log.tsv", val_log=tmp / "val_log.tsv", metrics=tmp / "train.json",
                            snapshots=tmp / "snapshots")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    marks, record = flush_marks()
    metrics = loop.train(params, paths, on_flush=record)
    seconds = time.time() - start
    memory, memory_source = peak_memory_mb(device)
    per_step = params.train.batch_size * params.model.seq_len
    steady = steady_throughput(marks, per_step, warmup_steps)
    t0, done0, eval0 = steady["window_start"]
    return {
        "metrics": metrics, "model": paths.model, "train_seconds": seconds,
        "tokens_per_sec": steady["tokens_per_sec"], "timed_steps": steady["timed_steps"],
        # set-up (token files, unigram baseline, model) and compilation: the time before the window beyond
        # what its steps take at the steady speed
        "startup_and_compile_seconds": (t0 - start - eval0) - done0 * per_step / steady["tokens_per_sec"],
        "peak_memory_mb": memory, "peak_memory_source": memory_source,
    }


def peak_flops(device: torch.device) -> dict:
    """The bf16 peak MFU is measured against: the dense table (benchmarks/bench.py), else a measured matmul."""
    n, seconds = MATMUL[device.type]
    start = time.perf_counter()
    measured = matmul_flops(device, torch.bfloat16, n, seconds)
    table = table_bf16_peak(device)
    return {"peak_flop_s": table or measured, "peak_source": "table (dense bf16)" if table else "measured bf16 matmul",
            "matmul_peak_bf16_flop_s": measured, "matmul_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ the report


def report(args: argparse.Namespace, params: Params, study: Params, timed: dict, peak: dict, analysis: dict,
           seconds: dict) -> dict:
    metrics, m = timed["metrics"], params.model
    device = torch.device(params.train.device)
    flops = flops_per_token(m, metrics["n_params"])
    study_tokens = make_budget(study, study.tokenizer.vocab_size).total_tokens
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dry_run": args.dry_run,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "shape": {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                  "seq_len": m.seq_len, "pe": m.pe, "batch_size": params.train.batch_size,
                  "vocab_size": params.tokenizer.vocab_size},
        "n_params": metrics["n_params"],
        "precision": metrics["precision"],
        "compiled": device.type == "cuda" and params.train.compile,
        "steps": metrics["steps"],
        "timed_steps": timed["timed_steps"],
        "tokens_per_sec": round(timed["tokens_per_sec"], 1),  # steady: after --warmup-steps, without validation
        "tokens_per_sec_train_json": metrics["tokens_per_sec"],  # the stage's own figure: warm-up included
        "flops_per_token": flops,
        "achieved_flop_s": timed["tokens_per_sec"] * flops,
        "peak_flop_s": peak["peak_flop_s"],
        "peak_source": peak["peak_source"],
        "matmul_peak_bf16_flop_s": peak["matmul_peak_bf16_flop_s"],
        "mfu": timed["tokens_per_sec"] * flops / peak["peak_flop_s"],
        "peak_memory_mb": round(timed["peak_memory_mb"], 1),
        "peak_memory_source": timed["peak_memory_source"],
        "final_train_loss": metrics["final_train_loss"],
        "final_val_loss": metrics["final_val_loss"],
        "attention_rows": analysis["n_rows"],
        "full_study_tokens": study_tokens,
        "projected_full_study_minutes": study_tokens / timed["tokens_per_sec"] / 60,
        "startup_and_compile_seconds": round(timed["startup_and_compile_seconds"], 2),
        **{f"{name}_seconds": round(value, 2) for name, value in seconds.items()},
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reports/gpu_check.json")
    p.add_argument("--params", default="params.yaml", help="the study: its shape is trained, its budget projected")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="on the CPU at a tiny shape, no CUDA")
    p.add_argument("--steps", type=int, help=f"training steps (default {STEPS[False]}; dry run {STEPS[True]})")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int,
                   help=f"first steps left out of tokens/s (default {WARMUP_STEPS[False]}; dry run {WARMUP_STEPS[True]})")
    args = p.parse_args(argv)
    args.steps = STEPS[args.dry_run] if args.steps is None else args.steps
    args.warmup_steps = WARMUP_STEPS[args.dry_run] if args.warmup_steps is None else args.warmup_steps
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    require_cuda(args.dry_run)
    started = time.perf_counter()
    study = load_params(args.params)  # the full study, whose budget is projected
    base = load_params(args.params, DRY_RUN if args.dry_run else None)
    if args.warmup_steps < 0 or args.steps < args.warmup_steps + 2 * base.train.log_every:
        raise ConfigError("--steps", f"{args.steps} leaves no timed window after --warmup-steps {args.warmup_steps} "
                                     f"(needs at least --warmup-steps + 2 x train.log_every={base.train.log_every})")
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="attnlab-gpu-check-") as folder:
        tmp = Path(folder)
        start = time.perf_counter()
        tokens_dir = build_data(base, args.dry_run, tmp)
        seconds["data"] = time.perf_counter() - start
        params = run_params(args, base, int(load_meta(tokens_dir)["vocab_size"]))
        peak = peak_flops(torch.device(params.train.device))
        seconds["matmul_peak"] = peak["matmul_seconds"]
        log(f"training {args.steps} steps of {params.train.batch_size} x {params.model.seq_len} tokens in bf16")
        timed = train_timed(params, tokens_dir, tmp, args.warmup_steps)
        seconds["train"] = timed["train_seconds"]
        start = time.perf_counter()
        analysis = attention_stats(params, timed["model"], tokens_dir, tmp / "attention")
        seconds["analysis"] = time.perf_counter() - start
        seconds["wall"] = time.perf_counter() - started
        results = report(args, params, study, timed, peak, analysis, seconds)
    write_json(args.out, results)
    print(f"gpu-check on {results['device']}: {results['tokens_per_sec']:,.0f} tokens/s, MFU {results['mfu']:.1%} "
          f"({results['peak_source']}), peak memory {results['peak_memory_mb']:,.0f} MB; the full study "
          f"({results['full_study_tokens']:,} tokens) would train in {results['projected_full_study_minutes']:,.1f} "
          f"min; {results['wall_seconds']:.0f} s in all -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
