"""Errors a user can act on. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class WrpoError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class DataError(WrpoError):
    """A data file is malformed: the message names the file, the line (1-based) and the field."""

    def __init__(self, source: str, message: str, line: int | None = None, field: str | None = None):
        self.source, self.line, self.field = source, line, field
        where = source if line is None else f"{source}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


class SpecError(WrpoError):
    """A FusionSpec is invalid: the message names the spec file and the field path."""


class StageNotCommitted(WrpoError):
    """A stage's output was asked for but its _MANIFEST.json does not exist (yet)."""
