"""Which kind a catalog document is, and whether it follows the JSON Schema of that kind.

The schema (``schema.json``, shipped in the package) is the single source of truth for
the format. The verdict comes from a validator generated from it (``fastschema``); only
documents it rejects go through jsonschema, whose errors are worded here for people.

Which kind a document is: its ``kind`` key; else ``actions/`` or ``runbooks/`` folders;
else an action has ``command``, a runbook has ``steps``, settings have ``environments``.
"""

from __future__ import annotations

import json
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


def schema_errors(doc: SourceDoc) -> tuple[list[Diagnostic], Any, tuple[JsonPath, ...]]:
    """What is wrong with `doc` against the schema of its kind, and what of it is usable.

    Returns the diagnostics (none for a valid document), the data the semantic rules may
    read (the document itself when valid, its valid rest when not, None when nothing of
    it can be trusted), and the paths dropped from it (see `schemawords`).
    """
    data = doc.data
    added = doc.kind in ("runbook", "catalog") and "kind" not in data
    if added:  # `kind` may be left out where the folder or the shape tells
        data = {**data, "kind": doc.kind}
    if quick_is_valid(doc.kind, data):
        return [], doc.data, ()
    from bot.catalog.schemawords import explain

    diagnostics, usable, dropped = explain(doc, data)
    if added and isinstance(usable, dict):
        usable.pop("kind", None)
    return diagnostics, usable, dropped
