"""`runbookctl test`: runbook tests walked through the real engine, with nothing executed.

Catalogs and tests are real YAML files in a temporary folder. Every command of the test
catalog would append to a marker file if it ran: the marker never appears, which is how
"nothing real is executed" is checked. What a test observed is checked through the
command's output (text, JSON, GitHub annotations) and, for the audit rows, through a
real SQLite file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from bot.catalog import load_catalog
from bot.promotion import find_evidence
from bot.runbooktests.files import read, schema, yaml_files_under
from bot.runbooktests.runner import run_test
from bot.store import Store
from runbookctl.cli import cli

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "runbooks"

SETTINGS = """\
kind: catalog
environments: [{name: dev}, {name: staging}, {name: prod, production: true}]
approvers: {users: [U0LEAD], groups: [S0ONCALL]}
escalation: {mention: "<!subteam^S0ONCALL>", pagerduty: true}
services: {shop: staging, shop-prod: prod}
secret_patterns: ['(?i)redis://[^@\\s]*@']
"""

# Each command would append its name to MARKER if it ran.
ACTIONS = {
    "check": ("false", "'^rate => [0-9.]+$'", "requires_approval: false, scopes: [dev, staging]"),
    "flush": ("true", '"OK"', "requires_approval: true, scopes: [staging]"),
    "verify": ("false", "'^rate'", "requires_approval: false, scopes: [dev, staging]"),
    "undo": ("false", '"undone"', "requires_approval: false, scopes: [staging]"),
}


def action_text(name: str, pattern: str, safety: str, marker: Path) -> str:
    allowed = '\n  - {pattern: "already empty", allow_failure: true}' if name == "flush" else ""
    return f"""\
kind: action
id: {name}
command: ["{sys.executable}", "-c", "import sys; open(sys.argv[1], 'a').write(sys.argv[2])",
          "{marker}", "{name} {{{{ incident.details.host }}}}"]
timeout: 30s
expect:
  - pattern: {pattern}{allowed}
safety: {{{safety}}}
"""


RUNBOOK = """\
kind: runbook
id: shop-errors
title: Shop errors
match: {services: [shop, shop-prod], symptoms: [errors]}
steps:
  - action: check
  - action: flush
    on_failure: {rollback: undo}
  - action: verify
    when: "steps['flush'].status == 'success'"
on_resolve:
  - id: final-check
    action: check
"""

HAPPY = """\
kind: test
name: the happy path
incident: {service: shop, title: shop errors, details: {host: web-1}}
steps:
  check: {exit_code: 0, output: "rate => 0.9"}
  flush: {approval: approved by U0LEAD, exit_code: 0, output: OK}
  verify: {exit_code: 0, output: "rate => 0.0"}
expect:
  runbook: shop-errors
  env: staging
  path: [check: success, flush: success, verify: success]
  ran: [check, flush, verify]
  approvals: [flush]
  status: completed
  escalation: false
  thread: ["web-1", "✅ succeeded, approved by <@U0LEAD>", "Runbook finished."]
  pagerduty: [note]
"""


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root.parent / "ran.txt"
        (root / "actions").mkdir(parents=True)
        (root / "runbooks").mkdir()
        (root / "tests").mkdir()
        (root / "catalog.yaml").write_text(SETTINGS)
        for name, (_, pattern, safety) in ACTIONS.items():
            (root / "actions" / f"{name}.yaml").write_text(
                action_text(name, pattern, safety, self.marker)
            )
        (root / "runbooks" / "shop.yaml").write_text(RUNBOOK)

    def write_test(self, text: str, name: str = "shop.yaml") -> Path:
        path = self.root / "tests" / name
        path.write_text(text)
        return path

    def run(self, *args: str) -> Result:
        result = CliRunner().invoke(cli, ["test", *args], catch_exceptions=False)
        assert not self.marker.exists(), "runbookctl test executed a command"
        return result

    def test(self, *tests: str, args: tuple[str, ...] = ()) -> Result:
        self.write_test("---\n".join(tests))
        return self.run(*args, str(self.root))


@pytest.fixture
def shop(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog")


def case_text(name: str, body: str) -> str:
    return f"kind: test\nname: {name}\n{body}"


INCIDENT = "incident: {service: shop, title: shop errors, details: {host: web-1}}\n"


def observed(result: Result) -> list[dict[str, object]]:
    data = json.loads(result.output)
    return [t["observed"] for t in data["tests"]]


# --- the bundled catalog ------------------------------------------------------------------------


def test_the_bundled_runbook_tests_pass() -> None:
    result = CliRunner().invoke(cli, ["test", str(BUNDLED)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "13 passed, 0 failed"


def test_every_bundled_runbook_is_tested_and_payments_on_every_kind_of_path() -> None:
    result = CliRunner().invoke(cli, ["test", "--format", "json", str(BUNDLED)])
    data = json.loads(result.output)
    assert data["passed"] == len(data["tests"]) and data["failed"] == data["errors"] == 0
    tested = {t["observed"]["runbook"] for t in data["tests"]}
    assert tested == {r.id for r in load_catalog(BUNDLED, with_git=False).runbooks}
    payments = [
        t["observed"] for t in data["tests"] if t["file"].endswith("payments-elevated-5xx.yaml")
    ]
    ends = {status for o in payments for step in o["path"] for status in step.values()}
    assert {"rejected", "expired", "blocked", "skipped"} <= ends
    assert any(
        o["status"] == "completed" and all(set(s.values()) == {"success"} for s in o["path"])
        for o in payments
    ), "a happy path"


@pytest.mark.parametrize("path", yaml_files_under(BUNDLED / "tests"), ids=lambda p: p.name)
def test_bundled_test_files_follow_the_published_schema(path: Path) -> None:
    """What an editor sees through the yaml-language-server comment."""
    from jsonschema import Draft202012Validator

    text = path.read_text("utf-8")
    assert text.startswith("# yaml-language-server: $schema=../../bot/runbooktests/schema.json\n")
    assert (path.parent / "../../bot/runbooktests/schema.json").resolve().is_file()
    validator = Draft202012Validator(schema())
    for doc in yaml.safe_load_all(text):
        assert list(validator.iter_errors(doc)) == []


# --- passing and failing ----------------------------------------------------------------------


def test_a_passing_test_runs_nothing_and_says_so_like_pytest(shop: Catalog) -> None:
    result = shop.test(HAPPY)
    assert result.exit_code == 0, result.output
    assert result.output == f"{shop.root}/tests/shop.yaml .\n1 passed, 0 failed\n"
    verbose = shop.run("--verbose", str(shop.root))
    assert "tests/shop.yaml:1: passed 'the happy path': check success → flush success → " in (
        verbose.output
    )


def test_a_failing_test_gives_one_line_with_expected_and_actual_path(shop: Catalog) -> None:
    wrong = HAPPY.replace("name: the happy path", "name: wrong path").replace(
        "path: [check: success, flush: success, verify: success]",
        "path: [check: success, flush: rejected]",
    )
    result = shop.test(HAPPY, wrong)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"{shop.root}/tests/shop.yaml .F"
    assert lines[1] == (
        f"{shop.root}/tests/shop.yaml:29: FAILED 'wrong path': path: expected check success → "
        "flush rejected; got check success → flush success → verify success"
    )
    assert lines[-1] == "1 passed, 1 failed"


def test_every_difference_is_listed_with_its_line(shop: Catalog) -> None:
    body = INCIDENT + (
        "steps:\n"
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flush: {approval: rejected by U0LEAD}\n"
        "expect:\n"
        "  status: completed\n"
        "  escalation: false\n"
        "  approvals: []\n"
        "  thread: [Runbook finished.]\n"
        "  pagerduty: [note]\n"
    )
    result = shop.test(case_text("all wrong", body))
    assert result.exit_code == 1
    out = result.output
    # in the order the test says them
    assert "tests/shop.yaml:8: FAILED 'all wrong': status: expected completed; got escalated" in out
    assert (
        "    escalation: expected no escalation; got escalated: flush ended rejected (line 9)"
        in out
    )
    assert "    approvals: expected (none); got flush (line 10)" in out
    assert (
        "    thread: expected the thread shows 'Runbook finished.'; got it does not (line 11)"
        in out
    )
    assert "    pagerduty: expected note; got note, escalate (line 12)" in out
    assert "    the thread:\n      | 🚨 shop errors\n" in out  # shown when a thread check fails
    assert "      | <!subteam^S0ONCALL> Escalating: flush ended rejected." in out


# --- each assumed outcome ---------------------------------------------------------------------


OUTCOMES = {
    "expect decides success": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flush: {approval: approved, exit_code: 0, output: OK}\n"
        "  verify: {exit_code: 0, output: 'rate => 0.1'}\n",
        [{"check": "success"}, {"flush": "success"}, {"verify": "success"}],
        "completed",
    ),
    "exit 0 without the expected output fails": (
        "  check: {exit_code: 0, output: 'no data'}\n",
        [{"check": "failed"}],
        "escalated",
    ),
    "an allowed failure goes on and the when skips": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flush: {approval: approved by U0LEAD, exit_code: 1, output: already empty}\n",
        [{"check": "success"}, {"flush": "allowed_failure"}, {"verify": "skipped"}],
        "completed",
    ),
    "a failure runs the rollback": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flush: {approval: approved by U0LEAD, exit_code: 2, output: 'ERR'}\n"
        "  flush:rollback: {exit_code: 0, output: undone}\n",
        [{"check": "success"}, {"flush": "failed"}, {"flush:rollback": "success"}],
        "escalated",
    ),
    "a timeout": (
        "  check: {timeout: true}\n",
        [{"check": "timeout"}],
        "escalated",
    ),
    "a command that cannot start": (
        "  check: {error: 'python: No such file or directory'}\n",
        [{"check": "error"}],
        "escalated",
    ),
    "approved by a member of an approver group": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flush: {approval: approved by U0MEMBER, exit_code: 0, output: OK}\n"
        "  verify: {exit_code: 0, output: 'rate => 0.1'}\n",
        [{"check": "success"}, {"flush": "success"}, {"verify": "success"}],
        "completed",
    ),
    "approved by someone who may not": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n  flush: {approval: approved by U0EVE}\n",
        [{"check": "success"}, {"flush": "awaiting_approval"}],
        "waiting",
    ),
    "rejected": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n  flush: {approval: rejected}\n",
        [{"check": "success"}, {"flush": "rejected"}],
        "escalated",
    ),
    "expired": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n  flush: {approval: expired}\n",
        [{"check": "success"}, {"flush": "expired"}],
        "escalated",
    ),
    "pending": (
        "  check: {exit_code: 0, output: 'rate => 0.9'}\n  flush: {approval: pending}\n",
        [{"check": "success"}, {"flush": "awaiting_approval"}],
        "waiting",
    ),
}


@pytest.mark.parametrize("case", OUTCOMES, ids=list(OUTCOMES))
def test_each_kind_of_assumed_outcome(shop: Catalog, case: str) -> None:
    steps, path, status = OUTCOMES[case]
    expect = f"expect:\n  path: {json.dumps(path)}\n  status: {status}\n"
    body = INCIDENT + "members: {S0ONCALL: [U0MEMBER]}\nsteps:\n" + steps + expect
    result = shop.test(case_text(case, body), args=("--format", "json"))
    assert result.exit_code == 0, result.output
    (seen,) = observed(result)
    assert seen["path"] == path and seen["status"] == status


def test_what_the_thread_shows_for_each_decision(shop: Catalog) -> None:
    def thread(steps: str) -> str:
        result = shop.test(
            case_text("t", INCIDENT + "steps:\n" + steps + "expect: {status: escalated}\n"),
            args=("--format", "json"),
        )
        (seen,) = observed(result)
        return str(seen["thread"])

    check = "  check: {exit_code: 0, output: 'rate => 0.9'}\n"
    assert "⌛ approval expired" in thread(check + "  flush: {approval: expired}\n")
    assert "Escalating: the approval request for flush expired." in thread(
        check + "  flush: {approval: expired}\n"
    )
    assert "🚫 rejected by <@U0LEAD>" in thread(check + "  flush: {approval: rejected}\n")
    assert "⌛ timed out: killed after 30s timeout" in thread("  check: {timeout: true}\n")
    assert "💥 could not run: could not start: python: No such file" in thread(
        "  check: {error: 'python: No such file or directory'}\n"
    )


def test_an_unauthorized_approval_is_refused_as_in_the_bot(shop: Catalog) -> None:
    body = INCIDENT + (
        "steps:\n  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flush: {approval: approved by U0EVE}\n"
        "expect:\n  ran: [check]\n  status: waiting\n"
        "  thread: ['(only visible to <@U0EVE>) Your decision on flush changed nothing']\n"
    )
    result = shop.test(case_text("eve", body))
    assert result.exit_code == 0, result.output


def test_the_environment_rule_and_a_blocked_production_step(shop: Catalog) -> None:
    prod = "incident: {service: shop-prod, title: shop errors, details: {host: web-1}}\n"
    unmapped = "incident: {service: other, title: shop errors}\n"
    tests = [
        case_text(
            "prod by mapping",
            prod + "expect: {env: prod, path: [check: blocked], ran: [], status: escalated}\n",
        ),
        case_text(
            "the incident says",
            INCIDENT.replace("}}", "}, env: prod}")
            + "expect: {env: prod, path: [check: blocked]}\n",
        ),
        case_text("no runbook", unmapped + "expect: {runbook: null, status: none, env: null}\n"),
    ]
    result = shop.test(*tests)
    assert result.exit_code == 0, result.output


def test_on_resolve_follow_ups(shop: Catalog) -> None:
    body = INCIDENT + (
        "resolve: true\n"
        "steps:\n  check: {exit_code: 0, output: 'rate => 0.9'}\n  flush: {approval: pending}\n"
        "  final-check: {exit_code: 0, output: 'rate => 0.0'}\n"
        "expect:\n  path: [check: success, flush: cancelled, final-check: success]\n"
        "  status: cancelled\n"
    )
    assert shop.test(case_text("resolved", body)).exit_code == 0


def test_commands_are_rendered_and_masked_as_for_a_real_run(shop: Catalog) -> None:
    no_host = "incident: {service: shop, title: shop errors}\n"
    body = no_host + "expect: {path: [check: error], ran: []}\n"
    secret = INCIDENT + (
        'steps:\n  check: {exit_code: 0, output: "rate => 0.9\\nfrom redis://app:hunter2@cache"}\n'
        "  flush: {approval: pending}\n"
        "expect: {not_in_thread: [hunter2], thread: ['from ********cache']}\n"
    )
    result = shop.test(case_text("no host", body), case_text("masked", secret))
    assert result.exit_code == 0, result.output
    json_result = shop.run("--format", "json", "-k", "no host", str(shop.root))
    (seen,) = observed(json_result)
    assert "could not build the command" in str(seen["thread"])
    assert "incident.details.host" in str(seen["thread"])


# --- a test must not pass on what it left open ----------------------------------------------------


def test_a_missing_step_outcome_is_a_clear_failure(shop: Catalog) -> None:
    body = (
        INCIDENT
        + "steps:\n  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        + ("  flush: {approval: approved}\nexpect: {runbook: shop-errors}\n")
    )
    result = shop.test(case_text("half written", body))
    assert result.exit_code == 1
    assert (
        "FAILED 'half written': steps.flush: expected how the command of flush ends (it runs); "
        "got the test does not say: it ends in error, and the test fails"
    ) in result.output
    assert "fix (steps.flush): add `exit_code: 0` and `output: …`" in result.output


def test_a_missing_decision_is_a_clear_failure(shop: Catalog) -> None:
    body = (
        INCIDENT
        + "steps:\n  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        + ("expect: {status: waiting}\n")
    )
    result = shop.test(case_text("undecided", body))
    assert result.exit_code == 1
    assert "steps.flush: expected a decision on the approval flush asks for" in result.output
    assert "add `approval: approved by U…` (or `rejected`, `expired`, `pending`)" in result.output


def test_outcomes_the_run_never_uses_fail_the_test(shop: Catalog) -> None:
    body = INCIDENT.replace("}}", "}, env: prod}") + (
        "steps:\n  check: {exit_code: 0, output: 'rate => 0.9'}\n"
        "  flsh: {approval: approved}\n"
        "expect: {status: escalated}\n"
    )
    result = shop.test(case_text("stale", body))
    assert result.exit_code == 1
    assert (
        "steps.check: expected the command of check runs (the test says how it ends); "
        "got it never ran (blocked)"
    ) in result.output
    assert "steps.flsh: expected a step of runbook shop-errors; got it has no step 'flsh'" in (
        result.output
    )
    assert "fix (steps.flsh): did you mean `flush`?" in result.output


# --- invalid files --------------------------------------------------------------------------------


def test_invalid_files_are_errors_with_file_line_col_and_the_fix(shop: Catalog) -> None:
    shop.write_test(HAPPY, "good.yaml")
    shop.write_test(
        "kind: test\nname: broken\nincident: {service: shop, titel: x}\n"
        "steps:\n  check: {exit_code: 0, timeout: true}\n  flush: {approval: maybe}\n"
        "expect: {}\n",
        "bad.yaml",
    )
    shop.write_test("kind: test\nname: [unclosed\n", "syntax.yaml")
    shop.write_test(HAPPY + "---\n" + HAPPY, "twice.yaml")
    result = shop.run(str(shop.root))
    assert result.exit_code == 1
    out = result.output
    bad = f"{shop.root}/tests/bad.yaml"
    assert (
        f"{bad}:3:27: error RT010 [test-schema] unknown key `titel` in `incident` "
        "($.incident.titel)\n     3 | incident: {service: shop, titel: x}\n"
        "       |                           ^\n"
        "    fix: did you mean `title`?"
    ) in out
    assert f"{bad}:3:11: error RT010 [test-schema] `incident` has no `title`" in out
    assert (
        f"{bad}:6:21: error RT010 [test-schema] `approval: maybe` in `approval` of the outcome "
        "of step 'flush' is not a decision"
    ) in out
    assert "fix: write `approved by U…` or `approved` (its first approver)" in out
    assert f"{bad}:7:9: error RT010 [test-schema] the test expects nothing" in out
    assert f"{shop.root}/tests/syntax.yaml:3:1: error RB001 [yaml-syntax] YAML syntax error" in out
    assert (
        f"{shop.root}/tests/twice.yaml:20:7: error RT012 [duplicate-test-name] a second test "
        "named 'the happy path' in this file (the first is on line 1)"
    ) in out
    # the valid tests still ran
    assert out.splitlines()[-1] == "2 passed, 0 failed, 6 errors"


def test_an_outcome_that_ends_two_ways_is_refused(shop: Catalog) -> None:
    body = INCIDENT + "steps:\n  check: {exit_code: 0, timeout: true}\nexpect: {ran: []}\n"
    result = shop.test(case_text("both", body))
    assert result.exit_code == 1
    assert "error RT011 [conflicting-outcome] step 'check' ends in two ways at once" in (
        result.output
    )
    output_only = INCIDENT + "steps:\n  check: {output: x}\nexpect: {ran: []}\n"
    result = shop.test(case_text("output only", output_only))
    assert "step 'check' has an output but no exit code" in result.output


def test_a_broken_catalog_runs_no_test(shop: Catalog) -> None:
    shop.write_test(HAPPY)
    (shop.root / "runbooks" / "broken.yaml").write_text(
        "kind: runbook\nid: broken\nmatch: {services: [x]}\nsteps: [{action: nope}]\n"
    )
    result = shop.run(str(shop.root))
    assert result.exit_code == 1
    assert "error RB021 [unknown-action]" in result.output
    assert "has errors, so its tests cannot run: fix them first (runbookctl lint)" in result.output
    assert result.output.splitlines()[-1] == "0 passed, 0 failed, 2 errors"


def test_a_catalog_without_tests_is_an_error_not_a_green_run(shop: Catalog) -> None:
    result = shop.run(str(shop.root))
    assert result.exit_code == 1
    assert f"no runbook tests in {shop.root}/tests" in result.output
    assert result.output.splitlines()[-1] == "0 passed, 0 failed, 1 error"


# --- formats, selection, paths and exit codes -----------------------------------------------


def test_json_gives_each_test_its_failures_and_what_was_observed(shop: Catalog) -> None:
    wrong = HAPPY.replace("name: the happy path", "name: wrong").replace(
        "status: completed", "status: escalated"
    )
    result = shop.test(HAPPY, wrong, args=("--format", "json"))
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert (data["passed"], data["failed"], data["errors"]) == (1, 1, 0)
    first, second = data["tests"]
    assert first["outcome"] == "passed" and first["failures"] == []
    assert first["observed"]["path"] == [
        {"check": "success"},
        {"flush": "success"},
        {"verify": "success"},
    ]
    assert first["observed"]["pagerduty"] == ["note"]
    assert second["failures"] == [
        {
            "what": "status",
            "expected": "escalated",
            "actual": "completed",
            "line": 32,
            "fix": "",
        }
    ]
    # the same tests give the same report, run after run
    again = shop.run("--format", "json", str(shop.root))
    assert again.output == result.output


def test_github_annotates_each_failure_on_its_line(shop: Catalog) -> None:
    wrong = HAPPY.replace("status: completed", "status: escalated")
    shop.write_test(wrong)
    shop.write_test("kind: tset\n", "typo.yaml")
    result = shop.run("--format", "github", str(shop.root))
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[1] == (
        f"::error file={shop.root}/tests/typo.yaml,line=1,col=7,title=RT010 test-schema::"
        "`kind` must be `test` in a runbook test ($.kind). Fix: write `kind: test`"
    )
    assert lines[2] == (
        f"::error file={shop.root}/tests/shop.yaml,line=14,"
        "title=runbook test failed%3A the happy path::status: expected escalated; got completed."
    )
    assert lines[-1] == "0 passed, 1 failed, 2 errors"


def test_select_by_name_and_run_single_files(
    shop: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = HAPPY.replace("name: the happy path", "name: another path")
    shop.write_test(HAPPY, "one.yaml")
    shop.write_test(other, "two.yaml")
    assert shop.run("-k", "ANOTHER", str(shop.root)).output.endswith("1 passed, 0 failed\n")
    monkeypatch.chdir(shop.root)
    single = shop.run("tests/two.yaml")  # its catalog is the folder above with catalog.yaml
    assert single.output == "tests/two.yaml .\n1 passed, 0 failed\n"
    folder = shop.run("tests")
    assert folder.output.endswith("2 passed, 0 failed\n")
    monkeypatch.chdir(shop.root.parent)
    default = shop.run()  # $RUNBOOK_CATALOG or ./runbooks
    assert default.exit_code == 2 and "catalog directory 'runbooks' does not exist" in (
        default.output
    )
    monkeypatch.setenv("RUNBOOK_CATALOG", str(shop.root))
    assert shop.run().output.endswith("2 passed, 0 failed\n")


def test_a_file_found_elsewhere_runs_against_catalog(shop: Catalog, tmp_path: Path) -> None:
    loose = tmp_path / "loose.yaml"
    loose.write_text(HAPPY)
    refused = shop.run(str(loose))
    assert refused.exit_code == 2
    assert "no catalog.yaml in the folders above" in refused.output
    result = shop.run("--catalog", str(shop.root), str(loose))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args",
    [
        ("--format", "xml"),
        ("no/such/catalog",),
        ("--catalog", "elsewhere", "."),
        ("--nope",),
    ],
    ids=["format", "missing path", "catalog with a catalog", "unknown flag"],
)
def test_usage_errors_exit_2(shop: Catalog, args: tuple[str, ...], tmp_path: Path) -> None:
    shop.write_test(HAPPY)
    (tmp_path / "elsewhere").mkdir()
    final = [a if a != "." else str(shop.root) for a in args]
    final = [a if a != "elsewhere" else str(tmp_path / "elsewhere") for a in final]
    assert shop.run(*final).exit_code == 2


# --- runbook tests are no evidence ----------------------------------------------------------


def test_audit_rows_of_a_test_are_marked_and_never_evidence(shop: Catalog, tmp_path: Path) -> None:
    shop.write_test(HAPPY)
    suite = read([shop.root / "tests" / "shop.yaml"])
    db = tmp_path / "test-audit.db"
    verdict = run_test(load_catalog(shop.root), suite.tests[0], db=str(db))
    assert verdict.passed, verdict.mismatches
    store = Store(db)
    events = store.events()
    store.close()
    assert {e["origin"] for e in events} == {"test"}
    assert sum(e["status"] == "succeeded" and e["action"] == "check" for e in events) == 1
    evidence = find_evidence(db, "check", ("dev", "staging"), window=3600 * 24 * 3650, required=1)
    assert evidence.total == 0 and evidence.not_counted == {"test": 1}
    assert "not counted: 1 run of runbookctl test" in evidence.summary()
