"""Diagnostics: one finding about the catalog, with where it is and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    code: str  # stable rule code, e.g. "RB021"
    rule: str  # short rule name, e.g. "unknown-action"
    severity: Severity
    message: str  # what is wrong
    fix: str  # how to fix it
    file: str
    line: int = 1  # 1-based
    col: int = 1  # 1-based
    path: str = "$"  # JSON path of the offending value inside its document

    def format(self) -> str:
        return (
            f"{self.file}:{self.line}:{self.col}: {self.severity} {self.code} [{self.rule}] "
            f"{self.message} ({self.path}). Fix: {self.fix}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "code": self.code,
            "rule": self.rule,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
            "path": self.path,
        }


_SHOWN_WIDTH = 100


def excerpt(
    file: str, line: int, col: int, read: dict[str, list[str] | None] | None = None
) -> list[str]:
    """The source line of a diagnostic and a caret under its column (empty if unknown).

    Tabs show as `→`, one column each, so the caret lines up and a stray tab is visible.
    `read` keeps the lines of files already read, for a run over many diagnostics.
    """
    read = {} if read is None else read
    if file not in read:
        try:
            read[file] = Path(file).read_text("utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            read[file] = None
    lines = read[file]
    if lines is None or not 0 < line <= len(lines):
        return []
    shown = lines[line - 1].replace("\t", "→")
    start = max(0, min(col - 1 - _SHOWN_WIDTH // 2, len(shown) - _SHOWN_WIDTH))
    cut = shown[start : start + _SHOWN_WIDTH]
    prefix = "…" if start else ""
    suffix = "…" if start + _SHOWN_WIDTH < len(shown) else ""
    caret = " " * (len(prefix) + max(0, col - 1 - start)) + "^"
    return [f"{line:>6} | {prefix}{cut}{suffix}", f"{'':>6} | {caret}"]
