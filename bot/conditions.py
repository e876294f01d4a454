"""`when:` conditions: a small, safe subset of Python expressions.

Runbook authors write conditions such as::

    steps['clear-cache'].status in ('success', 'allowed_failure')
    incident.urgency == 'high' and incident.details.namespace != 'kube-system'

Only literals, names (`incident`, `steps`, `params`), attribute and subscript lookups
into those, comparisons, `and`/`or`/`not` and tuples/lists are allowed. No calls, no
dunder attributes, no comprehensions: a catalog file can never run code through `when`.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

ALLOWED_NAMES = frozenset({"incident", "steps", "params"})


class ConditionError(ValueError):
    pass


_ALLOWED_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
    ast.Is,
    ast.IsNot,
    ast.Name,
    ast.Load,
    ast.Attribute,
    ast.Subscript,
    ast.Constant,
    ast.Tuple,
    ast.List,
)


def parse(expression: str) -> ast.Expression:
    """Parse and vet a condition; raise `ConditionError` saying what is not allowed."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ConditionError(f"not a valid expression: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        # CPython's parser gives up on very deep nesting with these, not SyntaxError.
        raise ConditionError("not a valid expression: nested too deeply") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ConditionError(f"{type(node).__name__} is not allowed in a condition")
        if isinstance(node, ast.Name) and node.id not in ALLOWED_NAMES:
            raise ConditionError(
                f"unknown name {node.id!r}: use {', '.join(sorted(ALLOWED_NAMES))}"
            )
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ConditionError(f"attribute {node.attr!r} is not allowed")
    return tree


def referenced_steps(expression: str) -> list[str]:
    """Step ids a condition reads through `steps['id']`."""
    found: list[str] = []
    for node in ast.walk(parse(expression)):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "steps"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            found.append(node.slice.value)
    return found


class _Missing:
    """What a lookup of something absent gives: compares unequal to everything."""

    def __repr__(self) -> str:
        return "missing"


MISSING = _Missing()


def evaluate(expression: str, names: Mapping[str, Any]) -> bool:
    tree = parse(expression)
    try:
        return bool(_eval(tree.body, names))
    except RecursionError:
        raise ConditionError("the condition is nested too deeply to evaluate") from None


def _lookup(container: Any, key: Any) -> Any:
    if isinstance(container, Mapping):
        return container.get(key, MISSING)
    if isinstance(container, list | tuple) and isinstance(key, int):
        return container[key] if -len(container) <= key < len(container) else MISSING
    return MISSING


def _eval(node: ast.AST, names: Mapping[str, Any]) -> Any:
    match node:
        case ast.Constant(value=value):
            return value
        case ast.Name(id=name):
            return names.get(name, MISSING)
        case ast.Attribute(value=inner, attr=attr):
            return _lookup(_eval(inner, names), attr)
        case ast.Subscript(value=inner, slice=key):
            return _lookup(_eval(inner, names), _eval(key, names))
        case ast.Tuple(elts=elts) | ast.List(elts=elts):
            return tuple(_eval(e, names) for e in elts)
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            return not _eval(operand, names)
        case ast.BoolOp(op=ast.And(), values=values):
            return all(_eval(v, names) for v in values)
        case ast.BoolOp(op=ast.Or(), values=values):
            return any(_eval(v, names) for v in values)
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            current = _eval(left, names)
            for op, right_node in zip(ops, comparators, strict=True):
                right = _eval(right_node, names)
                if not _compare(op, current, right):
                    return False
                current = right
            return True
    raise ConditionError(f"{type(node).__name__} is not allowed in a condition")


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    try:
        match op:
            case ast.Eq():
                return bool(left == right)
            case ast.NotEq():
                return bool(left != right)
            case ast.In():
                return left in right
            case ast.NotIn():
                return left not in right
            case ast.Is():
                return left is right
            case ast.IsNot():
                return left is not right
            case ast.Lt():
                return bool(left < right)
            case ast.LtE():
                return bool(left <= right)
            case ast.Gt():
                return bool(left > right)
            case ast.GtE():
                return bool(left >= right)
    except TypeError:
        return False
    return False
