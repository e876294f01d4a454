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
import json
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
SETTINGS["runner_pools"] = [{"name": noun} for noun in NOUNS]  # read-only actions run there
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
        doc["executor"] = {"runner": noun}
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


WINDOWS = ["1m", "2m", "5m", "10m", "15m", "30m", "1h"]
STEP_NAMES = [
    "Error rate of {service}",
    "Is {service} still failing?",
    "Look at {service} before the remedy",
    "Remedy for {service}",
    "Verify {service} recovered",
    "Second look at {service}",
]
UNITS = ["nginx", "app", "worker", "cron", "sidecar", "envoy"]
CONDITIONS = [
    "steps['{earlier}'].status in ('success', 'allowed_failure')",
    "steps['{earlier}'].status == 'failed' and incident.urgency == 'high'",
    "steps['{earlier}'].exit_code != 0 or incident.details.region == '{region}'",
    "incident.details.namespace == '{namespace}'",
    "not steps['{earlier}'].status == 'skipped'",
    "incident.priority in ('P1', 'P2') and steps['{earlier}'].status != 'success'",
]
REGIONS = ["eu-west-1", "us-east-1", "ap-south-1"]


def duplicate_share(root: Path) -> float:
    """The share of runbook steps identical (as data) to an earlier step of the catalog."""
    seen: set[str] = set()
    total = repeated = 0
    for path in sorted((root / "runbooks").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text("utf-8"))
        for step in [*doc.get("steps", ()), *doc.get("on_resolve", ())]:
            key = json.dumps(step, sort_keys=True)
            total += 1
            repeated += key in seen
            seen.add(key)
    return repeated / total if total else 0.0


def runbook_doc(index: int, n_steps: int, actions: list[str], rng: random.Random) -> dict[str, Any]:
    """A runbook whose steps vary as real ones do.

    Real steps mostly carry something of their service (a name, a window, a namespace in
    a condition); a few are the bare `- action: X` that many runbooks share. Keeping
    that mix matters: a validator that remembers steps it has seen would otherwise look
    faster on generated catalogs than on real ones.
    """
    service = f"service-{index:05d}"
    namespace = f"ns-{index % 97:02d}"
    steps: list[dict[str, Any]] = []
    for position in range(n_steps):
        ids = step_ids(steps)
        kind = position % 5
        if kind == 4:
            unit = rng.choice(UNITS)
            step: dict[str, Any] = {
                "id": f"{unit}-logs-{position}",
                "name": f"Recent {unit} logs of {service}",
                "command": [
                    "journalctl",
                    "--unit",
                    f"{unit}@{{{{ incident.details.unit }}}}",
                    "--since",
                    "-{{ params.minutes }}m",
                    f"--lines={rng.randint(20, 500)}",
                ],
                "params": {"minutes": rng.randint(1, 60)},
                "timeout": f"{rng.randint(5, 90)}s",
                "expect": [{"pattern": rf"\S+|{unit}"}],
                "safety": {"requires_approval": False, "scopes": ["dev", "staging"]},
            }
        else:
            action_id = rng.choice(actions)
            step = {"action": action_id}
            if action_id in ids:
                step["id"] = f"{action_id}-again-{position}"
            if rng.random() < 0.05:
                steps.append(step)  # the bare reference real runbooks share
                continue
            if rng.random() < 0.6:
                step["name"] = rng.choice(STEP_NAMES).format(service=service)
            if kind in (0, 1) or rng.random() < 0.3:
                step["params"] = {"window": rng.choice(WINDOWS), "shard": rng.randint(0, 31)}
            if rng.random() < 0.2:
                step["timeout"] = f"{rng.randint(10, 300)}s"
            if kind == 2 and ids:
                step["when"] = rng.choice(CONDITIONS).format(
                    earlier=rng.choice(ids), region=rng.choice(REGIONS), namespace=namespace
                )
            if kind == 3:
                step["on_failure"] = {
                    "rollback": rng.choice(actions),
                    "then": rng.choice(["stop", "continue"]),
                }
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
        "on_resolve": [
            {
                "id": "final-check",
                "action": actions[index % len(actions)],
                "params": {"window": rng.choice(WINDOWS)},
            }
        ],
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
    print(
        f"wrote {files} files ({args.runbooks} runbooks, {args.steps} steps) to {args.out}; "
        f"{duplicate_share(args.out):.0%} of the steps repeat an earlier one"
    )


if __name__ == "__main__":
    main()
