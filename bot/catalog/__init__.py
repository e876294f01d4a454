"""The runbook catalog: schema, typed models, loader, matcher and lint rules.

Importing this package must stay cheap: `runbookctl lint` runs on every commit in CI.
Nothing here imports Slack, PagerDuty or the HTTP server.
"""

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import load_catalog, parse_catalog
from bot.catalog.model import (
    Action,
    Approvers,
    Catalog,
    Environment,
    Expectation,
    Match,
    OnFailure,
    Promotion,
    Runbook,
    Safety,
    Settings,
    Step,
)

__all__ = [
    "Action",
    "Approvers",
    "Catalog",
    "Diagnostic",
    "Environment",
    "Expectation",
    "Match",
    "OnFailure",
    "Promotion",
    "Runbook",
    "Safety",
    "Settings",
    "Step",
    "load_catalog",
    "parse_catalog",
]
