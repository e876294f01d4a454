"""The Grafana dashboard and the Prometheus alert rules under deploy/, and the PromQL in
docs/metrics.md: valid structure, and every query names only metrics, labels and label
values that `bot.metrics` really exposes. A renamed metric or a typo in a label value
(`result="failure"`) would otherwise leave a panel empty or an alert silent forever.

No Prometheus runs here, so the PromQL is checked by a small scanner: balanced
brackets and quotes, every `runbook_*` series, every label matcher and its values,
every `by (...)` label, every `{{ $labels.x }}` an alert template uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot import metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "runbook-bot-dashboard.json"
ALERT_RULES = REPO / "deploy" / "prometheus" / "alert-rules.yaml"
METRICS_DOC = REPO / "docs" / "metrics.md"

# Label values the bot can emit: a query filtering on anything else matches nothing.
KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "result": metrics.STEP_RESULTS,
    "decision": metrics.APPROVAL_DECISIONS,
    "source": metrics.WEBHOOK_SOURCES,
    "outcome": metrics.WEBHOOK_OUTCOMES,
    "matched": ("yes", "no"),
}
# Where one metric's label takes other values than the label's usual ones.
KNOWN_VALUES_OF: dict[tuple[str, str], tuple[str, ...]] = {
    ("runbook_outbox_sends", "result"): metrics.OUTBOX_RESULTS,
    ("runbook_inbox_failures", "source"): metrics.INBOX_SOURCES,
}
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval", "__all"}

_SERIES = re.compile(r"\b(runbook_[a-z_]+)\b\s*(\{([^}]*)\})?")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_GRAFANA_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def check_promql(expr: str, where: str) -> set[str]:
    """Problems in one PromQL expression; returns the labels its result can carry."""
    assert expr.strip(), f"{where}: empty expression"
    _check_brackets(expr, where)
    found = list(_SERIES.finditer(expr))
    assert found, f"{where}: uses no runbook-bot metric: {expr}"
    labels: set[str] = set()
    for match in found:
        name = match.group(1)
        spec = metrics.spec(name)
        assert spec is not None, f"{where}: unknown metric {name}"
        assert name in spec.series, (
            f"{where}: {name} is not a series Prometheus stores; use one of {spec.series}"
        )
        labels |= set(spec.series_labels)
        if match.group(3) is not None:
            _check_matchers(match.group(3), spec, where)
    for group in _GROUPING.finditer(expr):
        for label in filter(None, (part.strip() for part in group.group(1).split(","))):
            assert label in labels, f"{where}: `by ({label})` but no metric here has {label!r}"
    return labels


def _check_matchers(text: str, spec: metrics.MetricSpec, where: str) -> None:
    rest = text
    while rest.strip():
        matcher = _MATCHER.match(rest)
        assert matcher is not None, f"{where}: cannot read label matchers {{{text}}}"
        label, op, value = matcher.groups()
        assert label in spec.series_labels, (
            f"{where}: {spec.name} has no label {label!r} (it has {spec.series_labels})"
        )
        known = KNOWN_VALUES_OF.get((spec.name, label), KNOWN_VALUES.get(label))
        if known is not None and "$" not in value:
            values = value.split("|") if op in ("=~", "!~") else [value]
            for one in values:
                assert one in known, f"{where}: {label}={one!r} never occurs; the bot emits {known}"
        rest = rest[matcher.end() :]
        if rest.startswith(","):
            rest = rest[1:]


def _check_brackets(expr: str, where: str) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = False
    for char in expr:
        if char == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack[-1] == pairs[char], f"{where}: unbalanced {char!r} in {expr}"
            stack.pop()
    assert not in_string, f"{where}: unterminated string in {expr}"
    assert not stack, f"{where}: unclosed {stack[-1]!r} in {expr}"


# --- Grafana ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())  # panels inside a collapsed row


def test_dashboard_has_the_structure_grafana_imports(dashboard: dict[str, Any]) -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in dashboard, f"dashboard has no {key!r}"
    assert dashboard["uid"] == "runbook-bot"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    assert dashboard.get("id") is None, "an exported id would clash on import"
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        h, w, x, y = (grid[k] for k in ("h", "w", "x", "y"))
        assert all(isinstance(v, int) and v >= 0 for v in (h, w, x, y)), panel["title"]
        assert h >= 1 and 1 <= w <= 24 and x + w <= 24, f"{panel['title']} leaves the grid"
        if panel["type"] == "row":
            assert (h, w, x) == (1, 24, 0), f"row {panel['title']} spans the width"
        for row in range(y, y + h):
            for column in range(x, x + w):
                other = taken.setdefault((row, column), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_dashboard_queries_name_only_real_metrics(dashboard: dict[str, Any]) -> None:
    declared = {v["name"] for v in dashboard["templating"]["list"]}
    used: set[str] = set()
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        where = f"panel {panel['title']!r}"
        assert panel["type"] in {"stat", "timeseries", "table", "bargauge", "gauge"}, where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("description"), f"{where} says what it shows"
        targets = panel["targets"]
        assert targets, f"{where} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refId"
        for target in targets:
            labels = check_promql(target["expr"], f"{where} {target['refId']}")
            for legend_label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert legend_label in labels, f"{where}: legend uses unknown {legend_label}"
            used |= set(_GRAFANA_VAR.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert found, f"variable {variable['name']}: {query}"
            labels = check_promql(found.group(1), f"variable {variable['name']}")
            assert found.group(2) in labels
            used |= set(_GRAFANA_VAR.findall(query))
    assert used - GRAFANA_BUILTINS <= declared, f"undeclared variables {used - declared}"
    assert declared <= used | {"datasource"}, f"unused variables {declared - used}"


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in all_panels(dashboard) for t in p.get("targets", ()))
    for spec in metrics.SPECS:
        assert any(series in exprs for series in spec.series), f"no panel shows {spec.name}"


# --- Prometheus alert rules ------------------------------------------------------------


@pytest.fixture(scope="module")
def rule_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERT_RULES.read_text("utf-8"))
    return loaded


def alerts(rule_file: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rule_file["groups"] for rule in group["rules"]]


def test_alert_rules_have_the_structure_prometheus_loads(rule_file: dict[str, Any]) -> None:
    assert set(rule_file) == {"groups"}
    names = [group["name"] for group in rule_file["groups"]]
    assert names and len(names) == len(set(names))
    for group in rule_file["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group["name"]
        assert group["rules"], f"group {group['name']} is empty"
        for rule in group["rules"]:
            assert set(rule) <= {
                "alert",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            }, rule
            assert re.fullmatch(r"Runbook[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
            assert isinstance(rule["expr"], str)
            if "for" in rule:
                assert re.fullmatch(r"[0-9]+(ms|s|m|h|d|w|y)", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    alert_names = [rule["alert"] for rule in alerts(rule_file)]
    assert len(alert_names) == len(set(alert_names))


def test_alert_rules_name_only_real_metrics_and_labels(rule_file: dict[str, Any]) -> None:
    for rule in alerts(rule_file):
        where = f"alert {rule['alert']}"
        check_promql(rule["expr"], where)
        groupings = _GROUPING.findall(rule["expr"])
        kept = {label.strip() for g in groupings for label in g.split(",") if label.strip()}
        if not groupings:  # no aggregation: the series keep their own labels
            kept = check_promql(rule["expr"], where)
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in kept, f"{where}: annotation uses {label}, which the expr drops"


def test_alerts_cover_what_the_issue_asks_for(rule_file: dict[str, Any]) -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alerts(rule_file)}

    def alerting_on(pattern: str) -> list[str]:
        return [name for name, expr in exprs.items() if re.search(pattern, expr)]

    assert alerting_on(r'runbook_steps_executed_total\{result=~"failed'), "an action failing"
    assert alerting_on(r'runbook_approvals_total\{decision="expired"'), "approvals expiring"
    assert alerting_on(r'runbook_webhook_deliveries_total\{outcome="rejected"'), "rejections"


def test_every_alert_is_documented(rule_file: dict[str, Any]) -> None:
    doc = METRICS_DOC.read_text("utf-8")
    for rule in alerts(rule_file):
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is missing from docs/metrics.md"


# --- docs ------------------------------------------------------------------------------


def test_promql_examples_in_the_docs_are_valid() -> None:
    blocks = re.findall(r"```promql\n(.*?)```", METRICS_DOC.read_text("utf-8"), re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks, 1):
        check_promql(block, f"docs/metrics.md example {i}")
    joined = "\n".join(blocks)
    # the two examples the issue asks for
    assert re.search(r'result="success".*\n/\n.*runbook_steps_executed_total\[', joined)
    assert 'decision="rejected"' in joined


@pytest.mark.parametrize(
    "bad",
    [
        "sum(rate(runbook_steps_executed[5m]))",  # family name, not a stored series
        'sum(rate(runbook_steps_executed_total{result="failure"}[5m]))',
        "sum by (incident) (rate(runbook_steps_executed_total[5m]))",
        'sum(rate(runbook_step_duration_seconds_bucket{service="x"}[5m]))',
        'sum(rate(runbook_approvals_total{decision=~"approved|denied"}[5m]))',
        "sum(rate(runbook_steps_executed_total[5m])",
    ],
)
def test_the_checker_catches_broken_queries(bad: str) -> None:
    with pytest.raises(AssertionError):
        check_promql(bad, "example")
