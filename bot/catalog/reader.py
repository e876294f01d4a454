"""Read the files of a catalog: each one parsed and checked against the schema.

What one file gives (`FileResult`) depends on nothing but its bytes, the schema, this
code and where the file sits (the folder can decide a document's kind), so the work can
be spread and remembered:

* **in parallel**: with many files, worker processes (forked, so nothing is imported
  again) read their share while this process reads its own; the results come back as
  plain data. Only on Linux and while no thread runs (forking a threaded process can
  deadlock), else one process reads everything;
* **from a cache** (``--cache DIR``, opt-in, for CI): one JSON file per file read, keyed
  by the SHA-256 of its content, the schema, the tool's version and code, and the
  folder hints. Deleting the directory is always safe.

The semantic rules need the whole catalog; they run afterwards, in this process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import marshal
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.schemacheck import KINDS, detect_kind, folders, schema_errors, schema_text
from bot.catalog.yamlsource import SourceDoc, read_documents

# Below this many files a worker costs more (fork, sending results back) than it saves.
PARALLEL_MIN_FILES = 400
MAX_JOBS = 4  # the rules run in one process after reading: more workers gain little


@dataclass
class FileResult:
    """One file: its documents the rules can check, what is wrong, what could not be read.

    A document with schema errors is kept with its valid rest (`SourceDoc.dropped` says
    what was cut). `broken` lists definitions that could not be read at all, as
    (kind, id, line): a runbook using such an action is told so, not "unknown action".
    """

    docs: list[SourceDoc] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    broken: list[tuple[str, str, int]] = field(default_factory=list)


Display = Callable[[Path], str]


def read_file(path: Path, root: Path, display: Display) -> FileResult:
    docs, diagnostics = read_documents(path, display(path))
    return file_result(docs, diagnostics, path, root, lambda: _read_text(path))


def file_result(
    docs: list[SourceDoc],
    diagnostics: list[Diagnostic],
    path: Path,
    root: Path,
    text: Callable[[], str],
) -> FileResult:
    """Kinds, schema checks and broken definitions of one file's documents (`text`: the
    file's text, read only when its YAML is unreadable). Shared by reading from disk and
    by `bot.catalog.loader.parse_contents` (bytes read once, for a reload)."""
    result = FileResult(diagnostics=diagnostics)
    if any(d.severity == "error" for d in diagnostics):
        # YAML that cannot be read: remember the ids it seems to define
        result.broken.extend(_ids_in_unreadable(text(), path, root))
    for doc in docs:
        doc.kind = detect_kind(doc, path, root)
        if not doc.kind:
            result.diagnostics.append(_unknown_kind(doc))
            result.broken.extend(_broken(doc, ""))
            continue
        errors, usable, dropped = schema_errors(doc)
        result.diagnostics.extend(errors)
        if usable is None:
            result.broken.extend(_broken(doc, doc.kind))
            continue
        doc.data, doc.dropped = usable, dropped
        result.docs.append(doc)
    return result


def _unknown_kind(doc: SourceDoc) -> Diagnostic:
    kind = doc.data.get("kind")
    if kind is None:
        return doc.diagnostic(
            "RB010",
            "schema",
            "cannot tell whether this document is an action, a runbook or the catalog settings",
            "add `kind: action`, `kind: runbook` or `kind: catalog`",
        )
    if kind == "test":
        return doc.diagnostic(
            "RB010",
            "schema",
            "a runbook test (`kind: test`) is not a catalog document",
            "move it to the `tests/` folder at the root of the catalog, where "
            "`runbookctl test` reads it and the catalog does not",
            ("kind",),
        )
    import difflib

    close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
    hint = f"did you mean `kind: {close[0]}`? " if close else ""
    return doc.diagnostic(
        "RB010",
        "schema",
        f"`kind: {kind}` is not a kind of catalog document",
        f"{hint}write `kind: action`, `kind: runbook` or `kind: catalog`",
        ("kind",),
    )


def _broken(doc: SourceDoc, kind: str) -> list[tuple[str, str, int]]:
    ident = doc.data.get("id") if isinstance(doc.data, dict) else None
    if not isinstance(ident, str) or not ident:
        return []
    return [(kind, ident, doc.where(())[0])]


_ID_LINE = re.compile(r"^id:[ \t]*[\"']?([A-Za-z0-9][A-Za-z0-9._-]*)", re.MULTILINE)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError:
        return ""


def _ids_in_unreadable(text: str, path: Path, root: Path) -> list[tuple[str, str, int]]:
    """Ids a file that is not valid YAML seems to define (`id:` lines at the top level)."""
    kind = "action" if "actions" in folders(path, root) else ""
    found = [
        (kind, match.group(1), text.count("\n", 0, match.start()) + 1)
        for match in _ID_LINE.finditer(text)
    ]
    if not found and kind == "action":  # actions/<id>.yaml is the usual layout
        found.append((kind, path.stem, 1))
    return found


def default_jobs() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # what this process may use (containers)
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_JOBS))


def read_files(
    paths: Sequence[Path],
    root: Path,
    display: Display,
    *,
    jobs: int = 1,
    cache_dir: Path | None = None,
) -> list[FileResult]:
    """The result of every file, in the order of `paths`."""
    cache = _Cache(cache_dir, root) if cache_dir is not None else None
    results: list[FileResult | None] = [None] * len(paths)
    todo: list[int] = []
    for i, path in enumerate(paths):
        found = cache.get(path, display) if cache is not None else None
        if found is None:
            todo.append(i)
        else:
            results[i] = found
    if jobs > 1 and len(todo) >= PARALLEL_MIN_FILES and _can_fork():
        fresh = _read_in_parallel([paths[i] for i in todo], root, display, jobs)
    else:
        fresh = [read_file(paths[i], root, display) for i in todo]
    for i, result in zip(todo, fresh, strict=True):
        results[i] = result
        if cache is not None:
            cache.put(paths[i], result)
    return [r if r is not None else FileResult() for r in results]


def _can_fork() -> bool:
    # Forking a process with threads can deadlock (a lock held by another thread stays
    # held in the child); macOS and Windows have no safe fork at all.
    return sys.platform.startswith("linux") and threading.active_count() == 1


def _read_in_parallel(
    paths: Sequence[Path], root: Path, display: Display, jobs: int
) -> list[FileResult]:
    """Workers read every `jobs`-th file (sizes even out); this process reads share 0."""
    import multiprocessing  # only here: importing it costs more than small catalogs take

    context = multiprocessing.get_context("fork")
    workers = []
    for share in range(1, jobs):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker,
            args=(paths[share::jobs], root, display, sender),
            name=f"runbookctl-lint-reader-{share}",
            daemon=True,
        )
        process.start()
        sender.close()
        workers.append((share, process, receiver))
    shares: dict[int, list[FileResult]] = {
        0: [read_file(path, root, display) for path in paths[0::jobs]]
    }
    for share, process, receiver in workers:
        mine = paths[share::jobs]
        try:
            plain = marshal.loads(receiver.recv_bytes())
            shares[share] = [
                _from_plain(entry, display(path), path)
                for entry, path in zip(plain, mine, strict=True)
            ]
        except (EOFError, OSError, ValueError):  # the worker died: read its share here
            shares[share] = [read_file(path, root, display) for path in mine]
        finally:
            receiver.close()
            process.join()
    ordered: list[FileResult] = [FileResult()] * len(paths)
    for share, results in shares.items():
        ordered[share::jobs] = results
    return ordered


def _worker(paths: Sequence[Path], root: Path, display: Display, sender: Any) -> None:
    # marshal: plain data only, and the fastest to load again (pickle's dataclasses are not)
    sender.send_bytes(marshal.dumps([_to_plain(read_file(path, root, display)) for path in paths]))
    sender.close()


# A FileResult as plain data (lists, dicts, strings, numbers): for a worker to send back
# and for the cache to keep. The file's name and path are added back when it is read.
_DIAGNOSTIC_FIELDS = ("code", "rule", "severity", "message", "fix", "line", "col", "path")


def _to_plain(result: FileResult) -> list[Any]:
    return [
        [[doc.index, doc.kind, doc.data, [list(p) for p in doc.dropped]] for doc in result.docs],
        [[getattr(d, name) for name in _DIAGNOSTIC_FIELDS] for d in result.diagnostics],
        [list(b) for b in result.broken],
    ]


def _from_plain(plain: Any, name: str, path: Path) -> FileResult:
    docs, diagnostics, broken = plain
    source = os.path.abspath(path)
    return FileResult(
        docs=[
            SourceDoc(
                file=name,
                index=index,
                data=data,
                kind=kind,
                source=source,
                dropped=tuple(tuple(p) for p in dropped),
            )
            for index, kind, data, dropped in docs
        ],
        diagnostics=[
            Diagnostic(file=name, **dict(zip(_DIAGNOSTIC_FIELDS, values, strict=True)))
            for values in diagnostics
        ],
        broken=[(kind, ident, line) for kind, ident, line in broken],
    )


# --- the cache ---------------------------------------------------------------------------


@functools.cache
def _code_fingerprint() -> str:
    """The tool's version and the code that reads files: a change to either is a miss."""
    from bot import __version__

    digest = hashlib.sha256(__version__.encode())
    digest.update(schema_text().encode())
    here = Path(__file__).resolve().parent
    for name in sorted(p.name for p in here.glob("*.py")):
        digest.update(name.encode())
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


class _Cache:
    def __init__(self, directory: Path, root: Path) -> None:
        self.directory = directory
        self.root = root
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keys: dict[Path, str] = {}

    def key(self, path: Path) -> str | None:
        try:
            content = path.read_bytes()
        except OSError:
            return None  # read_file reports it
        digest = hashlib.sha256(_code_fingerprint().encode())
        # The folders decide the kind of a document without `kind:`.
        parts = folders(path, self.root)
        digest.update(f"actions={'actions' in parts},runbooks={'runbooks' in parts}".encode())
        digest.update(content)
        return digest.hexdigest()

    def get(self, path: Path, display: Display) -> FileResult | None:
        key = self.key(path)
        if key is None:
            return None
        self.keys[path] = key
        try:
            entry = json.loads((self.directory / f"{key}.json").read_text("utf-8"))
            return _from_plain(entry, display(path), path)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or unreadable: read the file

    def put(self, path: Path, result: FileResult) -> None:
        key = self.keys.get(path)
        if key is None:
            return
        target = self.directory / f"{key}.json"
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(_to_plain(result), ensure_ascii=False), "utf-8")
            os.replace(temporary, target)  # readers never see half an entry
        except (OSError, ValueError):
            temporary.unlink(missing_ok=True)  # a cache that cannot be written is no cache
