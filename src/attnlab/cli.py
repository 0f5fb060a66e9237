"""The one way every command line of attnlab reports bad input: `error: <key>: <message>`, exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from attnlab.config import ConfigError

EXIT_BAD_INPUT = 2


def run_cli(fn: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run fn(argv); turn a ConfigError into one line on stderr and exit status 2 (no traceback)."""
    try:
        fn(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
