"""Read YAML safely and remember where every value came from.

PyYAML's composer gives us nodes with start marks; we turn them into plain Python data
ourselves so that we can
  * remember the line and column of every value and key (for `file:line:col` errors),
  * reject duplicate keys (PyYAML silently keeps the last one),
  * bound alias expansion, so a "billion laughs" document is an error, not an OOM,
  * refuse tags other than YAML's core types (no Python objects, ever).

Positions are found lazily. Almost every document of a catalog is fine, so reading one
turns nodes into data and nothing else (`_plain`, a tight loop close to the cost of
PyYAML's own constructor); only when a diagnostic asks where a value is does its
document get composed again and walked with positions (`_Converter`). A file with
anchors (`&name`) takes the careful path at once: it bounds alias expansion and refuses
recursive aliases, which the plain loop does not have to, since without an anchor no
node can be reached twice.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bot.catalog.diagnostics import Diagnostic

try:  # libyaml is an order of magnitude faster; fall back to pure Python when missing
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Base = yaml.SafeLoader

# Which type a plain scalar is (`true`, `5m`, `0x1F`) depends on its text alone, and
# catalogs repeat the same few hundred texts; libyaml asks for every scalar, and PyYAML
# answers by trying its regexes one by one. Remembered here, bounded.
_RESOLVED: dict[str, str] = {}
_RESOLVED_MAX = 50_000


class _Loader(_Base):  # type: ignore[valid-type,misc]
    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and not self.yaml_path_resolvers:
            tag = _RESOLVED.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(_RESOLVED) >= _RESOLVED_MAX:
                    _RESOLVED.clear()
                _RESOLVED[value] = tag
            return tag
        return super().resolve(kind, value, implicit)


MAX_FILE_BYTES = 1024 * 1024
# Values reached through aliases, per document. Real runbooks use a handful; an alias
# bomb needs millions.
MAX_ALIAS_EXPANSION = 10_000

JsonPath = tuple[str | int, ...]

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_SAFE_SCALAR_TAGS = {
    _STR,
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


def format_path(path: JsonPath) -> str:
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


Marks = dict[JsonPath, tuple[int, int]]


@dataclass
class SourceDoc:
    """One YAML document of a catalog file, as plain data; positions on demand.

    `text` is the file's text when it is kept; otherwise `source` names the file to read
    again when a position is first asked for.
    """

    file: str
    index: int  # position of the document in its file (0-based)
    data: Any
    kind: str = ""  # "action", "runbook" or "catalog" once known
    source: str | None = None
    # Paths removed from `data` for schema errors: the rest is what the rules check.
    dropped: tuple[JsonPath, ...] = ()
    text: str | None = field(default=None, repr=False, compare=False)
    _marks: Marks | None = field(default=None, repr=False, compare=False)
    _key_marks: Marks | None = field(default=None, repr=False, compare=False)

    @property
    def marks(self) -> Marks:
        """Line and column (1-based) of every value, by path."""
        if self._marks is None:
            self._locate()
        assert self._marks is not None
        return self._marks

    @property
    def key_marks(self) -> Marks:
        """Line and column (1-based) of every mapping key, by the path of its value."""
        if self._key_marks is None:
            self._locate()
        assert self._key_marks is not None
        return self._key_marks

    def _locate(self) -> None:
        self._marks, self._key_marks = {}, {}
        text = self.text
        if text is None and self.source is not None:
            try:
                text = Path(self.source).read_bytes().decode("utf-8-sig")
            except (OSError, UnicodeDecodeError):
                return  # changed since it was read: every position falls back to 1:1
        if text is None:
            return
        try:
            for index, node in enumerate(_compose_all(text)):
                if index == self.index:
                    if node is not None:
                        _Converter(self).convert(node, (), frozenset())
                    return
        except (yaml.YAMLError, _Unsafe, RecursionError):
            return

    def where(self, path: JsonPath, *, key: bool = False) -> tuple[int, int]:
        """Line and column (1-based) of the value at `path`, or of its key when `key`.

        Falls back to the nearest enclosing value that has a position.
        """
        if key and path in self.key_marks:
            return self.key_marks[path]
        marks = self.marks
        probe = path
        while probe:
            if probe in marks:
                return marks[probe]
            probe = probe[:-1]
        return marks.get((), (1, 1))

    def diagnostic(
        self,
        code: str,
        rule: str,
        message: str,
        fix: str,
        path: JsonPath = (),
        *,
        severity: str = "error",
        key: bool = False,
    ) -> Diagnostic:
        line, col = self.where(path, key=key)
        return Diagnostic(
            code=code,
            rule=rule,
            severity="warning" if severity == "warning" else "error",
            message=message,
            fix=fix,
            file=self.file,
            line=line,
            col=col,
            path=format_path(path),
        )


class _Unsafe(Exception):
    def __init__(self, code: str, rule: str, message: str, fix: str, mark: Any) -> None:
        super().__init__(message)
        self.code, self.rule, self.message, self.fix, self.mark = code, rule, message, fix, mark


class _Converter:
    """Nodes to data with positions, bounding aliases: the careful path (and `where`)."""

    def __init__(self, doc: SourceDoc) -> None:
        self.doc = doc
        self.marks: Marks = {}
        self.key_marks: Marks = {}
        doc._marks, doc._key_marks = self.marks, self.key_marks
        self.aliased = 0
        self.constructor = yaml.constructor.SafeConstructor()
        self.seen_nodes: set[int] = set()
        self.errors: list[Diagnostic] = []

    def convert(self, node: yaml.Node, path: JsonPath, active: frozenset[int]) -> Any:
        node_id = id(node)
        if node_id in active:
            raise _Unsafe(
                "RB005",
                "unsafe-yaml",
                "recursive alias: a value contains itself",
                "remove the anchor/alias cycle",
                node.start_mark,
            )
        if node_id in self.seen_nodes:
            self.aliased += 1
            if self.aliased > MAX_ALIAS_EXPANSION:
                raise _Unsafe(
                    "RB005",
                    "unsafe-yaml",
                    f"aliases expand to more than {MAX_ALIAS_EXPANSION} values "
                    "(a YAML 'billion laughs' bomb?)",
                    "write the values out or use fewer nested aliases",
                    node.start_mark,
                )
        else:
            self.seen_nodes.add(node_id)
        # setdefault: a merged (<<) mapping must not move the position of its target
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, _SEQ)
            inner = active | {node_id}
            return [self.convert(child, (*path, i), inner) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, _MAP)
            return self._mapping(node, path, active | {node_id})
        raise _Unsafe(  # pragma: no cover - the composer only makes the three kinds
            "RB005", "unsafe-yaml", "unknown YAML node", "simplify the document", node.start_mark
        )

    def _check_tag(self, node: yaml.Node, expected: str) -> None:
        if node.tag != expected:
            raise _Unsafe(
                "RB005",
                "unsafe-yaml",
                f"YAML tag {node.tag!r} is not allowed",
                "remove the tag; only plain YAML values are accepted",
                node.start_mark,
            )

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == _STR:
            return node.value
        if node.tag not in _SAFE_SCALAR_TAGS:
            raise _Unsafe(
                "RB005",
                "unsafe-yaml",
                f"YAML tag {node.tag!r} is not allowed",
                "remove the tag; only plain YAML values are accepted",
                node.start_mark,
            )
        value = self.constructor.construct_object(node)
        if isinstance(value, dt.datetime | dt.date):
            return value.isoformat()
        return value

    def _mapping(self, node: yaml.MappingNode, path: JsonPath, active: frozenset[int]) -> Any:
        result: dict[str, Any] = {}
        merges: list[tuple[yaml.Node, JsonPath]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append((value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Unsafe(
                    "RB005",
                    "unsafe-yaml",
                    "mapping keys must be plain scalars",
                    "use a string key",
                    key_node.start_mark,
                )
            key = self._scalar(key_node)
            key = key if isinstance(key, str) else str(key)
            child = (*path, key)
            mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result:
                first = self.key_marks.get(child, (0, 0))
                self.errors.append(
                    Diagnostic(
                        code="RB002",
                        rule="duplicate-key",
                        severity="error",
                        message=f"duplicate key {key!r} (first defined at line {first[0]})",
                        fix="keep one of the two; YAML readers disagree on which one wins",
                        file=self.doc.file,
                        line=mark[0],
                        col=mark[1],
                        path=format_path(child),
                    )
                )
                continue
            self.key_marks[child] = mark
            result[key] = self.convert(value_node, child, active)
        for value_node, merge_path in merges:
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for source in sources:
                merged = self.convert(source, merge_path, active)
                if not isinstance(merged, dict):
                    raise _Unsafe(
                        "RB005",
                        "unsafe-yaml",
                        "a merge key (<<) must refer to a mapping",
                        "merge a mapping or write the keys out",
                        source.start_mark,
                    )
                for key, value in merged.items():
                    result.setdefault(key, value)
        return result


class _NeedsCare(Exception):
    """The plain loop met something only the careful path handles (it says what)."""


_ScalarNode, _SequenceNode, _MappingNode = yaml.ScalarNode, yaml.SequenceNode, yaml.MappingNode


@functools.cache
def _scalar_constructors() -> dict[str, Any]:
    constructor = yaml.constructor.SafeConstructor()
    return {
        "tag:yaml.org,2002:int": constructor.construct_yaml_int,
        "tag:yaml.org,2002:float": constructor.construct_yaml_float,
        "tag:yaml.org,2002:bool": constructor.construct_yaml_bool,
        "tag:yaml.org,2002:null": constructor.construct_yaml_null,
        "tag:yaml.org,2002:timestamp": (
            lambda node: constructor.construct_yaml_timestamp(node).isoformat()
        ),
    }


def _plain(node: yaml.Node) -> Any:
    """The data of an anchor-free document's node, as the careful path would make it.

    Raises `_NeedsCare` for anything but string keys, core scalar types, sequences and
    mappings without repeated keys; the careful path then reports it with its position.
    """
    kind = node.__class__
    if kind is _ScalarNode:
        tag = node.tag
        if tag == _STR:
            return node.value
        make = _scalar_constructors().get(tag)
        if make is None:
            raise _NeedsCare(tag)
        return make(node)
    if kind is _MappingNode:
        if node.tag != _MAP:
            raise _NeedsCare(node.tag)
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.__class__ is not _ScalarNode or key_node.tag != _STR:
                raise _NeedsCare("key")
            key = key_node.value
            if key in result:
                raise _NeedsCare("duplicate key")
            result[key] = _plain(value_node)
        return result
    if kind is _SequenceNode:
        if node.tag != _SEQ:
            raise _NeedsCare(node.tag)
        return [_plain(child) for child in node.value]
    raise _NeedsCare("node")  # pragma: no cover - the composer only makes the three kinds


def read_documents(
    path: Path, display: str | None = None
) -> tuple[list[SourceDoc], list[Diagnostic]]:
    """Parse one YAML file into documents with positions, plus any diagnostics."""
    name = display or str(path)
    diagnostics: list[Diagnostic] = []

    def problem(code: str, rule: str, message: str, fix: str, line: int = 1, col: int = 1) -> None:
        diagnostics.append(Diagnostic(code, rule, "error", message, fix, name, line, col))

    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            problem(
                "RB004",
                "file-too-large",
                f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit",
                "split it into several files (one action or runbook per file)",
            )
            return [], diagnostics
        raw = path.read_bytes()
    except OSError as exc:
        problem("RB001", "yaml-syntax", f"cannot read file: {exc.strerror}", "check the path")
        return [], diagnostics
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problem("RB001", "yaml-syntax", "file is not valid UTF-8", "save the file as UTF-8", line)
        return [], diagnostics
    return parse_documents(text, name, diagnostics, source=os.path.abspath(path))


def parse_documents(
    text: str,
    name: str,
    diagnostics: list[Diagnostic] | None = None,
    *,
    source: str | None = None,
) -> tuple[list[SourceDoc], list[Diagnostic]]:
    """The documents of `text` (named `name` in diagnostics), and what is wrong with it.

    With `source` (the file `text` was read from) positions are found by reading the
    file again when asked for; without it the documents keep `text`.
    """
    diagnostics = [] if diagnostics is None else diagnostics
    docs: list[SourceDoc] = []
    plain = "&" not in text  # no anchor, no alias: no node is reached twice
    kept = None if source else text
    try:
        for index, node in enumerate(_compose_all(text)):
            if node is None:
                continue
            doc = SourceDoc(file=name, index=index, data=None, source=source, text=kept)
            if plain:
                try:
                    doc.data = _plain(node)
                except _NeedsCare:
                    pass
                else:
                    if doc.data is not None:
                        _check_mapping(doc, diagnostics, docs)
                    continue
            converter = _Converter(doc)
            try:
                doc.data = converter.convert(node, (), frozenset())
            except _Unsafe as exc:
                message, fix = exc.message, exc.fix
                if _TEMPLATE_VALUE.search(_line(text, exc.mark.line)):
                    message, fix = _unquoted_template(_line(text, exc.mark.line))
                diagnostics.append(
                    Diagnostic(
                        exc.code,
                        exc.rule,
                        "error",
                        message,
                        fix,
                        name,
                        exc.mark.line + 1,
                        exc.mark.column + 1,
                    )
                )
                continue
            diagnostics.extend(converter.errors)
            if doc.data is not None:
                _check_mapping(doc, diagnostics, docs)
    except RecursionError:
        diagnostics.append(
            Diagnostic(
                "RB005",
                "unsafe-yaml",
                "error",
                "values are nested too deeply to read",
                "flatten the document; catalog documents need a few levels at most",
                name,
            )
        )
    except yaml.MarkedYAMLError as exc:
        message, fix, line, col = _syntax_error(text, exc)
        diagnostics.append(
            Diagnostic("RB001", "yaml-syntax", "error", message, fix, name, line, col)
        )
    except yaml.YAMLError as exc:
        diagnostics.append(
            Diagnostic(
                "RB001",
                "yaml-syntax",
                "error",
                f"YAML error: {exc}",
                "fix the YAML syntax",
                name,
            )
        )
    return docs, diagnostics


# --- YAML syntax errors, with the fix for the usual causes ----------------------------

# `- pattern: "x", allow_failure: true`: a second key after a value, on the same line
_SECOND_KEY = re.compile(
    r"^(?P<indent>\s*)(?P<dash>-\s+)?(?P<key>[A-Za-z_][\w-]*):\s*"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*'|[^,#\"'{\[]*?)\s*,\s*"
    r"(?P<key2>[A-Za-z_][\w-]*)\s*:\s*(?P<value2>[^#]*?)\s*(?:#.*)?$"
)
# `command: echo: hello`: a plain value with `: ` in it
_COLON_IN_VALUE = re.compile(
    r"^\s*(?:-\s+)?(?P<key>[\w-]+):\s+(?P<value>[^'\"{\[#\s][^#]*?:\s[^#]*?)\s*(?:#.*)?$"
)
# `url: {{ incident.details.host }}/healthz`: a template at the start of a value
_TEMPLATE_VALUE = re.compile(r"(?:^|:|-)\s*\{\{")
_TEMPLATE_ENTRY = re.compile(
    r"^\s*(?:-\s+)?(?:(?P<key>[\w-]+):\s*)?(?P<value>\{\{[^#]*?)\s*(?:#.*)?$"
)


def _unquoted_template(source: str) -> tuple[str, str]:
    found = _TEMPLATE_ENTRY.match(source)
    value = found.group("value") if found else "{{ incident.details.host }}/healthz"
    key = f"{found.group('key')}: " if found and found.group("key") else ""
    return (
        "a value that starts with `{{` is not quoted, so YAML reads it as a mapping",
        f'quote the whole value: `{key}"{value}"`',
    )


def _line(text: str, index: int) -> str:
    """Line `index` (0-based) of `text`, or ""."""
    lines = text.splitlines()
    return lines[index] if 0 <= index < len(lines) else ""


def _syntax_error(text: str, exc: yaml.MarkedYAMLError) -> tuple[str, str, int, int]:
    """(message, fix, line, col) for a YAML syntax error, naming the likely cause."""
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or exc.context or "invalid YAML"
    source = _line(text, line - 1)
    for index in (line - 1, (exc.context_mark.line if exc.context_mark else -1)):
        second = _SECOND_KEY.match(_line(text, index))
        if second and index >= 0:
            key, value = second.group("key"), second.group("value")
            key2, value2 = second.group("key2"), second.group("value2") or "…"
            dash = "- " if second.group("dash") else ""
            return (
                f"YAML syntax error: `{key2}:` follows the value of `{key}:` on the same line",
                f"write `{dash}{{{key}: {value}, {key2}: {value2}}}` or put `{key2}:` on its own "
                f"line, indented like `{key}:`",
                index + 1,
                _line(text, index).find(",", second.end("value")) + 1 or col,
            )
    if (
        "\t" in problem
        or (0 < col <= len(source) and source[col - 1] == "\t")
        or ("\t" in source[: len(source) - len(source.lstrip())])
    ):
        tab = source.find("\t") + 1 or col
        return (
            "YAML syntax error: a tab character; YAML indents with spaces only",
            f"replace the tab at line {line}, column {tab} with spaces",
            line,
            tab,
        )
    if _TEMPLATE_VALUE.search(source):
        message, fix = _unquoted_template(source)
        return f"YAML syntax error: {message}", fix, line, col
    colon = _COLON_IN_VALUE.match(source)
    if colon and "mapping values are not allowed" in problem:
        key, value = colon.group("key"), colon.group("value")
        return (
            f"YAML syntax error: `: ` inside the value of `{key}:` starts another mapping",
            f'quote the value: `{key}: "{value}"`',
            line,
            col,
        )
    if exc.context and "quoted scalar" in exc.context and exc.context_mark is not None:
        opened = exc.context_mark.line + 1
        return (
            f"YAML syntax error: the quote opened on line {opened} is never closed",
            f'close the quote on line {opened} (inside "…" write \\" for a quote, inside '
            "'…' write '')",
            opened,
            exc.context_mark.column + 1,
        )
    if "could not find expected ':'" in problem:
        fix = "write `key: value` on this line, or quote a value that goes on over several lines"
    elif "undefined alias" in problem:
        fix = "define the anchor (`&name`) before using it as `*name`, or write the value out"
    elif "expected key" in problem or "expected '-'" in problem or "indentation" in problem:
        fix = (
            "line this up with the keys (or `-` items) it belongs with: the same number of "
            "spaces before each key of one mapping"
        )
    else:
        fix = "fix the YAML at this position (indentation, quoting, or a missing ':')"
    return f"YAML syntax error: {problem}", fix, line, col


def _check_mapping(doc: SourceDoc, diagnostics: list[Diagnostic], docs: list[SourceDoc]) -> None:
    """Keep `doc` if it is a mapping; otherwise say so."""
    if isinstance(doc.data, dict):
        docs.append(doc)
        return
    line, col = doc.where(())
    diagnostics.append(
        Diagnostic(
            "RB003",
            "not-a-mapping",
            "error",
            f"document is a {_yaml_type(doc.data)}, not a mapping",
            "each document must be a mapping with an action, a runbook or the catalog settings",
            doc.file,
            line,
            col,
        )
    )


def _compose_all(text: str) -> Iterator[yaml.Node | None]:
    loader = _Loader(text)
    try:
        while loader.check_node():
            yield loader.get_node()
    finally:
        loader.dispose()


def _yaml_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def decode_documents(
    raw: bytes, name: str, *, size: int | None = None, error: str = ""
) -> tuple[list[SourceDoc], list[Diagnostic]]:
    """`read_documents` for bytes already read (a consistent snapshot of a catalog).

    `size` is the file's size on disk when `raw` was not read because it is over the
    limit; `error` the reason it could not be read at all. Same diagnostics as reading.
    """
    diagnostics: list[Diagnostic] = []

    def problem(code: str, rule: str, message: str, fix: str, line: int = 1) -> None:
        diagnostics.append(Diagnostic(code, rule, "error", message, fix, name, line, 1))

    if error:
        problem("RB001", "yaml-syntax", f"cannot read file: {error}", "check the path")
        return [], diagnostics
    size = len(raw) if size is None else size
    if size > MAX_FILE_BYTES:
        problem(
            "RB004",
            "file-too-large",
            f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit",
            "split it into several files (one action or runbook per file)",
        )
        return [], diagnostics
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problem("RB001", "yaml-syntax", "file is not valid UTF-8", "save the file as UTF-8", line)
        return [], diagnostics
    return parse_documents(text, name, diagnostics)
