"""`make gpu-check`: one fixed run on a CUDA GPU, whose reports/gpu_check.json fills the GPU section of
docs/performance.md: the data stages (`dvc repro tokenize` where data/tokens is missing), --steps steps of the
params' model in bf16 with torch.compile by the train stage's own function (steady tokens/s after
--warmup-steps, MFU, peak memory, the full study's budget projected), then the attention analysis on that model.
Without CUDA it refuses before any work; --dry-run (`make gpu-check DRY_RUN=1`) runs the same script on the CPU
at a tiny shape on synthetic tokens, which checks the script, not a machine.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnlab.analysis.stats import attention_stats
from attnlab.core.cli import run_cli
from attnlab.core.errors import AttnlabError, ConfigError
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import Params, load_params
from attnlab.data.tokens import load_meta
from attnlab.model.transformer import flops_per_token
from attnlab.training import loop
from attnlab.training.schedule import make_budget
from benchmarks.common import LoopTimer, matmul_flops, peak_rss_mb, synthetic_tokens, table_bf16_peak

TOKENS_DIR = Path("data/tokens")  # what `dvc repro tokenize` writes
STEPS = {False: 300, True: 24}  # default --steps: on the GPU, on the dry run
WARMUP_STEPS = {False: 50, True: 8}  # default --warmup-steps: left out of tokens/s (compile, allocator, clocks)
MATMUL = {"cuda": (8192, 2.0), "cpu": (256, 0.25)}  # n of the n x n bf16 matmul peak, and seconds measuring it
DRY_RUN = {  # params overrides of the dry run: a tiny model on synthetic tokens
    "tokenizer": {"vocab_size": 512},
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


def build_data(params: Params, dry_run: bool, tmp: Path) -> Path:
    """The token folder: data/tokens (built by `dvc repro tokenize` when missing), or the dry run's synthetic one."""
    if dry_run:
        return synthetic_tokens(tmp / "tokens", params.tokenizer.vocab_size, 1 << 16, params.model.seq_len, params.seed)
    if not (TOKENS_DIR / "train.bin").exists():
        log(f"{TOKENS_DIR} is missing: running `dvc repro tokenize` (corpus, tokenizer, tokenize)")
        status = subprocess.run([sys.executable, "-m", "dvc", "repro", "tokenize"], check=False).returncode
        if status != 0:
            raise GpuCheckError(f"gpu-check: `dvc repro tokenize` failed (exit status {status}); see its output above")
    return TOKENS_DIR


def run_params(args: argparse.Namespace, vocab_size: int) -> Params:
    """The params of the timed run: the shape of --params, bf16, torch.compile, a budget of args.steps steps,
    one validation and one checkpoint (at the end: the study's cadence, every 10%, would weigh far more here)."""
    overrides = copy.deepcopy(DRY_RUN) if args.dry_run else {}
    base = load_params(args.params, overrides)
    overrides.setdefault("tokenizer", {})["vocab_size"] = vocab_size  # the token files' own vocabulary
    overrides.setdefault("train", {}).update(
        device="cpu" if args.dry_run else "cuda", precision="bf16", compile=True, nproc_per_node=1,
        max_tokens=args.steps * base.train.batch_size * base.model.seq_len,
        eval_every_frac=1.0, checkpoint_every_frac=1.0,
    )
    return load_params(args.params, overrides)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated, training"
    return peak_rss_mb(), "max RSS of the process (no allocator peak on CPU)"


def train_timed(params: Params, tokens_dir: Path, tmp: Path, warmup_steps: int) -> tuple[dict, dict]:
    """Trains with the train stage's own function: (its metrics, the report's training keys).

    train.json's tokens_per_sec averages over the whole run, torch.compile's first steps included (tens of
    seconds on CUDA); the windows between log flushes after the warm-up give the steady speed of the same loop.
    """
    device = torch.device(params.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = LoopTimer(device=device, after_step=warmup_steps)
    start = time.perf_counter()
    metrics = loop.train(params, loop.TrainPaths.under(tmp, tokens_dir), on_log=timer)
    seconds = time.perf_counter() - start
    memory, memory_source = peak_memory_mb(device)
    tok_s = timer.tok_s()["loop"]
    # set-up (token files, unigram baseline, model) and compilation: the time before the timed windows beyond
    # what their first steps take at the steady speed (no validation before the end: train.eval_every_frac=1)
    first = next(event for event in timer.events if event.step >= warmup_steps)
    return metrics, {
        "timed_steps": sum(w["steps"] for w in timer.windows),
        "tokens_per_sec": round(tok_s, 1),  # steady: after --warmup-steps, without validation
        "tokens_per_sec_train_json": metrics["tokens_per_sec"],  # the stage's own figure: warm-up included
        "peak_memory_mb": round(memory, 1), "peak_memory_source": memory_source, "train_seconds": seconds,
        "startup_and_compile_seconds": round(timer.spans[0][1] - start - first.tokens / tok_s, 2),
    }


def report(args: argparse.Namespace, params: Params, metrics: dict, timed: dict, measured: float) -> dict:
    """gpu_check.json but for the *_seconds: MFU against the dense bf16 peak table, else the `measured` peak."""
    m, device, tok_s = params.model, torch.device(params.train.device), timed["tokens_per_sec"]
    peak, flops = table_bf16_peak(device) or measured, flops_per_token(m, metrics["n_params"])
    study = load_params(args.params)  # the full study, whose budget is projected
    study_tokens = make_budget(study, study.tokenizer.vocab_size).total_tokens
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dry_run": args.dry_run, "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "shape": {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                  "seq_len": m.seq_len, "pe": m.pe, "batch_size": params.train.batch_size,
                  "vocab_size": params.tokenizer.vocab_size},
        **{key: metrics[key] for key in ("n_params", "precision", "steps", "final_train_loss", "final_val_loss")},
        "compiled": device.type == "cuda" and params.train.compile,
        **{key: value for key, value in timed.items() if key != "train_seconds"},
        "flops_per_token": flops, "achieved_flop_s": tok_s * flops, "peak_flop_s": peak, "mfu": tok_s * flops / peak,
        "peak_source": "table (dense bf16)" if table_bf16_peak(device) else "measured bf16 matmul",
        "matmul_peak_bf16_flop_s": measured,
        "full_study_tokens": study_tokens, "projected_full_study_minutes": study_tokens / tok_s / 60,
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
    keep_freed_memory()  # as the stages run (attnlab.core.memory)
    started = time.perf_counter()
    base = load_params(args.params, DRY_RUN if args.dry_run else None)
    if args.warmup_steps < 0 or args.steps < args.warmup_steps + 2 * base.train.log_every:
        raise ConfigError("--steps", f"{args.steps} leaves no timed window after --warmup-steps {args.warmup_steps} "
                                     f"(needs at least --warmup-steps + 2 x train.log_every={base.train.log_every})")
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="attnlab-gpu-check-") as folder:
        tmp, start = Path(folder), time.perf_counter()
        tokens_dir = build_data(base, args.dry_run, tmp)
        seconds["data"], start = time.perf_counter() - start, time.perf_counter()
        params = run_params(args, int(load_meta(tokens_dir)["vocab_size"]))
        measured = matmul_flops(torch.device(params.train.device), torch.bfloat16, *MATMUL[params.train.device])
        seconds["matmul_peak"] = time.perf_counter() - start
        log(f"training {args.steps} steps of {params.train.batch_size} x {params.model.seq_len} tokens in bf16")
        metrics, timed = train_timed(params, tokens_dir, tmp, args.warmup_steps)
        seconds["train"], start = timed["train_seconds"], time.perf_counter()
        analysis = attention_stats(params, tmp / "model.pt", tokens_dir, tmp / "attention")
        seconds["analysis"], seconds["wall"] = time.perf_counter() - start, time.perf_counter() - started
    results = {**report(args, params, metrics, timed, measured), "attention_rows": analysis["n_rows"],
               **{f"{name}_seconds": round(value, 2) for name, value in seconds.items()}}
    write_json(args.out, results)
    print(f"gpu-check on {results['device']}: {results['tokens_per_sec']:,.0f} tokens/s, MFU {results['mfu']:.1%} "
          f"({results['peak_source']}), peak memory {results['peak_memory_mb']:,.0f} MB; the full study "
          f"({results['full_study_tokens']:,} tokens) would train in {results['projected_full_study_minutes']:,.1f} "
          f"min; {results['wall_seconds']:.0f} s in all -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
