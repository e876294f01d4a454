"""Promote an action to a production environment, with evidence, through Git review.

`runbookctl promote` is a thin shell over this module (no click here):

1. **check** (`plan_promotion`): the action exists as its own document (inline steps of a
   runbook cannot be promoted), the environment is declared and is a production one, the
   evidence URL is an ``https`` URL, the action is not promoted there yet, and the audit
   log (``automation_events`` in the bot's database) holds at least ``min_runs``
   successful runs of the action in lower environments within ``window``. Only the
   bot's own rows count (``origin = 'bot'``): runs of ``runbookctl simulate`` (even with
   ``--execute``) and of ``runbookctl test`` are real to nobody else. Too few runs, or a
   bar lowered below the catalog's (fewer runs, a longer window), refuse the promotion
   unless it is forced with a reason, which the record keeps. The runbook tests of the
   runbooks using the action (``runbookctl test``) are run as further evidence: their
   result is recorded, and a failing one refuses the promotion unless it is forced.
2. **edit**: the catalog file, with the environment added to ``safety.scopes`` and a
   promotion record appended to ``safety.promotions``. ruamel.yaml's round trip keeps
   comments, quotes and layout; only the target document is re-emitted, and only after
   checking that it re-emits byte for byte unchanged. Lines outside the action's
   ``safety`` block never change: the edit is refused rather than reformat a file.
3. **apply** / **commit**: write the file (rolled back if the catalog no longer lints),
   and optionally commit it, so the change is reviewed like any other.

Defaults (catalog ``promotion:`` settings, overridable per call): 3 successful runs
within 720 hours (30 days).
"""

from __future__ import annotations

import difflib
import io
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import build, git_commit, parse_catalog
from bot.catalog.model import Catalog
from bot.errors import CatalogError, PromotionRefused
from bot.states import Event

# The lint rule that a promotion fixes: a catalog failing only on it can still be promoted.
UNPROMOTED_SCOPE = "RB025"
SUCCEEDED = str(Event.SUCCEEDED)  # automation_events.status of a command that succeeded


# --- the request and the evidence ----------------------------------------------------------


@dataclass(frozen=True)
class PromotionRequest:
    action_id: str
    env: str
    evidence_url: str
    min_runs: int | None = None  # None: the catalog's promotion.min_successful_runs
    window: float | None = None  # seconds; None: the catalog's promotion.window
    force: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Evidence:
    """Successful runs of one action in lower environments, from the audit log.

    Only rows the bot wrote count; successful runs that `runbookctl simulate` or
    `runbookctl test` left in the same database are reported in `not_counted`.
    """

    action_id: str
    environments: tuple[str, ...]  # the lower environments searched
    window: float
    since: float
    required: int
    db: str
    runs: Mapping[str, int] = field(default_factory=dict)  # env -> successful runs
    incidents: int = 0
    first_run: float | None = None
    last_run: float | None = None
    catalog_commits: tuple[str, ...] = ()  # of the counted runs, most recent first
    not_counted: Mapping[str, int] = field(default_factory=dict)  # origin -> runs
    catalog_required: int | None = None  # the catalog's bar, when the request changed it
    problem: str = ""  # why the audit log could not be read, if it could not

    @property
    def total(self) -> int:
        return sum(self.runs.values())

    @property
    def sufficient(self) -> bool:
        return not self.problem and self.total >= self.required

    def _required_text(self) -> str:
        bar = f"{self.required} required"
        if self.catalog_required is not None and self.catalog_required != self.required:
            bar += f" (the catalog asks for {self.catalog_required})"
        return bar

    def _not_counted_text(self) -> str:
        return ", ".join(
            f"{_plural(n, 'run')} of runbookctl {origin}"
            for origin, n in sorted(self.not_counted.items())
            if n
        )

    def summary(self) -> str:
        """One line for the promotion record and the commit message: how many runs, in
        which environments, over what period, on which catalog commits."""
        if self.problem:
            return f"no evidence read: {self.problem}; {self._required_text()}"
        where = ", ".join(f"{env}: {n}" for env, n in self.runs.items() if n)
        detail = ""
        if self.total:
            detail = (
                f" ({where}; {_plural(self.incidents, 'incident')}, "
                f"{_when(self.first_run or 0)} to {_when(self.last_run or 0)}, "
                f"{_commits_text(self.catalog_commits)})"
            )
        ignored = self._not_counted_text()
        if ignored:
            detail += f" (not counted: {ignored})"
        return (
            f"{_plural(self.total, 'successful run')} in lower environments over the last "
            f"{human_duration(self.window)}{detail}; {self._required_text()}"
        )

    def record(self) -> dict[str, Any]:
        """The structured part of the promotion record (`evidence:` in the catalog)."""
        out: dict[str, Any] = {
            "runs": self.total,
            "required": self.required,
            "environments": {env: n for env, n in self.runs.items() if n},
            "incidents": self.incidents,
        }
        if self.first_run is not None and self.last_run is not None:
            out["first_run"] = _iso(self.first_run)
            out["last_run"] = _iso(self.last_run)
        out["window"] = _duration_text(self.window)
        out["catalog_commits"] = list(self.catalog_commits)
        return out


MAX_COMMITS_SHOWN = 5


def _commits_text(commits: Sequence[str]) -> str:
    if not commits:
        return "no catalog commit recorded"
    shown = ", ".join(commits[:MAX_COMMITS_SHOWN])
    more = len(commits) - MAX_COMMITS_SHOWN
    word = "catalog commit" if len(commits) == 1 else "catalog commits"
    return f"{word} {shown}" + (f" and {more} more" if more > 0 else "")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _duration_text(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# Which rows are the bot's own. A database the bot has not migrated to schema 6 yet has
# no `origin` column: there, the rows of incidents simulate opened are told apart the way
# the migration does it.
_ORIGIN = "origin"
_OLD_ORIGIN = "(CASE WHEN incident_id LIKE 'SIM-%'{inbox} THEN 'simulate' ELSE 'bot' END)"
_SIMULATED_INBOX = " OR incident_id IN (SELECT incident_id FROM inbox WHERE source = 'simulate')"


def _origin_column(conn: sqlite3.Connection) -> str:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(automation_events)")}
    if "origin" in columns:
        return _ORIGIN
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return _OLD_ORIGIN.format(inbox=_SIMULATED_INBOX if "inbox" in tables else "")


def find_evidence(
    db: str | os.PathLike[str],
    action_id: str,
    environments: Sequence[str],
    *,
    window: float,
    required: int,
    now: float | None = None,
) -> Evidence:
    """Count successful runs of `action_id` in `environments` since `now - window`.

    The database is opened read-only: the bot may be writing to it, and a mistyped
    path must not leave an empty database behind.
    """
    now = time.time() if now is None else now
    since = now - window
    evidence = Evidence(
        action_id=action_id,
        environments=tuple(environments),
        window=window,
        since=since,
        required=required,
        db=str(db),
    )
    path = Path(db)
    if not path.is_file():
        return _with(evidence, problem=f"there is no audit database at {db}")
    if not environments:
        return evidence
    marks = ", ".join("?" for _ in environments)
    successes = f"action = ? AND status = ? AND ts >= ? AND env IN ({marks})"
    params = (action_id, SUCCEEDED, since, *environments)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            origin = _origin_column(conn)
            counted = f"{successes} AND {origin} = 'bot'"
            rows = conn.execute(
                "SELECT env, COUNT(*), COUNT(DISTINCT incident_id), MIN(ts), MAX(ts) "
                f"FROM automation_events WHERE {counted} GROUP BY env",
                params,
            ).fetchall()
            commits = conn.execute(
                "SELECT coalesce(catalog_commit, 'unknown') AS commit_id, MAX(ts) AS last "
                f"FROM automation_events WHERE {counted} GROUP BY commit_id "
                "ORDER BY last DESC, commit_id",
                params,
            ).fetchall()
            others = conn.execute(
                f"SELECT {origin} AS o, COUNT(*) FROM automation_events "
                f"WHERE {successes} AND {origin} != 'bot' GROUP BY o",
                params,
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return _with(evidence, problem=f"{db} is not a readable runbook-bot database ({exc})")
    found = {
        str(env): (int(runs), int(incidents), float(first), float(last))
        for env, runs, incidents, first, last in rows
    }
    return _with(
        evidence,
        runs={env: found[env][0] for env in environments if env in found},
        incidents=sum(v[1] for v in found.values()),
        first_run=min((v[2] for v in found.values()), default=None),
        last_run=max((v[3] for v in found.values()), default=None),
        catalog_commits=tuple(str(c) for c, _last in commits),
        not_counted={str(o): int(n) for o, n in others},
    )


def _with(evidence: Evidence, **changes: Any) -> Evidence:
    return replace(evidence, **changes)


# --- runbook tests, as further evidence ------------------------------------------------------


@dataclass(frozen=True)
class TestEvidence:
    """The runbook tests (``runbookctl test``) of the runbooks that use the action, run
    on the catalog being promoted. They show the runbooks take the paths their authors
    meant; only real runs count as runs."""

    __test__ = False  # not a pytest class

    runbooks: tuple[str, ...]  # the runbooks using the action
    passed: int = 0
    failures: tuple[str, ...] = ()  # "file:line 'name': what: expected …; got …"
    files: tuple[str, ...] = ()

    def summary(self) -> str:
        if not self.runbooks:
            return "no runbook uses it"
        total = self.passed + len(self.failures)
        if not total:
            return f"no runbook test of {', '.join(self.runbooks)}"
        return (
            f"{self.passed} of {_plural(total, 'runbook test')} of {', '.join(self.runbooks)} "
            f"passed ({', '.join(self.files)})"
        )


def runbook_test_evidence(catalog: Catalog, action_id: str) -> TestEvidence:
    """Run the catalog's runbook tests whose incident matches a runbook using `action_id`
    (as a step, a rollback or a follow-up on resolve). Invalid test files are left to
    `runbookctl test`: they say nothing for or against this action."""
    from bot.runbooktests.files import catalog_tests_dir, read, yaml_files_under
    from bot.runbooktests.runner import run_test

    using = tuple(
        r.id
        for r in catalog.runbooks
        if any(
            action_id in (s.action.id, s.on_failure.rollback.id if s.on_failure.rollback else "")
            for s in (*r.steps, *r.on_resolve)
        )
    )
    folder = catalog_tests_dir(catalog.root)
    if not using or not folder.is_dir():
        return TestEvidence(using)
    passed, failures, files = 0, [], []
    for test in read(yaml_files_under(folder), _display).tests:
        verdict = run_test(catalog, test)
        if verdict.observed.runbook not in using:
            continue
        files.append(test.file)
        if verdict.passed:
            passed += 1
        else:
            first = verdict.mismatches[0]
            failures.append(
                f"{test.file}:{first.line} {test.name!r}: {first.what}: expected "
                f"{first.expected}; got {first.actual}"
            )
    return TestEvidence(using, passed, tuple(failures), tuple(dict.fromkeys(files)))


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A checked promotion: what the file becomes, and the evidence behind it."""

    request: PromotionRequest
    catalog: Catalog
    path: Path
    before: str
    after: str
    evidence: Evidence
    record: Mapping[str, Any]
    scopes_before: tuple[str, ...]
    scopes_after: tuple[str, ...]
    refusal: str = ""  # set when the evidence falls short and nothing forces it
    tests: TestEvidence | None = None

    @property
    def display_path(self) -> str:
        return _display(self.path)

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=f"a/{self.display_path}",
                tofile=f"b/{self.display_path}",
            )
        )

    def commit_message(self) -> tuple[str, str]:
        """Subject and body of the Git commit."""
        r = self.request
        lines = [
            f"Scopes of {r.action_id}: {', '.join(self.scopes_before) or 'none'} -> "
            f"{', '.join(self.scopes_after)}.",
            f"Evidence: {r.evidence_url}",
            f"Validated: {self.evidence.summary()} (audit log {self.evidence.db}).",
            f"Runbook tests: {self.tests.summary() if self.tests else 'not run'}.",
            f"Catalog commit validated against: {self.record.get('catalog_commit', 'unknown')}.",
            f"Promoted by: {self.record['by']}.",
        ]
        if r.force:
            lines.append(f"FORCED past the evidence check: {r.reason}")
        return f"Promote {r.action_id} to {r.env}", "\n".join(lines)


def plan_promotion(
    catalog_dir: str | os.PathLike[str],
    request: PromotionRequest,
    *,
    db: str | os.PathLike[str],
    now: float | None = None,
    who: str | None = None,
) -> Plan:
    """Check a promotion and compute the edited catalog file; raises `PromotionRefused`.

    A shortfall of evidence does not raise: the plan carries it in `refusal` (so a dry
    run can still show what would change); `Plan.check()` raises it.
    """
    now = time.time() if now is None else now
    if request.force and not request.reason.strip():
        raise PromotionRefused(
            "--force needs --reason TEXT: the reason is recorded in the promotion for review"
        )
    catalog = _load(catalog_dir)
    settings = catalog.settings
    action = catalog.actions.get(request.action_id)
    if action is None:
        raise PromotionRefused(_unknown_action(catalog, request.action_id))
    if request.env not in settings.environment_names:
        raise PromotionRefused(
            f"unknown environment {request.env!r}: the catalog declares "
            f"{', '.join(settings.environment_names)}"
        )
    if not settings.is_production(request.env):
        raise PromotionRefused(
            f"{request.env} is not a production environment: promotion is for production. "
            f"To allow {request.action_id} in {request.env}, add it to safety.scopes in "
            f"{action.location.file}"
        )
    _check_url(request.evidence_url)
    existing = action.safety.promotion_for(request.env)
    if existing is not None and request.env in action.safety.scopes:
        raise PromotionRefused(
            f"{request.action_id} is already promoted to {request.env}"
            f" (by {existing.by or 'unknown'} at {existing.at or 'an unknown time'}, "
            f"evidence {existing.evidence_url})"
        )
    window = settings.promotion_window if request.window is None else request.window
    required = settings.promotion_min_runs if request.min_runs is None else request.min_runs
    evidence = find_evidence(
        db,
        request.action_id,
        settings.lower_environments,
        window=window,
        required=required,
        now=now,
    )
    if required != settings.promotion_min_runs:
        evidence = _with(evidence, catalog_required=settings.promotion_min_runs)
    record: dict[str, Any] = {
        "env": request.env,
        "evidence_url": request.evidence_url,
        "by": who if who is not None else git_identity(Path(catalog.root)),
        "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "validated": evidence.summary(),
        "catalog_commit": catalog.version,
    }
    if request.force:
        record["forced"] = True
        record["reason"] = request.reason.strip()
    tests = runbook_test_evidence(catalog, request.action_id)
    if not evidence.problem:
        record["evidence"] = {**evidence.record(), "runbook_tests": tests.summary()}
    path = Path(action.location.file)
    before = _read(path)
    scopes_before = action.safety.scopes
    after, scopes_after = edit_action_document(
        before,
        request.action_id,
        request.env,
        record,
        default_scopes=settings.lower_environments,
        display=_display(path),
    )
    refusal = ""
    lowered = _lowered_bar(request, settings.promotion_min_runs, settings.promotion_window)
    if lowered and not request.force:
        refusal = _lowered_refusal(request, lowered)
    elif not evidence.sufficient and not request.force:
        refusal = _shortfall(request, evidence)
    elif tests.failures and not request.force:
        refusal = (
            f"refusing to promote {request.action_id} to {request.env}: runbook tests of "
            f"the runbooks using it fail:\n"
            + "\n".join(f"  {f}" for f in tests.failures)
            + "\nFix them (runbookctl test), or pass --force --reason TEXT (recorded)."
        )
    return Plan(
        request=request,
        catalog=catalog,
        path=path,
        before=before,
        after=after,
        evidence=evidence,
        record=record,
        scopes_before=scopes_before,
        scopes_after=scopes_after,
        refusal=refusal,
        tests=tests,
    )


def check(plan: Plan) -> None:
    if plan.refusal:
        raise PromotionRefused(plan.refusal)


def apply(plan: Plan) -> None:
    """Write the promoted file; put the original back if the catalog stops linting."""
    check(plan)
    if _read(plan.path) != plan.before:
        raise PromotionRefused(f"{plan.display_path} changed while promoting; run it again")
    errors_before = {_error_key(d) for d in _errors(plan.catalog.root)}
    plan.path.write_text(plan.after, "utf-8", newline="")
    new_errors = [d for d in _errors(plan.catalog.root) if _error_key(d) not in errors_before]
    if new_errors:
        plan.path.write_text(plan.before, "utf-8", newline="")
        raise PromotionRefused(
            f"the edited {plan.display_path} would not lint, so it was left as it was:\n"
            + "\n".join(d.format() for d in new_errors)
        )


def check_committable(plan: Plan) -> None:
    """Refuse `--commit` when it would also commit someone's unrelated edits."""
    where = plan.path.parent
    if _git(where, "rev-parse", "--is-inside-work-tree") != "true":
        raise PromotionRefused(
            f"{plan.display_path} is not in a Git repository: run without --commit"
        )
    if _git(where, "status", "--porcelain", "--", plan.path.name):
        raise PromotionRefused(
            f"{plan.display_path} has uncommitted changes; commit or stash them first, or "
            "run without --commit and commit by hand"
        )


def commit(plan: Plan) -> str:
    """Commit the promoted file alone (whatever else is staged); returns the commit id."""
    where = plan.path.parent
    subject, body = plan.commit_message()
    for args in (
        ("add", "--", plan.path.name),
        ("commit", "--quiet", "-m", subject, "-m", body, "--", plan.path.name),
    ):
        result = subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise PromotionRefused(
                f"git {args[0]} failed: {(result.stderr or result.stdout).strip()} "
                f"({plan.display_path} is written; commit it by hand)"
            )
    return _git(where, "rev-parse", "HEAD") or ""


def git_identity(where: Path) -> str:
    """Who promotes: the Git user of the catalog's repository, else the login name."""
    for key in ("user.email", "user.name"):
        value = _git(where, "config", key)
        if value:
            return value
    return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


# --- checks and messages -----------------------------------------------------------------------


def _load(catalog_dir: str | os.PathLike[str]) -> Catalog:
    parsed = parse_catalog(catalog_dir)
    blocking = [
        d for d in parsed.diagnostics if d.severity == "error" and d.code != UNPROMOTED_SCOPE
    ]
    if blocking:
        raise CatalogError(blocking)
    commit_id, dirty = git_commit(Path(catalog_dir))
    return build(parsed, commit=commit_id, dirty=dirty)


def _errors(root: str) -> list[Diagnostic]:
    return [d for d in parse_catalog(root).diagnostics if d.severity == "error"]


def _error_key(d: Diagnostic) -> tuple[str, str, str, str]:
    return (d.file, d.code, d.message, d.path)  # not the line: the edit may shift it


def _unknown_action(catalog: Catalog, action_id: str) -> str:
    for runbook in catalog.runbooks:
        for step in (*runbook.steps, *runbook.on_resolve):
            if step.action.inline and action_id in (step.action.id, step.id):
                return (
                    f"{action_id} is an inline step of runbook {runbook.id} "
                    f"({step.location}); only actions in their own document can be "
                    f"promoted: move it to an action file (e.g. actions/{action_id}.yaml) "
                    f"and reference it from the runbook with `action: {action_id}`"
                )
    close = difflib.get_close_matches(action_id, list(catalog.actions), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"no action {action_id!r} in the catalog {catalog.root}{hint}"


def _check_url(url: str) -> None:
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname or url != url.strip():
        raise PromotionRefused(
            f"the evidence URL must be an https:// URL (a dashboard, a ticket, a wiki page "
            f"reviewers can open); got {url!r}"
        )


def _lowered_bar(request: PromotionRequest, min_runs: int, window: float) -> list[str]:
    """The flags that ask for less evidence than the catalog does (an override)."""
    lowered = []
    if request.min_runs is not None and request.min_runs < min_runs:
        lowered.append(
            f"--min-runs {request.min_runs} is below the catalog's "
            f"promotion.min_successful_runs ({min_runs})"
        )
    if request.window is not None and request.window > window:
        lowered.append(
            f"--window {_duration_text(request.window)} is longer than the catalog's "
            f"promotion.window ({_duration_text(window)})"
        )
    return lowered


def _lowered_refusal(request: PromotionRequest, lowered: list[str]) -> str:
    return (
        f"refusing to promote {request.action_id} to {request.env}: "
        f"{' and '.join(lowered)}. Asking for less evidence than the catalog is an "
        "override: pass --force --reason TEXT (the reason is recorded in the promotion for "
        "reviewers), or change the catalog's `promotion:` settings through review."
    )


def _shortfall(request: PromotionRequest, evidence: Evidence) -> str:
    action, envs = request.action_id, ", ".join(evidence.environments) or "none"
    head = f"refusing to promote {action} to {request.env}: "
    if evidence.problem:
        found = (
            f"{evidence.problem}, so no run of {action} can be shown.\n"
            "Point --db (or RUNBOOK_DB) at the bot's database"
        )
    else:
        where = ", ".join(f"{env}: {n}" for env, n in evidence.runs.items() if n)
        ignored = evidence._not_counted_text()
        ignored_text = (
            f" Not counted: {ignored}, which are not runs by the bot on real incidents."
            if ignored
            else ""
        )
        found = (
            f"found {_plural(evidence.total, 'successful run')} of {action} in lower "
            f"environments ({where or envs}) since {_when(evidence.since)} "
            f"(window {human_duration(evidence.window)}) in {evidence.db}; "
            f"at least {evidence.required} are needed.{ignored_text}\n"
            f"Let it prove itself in {envs} first, or change the bar with --min-runs and "
            "--window (or the catalog's `promotion:` settings)"
        )
    return (
        f"{head}{found}, or pass --force --reason TEXT (the reason is recorded in the "
        "promotion for reviewers)."
    )


def human_duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            return _plural(int(seconds // size), unit)
    return _plural(int(seconds), "second") if seconds == int(seconds) else f"{seconds}s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # as it is: keep \r\n line ends


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _git(where: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(where), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# --- the round-trip edit --------------------------------------------------------------------

# (mapping indent, sequence indent, sequence dash offset) styles tried, most common first:
# the one that re-emits the document unchanged is the document's own.
_STYLES = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (4, 4, 0), (2, 4, 0), (3, 3, 1))


def edit_action_document(
    text: str,
    action_id: str,
    env: str,
    record: Mapping[str, Any],
    *,
    default_scopes: Sequence[str],
    display: str = "the catalog file",
) -> tuple[str, tuple[str, ...]]:
    """`text` with `env` in the action's scopes and `record` in its promotions.

    Returns the new text and the new scopes. Only the lines of the action's ``safety``
    block change (or a new block is inserted after the document's last value); when the
    round trip would touch anything else, `PromotionRefused` says what to add by hand.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    lines = text.splitlines(keepends=True)
    start, end = _document_lines(text, action_id, display)
    newline = "\r\n" if lines[start].endswith("\r\n") else "\n"
    body = "".join(lines[start:end]).replace("\r\n", "\n")
    added_newline = not body.endswith("\n")
    if added_newline:
        body += "\n"
    snippet = _snippet(env, record)
    # The style that re-emits the document with the fewest changed lines (none, nearly
    # always); lines it would still change outside the safety block refuse the edit below.
    style = min(_STYLES, key=lambda s: _changed_lines(body, _round_trip(body, s)))
    yaml = _yaml(style)
    data = yaml.load(body)
    safety = data.get("safety")
    if safety is not None and not isinstance(safety, CommentedMap):
        raise PromotionRefused(f"safety of {action_id} in {display} is not a mapping")
    new_block = safety is None
    if safety is None:
        safety = CommentedMap()
    elif safety.fa.flow_style():
        safety.fa.set_block_style()
    scopes = safety.get("scopes")
    if scopes is None:
        # No scopes meant "every lower environment": say so explicitly, plus the new one.
        scopes = CommentedSeq(list(default_scopes))
        scopes.fa.set_flow_style()
        position = 1 if "requires_approval" in safety else 0
        safety.insert(min(position, len(safety)), "scopes", scopes)
    if env not in scopes:
        scopes.append(_styled_like(scopes, env))
    promotions = safety.get("promotions")
    if promotions is None:
        promotions = safety["promotions"] = CommentedSeq()
    promotions.append(_record_map(record))
    scopes_after = tuple(str(s) for s in scopes)

    if new_block:
        # Insert after the document's last value, before its trailing comments.
        insert_at = start + _last_value_line(body)
        block = _dump(yaml, CommentedMap(safety=safety))
        new_lines = [*lines[:insert_at], *_with_newline(block, newline), *lines[insert_at:]]
        if insert_at > 0 and not new_lines[insert_at - 1].endswith(("\n", "\r")):
            new_lines[insert_at - 1] += newline
        return "".join(new_lines), scopes_after

    first, last = _safety_lines(body)
    edited = _keep_trailer_last(body, _dump(yaml, data), first, last)
    if added_newline:
        edited = edited.removesuffix("\n")
    new_body = edited.replace("\n", newline) if newline == "\r\n" else edited
    new_text = "".join(lines[:start]) + new_body + "".join(lines[end:])
    _check_only_safety_changed(lines, new_text, start + first, start + last, display, snippet)
    return new_text, scopes_after


def _document_lines(text: str, action_id: str, display: str) -> tuple[int, int]:
    """First and past-the-last line of the root mapping of the action's document."""
    from ruamel.yaml import YAML
    from ruamel.yaml.nodes import MappingNode, ScalarNode

    for node in YAML().compose_all(text):
        if not isinstance(node, MappingNode):
            continue
        keys = {k.value: v for k, v in node.value if isinstance(k, ScalarNode)}
        ident = keys.get("id")
        if isinstance(ident, ScalarNode) and ident.value == action_id and "steps" not in keys:
            if node.flow_style:
                raise PromotionRefused(
                    f"{action_id} in {display} is written as a flow mapping ({{…}}); "
                    "write it as a block mapping to promote it"
                )
            end = node.end_mark.line + (1 if node.end_mark.column else 0)
            return node.start_mark.line, end
    raise PromotionRefused(f"no document with `id: {action_id}` in {display}")


def _yaml(style: tuple[int, int, int]) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip
    yaml.preserve_quotes = True
    yaml.width = 100_000  # never fold a long command line
    yaml.indent(mapping=style[0], sequence=style[1], offset=style[2])
    return yaml


def _dump(yaml: Any, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _round_trip(body: str, style: tuple[int, int, int]) -> str:
    yaml = _yaml(style)
    return _dump(yaml, yaml.load(body))


def _changed_lines(old: str, new: str) -> int:
    if old == new:
        return 0
    matcher = difflib.SequenceMatcher(a=old.splitlines(), b=new.splitlines())
    return sum(
        max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"
    )


def _styled_like(scopes: Any, value: str) -> Any:
    """A new scope quoted the way the existing ones are (`["staging", "prod"]`)."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

    for item in scopes:
        if isinstance(item, DoubleQuotedScalarString):
            return DoubleQuotedScalarString(value)
        if isinstance(item, SingleQuotedScalarString):
            return SingleQuotedScalarString(value)
    return value


_TIMESTAMP_KEYS = frozenset({"at", "first_run", "last_run"})


def _record_map(record: Mapping[str, Any]) -> Any:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    out = CommentedMap()
    for key, value in record.items():
        if key in _TIMESTAMP_KEYS:
            # it must stay a string: unquoted, YAML would read it as a timestamp
            out[key] = DoubleQuotedScalarString(value)
        elif isinstance(value, Mapping) and key == "evidence":
            out[key] = _record_map(value)
        elif isinstance(value, Mapping | list):
            # short values on one line: `environments: {staging: 3}`, `catalog_commits: [..]`
            flow = CommentedMap(value) if isinstance(value, Mapping) else CommentedSeq(value)
            flow.fa.set_flow_style()
            out[key] = flow
        else:
            out[key] = value
    return out


def _snippet(env: str, record: Mapping[str, Any]) -> str:
    lines = [f"  scopes: [..., {env}]", "  promotions:"]
    for i, (key, value) in enumerate(record.items()):
        shown = json.dumps(value)  # JSON scalars are YAML: quoted and escaped as needed
        lines.append(f"    {'- ' if i == 0 else '  '}{key}: {shown}")
    return "\n".join(lines)


def _nodes(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node.value, list):
        for child in node.value:
            if isinstance(child, tuple):
                yield from _nodes(child[0])
                yield from _nodes(child[1])
            else:
                yield from _nodes(child)


def _last_value_line(body: str) -> int:
    """The line after the last value of the document (its trailing comments follow)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.nodes import ScalarNode

    root = YAML().compose(body)
    ends = [n.end_mark for n in _nodes(root) if isinstance(n, ScalarNode) or n.flow_style]
    last = max(ends, key=lambda m: (m.line, m.column))
    return int(last.line) + (1 if last.column else 0)


def _safety_lines(body: str) -> tuple[int, int]:
    """Lines of the `safety` key and its value, up to the next key of the document."""
    from ruamel.yaml import YAML
    from ruamel.yaml.nodes import ScalarNode

    root = YAML().compose(body)
    keys = [k for k, _ in root.value if isinstance(k, ScalarNode)]
    for i, key in enumerate(keys):
        if key.value == "safety":
            after = keys[i + 1].start_mark.line if i + 1 < len(keys) else len(body.splitlines())
            return int(key.start_mark.line), int(after)
    return len(body.splitlines()), len(body.splitlines())


def _keep_trailer_last(old: str, new: str, first: int, last: int) -> str:
    """Put comment and blank lines that ended the safety block back at its end.

    ruamel.yaml attaches the comments after a block to its last value, so an item
    appended after that value would land below them: a comment introducing the next key
    (or ending the document) would end up inside the new promotion record.
    """
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    cut = last
    while cut > first + 1 and _comment_or_blank(old_lines[cut - 1]):
        cut -= 1
    trailer = old_lines[cut:last]
    new_last = last + len(new_lines) - len(old_lines)
    region = new_lines[first:new_last]
    if not trailer or region[-len(trailer) :] == trailer:
        return new
    for i in range(len(region) - len(trailer), -1, -1):
        if region[i : i + len(trailer)] == trailer:
            region = region[:i] + region[i + len(trailer) :] + trailer
            return "".join(new_lines[:first] + region + new_lines[new_last:])
    return new


def _comment_or_blank(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _check_only_safety_changed(
    old_lines: list[str], new_text: str, first: int, last: int, display: str, snippet: str
) -> None:
    matcher = difflib.SequenceMatcher(a=old_lines, b=new_text.splitlines(keepends=True))
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag != "equal" and not (first <= i1 and i2 <= last):
            raise PromotionRefused(
                f"editing {display} would reformat lines outside the safety block (line "
                f"{i1 + 1}: {old_lines[min(i1, len(old_lines) - 1)].strip()!r}), so it was "
                f"left as it is; add this to the safety block by hand:\n{snippet}"
            )


def _with_newline(block: str, newline: str) -> list[str]:
    return [line + newline for line in block.splitlines()]
