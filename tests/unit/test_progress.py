"""Progress bars: a redraw per 0.1 s on a terminal, at most a line per 30 s in a log file."""

from __future__ import annotations

import io
import time

from attnlab.core.progress import OFF_TERMINAL_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _redraws(stream) -> int:
    for _ in progress_bar(range(100), file=stream, desc="work"):
        time.sleep(0.005)  # half a second in all: tqdm's own interval would redraw about five times
    return stream.getvalue().count("\r")


def test_off_a_terminal_the_bar_writes_its_first_and_last_state_only():
    log = io.StringIO()
    assert _redraws(log) <= 3  # opening and closing only
    assert "100/100" in log.getvalue()
    assert progress_bar(file=io.StringIO()).mininterval == OFF_TERMINAL_INTERVAL_S


def test_on_a_terminal_the_bar_keeps_tqdms_redraw_interval():
    assert _redraws(Terminal()) >= 4
