"""Stage `tokenize`: encode both corpus splits into flat uint16 token files plus meta.json.

(Not named tokenize.py: `python stages/<script>.py` puts stages/ first on sys.path, where a tokenize.py would
shadow the standard library module of that name, which `inspect` and `linecache` import.)
"""

from __future__ import annotations

import argparse
import sys

from attnlab.core.cli import run_cli
from attnlab.core.params import load_params
from attnlab.data.tokenizer import tokenize_corpus


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--corpus", required=True, help="corpus folder written by the corpus stage")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder written by the tokenizer stage")
    parser.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    args = parser.parse_args(argv)
    load_params(args.params)  # validated like every stage, though no param changes how text is encoded
    meta = tokenize_corpus(args.corpus, args.tokenizer, args.out)
    print(
        f"tokenize: {meta['train']['tokens']:,} train + {meta['val']['tokens']:,} val tokens, "
        f"{meta['bytes_per_token']['train']:.2f} bytes/token, {meta['seconds']:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
