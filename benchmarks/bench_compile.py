"""`make bench-compile`: the train stage's step eager against `torch.compile` on the CPU at the quick and the
default shape (same synthetic batches, alternating), and each shape's whole budget at those speeds with the
compile time (the first two compiled steps less two eager ones) included. The stage compiles only on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnlab.core.cli import run_cli
from attnlab.core.io import write_json
from attnlab.core.params import Params, load_params
from attnlab.training.schedule import make_budget
from benchmarks.common import device_name, parse_overrides, side_by_side, stage_step, synthetic_tokens


def measure(params: Params, steps: int, reps: int, folder: Path, log) -> dict:
    """Eager against compiled steps of the train stage at the shape of `params`, on the CPU."""
    vocab, m, batch = params.tokenizer.vocab_size, params.model, params.train.batch_size
    tokens = synthetic_tokens(folder / "tokens", vocab, 200_000, m.seq_len, params.seed)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, device="cpu", compile=False))
    runs = {name: stage_step(params, tokens, folder / name, compile=name == "compiled") for name in ("eager", "compiled")}
    first = {}
    for name, step in runs.items():  # the first two steps: compiling (forward, then backward and optimizer)
        start = time.perf_counter()
        for i in range(2):
            step(i)
        first[name] = time.perf_counter() - start
        log(f"  {name}: first 2 steps {first[name]:.1f} s")
    budget = make_budget(params, vocab)
    rates = side_by_side(runs, steps, reps, 1, budget.tokens_per_step, torch.device("cpu"))
    compile_seconds = max(0.0, first["compiled"] - first["eager"])
    return {
        "shape": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, "
                 f"seq {m.seq_len}, batch {batch}, vocab {vocab}",
        "compile_seconds": round(compile_seconds, 1),
        "eager_tok_s": round(rates["eager"], 1),
        "compiled_tok_s": round(rates["compiled"], 1),
        "compiled_vs_eager": round(rates["compiled"] / rates["eager"], 3),
        "run_tokens": budget.total_tokens,
        "run_minutes_eager": round(budget.total_tokens / rates["eager"] / 60, 2),
        "run_minutes_compiled": round((compile_seconds + budget.total_tokens / rates["compiled"]) / 60, 2),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="reports/bench_compile.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="the quick shape's params overrides, as `dvc exp run -S` (`make bench-compile`: the quick profile)")
    parser.add_argument("--default-steps", type=int, default=2, help="timed steps per repetition, default shape")
    args = parser.parse_args(argv)
    results = {"device": device_name(torch.device("cpu")), "torch": torch.__version__}
    shapes = {"quick": (load_params(args.params, parse_overrides(args.overrides)), 10, 3),
              "default": (load_params(args.params), args.default_steps, 2)}
    with tempfile.TemporaryDirectory(prefix="attnlab-bench-compile-") as tmp:
        for name, (params, steps, reps) in shapes.items():
            print(f"{name} shape")
            results[name] = measure(params, steps, reps, Path(tmp) / name, log=print)
            print(results[name])
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
