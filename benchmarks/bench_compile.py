"""torch.compile on the CPU: does it pay for its compile time on a `make quick`-sized run?

    python -m benchmarks.bench_compile --out reports/bench_compile.json      # `make bench-compile`

For each shape (the quick profile's, and params.yaml's default), the train stage's model and optimizer
(attnlab.training.schedule.make_optimizer) take the same fwd + bwd + AdamW step eagerly and through
`torch.compile`, on the same synthetic batches:

- ``compile_seconds``: the first compiled steps' wall time minus as many eager steps (what compiling costs);
- ``eager_tok_s`` / ``compiled_tok_s``: steady-state tokens/s, alternating repetitions (benchmarks.bench.side_by_side);
- ``run_minutes_eager`` / ``run_minutes_compiled``: the shape's whole run (the quick profile's 2M tokens; the
  default shape's params.yaml budget) projected from those figures, compile time included.

The train stage compiles only on CUDA (`train.compile`); this measurement is what keeps it off on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from attnlab.core.device import keep_freed_memory
from attnlab.core.io import write_json
from attnlab.core.params import ModelConfig, load_params
from attnlab.model.transformer import Transformer, lm_loss
from attnlab.training.schedule import make_budget, make_optimizer
from benchmarks.bench import BenchSetup, device_name, side_by_side, synthetic_stream

QUICK = dict(d_model=128, n_layers=2, n_heads=4, d_ff=256, seq_len=128)  # the Makefile's QUICK_PARAMS
QUICK_VOCAB, QUICK_BATCH, QUICK_TOKENS = 2048, 16, 2_000_000


def step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:  # (B, T) inputs and targets
        lm_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(cfg: ModelConfig, vocab: int, batch: int, run_tokens: int, steps: int, reps: int, log) -> dict:
    params = load_params()
    device = torch.device("cpu")
    setup = BenchSetup(cfg=cfg, vocab_size=vocab, batch_size=batch, steps=steps, reps=reps, warmup=1, loss_steps=1,
                       mm_size=1, mm_seconds=1.0, device=device, token_stream=synthetic_stream(vocab, 200_000, 0),
                       token_source="synthetic", seed=0)
    batches = [setup.batch(i) for i in range(4)]
    steps_fns = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Transformer(cfg, vocab).train()
        optimizer = make_optimizer(model, params.train, device)
        steps_fns[name] = step_fn(torch.compile(model) if name == "compiled" else model, optimizer)
    first = {}
    for name, fn in steps_fns.items():  # the first two steps: compiling (forward, then backward and optimizer)
        start = time.perf_counter()
        for i in range(2):
            fn(*batches[i])
        first[name] = time.perf_counter() - start
        log(f"  {name}: first 2 steps {first[name]:.1f} s")
    rates = side_by_side(setup, {name: (lambda i, fn=fn: fn(*batches[i % 4])) for name, fn in steps_fns.items()})
    compile_seconds = max(0.0, first["compiled"] - first["eager"])
    run_steps = run_tokens / setup.tokens_per_step
    eager_min = run_steps * setup.tokens_per_step / rates["eager"] / 60
    compiled_min = (compile_seconds + run_steps * setup.tokens_per_step / rates["compiled"]) / 60
    return {
        "shape": f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
                 f"seq {cfg.seq_len}, batch {batch}, vocab {vocab}",
        "compile_seconds": round(compile_seconds, 1),
        "eager_tok_s": round(rates["eager"], 1),
        "compiled_tok_s": round(rates["compiled"], 1),
        "compiled_vs_eager": round(rates["compiled"] / rates["eager"], 3),
        "run_tokens": run_tokens,
        "run_minutes_eager": round(eager_min, 2),
        "run_minutes_compiled": round(compiled_min, 2),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/bench_compile.json")
    parser.add_argument("--default-steps", type=int, default=2, help="timed steps per repetition, default shape")
    args = parser.parse_args(argv)
    params = load_params()
    keep_freed_memory()  # as the train stage does on the CPU
    results = {"device": device_name(torch.device("cpu")), "torch": torch.__version__}
    print("quick shape")
    quick_cfg = dataclasses.replace(params.model, **QUICK)
    results["quick"] = measure(quick_cfg, QUICK_VOCAB, QUICK_BATCH, QUICK_TOKENS, steps=10, reps=3, log=print)
    print(results["quick"])
    print("default shape (params.yaml)")
    vocab = params.tokenizer.vocab_size
    default_tokens = make_budget(params, vocab).total_tokens
    results["default"] = measure(params.model, vocab, params.train.batch_size, default_tokens,
                                 steps=args.default_steps, reps=2, log=print)
    print(results["default"])
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
