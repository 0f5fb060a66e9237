"""explorer stage: reports/explorer.html, every head's attention on the first explorer.n_examples validation
examples of attention_stats, token by token, in one self-contained page that opens from disk."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from attnlab.analysis.explorer import explorer_data
from attnlab.core.cli import run_cli
from attnlab.core.errors import ConfigError
from attnlab.core.io import read_json, write_text
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params
from attnlab.data.tokenizer import load_tokenizer
from attnlab.report.explorer import explorer_html


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="models/model.pt")
    parser.add_argument("--attention", required=True, help="data/attention (the attention_stats outputs)")
    parser.add_argument("--tokenizer", required=True, help="data/tokenizer (or its tokenizer.model)")
    parser.add_argument("--roles", help="reports/head_roles.json: the role scores shown in the head grid")
    parser.add_argument("--out", required=True, help="reports/explorer.html")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    start = time.perf_counter()
    sp = load_tokenizer(args.tokenizer)
    data = explorer_data(params, args.model, args.attention)
    roles = None
    if args.roles:
        try:
            roles = read_json(args.roles)
        except (OSError, ValueError) as exc:
            raise ConfigError(args.roles, f"unreadable ({exc.__class__.__name__}): run the head_roles stage") from exc
    write_text(args.out, explorer_html(data, sp, roles))
    _, n_layers, n_heads, n_tokens, _ = data.weights.shape
    size_mb = Path(args.out).stat().st_size / 1e6
    print(
        f"explorer: wrote {args.out} ({size_mb:.2f} MB: {len(data.examples)} {data.split} examples x {n_layers} layers "
        f"x {n_heads} heads x {n_tokens} of {data.seq_len} tokens) in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
