"""Stage `sources`: the fingerprint of the corpus's source folders (file names, sizes, modification times; the
torch and Python versions) -> data/sources.json. Always run, cheap; `corpus` depends on its output."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.core.cli import run_cli
from attnlab.core.io import write_json
from attnlab.core.params import load_params
from attnlab.data.corpus import sources_fingerprint


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="data/sources.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    fingerprint = sources_fingerprint(load_params(args.params).corpus)
    write_json(args.out, fingerprint)
    files = sum(s["py_files"] for s in fingerprint["sources"])
    print(f"sources: {files:,} .py files in {len(fingerprint['sources'])} folder(s), "
          f"{time.perf_counter() - start:.2f} s -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
