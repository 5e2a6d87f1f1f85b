"""User-facing errors. Every error says what went wrong and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass


class EMError(Exception):
    """Base class: the message is meant for the user, not a stack trace reader."""


class ConfigError(EMError):
    """A config value is missing or inconsistent."""


class MissingResourceError(EMError):
    """A model, dataset or file could not be found locally nor fetched."""


@dataclass(frozen=True)
class Problem:
    """One defect in an input file, located by file and 1-based line."""

    file: str
    line: int
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


class DataValidationError(EMError):
    """Raised with *all* problems found in a file, not just the first."""

    def __init__(self, problems: list[Problem], header: str | None = None, limit: int = 50):
        self.problems = list(problems)
        head = header or f"{len(self.problems)} problem(s) found in the data"
        shown = "\n".join(f"  - {p}" for p in self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        super().__init__(f"{head}:\n{shown}{more}")
