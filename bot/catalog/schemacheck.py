"""Which kind a catalog document is, and whether it follows the JSON Schema of that kind.

The schema (``schema.json``, shipped in the package) is the single source of truth for
the format. The verdict comes from a validator generated from it (``fastschema``); only
documents it rejects go through jsonschema, whose errors are worded here for people.

Which kind a document is: its ``kind`` key; else ``actions/`` or ``runbooks/`` folders;
else an action has ``command``, a runbook has ``steps``, settings have ``environments``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.yamlsource import JsonPath, SourceDoc

SCHEMA_FILE = "schema.json"
KINDS = ("catalog", "action", "runbook")


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text())
    return loaded


def schema_path() -> Path:
    return Path(str(resources.files("bot.catalog").joinpath(SCHEMA_FILE)))


@cache
def _validator(kind: str) -> Any:
    from jsonschema import Draft202012Validator

    full = schema()
    return Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": full["$defs"]})


@cache
def schema_text() -> str:
    return resources.files("bot.catalog").joinpath(SCHEMA_FILE).read_text("utf-8")


@cache
def _fast_validators() -> dict[str, Any] | None:
    """kind -> the verdict of the schema, generated from it (None: jsonschema only)."""
    from bot.catalog.fastschema import Unsupported, compiled

    try:
        return compiled(schema_text(), KINDS)
    except Unsupported:  # a keyword the generator does not know: slower, never wrong
        return None


def quick_is_valid(kind: str, data: Any) -> bool:
    """The verdict of the schema of `kind` on `data`, from the generated validator."""
    validators = _fast_validators()
    if validators is None:
        return bool(_validator(kind).is_valid(data))
    return bool(validators[kind](data))


def folders(path: Path, root: Path) -> tuple[str, ...]:
    """The folders between the catalog root and `path` (none for a file outside it)."""
    if not root.is_dir():
        return ()
    try:
        return path.relative_to(root).parts[:-1]
    except ValueError:
        return ()


def detect_kind(doc: SourceDoc, path: Path, root: Path) -> str:
    data = doc.data
    kind = data.get("kind")
    if isinstance(kind, str) and kind in KINDS:
        return kind
    if kind is not None:
        return ""
    parts = folders(path, root)
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


def schema_errors(doc: SourceDoc) -> list[Diagnostic]:
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
