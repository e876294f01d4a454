"""Semantic lint rules: what the JSON Schema cannot see on its own.

Each rule has a stable code (never reused, never renumbered) and yields diagnostics that
say where the problem is and how to fix it. Rules run on parsed documents (plain data
with positions) that passed the schema, so they work even when the catalog could not be
built, and they may rely on the shapes the schema guarantees.

Codes (E: error, W: warning; `runbookctl lint --strict` fails on warnings too):

  reading and schema (``yamlsource``, ``loader``)
  RB001 E yaml-syntax        the file is not valid YAML (or not UTF-8, or unreadable)
  RB002 E duplicate-key      a mapping repeats a key
  RB003 E not-a-mapping      a document is a list or a scalar
  RB004 E file-too-large     a file is over 1 MiB
  RB005 E unsafe-yaml        tags (``!!python/…``), alias bombs, recursive aliases
  RB009 E no-catalog         the catalog path does not exist
  RB010 E schema             the document does not follow the JSON Schema (worded by
                             ``schemawords``; the rules below still check the rest)
  RB033 E inline-step-id     an inline step (with ``command``) has no ``id``

  semantic rules (this module)
  RB020 E duplicate-id       two actions, two runbooks, or two steps of a runbook share an id
  RB021 E unknown-action     ``action:`` or ``rollback:`` names no action of the catalog
  RB022 E unknown-environment  a scope, promotion or service mapping names no environment
  RB023 E invalid-regex      ``expect[].pattern``, ``match.symptoms`` or ``secret_patterns``
                             is not a valid Python regular expression
  RB024 W missing-expect     an action or inline step has no ``expect``: success can only
                             be judged by the exit code
  RB025 E unpromoted-scope   a production environment in ``safety.scopes`` without a
                             ``safety.promotions`` record for it
  RB026 E destructive-without-approval  ``rm -rf``, ``FLUSHALL``, ``DROP TABLE``,
                             ``kubectl delete``, ``terraform destroy``, ``reboot``… with
                             ``requires_approval: false``
  RB027 W/E shell            ``shell: true`` (a warning; an error without approval)
  RB028 E unknown-template-variable  ``{{ … }}`` the incident context does not provide,
                             or a ``params`` value no step sets; in a param's value,
                             also any ``{{ params.… }}`` (params are rendered from the
                             incident alone)
  RB029 E invalid-when       a ``when`` condition that does not parse, uses what the
                             evaluator refuses, or reads a step that has not run yet
  RB030 W ambiguous-match    two runbooks match the same service at the same priority
                             and nothing tells them apart
  RB031 E multiple-settings  more than one ``kind: catalog`` document
  RB032 W missing-settings   no ``kind: catalog`` document: dev/staging/prod are assumed
  RB034 E command-template   a command the executor would refuse: the program comes from
                             a template, a ``shell: true`` list, a placeholder the shell
                             cannot quote, unbalanced quotes, an empty command
  RB035 E unknown-param      a step sets a param its action does not read (not declared,
                             not in a ``{{ params.X }}``), nor its rollback or ``when``:
                             usually a typo (``windw: 1m``)
  RB036 E malformed-template  ``{{`` text about incident/params that is not a placeholder,
                             in a command, an env value or a param value
                             (``{{ incident.title|upper }}``, ``{{ incident. title }}``, a
                             stray brace): it would run as literal text
  RB037 W/E reparsed-template  a ``{{ … }}`` in an argument a program parses as shell
                             code (``sh -c``, ``ssh``, ``eval``, ``su -c``, through ``sudo``,
                             ``env``, ``xargs``, ``kubectl exec``…): a warning; an error
                             without approval
  RB038 W unmapped-service   the catalog has a ``services`` mapping, and a service a runbook
                             matches is not in it (any case): its incidents get RUNBOOK_ENV,
                             or no environment (every step blocked)
  RB039 E conflicting-service-mapping  two ``services`` keys that differ only in case map
                             to different environments
  RB040 W broken-action      a step uses an action whose file has errors that keep it
                             from being checked (instead of a misleading unknown-action)
  RB041 E slack-mention      ``escalation.mention`` that Slack would post as plain text
                             (``@sre-leads``): it must be ``<!subteam^S…>``, ``<@U…>``,
                             ``<!here>`` or ``<!channel>``
  RB042 W empty-catalog      no action and no runbook in the catalog directory
  RB043 E unmeetable-approvals  ``safety.approvals``/``self_approval`` on an action that
                             runs without approval, or more approvals than its listed
                             approvers (users only) could give
  RB044 E missing-executor   an action scoped to a production environment does not say
                             where it runs (``executor:``)
  RB045 E unknown-executor-target  ``executor: {runner: POOL}`` names a pool not under
                             ``runner_pools``, or ``executor: {kubernetes: …}`` a service
                             account not under ``kubernetes.service_accounts`` (in its
                             namespace)
  RB046 W local-production   a production-scoped action runs ``local``: on the bot's own
                             host, with the bot's credentials
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import ParsedCatalog, build_settings
from bot.catalog.model import Settings
from bot.catalog.schemawords import is_dropped_step
from bot.catalog.yamlsource import JsonPath, SourceDoc, format_path
from bot.conditions import ConditionError
from bot.conditions import parse as parse_condition

# The executor's own placeholder pattern: lint and executor agree on what is substituted.
from bot.executor import (
    _PLACEHOLDER,
    CommandSpec,
    TemplateError,
    render_argv,
    template_variables,
)

# What `{{ incident.X }}` and `incident.X` in `when` can read (bot.engine builds it).
INCIDENT_FIELDS = (
    "id",
    "title",
    "service",
    "service_id",
    "urgency",
    "priority",
    "env",
    "link",
    "status",
    "details",
)

Step = dict[str, Any]


@dataclass
class Usage:
    """A step that runs an action: directly (`action:`) or as its rollback."""

    doc: SourceDoc
    path: JsonPath  # of the `action` or `on_failure.rollback` value
    step: Step


@dataclass(frozen=True)
class Condition:
    """What the rules need of a `when`, worked out once per distinct text."""

    error: str | None  # why the evaluator refuses it; None when it parses
    # (name, key) of every `name.key` / `name['key']` lookup, in `ast.walk` order
    reads: tuple[tuple[str, str], ...] = ()
    # names also read whole or by a computed key (`params`, `params[x]`)
    whole: frozenset[str] = frozenset()


def _condition(when: str) -> Condition:
    try:
        tree = parse_condition(when)
    except (ConditionError, ValueError, RecursionError, MemoryError) as exc:
        return Condition(error=str(exc))
    reads: list[tuple[str, str]] = []
    names: dict[str, int] = {}
    keyed: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names[node.id] = names.get(node.id, 0) + 1
        elif isinstance(node, ast.Attribute | ast.Subscript) and isinstance(node.value, ast.Name):
            key = node.attr if isinstance(node, ast.Attribute) else _constant_key(node)
            if key is not None:
                reads.append((node.value.id, key))
                keyed[node.value.id] = keyed.get(node.value.id, 0) + 1
    whole = frozenset(name for name, count in names.items() if count > keyed.get(name, 0))
    return Condition(error=None, reads=tuple(reads), whole=whole)


@dataclass
class Context:
    parsed: ParsedCatalog
    settings: Settings
    actions: dict[str, SourceDoc] = field(default_factory=dict)  # first definition wins
    usages: dict[str, list[Usage]] = field(default_factory=dict)  # action id -> users
    # Catalogs repeat their conditions: each distinct text is parsed once.
    conditions: dict[str, Condition] = field(default_factory=dict)
    _steps: dict[int, list[tuple[JsonPath, Step]]] = field(default_factory=dict)

    def condition(self, when: str) -> Condition:
        found = self.conditions.get(when)
        if found is None:
            found = self.conditions[when] = _condition(when)
        return found

    @functools.cached_property
    def runbooks(self) -> list[SourceDoc]:
        return self.parsed.of_kind("runbook")

    def steps(self, doc: SourceDoc) -> list[tuple[JsonPath, Step]]:
        """Every step of a runbook document, with its path, main steps and follow-ups.

        A step dropped for its schema errors is left out; the others keep their numbers.
        Worked out once per document: every rule walks the steps.
        """
        found = self._steps.get(id(doc))
        if found is None:
            found = self._steps[id(doc)] = [
                ((key, i), step)
                for key in ("steps", "on_resolve")
                for i, step in enumerate(doc.data.get(key, ()))
                if not is_dropped_step(step)
            ]
        return found

    def dropped(self, doc: SourceDoc, *prefix: str | int) -> bool:
        """Whether something at or under `prefix` was cut from `doc` for schema errors.

        Rules that report what is *missing* ask first: the author wrote it, wrongly, and
        the schema error already says so.
        """
        n = len(prefix)
        return any(path[:n] == prefix for path in doc.dropped)

    @functools.cached_property
    def settings_broken(self) -> bool:
        """The settings document could not be read: its environments are unknown."""
        return any(kind == "catalog" for kind, _, _ in self.parsed.broken)

    @functools.cached_property
    def broken_definitions(self) -> dict[str, str]:
        """id -> "file:line" of action (or unknown-kind) documents too broken to check."""
        return {ident: where for kind, ident, where in self.parsed.broken if kind != "runbook"}

    def guarded(self) -> list[tuple[SourceDoc, JsonPath, dict[str, Any], str]]:
        """Everything that carries its own command and safety: actions and inline steps.

        The document, the path of the action (``()`` for an action document), its data
        and its id, for each.
        """
        return self._guarded

    @functools.cached_property
    def _guarded(self) -> list[tuple[SourceDoc, JsonPath, dict[str, Any], str]]:
        found: list[tuple[SourceDoc, JsonPath, dict[str, Any], str]] = [
            (doc, (), doc.data, doc.data["id"]) for doc in self.parsed.of_kind("action")
        ]
        for doc in self.runbooks:
            for path, step in self.steps(doc):
                if "command" in step:
                    found.append((doc, path, step, str(step.get("id", ""))))
        return found


Rule = Callable[[Context], Iterator[Diagnostic]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def check(parsed: ParsedCatalog) -> list[Diagnostic]:
    settings_docs = parsed.of_kind("catalog")
    context = Context(parsed, build_settings(settings_docs[0] if settings_docs else None))
    for doc in parsed.of_kind("action"):
        context.actions.setdefault(doc.data["id"], doc)
    for doc in context.runbooks:
        for path, step in context.steps(doc):
            if "action" in step:
                context.usages.setdefault(step["action"], []).append(
                    Usage(doc, (*path, "action"), step)
                )
            on_failure = step.get("on_failure")
            if isinstance(on_failure, dict):
                context.usages.setdefault(on_failure["rollback"], []).append(
                    Usage(doc, (*path, "on_failure", "rollback"), step)
                )
    found: list[Diagnostic] = []
    # Authors' regexes and conditions make `re` and `ast` warn (nested sets, invalid
    # escapes); those are not the linter's to print, and the rules report real errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in RULES:
            found.extend(fn(context))
    return _without_dropped(found, parsed.docs)


def _without_dropped(found: list[Diagnostic], docs: list[SourceDoc]) -> list[Diagnostic]:
    """Leave out what rules say about parts cut for schema errors (already reported)."""
    cut: dict[str, list[str]] = {}
    for doc in docs:
        for path in doc.dropped:
            cut.setdefault(doc.file, []).append(format_path(path))
    if not cut:
        return found

    def related(path: str, dropped: str) -> bool:
        inner, outer = (path, dropped) if len(path) >= len(dropped) else (dropped, path)
        return inner == outer or (inner.startswith(outer) and inner[len(outer)] in ".[")

    return [
        d
        for d in found
        if d.path == "$" or not any(related(d.path, p) for p in cut.get(d.file, ()))
    ]


def _safety(data: dict[str, Any]) -> dict[str, Any]:
    safety = data.get("safety")
    return safety if isinstance(safety, dict) else {}


def _requires_approval(data: dict[str, Any]) -> bool:
    return bool(_safety(data).get("requires_approval", True))


def _what(path: JsonPath, ident: str) -> str:
    return f"inline step {ident!r}" if path else f"action {ident!r}"


@rule
def duplicate_ids(ctx: Context) -> Iterator[Diagnostic]:
    """RB020: action ids are unique across the catalog, and so are runbook ids."""
    for kind in ("action", "runbook"):
        first: dict[str, SourceDoc] = {}
        for doc in ctx.parsed.of_kind(kind):
            ident = doc.data["id"]
            if ident in first:
                other = first[ident]
                line, _ = other.where(("id",))
                yield doc.diagnostic(
                    "RB020",
                    "duplicate-id",
                    f"{kind} id {ident!r} is already defined at {other.file}:{line}",
                    f"give one of them another id; {kind} ids are unique across the catalog",
                    ("id",),
                )
            else:
                first[ident] = doc
    inline_ids = set(ctx.actions)
    for doc in ctx.runbooks:
        for path, step in ctx.steps(doc):
            if "command" in step and step.get("id") in inline_ids:
                yield doc.diagnostic(
                    "RB020",
                    "duplicate-id",
                    f"inline step id {step['id']!r} is also an action id",
                    f"reference the action with `action: {step['id']}` or rename the step",
                    (*path, "id"),
                )
        seen: set[object] = set()
        for path, step in ctx.steps(doc):
            step_id = step.get("id", step.get("action"))
            if path[0] == "steps" and step_id in seen:
                yield doc.diagnostic(
                    "RB020",
                    "duplicate-id",
                    f"step {step_id!r} appears twice in this runbook",
                    "give the second one its own `id:` so results and approvals can tell "
                    "them apart",
                    path,
                )
            seen.add(step_id)


@rule
def unknown_actions(ctx: Context) -> Iterator[Diagnostic]:
    """RB021: every `action:` and rollback names an action of the catalog."""
    known = sorted(ctx.actions)
    for action_id, usages in ctx.usages.items():
        if action_id in ctx.actions:
            continue
        broken = ctx.broken_definitions.get(action_id)
        for usage in usages:
            if broken is not None:
                yield usage.doc.diagnostic(
                    "RB040",
                    "broken-action",
                    f"action {action_id!r} is defined at {broken}, which has errors, so this "
                    "step cannot be checked against it",
                    f"fix the errors reported for {broken.rpartition(':')[0]}; this step is "
                    "checked again then",
                    usage.path,
                    severity="warning",
                )
                continue
            yield usage.doc.diagnostic(
                "RB021",
                "unknown-action",
                f"unknown action {action_id!r}",
                _suggest(action_id, known, "define it under actions/ or fix the name"),
                usage.path,
            )


@rule
def unknown_environments(ctx: Context) -> Iterator[Diagnostic]:
    """RB022: scopes, promotions and service mappings name declared environments."""
    if ctx.settings_broken:
        return  # the environments are in the settings, which have errors of their own
    declared = ctx.settings.environment_names
    fix = f"use one of: {', '.join(declared)}, or declare it under `environments` in the catalog"
    for doc, base, data, _ in ctx.guarded():
        safety = _safety(data)
        for i, env in enumerate(safety.get("scopes", ())):
            if env not in declared:
                yield doc.diagnostic(
                    "RB022",
                    "unknown-environment",
                    f"unknown environment {env!r} in scopes",
                    _suggest(env, declared, fix),
                    (*base, "safety", "scopes", i),
                )
        for i, promotion in enumerate(safety.get("promotions", ())):
            if promotion["env"] not in declared:
                yield doc.diagnostic(
                    "RB022",
                    "unknown-environment",
                    f"unknown environment {promotion['env']!r} in a promotion",
                    _suggest(promotion["env"], declared, fix),
                    (*base, "safety", "promotions", i, "env"),
                )
    for doc in ctx.parsed.of_kind("catalog"):
        for service, env in doc.data.get("services", {}).items():
            if env not in declared:
                yield doc.diagnostic(
                    "RB022",
                    "unknown-environment",
                    f"service {service!r} is mapped to unknown environment {env!r}",
                    _suggest(env, declared, fix),
                    ("services", service),
                )


@rule
def invalid_regexes(ctx: Context) -> Iterator[Diagnostic]:
    """RB023: patterns compile the way the executor and the matcher compile them."""
    checked: dict[tuple[str, int], str | None] = {}

    def problem(pattern: str, flags: int) -> str | None:
        key = (pattern, flags)
        if key not in checked:
            try:
                re.compile(pattern, flags)
                checked[key] = None
            except re.error as exc:
                checked[key] = str(exc)
        return checked[key]

    def diagnostic(doc: SourceDoc, path: JsonPath, pattern: str, error: str) -> Diagnostic:
        return doc.diagnostic(
            "RB023",
            "invalid-regex",
            f"invalid regular expression {pattern!r}: {error}",
            "fix the pattern (Python `re` syntax); escape ( ) [ ] { } . * + ? | \\ with a "
            "backslash to match them literally",
            path,
        )

    for doc, base, data, _ in ctx.guarded():
        for i, expectation in enumerate(data.get("expect", ())):
            error = problem(expectation["pattern"], re.MULTILINE)
            if error:
                yield diagnostic(
                    doc, (*base, "expect", i, "pattern"), expectation["pattern"], error
                )
    for doc in ctx.runbooks:
        for i, symptom in enumerate(doc.data["match"].get("symptoms", ())):
            error = problem(symptom, re.IGNORECASE)
            if error:
                yield diagnostic(doc, ("match", "symptoms", i), symptom, error)
    for doc in ctx.parsed.of_kind("catalog"):
        for i, pattern in enumerate(doc.data.get("secret_patterns", ())):
            error = problem(pattern, 0)
            if error:
                yield diagnostic(doc, ("secret_patterns", i), pattern, error)


@rule
def missing_expect(ctx: Context) -> Iterator[Diagnostic]:
    """RB024: without `expect`, any output with exit code 0 counts as success."""
    for doc, base, data, ident in ctx.guarded():
        if not data.get("expect") and not ctx.dropped(doc, *base, "expect"):
            where = (*base, "expect") if "expect" in data else (*base, "command")
            yield doc.diagnostic(
                "RB024",
                "missing-expect",
                f"{_what(base, ident)} has no `expect`: success can only be judged by the "
                "exit code",
                'add `expect:` with a pattern the output shows on success, e.g. `- pattern: "OK"`',
                where,
                severity="warning",
            )


@rule
def unpromoted_production_scopes(ctx: Context) -> Iterator[Diagnostic]:
    """RB025: a production scope needs a promotion record with its evidence."""
    if ctx.settings_broken:
        return  # which environments are production is in the settings, which have errors
    for doc, base, data, ident in ctx.guarded():
        if ctx.dropped(doc, *base, "safety", "promotions"):
            continue  # written, wrongly: the schema error says so
        safety = _safety(data)
        promoted = {
            p["env"]
            for p in safety.get("promotions", ())
            if str(p.get("evidence_url", "")).startswith("https://")
        }
        for i, env in enumerate(safety.get("scopes", ())):
            if ctx.settings.is_production(env) and env not in promoted:
                command = f"runbookctl promote --action {ident} --env {env} --evidence-url URL"
                fix = (
                    f"run `{command}` once it has proved itself in lower environments, "
                    f"or remove {env!r} from the scopes"
                )
                if base:
                    fix = "move the step into an action under actions/, then " + fix
                yield doc.diagnostic(
                    "RB025",
                    "unpromoted-scope",
                    f"{_what(base, ident)} is scoped to production environment {env!r} "
                    "without a promotion record (safety.promotions with an https:// "
                    "evidence_url)",
                    fix,
                    (*base, "safety", "scopes", i),
                )


def _production_scopes(ctx: Context, data: dict[str, Any]) -> list[str]:
    return [env for env in _safety(data).get("scopes", ()) if ctx.settings.is_production(env)]


@rule
def executors(ctx: Context) -> Iterator[Diagnostic]:
    """RB044/RB045/RB046: where a command runs is said, declared, and not the bot's
    own host in production."""
    if ctx.settings_broken:
        return  # pools, service accounts and production are in the settings
    pools = ctx.settings.runner_pools
    accounts = ctx.settings.service_accounts
    for doc, base, data, ident in ctx.guarded():
        if ctx.dropped(doc, *base, "executor"):
            continue  # written, wrongly: the schema error says so
        production = _production_scopes(ctx, data)
        chosen = data.get("executor")
        if chosen is None:
            if production:
                yield doc.diagnostic(
                    "RB044",
                    "missing-executor",
                    f"{_what(base, ident)} is scoped to production environment "
                    f"{production[0]!r} and does not say where it runs",
                    "add `executor: {runner: POOL}` (a pull runner beside the systems) or "
                    "`executor: {kubernetes: {namespace, image, service_account}}`; "
                    "`executor: local` runs it on the bot's own host",
                    (*base, "safety", "scopes", _safety(data)["scopes"].index(production[0])),
                )
            continue
        if chosen == "local":
            if production:
                yield doc.diagnostic(
                    "RB046",
                    "local-production",
                    f"{_what(base, ident)} runs on the bot's own host (`executor: local`) in "
                    f"production environment {production[0]!r}",
                    "run it where the systems are, with only the rights it needs: "
                    "`executor: {runner: POOL}` or `executor: {kubernetes: {…}}`",
                    (*base, "executor"),
                    severity="warning",
                )
            continue
        if "runner" in chosen and chosen["runner"] not in pools:
            pool = chosen["runner"]
            fix = (
                f"declare it in the catalog: `runner_pools: [{{name: {pool}}}]`"
                if not pools
                else f"use one of: {', '.join(pools)}, or declare it under `runner_pools`"
            )
            yield doc.diagnostic(
                "RB045",
                "unknown-executor-target",
                f"{_what(base, ident)} names runner pool {pool!r}, which the catalog does "
                "not declare",
                _suggest(pool, pools, fix),
                (*base, "executor", "runner"),
            )
        if "kubernetes" in chosen:
            job = chosen["kubernetes"]
            account = (job["namespace"], job["service_account"])
            if account not in accounts:
                names = [f"{n}/{a}" for n, a in accounts]
                fix = (
                    "declare it in the catalog under `kubernetes: {service_accounts: "
                    f"[{{namespace: {account[0]}, name: {account[1]}}}]}}`"
                )
                if names:
                    fix = f"use one of: {', '.join(names)}, or " + fix
                yield doc.diagnostic(
                    "RB045",
                    "unknown-executor-target",
                    f"{_what(base, ident)} runs as Kubernetes service account "
                    f"{account[1]!r} in namespace {account[0]!r}, which the catalog does "
                    "not declare",
                    fix,
                    (*base, "executor", "kubernetes", "service_account"),
                )


# --- destructive commands --------------------------------------------------------------

# Cheap test first: most commands mention none of these words.
_DANGER_HINT = re.compile(
    r"rm|kubectl|\boc\b|terraform|tofu|helm|mkfs|\bdd\b|shutdown|reboot|halt|poweroff"
    r"|flush|drop|truncate|delete",
    re.IGNORECASE,
)
_DANGEROUS_TEXT: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bFLUSH(?:ALL|DB)\b", re.IGNORECASE), "Redis {0}"),
    (
        re.compile(
            r"\bDROP\s+(?:TABLE|DATABASE|SCHEMA|VIEW|MATERIALIZED\s+VIEW|INDEX|SEQUENCE|USER"
            r"|ROLE|KEYSPACE|TABLESPACE|COLLECTION|FUNCTION|PROCEDURE|TRIGGER|TYPE"
            r"|EXTENSION|OWNED)\b",
            re.IGNORECASE,
        ),
        "SQL `{0}`",
    ),
    (re.compile(r"\bTRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?[\"`\[\w]", re.IGNORECASE), "SQL TRUNCATE"),
)
_DELETE_FROM = re.compile(r"\bDELETE\s+FROM\b([^;]*)", re.IGNORECASE)
_WHERE = re.compile(r"\bWHERE\b", re.IGNORECASE)
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"})
_POWER = frozenset({"shutdown", "reboot", "halt", "poweroff"})
_OPERATORS = frozenset(";&|()<>")


def destructive_operation(command: str | list[str]) -> str | None:
    """What makes `command` destructive (e.g. "`rm -rf`"), or None.

    A heuristic over the words of the command, including scripts passed to
    ``sh -c``; it errs on the side of flagging, since the fix (require approval) is cheap.
    """
    text = command if isinstance(command, str) else " ".join(command)
    if not _DANGER_HINT.search(text):
        return None
    for pattern, label in _DANGEROUS_TEXT:
        found = pattern.search(text)
        if found:
            return label.format(" ".join(found.group(0).upper().split()))
    for found in _DELETE_FROM.finditer(text):
        if not _WHERE.search(found.group(1)):
            return "SQL `DELETE FROM` without WHERE"
    words = _words(command) if isinstance(command, str) else list(command)
    return _dangerous_words(words, depth=0)


def _words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: still look at the words
        return re.findall(r"[^\s;&|()<>]+|[;&|()<>]+", text)


def _dangerous_words(words: list[str], depth: int) -> str | None:
    segment: list[str] = []
    for word in [*words, ";"]:
        if word and set(word) <= _OPERATORS:
            found = _dangerous_segment(segment, depth)
            if found:
                return found
            segment = []
        else:
            segment.append(word)
    return None


def _dangerous_segment(words: list[str], depth: int) -> str | None:
    for i, word in enumerate(words):
        name = word.rsplit("/", 1)[-1]
        rest = words[i + 1 :]
        if name == "rm":
            flags = [w for w in rest if w.startswith("-") and w != "-"]
            if "--" in rest:
                flags = [w for w in rest[: rest.index("--")] if w.startswith("-")]
            short = "".join(f[1:] for f in flags if not f.startswith("--"))
            recursive = "r" in short or "R" in short or "--recursive" in flags
            force = "f" in short or "--force" in flags
            if recursive and force:
                return "`rm -rf`"
        elif name in ("kubectl", "oc"):
            verb = next((w for w in rest if w in ("delete", "drain")), None)
            if verb:
                return f"`{name} {verb}`"
        elif name in ("terraform", "tofu"):
            if any(w in ("destroy", "-destroy", "--destroy") for w in rest):
                return f"`{name} destroy`"
        elif name == "helm":
            if any(w in ("uninstall", "delete", "del", "un") for w in rest):
                return "`helm uninstall`"
        elif name.startswith("mkfs"):
            return f"`{name}`"
        elif name == "dd":
            if any(w.startswith("of=/dev/") for w in rest):
                return "`dd of=/dev/…`"
        elif name in _POWER:
            return f"`{name}`"
        elif name in _SHELLS and depth < 3:
            for j, option in enumerate(rest[:-1]):
                if option.startswith("-") and not option.startswith("--") and "c" in option:
                    found = _dangerous_words(_words(rest[j + 1]), depth + 1)
                    if found:
                        return found
                    break
    return None


@rule
def destructive_without_approval(ctx: Context) -> Iterator[Diagnostic]:
    """RB026: a destructive command never runs without a person approving it."""
    for doc, base, data, ident in ctx.guarded():
        if _requires_approval(data):
            continue
        operation = destructive_operation(data["command"])
        if operation:
            yield doc.diagnostic(
                "RB026",
                "destructive-without-approval",
                f"{_what(base, ident)} runs a destructive command ({operation}) with "
                "`requires_approval: false`",
                "set `safety.requires_approval: true` so a person approves every run",
                (*base, "command"),
            )


@rule
def unmeetable_approvals(ctx: Context) -> Iterator[Diagnostic]:
    """RB043: `approvals` / `self_approval` that cannot take effect as written."""
    for doc, base, data, ident in ctx.guarded():
        safety = _safety(data)
        needed = safety.get("approvals", 1)
        if not isinstance(needed, int) or isinstance(needed, bool):
            continue  # the schema says so
        keys = [k for k in ("approvals", "self_approval") if k in safety]
        if keys and not _requires_approval(data):
            yield doc.diagnostic(
                "RB043",
                "unmeetable-approvals",
                f"{_what(base, ident)} sets `safety.{keys[0]}` but runs without approval "
                "(`requires_approval: false`), so it has no effect",
                f"set `safety.requires_approval: true`, or remove `safety.{keys[0]}`",
                (*base, "safety", keys[0]),
            )
            continue
        approvers = safety.get("approvers")
        if needed > 1 and isinstance(approvers, dict) and not approvers.get("groups"):
            users = {u for u in approvers.get("users") or () if isinstance(u, str)}
            if len(users) < needed:
                yield doc.diagnostic(
                    "RB043",
                    "unmeetable-approvals",
                    f"{_what(base, ident)} needs {needed} different approvers "
                    f"(`safety.approvals: {needed}`) but its approvers name only "
                    f"{len(users)}, so no request could ever be approved",
                    f"list at least {needed} users or a user group under "
                    "`safety.approvers`, or lower `safety.approvals`",
                    (*base, "safety", "approvals"),
                )


@rule
def shell_commands(ctx: Context) -> Iterator[Diagnostic]:
    """RB027: `shell: true` lets the shell interpret the command; flag every use."""
    for doc, base, data, ident in ctx.guarded():
        if data.get("shell") is not True:
            continue
        if _requires_approval(data):
            yield doc.diagnostic(
                "RB027",
                "shell",
                f"{_what(base, ident)} runs through a shell (`shell: true`)",
                "prefer a command without a shell (a list of arguments); if a pipe or "
                "redirection is really needed, keep `shell: true` and review it closely",
                (*base, "shell"),
                severity="warning",
            )
        else:
            yield doc.diagnostic(
                "RB027",
                "shell",
                f"{_what(base, ident)} runs through a shell (`shell: true`) without approval",
                "drop `shell: true` (write the command as a list of arguments) or set "
                "`safety.requires_approval: true`",
                (*base, "shell"),
            )


# --- templates -------------------------------------------------------------------------


def _templates(data: dict[str, Any], base: JsonPath) -> Iterator[tuple[JsonPath, str]]:
    """(path, variable) for every placeholder in the command and the env values."""
    command = data["command"]
    if isinstance(command, str):
        if "{{" in command:
            for name in template_variables(command):
                yield (*base, "command"), name
    else:
        for i, arg in enumerate(command):
            if "{{" in arg:
                for name in template_variables(arg):
                    yield (*base, "command", i), name
    for key, value in data.get("env", {}).items():
        if "{{" in value:
            for name in template_variables(value):
                yield (*base, "env", key), name


def _incident_problem(name: str) -> str | None:
    """Why `incident.…` cannot be read, or None when the incident context provides it."""
    _, _, rest = name.partition(".")
    field_name, _, sub = rest.partition(".")
    if not field_name or field_name == "details":
        return None
    if field_name not in INCIDENT_FIELDS:
        return f"the incident has no field {field_name!r}"
    if sub:
        return f"incident.{field_name} is a plain value: it has no {sub!r}"
    return None


_VARIABLES_FIX = (
    "templates read incident.{" + ",".join(INCIDENT_FIELDS[:-1]) + "}, "
    "incident.details.<key> and params.<name>"
)


@rule
def unknown_template_variables(ctx: Context) -> Iterator[Diagnostic]:
    """RB028: every `{{ … }}` resolves for every step that runs the command."""
    for doc, base, data, ident in ctx.guarded():
        declared: dict[str, Any] = data.get("params", {})
        inline = bool(base)
        reported: set[tuple[int, str]] = set()
        for path, name in _templates(data, base):
            head, _, rest = name.partition(".")
            if head == "incident":
                problem = _incident_problem(name)
                if problem:
                    field_name = rest.partition(".")[0]
                    yield doc.diagnostic(
                        "RB028",
                        "unknown-template-variable",
                        f"{{{{ {name} }}}}: {problem}",
                        _suggest(field_name, INCIDENT_FIELDS, _VARIABLES_FIX, prefix="incident."),
                        path,
                    )
                continue
            if head != "params":
                yield doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"unknown template variable {{{{ {name} }}}}",
                    _VARIABLES_FIX,
                    path,
                )
                continue
            param, _, sub = rest.partition(".")
            if not param:
                continue  # `{{ params }}`: all of them, as JSON
            if sub:
                yield doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"{{{{ {name} }}}}: params.{param} is a plain value, it has no {sub!r}",
                    f"write {{{{ params.{param} }}}}",
                    path,
                )
                continue
            if declared.get(param) is not None or ctx.dropped(doc, *base, "params"):
                continue  # declared, or declared wrongly (the schema error says so)
            if inline:
                yield doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"{{{{ {name} }}}}: this step's `params` "
                    + ("sets it to null" if param in declared else f"has no {param!r}"),
                    f"add `params: {{{param}: …}}` to the step",
                    path,
                )
                continue
            usages = ctx.usages.get(ident, [])
            if not usages and param not in declared:
                yield doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"{{{{ {name} }}}} is not declared in this action's `params`",
                    f"add `{param}: <default>` under `params` (null if every step must set it)",
                    path,
                )
            for usage in usages:
                step_params = usage.step.get("params") or {}
                if step_params.get(param) is not None or (id(usage), param) in reported:
                    continue
                if ctx.dropped(usage.doc, *usage.path[:2], "params"):
                    continue
                reported.add((id(usage), param))
                line, _ = doc.where(path)
                yield usage.doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"action {ident!r} needs {{{{ {name} }}}} ({doc.file}:{line}), but neither "
                    "its params nor this step set it",
                    f"add `params: {{{param}: …}}` to this step, or a default for {param!r} "
                    "to the action's params",
                    usage.path,
                )


def _param_values(ctx: Context) -> Iterator[tuple[SourceDoc, JsonPath, str, str]]:
    """(doc, path, param name, text) of every param value with `{{` in it.

    Action defaults and the values steps set: both are rendered from the incident
    (`bot.executor.render_params`) before the command is built.
    """
    for doc in ctx.parsed.of_kind("action"):
        for name, value in (doc.data.get("params") or {}).items():
            if isinstance(value, str) and "{{" in value:
                yield doc, ("params", name), name, value
    for doc in ctx.runbooks:
        for path, step in ctx.steps(doc):
            for name, value in (step.get("params") or {}).items():
                if isinstance(value, str) and "{{" in value:
                    yield doc, (*path, "params", name), name, value


@rule
def param_templates(ctx: Context) -> Iterator[Diagnostic]:
    """RB028/RB036 for params: what is rendered in a param value resolves from the incident."""
    for doc, path, param, text in _param_values(ctx):
        for name in template_variables(text):
            head, _, rest = name.partition(".")
            if head == "params":
                yield doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"param {param!r} uses {{{{ {name} }}}}: a param is rendered from the "
                    "incident, and cannot use other params",
                    "write the value out, or use {{ incident.… }}; the command can put params "
                    "together itself, e.g. `--url=https://{{ params.host }}{{ params.path }}`",
                    path,
                )
            elif head == "incident":
                problem = _incident_problem(name)
                if problem:
                    yield doc.diagnostic(
                        "RB028",
                        "unknown-template-variable",
                        f"param {param!r}: {{{{ {name} }}}}: {problem}",
                        _suggest(
                            rest.partition(".")[0],
                            INCIDENT_FIELDS,
                            _PARAM_VARIABLES_FIX,
                            prefix="incident.",
                        ),
                        path,
                    )
            else:
                yield doc.diagnostic(
                    "RB028",
                    "unknown-template-variable",
                    f"param {param!r}: unknown template variable {{{{ {name} }}}}",
                    _PARAM_VARIABLES_FIX,
                    path,
                )
        for snippet, why, meant in malformed_templates(text):
            fix = (
                f"write {{{{ {meant} }}}}" if meant else "write {{ incident.<field> }}"
            ) + ": a template is `{{ dotted.name }}` and nothing else"
            yield doc.diagnostic(
                "RB036",
                "malformed-template",
                f"param {param!r}: `{snippet}` is not a template the bot substitutes as "
                f"written: {why}",
                fix,
                path,
            )


_PARAM_VARIABLES_FIX = (
    "params read incident.{" + ",".join(INCIDENT_FIELDS[:-1]) + "} and incident.details.<key>"
)


@rule
def command_templates(ctx: Context) -> Iterator[Diagnostic]:
    """RB034: the command can be turned into an argv the way the executor does it."""
    for doc, base, data, ident in ctx.guarded():
        command = data["command"]
        shell = data.get("shell") is True
        plain = isinstance(command, str) and not shell and "{{" not in command
        if plain and command.strip() and not any(c in command for c in "'\"\\"):
            continue  # nothing the executor could refuse: skip the work
        context: dict[str, Any] = {}
        for _, name in _templates(data, base):
            _provide(context, name)
        try:
            render_argv(CommandSpec(command=command, shell=shell), context)
        except TemplateError as exc:
            yield doc.diagnostic(
                "RB034",
                "command-template",
                f"{_what(base, ident)}: {_first_line(str(exc))}",
                "name the program literally, pass values as separate arguments, and in "
                "`shell: true` commands put each {{ … }} in a plain word or in double quotes",
                (*base, "command"),
            )


def _provide(context: dict[str, Any], name: str) -> None:
    """Make `name` resolvable in `context` with a harmless value."""
    node = context
    parts = name.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node.setdefault(parts[-1], "x")


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def _template_texts(data: dict[str, Any], base: JsonPath) -> Iterator[tuple[JsonPath, str]]:
    """(path, text) for the command (each argument of a list) and every env value."""
    command = data["command"]
    if isinstance(command, str):
        yield (*base, "command"), command
    else:
        for i, arg in enumerate(command):
            yield (*base, "command", i), arg
    for key, value in data.get("env", {}).items():
        yield (*base, "env", key), value


_OPEN = re.compile(r"\{\{")
# Text after `{{` that is meant for the bot: it starts with incident/params, or reads
# `incident.`/`params.` as a word of its own. Go templates (`{{.State.Status}}`,
# `{{ .Values.x }}`, `{{ if eq .kind "incident" }}`) do neither.
_OURS_FIRST = re.compile(r"[\s{-]*(?:incident|params)\b")
_OURS_INSIDE = re.compile(r"(?<![\w.$\"'`])(?:incident|params)\s*\.\s*[A-Za-z_]")
_INDEX = re.compile(r"\[\s*(['\"])([A-Za-z0-9_-]+)\1\s*\]")
_DOTTED_NAME = re.compile(r"(?:incident|params)(?:\s*\.\s*[A-Za-z0-9_-]+)*")
_SHOWN_CHARACTERS = 60


def malformed_templates(text: str) -> list[tuple[str, str, str | None]]:
    """Template-like text the executor would leave as it is, and so run as literal text.

    Returns ``(snippet, why, meant)`` for each: what was written, why it is not a
    placeholder, and the placeholder it probably meant (or None when unclear).
    """
    found: list[tuple[str, str, str | None]] = []
    if "{{" not in text:
        return found
    for opening in _OPEN.finditer(text):
        start = opening.start()
        placeholder = _PLACEHOLDER.match(text, start)
        if placeholder is not None:
            end = placeholder.end()
            # `{"n": {{ params.n }}}` closes an outer brace; `{{ params.n }}}` does not.
            if text.startswith("}", end) and _open_braces(text[:start]) <= 0:
                found.append(
                    (
                        placeholder.group(0) + "}",
                        "one `}` too many; the placeholder is substituted and the extra `}` stays",
                        placeholder.group(1),
                    )
                )
            continue
        closing = text.find("}}", start + 2)
        stops = [i for i in (text.find("{{", start + 2), text.find("\n", start)) if i >= 0]
        stop = min(stops, default=len(text))
        closed = 0 <= closing < stop
        inner = text[start + 2 : closing if closed else stop]
        if not (_OURS_FIRST.match(inner) or _OURS_INSIDE.search(inner)):
            continue
        end = closing + 2 if closed else stop
        while closed and text.startswith("}", end):
            end += 1
        snippet = text[start:end].rstrip()
        if len(snippet) > _SHOWN_CHARACTERS:
            snippet = snippet[: _SHOWN_CHARACTERS - 1] + "…"
        found.append((snippet, _template_problem(inner, closed), _meant(inner)))
    return found


def _open_braces(text: str) -> int:
    plain = _PLACEHOLDER.sub("", text)
    return plain.count("{") - plain.count("}")


def _template_problem(inner: str, closed: bool) -> str:
    if not closed:
        return "it is not closed with `}}`, so it runs as literal text"
    if inner.lstrip().startswith("{"):
        return "one `{` too many; a placeholder inside is substituted and the extra braces stay"
    if "|" in inner:
        return "templates have no `|` filters, so it runs as literal text"
    if "(" in inner:
        return "templates have no calls, so it runs as literal text"
    if "[" in inner:
        return "templates have no `[…]` indexing, so it runs as literal text"
    if _DOTTED_NAME.search(inner) and re.search(r"\s\.|\.\s", inner):
        return "a space inside the dotted name makes it literal text"
    return "a template is a dotted name and nothing else, so it runs as literal text"


def _meant(inner: str) -> str | None:
    """The placeholder `inner` most likely means, if it names a field."""
    text = _INDEX.sub(r".\2", inner)
    name = _DOTTED_NAME.search(text)
    if name is None:
        return None
    parts = re.sub(r"\s+", "", name.group(0)).split(".")
    # incident.<field>, incident.details.<key>, params.<name>: nothing deeper resolves
    keep = 3 if parts[:2] == ["incident", "details"] else 2
    return ".".join(parts[:keep]) if len(parts) > 1 else None


@rule
def malformed_templates_rule(ctx: Context) -> Iterator[Diagnostic]:
    """RB036: template-like text the executor would not substitute runs as it is."""
    for doc, base, data, ident in ctx.guarded():
        for path, text in _template_texts(data, base):
            for snippet, why, meant in malformed_templates(text):
                fix = (
                    f"write {{{{ {meant} }}}}" if meant else "write {{ incident.<field> }}"
                ) + ": a template is `{{ dotted.name }}` and nothing else"
                if "|" in snippet or "(" in snippet:
                    fix += "; to transform a value, do it in the command itself"
                yield doc.diagnostic(
                    "RB036",
                    "malformed-template",
                    f"{_what(base, ident)}: `{snippet}` is not a template the bot substitutes "
                    f"as written: {why}",
                    fix,
                    path,
                )


# --- programs that parse an argument as shell code -------------------------------------

# Cheap test first: most commands name none of these programs.
_REPARSE_HINT = re.compile(
    r"(?<![\w.-])(?:sh|bash|dash|zsh|ksh|ash|mksh|fish|ssh|eval|su|runuser|watch)(?![\w.-])"
)
_REPARSE_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "fish"})
_REPARSERS = _REPARSE_SHELLS | {"ssh", "eval", "su", "runuser", "watch"}
# Programs that run another program named in their arguments, its arguments unchanged:
# as another user, for each input line or file, under limits, in another namespace.
_RUNNERS = (
    frozenset({"sudo", "doas", "env", "exec", "command", "xargs", "find", "parallel"})
    | frozenset({"nice", "nohup", "timeout", "time", "stdbuf", "setsid", "flock", "ionice"})
    | frozenset({"chrt", "taskset", "chroot", "nsenter", "unshare", "busybox"})
)
_CONTAINER_CLIS = frozenset({"kubectl", "oc", "docker", "podman", "nerdctl", "crictl"})
_CONTAINER_RUN = frozenset({"exec", "run", "debug"})
_SSH_OPTIONS_WITH_VALUE = frozenset("BbcDEeFIiJLlmOoPpQRSWw")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_SHELL_OPERATORS = frozenset(";&|()<>")


@dataclass(frozen=True)
class Reparsed:
    """An argument that a program parses as shell code."""

    index: int  # of the argument in a list command; 0 in a string command
    program: str  # what parses it: "sh -c", "ssh", "eval", "su -c", "watch"
    first: bool  # the program is the command itself, not run by sudo, kubectl exec…


def _reparsed(words: list[str]) -> list[tuple[int, str, bool]]:
    """(index, program, first) for each word of argv that a program parses as shell code.

    `sh -c SCRIPT ARG…` parses SCRIPT only: ARG… become $0, $1… and are safe. ssh joins
    every word after the host for the remote shell. Programs that run another program
    (`sudo`, `env`, `xargs`, `kubectl exec … --`, `docker exec`) are looked through.
    """
    i, n = 0, len(words)
    while i < n and _ASSIGNMENT.match(words[i]):
        i += 1  # `VAR=value cmd` in a `shell: true` command
    first = i
    while i < n:
        name = _program(words[i])
        rest = range(i + 1, n)
        if name in _REPARSE_SHELLS:
            script = _shell_script(words, i)
            return [] if script is None else [(script, f"{name} -c", i == first)]
        if name == "ssh":
            j = i + 1
            while j < n and words[j].startswith("-") and words[j] != "--":
                option = words[j]
                j += 2 if len(option) == 2 and option[1] in _SSH_OPTIONS_WITH_VALUE else 1
            j += 1 if j < n and words[j] == "--" else 0
            return [(k, "ssh", i == first) for k in range(j + 1, n)]  # words[j]: the host
        if name == "eval":
            return [(k, "eval", i == first) for k in rest]
        if name in ("su", "runuser"):
            end = words.index("--", i) if "--" in words[i:] else n
            for k in range(i + 1, end):
                if words[k].startswith("--command="):
                    return [(k, f"{name} -c", i == first)]
                if words[k] in ("-c", "--command") and k + 1 < end:
                    return [(k + 1, f"{name} -c", i == first)]
            i = _next_reparser(words, end)  # `runuser -u app -- CMD…` runs CMD itself
            continue
        if name == "watch":
            j = i + 1
            while j < n and words[j].startswith("-"):
                if words[j] in ("-x", "--exec"):
                    return []  # runs the program itself, without a shell
                j += 2 if words[j] in ("-n", "--interval") else 1
            return [(k, "watch", i == first) for k in range(j, n)]
        runs_another = name in _RUNNERS or (
            name in _CONTAINER_CLIS and any(words[k] in _CONTAINER_RUN for k in rest)
        )
        if not runs_another:
            return []
        i = _next_reparser(words, i + 1)
    return []


def _shell_script(words: list[str], i: int) -> int | None:
    """Where the script of `sh -c SCRIPT` is (options such as `-e`, `-o pipefail` allowed)."""
    j, n, has_c = i + 1, len(words), False
    while j < n:
        word = words[j]
        if word == "--":
            j += 1
            break
        if word in ("-o", "+o", "-O", "+O"):
            j += 2
            continue
        if len(word) < 2 or word[0] not in "-+":
            break
        has_c = has_c or (word[0] == "-" and not word.startswith("--") and "c" in word)
        j += 1
    return j if has_c and j < n else None


def _next_reparser(words: list[str], start: int) -> int:
    """The index of the next word naming a program that parses shell code, or the end."""
    return next(
        (k for k in range(start, len(words)) if _program(words[k]) in _REPARSERS), len(words)
    )


def _program(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def reparsed_templates(command: str | list[str], *, shell: bool = False) -> list[Reparsed]:
    """Arguments with a placeholder that a program would parse again as shell code.

    A string is split the way the executor splits it (placeholders kept whole); a
    `shell: true` command is split into words and simple commands the way the shell
    splits it.
    """
    text = command if isinstance(command, str) else " ".join(command)
    if "{{" not in text or not _REPARSE_HINT.search(text):
        return []
    if not isinstance(command, str):
        words = list(command)
        return [
            Reparsed(k, program, first)
            for k, program, first in _reparsed(words)
            if _PLACEHOLDER.search(words[k])
        ]
    marker = "\ue000"  # a private-use character standing in for each placeholder
    masked = _PLACEHOLDER.sub(marker, command.replace(marker, ""))
    if shell:
        segments: list[list[str]] = [[]]
        for word in _words(masked):
            if word and set(word) <= _SHELL_OPERATORS:
                segments.append([])
            else:
                segments[-1].append(word)
    else:
        try:
            segments = [shlex.split(masked)]
        except ValueError:
            return []  # RB034 reports the unbalanced quotes
    return [
        Reparsed(0, program, first)
        for words in segments
        for k, program, first in _reparsed(words)
        if marker in words[k]
    ]


_REPARSED_WHERE = {
    "ssh": "the remote command of `ssh`",
    "eval": "the code `eval` runs",
    "watch": "the command `watch` runs with `sh -c`",
}
_REPARSED_SSH_FIX = (
    "keep placeholders out of ssh's remote command: ssh joins its arguments into one "
    "string for the remote shell, so neither separate arguments nor quoting help; run a "
    "fixed remote command, or run the action on that host"
)
_REPARSED_FIX = (
    "pass values as separate arguments (`sh -c 'grep -F -- \"$1\" app.log' sh "
    "{{ incident.title }}`) or as environment variables (`env: {TITLE: "
    '"{{ incident.title }}"}` and `"$TITLE"` inside the script)'
)


@rule
def reparsed_templates_rule(ctx: Context) -> Iterator[Diagnostic]:
    """RB037: a placeholder in an argument that a program parses as shell code."""
    for doc, base, data, ident in ctx.guarded():
        command = data["command"]
        shell = data.get("shell") is True
        reported: set[JsonPath] = set()
        for found in reparsed_templates(command, shell=shell):
            path: JsonPath = (*base, "command")
            if isinstance(command, list):
                path = (*path, found.index)
            if path in reported:
                continue  # one report per argument (a string command is one)
            reported.add(path)
            text = command[found.index] if isinstance(command, list) else command
            names = ", ".join(f"{{{{ {name} }}}}" for name in template_variables(text))
            where = _REPARSED_WHERE.get(found.program, f"the script `{found.program}` runs")
            if found.program == "ssh":
                fix = _REPARSED_SSH_FIX
            elif found.first and found.program.endswith(" -c") and not shell:
                # the local shell's script can become the command, quoted by the bot
                fix = _REPARSED_FIX + ", or use `shell: true`, which quotes every value"
            else:
                fix = _REPARSED_FIX
            yield doc.diagnostic(
                "RB037",
                "reparsed-template",
                f"{_what(base, ident)}: {names} is part of {where}, so the value will be "
                "parsed by a shell on the other end: a value such as `$(reboot)` or "
                "`; reboot` would run as a command",
                fix,
                path,
                severity="warning" if _requires_approval(data) else "error",
            )


# --- params ----------------------------------------------------------------------------

_EVERY_PARAM = "*"  # `{{ params }}` or a condition reading `params` whole: every key is read


def _params_read(data: dict[str, Any]) -> set[str]:
    """The params an action reads: declared under `params`, or used in command or env."""
    read = set(data.get("params", {}))
    for _, name in _templates(data, ()):
        head, _, rest = name.partition(".")
        if head == "params":
            read.add(rest.partition(".")[0] or _EVERY_PARAM)
    return read


def _params_in_condition(condition: Condition) -> set[str]:
    """The params a `when` condition reads (all of them when it reads `params` whole)."""
    if condition.error is not None:
        return {_EVERY_PARAM}  # RB029 reports it; do not guess what it meant to read
    read = {key for name, key in condition.reads if name == "params"}
    return read | {_EVERY_PARAM} if "params" in condition.whole else read


@rule
def unknown_params(ctx: Context) -> Iterator[Diagnostic]:
    """RB035: every param a step sets is read by its action, its rollback or its `when`."""
    read_by = {ident: _params_read(action.data) for ident, action in ctx.actions.items()}
    for doc in ctx.runbooks:
        for path, step in ctx.steps(doc):
            params: dict[str, Any] = step.get("params") or {}
            if not params or "action" not in step:
                continue  # an inline step's params are its own declarations
            action_id: str = step["action"]
            on_failure = step.get("on_failure")
            # The engine runs the rollback with the failed step's params (`_rollback_step`).
            rollback: str | None = on_failure["rollback"] if isinstance(on_failure, dict) else None
            users = [action_id] if rollback is None else [action_id, rollback]
            if any(user not in read_by for user in users):
                continue  # RB021 reports the unknown action; its params are unknowable
            if ctx.dropped(doc, *path, "when") or any(
                ctx.dropped(ctx.actions[user], "params") for user in users
            ):
                continue  # what is read was written wrongly: the schema error says so
            read = set().union(*(read_by[user] for user in users))
            if isinstance(step.get("when"), str):
                read |= _params_in_condition(ctx.condition(step["when"]))
            if _EVERY_PARAM in read:
                continue
            step_id = str(step.get("id", action_id))
            readers = f"action {action_id!r}" + (
                f" or its rollback {rollback!r}" if rollback else ""
            )
            known = (
                f"params read by {readers}: {', '.join(sorted(read))}"
                if read
                else f"{readers} reads no params"
            )
            for name in params:
                if name in read:
                    continue
                yield doc.diagnostic(
                    "RB035",
                    "unknown-param",
                    f"step {step_id!r} sets param {name!r}, which {readers} does not "
                    "read: the value would be ignored",
                    f"{_suggest(name, sorted(read), f'remove {name!r}')} ({known})",
                    (*path, "params", name),
                    key=True,
                )


# --- conditions ------------------------------------------------------------------------


@rule
def invalid_conditions(ctx: Context) -> Iterator[Diagnostic]:
    """RB029: `when` parses, uses only what the evaluator allows, reads earlier steps."""
    for doc in ctx.runbooks:
        for key in ("steps", "on_resolve"):
            earlier: set[str] = set()
            all_ids = {str(s.get("id", s.get("action"))) for s in doc.data.get(key, ())}
            other_key = "on_resolve" if key == "steps" else "steps"
            other_ids = {str(s.get("id", s.get("action"))) for s in doc.data.get(other_key, ())}
            for i, step in enumerate(doc.data.get(key, ())):
                when = step.get("when")
                if isinstance(when, str):
                    yield from _check_condition(
                        doc,
                        (key, i, "when"),
                        when,
                        ctx.condition(when),
                        earlier,
                        all_ids,
                        other_ids,
                        other_key,
                    )
                step_id = str(step.get("id", step.get("action")))
                earlier.add(step_id)
                if isinstance(step.get("on_failure"), dict):
                    earlier.add(f"{step_id}:rollback")


def _check_condition(
    doc: SourceDoc,
    path: JsonPath,
    when: str,
    condition: Condition,
    earlier: set[str],
    same_list: set[str],
    other_list: set[str],
    other_key: str,
) -> Iterator[Diagnostic]:
    if condition.error is not None:
        yield doc.diagnostic(
            "RB029",
            "invalid-when",
            f"condition {when!r} is refused: {condition.error}",
            "write a comparison over incident, steps and params, e.g. "
            "\"steps['check'].status == 'success'\" or \"incident.urgency == 'high'\"",
            path,
        )
        return
    for name, key in condition.reads:
        if name == "incident" and key not in INCIDENT_FIELDS:
            yield doc.diagnostic(
                "RB029",
                "invalid-when",
                f"condition {when!r} reads incident.{key}, which the incident does not have "
                "(it would never be true)",
                _suggest(
                    key,
                    INCIDENT_FIELDS,
                    f"use one of: {', '.join(INCIDENT_FIELDS)}",
                    prefix="incident.",
                ),
                path,
            )
        elif name == "steps" and key not in earlier:
            if key in same_list:
                why = "it runs later in this runbook, so it has no result yet"
            elif key in other_list:
                where = "in on_resolve" if other_key == "on_resolve" else "in steps"
                why = f"it is {where}, which runs separately"
            else:
                why = "there is no such step before it"
            yield doc.diagnostic(
                "RB029",
                "invalid-when",
                f"condition {when!r} reads steps[{key!r}]: {why}",
                _suggest(key, sorted(earlier), "refer to a step listed before this one"),
                path,
            )


def _constant_key(node: ast.Subscript) -> str | None:
    if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return None


# --- matching --------------------------------------------------------------------------


@rule
def ambiguous_matches(ctx: Context) -> Iterator[Diagnostic]:
    """RB030: for a service and priority, something must tell two runbooks apart."""
    seen: dict[tuple[str, int, str | None], SourceDoc] = {}
    reported: set[tuple[int, int]] = set()
    for doc in ctx.runbooks:
        match = doc.data["match"]
        priority = int(match.get("priority", 0))
        symptoms: list[str] = match.get("symptoms") or []
        services: dict[str, int] = {}
        for i, service in enumerate(match["services"]):
            services.setdefault(service.casefold(), i)
        for service, service_index in services.items():
            keyed: list[tuple[str | None, JsonPath]] = (
                [(s.casefold(), ("match", "symptoms", j)) for j, s in enumerate(symptoms)]
                if symptoms
                else [(None, ("match", "services", service_index))]
            )
            for symptom, path in keyed:
                key = (service, priority, symptom)
                other = seen.setdefault(key, doc)
                if other is doc or (id(other), id(doc)) in reported:
                    continue
                reported.add((id(other), id(doc)))
                line, _ = other.where(("id",))
                ids = sorted((doc.data["id"], other.data["id"]))
                same = (
                    f"the same symptom {symptoms[int(path[-1])]!r}"
                    if symptom is not None
                    else "no symptoms"
                )
                shown = match["services"][service_index]
                yield doc.diagnostic(
                    "RB030",
                    "ambiguous-match",
                    f"runbooks {doc.data['id']!r} and {other.data['id']!r} "
                    f"({other.file}:{line}) both match service {shown!r} "
                    f"at priority {priority} with {same}; {ids[0]!r} always wins by id order",
                    "raise one's `match.priority`, or make their symptoms distinct",
                    path,
                    severity="warning",
                )


# --- catalog settings ------------------------------------------------------------------


@rule
def catalog_settings(ctx: Context) -> Iterator[Diagnostic]:
    """RB031/RB032: exactly one `kind: catalog` document."""
    docs = ctx.parsed.of_kind("catalog")
    for doc in docs[1:]:
        line, _ = docs[0].where(())
        yield doc.diagnostic(
            "RB031",
            "multiple-settings",
            f"a second catalog settings document (the first is at {docs[0].file}:{line})",
            "merge them into one `kind: catalog` document",
        )
    if not docs and ctx.parsed.docs and not ctx.settings_broken:
        yield Diagnostic(
            "RB032",
            "missing-settings",
            "warning",
            "no catalog settings (`kind: catalog`): the environments dev, staging and prod "
            "(production) are assumed",
            "add a catalog.yaml with `kind: catalog` and `environments:`",
            ctx.parsed.root,
        )


# --- Slack mentions --------------------------------------------------------------------

# What Slack turns into a notification: <@U…>/<@W…> (a person), <!subteam^S…> (a user
# group), <!here>, <!channel>, <!everyone>; each may carry a label after `|`.
_MENTION = re.compile(
    r"<@[UW][A-Z0-9]+(?:\|[^<>]*)?>|<!subteam\^S[A-Z0-9]+(?:\|[^<>]*)?>"
    r"|<!(?:here|channel|everyone)(?:\|[^<>]*)?>"
)
_SEPARATORS = re.compile(r"[\s,]+")


def mention_problem(text: str) -> tuple[str, str] | None:
    """(what is wrong, the fix) for an escalation mention Slack would not notify, or None.

    A mention is one or more of Slack's mention tokens, separated by spaces or commas;
    empty means nobody.
    """
    for word in _SEPARATORS.split(text.strip()):
        if not word or _MENTION.fullmatch(word):
            continue
        return _mention_fix(word)
    return None


def _mention_fix(word: str) -> tuple[str, str]:
    bare = word.strip("<>")
    if bare.lstrip("@!") in ("here", "channel", "everyone"):
        special = bare.lstrip("@!")
        return (
            f"`{word}` is plain text to the Slack API and notifies nobody",
            f"write `<!{special}>`",
        )
    if re.fullmatch(r"@?[UW][A-Z0-9]{2,}", bare):
        user = bare.lstrip("@")
        return (f"`{word}` is a user id without Slack's mention syntax", f"write `<@{user}>`")
    if re.fullmatch(r"(@|!subteam\^)?S[A-Z0-9]{2,}", bare):
        group = re.sub(r"^(@|!subteam\^)", "", bare)
        return (
            f"`{word}` is a user group id without Slack's mention syntax",
            f"write `<!subteam^{group}>`",
        )
    if word.startswith("@"):
        return (
            f"`{word}` is plain text to the Slack API: it notifies nobody",
            "mention a user group by its id, `<!subteam^S…>` (Slack › People › User groups › "
            "the group › ⋮ › Copy group ID), or a person as `<@U…>` (profile › ⋮ › Copy "
            "member ID); `<!here>` and `<!channel>` notify the channel",
        )
    return (
        f"`{word}` is not a Slack mention",
        "write `<!subteam^S…>` for a user group, `<@U…>` for a person, or `<!here>`",
    )


@rule
def slack_mentions(ctx: Context) -> Iterator[Diagnostic]:
    """RB041: an escalation mention Slack turns into a notification."""
    for doc in [*ctx.runbooks, *ctx.parsed.of_kind("catalog")]:
        escalation = doc.data.get("escalation")
        mention = escalation.get("mention") if isinstance(escalation, dict) else None
        if not isinstance(mention, str):
            continue
        problem = mention_problem(mention)
        if problem is not None:
            yield doc.diagnostic(
                "RB041",
                "slack-mention",
                f"escalation mention {mention!r}: {problem[0]}",
                problem[1],
                ("escalation", "mention"),
            )


@rule
def empty_catalog(ctx: Context) -> Iterator[Diagnostic]:
    """RB042: a catalog without a single action or runbook matches no incident."""
    parsed = ctx.parsed
    if parsed.of_kind("action") or ctx.runbooks or parsed.broken:
        return
    if any(d.severity == "error" for d in parsed.diagnostics):
        return  # the files that were meant to hold them have errors
    yield Diagnostic(
        "RB042",
        "empty-catalog",
        "warning",
        f"no actions or runbooks found in {parsed.root} "
        f"({parsed.files} YAML file{'' if parsed.files == 1 else 's'}): the bot would match "
        "no incident",
        "put actions under actions/ and runbooks under runbooks/ (docs/catalog.md), or "
        "point lint at the catalog directory",
        parsed.root,
    )


def _suggest(
    value: str, known: list[str] | tuple[str, ...], fallback: str, *, prefix: str = ""
) -> str:
    import difflib

    close = difflib.get_close_matches(value, list(known), n=1)
    return f"did you mean {prefix + close[0]!r}?" if close else fallback


# --- environments of services ------------------------------------------------------------


@rule
def unmapped_services(ctx: Context) -> Iterator[Diagnostic]:
    """RB038: with a `services` mapping, every service a runbook names should be in it."""
    from bot.catalog.environment import resolve_environment
    from bot.catalog.matcher import ANY_SERVICE, service_key

    settings_docs = ctx.parsed.of_kind("catalog")
    if not settings_docs or not ctx.settings.services:
        return
    settings_doc = settings_docs[0]
    line, _ = settings_doc.where(("services",), key=True)
    where = f"{settings_doc.file}:{line}"
    for doc in ctx.runbooks:
        for i, service in enumerate(doc.data["match"]["services"]):
            if service_key(service) == ANY_SERVICE:
                continue
            if resolve_environment(ctx.settings, service).known:
                continue
            yield doc.diagnostic(
                "RB038",
                "unmapped-service",
                f"service {service!r} is not under `services` ({where}): its incidents get "
                "the bot's RUNBOOK_ENV, or no environment at all (every step blocked) where "
                "RUNBOOK_ENV is not set",
                f"map it under `services:` in {settings_doc.file} (e.g. `{service}: staging`)",
                ("match", "services", i),
                severity="warning",
            )


@rule
def conflicting_service_mappings(ctx: Context) -> Iterator[Diagnostic]:
    """RB039: two `services` keys that differ only in case name one service: one env."""
    from bot.catalog.matcher import service_key

    for doc in ctx.parsed.of_kind("catalog")[:1]:
        first: dict[str, tuple[str, str]] = {}
        for name, env in doc.data.get("services", {}).items():
            other = first.setdefault(service_key(name), (name, env))
            if other[0] == name or other[1] == env:
                continue
            yield doc.diagnostic(
                "RB039",
                "conflicting-service-mapping",
                f"{name!r} maps to {env}, but {other[0]!r} maps to {other[1]}: services are "
                "matched without regard to case, so both are one service",
                f"keep one of them; {other[0]!r} (written first) is the one that counts now",
                ("services", name),
                key=True,
            )
