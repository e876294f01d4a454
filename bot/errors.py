"""The exception tree of runbook-bot.

Every error the core raises on purpose derives from ``RunbookBotError``, so the CLI and
the bot can catch one type and show its message (never a stack trace) to a person::

    RunbookBotError
     ├── CatalogError          the catalog cannot be loaded (carries the diagnostics)
 │    └── CatalogUnavailable  no good catalog to serve yet, or an unreadable snapshot of one
     ├── ConfigError           a setting from the environment or flags is unusable
     ├── PolicyViolation       a guarded step or function may not run here/now/for this user
     │    └── ApprovalDenied   a human rejected it or the request expired
     ├── StoreError            the state database is unusable (e.g. newer schema version)
     └── PromotionRefused      `runbookctl promote` found its preconditions unmet

The CLI maps them like click does: a ``RunbookBotError`` exits 1, usage errors exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.catalog.diagnostics import Diagnostic


class RunbookBotError(Exception):
    """Base class: its ``str()`` is safe and useful to show to a person."""


class CatalogError(RunbookBotError):
    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == "error"]
        head = "\n".join(d.format() for d in errors[:20])
        more = f"\n… and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(
            f"the catalog has {len(errors)} error(s); run `runbookctl lint` for details\n"
            f"{head}{more}"
        )


class CatalogUnavailable(CatalogError):
    def __init__(self, message: str, diagnostics: Sequence[Diagnostic] = ()) -> None:
        self.diagnostics = list(diagnostics)
        RunbookBotError.__init__(self, message)


class ConfigError(RunbookBotError):
    pass


class PolicyViolation(RunbookBotError):
    pass


class ApprovalDenied(PolicyViolation):
    pass


class StoreError(RunbookBotError):
    pass


class PromotionRefused(RunbookBotError):
    pass
