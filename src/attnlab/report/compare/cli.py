"""Render DVC experiments side by side: a table, a figure and an HTML page from `dvc.api.exp_show()`.

DVC queues and runs the experiments; this command only renders them (see docs/compare.md):

    dvc exp run --queue -S 'model.pe=rope,none' -S 'seed=1,2'        # DVC expands the grid: 4 experiments
    dvc exp run --run-all -j 1
    python -m attnlab.report.compare --grid 'model.pe=rope,none' 'seed=1,2' \\
        --out reports/compare.html --figure reports/figures/compare_val_loss.png

Which experiments: those of the HEAD commit (exp_show's default) that one of the --grid's produces, i.e. whose
params equal the workspace params.yaml with the -S overrides (the profile, e.g. the quick one) and the grid's
overrides applied; a grid key may take any of its values. A --grid holds the -S specs of one `dvc exp run
--queue` without the `-S`, in DVC's syntax (`k=a,b`, `k=range(1,4)`, `k=choice(a,b)`; `k=[1,2]` is one list
value); later specs win, as in DVC. Without --grid: every experiment of HEAD. Experiments with identical
params count once (the newest successful one; exp_show lists newest first).

Grouping: by every param that differs between the selected experiments except `seed`; each metric is the
mean and std (ddof 1) over the group's successful experiments. `--exp-json FILE` renders a saved table,
`json.dumps(dvc.api.exp_show())`, instead of asking DVC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.core.io import write_text
from attnlab.report.compare.experiments import read_rows
from attnlab.report.compare.grid import Selection
from attnlab.report.compare.render import markdown_table, render


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that choose the experiments: --grid, -S, --repo, --params, --exp-json."""
    parser.add_argument("--grid", nargs="+", action="append", default=[], metavar="SPEC",
                        help="the -S specs (without -S) of one `dvc exp run --queue`; repeat for a union")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="SPEC",
                        help="an override every grid was queued with (the profile), as in dvc exp run -S")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: here)")
    parser.add_argument("--params", default=None, help="the params file the grids apply to (default REPO/params.yaml)")
    parser.add_argument("--exp-json", default=None, help="render this saved json.dumps(dvc.api.exp_show())")


def selection_of(args: argparse.Namespace) -> Selection:
    """The Selection of parsed arguments (its specs are checked here, before DVC is asked anything)."""
    return Selection(args.params or Path(args.repo) / "params.yaml", args.sets, args.grid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attnlab.report.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_arguments(parser)
    parser.add_argument("--out", default="reports/compare.html")
    parser.add_argument("--figure", default="reports/figures/compare_val_loss.png")
    parser.add_argument("--markdown", default=None, help="also write the per-group table as markdown here")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    selection = selection_of(args)
    table, summary = render(read_rows(args.repo, args.exp_json), selection, args.out, args.figure)
    if args.markdown:
        write_text(args.markdown, markdown_table(summary))
    print(f"compare: {len(table)} experiments ({int((table['state'] == 'success').sum())} succeeded) in "
          f"{len(summary)} group(s) -> {args.out}, {args.figure}")
