"""One environment rule (bot.catalog.environment), as the bot, simulate, lint and report use it.

The services mapping is matched like runbooks are (name or id, any case), then RUNBOOK_ENV,
then nothing. The end-to-end cases run `runbookctl simulate` through the real engine with
real commands: a production incident must never act as staging.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bot.catalog import load_catalog, parse_catalog
from bot.catalog.environment import resolve_environment, unmapped_services
from bot.catalog.model import Catalog
from bot.messages import environment_warnings
from bot.policy import decide
from bot.report import environments
from runbookctl.cli import cli

REPO = Path(__file__).resolve().parent.parent

SETTINGS = """
kind: catalog
environments: [{name: dev}, {name: staging}, {name: prod, production: true}]
approvers: {users: [U0ONCALL]}
services:
  svc-prod: prod
  PSVCSTG: staging
"""

# An automatic step and a guarded one, both allowed in staging only: in prod both are
# blocked, in staging the first runs at once. Each appends to a marker file when it runs.
APPEND = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10)); print('OK')"
ACTIONS = {
    "actions/auto.yaml": """
kind: action
id: auto-diagnose
command: ["@PYTHON@", "-c", "@APPEND@", "@MARKER@", "auto"]
expect: [{pattern: OK}]
safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "actions/guarded.yaml": """
kind: action
id: guarded-fix
command: ["@PYTHON@", "-c", "@APPEND@", "@MARKER@", "guarded"]
expect: [{pattern: OK}]
safety: {requires_approval: true, scopes: [staging]}
""",
    "runbooks/svc.yaml": """
kind: runbook
id: svc-errors
match: {services: [svc-prod, svc-other, PSVCSTG], symptoms: [errors]}
steps:
  - action: auto-diagnose
  - action: guarded-fix
""",
}


@pytest.fixture
def catalog_dir(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "catalog"
    marker = tmp_path / "marker.txt"
    for name, text in {"catalog.yaml": SETTINGS, **ACTIONS}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            text.replace("@PYTHON@", sys.executable)
            .replace("@APPEND@", APPEND)
            .replace("@MARKER@", str(marker)),
            "utf-8",
        )
    return root, marker


def execute(root: Path, service: str) -> Result:
    """`runbookctl simulate --execute`: commands really run where the policy allows."""
    args = ["--catalog", str(root), "--service", service, "--symptom", "errors"]
    return CliRunner().invoke(
        cli, ["simulate", *args, "--execute", "--approve", "all"], catch_exceptions=False
    )


@pytest.fixture
def catalog(catalog_dir: tuple[Path, Path]) -> Catalog:
    return load_catalog(catalog_dir[0], with_git=False)


def test_the_mapping_is_matched_like_runbooks_by_name_or_id_in_any_case(catalog: Catalog) -> None:
    upper = resolve_environment(catalog, "SVC-PROD", default_env="staging")
    assert (upper.env, upper.source) == ("prod", "services-mapping")
    assert upper.detail == ("service 'SVC-PROD' is mapped to prod under `services` (as 'svc-prod')")
    by_id = resolve_environment(catalog, "Some Name", "psvcstg", default_env="dev")
    assert (by_id.env, by_id.source) == ("staging", "services-mapping")
    assert "service id 'psvcstg'" in by_id.detail
    # the runbook matches the same spellings the mapping does
    assert catalog.match("SVC-PROD", "errors") is not None
    assert catalog.environment_for_service("SVC-PROD") == "prod"
    assert catalog.environment_for_service("x", "PsvcStg") == "staging"


def test_the_name_wins_over_the_id(catalog: Catalog) -> None:
    both = resolve_environment(catalog, "svc-prod", "PSVCSTG")
    assert both.env == "prod"


def test_unmapped_services_fall_back_to_runbook_env_else_none(catalog: Catalog) -> None:
    fallback = resolve_environment(catalog, "svc-other", default_env="staging")
    assert (fallback.env, fallback.source) == ("staging", "RUNBOOK_ENV")
    nothing = resolve_environment(catalog, "svc-other", default_env="")
    assert (nothing.env, nothing.source, nothing.known) == (None, "none", False)
    assert "RUNBOOK_ENV is not set" in nothing.detail


def test_a_production_incident_is_blocked_in_prod_never_treated_as_staging(
    catalog: Catalog,
) -> None:
    choice = resolve_environment(catalog, "SVC-PROD", default_env="staging")
    for step in catalog.match("SVC-PROD", "errors").steps:  # type: ignore[union-attr]
        decision = decide(step.action, choice.env or "", catalog.settings)
        assert decision.kind == "blocked"
        assert "not allowed in prod" in decision.reason


def test_simulate_of_a_mapped_production_service_runs_nothing(
    catalog_dir: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, marker = catalog_dir
    monkeypatch.setenv("RUNBOOK_ENV", "staging")  # what the bot had in the report
    result = execute(root, "SVC-PROD")
    assert result.exit_code == 1, result.output
    assert "environment: prod (service 'SVC-PROD' is mapped to prod" in result.output
    assert "Environment: prod" in result.output
    assert "Environment: staging" not in result.output
    assert "Decision: blocked: auto-diagnose is not allowed in prod" in result.output
    assert "needs approval" not in result.output  # no approval is offered for a blocked step
    assert not marker.exists()  # neither command ran


def test_simulate_without_any_environment_says_unknown_and_how_to_fix(
    catalog_dir: tuple[Path, Path],
) -> None:
    root, marker = catalog_dir
    result = execute(root, "svc-other")
    assert result.exit_code == 1, result.output
    assert "environment: unknown" in result.output
    assert "Environment: unknown" in result.output
    assert "Decision: blocked: the incident has no environment" in result.output
    assert (
        "To simulate it, map 'svc-other' under `services:` in the catalog settings, "
        "or pass --env ENV (or set RUNBOOK_ENV)."
    ) in result.output
    assert not marker.exists()


def test_simulate_in_staging_by_runbook_env_runs_the_automatic_step(
    catalog_dir: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, marker = catalog_dir
    monkeypatch.setenv("RUNBOOK_ENV", "staging")
    result = execute(root, "svc-other")
    assert result.exit_code == 0, result.output
    assert "environment: staging (service 'svc-other' is not under `services`" in result.output
    assert marker.read_text().splitlines() == ["auto", "guarded"]


def test_the_start_up_warning_names_every_unmapped_service(catalog: Catalog) -> None:
    assert unmapped_services(catalog, "") == ["svc-other"]
    assert unmapped_services(catalog, "staging") == []
    (warning,) = environment_warnings(catalog, "")
    assert warning.startswith("NO ENVIRONMENT for 1 service(s) of the catalog: svc-other.")
    assert "`svc-other: staging`" in warning and "or set RUNBOOK_ENV" in warning
    assert environment_warnings(catalog, "dev") == []


def test_the_bundled_catalog_maps_every_service_and_warns_about_the_catch_all() -> None:
    bundled = load_catalog(REPO / "runbooks", with_git=False)
    assert unmapped_services(bundled, "") == []
    (warning,) = environment_warnings(bundled, "")
    assert "catch-all runbook" in warning and "disk-almost-full" in warning
    assert resolve_environment(bundled, "payments").env == "staging"


def test_lint_warns_about_runbook_services_the_mapping_misses(
    catalog_dir: tuple[Path, Path],
) -> None:
    diagnostics = parse_catalog(catalog_dir[0]).diagnostics
    assert [(d.code, d.severity, d.path) for d in diagnostics] == [
        ("RB038", "warning", "$.match.services[1]")
    ]
    assert "'svc-other' is not under `services`" in diagnostics[0].message


def test_lint_says_nothing_when_the_catalog_has_no_mapping(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text("kind: catalog\nenvironments: [{name: dev}]\n", "utf-8")
    (tmp_path / "a.yaml").write_text(
        "kind: action\nid: a\ncommand: 'true'\nexpect: [{pattern: '^'}]\n", "utf-8"
    )
    (tmp_path / "r.yaml").write_text(
        "kind: runbook\nid: r\nmatch: {services: [web]}\nsteps: [{action: a}]\n", "utf-8"
    )
    assert parse_catalog(tmp_path).diagnostics == []


def test_report_environments_reads_the_catalog(
    catalog: Catalog, catalog_dir: tuple[Path, Path]
) -> None:
    rows = environments(catalog, "").as_dicts()
    assert {r["service"]: (r["environment"], r["source"]) for r in rows} == {
        "PSVCSTG": ("staging", "services-mapping"),
        "svc-other": ("unknown", "none"),
        "svc-prod": ("prod", "services-mapping"),
    }
    args = ["--catalog", str(catalog_dir[0]), "--format", "json", "--env", "dev"]
    result = CliRunner().invoke(cli, ["report", "environments", *args])
    assert result.exit_code == 0, result.output
    shown = {r["service"]: r["environment"] for r in json.loads(result.output)}
    assert shown["svc-other"] == "dev"
