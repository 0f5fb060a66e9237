"""Stage `corpus`: gather ~corpus.max_mb MB of Python source and split it into train/val by file."""

from __future__ import annotations

import argparse
import sys

from attnlab.core.cli import run_cli
from attnlab.core.io import read_json
from attnlab.core.params import load_params
from attnlab.data.corpus import MB, build_corpus


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sources", help="data/sources.json (the sources stage's fingerprint, kept in the manifest)")
    parser.add_argument("--out", required=True, help="output folder (train.txt, val.txt, manifest.json)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    fingerprint = read_json(args.sources) if args.sources else None
    manifest = build_corpus(params.corpus, args.out, fingerprint)
    totals = manifest["totals"]
    print(
        f"corpus: {totals['train']['files']} train + {totals['val']['files']} val files, "
        f"{totals['train']['bytes'] / MB:.1f} + {totals['val']['bytes'] / MB:.1f} MB, "
        f"{totals['skipped']} skipped, {manifest['seconds']:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
