"""Experiment comparison: the DVC experiments of a grid side by side. grid.py reads DVC's `-S` specs and
selects the experiments they queued, experiments.py collects them from `dvc.api.exp_show()`, stats.py takes
the mean ± std over seeds, render.py draws the figure and writes the page, cli.py is the command line
(`python -m attnlab.report.compare`, run by `make compare` and `make sweep`), and results_tables.py writes the
tables of docs/results.md (`make results`).
"""
