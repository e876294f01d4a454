"""Load a catalog directory into typed models, or say exactly what is wrong with it.

Three phases:
  1. parse: every ``*.yaml``/``*.yml`` file under the root (hidden folders skipped) into
     documents with positions (``yamlsource``), each validated against the JSON Schema
     of its kind;
  2. check: the semantic rules (``rules``), which need the whole catalog;
  3. build: frozen models (``model``), only when no error was found.

Which kind a document is: its ``kind`` key; else ``actions/`` or ``runbooks/`` folders;
else an action has ``command``, a runbook has ``steps``, settings have ``environments``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.model import (
    DEFAULT_APPROVAL_TIMEOUT_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    Action,
    Approvers,
    Catalog,
    Environment,
    Escalation,
    Expectation,
    Location,
    Match,
    OnFailure,
    Promotion,
    Runbook,
    Safety,
    Settings,
    Step,
)
from bot.catalog.yamlsource import JsonPath, SourceDoc, read_documents
from bot.errors import CatalogError

SCHEMA_FILE = "schema.json"
KINDS = ("catalog", "action", "runbook")


@cache
def schema() -> dict[str, Any]:
    text = resources.files("bot.catalog").joinpath(SCHEMA_FILE).read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def schema_path() -> Path:
    return Path(str(resources.files("bot.catalog").joinpath(SCHEMA_FILE)))


@cache
def _validator(kind: str) -> Any:
    from jsonschema import Draft202012Validator

    full = schema()
    return Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": full["$defs"]})


@cache
def _fast_validators() -> dict[str, Any] | None:
    """kind -> the verdict of the schema, generated from it (None: jsonschema only)."""
    from bot.catalog.fastschema import Unsupported, compiled

    text = resources.files("bot.catalog").joinpath(SCHEMA_FILE).read_text("utf-8")
    try:
        return compiled(text, KINDS)
    except Unsupported:  # a keyword the generator does not know: slower, never wrong
        return None


def quick_is_valid(kind: str, data: Any) -> bool:
    """The verdict of the schema of `kind` on `data`, from the generated validator."""
    validators = _fast_validators()
    if validators is None:
        return bool(_validator(kind).is_valid(data))
    return bool(validators[kind](data))


@dataclass
class ParsedCatalog:
    root: str
    docs: list[SourceDoc] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: int = 0

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def of_kind(self, kind: str) -> list[SourceDoc]:
        return [d for d in self.docs if d.kind == kind]


def discover_files(root: Path) -> list[Path]:
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
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, f)
            for f in sorted(filenames)
            if f.endswith((".yaml", ".yml")) and not f.startswith(".")
        )
    return found


def parse_catalog(root: str | os.PathLike[str], *, run_rules: bool = True) -> ParsedCatalog:
    """Parse and check a catalog without building models (what `runbookctl lint` runs)."""
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
    display = _displayer(root_path)
    for path in discover_files(root_path):
        parsed.files += 1
        docs, diagnostics = read_documents(path, display(path))
        parsed.diagnostics.extend(diagnostics)
        for doc in docs:
            doc.kind = _detect_kind(doc, path, root_path)
            if not doc.kind:
                parsed.diagnostics.append(
                    doc.diagnostic(
                        "RB010",
                        "schema",
                        "cannot tell whether this document is an action, a runbook or the "
                        "catalog settings",
                        "add `kind: action`, `kind: runbook` or `kind: catalog`",
                    )
                )
                continue
            errors = _schema_errors(doc)
            parsed.diagnostics.extend(errors)
            if not errors:
                parsed.docs.append(doc)
    if run_rules:
        from bot.catalog import rules

        parsed.diagnostics.extend(rules.check(parsed))
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
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
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
    except ValueError:
        return str(path)


def _displayer(root: Path) -> Callable[[Path], str]:
    """How files under `root` are named in diagnostics: relative to the working directory.

    The root is resolved once; a file keeps its path below the root as found (a ConfigMap
    mount's `..data` links are not followed into the hidden folder they point at).
    """
    if root.is_file():
        return lambda path: _display(path)
    base = Path(_display(root))
    return lambda path: str(base / path.relative_to(root))


def _detect_kind(doc: SourceDoc, path: Path, root: Path) -> str:
    data = doc.data
    kind = data.get("kind")
    if isinstance(kind, str) and kind in KINDS:
        return kind
    if kind is not None:
        return ""
    parts = path.relative_to(root).parts[:-1] if root.is_dir() else ()
    if "actions" in parts:
        return "action"
    if "runbooks" in parts and "steps" in data:
        return "runbook"
    if "command" in data and "steps" not in data:
        return "action"
    if "steps" in data:
        return "runbook"
    if "environments" in data:
        return "catalog"
    return ""


_MAX_SCHEMA_ERRORS = 10


def _schema_errors(doc: SourceDoc) -> list[Diagnostic]:
    data = doc.data
    if doc.kind == "runbook" and "kind" not in data:
        data = {**data, "kind": "runbook"}
    elif doc.kind == "catalog" and "kind" not in data:
        data = {**data, "kind": "catalog"}
    if quick_is_valid(doc.kind, data):
        return []
    validator = _validator(doc.kind)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path)))
    # A failing `allOf` branch leaves its keys "unevaluated", so unevaluatedProperties
    # would blame every valid key too: report it only when nothing else is wrong.
    if any(e.validator != "unevaluatedProperties" for e in errors):
        errors = [e for e in errors if e.validator != "unevaluatedProperties"]
    found: list[Diagnostic] = []
    for error in errors:
        if error.context:
            error = _closest(error)
        path: JsonPath = tuple(error.absolute_path)
        if (
            _is_step(path)
            and error.validator in ("required", "not")
            and isinstance(error.instance, dict)
        ):
            found.extend(_step_shape_errors(doc, error, path))
            continue
        key_names = _offending_keys(error)
        message = _shorten(error.message)
        fix = _fix_for(error, doc.kind)
        if key_names:
            for name in key_names:
                found.append(
                    doc.diagnostic("RB010", "schema", message, fix, (*path, name), key=True)
                )
        else:
            found.append(doc.diagnostic("RB010", "schema", message, fix, path))
        if len(found) >= _MAX_SCHEMA_ERRORS:
            break
    return found


def _is_step(path: JsonPath) -> bool:
    return len(path) == 2 and path[0] in ("steps", "on_resolve") and isinstance(path[1], int)


def _closest(error: Any) -> Any:
    """The sub-error of a `oneOf`/`anyOf` that best explains what the author meant.

    For a step, that is the branch its keys point at: `action:` means a reference,
    anything else an inline step; jsonschema alone would often blame the other branch.
    """
    from jsonschema.exceptions import best_match

    context = error.context
    step = error.instance
    if (
        error.validator == "oneOf"
        and _is_step(tuple(error.absolute_path))
        and isinstance(step, dict)
    ):
        branch = 0 if "action" in step else 1
        chosen = [e for e in context if e.relative_schema_path[0] == branch]
        context = chosen or context
    return best_match(context)


_STEP_OVERRIDES = ("command", "shell", "safety", "expect", "env", "secrets")


def _step_shape_errors(doc: SourceDoc, error: Any, step_path: JsonPath) -> list[Diagnostic]:
    step = error.instance
    if "action" not in step and "command" in step and "id" not in step:
        return [
            doc.diagnostic(
                "RB033",
                "inline-step-id",
                "an inline step (one with `command`) needs an `id`",
                "add `id: <name>` (lower-case, unique in the runbook), or move the command "
                "into an action and reference it with `action: <id>`",
                step_path,
            )
        ]
    if error.validator == "not" and "action" in step:
        return [
            doc.diagnostic(
                "RB010",
                "schema",
                f"a step that references an action cannot set `{key}`",
                _fix_for(error, doc.kind),
                (*step_path, key),
                key=True,
            )
            for key in _STEP_OVERRIDES
            if key in step
        ]
    return [
        doc.diagnostic(
            "RB010", "schema", _shorten(error.message), _fix_for(error, doc.kind), step_path
        )
    ]


def _offending_keys(error: Any) -> list[str]:
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        return re.findall(r"'([^']+)'", error.message.split("(")[-1])
    return []


def _fix_for(error: Any, kind: str) -> str:
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(_allowed_keys(error.schema))
        if allowed:
            return f"remove or rename it; allowed keys here: {', '.join(allowed)}"
        return "remove or rename it (see docs/catalog.md)"
    if error.validator == "required":
        return "add the missing key (see docs/catalog.md)"
    if error.validator == "not" and kind == "runbook":
        return (
            "a step that references an action cannot change its command, expect or safety; "
            "change the action itself, or write an inline step with its own id"
        )
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    if description:
        return str(description)
    return f"see the {kind} format in docs/catalog.md"


def _allowed_keys(subschema: dict[str, Any]) -> set[str]:
    keys = set(subschema.get("properties", {}))
    for part in subschema.get("allOf", ()):
        ref = part.get("$ref", "")
        if ref.startswith("#/$defs/"):
            keys |= _allowed_keys(schema()["$defs"][ref.removeprefix("#/$defs/")])
    return keys


def _shorten(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


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
        channel=data.get("channel", Settings.channel),
        escalation=_escalation(data.get("escalation")) or Escalation(),
        services=dict(data.get("services", {})),
        default_timeout=parse_duration(defaults.get("timeout"), DEFAULT_TIMEOUT_SECONDS),
        approval_timeout=parse_duration(
            defaults.get("approval_timeout"), DEFAULT_APPROVAL_TIMEOUT_SECONDS
        ),
        secret_patterns=tuple(data.get("secret_patterns", ())),
        promotion_min_runs=int(promotion.get("min_successful_runs", Settings.promotion_min_runs)),
        promotion_window=parse_duration(promotion.get("window"), Settings.promotion_window),
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
        approval_timeout=(
            parse_duration(safety_data["approval_timeout"], settings.approval_timeout)
            if "approval_timeout" in safety_data
            else None
        ),
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
    )


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
