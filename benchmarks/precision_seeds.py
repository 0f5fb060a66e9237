"""fp32 against bf16 autocast, several seeds each: the comparison behind `train.precision: auto`.

    python -m benchmarks.precision_seeds --set model.d_model=128 ...   (`make precision-seeds`: the quick profile)

Each (precision, seed) trains with the train stage's own function (attnlab.training.loop.train) on the project's
token files, and is scored on the windows `evaluate` scores, in its own precision. The same seed gives the same
init and the same batches in both precisions, so the per-seed gap bf16 - fp32 is a paired difference; the fp32
seeds' spread is the yardstick. The rule of docs/performance.md: bf16 is acceptable when the mean bf16 val_loss
lies within the range of the fp32 seeds.

Runs go `--jobs` at a time, in separate processes that share the cores. On a CPU without native bf16 (no
avx512_bf16/amx_bf16) bf16 is emulated and far slower than fp32: the answer is about quality, which does not
depend on how fast the bf16 arithmetic is done.

Writes --out (JSON: every run, and the summary) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from attnlab.model.scoring import score_windows
from attnlab.core.cli import run_cli
from attnlab.core.device import pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import write_json
from attnlab.core.params import Params, load_params
from attnlab.data.tokens import eval_starts, load_meta, load_tokens
from benchmarks.common import parse_overrides, train_stage
from attnlab.report.compare.render import mean_std_text as mean_std

PRECISIONS = ("fp32", "bf16")


def run_params(params: Params, precision: str, seed: int, vocab_size: int) -> Params:
    return dataclasses.replace(
        params, seed=seed, tokenizer=dataclasses.replace(params.tokenizer, vocab_size=vocab_size),
        train=dataclasses.replace(params.train, precision=precision),
    )


def train_and_score(params: Params, tokens_dir: str, threads: int) -> dict:
    """One run (in a worker process): the train stage's function, then evaluate's windows scored in the run's
    precision."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    metrics, model = train_stage(params, tokens_dir)
    device = pick_device(params.train.device)
    val_tokens, seq_len = load_tokens(tokens_dir, "val"), params.model.seq_len
    starts = eval_starts(len(val_tokens), seq_len, params.eval.max_tokens)
    scored = score_windows(model.to(device), val_tokens, starts, seq_len, params.eval.batch_size)  # fp32
    return {
        "precision": params.train.precision, "seed": params.seed, "val_loss": round(scored.loss, 6),
        "val_tokens": scored.n_tokens, "final_train_loss": round(metrics["final_train_loss"], 6),
        "tokens_per_sec": metrics["tokens_per_sec"], "threads": threads,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def summarize(runs: list[dict]) -> dict:
    """Mean and spread per precision, the paired per-seed gaps, and whether bf16 is within the fp32 seeds' range."""
    by = {p: sorted((r for r in runs if r["precision"] == p), key=lambda r: r["seed"]) for p in PRECISIONS}
    summary: dict = {}
    for precision, rows in by.items():
        losses = [r["val_loss"] for r in rows]
        summary[precision] = {
            "mean": round(statistics.mean(losses), 6) if losses else None,
            "std": round(statistics.stdev(losses), 6) if len(losses) > 1 else None,
            "min": min(losses, default=None), "max": max(losses, default=None),
        }
    fp32 = {r["seed"]: r["val_loss"] for r in by["fp32"]}
    gaps = {r["seed"]: round(r["val_loss"] - fp32[r["seed"]], 6) for r in by["bf16"] if r["seed"] in fp32}
    summary["bf16_minus_fp32_by_seed"] = gaps
    summary["bf16_minus_fp32_mean"] = round(statistics.mean(gaps.values()), 6) if gaps else None
    if by["fp32"] and by["bf16"]:
        fp32_range = summary["fp32"]["min"], summary["fp32"]["max"]
        summary["bf16_within_fp32_seed_range"] = fp32_range[0] <= summary["bf16"]["mean"] <= fp32_range[1]
    return summary


def markdown(runs: list[dict], summary: dict) -> str:
    seeds = sorted({r["seed"] for r in runs})
    by_key = {(r["precision"], r["seed"]): r for r in runs}
    lines = ["| precision | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | tokens/s (mean) |",
             "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |"]
    for precision in PRECISIONS:
        rows = [r for r in runs if r["precision"] == precision]
        if not rows:
            continue
        cells = [f"{by_key[(precision, s)]['val_loss']:.4f}" if (precision, s) in by_key else "" for s in seeds]
        spread = mean_std([r["val_loss"] for r in rows], 4)
        speed = statistics.mean(r["tokens_per_sec"] for r in rows)
        lines.append(f"| {precision} | " + " | ".join(cells) + f" | {spread} | {speed:,.0f} |")
    gaps = summary["bf16_minus_fp32_by_seed"]
    if gaps:
        lines.append("| bf16 − fp32 | " + " | ".join(f"{gaps[s]:+.4f}" if s in gaps else "" for s in seeds)
                     + f" | {summary['bf16_minus_fp32_mean']:+.4f} | |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_seeds", description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="params override, as `dvc exp run -S` (repeatable)")
    p.add_argument("--tokens", default="data/tokens", help="token folder (`make quick` writes it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time; the cores are shared between them")
    p.add_argument("--out", default="reports/precision_seeds.json")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.jobs < 1:
        raise ConfigError("--jobs", f"{args.jobs} must be at least 1")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ConfigError("--seeds", f"{args.seeds} must be distinct seeds >= 0")
    if not (Path(args.tokens) / "train.bin").exists():
        raise ConfigError("--tokens", f"no token files in {args.tokens} (run `make quick` first)")
    params = load_params(args.params, parse_overrides(args.overrides))
    vocab_size = int(load_meta(args.tokens)["vocab_size"])
    slow_first = sorted(args.precisions, key=lambda p: p != "bf16")  # the pool then ends with short runs
    jobs = [run_params(params, p, s, vocab_size) for p in slow_first for s in args.seeds]
    threads = max(1, torch.get_num_threads() // args.jobs)
    print(f"precision_seeds: {len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(train_and_score, job, args.tokens, threads) for job in jobs]
        runs = []
        for future in futures:
            runs.append(future.result())
            print(f"precision_seeds: {runs[-1]}", file=sys.stderr)
    summary = summarize(runs)
    write_json(args.out, {"runs": runs, "summary": summary,
                          "shape": dataclasses.asdict(params.model), "train_tokens": params.train.max_tokens})
    print(markdown(runs, summary))
    print(f"precision_seeds: -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
