"""Docs that cannot drift: the README's tables follow the code."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from bot.config import env_vars
from runbookctl.cli import cli

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text("utf-8")


def _readme_env_table() -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for line in README.splitlines():
        found = re.match(r"^\| `([A-Z_]+)` \| (.*?) \| (.*) \|$", line)
        if found:
            rows[found.group(1)] = (found.group(2).strip("` "), found.group(3))
    return rows


def test_every_setting_is_documented_with_its_default() -> None:
    table = _readme_env_table()
    for name, default, help_text in env_vars():
        assert name in table, f"{name} is missing from the README's variable table"
        assert table[name] == (default, help_text), f"README row for {name} is out of date"
    assert set(table) == {name for name, _, _ in env_vars()}, "README documents unknown variables"


def test_design_contract_variables_exist() -> None:
    names = {name for name, _, _ in env_vars()}
    for required in (
        "RUNBOOK_CATALOG",
        "RUNBOOK_DB",
        "RUNBOOK_ENV",
        "PORT",
        "SLACK_BOT_TOKEN",
        "SLACK_SIGNING_SECRET",
        "SLACK_APP_TOKEN",
        "SLACK_API_URL",
        "PAGERDUTY_WEBHOOK_SECRET",
        "PAGERDUTY_API_TOKEN",
        "PAGERDUTY_FROM",
        "PAGERDUTY_API_URL",
    ):
        assert required in names


def test_every_runbookctl_command_is_documented() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    commands = cli.list_commands(None)  # type: ignore[arg-type]
    assert {"lint", "simulate", "promote", "report", "test"} <= set(commands)
    for name in commands:
        assert f"runbookctl {name}" in README, f"`runbookctl {name}` is not in the README"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text("utf-8")
    assert "python -m pytest" in README and "python -m pytest" in ci
    assert "runbookctl simulate" in README.split("## Run the tests")[0]


def test_runbook_bot_help_names_every_setting() -> None:
    from bot.__main__ import main

    result = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    for name, _, _ in env_vars():
        if name.endswith("_REACTIONS"):
            continue  # lists: environment only
        assert f"[env {name}]" in flat, f"runbook-bot --help does not show {name}"
    assert "--catalog-commit" in flat and "--catalog-refresh" in flat and "--log-format" in flat


def test_the_kubernetes_guide_follows_the_executor_and_the_chart() -> None:
    import dataclasses

    import yaml

    from bot import kube
    from bot.catalog.model import KubernetesPlacement

    guide = (REPO / "docs" / "kubernetes.md").read_text("utf-8")
    for target_field in dataclasses.fields(KubernetesPlacement):
        if target_field.name != "kind":
            assert f"| `{target_field.name}` |" in guide, target_field.name
    for name in dir(kube):
        if name.startswith("LABEL_"):
            assert f"`{getattr(kube, name)}`" in guide, name
    # The bot's Role as documented is the chart's, rule for rule.
    template = (
        REPO / "deploy" / "helm" / "runbook-bot" / "templates" / "rbac-kubernetes.yaml"
    ).read_text("utf-8")
    chart_rules = yaml.safe_load(template.split("rules:\n", 1)[1].split("---", 1)[0])
    documented = guide.split("with exactly these rules:", 1)[1].split("```yaml\n", 1)[1]
    assert yaml.safe_load(documented.split("```", 1)[0]) == chart_rules
    for value in ("kubernetes.namespaces", "kubernetes.serviceAccounts", "serviceAccount.create"):
        assert f"`{value}" in guide, value
    # What the stand-in serves is what the guide says it serves.
    for path in (
        "/apis/batch/v1/namespaces/NS/jobs",
        "/api/v1/namespaces/NS/pods",
        "/api/v1/namespaces/NS/pods/NAME/log",
    ):
        assert f"`{path}`" in guide, path
