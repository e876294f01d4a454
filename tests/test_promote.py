"""`runbookctl promote`, on a real temporary Git repository and a real audit database.

The evidence comes from the audit log the bot writes (`Store.record_event`, or real runs
through the engine); the edit is checked line by line against the original file; the
promoted catalog goes through `runbookctl lint` and a reloaded engine.
"""

from __future__ import annotations

import difflib
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.catalog import load_catalog, parse_catalog
from bot.engine import Incident
from bot.local import LocalRuntime
from bot.promotion import edit_action_document, git_identity
from bot.store import Store
from runbookctl.cli import cli

REPO = Path(__file__).resolve().parent.parent
PROMOTER = "promoter@example.com"
EVIDENCE = "https://wiki.example.com/sre/promotions/restart-app"
PY = sys.executable

CATALOG = """\
# yaml-language-server: $schema=../bot/catalog/schema.json
kind: catalog
environments:
  - name: dev
  - name: staging
  - name: prod
    production: true   # needs a promotion record
approvers:
  users: [U0APPROVER]
promotion:
  min_successful_runs: 3
  window: 48h
"""

# A file written by hand, with comments everywhere a person puts them.
RESTART = """\
# yaml-language-server: $schema=../../bot/catalog/schema.json
# Restart the app: safe, but it drops in-flight requests.
id: restart-app
description: >
  Rolling restart of the app's pods.
command:
  - kubectl
  - rollout
  - restart
  - deployment/app      # the only deployment we restart
timeout: 60s            # a rollout takes ~40 s
executor: local         # production actions say where they run (lint RB044)
expect:
  - pattern: "restarted"
safety:
  # reviewed by the SRE leads on 2026-10-01
  requires_approval: true
  scopes:
    - dev
    - staging   # where it has been tried
  approval_timeout: 15m
# trailing comment of the document
"""

# Several documents in one file; the one in the middle has no safety block at all.
MULTI = """\
# Read-only checks, one document each.
---
# first check
id: check-disk
command: "df -h /"
executor: local
expect:
  - pattern: '\\d+%'
safety: {requires_approval: false, scopes: [dev, staging]}
---
# second check: no safety block, so it runs in no production environment
id: check-load
command: ["uptime"]
executor: local
expect:
- pattern: "load average"   # a different list indent than the others
# end of check-load

---
id: check-memory
command: "free -m"
executor: local
expect:
  - pattern: "Mem:"
...
"""

AUTO_CHECK = f"""\
id: auto-check
description: Prints OK. Safe for automation.
command: ["{PY}", "-c", "print('OK')"]
executor: local
expect:
  - pattern: "^OK$"
safety:
  requires_approval: false
  scopes: [dev, staging]
"""

RUNBOOK = """\
kind: runbook
id: checkout-broken
match:
  services: [checkout]
steps:
  - action: auto-check
  - id: inline-fix
    command: "true"
    expect: [{pattern: "^$"}]
    safety: {requires_approval: true, scopes: [staging]}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass
class Repo:
    root: Path
    catalog: Path
    db: Path

    def file(self, name: str) -> Path:
        return self.catalog / "actions" / name

    def record_runs(
        self,
        action: str,
        count: int,
        *,
        env: str = "staging",
        status: str = "succeeded",
        age: float = 3600.0,
        commit: str = "test",
    ) -> None:
        """Rows the engine writes when a step's command succeeds (or not)."""
        store = Store(self.db)
        try:
            for _ in range(count):
                store.record_event(
                    ts=time.time() - age,
                    incident_id=f"T-{uuid.uuid4().hex[:8]}",
                    service="checkout",
                    runbook_id="checkout-broken",
                    step_id=action,
                    action=action,
                    env=env,
                    status=status,
                    catalog_commit=commit,
                )
        finally:
            store.close()

    def promote(self, *args: str) -> Result:
        return CliRunner().invoke(
            cli,
            ["promote", "--catalog", str(self.catalog), "--db", str(self.db), *args],
            catch_exceptions=False,
        )

    def promote_restart(self, *args: str) -> Result:
        return self.promote(
            "--action", "restart-app", "--env", "prod", "--evidence-url", EVIDENCE, *args
        )


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    root = tmp_path / "catalog-repo"
    catalog = root / "runbooks"
    (catalog / "actions").mkdir(parents=True)
    (catalog / "runbooks").mkdir()
    (catalog / "catalog.yaml").write_text(CATALOG)
    (catalog / "actions" / "restart-app.yaml").write_text(RESTART)
    (catalog / "actions" / "checks.yaml").write_text(MULTI)
    (catalog / "actions" / "auto-check.yaml").write_text(AUTO_CHECK)
    (catalog / "runbooks" / "checkout.yaml").write_text(RUNBOOK)
    git(root, "init", "--quiet", "--initial-branch=main")
    git(root, "config", "user.email", PROMOTER)
    git(root, "config", "user.name", "Pat Promoter")
    git(root, "config", "commit.gpgsign", "false")
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "catalog")
    yield Repo(root, catalog, tmp_path / "audit.db")


def lint(catalog: Path) -> Result:
    return CliRunner().invoke(cli, ["lint", str(catalog)], catch_exceptions=False)


def promotions_of(path: Path, action: str) -> list[dict[str, object]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("id") == action:
            return list(doc["safety"]["promotions"])
    raise AssertionError(f"no {action} in {path}")


def assert_only_block_changed(before: str, after: str, first: str, last: str | None) -> None:
    """Lines before `first` and from `last` on are byte-identical; inside, every original
    line is still there, in order (the edit only adds)."""
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    start = next(i for i, line in enumerate(old) if line.startswith(first))
    end = len(old) if last is None else next(i for i, line in enumerate(old) if line == last)
    tail = len(old) - end
    assert new[:start] == old[:start]
    assert new[len(new) - tail :] == old[end:]
    inside = iter(new[start : len(new) - tail])
    assert all(line in inside for line in old[start:end]), "an original line was changed"


# --- promotion with evidence ---------------------------------------------------------------


def test_promote_writes_scope_and_record_and_keeps_the_file_byte_for_byte(repo: Repo) -> None:
    repo.record_runs("restart-app", 3)
    repo.record_runs("restart-app", 1, env="dev")
    before = repo.file("restart-app.yaml").read_text()
    head = git(repo.root, "rev-parse", "HEAD")

    result = repo.promote_restart()

    assert result.exit_code == 0, result.output
    after = repo.file("restart-app.yaml").read_text()
    assert_only_block_changed(before, after, "safety:", "# trailing comment of the document\n")
    for comment in re.findall(r"#.*", before):
        assert after.count(comment) == before.count(comment), comment
    assert "    - staging   # where it has been tried\n    - prod\n" in after
    (record,) = promotions_of(repo.file("restart-app.yaml"), "restart-app")
    assert record["env"] == "prod"
    assert record["evidence_url"] == EVIDENCE
    assert record["by"] == PROMOTER
    at = datetime.fromisoformat(str(record["at"]))
    assert abs(at.timestamp() - time.time()) < 120 and at.tzinfo is not None
    assert str(record["validated"]).startswith(
        "4 successful runs in lower environments over the last 2 days (dev: 1, staging: 3;"
    )
    assert record["catalog_commit"] == head[:12]
    assert "forced" not in record
    # the diff is printed, with the evidence
    assert "+    - prod\n" in result.output
    assert "+  promotions:\n" in result.output
    assert "4 successful runs" in result.output
    # lint accepts the result, and the catalog loads with prod in scope
    linted = lint(repo.catalog)
    assert linted.exit_code == 0, linted.output
    action = load_catalog(repo.catalog).actions["restart-app"]
    assert action.safety.scopes == ("dev", "staging", "prod")
    promotion = action.safety.promotion_for("prod")
    assert promotion is not None and promotion.by == PROMOTER
    # written for review, not committed
    assert git(repo.root, "rev-parse", "HEAD") == head
    assert git(repo.root, "status", "--porcelain") == "M runbooks/actions/restart-app.yaml"


def test_a_production_scope_without_a_record_is_what_lint_rejects(repo: Repo) -> None:
    path = repo.file("restart-app.yaml")
    path.write_text(path.read_text().replace("    - staging", "    - staging\n    - prod"))
    linted = lint(repo.catalog)
    assert linted.exit_code == 1 and "RB025" in linted.output
    # promote fixes exactly that: the scope stays, the record is added
    repo.record_runs("restart-app", 3)
    result = repo.promote_restart("--no-commit")
    assert result.exit_code == 0, result.output
    assert path.read_text().count("- prod") == 1
    assert lint(repo.catalog).exit_code == 0


def test_a_document_among_several_gets_a_new_safety_block(repo: Repo) -> None:
    repo.record_runs("check-load", 3)
    path = repo.file("checks.yaml")
    before = path.read_text()
    result = repo.promote("--action", "check-load", "--env", "prod", "--evidence-url", EVIDENCE)
    assert result.exit_code == 0, result.output
    after = path.read_text()
    # a pure insertion after the document's last value, before its trailing comment
    anchor = '- pattern: "load average"   # a different list indent than the others\n'
    head, rest = before.split(anchor)
    assert after.startswith(head + anchor) and after.endswith(rest)
    inserted = after[len(head + anchor) : len(after) - len(rest)]
    # in this document's own list style (dash at the key's column)
    assert inserted.startswith(
        "safety:\n  scopes: [dev, staging, prod]\n  promotions:\n  - env: prod\n"
    )
    assert all(line.startswith("  ") for line in inserted.splitlines()[1:])
    # the other documents, `---`, `...` and comments between them are untouched
    docs = list(yaml.safe_load_all(after))
    assert [d["id"] for d in docs if d] == ["check-disk", "check-load", "check-memory"]
    assert docs[1]["safety"]["scopes"] == ["dev", "staging", "prod"]  # materialized
    assert "requires_approval" not in docs[1]["safety"]  # still the safe default
    assert lint(repo.catalog).exit_code == 0


def test_a_flow_style_safety_block_is_rewritten_in_block_style(repo: Repo) -> None:
    repo.record_runs("check-disk", 3)
    path = repo.file("checks.yaml")
    before = path.read_text()
    result = repo.promote("--action", "check-disk", "--env", "prod", "--evidence-url", EVIDENCE)
    assert result.exit_code == 0, result.output
    after = path.read_text()
    start = before.index("safety: {")
    end = before.index("---", start)
    assert after[:start] == before[:start]
    assert after.endswith(before[end:])
    assert after[start:].startswith(
        "safety:\n  requires_approval: false\n  scopes: [dev, staging, prod]\n  promotions:\n"
    )
    assert lint(repo.catalog).exit_code == 0


def test_crlf_line_endings_are_kept(repo: Repo) -> None:
    path = repo.file("restart-app.yaml")
    path.write_bytes(RESTART.replace("\n", "\r\n").encode())
    repo.record_runs("restart-app", 3)
    assert repo.promote_restart().exit_code == 0
    data = path.read_bytes()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"    - prod\r\n" in data


def test_dry_run_shows_the_change_and_the_evidence_and_writes_nothing(repo: Repo) -> None:
    repo.record_runs("restart-app", 5)
    before = repo.file("restart-app.yaml").read_text()
    result = repo.promote_restart("--dry-run")
    assert result.exit_code == 0, result.output
    assert "5 successful runs in lower environments over the last 2 days (staging: 5;" in (
        result.output
    )
    assert "+    - prod" in result.output and f"+      evidence_url: {EVIDENCE}" in result.output
    assert "Nothing written (dry run)." in result.output
    assert repo.file("restart-app.yaml").read_text() == before
    assert git(repo.root, "status", "--porcelain") == ""


def test_dry_run_without_enough_evidence_shows_both_and_fails(repo: Repo) -> None:
    repo.record_runs("restart-app", 1)
    result = repo.promote_restart("--dry-run")
    assert result.exit_code == 1
    assert "+    - prod" in result.output
    assert "(dry run) refusing to promote restart-app to prod: found 1 successful run" in (
        result.output
    )
    assert git(repo.root, "status", "--porcelain") == ""


def test_commit_makes_one_descriptive_commit_of_that_file_alone(repo: Repo) -> None:
    repo.record_runs("restart-app", 3)
    unrelated = repo.catalog / "runbooks" / "checkout.yaml"
    unrelated.write_text(RUNBOOK + "# someone else's edit\n")
    git(repo.root, "add", str(unrelated))  # staged, and not ours to commit

    result = repo.promote_restart("--commit")

    assert result.exit_code == 0, result.output
    assert "Committed " in result.output and ": Promote restart-app to prod" in result.output
    assert git(repo.root, "log", "-1", "--format=%s") == "Promote restart-app to prod"
    body = git(repo.root, "log", "-1", "--format=%b")
    assert f"Evidence: {EVIDENCE}" in body
    assert "Validated: 3 successful runs in lower environments" in body
    assert "Scopes of restart-app: dev, staging -> dev, staging, prod." in body
    assert f"Promoted by: {PROMOTER}." in body
    changed = git(repo.root, "show", "--name-only", "--format=", "HEAD")
    assert changed == "runbooks/actions/restart-app.yaml"
    assert git(repo.root, "status", "--porcelain") == "M  runbooks/runbooks/checkout.yaml"
    assert lint(repo.catalog).exit_code == 0


def test_commit_refused_when_the_file_has_uncommitted_changes(repo: Repo) -> None:
    repo.record_runs("restart-app", 3)
    path = repo.file("restart-app.yaml")
    path.write_text(path.read_text() + "# work in progress\n")
    result = repo.promote_restart("--commit")
    assert result.exit_code == 1
    assert "restart-app.yaml has uncommitted changes" in result.output
    assert path.read_text() == RESTART + "# work in progress\n"


def test_force_with_a_reason_is_recorded(repo: Repo) -> None:
    repo.record_runs("restart-app", 1)
    result = repo.promote_restart("--force", "--reason", "INC-4242: needed tonight, CAB approved")
    assert result.exit_code == 0, result.output
    (record,) = promotions_of(repo.file("restart-app.yaml"), "restart-app")
    assert record["forced"] is True
    assert record["reason"] == "INC-4242: needed tonight, CAB approved"
    assert str(record["validated"]).startswith("1 successful run in lower environments")
    assert lint(repo.catalog).exit_code == 0


def test_the_database_defaults_to_runbook_db(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo.record_runs("restart-app", 3)
    monkeypatch.setenv("RUNBOOK_DB", str(repo.db))
    result = CliRunner().invoke(
        cli,
        [
            "promote",
            "--catalog",
            str(repo.catalog),
            "--action",
            "restart-app",
            "--env",
            "prod",
            "--evidence-url",
            EVIDENCE,
            "--dry-run",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert f"(audit log {repo.db})" in result.output


def test_flags_may_raise_the_bar_without_force(repo: Repo) -> None:
    repo.record_runs("restart-app", 4, age=3 * 3600)
    # the catalog wants 3 runs in 48h: 4 runs within 1h are none
    refused = repo.promote_restart("--dry-run", "--window", "1h")
    assert refused.exit_code == 1
    assert "found 0 successful runs" in refused.output and "window 1 hour" in refused.output
    assert "--force" not in refused.output.split("found 0")[0]  # a stricter bar is no override
    assert repo.promote_restart("--dry-run", "--min-runs", "5").exit_code == 1
    result = repo.promote_restart("--min-runs", "4", "--window", "4h")
    assert result.exit_code == 0, result.output
    (record,) = promotions_of(repo.file("restart-app.yaml"), "restart-app")
    assert str(record["validated"]).endswith("; 4 required (the catalog asks for 3)")
    assert "forced" not in record


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ("--min-runs", "0"),
            "--min-runs 0 is below the catalog's promotion.min_successful_runs (3)",
        ),
        (
            ("--min-runs", "2"),
            "--min-runs 2 is below the catalog's promotion.min_successful_runs (3)",
        ),
        (
            ("--window", "72h"),
            "--window 72h is longer than the catalog's promotion.window (48h)",
        ),
    ],
    ids=["min-runs-0", "min-runs-2", "longer-window"],
)
def test_asking_for_less_evidence_than_the_catalog_needs_force(
    repo: Repo, flags: tuple[str, ...], says: str
) -> None:
    repo.record_runs("restart-app", 10)  # plenty: the bar itself is the override
    for extra in ((), ("--dry-run",)):
        refused = repo.promote_restart(*flags, *extra)
        assert refused.exit_code == 1
        assert f"refusing to promote restart-app to prod: {says}." in refused.output
        assert "pass --force --reason TEXT" in refused.output
    assert git(repo.root, "status", "--porcelain") == ""


def test_a_lowered_bar_with_force_is_recorded_as_such(repo: Repo) -> None:
    Store(repo.db).close()  # the bot's database, with no run of the action
    result = repo.promote_restart("--min-runs", "0", "--force", "--reason", "CAB-17: vendor fix")
    assert result.exit_code == 0, result.output
    (record,) = promotions_of(repo.file("restart-app.yaml"), "restart-app")
    assert record["forced"] is True and record["reason"] == "CAB-17: vendor fix"
    assert str(record["validated"]) == (
        "0 successful runs in lower environments over the last 2 days; "
        "0 required (the catalog asks for 3)"
    )
    assert record["evidence"] == {
        "runs": 0,
        "required": 0,
        "environments": {},
        "incidents": 0,
        "window": "48h",
        "catalog_commits": [],
        "runbook_tests": "no runbook uses it",
    }
    assert lint(repo.catalog).exit_code == 0


# --- refusals, each with a message that says what to do ------------------------------------


@dataclass(frozen=True)
class Refusal:
    args: tuple[str, ...]
    says: tuple[str, ...]
    exit_code: int = 1


REFUSALS = {
    "unknown action": Refusal(
        ("--action", "restart-ap", "--env", "prod", "--evidence-url", EVIDENCE),
        ("no action 'restart-ap' in the catalog", "did you mean restart-app?"),
    ),
    "inline step": Refusal(
        ("--action", "inline-fix", "--env", "prod", "--evidence-url", EVIDENCE),
        (
            "inline-fix is an inline step of runbook checkout-broken",
            "move it to an action file (e.g. actions/inline-fix.yaml)",
        ),
    ),
    "undeclared environment": Refusal(
        ("--action", "restart-app", "--env", "production", "--evidence-url", EVIDENCE),
        ("unknown environment 'production': the catalog declares dev, staging, prod",),
    ),
    "lower environment": Refusal(
        ("--action", "restart-app", "--env", "staging", "--evidence-url", EVIDENCE),
        ("staging is not a production environment", "add it to safety.scopes"),
    ),
    "http evidence": Refusal(
        ("--action", "restart-app", "--env", "prod", "--evidence-url", "http://wiki/x"),
        ("the evidence URL must be an https:// URL", "'http://wiki/x'"),
    ),
    "not a URL": Refusal(
        ("--action", "restart-app", "--env", "prod", "--evidence-url", "see ticket 42"),
        ("the evidence URL must be an https:// URL",),
    ),
    "force without reason": Refusal(
        ("--action", "restart-app", "--env", "prod", "--evidence-url", EVIDENCE, "--force"),
        ("--force needs --reason TEXT",),
        exit_code=2,
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_say_why(repo: Repo, case: str) -> None:
    refusal = REFUSALS[case]
    repo.record_runs("restart-app", 10)
    result = repo.promote(*refusal.args)
    assert result.exit_code == refusal.exit_code, result.output
    for text in refusal.says:
        assert text in result.output
    assert git(repo.root, "status", "--porcelain") == ""


def test_a_file_that_cannot_be_edited_without_reformatting_is_left_alone(repo: Repo) -> None:
    path = repo.file("restart-app.yaml")
    odd = RESTART.replace("timeout: 60s   ", "timeout:    60s")  # aligned by hand
    path.write_text(odd)
    git(repo.root, "commit", "--quiet", "-am", "align")
    repo.record_runs("restart-app", 3)
    result = repo.promote_restart()
    assert result.exit_code == 1
    assert "would reformat lines outside the safety block (line 11: 'timeout:    60s" in (
        result.output
    )
    assert "add this to the safety block by hand:\n  scopes: [..., prod]\n" in result.output
    assert f'    - env: "prod"\n      evidence_url: "{EVIDENCE}"\n' in result.output
    assert path.read_text() == odd


def test_too_few_runs_says_how_many_where_and_what_is_needed(repo: Repo) -> None:
    repo.record_runs("restart-app", 1)  # counts
    repo.record_runs("restart-app", 1, env="dev", age=72 * 3600)  # outside the 48h window
    repo.record_runs("restart-app", 4, env="prod")  # not a lower environment
    repo.record_runs("restart-app", 4, status="failed")  # not a success
    repo.record_runs("restart-app", 4, status="dry_run")  # not a real run
    repo.record_runs("check-disk", 4)  # another action
    result = repo.promote_restart()
    assert result.exit_code == 1
    assert (
        "refusing to promote restart-app to prod: found 1 successful run of restart-app in "
        "lower environments (staging: 1) since "
    ) in result.output
    assert f"(window 2 days) in {repo.db}; at least 3 are needed." in result.output
    assert "Let it prove itself in dev, staging first" in result.output
    assert "--force --reason TEXT" in result.output
    assert git(repo.root, "status", "--porcelain") == ""


def test_a_missing_database_is_named(repo: Repo) -> None:
    result = repo.promote_restart()
    assert result.exit_code == 1
    assert f"there is no audit database at {repo.db}" in result.output
    assert "Point --db (or RUNBOOK_DB) at the bot's database" in result.output
    assert not repo.db.exists(), "a mistyped --db must not create an empty database"


def test_an_action_already_promoted_is_not_promoted_twice(repo: Repo) -> None:
    repo.record_runs("restart-app", 3)
    assert repo.promote_restart().exit_code == 0
    again = repo.promote_restart()
    assert again.exit_code == 1
    assert f"restart-app is already promoted to prod (by {PROMOTER} at " in again.output


def test_a_broken_catalog_is_refused_with_its_lint_errors(repo: Repo) -> None:
    (repo.catalog / "runbooks" / "broken.yaml").write_text(
        "kind: runbook\nid: broken\nmatch: {services: [x]}\nsteps: [{action: nope}]\n"
    )
    repo.record_runs("restart-app", 3)
    result = repo.promote_restart()
    assert result.exit_code == 1
    assert "the catalog has 1 error(s)" in result.output and "RB021" in result.output


def test_who_comes_from_git_then_the_login_name(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert git_identity(repo.catalog) == PROMOTER
    git(repo.root, "config", "--unset", "user.email")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    assert git_identity(repo.catalog) == "Pat Promoter"
    git(repo.root, "config", "--unset", "user.name")
    monkeypatch.setenv("USER", "oncall-sam")
    assert git_identity(repo.catalog) == "oncall-sam"


# --- the bot runs it in production only once the change is loaded ---------------------------


def test_the_bot_runs_the_promoted_action_in_prod_only_after_reloading(repo: Repo) -> None:
    store = Store(repo.db)
    runtime = LocalRuntime(load_catalog(repo.catalog), store, default_env="staging")

    def checkout_incident(env: str) -> str:
        incident_id = f"INC-{uuid.uuid4().hex[:8]}"
        runtime.open(Incident(id=incident_id, title="checkout down", service="checkout", env=env))
        return str(store.step_runs_of(incident_id)[0].status)

    try:
        assert checkout_incident("prod") == "blocked"
        # real runs in staging are the evidence
        assert [checkout_incident("staging") for _ in range(3)] == ["success"] * 3

        result = repo.promote("--action", "auto-check", "--env", "prod", "--evidence-url", EVIDENCE)
        assert result.exit_code == 0, result.output
        assert "3 successful runs in lower environments" in result.output

        # the running bot still has the catalog it loaded: nothing changes until a reload
        assert checkout_incident("prod") == "blocked"
        runtime.engine.use_catalog(load_catalog(repo.catalog))  # what a reload does
        assert checkout_incident("prod") == "success"
    finally:
        store.close()


# --- only real runs by the bot are evidence ---------------------------------------------------


def simulate_checkout(repo: Repo, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "simulate",
            "--catalog",
            str(repo.catalog),
            "--db",
            str(repo.db),
            "--service",
            "checkout",
            "--symptom",
            "checkout down",
            "--env",
            "staging",
            *args,
        ],
        catch_exceptions=False,
    )


def test_runs_of_simulate_never_count_even_executed(repo: Repo) -> None:
    for _ in range(3):  # auto-check really runs (prints OK); the guarded inline step is refused
        ran = simulate_checkout(repo, "--execute", "--approve", "none")
        assert "✅ succeeded" in ran.output, ran.output
    store = Store(repo.db)
    succeeded = [e for e in store.events() if e["status"] == "succeeded"]
    store.close()
    assert len(succeeded) == 3 and {e["origin"] for e in succeeded} == {"simulate"}

    result = repo.promote("--action", "auto-check", "--env", "prod", "--evidence-url", EVIDENCE)

    assert result.exit_code == 1
    assert "found 0 successful runs of auto-check" in result.output
    assert (
        "Not counted: 3 runs of runbookctl simulate, which are not runs by the bot on real "
        "incidents."
    ) in result.output
    assert git(repo.root, "status", "--porcelain") == ""


def test_the_record_says_how_many_runs_where_when_and_on_which_commits(repo: Repo) -> None:
    head = git(repo.root, "rev-parse", "HEAD")[:12]
    store = Store(repo.db)
    # the bot's real runs (LocalRuntime with the bot's origin), on the catalog at HEAD
    runtime = LocalRuntime(load_catalog(repo.catalog), store)
    try:
        for n, env in enumerate(["staging", "staging", "dev"]):
            runtime.open(Incident(id=f"P{n}", title="checkout down", service="checkout", env=env))
    finally:
        store.close()
    repo.record_runs("auto-check", 1, age=40 * 3600, commit="0a1b2c3d4e5f")  # an older catalog
    simulate_checkout(repo, "--execute", "--approve", "none")  # does not count

    result = repo.promote("--action", "auto-check", "--env", "prod", "--evidence-url", EVIDENCE)

    assert result.exit_code == 0, result.output
    (record,) = promotions_of(repo.file("auto-check.yaml"), "auto-check")
    evidence = record["evidence"]
    assert isinstance(evidence, dict)
    first, last = str(evidence.pop("first_run")), str(evidence.pop("last_run"))
    assert evidence == {
        "runs": 4,
        "required": 3,
        "environments": {"dev": 1, "staging": 3},
        "incidents": 4,
        "window": "48h",
        "catalog_commits": [head, "0a1b2c3d4e5f"],
        "runbook_tests": "no runbook test of checkout-broken",
    }
    assert abs(datetime.fromisoformat(first).timestamp() - (time.time() - 40 * 3600)) < 120
    assert abs(datetime.fromisoformat(last).timestamp() - time.time()) < 120
    validated = str(record["validated"])
    assert validated.startswith(
        "4 successful runs in lower environments over the last 2 days (dev: 1, staging: 3; "
        "4 incidents, "
    )
    assert f"catalog commits {head}, 0a1b2c3d4e5f)" in validated
    assert validated.endswith("(not counted: 1 run of runbookctl simulate); 3 required")
    text = repo.file("auto-check.yaml").read_text()
    assert "      evidence:\n        runs: 4\n        required: 3\n" in text
    assert "        environments: {dev: 1, staging: 3}\n" in text
    assert f'        first_run: "{first}"\n' in text
    assert f"        catalog_commits: [{head}, 0a1b2c3d4e5f]\n" in text
    assert lint(repo.catalog).exit_code == 0
    assert load_catalog(repo.catalog).actions["auto-check"].safety.promotion_for("prod")


CHECKOUT_TEST = """\
kind: test
name: auto-check runs, then the inline fix waits for approval
incident: {service: checkout, title: checkout down, env: staging}
steps:
  auto-check: {exit_code: 0, output: OK}
  inline-fix: {approval: pending}
expect:
  path: [auto-check: success, inline-fix: awaiting_approval]
"""


def test_passing_runbook_tests_are_recorded_and_failing_ones_refuse(repo: Repo) -> None:
    tests = repo.catalog / "tests"
    tests.mkdir()
    (tests / "checkout.yaml").write_text(CHECKOUT_TEST)
    (tests / "other.yaml").write_text(  # an incident no runbook using auto-check matches
        "kind: test\nname: nothing\nincident: {service: web, title: down}\n"
        "expect: {runbook: null}\n"
    )
    git(repo.root, "add", ".")
    git(repo.root, "commit", "--quiet", "-m", "runbook tests")
    repo.record_runs("auto-check", 3)
    args = ("--action", "auto-check", "--env", "prod", "--evidence-url", EVIDENCE)

    dry = repo.promote(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert (
        "  runbook tests: 1 of 1 runbook test of checkout-broken passed "
        "(runbooks/tests/checkout.yaml)"
    ) in dry.output.replace(str(repo.root) + "/", "")

    broken = CHECKOUT_TEST.replace("inline-fix: awaiting_approval", "inline-fix: success")
    (tests / "checkout.yaml").write_text(broken)
    refused = repo.promote(*args)
    assert refused.exit_code == 1
    assert "refusing to promote auto-check to prod: runbook tests of the runbooks using it " in (
        refused.output
    )
    assert (
        "checkout.yaml:8 'auto-check runs, then the inline fix waits for approval': path: "
        "expected auto-check success → inline-fix success; got auto-check success → inline-fix "
        "awaiting_approval"
    ) in refused.output
    assert "Fix them (runbookctl test), or pass --force --reason TEXT" in refused.output

    forced = repo.promote(*args, "--force", "--reason", "the test is being rewritten in #88")
    assert forced.exit_code == 0, forced.output
    (record,) = promotions_of(repo.file("auto-check.yaml"), "auto-check")
    evidence = record["evidence"]
    assert isinstance(evidence, dict)
    assert str(evidence["runbook_tests"]).startswith(
        "0 of 1 runbook test of checkout-broken passed ("
    )
    assert record["forced"] is True


def test_a_database_the_bot_has_not_migrated_yet_is_read_by_the_same_rule(repo: Repo) -> None:
    """A bot of the previous version (schema 5) has no origin column: the incidents
    simulate opened are told apart as the migration does it."""
    import sqlite_utils

    from bot.store.schema import MIGRATIONS

    conn = sqlite3.connect(repo.db)
    db = sqlite_utils.Database(conn)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for version in range(1, 6):
        MIGRATIONS[version](db)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '5')")
    rows = [("PABC123", "staging"), ("SIM-1A2B3C4D", "staging"), ("P-BY-SIM", "staging")]
    for incident_id, env in rows:
        conn.execute(
            "INSERT INTO automation_events (ts, incident_id, action, env, status, "
            "catalog_commit) VALUES (?, ?, 'restart-app', ?, 'succeeded', 'abc')",
            (time.time() - 60, incident_id, env),
        )
    conn.execute(
        "INSERT INTO inbox (source, key, incident_id, kind, payload, received_at, status) "
        "VALUES ('simulate', 'simulate:open:P-BY-SIM', 'P-BY-SIM', 'incident.triggered', "
        "'{}', 0, 'done')"
    )
    conn.commit()
    conn.close()

    result = repo.promote_restart("--dry-run")

    assert result.exit_code == 1
    assert "found 1 successful run of restart-app" in result.output
    assert "Not counted: 2 runs of runbookctl simulate" in result.output
    with sqlite3.connect(repo.db) as check:  # read-only: not migrated behind the bot's back
        assert check.execute("SELECT value FROM meta").fetchone() == ("5",)


# --- the edit on every bundled action -----------------------------------------------------


def test_every_bundled_action_can_be_promoted_without_touching_other_lines() -> None:
    parsed = parse_catalog(REPO / "runbooks")
    catalog = load_catalog(REPO / "runbooks", with_git=False)
    record = {
        "env": "prod",
        "evidence_url": EVIDENCE,
        "by": PROMOTER,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "validated": "3 successful runs in lower environments over the last 30 days",
        "catalog_commit": "0123456789ab",
    }
    checked = 0
    for action in catalog.actions.values():
        if "prod" in action.safety.scopes:
            continue
        text = Path(action.location.file).read_text()
        after, scopes = edit_action_document(
            text, action.id, "prod", record, default_scopes=("dev", "staging")
        )
        assert scopes[-1] == "prod"
        before_safety = text[: text.index("\nsafety:")]
        assert after.startswith(before_safety + "\nsafety:\n"), action.id
        (doc,) = yaml.safe_load_all(after)
        assert doc["safety"]["promotions"][-1] == record
        assert {k: v for k, v in doc.items() if k != "safety"} == {
            k: v for k, v in yaml.safe_load(text).items() if k != "safety"
        }
        checked += 1
    assert checked >= 5 and not parsed.has_errors


# --- property: whatever the comments and layout, only the safety block changes -----------------

RECORD = {
    "env": "prod",
    "evidence_url": EVIDENCE,
    "by": PROMOTER,
    "at": "2026-11-02T10:00:00+00:00",
    "validated": "3 successful runs in lower environments over the last 30 days (staging: 3)",
    "catalog_commit": "0123456789ab",
}


@st.composite
def action_documents(draw: st.DrawFn) -> tuple[str, str]:
    """An action document with comments and blank lines in random places; returns the
    text and how its safety block is written."""
    dash, cont = draw(st.sampled_from([("  - ", "    "), ("- ", "  ")]))
    safety = draw(st.sampled_from(["none", "flow", "block", "block-scopes", "flow-scopes"]))
    blocks: list[list[str]] = [["id: act"], ['command: "echo hi"']]
    if draw(st.booleans()):
        blocks.append(["expect:", f'{dash}pattern: "hi"'])
    safety_block = {
        "none": [],
        "flow": ["safety: {requires_approval: true}"],
        "block": ["safety:", "  requires_approval: true"],
        "block-scopes": [
            "safety:",
            "  requires_approval: false",
            "  scopes:",
            f"  {dash}dev",
            f"  {dash}staging",
        ],
        "flow-scopes": ["safety:", '  scopes: ["staging"]'],
    }[safety]
    if safety_block:
        blocks.insert(draw(st.integers(1, len(blocks))), safety_block)
    lines: list[str] = []
    for i, block in enumerate(blocks):
        for j, line in enumerate(block):
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from([f"# c{i}-{j}", "", f"  # i{i}-{j}"])))
            if draw(st.booleans()) and not line.endswith("}"):
                line += f"   # e{i}-{j}"
            lines.append(line.replace("    ", cont) if line.startswith("    ") else line)
    if draw(st.booleans()):
        lines.append("# the end")
    return "\n".join(lines) + "\n", safety


@settings(max_examples=150, deadline=None)
@given(action_documents())
def test_only_the_safety_block_ever_changes(doc: tuple[str, str]) -> None:
    from bot.errors import PromotionRefused

    text, _ = doc
    try:
        after, scopes = edit_action_document(
            text, "act", "prod", RECORD, default_scopes=("dev", "staging")
        )
    except PromotionRefused as exc:  # allowed, but only for a reason it states
        assert "add this to the safety block by hand" in str(exc)
        return
    before_data, after_data = yaml.safe_load(text), yaml.safe_load(after)
    assert scopes[-1] == "prod" and after_data["safety"]["scopes"] == list(scopes)
    assert after_data["safety"]["promotions"][-1] == RECORD
    old_safety = before_data.get("safety") or {}
    assert {k: v for k, v in after_data["safety"].items() if k not in ("scopes", "promotions")} == {
        k: v for k, v in old_safety.items() if k not in ("scopes", "promotions")
    }
    assert {k: v for k, v in after_data.items() if k != "safety"} == {
        k: v for k, v in before_data.items() if k != "safety"
    }
    for comment in re.findall(r"#.*", text):
        assert after.count(comment) == text.count(comment), comment
    old, new = text.splitlines(), after.splitlines()
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    changed = [(i1, i2) for tag, i1, i2, _, _ in matcher.get_opcodes() if tag != "equal"]
    keys = [i for i, line in enumerate(old) if re.match(r"[a-z_]+:", line)]
    if "safety" in before_data:
        first = next(i for i in keys if old[i].startswith("safety:"))
        last = next((i for i in keys if i > first), len(old))
        assert all(first <= i1 and i2 <= last for i1, i2 in changed), (text, after)
    else:
        assert all(i1 == i2 for i1, i2 in changed), "a new block is a pure insertion"
