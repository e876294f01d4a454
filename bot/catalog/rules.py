"""Semantic lint rules: what the JSON Schema cannot see on its own.

Each rule has a stable code (never reused, never renumbered) and yields diagnostics that
say where the problem is and how to fix it. Rules run on parsed documents (plain data
with positions), so they work even when the catalog could not be built.

Codes:
  RB001 yaml-syntax         RB002 duplicate-key      RB003 not-a-mapping
  RB004 file-too-large      RB005 unsafe-yaml        RB009 no-catalog
  RB010 schema
  RB020 duplicate-id        RB021 unknown-action     RB022 unknown-environment
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import ParsedCatalog, build_settings
from bot.catalog.model import Settings
from bot.catalog.yamlsource import JsonPath, SourceDoc


@dataclass
class Context:
    parsed: ParsedCatalog
    settings: Settings
    actions: dict[str, SourceDoc] = field(default_factory=dict)  # first definition wins

    @property
    def runbooks(self) -> list[SourceDoc]:
        return self.parsed.of_kind("runbook")

    def steps(self, doc: SourceDoc) -> Iterator[tuple[JsonPath, dict[str, object]]]:
        """Every step of a runbook document, with its path, main steps and follow-ups."""
        for key in ("steps", "on_resolve"):
            for i, step in enumerate(doc.data.get(key, ())):
                yield (key, i), step


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
    found: list[Diagnostic] = []
    for fn in RULES:
        found.extend(fn(context))
    return found


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
    for doc in ctx.runbooks:
        for path, step in ctx.steps(doc):
            refs: list[tuple[JsonPath, object]] = []
            if "action" in step:
                refs.append(((*path, "action"), step["action"]))
            on_failure = step.get("on_failure")
            if isinstance(on_failure, dict) and "rollback" in on_failure:
                refs.append(((*path, "on_failure", "rollback"), on_failure["rollback"]))
            for ref_path, ref in refs:
                if ref not in ctx.actions:
                    yield doc.diagnostic(
                        "RB021",
                        "unknown-action",
                        f"unknown action {ref!r}",
                        _suggest(str(ref), known, "define it under actions/ or fix the name"),
                        ref_path,
                    )


@rule
def unknown_environments(ctx: Context) -> Iterator[Diagnostic]:
    """RB022: scopes, promotions and service mappings name declared environments."""
    declared = ctx.settings.environment_names
    fix = f"use one of: {', '.join(declared)}, or declare it under `environments` in the catalog"

    def check_safety(doc: SourceDoc, base: JsonPath, safety: object) -> Iterator[Diagnostic]:
        if not isinstance(safety, dict):
            return
        for i, env in enumerate(safety.get("scopes", ())):
            if env not in declared:
                yield doc.diagnostic(
                    "RB022",
                    "unknown-environment",
                    f"unknown environment {env!r} in scopes",
                    _suggest(env, declared, fix),
                    (*base, "scopes", i),
                )
        for i, promotion in enumerate(safety.get("promotions", ())):
            if promotion.get("env") not in declared:
                yield doc.diagnostic(
                    "RB022",
                    "unknown-environment",
                    f"unknown environment {promotion.get('env')!r} in a promotion",
                    fix,
                    (*base, "promotions", i, "env"),
                )

    for doc in ctx.parsed.of_kind("action"):
        yield from check_safety(doc, ("safety",), doc.data.get("safety"))
    for doc in ctx.runbooks:
        for path, step in ctx.steps(doc):
            yield from check_safety(doc, (*path, "safety"), step.get("safety"))
    for doc in ctx.parsed.of_kind("catalog"):
        for service, env in doc.data.get("services", {}).items():
            if env not in declared:
                yield doc.diagnostic(
                    "RB022",
                    "unknown-environment",
                    f"service {service!r} is mapped to unknown environment {env!r}",
                    fix,
                    ("services", service),
                )


def _suggest(value: str, known: list[str] | tuple[str, ...], fallback: str) -> str:
    import difflib

    close = difflib.get_close_matches(value, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else fallback
