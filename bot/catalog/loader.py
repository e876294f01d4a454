"""Load a catalog directory into typed models, or say exactly what is wrong with it.

Three phases:
  1. parse: every ``*.yaml``/``*.yml`` file under the root (hidden folders skipped) into
     documents with positions (``yamlsource``), each validated against the JSON Schema
     of its kind;
  2. check: the semantic rules (``rules``), which need the whole catalog;
  3. build: frozen models (``model``), only when no error was found.

Which kind a document is: its ``kind`` key; else ``actions/`` or ``runbooks/`` folders;
else an action has ``command``, a runbook has ``steps``, settings have ``environments``.

The ``tests/`` folder at the root of a catalog holds runbook tests (``runbookctl test``,
``bot.runbooktests``), not catalog documents: it is never read as part of the catalog.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.model import (
    DEFAULT_APPROVAL_TIMEOUT_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    LOCAL,
    Action,
    Approvers,
    Catalog,
    Environment,
    Escalation,
    Expectation,
    KubernetesPlacement,
    Limits,
    Location,
    Match,
    OnFailure,
    Placement,
    Promotion,
    Runbook,
    RunnerPlacement,
    Safety,
    Settings,
    Step,
)
from bot.catalog.yamlsource import SourceDoc
from bot.errors import CatalogError


@dataclass
class ParsedCatalog:
    root: str
    docs: list[SourceDoc] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: int = 0
    # Definitions too broken to check, as (kind, id, "file:line"); kind "" when unknown.
    broken: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def of_kind(self, kind: str) -> list[SourceDoc]:
        return [d for d in self.docs if d.kind == kind]


# Runbook tests live here, beside the catalog's documents but not among them.
TESTS_FOLDER = "tests"


def discover_files(root: Path) -> list[Path]:
    """The catalog's YAML files: hidden files and folders, and the `tests/` folder at the
    root (runbook tests), left out."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    seen: set[str] = set()
    # followlinks: Kubernetes mounts ConfigMaps through symlinks; `seen` stops loops.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        at_root = dirpath == str(root)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (at_root and d == TESTS_FOLDER)
        )
        found.extend(
            Path(dirpath, f)
            for f in sorted(filenames)
            if f.endswith((".yaml", ".yml")) and not f.startswith(".")
        )
    return found


CATALOG_MARKERS = ("catalog.yaml", "catalog.yml")


def find_catalog_root(path: str | os.PathLike[str]) -> Path | None:
    """The catalog a file belongs to: the nearest folder above it with a catalog.yaml."""
    folder = Path(path).absolute().parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).is_file() for marker in CATALOG_MARKERS):
            return candidate
    return None


def parse_catalog(
    root: str | os.PathLike[str],
    *,
    run_rules: bool = True,
    jobs: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    only: Sequence[str | os.PathLike[str]] | None = None,
) -> ParsedCatalog:
    """Parse and check a catalog without building models (what `runbookctl lint` runs).

    `jobs`: processes reading files (1, the default, reads in this process only: the
    bot never forks; `runbookctl lint` uses `reader.default_jobs()`; see
    `bot.catalog.reader`). `cache_dir`: remember what each file gave, keyed by
    its content (see `bot.catalog.reader`). `only`: files to report on; the whole
    catalog is still read and checked (a runbook needs its actions), and these files
    too if they lie outside it; `files` then counts them alone.
    """
    from bot.catalog.reader import read_files

    root_path = Path(root)
    parsed = ParsedCatalog(root=str(root_path))
    if not root_path.exists():
        parsed.diagnostics.append(
            Diagnostic(
                "RB009",
                "no-catalog",
                "error",
                f"{root_path} does not exist",
                "pass the catalog directory (default ./runbooks) or set RUNBOOK_CATALOG",
                str(root_path),
            )
        )
        return parsed
    paths = discover_files(root_path)
    wanted: set[Path] | None = None
    if only is not None:
        wanted = {Path(p).resolve() for p in only}
        known = {p.resolve() for p in paths}
        paths.extend(Path(p) for p in only if Path(p).resolve() not in known)
    parsed.files = len(paths) if wanted is None else len(wanted)
    cache = Path(cache_dir) if cache_dir is not None else None
    display = _displayer(root_path)
    results = read_files(paths, root_path, display, jobs=jobs, cache_dir=cache)
    for path, result in zip(paths, results, strict=True):
        parsed.docs.extend(result.docs)
        parsed.diagnostics.extend(result.diagnostics)
        parsed.broken.extend(
            (kind, ident, f"{display(path)}:{line}") for kind, ident, line in result.broken
        )
    if run_rules:
        from bot.catalog import rules

        parsed.diagnostics.extend(rules.check(parsed))
    if wanted is not None:
        parsed.diagnostics = [d for d in parsed.diagnostics if Path(d.file).resolve() in wanted]
    parsed.diagnostics.sort(key=lambda d: (d.file, d.line, d.col, d.code))
    return parsed


def load_catalog(
    root: str | os.PathLike[str], *, commit: str | None = None, with_git: bool = True
) -> Catalog:
    """Load a catalog; raise `CatalogError` with every diagnostic when it has errors."""
    parsed = parse_catalog(root)
    if parsed.has_errors:
        raise CatalogError(parsed.diagnostics)
    dirty = False
    if commit is None:
        commit = os.environ.get("RUNBOOK_CATALOG_COMMIT") or None
    if commit is None and with_git:
        commit, dirty = git_commit(Path(root))
    if commit is None:
        commit = commit_from_path(root)
    return build(parsed, commit=commit, dirty=dirty)


def git_commit(root: Path) -> tuple[str | None, bool]:
    """The commit HEAD points at for the repo holding `root`, and whether root is dirty."""
    where = root if root.is_dir() else root.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return None, False
        # --no-optional-locks: a plain `git status` refreshes the index under index.lock,
        # and the bot asks at every catalog check, so a commit or a git-sync in the same
        # checkout at that moment would fail with "index.lock: File exists".
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return head.stdout.strip() or None, bool(status.stdout.strip())


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, RuntimeError, OSError):  # outside cwd; a symlink loop (RB001 says so)
        return str(path)


def _displayer(root: Path) -> Callable[[Path], str]:
    """How files under `root` are named in diagnostics: relative to the working directory.

    The root is resolved once; a file keeps its path below the root as found (a ConfigMap
    mount's `..data` links are not followed into the hidden folder they point at).
    """
    if root.is_file():
        return lambda path: _display(path)
    base = _display(root)
    # Files come from discover_files as root/…: cutting the root off is enough.
    prefix = "" if str(root) == "." else str(root).rstrip(os.sep) + os.sep

    def display(path: Path) -> str:
        text = str(path)
        if text.startswith(prefix) and not (prefix == "" and os.path.isabs(text)):
            rest = text[len(prefix) :]
            return rest if base == "." else os.path.join(base, rest)
        try:
            return str(Path(base) / path.relative_to(root))
        except ValueError:  # a file linted in the catalog's context from elsewhere
            return _display(path)

    return display


# --- build ---------------------------------------------------------------------------

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    found = _DURATION.match(str(value))
    if not found:
        return default
    return float(found.group(1)) * _UNITS[found.group(2)]


def _approvers(data: Any) -> Approvers | None:
    if not isinstance(data, dict):
        return None
    return Approvers(users=tuple(data.get("users", ())), groups=tuple(data.get("groups", ())))


def _escalation(data: Any) -> Escalation | None:
    if not isinstance(data, dict):
        return None
    return Escalation(mention=data.get("mention", ""), pagerduty=data.get("pagerduty", True))


def build_settings(doc: SourceDoc | None) -> Settings:
    if doc is None:
        return Settings()
    data = doc.data
    defaults = data.get("defaults", {})
    promotion = data.get("promotion", {})
    return Settings(
        environments=tuple(
            Environment(e["name"], bool(e.get("production", False))) for e in data["environments"]
        ),
        approvers=_approvers(data.get("approvers")) or Approvers(),
        runners=_approvers(data.get("runners")),
        channel=data.get("channel", Settings.channel),
        escalation=_escalation(data.get("escalation")) or Escalation(),
        services=dict(data.get("services", {})),
        default_timeout=parse_duration(defaults.get("timeout"), DEFAULT_TIMEOUT_SECONDS),
        approval_timeout=parse_duration(
            defaults.get("approval_timeout"), DEFAULT_APPROVAL_TIMEOUT_SECONDS
        ),
        limits=limits(defaults.get("limits")),
        secret_patterns=tuple(data.get("secret_patterns", ())),
        promotion_min_runs=int(promotion.get("min_successful_runs", Settings.promotion_min_runs)),
        promotion_window=parse_duration(promotion.get("window"), Settings.promotion_window),
        runner_pools=tuple(pool["name"] for pool in data.get("runner_pools", ())),
        service_accounts=tuple(
            (account["namespace"], account["name"])
            for account in data.get("kubernetes", {}).get("service_accounts", ())
        ),
        location=Location(doc.file, *doc.where(())),
    )


def build_action(
    data: dict[str, Any], location: Location, settings: Settings, *, inline: bool = False
) -> Action:
    safety_data = data.get("safety") or {}
    scopes = safety_data.get("scopes")
    safety = Safety(
        requires_approval=bool(safety_data.get("requires_approval", True)),
        scopes=tuple(scopes) if scopes is not None else settings.lower_environments,
        approvers=_approvers(safety_data.get("approvers")),
        runners=_approvers(safety_data.get("runners")),
        approval_timeout=(
            parse_duration(safety_data["approval_timeout"], settings.approval_timeout)
            if "approval_timeout" in safety_data
            else None
        ),
        approvals=int(safety_data.get("approvals", 1)),
        self_approval=bool(safety_data.get("self_approval", False)),
        promotions=tuple(
            Promotion(
                env=p["env"],
                evidence_url=p["evidence_url"],
                by=p.get("by", ""),
                at=p.get("at", ""),
                validated=p.get("validated", ""),
                catalog_commit=p.get("catalog_commit", ""),
                forced=bool(p.get("forced", False)),
                reason=p.get("reason", ""),
            )
            for p in safety_data.get("promotions", ())
        ),
    )
    command = data["command"]
    return Action(
        id=data["id"],
        command=command if isinstance(command, str) else tuple(command),
        location=location,
        description=data.get("description", ""),
        shell=bool(data.get("shell", False)),
        timeout=parse_duration(data.get("timeout"), settings.default_timeout),
        env=dict(data.get("env", {})),
        secrets=tuple(data.get("secrets", ())),
        params=dict(data.get("params", {})) if not inline else {},
        expect=tuple(
            Expectation(e["pattern"], bool(e.get("allow_failure", False)))
            for e in data.get("expect", ())
        ),
        safety=safety,
        inline=inline,
        executor=placement(data.get("executor")),
        limits=limits(data.get("limits")).over(settings.limits),
    )


def limits(data: Any) -> Limits:
    """The model of a `limits:` value the schema accepted (absent: none)."""
    data = data if isinstance(data, dict) else {}
    return Limits(data.get("max_concurrent"), data.get("max_per_hour"))


def placement(data: Any) -> Placement:
    """The model of an `executor:` value the schema accepted (absent: local)."""
    if isinstance(data, dict) and "runner" in data:
        return RunnerPlacement(pool=data["runner"])
    if isinstance(data, dict) and "kubernetes" in data:
        job = data["kubernetes"]
        resources = job.get("resources", {})
        return KubernetesPlacement(
            namespace=job["namespace"],
            image=job["image"],
            service_account=job["service_account"],
            resources={kind: dict(values) for kind, values in resources.items()},
            ttl_seconds_after_finished=job.get("ttl_seconds_after_finished"),
        )
    return LOCAL


def _on_failure(data: Any, actions: dict[str, Action]) -> OnFailure:
    if data is None or data in ("stop", "escalate"):
        return OnFailure("stop")
    if data == "continue":
        return OnFailure("continue")
    rollback = actions.get(data["rollback"])
    return OnFailure("rollback", rollback=rollback, then=data.get("then", "stop"))


def _build_steps(
    doc: SourceDoc, key: str, actions: dict[str, Action], settings: Settings
) -> tuple[Step, ...]:
    steps: list[Step] = []
    for i, raw in enumerate(doc.data.get(key, ())):
        location = Location(doc.file, *doc.where((key, i)))
        if "action" in raw:
            action = actions.get(raw["action"])
            if action is None:  # reported by the rules; never reached when loading
                continue
            if "timeout" in raw:
                action = _with_timeout(action, parse_duration(raw["timeout"], action.timeout))
            params = dict(raw.get("params", {}))
        else:
            action = build_action(raw, location, settings, inline=True)
            params = dict(raw.get("params", {}))
        steps.append(
            Step(
                id=raw.get("id", action.id),
                action=action,
                location=location,
                name=raw.get("name", ""),
                params=params,
                when=raw.get("when"),
                on_failure=_on_failure(raw.get("on_failure"), actions),
            )
        )
    return tuple(steps)


def _with_timeout(action: Action, timeout: float) -> Action:
    from dataclasses import replace

    return replace(action, timeout=timeout)


def build(parsed: ParsedCatalog, *, commit: str | None = None, dirty: bool = False) -> Catalog:
    settings_docs = parsed.of_kind("catalog")
    settings = build_settings(settings_docs[0] if settings_docs else None)
    actions: dict[str, Action] = {}
    for doc in parsed.of_kind("action"):
        action_id = doc.data["id"]
        if action_id not in actions:
            actions[action_id] = build_action(
                doc.data, Location(doc.file, *doc.where(())), settings
            )
    runbooks: list[Runbook] = []
    for doc in parsed.of_kind("runbook"):
        data = doc.data
        match = data["match"]
        runbooks.append(
            Runbook(
                id=data["id"],
                match=Match(
                    services=tuple(match["services"]),
                    symptoms=tuple(match.get("symptoms", ())),
                    priority=int(match.get("priority", 0)),
                ),
                steps=_build_steps(doc, "steps", actions, settings),
                location=Location(doc.file, *doc.where(())),
                title=data.get("title", ""),
                description=data.get("description", ""),
                channel=data.get("channel", ""),
                approvers=_approvers(data.get("approvers")),
                runners=_approvers(data.get("runners")),
                escalation=_escalation(data.get("escalation")),
                resolve_on_success=bool(data.get("resolve_on_success", False)),
                on_resolve=_build_steps(doc, "on_resolve", actions, settings),
            )
        )
    return Catalog(
        settings=settings,
        actions=actions,
        runbooks=tuple(runbooks),
        root=parsed.root,
        commit=commit,
        dirty=dirty,
    )


# --- catalogs read in one go (bot.catalog.source) ------------------------------------------


@dataclass(frozen=True)
class FileContent:
    """One catalog file as read for a snapshot: its bytes, or why they were not read."""

    path: Path  # under the root as configured: names files in messages, tells kinds apart
    data: bytes = b""
    size: int | None = None  # bytes on disk when `data` was left unread (over the limit)
    error: str = ""  # why the file could not be read (strerror)


def parse_contents(
    root: str | os.PathLike[str], contents: Sequence[FileContent], *, run_rules: bool = True
) -> ParsedCatalog:
    """`parse_catalog` over files already read: the same documents, kinds and diagnostics.

    Lets a reload lint exactly the bytes it read (never a file changed since). Keep the
    two in step: tests/test_catalog_source.py checks they agree on every lint case.
    """
    from bot.catalog.reader import file_result
    from bot.catalog.yamlsource import decode_documents

    root_path = Path(root)
    parsed = ParsedCatalog(root=str(root_path))
    display = _displayer(root_path)
    for content in contents:
        parsed.files += 1
        docs, diagnostics = decode_documents(
            content.data, display(content.path), size=content.size, error=content.error
        )
        result = file_result(
            docs,
            diagnostics,
            content.path,
            root_path,
            functools.partial(content.data.decode, "utf-8-sig", errors="replace"),
        )
        parsed.docs.extend(result.docs)
        parsed.diagnostics.extend(result.diagnostics)
        parsed.broken.extend(
            (kind, ident, f"{display(content.path)}:{line}") for kind, ident, line in result.broken
        )
    if run_rules:
        from bot.catalog import rules

        parsed.diagnostics.extend(rules.check(parsed))
    parsed.diagnostics.sort(key=lambda d: (d.file, d.line, d.col, d.code))
    return parsed


_COMMIT_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def commit_from_path(root: str | os.PathLike[str]) -> str | None:
    """The commit a symlink on the way to `root` points at, by its target's name.

    git-sync publishes each commit as ``<root>/.worktrees/<commit>`` and flips a link to
    it (``/git/current``), so ``/git/current/runbooks`` names its commit without git,
    which the bot's image lacks and which would refuse a checkout owned by git-sync's
    user anyway. Only link targets count, not every hex-named folder on the way.
    """
    found: str | None = None
    probe = Path(os.path.abspath(root))
    for depth in range(1, len(probe.parts) + 1):
        prefix = Path(*probe.parts[:depth])
        if prefix.is_symlink():
            name = Path(os.path.realpath(prefix)).name
            if _COMMIT_NAME.fullmatch(name):
                found = name
    return found


def catalog_commit(
    root: str | os.PathLike[str], *, override: str | None = None, with_git: bool = True
) -> tuple[str | None, bool]:
    """Which commit a catalog directory holds, and whether it differs from it (dirty).

    In order: `override` (RUNBOOK_CATALOG_COMMIT), Git (HEAD of the repository holding
    root), the git-sync link (`commit_from_path`); else unknown (None).
    """
    if override:
        return override, False
    if with_git:
        commit, dirty = git_commit(Path(root))
        if commit:
            return commit, dirty
    return commit_from_path(root), False
