"""Typed, immutable models of a loaded catalog.

The loader (``bot.catalog.loader``) builds these from YAML after the schema and the
semantic rules passed, so code that receives a ``Catalog`` can rely on references being
resolved, regexes compiled and defaults applied (safe by default: approval required and
only non-production scopes unless the YAML says otherwise).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ParamValue = str | int | float | bool | None

DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_APPROVAL_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class Location:
    file: str
    line: int = 1
    col: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Environment:
    name: str
    production: bool = False


@dataclass(frozen=True)
class Approvers:
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)


@dataclass(frozen=True)
class Expectation:
    pattern: str
    allow_failure: bool = False

    @property
    def regex(self) -> re.Pattern[str]:
        return _compiled(self.pattern)


@functools.cache
def _compiled(pattern: str, flags: int = re.MULTILINE) -> re.Pattern[str]:
    return re.compile(pattern, flags)


@dataclass(frozen=True)
class Promotion:
    env: str
    evidence_url: str
    by: str = ""
    at: str = ""
    validated: str = ""
    catalog_commit: str = ""
    forced: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Safety:
    requires_approval: bool = True
    scopes: tuple[str, ...] = ()
    approvers: Approvers | None = None  # None: inherit from the runbook, then the catalog
    approval_timeout: float | None = None  # None: the catalog default
    promotions: tuple[Promotion, ...] = ()
    approvals: int = 1  # distinct approvers needed (2: the two-person rule)
    runners: Approvers | None = None  # who may start it by hand; None: inherit
    self_approval: bool = False  # the starter of a manual run may approve its steps

    def promotion_for(self, env: str) -> Promotion | None:
        return next((p for p in self.promotions if p.env == env), None)


@dataclass(frozen=True)
class LocalPlacement:
    """`executor: local`: on the bot's own host, under its step supervisors."""

    kind: Literal["local"] = "local"

    def __str__(self) -> str:
        return "local"


@dataclass(frozen=True)
class RunnerPlacement:
    """`executor: {runner: POOL}`: a pull runner of POOL, where the systems are."""

    pool: str
    kind: Literal["runner"] = "runner"

    def __str__(self) -> str:
        return f"runner pool {self.pool}"


@dataclass(frozen=True)
class KubernetesPlacement:
    """`executor: {kubernetes: …}`: a Kubernetes Job in `namespace`, as `service_account`."""

    namespace: str
    image: str
    service_account: str
    # {"requests": {"cpu": "100m"}, "limits": {"memory": "128Mi"}}
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ttl_seconds_after_finished: int | None = None
    kind: Literal["kubernetes"] = "kubernetes"

    def __str__(self) -> str:
        return f"Kubernetes namespace {self.namespace}"


Placement = LocalPlacement | RunnerPlacement | KubernetesPlacement


@dataclass(frozen=True)
class Limits:
    """`limits:` of an action (or the catalog's `defaults`): how many of its steps may run
    at once and may start in an hour, across incidents. None: no limit."""

    max_concurrent: int | None = None
    max_per_hour: int | None = None

    def over(self, defaults: Limits) -> Limits:
        """These limits, each unset one taken from `defaults`."""
        return Limits(
            self.max_concurrent if self.max_concurrent is not None else defaults.max_concurrent,
            self.max_per_hour if self.max_per_hour is not None else defaults.max_per_hour,
        )


LOCAL = LocalPlacement()


@dataclass(frozen=True)
class Action:
    id: str
    command: str | tuple[str, ...]
    location: Location
    description: str = ""
    shell: bool = False
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    expect: tuple[Expectation, ...] = ()
    safety: Safety = Safety()
    inline: bool = False  # declared inside a runbook step rather than as its own document
    # Run by the program that asked (a bot.guard decorator), never by the bot: the bot
    # only asks for approval and records what the program reports.
    external: bool = False
    executor: Placement = LOCAL  # where the command runs
    limits: Limits = Limits()  # with the catalog's defaults applied

    @property
    def command_text(self) -> str:
        if isinstance(self.command, str):
            return self.command
        import shlex

        return shlex.join(self.command)


OnFailureMode = Literal["stop", "continue", "rollback"]


@dataclass(frozen=True)
class OnFailure:
    mode: OnFailureMode = "stop"
    rollback: Action | None = None
    then: Literal["stop", "continue"] = "stop"  # after a rollback


@dataclass(frozen=True)
class Step:
    id: str  # unique within its runbook; the action id unless the step names itself
    action: Action
    location: Location
    name: str = ""
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    when: str | None = None
    on_failure: OnFailure = OnFailure()

    @property
    def resolved_params(self) -> dict[str, ParamValue]:
        return {**self.action.params, **self.params}


@dataclass(frozen=True)
class Escalation:
    mention: str = ""
    pagerduty: bool = True


@dataclass(frozen=True)
class Match:
    services: tuple[str, ...]
    symptoms: tuple[str, ...] = ()
    priority: int = 0

    @property
    def symptom_regexes(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compiled(s, re.IGNORECASE) for s in self.symptoms)


@dataclass(frozen=True)
class Runbook:
    id: str
    match: Match
    steps: tuple[Step, ...]
    location: Location
    title: str = ""
    description: str = ""
    channel: str = ""  # empty: the catalog's default channel
    approvers: Approvers | None = None
    runners: Approvers | None = None  # who may start it by hand; None: inherit
    escalation: Escalation | None = None
    resolve_on_success: bool = False
    on_resolve: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Settings:
    environments: tuple[Environment, ...] = (
        Environment("dev"),
        Environment("staging"),
        Environment("prod", production=True),
    )
    approvers: Approvers = Approvers()
    runners: Approvers | None = None  # who may start runbooks by hand; None: the approvers
    channel: str = "#incidents"
    escalation: Escalation = Escalation()
    services: Mapping[str, str] = field(default_factory=dict)  # service name/id -> environment
    default_timeout: float = DEFAULT_TIMEOUT_SECONDS
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT_SECONDS
    limits: Limits = Limits()  # defaults.limits: for actions that set none of their own
    secret_patterns: tuple[str, ...] = ()
    promotion_min_runs: int = 3
    promotion_window: float = 30 * 86400.0
    runner_pools: tuple[str, ...] = ()  # pools `executor: {runner: POOL}` may name
    service_accounts: tuple[tuple[str, str], ...] = ()  # (namespace, name) for Kubernetes
    location: Location | None = None

    @property
    def environment_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.environments)

    @property
    def lower_environments(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.environments if not e.production)

    def is_production(self, env: str) -> bool:
        return any(e.name == env and e.production for e in self.environments)

    @functools.cached_property
    def service_environments(self) -> Mapping[str, tuple[str, str]]:
        """`services` keyed as the matcher compares services: key -> (name as written, env).

        Two names that differ only in case are one service; the first one written wins
        (lint reports the pair as RB039 when their environments differ).
        """
        from bot.catalog.matcher import service_key

        index: dict[str, tuple[str, str]] = {}
        for name, env in self.services.items():
            index.setdefault(service_key(name), (name, env))
        return index


@dataclass(frozen=True)
class Catalog:
    settings: Settings
    actions: Mapping[str, Action]
    runbooks: tuple[Runbook, ...]
    root: str
    commit: str | None = None  # the Git commit the catalog was loaded from, when known
    dirty: bool = False  # the working tree differs from `commit`

    @property
    def version(self) -> str:
        """What audit rows record as the catalog version."""
        if not self.commit:
            return "unversioned"
        return f"{self.commit[:12]}-dirty" if self.dirty else self.commit[:12]

    def runbook(self, runbook_id: str) -> Runbook | None:
        return next((r for r in self.runbooks if r.id == runbook_id), None)

    def approvers_for(self, runbook: Runbook | None, action: Action) -> Approvers:
        """The nearest declaration wins: action, then runbook, then catalog."""
        if action.safety.approvers is not None:
            return action.safety.approvers
        if runbook is not None and runbook.approvers is not None:
            return runbook.approvers
        return self.settings.approvers

    def runners_for(self, runbook: Runbook, action: Action | None = None) -> Approvers:
        """Who may start `runbook` (or its step of `action`) by hand: the nearest
        `runners` (action, runbook, catalog) wins; without any, the approvers."""
        for declared in (
            action.safety.runners if action else None,
            runbook.runners,
            self.settings.runners,
        ):
            if declared is not None:
                return declared
        if action is not None:
            return self.approvers_for(runbook, action)
        return runbook.approvers if runbook.approvers is not None else self.settings.approvers

    def approval_timeout_for(self, action: Action) -> float:
        if action.safety.approval_timeout is not None:
            return action.safety.approval_timeout
        return self.settings.approval_timeout

    def channel_for(self, runbook: Runbook | None) -> str:
        return (runbook.channel if runbook and runbook.channel else "") or self.settings.channel

    def escalation_for(self, runbook: Runbook | None) -> Escalation:
        if runbook is not None and runbook.escalation is not None:
            return runbook.escalation
        return self.settings.escalation

    def environment_for_service(self, service: str, service_id: str = "") -> str | None:
        """The environment the `services` mapping gives (name, then id; any case), or None.

        Only the mapping: `bot.catalog.environment.resolve_environment` adds RUNBOOK_ENV.
        """
        from bot.catalog.environment import mapped_environment

        found = mapped_environment(self.settings, service, service_id)
        return found.env if found else None

    def match(
        self, service: str, symptom: str = "", *, service_id: str = "", details: str = ""
    ) -> Runbook | None:
        from bot.catalog.matcher import best_match

        return best_match(self.runbooks, service, symptom, service_id=service_id, details=details)

    def next_steps(self, service: str, symptom: str = "", **kwargs: str) -> tuple[Step, ...]:
        """The ordered steps of the runbook for this service and symptom (empty: none)."""
        runbook = self.match(service, symptom, **kwargs)
        return runbook.steps if runbook else ()
