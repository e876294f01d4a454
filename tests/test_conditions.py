"""`when:` conditions: what authors write works, nothing else can run."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.conditions import ConditionError, evaluate, parse, referenced_steps

NAMES: dict[str, Any] = {
    "incident": {
        "urgency": "high",
        "service": "payments",
        "details": {"namespace": "payments", "replicas": 3, "tags": ["a", "b"]},
    },
    "steps": {
        "check": {"status": "success", "exit_code": 0, "output": "rate => 0.5"},
        "clear-cache": {"status": "allowed_failure", "exit_code": 1, "output": ""},
    },
    "params": {"window": "5m", "limit": 10, "dry": False},
}


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("steps['clear-cache'].status in ('success', 'allowed_failure')", True),
        ("steps['check'].status == 'success'", True),
        ("steps['check'].exit_code != 0", False),
        ("incident.urgency == 'high' and incident.details.namespace != 'kube-system'", True),
        ("incident.urgency == 'low' or params.limit >= 10", True),
        ("not params.dry", True),
        ("incident.details.replicas > 2 and incident.details.replicas <= 3", True),
        ("1 < incident.details.replicas < 3", False),  # chained comparison
        ("'a' in incident.details.tags", True),
        ("incident.details.tags[1] == 'b'", True),
        ("incident.details.tags[5] == 'b'", False),  # out of range: missing
        ("'rate' in steps['check'].output", True),
        ("params.window in ['5m', '1m']", True),
        ("params.dry is False", True),
        ("params.nothing is None", False),  # missing is not None
        # missing things compare unequal to everything and never raise
        ("steps['never-ran'].status == 'success'", False),
        ("steps['never-ran'].status != 'success'", True),
        ("incident.details.missing.deeper == 1", False),
        ("incident.urgency > 3", False),  # str vs int: false, not an error
        ("incident.details.keys == 1", False),  # no method access through attributes
    ],
)
def test_evaluate(expression: str, value: bool) -> None:
    assert evaluate(expression, NAMES) is value


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("__import__('os').system('id')", "Call is not allowed"),
        ("incident.__class__", "attribute '__class__' is not allowed"),
        ("incident._private", "attribute '_private' is not allowed"),
        ("os.path", "unknown name 'os'"),
        ("[x for x in steps]", "ListComp is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("params.limit + 1 > 2", "BinOp is not allowed"),
        ("incident.title if True else 1", "IfExp is not allowed"),
        ("{'a': 1}", "Dict is not allowed"),
        ("(x := 1)", "NamedExpr is not allowed"),
        ("f'{incident}'", "JoinedStr is not allowed"),
        ("incident.urgency ==", "not a valid expression"),
        ("", "not a valid expression"),
        ("a\x00", "not a valid expression"),
    ],
)
def test_refused(expression: str, says: str) -> None:
    with pytest.raises(ConditionError, match=says.replace("(", r"\(").replace("[", r"\[")):
        evaluate(expression, NAMES)


@pytest.mark.parametrize(
    "expression",
    [
        "not " * 200_000 + "True",  # the parser runs out of memory or stack
        "incident." + "a." * 100_000 + "b",
        "not " * 3_000 + "True",  # parses, but deeper than the evaluator's stack
        "(" * 300 + "1" + ")" * 300,
    ],
)
def test_deep_nesting_is_a_condition_error(expression: str) -> None:
    with pytest.raises(ConditionError):
        evaluate(expression, NAMES)


def test_referenced_steps() -> None:
    assert referenced_steps(
        "steps['a'].status == 'success' and steps[\"b\"].exit_code == 0 or incident.x"
    ) == ["a", "b"]
    assert referenced_steps("incident.urgency == 'high'") == []


def test_parse_returns_a_vetted_tree() -> None:
    assert parse("incident.urgency == 'high'").body is not None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_value_or_a_condition_error(text: str) -> None:
    try:
        result = evaluate(text, NAMES)
    except ConditionError:
        return
    assert isinstance(result, bool)


_atoms = st.sampled_from(
    [
        "incident.urgency",
        "incident.details.replicas",
        "steps['check'].status",
        "steps['nope'].output",
        "params.limit",
        "'high'",
        "3",
        "None",
        "('success', 'failed')",
    ]
)
_ops = st.sampled_from(["==", "!=", "<", ">=", "in", "not in", "is", "is not"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_atoms, _ops, _atoms), min_size=1, max_size=4), st.booleans())
def test_generated_comparisons_never_raise(
    parts: list[tuple[str, str, str]], use_and: bool
) -> None:
    joiner = " and " if use_and else " or "
    expression = joiner.join(f"{a} {op} {b}" for a, op, b in parts)
    assert isinstance(evaluate(expression, NAMES), bool)
