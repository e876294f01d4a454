"""Which environment an incident acts in: one rule, shared by the bot, simulate, lint, report.

  1. the catalog's ``services`` mapping, matched the way runbooks are matched
     (``bot.catalog.matcher.service_key``): the incident's service name, then its id,
     case-insensitively, so a PagerDuty service ``SVC-PROD`` finds ``svc-prod: prod``;
  2. else the bot's ``RUNBOOK_ENV`` (``default_env``);
  3. else none: every step is blocked (the policy says why), and the bot says so at start.

The mapping has no wildcard, on purpose: a service nobody mapped must never inherit an
environment from a catch-all. It gets ``RUNBOOK_ENV`` or nothing, and nothing is loud.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bot.catalog.matcher import ANY_SERVICE, service_key
from bot.catalog.model import Catalog, Settings

EnvironmentSource = Literal["services-mapping", "RUNBOOK_ENV", "none"]


@dataclass(frozen=True)
class Mapped:
    """A hit in the `services` mapping: the name as the catalog writes it, and its env."""

    name: str
    env: str
    by: Literal["service", "service id"]


@dataclass(frozen=True)
class EnvironmentChoice:
    env: str | None
    source: EnvironmentSource
    detail: str  # one sentence for people: where the environment came from, or how to get one

    @property
    def known(self) -> bool:
        return self.env is not None


def _settings(catalog: Catalog | Settings) -> Settings:
    return catalog.settings if isinstance(catalog, Catalog) else catalog


def mapped_environment(
    catalog: Catalog | Settings, service: str, service_id: str = ""
) -> Mapped | None:
    """The `services` entry for this service name, else for its id; None when neither."""
    index = _settings(catalog).service_environments
    candidates: tuple[tuple[str, Literal["service", "service id"]], ...] = (
        (service, "service"),
        (service_id, "service id"),
    )
    for value, by in candidates:
        hit = index.get(service_key(value)) if value else None
        if hit is not None:
            return Mapped(hit[0], hit[1], by)
    return None


def resolve_environment(
    catalog: Catalog | Settings,
    service: str,
    service_id: str = "",
    default_env: str | None = "",
) -> EnvironmentChoice:
    """The environment of an incident of `service` (or `service_id`), and why."""
    hit = mapped_environment(catalog, service, service_id)
    if hit is not None:
        shown = service if hit.by == "service" else service_id
        spelled = "" if shown == hit.name else f" (as {hit.name!r})"
        return EnvironmentChoice(
            hit.env,
            "services-mapping",
            f"{hit.by} {shown!r} is mapped to {hit.env} under `services`{spelled}",
        )
    if default_env:
        return EnvironmentChoice(
            default_env,
            "RUNBOOK_ENV",
            f"service {service!r} is not under `services`; RUNBOOK_ENV is {default_env}",
        )
    return EnvironmentChoice(
        None,
        "none",
        f"service {service!r} is not under `services` and RUNBOOK_ENV is not set, "
        "so no step can run",
    )


def unmapped_services(catalog: Catalog, default_env: str | None = "") -> list[str]:
    """Services runbooks name that would get no environment (empty when RUNBOOK_ENV is set).

    Each service once (as first written), sorted; ``*`` is left out: it is not a service.
    """
    if default_env:
        return []
    found: dict[str, str] = {}
    for runbook in catalog.runbooks:
        for service in runbook.match.services:
            key = service_key(service)
            if key == ANY_SERVICE or key in found:
                continue
            if mapped_environment(catalog, service) is None:
                found[key] = service
    return [found[key] for key in sorted(found)]


def catch_all_runbooks(catalog: Catalog) -> list[str]:
    """Ids of runbooks that match any service (``*``): their incidents need RUNBOOK_ENV."""
    return [r.id for r in catalog.runbooks if ANY_SERVICE in r.match.services]
