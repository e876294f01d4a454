"""Find the runbook for an incident.

A runbook is a candidate when
  1. one of its ``match.services`` equals the incident's service name or id
     (case-insensitive), or is ``*``; and
  2. it has no ``match.symptoms`` (a catch-all for the service), or one of its symptom
     regexes is found (case-insensitive) in the incident title or details.

Ties are resolved by this rule, in order (documented in docs/catalog.md):
  1. a runbook naming the service beats a ``*`` runbook;
  2. higher ``match.priority`` wins;
  3. a runbook whose symptom pattern matched beats a catch-all without symptoms;
  4. the longer matched text wins (the more specific symptom);
  5. the runbook id, alphabetically, so the choice is always deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

from bot.catalog.model import Runbook

Score = tuple[int, int, int, int]

ANY_SERVICE = "*"


def service_key(name: str) -> str:
    """How service names and ids are compared, here and in the `services` mapping."""
    return name.casefold()


def score(
    runbook: Runbook, service: str, symptom: str, *, service_id: str = "", details: str = ""
) -> Score | None:
    names = {service_key(service), service_key(service_id)} - {""}
    wanted = {service_key(s) for s in runbook.match.services}
    if names & wanted:
        named = 1
    elif ANY_SERVICE in wanted:
        named = 0
    else:
        return None
    if not runbook.match.symptoms:
        return (named, runbook.match.priority, 0, 0)
    best = -1
    for regex in runbook.match.symptom_regexes:
        for text in (symptom, details):
            if text:
                found = regex.search(text)
                if found is not None:
                    best = max(best, len(found.group(0)))
    if best < 0:
        return None
    return (named, runbook.match.priority, 1, best)


def best_match(
    runbooks: Iterable[Runbook],
    service: str,
    symptom: str = "",
    *,
    service_id: str = "",
    details: str = "",
) -> Runbook | None:
    chosen: Runbook | None = None
    chosen_score: Score | None = None
    for runbook in runbooks:
        s = score(runbook, service, symptom, service_id=service_id, details=details)
        if s is None:
            continue
        if (
            chosen is None
            or chosen_score is None
            or s > chosen_score
            or (s == chosen_score and runbook.id < chosen.id)
        ):
            chosen, chosen_score = runbook, s
    return chosen
