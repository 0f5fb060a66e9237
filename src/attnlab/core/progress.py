"""Progress bars that read well in a terminal and in a log file.

On a terminal a bar redraws as tqdm does (at most every 0.1 s). Off a terminal (`dvc repro` piped to a file, a
queue worker, CI) every redraw is a line of the log, so the bar writes at most one line every
OFF_TERMINAL_INTERVAL_S seconds (and its last state when it closes): a long run's log stays readable.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

OFF_TERMINAL_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), with at most one line every OFF_TERMINAL_INTERVAL_S when stderr is no terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", OFF_TERMINAL_INTERVAL_S)
        kwargs.setdefault("maxinterval", 2 * OFF_TERMINAL_INTERVAL_S)
    return tqdm(iterable, **kwargs)
