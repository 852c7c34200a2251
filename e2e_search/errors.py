"""User-facing errors: one line naming the file, the key and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (YAML, data file, CLI flag).

    The CLI prints ``str(err)`` as a single line and exits with code 2.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message = message
        self.source = source
        self.key = key
        super().__init__(self.format())

    def format(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        prefix = ": ".join(parts)
        text = f"{prefix}: {self.message}" if prefix else self.message
        return " ".join(text.split())  # always one line

    def with_source(self, source: str) -> "UserError":
        if self.source is None:
            self.source = source
            self.args = (self.format(),)
        return self


class NothingToResume(UserError):
    """No unfinished search to continue (``run --resume`` then starts a new one)."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or a list of valid options when nothing is close."""
    options = sorted(set(options))
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if options and len(options) <= 12:
        return f" (valid: {', '.join(options)})"
    return ""
