"""`python -m attnlab.report.compare ...`: the command line of cli.py."""

import sys

from attnlab.core.cli import run_cli
from attnlab.report.compare.cli import main

sys.exit(run_cli(main, sys.argv[1:]))
