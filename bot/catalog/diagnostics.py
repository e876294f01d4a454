"""Diagnostics: one finding about the catalog, with where it is and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass
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
