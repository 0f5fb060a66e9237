"""Stage `tokenizer`: train SentencePiece BPE (lossless on code) on a seeded sample of the train split."""

from __future__ import annotations

import argparse
import sys

from attnlab.core.cli import run_cli
from attnlab.core.params import load_params
from attnlab.data.tokenizer import MODEL_FILE, build_tokenizer


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--corpus", required=True, help="corpus folder written by the corpus stage")
    parser.add_argument("--out", required=True, help=f"output folder ({MODEL_FILE})")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    info = build_tokenizer(args.corpus, params.tokenizer, params.tokenizer.seed, args.out)
    print(
        f"tokenizer: {info['vocab_size']} pieces trained on {info['sample_mb']:.1f} MB of the train split, "
        f"{info['seconds']:.1f} s -> {args.out}/{MODEL_FILE}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
