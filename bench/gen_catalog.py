"""Generate a large, valid, lint-clean catalog for benchmarks.

    python bench/gen_catalog.py OUT_DIR [--runbooks 2000] [--steps 20000] [--actions 200]

Writes ``catalog.yaml``, ``actions/*.yaml`` and ``runbooks/*.yaml`` under OUT_DIR. The
output depends only on the arguments (a seeded RNG), so runs are comparable. Every file
is valid against ``bot/catalog/schema.json`` (as check-jsonschema sees it: the top-level
``oneOf``) and ``runbookctl lint --strict`` reports nothing, so the benchmark measures the
full rule set rather than early exits. Runbooks look like real ones: several symptoms,
referenced actions with params, inline steps, ``when`` conditions, rollbacks, follow-ups.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import yaml

SETTINGS: dict[str, Any] = {
    "kind": "catalog",
    "name": "generated",
    "environments": [
        {"name": "dev"},
        {"name": "staging"},
        {"name": "prod", "production": True},
    ],
    "approvers": {"groups": ["S0SRE"]},
    "channel": "#incidents",
    "escalation": {"mention": "<!subteam^S0SRELEADS>", "pagerduty": True},
    "defaults": {"timeout": "60s", "approval_timeout": "10m"},
    "secret_patterns": ["(?i)redis://[^@\\s]*@"],
}

VERBS = ["check", "inspect", "restart", "scale", "drain-queue", "rotate", "flush", "reindex"]
NOUNS = ["api", "worker", "cache", "queue", "db", "proxy", "search", "scheduler", "cdn", "auth"]
SYMPTOMS = [
    "elevated 5xx",
    r"5\d\d (error )?rate",
    "latency (p99|p95) above",
    "high memory",
    "OOMKilled",
    "disk (is )?(almost|nearly) full",
    "too many connections",
    "queue (depth|backlog)",
    "certificate expir(es|ed|ing)",
    "replication lag",
    "error budget burn",
    "crash ?loop",
]


def action_doc(index: int, rng: random.Random) -> dict[str, Any]:
    verb = VERBS[index % len(VERBS)]
    noun = NOUNS[(index // len(VERBS)) % len(NOUNS)]
    action_id = f"{verb}-{noun}-{index:04d}"
    read_only = verb in ("check", "inspect")
    doc: dict[str, Any] = {
        "id": action_id,
        "description": f"{verb.replace('-', ' ').capitalize()} the {noun} of the service.",
    }
    if index % 3 == 0:
        doc["command"] = [
            "kubectl",
            "--namespace",
            "{{ incident.details.namespace }}",
            "rollout" if not read_only else "get",
            "status" if read_only else "restart",
            f"deployment/{noun}-{{{{ params.shard }}}}",
        ]
    else:
        doc["command"] = (
            f"{noun}ctl {verb} --service {{{{ incident.service }}}} "
            f"--window {{{{ params.window }}}} --shard {{{{ params.shard }}}}"
        )
    doc["params"] = {"window": f"{rng.choice([1, 5, 15])}m", "shard": rng.randint(0, 9)}
    doc["timeout"] = f"{rng.choice([10, 30, 60, 120])}s"
    if index % 4 == 0:
        doc["env"] = {"SERVICE": "{{ incident.service }}", "LOG_LEVEL": "info"}
        doc["secrets"] = ["API_TOKEN"]
    doc["expect"] = [{"pattern": rf"^(ok|done|{noun}) \d+"}]
    if index % 2 == 0:
        doc["expect"].append({"pattern": "nothing to do", "allow_failure": True})
    if read_only:
        doc["safety"] = {
            "requires_approval": False,
            "scopes": ["dev", "staging", "prod"],
            "promotions": [
                {
                    "env": "prod",
                    "evidence_url": f"https://wiki.example.com/promotions/{action_id}",
                    "by": "sre-leads@example.com",
                    "at": "2026-10-02T09:14:00+00:00",
                    "validated": f"{rng.randint(3, 40)} successful runs in staging",
                }
            ],
        }
    else:
        doc["safety"] = {
            "requires_approval": True,
            "scopes": ["dev", "staging"],
            "approval_timeout": "15m",
            "approvers": {"groups": ["S0ONCALL"], "users": ["U0LEAD"]},
        }
    return doc


def step_ids(steps: list[dict[str, Any]]) -> list[str]:
    return [str(s.get("id", s.get("action"))) for s in steps]


def runbook_doc(index: int, n_steps: int, actions: list[str], rng: random.Random) -> dict[str, Any]:
    service = f"service-{index:05d}"
    steps: list[dict[str, Any]] = []
    for position in range(n_steps):
        ids = step_ids(steps)
        kind = position % 5
        if kind == 4:
            step: dict[str, Any] = {
                "id": f"inline-{position}",
                "name": "Collect recent logs",
                "command": [
                    "journalctl",
                    "--unit",
                    "{{ incident.details.unit }}",
                    "--since",
                    "-{{ params.minutes }}m",
                ],
                "params": {"minutes": rng.choice([5, 10, 30])},
                "timeout": "30s",
                "expect": [{"pattern": r"\S+"}],
                "safety": {"requires_approval": False, "scopes": ["dev", "staging"]},
            }
        else:
            action_id = rng.choice(actions)
            step = {"action": action_id}
            if action_id in ids:
                step["id"] = f"{action_id}-again-{position}"
            if kind == 1:
                step["params"] = {"window": "1m", "shard": rng.randint(0, 9)}
            if kind == 2 and ids:
                step["when"] = (
                    f"steps['{rng.choice(ids)}'].status in ('success', 'allowed_failure') "
                    "and incident.urgency == 'high'"
                )
            if kind == 3:
                step["on_failure"] = {"rollback": rng.choice(actions), "then": "stop"}
            elif position % 7 == 0:
                step["on_failure"] = "continue"
        steps.append(step)
    symptoms = rng.sample(SYMPTOMS, 3)
    return {
        "kind": "runbook",
        "id": f"runbook-{index:05d}",
        "title": f"{service}: {symptoms[0]}",
        "description": "Generated for benchmarks: diagnose, remedy, verify.",
        "match": {"services": [service, f"P{index:06d}"], "symptoms": symptoms},
        "channel": f"#inc-{service}",
        "escalation": {"mention": "<!subteam^S0ONCALL>"},
        "steps": steps,
        "on_resolve": [{"id": "final-check", "action": actions[index % len(actions)]}],
    }


def generate(out: Path, runbooks: int = 2000, steps: int = 20000, actions: int = 200) -> int:
    """Write the catalog; return the number of files written."""
    rng = random.Random(f"runbook-bot-bench-{runbooks}-{steps}-{actions}")
    (out / "actions").mkdir(parents=True, exist_ok=True)
    (out / "runbooks").mkdir(parents=True, exist_ok=True)
    header = "# yaml-language-server: $schema=../bot/catalog/schema.json\n"
    (out / "catalog.yaml").write_text(header + dump(SETTINGS), "utf-8")
    action_ids: list[str] = []
    for i in range(actions):
        doc = action_doc(i, rng)
        action_ids.append(doc["id"])
        (out / "actions" / f"{doc['id']}.yaml").write_text(dump(doc), "utf-8")
    base, extra = divmod(steps, runbooks)
    for i in range(runbooks):
        doc = runbook_doc(i, base + (1 if i < extra else 0), action_ids, rng)
        (out / "runbooks" / f"{doc['id']}.yaml").write_text(dump(doc), "utf-8")
    return 1 + actions + runbooks


def dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the catalog into")
    parser.add_argument("--runbooks", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20000, help="steps in all runbooks")
    parser.add_argument("--actions", type=int, default=200)
    args = parser.parse_args()
    if args.runbooks < 1 or args.steps < args.runbooks or args.actions < 1:
        parser.error("need at least one runbook, one step per runbook and one action")
    files = generate(args.out, args.runbooks, args.steps, args.actions)
    print(f"wrote {files} files ({args.runbooks} runbooks, {args.steps} steps) to {args.out}")


if __name__ == "__main__":
    main()
