"""The one way every command line of attnlab reports bad input: `error: <key>: <message>`, exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from attnlab.core.errors import AttnlabError

EXIT_BAD_INPUT = 2


def run_cli(fn: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run fn(argv); an AttnlabError becomes one line on stderr (no traceback): status 2 for bad input."""
    try:
        fn(argv)
    except AttnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
