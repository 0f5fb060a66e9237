"""report stage: reports/index.html, one self-contained page with the metrics, figures and samples."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from attnlab.core.cli import run_cli
from attnlab.core.io import write_text
from attnlab.report.page import build_report, missing_inputs


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", required=True, help="the reports folder (metrics JSON, figures/, samples.md)")
    parser.add_argument("--out", required=True, help="reports/index.html")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    page = build_report(args.reports)
    write_text(args.out, page)
    missing = missing_inputs(args.reports)
    note = f", skipped {len(missing)} missing: {', '.join(missing)}" if missing else ""
    size_kb = Path(args.out).stat().st_size / 1024
    print(f"report: wrote {args.out} ({size_kb:.0f} KB){note} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
