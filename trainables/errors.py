"""User-facing errors: one line naming the file, the key and the fix.

Also the wording of a pydantic validation error (:func:`error_text`) and of where a value came from
(:func:`source_of`: the YAML, or the ``--set`` that wrote it).
"""

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

    def with_source(self, source: str) -> UserError:
        if self.source is None:
            self.source = source
            self.args = (self.format(),)
        return self


STORE_FULL = "database or disk is full"
"""SQLite's words (SQLITE_FULL) for a database whose disk ran full."""

FULL_MARKERS = ("No space left on device", STORE_FULL, "Disk quota exceeded", "[Errno 28]", "[Errno 122]")
"""How a full disk shows in an error's text: the OS's ENOSPC/EDQUOT messages, SQLite's SQLITE_FULL."""


def is_disk_full(error: BaseException | str | None) -> bool:
    """Whether ``error`` (an exception or its text) says a disk or a SQLite database is full."""
    import errno

    if error is None:
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(m in text for m in FULL_MARKERS)


class StoreFull(RuntimeError):
    """The MLflow store's disk is full: nothing more of the search can be recorded, so it stops."""


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


# --------------------------------------------------------------------------- pydantic errors, in words
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def fix_for(err: dict, key: str) -> str:
    """What to write instead, for one of pydantic's own errors (``err`` from ``ValidationError.errors()``)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        limit = ctx.get(name)
        return f"set {key} to a number {op} {limit:g}" if isinstance(limit, float) else f"set {key} to a number {op} {limit}"
    if kind == "literal_error":
        return f"set {key} to one of {ctx.get('expected')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"set {key} to a whole number"
    if kind in ("float_parsing", "float_type"):
        return f"set {key} to a number"
    if kind in ("bool_parsing", "bool_type"):
        return f"set {key} to true or false"
    if kind == "string_type":
        return f"set {key} to a text value (quote it)"
    if kind in ("list_type", "tuple_type"):
        return f"write {key} as a list, e.g. [a, b]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"write {key} as a section of 'key: value' lines"
    if kind == "too_short":
        return f"give {key} at least {ctx.get('min_length')} value(s)"
    if kind == "too_long":
        return f"give {key} at most {ctx.get('max_length')} value(s)"
    if kind == "string_pattern_mismatch":
        return f"set {key} to letters, digits, '_', '.' and '-', starting with a letter or digit"
    if kind == "union_tag_invalid":
        return f"set {key}.{ctx.get('discriminator', 'type').strip(chr(39))} to one of {ctx.get('expected_tags')}"
    return f"set {key} to a valid value"


def error_text(err: dict, key: str) -> str:
    """A pydantic error as one line: the reason, the value given and (for pydantic's own checks) the fix.

    Our validators' ``ValueError`` messages already end with their fix."""
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] in ("value_error", "assertion_error"):
        return msg
    if "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{msg}; {fix_for(err, key)}"


def source_of(source: str, set_paths: list[str] | None, key: str | None) -> str:
    """The YAML path, plus the ``--set`` override that wrote ``key`` (or a section above it), or every override
    below ``key`` when ``key`` is a section (a check across its keys: any of them may be the one to fix)."""
    if not key:
        return source
    paths = set_paths or []
    for p in paths:
        if key == p or key.startswith(p + "."):
            return f"{source} (--set {p})"
    below = [p for p in paths if p.startswith(key + ".")]
    return f"{source} ({', '.join(f'--set {p}' for p in below)})" if below else source
