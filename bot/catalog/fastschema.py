"""A validator generated from the catalog's JSON Schema: the verdict only, fast.

Almost every catalog document is valid, and jsonschema spends most of its time walking
its own machinery (`descend`, `evolve`, `$ref` lookups) to say so. This module turns
``schema.json`` into plain Python functions, one per subschema, once per process, and
those answer "valid or not" about two orders of magnitude faster. Only documents they
reject go through jsonschema, whose errors name the keywords as written and which the
loader turns into messages.

``schema.json`` stays the single source of truth: nothing here restates the format. The
generator understands the keywords the schema uses, with jsonschema's semantics (type
checks that tell ``True`` from ``1``, ``pattern`` as ``re.search``, ``integer`` accepting
``2.0``); a keyword it does not know raises `Unsupported`, and the loader then uses
jsonschema for that kind, so a schema change can never make the fast path wrong, only
slower. tests/test_lint.py checks both verdicts agree on generated documents and on
every document of the lint cases.

One rewrite makes the schema compilable: ``unevaluatedProperties: false`` beside
``properties`` and ``allOf: [{$ref}]`` becomes ``additionalProperties: false`` over the
union of those properties. It is applied only where it keeps the verdict (no other
keyword there can mark a property as evaluated), and refused otherwise.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Callable
from typing import Any

Validator = Callable[[Any], bool]

# Keywords that only annotate: they never change a verdict.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples"}
)
_ANNOTATING = frozenset(
    {
        "properties",
        "patternProperties",
        "additionalProperties",
        "unevaluatedProperties",
        "allOf",
        "anyOf",
        "oneOf",
        "$ref",
        "$dynamicRef",
        "if",
        "dependentSchemas",
    }
)
_DEFS = "#/$defs/"


class Unsupported(Exception):
    """The schema uses something the generator does not translate."""


def _annotates(subschema: Any) -> bool:
    """Whether `subschema` can mark properties as evaluated (`not` never does)."""
    return isinstance(subschema, dict) and bool(_ANNOTATING & subschema.keys())


def closed_equivalent(sub: Any, defs: dict[str, Any]) -> dict[str, Any] | None:
    """`sub` with `unevaluatedProperties: false` as `additionalProperties`, if equivalent."""
    if not isinstance(sub, dict) or sub.get("unevaluatedProperties") is not False:
        return None
    if _annotates(
        {
            k: v
            for k, v in sub.items()
            if k not in ("properties", "allOf", "oneOf", "anyOf", "unevaluatedProperties")
        }
    ):
        return None
    if any(_annotates(branch) for key in ("oneOf", "anyOf") for branch in sub.get(key, ())):
        return None
    names: dict[str, Any] = dict(sub.get("properties", {}))
    for part in sub.get("allOf", ()):
        ref = part.get("$ref", "") if isinstance(part, dict) else ""
        if set(part) != {"$ref"} or not ref.startswith(_DEFS):
            return None
        target = defs.get(ref.removeprefix(_DEFS))
        if not isinstance(target, dict):
            return None
        if _annotates({k: v for k, v in target.items() if k != "properties"}):
            return None
        for name in target.get("properties", {}):
            names.setdefault(name, True)  # its value is checked by the allOf already
    closed = {k: v for k, v in sub.items() if k != "unevaluatedProperties"}
    closed["properties"] = names
    closed["additionalProperties"] = False
    return closed


# --- jsonschema's type checks ------------------------------------------------------------


def _number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _integer(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


_TYPES = {
    "object": "isinstance({x}, dict)",
    "array": "isinstance({x}, list)",
    "string": "isinstance({x}, str)",
    "boolean": "isinstance({x}, bool)",
    "null": "{x} is None",
    "number": "_number({x})",
    "integer": "_integer({x})",
}


class _Generator:
    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = {name: closed_equivalent(sub, defs) or sub for name, sub in defs.items()}
        self.functions: list[str] = []
        self.constants: dict[str, Any] = {}
        self.by_def: dict[str, str] = {}
        self.count = 0

    def constant(self, value: Any) -> str:
        name = f"_c{len(self.constants)}"
        self.constants[name] = value
        return name

    def ref(self, ref: Any) -> str:
        if not isinstance(ref, str) or not ref.startswith(_DEFS):
            raise Unsupported(f"$ref {ref!r}")
        name = ref.removeprefix(_DEFS)
        if name not in self.defs:
            raise Unsupported(f"$ref to a missing definition {name!r}")
        if name not in self.by_def:
            function = f"_def_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
            self.by_def[name] = function  # before the body: definitions may recurse
            self.function(self.defs[name], function)
        return self.by_def[name]

    def subschema(self, sub: Any) -> str:
        if sub is True:
            return "_always"
        if sub is False:
            return "_never"
        if isinstance(sub, dict) and sub.keys() - _ANNOTATIONS == {"$ref"}:
            return self.ref(sub["$ref"])
        self.count += 1
        return self.function(sub, f"_s{self.count}")

    def function(self, sub: Any, name: str) -> str:
        if not isinstance(sub, dict):
            raise Unsupported(f"schema {sub!r}")
        self.functions.append(f"def {name}(x):\n    return {self.expression(sub)}\n")
        return name

    def expression(self, sub: dict[str, Any]) -> str:
        unknown = sub.keys() - _ANNOTATIONS - _KEYWORDS
        if unknown:
            raise Unsupported(", ".join(sorted(unknown)))
        checks: list[str] = []
        types: list[str] = []
        if "type" in sub:
            types = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
            if not types or any(t not in _TYPES for t in types):
                raise Unsupported(f"type {sub['type']!r}")
            checks.append("(" + " or ".join(_TYPES[t].format(x="x") for t in types) + ")")
        # With one type, the checks of that type need no guard: the type check came first.
        known = {"integer": "number"}.get(types[0], types[0]) if len(types) == 1 else None
        if "const" in sub:
            checks.append(self.equals([sub["const"]]))
        if "enum" in sub:
            checks.append(self.equals(sub["enum"]))
        for type_name, keywords in (
            ("object", self.object_checks(sub)),
            ("array", self.array_checks(sub)),
            ("string", self.string_checks(sub)),
            ("number", self.number_checks(sub)),
        ):
            if keywords and type_name == known:
                checks.extend(keywords)
            elif keywords:
                guard = _TYPES[type_name].format(x="x")
                checks.append(f"(not {guard} or ({' and '.join(keywords)}))")
        if "$ref" in sub:
            checks.append(f"{self.ref(sub['$ref'])}(x)")
        for part in sub.get("allOf", ()):
            checks.append(f"{self.subschema(part)}(x)")
        if "anyOf" in sub:
            checks.append("(" + " or ".join(f"{self.subschema(p)}(x)" for p in sub["anyOf"]) + ")")
        if "oneOf" in sub:
            branches = " + ".join(f"{self.subschema(p)}(x)" for p in sub["oneOf"])
            checks.append(f"({branches}) == 1")
        if "not" in sub:
            checks.append(f"not {self.subschema(sub['not'])}(x)")
        return " and ".join(checks) or "True"

    def equals(self, values: list[Any]) -> str:
        # jsonschema's `equal` compares strings with ==; other values would need its
        # care for True vs 1, which this schema never asks for.
        if not values or not all(isinstance(v, str) for v in values):
            raise Unsupported(f"const/enum of {values!r}")
        return f"(isinstance(x, str) and x in {self.constant(frozenset(values))})"

    def object_checks(self, sub: dict[str, Any]) -> list[str]:
        checks = [f"{name!r} in x" for name in sub.get("required", ())]
        properties: dict[str, Any] = sub.get("properties", {})
        for name, value in properties.items():
            if value is not True:
                checks.append(f"({name!r} not in x or {self.subschema(value)}(x[{name!r}]))")
        if "patternProperties" in sub:
            raise Unsupported("patternProperties")
        additional = sub.get("additionalProperties", True)
        if additional is False:
            checks.append(f"x.keys() <= {self.constant(frozenset(properties))}")
        elif additional is not True:
            known = self.constant(frozenset(properties))
            function = self.subschema(additional)
            checks.append(f"all({function}(v) for k, v in x.items() if k not in {known})")
        if "propertyNames" in sub:
            checks.append(f"all({self.subschema(sub['propertyNames'])}(k) for k in x)")
        if "unevaluatedProperties" in sub:
            raise Unsupported("unevaluatedProperties (no equivalent rewrite)")
        return checks

    def array_checks(self, sub: dict[str, Any]) -> list[str]:
        checks: list[str] = []
        if "items" in sub and sub["items"] is not True:
            checks.append(f"all({self.subschema(sub['items'])}(v) for v in x)")
        if "minItems" in sub:
            checks.append(f"len(x) >= {int(sub['minItems'])}")
        if sub.get("uniqueItems") is True:
            # Only for items that must be strings (checked just before), where uniqueness
            # is plain set semantics; jsonschema's rules for 1 vs True are not needed.
            if not self.strings_only(sub.get("items")):
                raise Unsupported("uniqueItems over items that are not strings")
            checks.append("len(set(x)) == len(x)")
        return checks

    def strings_only(self, items: Any) -> bool:
        while isinstance(items, dict) and "$ref" in items and "type" not in items:
            items = self.defs.get(str(items["$ref"]).removeprefix(_DEFS))
        return isinstance(items, dict) and items.get("type") == "string"

    def string_checks(self, sub: dict[str, Any]) -> list[str]:
        checks: list[str] = []
        if "minLength" in sub:
            checks.append(f"len(x) >= {int(sub['minLength'])}")
        if "pattern" in sub:
            checks.append(f"{self.constant(re.compile(sub['pattern']))}.search(x) is not None")
        return checks

    def number_checks(self, sub: dict[str, Any]) -> list[str]:
        checks: list[str] = []
        if "minimum" in sub:
            checks.append(f"x >= {self.number(sub['minimum'])}")
        if "exclusiveMinimum" in sub:
            checks.append(f"x > {self.number(sub['exclusiveMinimum'])}")
        if "maximum" in sub:
            checks.append(f"x <= {self.number(sub['maximum'])}")
        return checks

    def number(self, value: Any) -> str:
        if not _number(value):
            raise Unsupported(f"bound {value!r}")
        return repr(value)


_KEYWORDS = frozenset(
    {
        "type",
        "const",
        "enum",
        "required",
        "properties",
        "patternProperties",
        "additionalProperties",
        "propertyNames",
        "unevaluatedProperties",
        "items",
        "minItems",
        "uniqueItems",
        "minLength",
        "pattern",
        "minimum",
        "exclusiveMinimum",
        "maximum",
        "$ref",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
    }
)


def generate(defs: dict[str, Any], kinds: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """Python source defining `valid_<kind>(x)` for each kind, and the constants it uses.

    Raises `Unsupported` when the schema uses a keyword (or a form of one) that the
    generator does not translate with jsonschema's exact semantics.
    """
    generator = _Generator(defs)
    exported = [f"valid_{kind} = {generator.ref(_DEFS + kind)}\n" for kind in kinds]
    return "\n".join([*generator.functions, *exported]), generator.constants


@functools.cache
def compiled(schema_text: str, kinds: tuple[str, ...]) -> dict[str, Validator]:
    """kind -> validator for the `$defs` of the schema in `schema_text` (JSON)."""
    import json

    defs = json.loads(schema_text)["$defs"]
    source, constants = generate(defs, kinds)
    namespace: dict[str, Any] = {
        **constants,
        "_number": _number,
        "_integer": _integer,
        "_always": lambda x: True,
        "_never": lambda x: False,
    }
    exec(compile(source, "<catalog schema, compiled>", "exec"), namespace)
    return {kind: namespace[f"valid_{kind}"] for kind in kinds}
