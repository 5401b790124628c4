"""Errors a user can cause: values with a file, a line and a sentence, never a traceback."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the input, located where the user can fix it."""

    file: str
    line: int  # 1-based; 0 when the problem has no line (a missing file)
    where: str  # the path of the value inside the file, e.g. "lans[1]" ("" for the whole file)
    message: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        return f"{loc}: {self.where}: {self.message}" if self.where else f"{loc}: {self.message}"


    def github(self) -> str:
        """The problem as a GitHub Actions workflow command: an annotation on the file and line."""
        def esc(v: str, prop: bool = False) -> str:
            v = v.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
            return v.replace(":", "%3A").replace(",", "%2C") if prop else v
        loc = f"file={esc(self.file, True)}" + (f",line={self.line}" if self.line else "")
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"::error {loc},title={esc('WAN validation', True)}::{esc(text)}"


class WanError(Exception):
    """Raised with every problem found, so the user sees them all at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems))
        super().__init__("\n".join(str(p) for p in self.problems))


def show(value: object, limit: int = 60) -> str:
    """A value as it may appear in an error: quoted, control characters escaped, cut short.

    Hostile input (newlines, terminal escapes) must not reach the terminal or a log verbatim, and a
    look-alike letter (Cyrillic 'а' in 'pаris') must not pass for the ASCII one: both are escaped.
    """
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
