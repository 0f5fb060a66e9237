"""evaluate stage: validation loss, perplexity and bits per byte of the trained model, plus samples."""

import argparse
import sys
import time
from pathlib import Path

from attnlab.analysis.evaluate import evaluate
from attnlab.core.cli import run_cli
from attnlab.core.io import write_json, write_text
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--metrics", default="reports/eval.json")
    parser.add_argument("--samples", default="reports/samples.md")
    parser.add_argument("--by-position", default="reports/loss_by_position.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    t0 = time.time()
    result = evaluate(params, Path(args.model), Path(args.tokens), Path(args.tokenizer))
    metrics = {**result.metrics, "seconds": round(time.time() - t0, 2)}  # the stage's wall time, for docs/performance.md
    write_json(args.metrics, metrics)
    write_json(args.by_position, result.by_position)
    write_text(args.samples, result.samples)
    print(f"[evaluate] val loss {metrics['val_loss']:.4f} nats/token ({metrics['val_loss_vs_unigram']:.3f} below the "
          f"unigram baseline {metrics['unigram_loss']:.4f}), ppl {metrics['val_ppl']:.2f}, "
          f"{metrics['val_bpb']:.4f} bits/byte over {metrics['val_tokens_scored']:,} tokens "
          f"in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
