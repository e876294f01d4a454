"""Schema errors in words, and the valid rest of a document that has them.

jsonschema says ``None is not of type 'object'``; an author needs "``safety:`` of action
'clear-cache' has no value: the lines below it are not indented under it". For every
error this module names the place in words (``item 2 of `safety.scopes` of step 3
('restart') in runbook 'web-down'``), says what is wrong, and gives the fix: the closest
allowed key or value (did you mean …?), the accepted forms of durations, ids and Slack
approvers, and a specific hint for the mistakes authors make most (a mapping indented
wrongly, a string where a list belongs, ``yes`` where ``true`` is meant).

The verdict and the allowed keys and values come from the schema itself: the errors are
jsonschema's, over the same rewrite of ``unevaluatedProperties`` that ``fastschema``
compiles (so an unknown key is reported on its own, not hidden behind another error),
and the hints are keyed by the schema's own definitions and patterns.

**The valid rest.** A document with errors is *pruned*: each error's value is dropped at
the nearest mapping key (a broken step becomes a placeholder that keeps its id, so the
steps keep their numbers), until what is left passes the schema. The semantic rules then
run on that, so one typo no longer hides every other problem of the file. The paths that
were dropped travel with the document, and rules stay silent about them.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.yamlsource import JsonPath, SourceDoc, format_path

STEP_LISTS = ("steps", "on_resolve")
# Marks the placeholder of a step dropped for its errors (the schema allows no such key in
# a step, so it can only come from pruning).
DROPPED_STEP = "__dropped__"
MAX_ERRORS = 10
_PRUNE_ROUNDS = 12
_KIND_NAMES = {"action": "action", "runbook": "runbook", "catalog": "the catalog settings document"}
_STEP_OVERRIDES = ("command", "shell", "safety", "expect", "env", "secrets")


@dataclass(frozen=True)
class Worded:
    message: str
    fix: str
    path: JsonPath
    key: bool = False  # point at the key rather than its value
    code: str = "RB010"
    rule: str = "schema"


# --- the schema, as jsonschema sees it for wording ---------------------------------------


@cache
def _defs() -> dict[str, Any]:
    from bot.catalog.fastschema import closed_equivalent
    from bot.catalog.schemacheck import schema

    original: dict[str, Any] = schema()["$defs"]
    return {name: closed_equivalent(sub, original) or sub for name, sub in original.items()}


@cache
def _validator(kind: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": _defs()})


def _def(name: str) -> dict[str, Any]:
    found: dict[str, Any] = _defs().get(name, {})
    return found


@cache
def _patterns() -> dict[str, str]:
    """pattern -> what it checks, read from the schema's definitions."""
    approvers = _def("approvers").get("properties", {})
    action_body = _def("actionBody").get("properties", {})
    promotion = _def("promotion").get("properties", {})
    named = {
        "id": _def("id").get("pattern"),
        "env": _def("envName").get("pattern"),
        "user": approvers.get("users", {}).get("items", {}).get("pattern"),
        "group": approvers.get("groups", {}).get("items", {}).get("pattern"),
        "secret": action_body.get("secrets", {}).get("items", {}).get("pattern"),
        "param": _def("params").get("propertyNames", {}).get("pattern"),
        "url": promotion.get("evidence_url", {}).get("pattern"),
    }
    return {pattern: name for name, pattern in named.items() if isinstance(pattern, str)}


# --- entry point ---------------------------------------------------------------------------


def explain(doc: SourceDoc, data: Any) -> tuple[list[Diagnostic], Any, tuple[JsonPath, ...]]:
    """Diagnostics for `data` (the document as checked), the usable rest, dropped paths.

    The usable rest is None when nothing of the document can be trusted (its id, its
    command or the shape of the whole is wrong).
    """
    errors = _sorted(_validator(doc.kind).iter_errors(data))
    diagnostics: list[Diagnostic] = []
    said: set[JsonPath] = set()
    for error in errors:
        for worded in _word(doc, error):
            if worded.path in said:
                continue  # one message per place (`steps` in an action is also unknown)
            said.add(worded.path)
            diagnostics.append(
                doc.diagnostic(
                    worded.code,
                    worded.rule,
                    worded.message,
                    worded.fix,
                    worded.path,
                    key=worded.key,
                )
            )
        if len(diagnostics) >= MAX_ERRORS:
            break
    usable, dropped = _prune(doc.kind, data, errors)
    return diagnostics, usable, dropped


def _sorted(errors: Iterator[Any]) -> list[Any]:
    return sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])


# --- where, in words ----------------------------------------------------------------------


def describe(doc: SourceDoc, path: JsonPath) -> str:
    """`path` inside `doc` in words: "item 2 of `safety.scopes` of step 3 ('restart') in …"."""
    data = doc.data if isinstance(doc.data, dict) else {}
    ident = data.get("id")
    whole = _KIND_NAMES.get(doc.kind, "this document")
    if doc.kind != "catalog" and isinstance(ident, str) and ident:
        whole = f"{whole} {ident!r}"
    parts: list[str] = []
    rest = path
    if len(path) >= 2 and path[0] in STEP_LISTS and isinstance(path[1], int):
        steps = data.get(path[0])
        step = steps[path[1]] if isinstance(steps, list) and path[1] < len(steps) else None
        label = "step" if path[0] == "steps" else "follow-up step (on_resolve)"
        name = _step_name(step)
        parts.append(f"{label} {path[1] + 1}" + (f" ({name!r})" if name else ""))
        rest = path[2:]
    if rest:
        item = None
        if isinstance(rest[-1], int):
            item, rest = rest[-1], rest[:-1]
        keys = format_path(rest).removeprefix("$").removeprefix(".")
        text = f"`{keys}`" if keys else ""
        if item is not None:
            text = f"item {item + 1} of {text}" if text else f"item {item + 1}"
        parts.insert(0, text)
    parts.append(f"in {whole}" if parts else whole)
    return " of ".join(parts[:-1]) + (" " if len(parts) > 1 else "") + parts[-1]


def _step_name(step: Any) -> str:
    if not isinstance(step, dict):
        return ""
    for key in ("id", "action"):
        if isinstance(step.get(key), str) and step[key]:
            return str(step[key])
    return ""


def _suggest(value: Any, known: list[str] | tuple[str, ...], cutoff: float = 0.6) -> str | None:
    if not isinstance(value, str):
        return None
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=cutoff)
    if not close:
        lowered = {k.lower(): k for k in known}
        return lowered.get(value.lower())
    return close[0]


def _shown(value: Any) -> str:
    """A value for a message, in backticks as it would be written in YAML."""
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value as it would look in YAML (flow style), for messages."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        plain = not _needs_quotes(value) and _reads_as_itself(value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | dict):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:59] + "…"
    return repr(value)


def _reads_as_itself(text: str) -> bool:
    """Whether YAML reads `text`, unquoted, as this very string (not `no` -> false)."""
    import yaml

    try:
        return bool(yaml.safe_load(text) == text)
    except yaml.YAMLError:
        return False


def _needs_quotes(text: str) -> bool:
    return not text or bool(re.search(r"[:#{}\[\],&*!|>'\"%@`]|^\s|\s$|^[-?]", text))


def _type_name(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


_TYPE_WORDS = {
    "object": "a mapping (`key: value` lines)",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "number": "a number",
    "integer": "a whole number",
    "null": "null",
}


# --- wording, error by error ----------------------------------------------------------


def _word(doc: SourceDoc, error: Any) -> list[Worded]:
    path: JsonPath = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if schema is _def("duration") or (
        error.validator in ("type", "pattern", "exclusiveMinimum")
        and error.parent is not None
        and error.parent.schema is _def("duration")
    ):
        return [_duration(doc, path, error.instance)]
    if schema is _def("onFailure"):
        return _on_failure(doc, path, error)
    if error.validator == "oneOf" and _is_step(path) and isinstance(error.instance, dict):
        return _step_shape(doc, path, error)
    if error.validator in ("oneOf", "anyOf") and error.context:
        return _word(doc, _closest(error))
    words = _WORDERS.get(error.validator)
    if words is None:
        return [
            Worded(f"{describe(doc, path)}: {_shorten(error.message)}", _generic_fix(doc), path)
        ]
    return words(doc, path, error)


def _closest(error: Any) -> Any:
    from jsonschema.exceptions import best_match

    return best_match(error.context)


def _is_step(path: JsonPath) -> bool:
    return len(path) == 2 and path[0] in STEP_LISTS and isinstance(path[1], int)


def _shorten(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _generic_fix(doc: SourceDoc) -> str:
    return f"see the {_KIND_NAMES.get(doc.kind, 'catalog')} format in docs/catalog.md"


def _unknown_keys(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    instance = error.instance if isinstance(error.instance, dict) else {}
    allowed = sorted(error.schema.get("properties", {}))
    found: list[Worded] = []
    for key in [k for k in instance if k not in allowed]:
        where = describe(doc, path)
        message = f"unknown key `{key}` in {where}"
        moved = _belongs_under(instance, key)
        close = _suggest(key, allowed)
        if moved is not None:
            fix = (
                f"`{key}` belongs under `{moved}:`, which has no value here: indent `{key}:` "
                f"(and the lines that go with it) under `{moved}:`"
            )
        elif close is not None:
            fix = f"did you mean `{close}`? (keys allowed here: {', '.join(allowed)})"
        else:
            fix = f"remove or rename it; keys allowed here: {', '.join(allowed)}"
        found.append(Worded(message, fix, (*path, key), key=True))
    return found


def _belongs_under(instance: dict[str, Any], key: str) -> str | None:
    """A sibling left empty whose mapping would accept `key`: the lines lost their indent."""
    for sibling, value in instance.items():
        if value is not None or sibling == key:
            continue
        target = _object_schema_for_key(sibling)
        if target is not None and key in target.get("properties", {}):
            return sibling
    return None


def _object_schema_for_key(key: str) -> dict[str, Any] | None:
    """The mapping schema a key such as `safety` or `match` holds, by its definition."""
    if key in ("safety", "match", "approvers", "escalation"):
        return _def(key)
    found = _def("catalog").get("properties", {}).get(key)  # defaults, promotion
    return found if isinstance(found, dict) and "properties" in found else None


def _missing(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    found = re.match(r"'([^']+)' is a required property", error.message)
    key = found.group(1) if found else "?"
    where = describe(doc, path)
    fix = _REQUIRED_FIXES.get(key, f"add `{key}:` (see docs/catalog.md)")
    return [Worded(f"{where} has no `{key}`", fix, path)]


_REQUIRED_FIXES = {
    "id": "add `id:` with lower-case letters, digits, '.', '_' or '-', e.g. `id: restart-web`",
    "command": "add `command:`, the program and its arguments (a string or a list)",
    "match": "add `match: {services: [SERVICE]}`: the PagerDuty service names or ids it is for",
    "services": "add `services: [SERVICE]`: PagerDuty service names or ids ('*' for any)",
    "steps": "add `steps:` with at least one `- action: ACTION_ID`",
    "pattern": 'each `expect` entry needs `pattern:`, e.g. `- {pattern: "OK"}`',
    "environments": "add `environments:`, e.g. `[{name: staging}, {name: prod, production: true}]`",
    "name": "add `name:`",
    "env": "add `env:`, the environment this promotion is for",
    "evidence_url": "add `evidence_url: https://…` (`runbookctl promote` writes it for you)",
    "rollback": "write `on_failure: {rollback: ACTION_ID}`",
    "kind": "add `kind: runbook` or `kind: catalog`",
}


def _wrong_type(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    wanted = error.validator_value
    wanted_list = wanted if isinstance(wanted, list) else [wanted]
    value = error.instance
    where = describe(doc, path)
    words = [_TYPE_WORDS.get(str(t), str(t)) for t in wanted_list]
    if len(words) > 1:
        words = ["true/false" if w == _TYPE_WORDS["boolean"] else w for w in words]
    expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    key = path[-1] if path and isinstance(path[-1], str) else None
    if value is None and key is not None and set(wanted_list) & {"object", "array"}:
        line, col = doc.where(path, key=True)
        if _lines_below_not_indented(doc, line, col):
            fix = (
                f"the lines below `{key}:` are not indented under it, so they count as keys of "
                f"their own: indent them (e.g. two spaces more than `{key}:`)"
            )
        else:
            fix = f"give `{key}:` {expected}, or remove it"
        return [Worded(f"{where} has no value; it must be {expected}", fix, path, key=True)]
    message = f"{where} is {_type_name(value)}, {_shown(value)}; it must be {expected}"
    if "array" in wanted_list and isinstance(value, str | int | float) and key is not None:
        fix = f"write a list: `{key}: [{_yaml(value)}]`"
    elif "boolean" in wanted_list and isinstance(value, str):
        truth = value.strip().lower() in ("yes", "y", "true", "on", "1")
        fix = f"write `{'true' if truth else 'false'}` without quotes"
    elif isinstance(value, list) and not set(wanted_list) & {"array", "object"}:
        joined = " ".join(str(v) for v in value if not isinstance(v, list | dict))
        fix = f"write one value, not a list: e.g. `{key or 'key'}: {json.dumps(joined)}`"
        if len(path) >= 2 and path[-2] == "params":
            fix += (
                " (a param is one value: pass several in one string and split them in the command)"
            )
    elif set(wanted_list) & {"number", "integer"} and isinstance(value, str) and _numeric(value):
        fix = f"write the number without quotes: `{value.strip()}`"
    elif "string" in wanted_list and value is not None and not isinstance(value, list | dict):
        shown = _yaml(value)
        fix = f"quote it: `{json.dumps(shown)}` (YAML reads {shown} as {_type_name(value)})"
    elif "string" in wanted_list and isinstance(value, dict) and _looks_like_template(value):
        fix = (
            "quote a value that starts with `{{`: YAML reads `{` as the start of a mapping, "
            'e.g. `"{{ incident.title }}"`'
        )
    elif set(wanted_list) & {"number", "integer"} and key is not None:
        fix = f"write {expected} without quotes, e.g. `{key}: 10`"
    else:
        fix = f"write {expected} here"
    return [Worded(message, fix, path)]


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"\s*-?[0-9]+(\.[0-9]+)?\s*", text))


def _looks_like_template(value: dict[Any, Any]) -> bool:
    return len(value) == 1 and isinstance(next(iter(value)), dict | str)


def _lines_below_not_indented(doc: SourceDoc, line: int, col: int) -> bool:
    """Whether the line after `key:` (at `line`, `col`) is a key no further indented."""
    text = _source_line(doc, line + 1)
    if text is None or not text.strip() or text.lstrip().startswith("#"):
        return False
    indent = len(text) - len(text.lstrip(" "))
    return indent <= col - 1 and bool(re.match(r"\s*[-\w]+\s*:", text))


def _source_line(doc: SourceDoc, line: int) -> str | None:
    from pathlib import Path

    text = doc.text
    if text is None and doc.source is not None:
        try:
            text = Path(doc.source).read_text("utf-8-sig")
        except (OSError, UnicodeDecodeError):
            return None
    if text is None:
        return None
    lines = text.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else None


def _pattern(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    value = error.instance
    where = describe(doc, path)
    what = _patterns().get(error.validator_value)
    if what == "user":
        message = f"approver {value!r} ({where}) is not a Slack user id"
        if re.fullmatch(r"S[A-Z0-9]+", value):
            fix = f"{value!r} looks like a user group id: move it under `groups:`"
        else:
            fix = (
                "approvers are Slack user ids, `U…` or `W…` (e.g. U024BE7LH: in Slack, the "
                "person's profile › ⋮ › Copy member ID), not names; user groups are `S…` ids "
                "under `groups:`"
            )
        return [Worded(message, fix, path)]
    if what == "group":
        message = f"approver group {value!r} ({where}) is not a Slack user group id"
        if re.fullmatch(r"[UW][A-Z0-9]+", value):
            fix = f"{value!r} looks like a user id: move it under `users:`"
        else:
            fix = (
                "user groups are Slack ids `S…` (e.g. S0614TZR7: Slack › People › User groups "
                "› the group › ⋮ › Copy group ID), not handles like @sre-leads; people go under "
                "`users:` as `U…`/`W…` ids"
            )
        return [Worded(message, fix, path)]
    if what == "id":
        slug = re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip("-._")[:64]
        fix = "ids use lower-case letters, digits, '.', '_' and '-' (at most 64 characters)"
        if slug and slug != value:
            fix += f": `{slug}`"
        if path == ("id",):
            kind = _KIND_NAMES.get(doc.kind, "document")
            message = f"the id {_shown(value)} of this {kind} is not valid"
        else:
            message = f"{where} is {_shown(value)}, which is not a valid id"
        return [Worded(message, fix, path)]
    if what == "env":
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-_")[:32]
        fix = "environment names use letters, digits, '_' and '-' (at most 32 characters)"
        if slug and slug != value:
            fix += f": `{slug}`"
        return [
            Worded(f"{where} is {_shown(value)}, which is not a valid environment name", fix, path)
        ]
    if what == "param":
        name = re.sub(r"[^A-Za-z0-9_]", "_", value)
        name = f"_{name}" if name[:1].isdigit() else name
        return [
            Worded(
                f"parameter name {_shown(value)} in {where} is not valid",
                f"parameter names use letters, digits and '_' (they are read as "
                f"{{{{ params.NAME }}}}): `{name}`",
                (*path, value),
                key=True,
            )
        ]
    if what == "url":
        return [
            Worded(
                f"{where} is {_shown(value)}, which is not an https:// link",
                "link the evidence over https:// (`runbookctl promote` writes it)",
                path,
            )
        ]
    if what == "secret":
        fix = "list environment variable names (letters, digits, '_'), e.g. `API_TOKEN`"
    else:
        fix = f"it must match the pattern {error.validator_value}"
    return [Worded(f"{where} is {_shown(value)}, which is not accepted here", fix, path)]


def _enum(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    allowed = [str(v) for v in error.validator_value]
    close = _suggest(error.instance, allowed)
    fix = (f"did you mean `{close}`? " if close else "") + f"write one of: {', '.join(allowed)}"
    where = describe(doc, path)
    return [
        Worded(f"{where} is {_shown(error.instance)}, not one of {', '.join(allowed)}", fix, path)
    ]


def _const(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    where = describe(doc, path)
    return [
        Worded(
            f"{where} must be {_yaml(error.validator_value)}",
            f"write `{_yaml(error.validator_value)}`",
            path,
        )
    ]


def _too_few(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    key = path[-1] if path else ""
    fixes = {
        "steps": "list at least one step, e.g. `- action: ACTION_ID`",
        "services": "name at least one PagerDuty service (or '*' for any)",
        "environments": "declare at least one environment, e.g. `- name: staging`",
        "command": "write the program and its arguments",
    }
    fix = fixes.get(str(key), "give at least one")
    return [Worded(f"{describe(doc, path)} is empty", fix, path)]


def _empty_text(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    key = path[-1] if path else ""
    fixes = {
        "pattern": "an empty pattern matches any output: write what success prints, e.g. `OK`",
        "channel": "write the channel, e.g. `#inc-web`",
        "command": "write the program and its arguments",
        "when": "write a condition, or remove `when:`",
    }
    fix = fixes.get(str(key), "write a value, or remove the key")
    return [Worded(f"{describe(doc, path)} is an empty string", fix, path)]


def _repeated(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    seen: list[Any] = []
    twice = None
    for value in error.instance:
        if value in seen:
            twice = value
            break
        seen.append(value)
    return [
        Worded(
            f"{describe(doc, path)} lists {_shown(twice)} twice",
            "remove the repeated entry",
            path,
        )
    ]


def _too_small(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    bound = error.validator_value
    if error.validator == "exclusiveMinimum":
        relation, fix = f"more than {bound}", f"write a number more than {bound}"
    elif error.validator == "maximum":
        relation, fix = f"at most {bound}", f"write {bound} or less"
    else:
        relation, fix = f"at least {bound}", f"write {bound} or more"
    return [
        Worded(
            f"{describe(doc, path)} is {_shown(error.instance)}; it must be {relation}", fix, path
        )
    ]


def _not_allowed(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    if doc.kind == "action" and not path and isinstance(error.instance, dict):
        keys = [k for k in ("steps", "match") if k in error.instance]
        return [
            Worded(
                f"an action cannot have `{key}`",
                "is this a runbook? add `kind: runbook` (or move the file to runbooks/); "
                "an action is one command, runbooks list steps",
                (key,),
                key=True,
            )
            for key in keys
        ]
    return [Worded(f"{describe(doc, path)}: {_shorten(error.message)}", _generic_fix(doc), path)]


_WORDERS = {
    "additionalProperties": _unknown_keys,
    "unevaluatedProperties": _unknown_keys,
    "required": _missing,
    "type": _wrong_type,
    "pattern": _pattern,
    "enum": _enum,
    "const": _const,
    "minItems": _too_few,
    "minLength": _empty_text,
    "uniqueItems": _repeated,
    "exclusiveMinimum": _too_small,
    "minimum": _too_small,
    "maximum": _too_small,
    "not": _not_allowed,
}


# --- durations, on_failure, steps ------------------------------------------------------

_DURATION_UNITS = {
    "ms": ("ms", 1),
    "msec": ("ms", 1),
    "msecs": ("ms", 1),
    "millisecond": ("ms", 1),
    "milliseconds": ("ms", 1),
    "s": ("s", 1),
    "sec": ("s", 1),
    "secs": ("s", 1),
    "second": ("s", 1),
    "seconds": ("s", 1),
    "m": ("m", 1),
    "min": ("m", 1),
    "mins": ("m", 1),
    "minute": ("m", 1),
    "minutes": ("m", 1),
    "h": ("h", 1),
    "hr": ("h", 1),
    "hrs": ("h", 1),
    "hour": ("h", 1),
    "hours": ("h", 1),
    "d": ("h", 24),
    "day": ("h", 24),
    "days": ("h", 24),
}
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_suggestion(value: Any) -> str | None:
    """What a duration written another way (`10min`, `1h30m`, `2 days`) is in ours."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower().replace(" ", "")
    one = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-z]+)", text)
    if one and one.group(2) in _DURATION_UNITS:
        unit, factor = _DURATION_UNITS[one.group(2)]
        number = float(one.group(1)) * factor
        return f"{number:g}{unit}" if number > 0 else None
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([a-z]+)", text)
    if parts and "".join(n + u for n, u in parts) == text:
        seconds = 0.0
        for number, word in parts:
            if word not in _DURATION_UNITS:
                return None
            unit, factor = _DURATION_UNITS[word]
            seconds += float(number) * factor * _SECONDS[unit]
        for unit in ("h", "m", "s"):
            if seconds and seconds % _SECONDS[unit] == 0:
                return f"{seconds / _SECONDS[unit]:g}{unit}"
        return f"{seconds * 1000:g}ms" if seconds else None
    return None


def _duration(doc: SourceDoc, path: JsonPath, value: Any) -> Worded:
    where = describe(doc, path)
    forms = "seconds (`90`) or a number with a unit: `500ms`, `30s`, `5m`, `1h`"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Worded(f"{where} is {value}; a duration must be more than 0", f"write {forms}", path)
    suggestion = duration_suggestion(value)
    fix = (f"write `{suggestion}`; durations are " if suggestion else "write ") + forms
    return Worded(f"{where} is {_shown(value)}, which is not a duration", fix, path)


def _on_failure(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    value = error.instance
    where = describe(doc, path)
    modes = ["stop", "escalate", "continue"]
    forms = "`stop` (the default), `continue`, or `{rollback: ACTION_ID, then: stop|continue}`"
    if isinstance(value, str):
        close = _suggest(value, modes)
        fix = (f"did you mean `{close}`? " if close else "") + f"write {forms}"
        return [Worded(f"{where} is {_shown(value)}, not one of {', '.join(modes)}", fix, path)]
    if isinstance(value, dict):
        branch = [e for e in error.context or () if e.relative_schema_path[0] == 1]
        worded = [w for e in branch for w in _word(doc, e)]
        if worded:
            return worded
    return [Worded(f"{where} is {_type_name(value)}; it must be {forms}", f"write {forms}", path)]


def _step_shape(doc: SourceDoc, path: JsonPath, error: Any) -> list[Worded]:
    """A step is a reference (`action:`) or an inline action (`id` + `command`)."""
    step = error.instance
    where = describe(doc, path)
    if "action" not in step and "command" in step and "id" not in step:
        return [
            Worded(
                f"{where}: an inline step (one with `command`) needs an `id`",
                "add `id: <name>` (lower-case, unique in the runbook), or move the command "
                "into an action and reference it with `action: <id>`",
                path,
                code="RB033",
                rule="inline-step-id",
            )
        ]
    if "action" in step and any(key in step for key in _STEP_OVERRIDES):
        return [
            Worded(
                f"{where} references action {step['action']!r} and so cannot set `{key}`",
                "a step that references an action cannot change its command, expect or "
                "safety: change the action itself, or write an inline step with its own id",
                (*path, key),
                key=True,
            )
            for key in _STEP_OVERRIDES
            if key in step
        ]
    branch = 0 if "action" in step else 1
    inner = [e for e in error.context or () if e.relative_schema_path[0] == branch]
    worded = [w for e in inner if e.validator not in ("required", "not") for w in _word(doc, e)]
    if worded:
        return worded
    return [
        Worded(
            f"{where} is neither a reference to an action nor an inline action",
            "write `- action: ACTION_ID` (with optional name, params, timeout, when, "
            "on_failure), or an inline action with `id:` and `command:`",
            path,
        )
    ]


# --- the valid rest ----------------------------------------------------------------------

_STAND_IN_STEP = {"action": "dropped"}  # valid per the schema; only for re-checking


def _prune(kind: str, data: Any, errors: list[Any]) -> tuple[Any, tuple[JsonPath, ...]]:
    if not isinstance(data, dict):
        return None, ()
    pruned = copy.deepcopy(data)
    dropped: list[JsonPath] = []
    validator = _validator(kind)
    for _ in range(_PRUNE_ROUNDS):
        for target in _targets(errors):
            point = _drop_point(target)
            if point is None:
                return None, ()
            if _drop(pruned, point):
                dropped.append(point)
        errors = _sorted(validator.iter_errors(_stand_ins(pruned)))
        if not errors:
            return pruned, tuple(dropped)
    return None, ()


def _targets(errors: list[Any]) -> Iterator[JsonPath]:
    for error in errors:
        path: JsonPath = tuple(error.absolute_path)
        if error.validator in ("additionalProperties", "unevaluatedProperties"):
            allowed = error.schema.get("properties", {})
            yield from ((*path, k) for k in error.instance if k not in allowed)
        else:
            yield path


def _drop_point(target: JsonPath) -> JsonPath | None:
    """Where to cut to remove `target`: at a mapping key, or a whole step."""
    base: JsonPath = ()
    rest = target
    if len(target) >= 2 and target[0] in STEP_LISTS and isinstance(target[1], int):
        base, rest = target[:2], target[2:]
    keys = [i for i, part in enumerate(rest) if isinstance(part, str)]
    if keys:
        return (*base, *rest[: keys[-1] + 1])
    return base or None


def _drop(data: dict[str, Any], point: JsonPath) -> bool:
    node: Any = data
    for part in point[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False  # already gone with something larger
    last = point[-1]
    if isinstance(last, int) and isinstance(node, list) and last < len(node):
        ident = _step_name(node[last])
        node[last] = {DROPPED_STEP: True, **({"id": ident} if ident else {})}
        return True
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


def _stand_ins(data: dict[str, Any]) -> dict[str, Any]:
    view = dict(data)
    for key in STEP_LISTS:
        steps = view.get(key)
        if isinstance(steps, list):
            view[key] = [
                _STAND_IN_STEP if isinstance(s, dict) and DROPPED_STEP in s else s for s in steps
            ]
    return view


def is_dropped_step(step: Any) -> bool:
    return isinstance(step, dict) and DROPPED_STEP in step
