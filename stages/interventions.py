"""Stage `interventions`: validation loss of the trained model under attention interventions, with figures
and generated samples (uniform heads, temperature and top-k sweeps, mean-ablation of each head)."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.core.cli import run_cli
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="model file written by the train stage")
    parser.add_argument("--tokens", required=True, help="token folder (train.bin, val.bin)")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece model file, for the samples")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--table", required=True, help="parquet table of every row to write")
    parser.add_argument("--figures", required=True, help="folder for the four figures")
    parser.add_argument("--samples", required=True, help="markdown file of generated samples to write")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    params = load_params(args.params)  # bad params fail here, before torch and matplotlib are imported
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    from attnlab.analysis.intervention_sweep import run_interventions
    from attnlab.core.io import atomic_path, write_json, write_text
    from attnlab.report.plots_interventions import write_intervention_figures

    run = run_interventions(params, args.model, args.tokens, args.tokenizer)

    write_json(args.metrics, {**run.metrics, "seconds": round(run.seconds, 2)})  # the sweep's and samples' wall time
    with atomic_path(args.table) as tmp:
        run.table.to_parquet(tmp, index=False)
    write_intervention_figures(run.table, args.figures, params.model.seq_len)
    write_text(args.samples, run.samples_md)
    base, uniform = run.metrics["baseline"], run.metrics["uniform_all"]
    seconds = time.perf_counter() - start
    print(
        f"interventions: {len(run.table)} rows x {run.n_eval_tokens:,} val tokens, baseline loss "
        f"{base['loss']:.3f} -> all-uniform {uniform['loss']:.3f} nats/token, {seconds:.1f} s -> {args.metrics}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
