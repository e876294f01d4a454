"""`runbookctl simulate`: the README's first command, run the way a user runs it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bot.store import Store
from runbookctl.cli import cli

REPO = Path(__file__).resolve().parent.parent


def simulate(*args: str, input: str | None = None, catalog: Path | None = None) -> Any:
    extra = ["--catalog", str(catalog)] if catalog else []
    return CliRunner().invoke(cli, ["simulate", *extra, *args], input=input, catch_exceptions=False)


@pytest.fixture
def bundled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the default catalog is ./runbooks, as on a fresh clone


def test_the_readme_command_on_a_fresh_machine_without_credentials(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "PAGERDUTY_", "RUNBOOK_"))
    }
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runbookctl",
            "simulate",
            "--service",
            "payments",
            "--symptom",
            "Payments API elevated 5xx",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "dry run: nothing is executed" in done.stdout
    assert "runbook payments-elevated-5xx: completed" in done.stdout
    assert done.stderr == ""
    assert not (REPO / "runbook-bot.db").exists()  # a throwaway database, not the bot's


@pytest.mark.usefixtures("bundled")
def test_dry_run_prints_the_thread_with_decisions_and_runs_nothing() -> None:
    result = simulate("--service", "payments", "--symptom", "elevated 5xx")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "── #inc-payments ──" in out
    assert "Runbook: Payments API elevated 5xx (payments-elevated-5xx, 4 steps" in out
    # step, command, safety, decision, expected output, result
    assert "Step 1/4: check-error-rate" in out
    assert "$ promtool query instant" in out and 'service="payments"' in out
    assert "Safety: safe for automation; scopes: dev, staging, prod" in out
    assert "Decision: auto-run (safe for automation: runs without approval)" in out
    assert "Expect: /=>\\s*[0-9.eE+-]+/" in out
    assert "Step 3/4: clear-cache" in out and "$ redis-cli FLUSHDB" in out
    assert "Decision: needs approval (requires approval by an authorized responder)" in out
    assert "would run (dry run)" in out
    assert "Step 4/4: verify-error-rate" in out  # its `when` holds on the dry-run path
    assert "runbook payments-elevated-5xx: completed" in out


@pytest.mark.usefixtures("bundled")
def test_a_step_out_of_scope_is_blocked_with_the_way_to_promote_it() -> None:
    result = simulate("--service", "payments", "--symptom", "elevated 5xx", "--env", "prod")
    assert result.exit_code == 1
    why = "clear-cache is not allowed in prod (scopes: staging)"
    assert f"Decision: blocked: {why}" in result.output
    assert "│ ⛔ blocked\n" in result.output
    assert "runbookctl promote --action clear-cache --env prod" in result.output
    assert "Escalating" in result.output


@pytest.mark.usefixtures("bundled")
def test_no_matching_runbook_exits_non_zero_and_says_so() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--service", "billing", "--symptom", "slow"])
    assert result.exit_code == 1
    assert "No runbook matches this incident" in result.output
    assert "no runbook matches service 'billing' with symptom 'slow'" in result.output


@pytest.mark.usefixtures("bundled")
def test_approve_none_rejects_guarded_steps() -> None:
    result = simulate("--service", "payments", "--symptom", "elevated 5xx", "--approve", "none")
    assert result.exit_code == 1
    assert "rejected by <@U0PAYLEAD>" in result.output
    assert "Runbook stopped: clear-cache ended rejected" in result.output


@pytest.mark.usefixtures("bundled")
@pytest.mark.parametrize(
    ("answer", "code", "says"), [("y\n", 0, "approved"), ("n\n", 1, "rejected")]
)
def test_approve_ask_prompts_at_each_guarded_step(answer: str, code: int, says: str) -> None:
    result = simulate(
        "--service", "payments", "--symptom", "elevated 5xx", "--approve", "ask", input=answer
    )
    assert result.exit_code == code, result.output
    assert "Approve clear-cache? [y/N]" in result.output
    (line,) = [ln for ln in result.output.splitlines() if "↻ clear-cache:" in ln]
    assert f"{says} by <@U0PAYLEAD>" in line  # the first approver: the person at the terminal
    if says == "approved":  # approved, then (dry run) shown as what would have run
        assert "🧪 would run (dry run), approved by <@U0PAYLEAD>" in line
        assert "runbook payments-elevated-5xx: completed" in result.output
    else:
        assert "🚫 rejected by <@U0PAYLEAD>" in line
        assert "runbook payments-elevated-5xx: escalated" in result.output


@pytest.mark.usefixtures("bundled")
def test_the_audit_can_be_kept_with_db(tmp_path: Path) -> None:
    db = tmp_path / "sim.db"
    result = simulate("--service", "payments", "--symptom", "elevated 5xx", "--db", str(db))
    assert result.exit_code == 0
    store = Store(db)
    statuses = [e["status"] for e in store.events()]
    origins = {e["origin"] for e in store.events()}
    store.close()
    assert origins == {"simulate"}  # never evidence for a promotion
    assert statuses.count("dry_run") == 4
    assert "requires_manual" in statuses and "approved" in statuses
    assert "executed" not in statuses  # a dry run executes nothing


APPEND = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10)); print('OK')"
CATALOG = {
    "catalog.yaml": """
kind: catalog
environments: [{name: dev}, {name: staging}, {name: prod, production: true}]
approvers: {users: [U0ONCALL]}
services: {orders: staging}
""",
    "actions/write-marker.yaml": """
kind: action
id: write-marker
description: Append a line to the marker file.
command: ["@PYTHON@", "-c", "@APPEND@", "@MARKER@", "ran"]
expect: [{pattern: "OK"}]
safety: {requires_approval: true, scopes: [dev, staging]}
""",
    "actions/report.yaml": """
kind: action
id: report
description: Say the follow-up ran.
command: ["@PYTHON@", "-c", "@APPEND@", "@MARKER@", "followup"]
safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/orders.yaml": """
kind: runbook
id: orders-down
match: {services: [orders], symptoms: [down]}
steps:
  - action: write-marker
on_resolve:
  - action: report
""",
}


@pytest.fixture
def marker_catalog(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "catalog"
    marker = tmp_path / "marker.txt"
    for name, text in CATALOG.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            text.replace("@PYTHON@", sys.executable)
            .replace("@APPEND@", APPEND)
            .replace("@MARKER@", str(marker))
        )
    return root, marker


def test_execute_runs_for_real_and_dry_run_does_not(marker_catalog: tuple[Path, Path]) -> None:
    root, marker = marker_catalog
    dry = simulate("--service", "orders", "--symptom", "orders down", "--resolve", catalog=root)
    assert dry.exit_code == 0, dry.output
    assert not marker.exists()
    assert "On resolve Step 1/1: report" in dry.output
    real = simulate(
        "--service",
        "orders",
        "--symptom",
        "orders down",
        "--execute",
        "--approve",
        "all",
        "--resolve",
        catalog=root,
    )
    assert real.exit_code == 0, real.output
    assert "EXECUTING commands for real" in real.output
    assert marker.read_text().splitlines() == ["ran", "followup"]
    assert "✅ succeeded" in real.output


def test_execute_asks_by_default(marker_catalog: tuple[Path, Path]) -> None:
    root, marker = marker_catalog
    result = simulate(
        "--service", "orders", "--symptom", "down", "--execute", catalog=root, input="n\n"
    )
    assert result.exit_code == 1
    assert "approvals: ask" in result.output
    assert not marker.exists()


def test_a_broken_catalog_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("kind: action\nid: x\n")
    result = CliRunner().invoke(
        cli, ["simulate", "--catalog", str(tmp_path), "--service", "a", "--symptom", "b"]
    )
    assert result.exit_code == 1
    assert "runbookctl lint" in result.output
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("bundled")
def test_a_database_of_a_newer_bot_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "newer.db"
    Store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    result = CliRunner().invoke(
        cli, ["simulate", "--service", "payments", "--symptom", "5xx", "--db", str(db)]
    )
    assert result.exit_code == 1
    assert "schema version 99, newer than this bot" in result.output
    assert "Traceback" not in result.output


def test_approve_all_gives_a_two_person_step_as_many_approvers_as_it_needs(
    marker_catalog: tuple[Path, Path],
) -> None:
    root, marker = marker_catalog
    path = root / "actions" / "write-marker.yaml"
    path.write_text(
        path.read_text().replace(
            "safety: {", "safety: {approvals: 2, approvers: {users: [U0ONE, U0TWO]}, "
        )
    )
    result = simulate("--service", "orders", "--symptom", "down", "--execute", "--approve",
                      "all", catalog=root)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert marker.read_text().splitlines() == ["ran"]
    assert "<@U0ONE> and <@U0TWO>" in result.output
