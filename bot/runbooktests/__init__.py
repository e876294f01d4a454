"""Runbook tests (`runbookctl test`): an incident, the outcome to assume for each step, and
the path the runbook must take, run through the bot's own engine with nothing executed.

  files    find test files beside the catalog (its ``tests/`` folder), read them with
           positions, check them against their JSON Schema (``schema.json``)
  runner   run one test on ``bot.local.LocalRuntime`` with a scripted runner, and compare
           what happened with what the test expects

The format is documented in docs/catalog.md ("Runbook tests").
"""

from bot.runbooktests.files import Decision, Outcome, RunbookTest, Suite, read
from bot.runbooktests.runner import Mismatch, Observed, Verdict, run_test, show_path

__all__ = [
    "Decision",
    "Mismatch",
    "Observed",
    "Outcome",
    "RunbookTest",
    "Suite",
    "Verdict",
    "read",
    "run_test",
    "show_path",
]
