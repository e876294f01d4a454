"""The catalog loader, models and matcher, as the bot and runbookctl use them."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from bot.catalog import (
    Action,
    Catalog,
    Expectation,
    Runbook,
    load_catalog,
    parse_catalog,
)
from bot.catalog.model import OnFailure
from bot.errors import CatalogError

BUNDLED = Path(__file__).resolve().parent.parent / "runbooks"

SETTINGS = """\
kind: catalog
environments:
  - name: dev
  - name: staging
  - name: prod
    production: true
"""

# The shape our users' existing runbooks use (DESIGN.md section 2): accepted unchanged.
CLEAR_CACHE = """\
id: clear-cache
command: "redis-cli FLUSHDB"
expect:
  - pattern: "OK"
  - {pattern: "(empty list or set)", allow_failure: true}
safety:
  requires_approval: true
  scopes: ["staging"]
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), "utf-8")
    return root


def load(root: Path, files: dict[str, str]) -> Catalog:
    return load_catalog(write(root, {"catalog.yaml": SETTINGS, **files}), with_git=False)


def test_users_clear_cache_snippet_loads_unchanged(tmp_path: Path) -> None:
    catalog = load(tmp_path, {"actions/clear-cache.yaml": CLEAR_CACHE})
    action = catalog.actions["clear-cache"]
    assert action.command == "redis-cli FLUSHDB"
    assert action.expect == (
        Expectation("OK"),
        Expectation("(empty list or set)", allow_failure=True),
    )
    assert action.safety.requires_approval is True
    assert action.safety.scopes == ("staging",)
    assert action.safety.promotions == ()
    assert not action.shell
    assert action.location.file.endswith("clear-cache.yaml")
    # the allowed-failure pattern is a regex: a group around the literal words
    assert action.expect[1].regex.search("(empty list or set)")


def test_the_snippet_is_an_action_wherever_it_lives(tmp_path: Path) -> None:
    catalog = load(tmp_path, {"anywhere/clear-cache.yml": CLEAR_CACHE})
    assert list(catalog.actions) == ["clear-cache"]


def test_missing_safety_means_approval_and_only_lower_environments(tmp_path: Path) -> None:
    catalog = load(
        tmp_path,
        {
            "actions/restart.yaml": """\
                id: restart
                command: ["systemctl", "restart", "nginx"]
                expect: [{pattern: "^$"}]
            """
        },
    )
    safety = catalog.actions["restart"].safety
    assert safety.requires_approval is True
    assert safety.scopes == ("dev", "staging")
    assert not any(catalog.settings.is_production(env) for env in safety.scopes)
    assert catalog.actions["restart"].command == ("systemctl", "restart", "nginx")


def test_defaults_without_settings_document(tmp_path: Path) -> None:
    write(tmp_path, {"actions/clear-cache.yaml": CLEAR_CACHE})
    parsed = parse_catalog(tmp_path)
    assert [(d.code, d.severity) for d in parsed.diagnostics] == [("RB032", "warning")]
    catalog = load_catalog(tmp_path, with_git=False)  # a warning does not stop loading
    assert catalog.settings.environment_names == ("dev", "staging", "prod")
    assert catalog.settings.lower_environments == ("dev", "staging")


def test_errors_carry_file_line_column_and_json_path(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "catalog.yaml": SETTINGS,
            "actions/clear-cache.yaml": CLEAR_CACHE,
            "runbooks/payments.yaml": """\
                kind: runbook
                id: payments
                match: {services: [payments]}
                steps:
                  - action: clear-cache
                  - action: clear-cahce
                    on_failure: continue
            """,
        },
    )
    with pytest.raises(CatalogError) as raised:
        load_catalog(tmp_path, with_git=False)
    (diagnostic,) = raised.value.diagnostics
    assert Path(diagnostic.file).resolve() == (tmp_path / "runbooks/payments.yaml").resolve()
    assert (diagnostic.line, diagnostic.col) == (6, 13)
    assert diagnostic.path == "$.steps[1].action"
    assert (diagnostic.code, diagnostic.rule) == ("RB021", "unknown-action")
    assert "did you mean 'clear-cache'?" in diagnostic.fix
    assert "payments.yaml:6:13" in str(raised.value)
    assert "runbookctl lint" in str(raised.value)


def test_schema_errors_point_at_the_key(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "catalog.yaml": SETTINGS,
            "actions/a.yaml": """\
                id: a
                command: "true"
                expect: [{pattern: "^$"}]
                safety:
                  requires_aproval: false
            """,
        },
    )
    with pytest.raises(CatalogError) as raised:
        load_catalog(tmp_path, with_git=False)
    (diagnostic,) = raised.value.diagnostics
    assert (diagnostic.code, diagnostic.line, diagnostic.col) == ("RB010", 5, 3)
    assert diagnostic.path == "$.safety.requires_aproval"
    assert "requires_approval" in diagnostic.fix


RUNBOOKS = {
    "actions/check.yaml": """\
        id: check
        command: "curl --silent http://localhost/health"
        params: {window: 5m}
        expect: [{pattern: ok}]
    """,
    "actions/undo.yaml": """\
        id: undo
        command: "kubectl rollout undo deployment/api"
        expect: [{pattern: "rolled back"}]
    """,
    "runbooks/payments-5xx.yaml": """\
        kind: runbook
        id: payments-5xx
        match:
          services: [payments, PAYMNTS]
          symptoms: ["elevated 5xx", '5\\d\\d rate']
        steps:
          - action: check
            params: {window: 1m}
          - id: recheck
            action: check
            when: "steps['check'].status == 'success'"
            on_failure: {rollback: undo}
          - id: inline
            command: ["echo", "{{ incident.title }}"]
            expect: [{pattern: "."}]
    """,
    "runbooks/payments-any.yaml": """\
        kind: runbook
        id: payments-any
        match: {services: [payments]}
        steps:
          - action: check
    """,
    "runbooks/payments-urgent.yaml": """\
        kind: runbook
        id: payments-urgent
        match: {services: [payments], symptoms: ["outage"], priority: 5}
        steps:
          - action: undo
    """,
    "runbooks/any-5xx.yaml": """\
        kind: runbook
        id: any-5xx
        match: {services: ["*"], symptoms: ["elevated 5xx", "outage"], priority: 9}
        steps:
          - action: check
    """,
    "runbooks/web-a.yaml": """\
        kind: runbook
        id: web-b
        match: {services: [web], symptoms: ["5xx"]}
        steps:
          - action: check
    """,
    "runbooks/web-b.yaml": """\
        kind: runbook
        id: web-a
        match: {services: [web], symptoms: ["elevated 5xx"]}
        steps:
          - action: check
    """,
}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load(tmp_path, RUNBOOKS)


def matched(catalog: Catalog, service: str, symptom: str = "", **kwargs: str) -> str | None:
    runbook = catalog.match(service, symptom, **kwargs)
    return runbook.id if runbook else None


def test_matcher_symptoms_and_catch_all(catalog: Catalog) -> None:
    assert matched(catalog, "payments", "Payments API elevated 5xx") == "payments-5xx"
    assert matched(catalog, "payments", "503 rate above threshold") == "payments-5xx"
    assert matched(catalog, "PAYMENTS", "ELEVATED 5XX") == "payments-5xx"  # case-insensitive
    assert matched(catalog, "payments", "disk full") == "payments-any"  # catch-all
    assert matched(catalog, "payments", "", details='{"error": "elevated 5xx"}') == ("payments-5xx")
    assert matched(catalog, "billing", "disk full") is None


def test_matcher_service_id(catalog: Catalog) -> None:
    assert matched(catalog, "Payments API", "elevated 5xx", service_id="PAYMNTS") == (
        "payments-5xx"
    )
    assert matched(catalog, "Payments API", "elevated 5xx", service_id="paymnts") == (
        "payments-5xx"
    )
    assert matched(catalog, "Payments API", "elevated 5xx") == "any-5xx"


def test_matcher_tie_breaks(catalog: Catalog) -> None:
    # 1. naming the service beats '*', even against a higher priority
    assert matched(catalog, "payments", "outage and elevated 5xx") == "payments-urgent"
    assert matched(catalog, "checkout", "outage") == "any-5xx"
    # 2. higher priority wins among runbooks naming the service
    assert matched(catalog, "payments", "outage") == "payments-urgent"
    # 3. a matched symptom beats a catch-all of the same priority
    assert matched(catalog, "payments", "elevated 5xx") == "payments-5xx"
    # 4. the longer matched text wins: "elevated 5xx" over "5xx"
    assert matched(catalog, "web", "elevated 5xx") == "web-a"
    assert matched(catalog, "web", "5xx") == "web-b"


def test_matcher_id_order_is_the_last_tie_break(tmp_path: Path) -> None:
    same = "match: {services: [web]}\nsteps:\n  - action: check\n"
    catalog = load(
        tmp_path,
        {
            "actions/check.yaml": RUNBOOKS["actions/check.yaml"],
            "runbooks/z.yaml": "kind: runbook\nid: zulu\n" + same,
            "runbooks/a.yaml": "kind: runbook\nid: alpha\n" + same,
        },
    )
    assert matched(catalog, "web") == "alpha"


def test_next_steps(catalog: Catalog) -> None:
    steps = catalog.next_steps("payments", "Payments API elevated 5xx")
    assert [s.id for s in steps] == ["check", "recheck", "inline"]
    check, recheck, inline = steps
    assert check.resolved_params == {"window": "1m"}  # the step overrides the default
    assert recheck.resolved_params == {"window": "5m"}
    assert recheck.when == "steps['check'].status == 'success'"
    assert recheck.on_failure.mode == "rollback"
    assert recheck.on_failure.rollback is catalog.actions["undo"]
    assert check.on_failure == OnFailure("stop")
    assert inline.action.inline and inline.action.id == "inline"
    assert inline.action.safety.requires_approval
    assert catalog.next_steps("billing", "anything") == ()


def test_models_are_frozen(catalog: Catalog) -> None:
    action = catalog.actions["check"]
    runbook = catalog.runbooks[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        action.command = "rm -rf /"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        action.safety.requires_approval = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        runbook.steps = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.settings.channel = "#elsewhere"  # type: ignore[misc]
    assert isinstance(runbook.steps, tuple) and isinstance(runbook, Runbook)
    assert isinstance(action, Action)


def test_bundled_catalog_loads(bundled_catalog_dir: Path) -> None:
    catalog = load_catalog(bundled_catalog_dir, with_git=False)
    assert matched(catalog, "payments", "Payments API elevated 5xx") == "payments-elevated-5xx"
    assert [s.id for s in catalog.next_steps("payments", "elevated 5xx")] == [
        "check-error-rate",
        "check-redis-memory",
        "clear-cache",
        "verify-error-rate",
    ]


# --- versioning: the Git commit the catalog came from ---------------------------------

GIT = shutil.which("git")


def git(cwd: Path, *args: str) -> str:
    assert GIT is not None
    result = subprocess.run(
        [GIT, "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_commit_is_recorded(tmp_path: Path) -> None:
    write(tmp_path, {"catalog.yaml": SETTINGS, "actions/clear-cache.yaml": CLEAR_CACHE})
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "catalog")
    head = git(tmp_path, "rev-parse", "HEAD")

    catalog = load_catalog(tmp_path)
    assert (catalog.commit, catalog.dirty) == (head, False)
    assert catalog.version == head[:12]

    (tmp_path / "actions/clear-cache.yaml").write_text(CLEAR_CACHE + "timeout: 5s\n", "utf-8")
    dirty = load_catalog(tmp_path)
    assert (dirty.commit, dirty.dirty) == (head, True)
    assert dirty.version == f"{head[:12]}-dirty"


def test_commit_outside_git_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, {"catalog.yaml": SETTINGS, "actions/clear-cache.yaml": CLEAR_CACHE})
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    catalog = load_catalog(tmp_path)
    assert (catalog.commit, catalog.version) == (None, "unversioned")
    monkeypatch.setenv("RUNBOOK_CATALOG_COMMIT", "0123456789abcdef0123")
    assert load_catalog(tmp_path).version == "0123456789ab"
