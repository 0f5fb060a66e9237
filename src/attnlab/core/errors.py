"""The errors attnlab reports as one line (`error: key: message`) rather than a traceback, and the small
checks that raise them."""

from __future__ import annotations


class AttnlabError(Exception):
    """An error attnlab reports as one line (`error: ...`) rather than a traceback."""

    exit_code = 1


class ConfigError(AttnlabError, ValueError):
    """Bad input: names the parameter (or file) and says what was expected."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
