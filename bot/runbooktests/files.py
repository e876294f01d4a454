"""Runbook test files: found beside the catalog, read with positions, checked by their schema.

A test file is YAML in the ``tests/`` folder at the root of a catalog; each document is one
test (``kind: test``). Files are read by the catalog's own reader (``yamlsource``: the same
safe loading, positions and YAML-slip hints as lint) and checked against ``schema.json``
(draft 2020-12, shipped beside this module), with errors that name the place in words, the
line and column, and the fix, like lint's.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import TESTS_FOLDER, find_catalog_root
from bot.catalog.yamlsource import JsonPath, SourceDoc, read_documents

SCHEMA_FILE = "schema.json"
DEFAULT_INCIDENT_ID = "TEST-1"
# Rule codes of test files (the YAML reader's own, RB001-RB005, are kept as they are).
SCHEMA_CODE, SCHEMA_RULE = "RT010", "test-schema"
CONFLICT_CODE, CONFLICT_RULE = "RT011", "conflicting-outcome"
DUPLICATE_CODE, DUPLICATE_RULE = "RT012", "duplicate-test-name"

Verb = Literal["approved", "rejected", "expired", "pending"]


@dataclass(frozen=True)
class Decision:
    """How an approval request is decided: by whom (empty: its first approver)."""

    verb: Verb
    user: str = ""

    @classmethod
    def parse(cls, text: str) -> Decision:
        verb, _, user = text.partition(" by ")
        return cls(verb=verb, user=user)  # type: ignore[arg-type]  # the schema's pattern

    def __str__(self) -> str:
        return f"{self.verb} by {self.user}" if self.user else self.verb


@dataclass(frozen=True)
class Outcome:
    """What to assume for one step: the decision on its approval, and its command's end."""

    approval: Decision | None = None
    exit_code: int | None = None
    output: str = ""
    timeout: bool = False
    error: str = ""

    @property
    def has_result(self) -> bool:
        return self.exit_code is not None or self.timeout or bool(self.error)


@dataclass(frozen=True)
class RunbookTest:
    """One test: an incident, assumed outcomes and the expected path."""

    file: str
    line: int
    name: str
    incident: Mapping[str, Any]  # the fields of bot.engine.Incident
    expect: Mapping[str, Any]
    steps: Mapping[str, Outcome] = field(default_factory=dict)
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    runbook_env: str = ""
    resolve: bool = False
    doc: SourceDoc | None = field(default=None, repr=False, compare=False)

    def where(self, *path: str | int, key: bool = False) -> int:
        """The line of a value (or its key) of this test, for messages."""
        if self.doc is None:
            return self.line
        return self.doc.where(tuple(path), key=key)[0]


@dataclass
class Suite:
    """What was read: the tests, and what is wrong with the files that hold them."""

    tests: list[RunbookTest] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: int = 0


# --- where tests are ----------------------------------------------------------------------


def catalog_tests_dir(catalog_root: str | os.PathLike[str]) -> Path:
    return Path(catalog_root) / TESTS_FOLDER


def yaml_files_under(path: Path) -> list[Path]:
    """The YAML files of a test folder (hidden ones skipped), or the file itself."""
    if path.is_file():
        return [path]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, f)
            for f in sorted(filenames)
            if f.endswith((".yaml", ".yml")) and not f.startswith(".")
        )
    return found


def catalog_of(path: Path) -> Path | None:
    """The catalog a test file or folder belongs to: the nearest folder above it with a
    catalog.yaml (for `runbooks/tests/x.yaml`, `runbooks`)."""
    return find_catalog_root(path / "x" if path.is_dir() else path)


# --- reading --------------------------------------------------------------------------------


def read(paths: Iterable[Path], display: Any = str) -> Suite:
    """Read and check every test of `paths` (files); `display` names files in messages."""
    out = Suite()
    for path in paths:
        out.files += 1
        docs, diagnostics = read_documents(path, display(path))
        out.diagnostics.extend(diagnostics)
        names: dict[str, int] = {}
        for doc in docs:
            test, problems = _test_of(doc)
            out.diagnostics.extend(problems)
            if test is None:
                continue
            if test.name in names:
                out.diagnostics.append(
                    doc.diagnostic(
                        DUPLICATE_CODE,
                        DUPLICATE_RULE,
                        f"a second test named {test.name!r} in this file "
                        f"(the first is on line {names[test.name]})",
                        "give each test of a file its own name: it is how the report names it",
                        ("name",),
                    )
                )
                continue
            names[test.name] = test.line
            out.tests.append(test)
    out.diagnostics.sort(key=lambda d: (d.file, d.line, d.col, d.code))
    return out


def _test_of(doc: SourceDoc) -> tuple[RunbookTest | None, list[Diagnostic]]:
    data = doc.data
    problems = schema_errors(doc)
    if problems:
        return None, problems
    for step_id, outcome in data.get("steps", {}).items():
        ends = [k for k in ("exit_code", "timeout", "error") if k in outcome]
        if len(ends) > 1:
            problems.append(
                doc.diagnostic(
                    CONFLICT_CODE,
                    CONFLICT_RULE,
                    f"step {step_id!r} ends in two ways at once: {', '.join(ends)}",
                    "keep one: `exit_code` (with `output`) for a command that ran, "
                    "`timeout: true` for one killed at its timeout, `error` for one that "
                    "could not start",
                    ("steps", step_id, ends[1]),
                    key=True,
                )
            )
        elif "output" in outcome and not ends:
            problems.append(
                doc.diagnostic(
                    CONFLICT_CODE,
                    CONFLICT_RULE,
                    f"step {step_id!r} has an output but no exit code",
                    "add `exit_code: 0` (or the code the command exits with)",
                    ("steps", step_id, "output"),
                    key=True,
                )
            )
    if problems:
        return None, problems
    incident = dict(data["incident"])
    incident.setdefault("id", DEFAULT_INCIDENT_ID)
    incident.setdefault("urgency", "high")
    return (
        RunbookTest(
            file=doc.file,
            line=doc.where(())[0],
            name=data["name"],
            incident=incident,
            expect=data["expect"],
            steps={step_id: _outcome(o) for step_id, o in data.get("steps", {}).items()},
            members={g: tuple(users) for g, users in data.get("members", {}).items()},
            runbook_env=data.get("runbook_env", ""),
            resolve=bool(data.get("resolve", False)),
            doc=doc,
        ),
        [],
    )


def _outcome(data: Mapping[str, Any]) -> Outcome:
    approval = data.get("approval")
    return Outcome(
        approval=Decision.parse(approval) if approval is not None else None,
        exit_code=data.get("exit_code"),
        output=data.get("output", ""),
        timeout=bool(data.get("timeout", False)),
        error=data.get("error", ""),
    )


# --- the schema, and its errors in words ----------------------------------------------------


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text())
    return loaded


@cache
def schema_text() -> str:
    return resources.files("bot.runbooktests").joinpath(SCHEMA_FILE).read_text("utf-8")


def schema_path() -> Path:
    return Path(str(resources.files("bot.runbooktests").joinpath(SCHEMA_FILE)))


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


MAX_ERRORS = 20

_DECISIONS = (
    "`approved by U…` or `approved` (its first approver), `rejected by U…` or `rejected`, "
    "`expired` or `pending`"
)


def schema_errors(doc: SourceDoc) -> list[Diagnostic]:
    errors = sorted(_validator().iter_errors(doc.data), key=lambda e: list(map(str, e.path)))
    found: list[Diagnostic] = []
    said: set[JsonPath] = set()
    for error in errors:
        for message, fix, path, key in _word(doc, error):
            if path in said:
                continue
            said.add(path)
            found.append(doc.diagnostic(SCHEMA_CODE, SCHEMA_RULE, message, fix, path, key=key))
        if len(found) >= MAX_ERRORS:
            break
    return found


Worded = tuple[str, str, JsonPath, bool]


def _word(doc: SourceDoc, error: Any) -> list[Worded]:
    path: JsonPath = tuple(error.absolute_path)
    where = describe(path)
    validator, instance, schema_ = error.validator, error.instance, error.schema
    if validator == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema_.get("properties", {}))
        worded: list[Worded] = []
        for key in instance:
            if key in allowed:
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            fix = (
                f"did you mean `{close[0]}`? (keys allowed here: {', '.join(allowed)})"
                if close
                else f"remove or rename it; keys allowed here: {', '.join(allowed)}"
            )
            worded.append((f"unknown key `{key}` in {where}", fix, (*path, key), True))
        return worded
    if validator == "required":
        missing = [k for k in schema_.get("required", ()) if k not in instance]
        return [
            (
                f"{where} has no `{key}`",
                _REQUIRED_FIXES.get(key, f"add `{key}:`"),
                path,
                False,
            )
            for key in missing[:1]
        ]
    if validator == "const" and path == ("kind",):
        return [("`kind` must be `test` in a runbook test", "write `kind: test`", path, False)]
    if validator == "pattern" and path[-1:] == ("approval",):
        return [
            (
                f"`approval: {instance}` in {where} is not a decision",
                f"write {_DECISIONS}",
                path,
                False,
            )
        ]
    if validator == "pattern" and schema_ is schema()["$defs"]["userId"]:
        return [
            (
                f"{instance!r} in {where} is not a Slack user id",
                "write the user's id (U… or W…, from their Slack profile › Copy member ID)",
                path,
                False,
            )
        ]
    if validator == "enum":
        close = difflib.get_close_matches(str(instance), [str(v) for v in schema_["enum"]], n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return [
            (
                f"`{instance}` in {where} is not one of the allowed values",
                f"{hint}allowed: {', '.join(str(v) for v in schema_['enum'])}",
                path,
                False,
            )
        ]
    if validator in ("minProperties", "maxProperties") and path[:2] == ("expect", "path"):
        return [
            (
                f"{where} must name one step and its status",
                "write each entry as `- STEP: STATUS`, e.g. `- clear-cache: success`",
                path,
                False,
            )
        ]
    if validator == "minProperties" and path == ("expect",):
        return [
            (
                "the test expects nothing, so it could never fail",
                "add at least one of: " + ", ".join(schema()["$defs"]["expect"]["properties"]),
                path,
                False,
            )
        ]
    if validator == "minProperties" and path[:1] == ("steps",):
        return [
            (
                f"{where} assumes nothing",
                "give `exit_code` (and `output`), `timeout: true`, `error`, or `approval`",
                path,
                False,
            )
        ]
    if validator == "type":
        wanted = schema_["type"]
        names = wanted if isinstance(wanted, list) else [wanted]
        return [
            (
                f"{where} is {_type_name(instance)}, not {' or '.join(_TYPES[n] for n in names)}",
                _TYPE_FIXES.get(str(path[-1]) if path else "", _FORMAT_DOCS),
                path,
                False,
            )
        ]
    return [(f"{where}: {error.message}", _FORMAT_DOCS, path, False)]


_FORMAT_DOCS = "see the runbook test format in docs/catalog.md (Runbook tests)"
_REQUIRED_FIXES = {
    "kind": "add `kind: test`",
    "name": "add `name: …` saying what the test shows",
    "incident": "add `incident: {service: …, title: …}`: the alert the test feeds the bot",
    "expect": "add `expect:` with the path the runbook must take (e.g. `path:`, `status:`)",
    "service": "add `service:`, the PagerDuty service name of the alert",
    "title": "add `title:`, the alert's title (runbooks match their symptoms against it)",
}
_TYPE_FIXES = {
    "approval": f'write {_DECISIONS} (quoted if you like: `approval: "approved by U…"`)',
    "steps": "write `steps:` as a mapping of step id to outcome: `check: {exit_code: 0}`",
    "exit_code": "write a whole number, e.g. `exit_code: 0`",
    "output": 'quote the output: `output: "…"`',
    "path": "write `path:` as a list: `- clear-cache: success`",
    "details": "write `details:` as a mapping: `details: {host: api-1}`",
}
_TYPES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _type_name(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return f"the number {value}"
    return f"the text {str(value)!r}"


def describe(path: Sequence[str | int]) -> str:
    """A place in a test, in words: "the outcome of step 'clear-cache'"."""
    if not path:
        return "the test"
    head = path[0]
    if head == "steps" and len(path) >= 2:
        rest = f"`{path[2]}` of " if len(path) > 2 else ""
        return f"{rest}the outcome of step {path[1]!r}"
    if head == "expect" and len(path) >= 3 and path[1] == "path" and isinstance(path[2], int):
        return f"item {path[2] + 1} of `expect.path`"
    if head == "members" and len(path) >= 3 and isinstance(path[2], int):
        return f"member {path[2] + 1} of group {path[1]!r}"
    dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
    return f"`{dotted.replace('.[', '[')}`"
