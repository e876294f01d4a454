"""The catalog the bot serves, reloaded when its files change; never a broken one.

``CatalogSource`` owns the live catalog:

* ``check()`` is the cheap, periodic question "did anything change?": a fingerprint of
  the catalog files' stat data (device, inode, size, mtime, ctime: one ``os.scandir``
  walk, no file read) plus the Git HEAD and ref it points at, and the directory a
  symlinked root resolves to. Only a different fingerprint leads to a reload.
* ``reload()`` reads a **consistent snapshot**: it resolves the root once (git-sync and
  the kubelet swap a symlink atomically; everything is read below the resolved target),
  fingerprints it, reads every file's bytes, fingerprints again, and starts over (a few
  times) when anything moved during the read. It lints exactly those bytes with the
  loader (``parse_contents``). A catalog with errors is **never served**: the last good
  one stays, and the failure (every ``file:line`` error) is kept for ``/readyz``, logged
  and counted (``runbook_catalog_reloads_total{result}``).
* Reloads are serialized by one lock; ``request_reload()`` only sets a flag and an
  Event, so a signal handler may call it, and a storm of requests during a reload
  coalesces into one more reload. ``run()`` is the loop the bot runs on a thread.
* ``snapshot()`` is the last good catalog as bytes (gzip'd JSON: relative path -> text,
  plus its commit); ``restore()`` / ``from_snapshot()`` serve it again, e.g. at a start
  where the directory has errors but the database remembers a good catalog.

Racy files: a file rewritten within the filesystem's timestamp granularity, in place and
at the same size, keeps its stat data. Like Git's racy index entries, files modified
within ``RACY_WINDOW_NS`` of being read are compared by content on the next checks,
until the window has passed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import operator
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR
from typing import Any, Literal

from bot import metrics
from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import (
    TESTS_FOLDER,
    FileContent,
    ParsedCatalog,
    build,
    catalog_commit,
    parse_catalog,
    parse_contents,
)
from bot.catalog.model import Catalog
from bot.catalog.yamlsource import MAX_FILE_BYTES
from bot.errors import CatalogError, CatalogUnavailable

log = logging.getLogger(__name__)

READ_ATTEMPTS = 5  # consistent reads tried before a reload gives up (and keeps the old one)
RACY_WINDOW_NS = 2_000_000_000  # above any filesystem's timestamp granularity we run on
STOP_POLL_SECONDS = 1.0  # how late run() may notice a stop_event nobody woke it for
SNAPSHOT_FORMAT = "runbook-bot catalog snapshot 1"
_MAX_REPORTED = 50  # errors shown in a failure report; the count says how many more

Outcome = Literal["success", "failed", "unchanged"]

# dev, ino, size, mtime_ns, ctime_ns of one file (all zero: could not be stat'ed)
StatKey = tuple[int, int, int, int, int]


_NO_STAT: StatKey = (0, 0, 0, 0, 0)
_YAML = (".yaml", ".yml")
_BY_NAME = operator.attrgetter("name")


def _stat_key(st: os.stat_result | None) -> StatKey:
    if st is None:
        return _NO_STAT
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Fingerprint:
    """What `check()` compares: where the root points and the stat data below it."""

    resolved: str  # the root with every symlink followed ("" when it does not exist)
    files: tuple[tuple[str, str, StatKey], ...]  # relative path (with /), real path, stat
    git: tuple[StatKey, ...] = ()  # HEAD, the ref it names, packed-refs

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(rel for rel, _, _ in self.files)


@dataclass(frozen=True)
class ReloadResult:
    """What one check or reload found. `report()` is the text for logs and /readyz."""

    outcome: Outcome
    at: float  # the source's clock when it finished
    seconds: float  # how long it took, by that clock
    commit: str | None = None  # of the catalog read (None: unknown, or nothing read)
    version: str = ""  # as audit rows show it: short commit, "-dirty", or "unversioned"
    diagnostics: tuple[Diagnostic, ...] = ()  # why it failed (errors first), when it did
    reason: str = ""  # one line, when it failed

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    def report(self) -> str:
        if self.ok:
            return f"catalog {self.version or 'unversioned'}: {self.outcome}"
        lines = [self.reason]
        errors = self.errors
        lines += [d.format() for d in errors[:_MAX_REPORTED]]
        if len(errors) > _MAX_REPORTED:
            lines.append(f"… and {len(errors) - _MAX_REPORTED} more (runbookctl lint)")
        return "\n".join(lines)


@dataclass
class _Read:
    """One consistent read of the directory."""

    fingerprint: Fingerprint
    contents: list[FileContent]
    commit: str | None
    dirty: bool
    digest: str  # of paths, bytes, commit and dirty: equal digests, equal catalogs
    racy: dict[str, bytes] = field(default_factory=dict)  # rel -> bytes read
    racy_until_ns: int = 0


@dataclass(frozen=True)
class _Served:
    """The catalog being served and the bytes it was built from (for `snapshot()`)."""

    catalog: Catalog
    texts: tuple[tuple[str, str], ...]  # (relative path, text), in the order they load
    digest: str


class _Unstable(Exception):
    """The directory kept changing while it was read."""


class CatalogSource:
    """The live catalog of one directory (see the module docstring).

    `on_loaded(catalog, result)` runs after each newly served catalog, `on_failed(result)`
    after each failed reload; both under the reload lock, so in order, never at once. An
    exception in either is logged and does not undo the reload.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        commit_override: str | None = None,
        on_loaded: Callable[[Catalog, ReloadResult], None] | None = None,
        on_failed: Callable[[ReloadResult], None] | None = None,
        clock: Callable[[], float] = time.time,
        with_git: bool = True,
    ) -> None:
        self.root = Path(root)
        self.commit_override = commit_override or None
        self.on_loaded = on_loaded
        self.on_failed = on_failed
        self.clock = clock
        self.with_git = with_git
        self._lock = threading.Lock()  # one check or reload at a time
        # run() sleeps in select() on this pipe; a byte written to it wakes it. No lock
        # is involved, so a signal handler may write even while interrupting run()'s
        # own thread (threading.Event.set takes a lock a nested handler could deadlock on).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._requested = False  # set by request_reload(), cleared by run()
        self._closed = False
        self._served: _Served | None = None
        self._attempted: Fingerprint | None = None  # the last fingerprint read, good or not
        self._attempted_digest = ""
        self._racy: dict[str, bytes] = {}
        self._racy_until_ns = 0
        self._failure: ReloadResult | None = None
        self._git_paths: tuple[str, tuple[Path, ...]] | None = None  # resolved root -> files

    # --- what the bot reads ---------------------------------------------------------------

    def current(self) -> Catalog:
        """The catalog being served. Raises `CatalogUnavailable` before the first good one."""
        served = self._served
        if served is None:
            failure = self._failure
            detail = f":\n{failure.report()}" if failure else ""
            raise CatalogUnavailable(f"no good catalog loaded from {self.root} yet{detail}")
        return served.catalog

    @property
    def loaded(self) -> bool:
        return self._served is not None

    @property
    def last_failure(self) -> ReloadResult | None:
        """Why the directory's newest content is not served (None: it is, or nothing tried)."""
        return self._failure

    @property
    def reload_pending(self) -> bool:
        return self._requested

    # --- change detection -----------------------------------------------------------------

    def fingerprint(self) -> Fingerprint:
        """Stat data of the catalog files and Git state, without reading any file."""
        resolved = os.path.realpath(self.root)
        return self._fingerprint(resolved, _scan(Path(resolved)))

    def check(self) -> ReloadResult:
        """Reload when the fingerprint changed (or a racy file's content did); cheap if not."""
        with self._lock:
            started = self.clock()
            if self.fingerprint() != self._attempted or self._racy_changed():
                return self._reload(force=False)
            return self._finish(self._unchanged(started))

    def reload(self, force: bool = False) -> ReloadResult:
        """Read the directory; lint and serve its catalog when it is new and clean.

        Content equal to the served catalog's is `unchanged`. So is content equal to the
        last one that failed, unless `force` (SIGHUP: lint and report it again).
        """
        with self._lock:
            return self._reload(force)

    def _reload(self, force: bool) -> ReloadResult:
        """`reload()`, for a caller that holds the lock."""
        started = self.clock()
        try:
            read = self._read_consistent()
        except _Unstable:
            return self._failed(
                started,
                None,
                (),
                f"catalog at {self.root} kept changing while it was read "
                f"({READ_ATTEMPTS} attempts); still serving {self._serving()}",
            )
        same_as_last = read.digest == self._attempted_digest
        self._attempted, self._attempted_digest = read.fingerprint, read.digest
        self._racy, self._racy_until_ns = read.racy, read.racy_until_ns
        served = self._served
        if served is not None and read.digest == served.digest:
            self._failure = None  # the directory is back to what is served
            return self._finish(self._unchanged(started))
        if same_as_last and self._failure is not None and not force:
            return self._finish(self._unchanged(started))
        return self._load(read, started)

    def _unchanged(self, started: float) -> ReloadResult:
        now = self.clock()
        served = self._served
        if served is None:
            return ReloadResult("unchanged", now, now - started)
        catalog = served.catalog
        return ReloadResult("unchanged", now, now - started, catalog.commit, catalog.version)

    # --- signals and the loop -------------------------------------------------------------

    def request_reload(self) -> None:
        """Ask `run()` for a reload at once (SIGHUP). Safe in a signal handler: it sets a
        flag and writes a byte to a pipe, nothing that takes a lock."""
        self._requested = True
        self._poke()

    def close(self) -> None:
        """Make `run()` return at once."""
        self._closed = True
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe: a wake-up is waiting already
            os.write(self._wake_w, b"\0")

    def run(self, stop: threading.Event, refresh_seconds: float) -> None:
        """Check every `refresh_seconds` (0: never; reload requests still count) until
        `stop` is set (noticed within STOP_POLL_SECONDS) or `close()` is called.

        Run it on its own thread. Requests that arrive during a reload are served by one
        more reload after it: a storm of SIGHUPs costs at most two.
        """
        next_check = time.monotonic() + refresh_seconds if refresh_seconds > 0 else None
        while not (stop.is_set() or self._closed):
            timeout = STOP_POLL_SECONDS
            if next_check is not None:
                timeout = min(timeout, max(0.0, next_check - time.monotonic()))
            select.select([self._wake_r], [], [], timeout)
            _drain(self._wake_r)
            if stop.is_set() or self._closed:
                return
            if self._requested:
                self._requested = False
                self._guarded(lambda: self.reload(force=True))
            elif next_check is not None and time.monotonic() >= next_check:
                self._guarded(self.check)
            else:
                continue
            if next_check is not None:
                next_check = time.monotonic() + refresh_seconds

    # --- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The served catalog as bytes, for `restore()` after a restart."""
        served = self._served
        if served is None:
            raise CatalogUnavailable("no good catalog to snapshot yet")
        catalog = served.catalog
        document = {
            "format": SNAPSHOT_FORMAT,
            "root": str(self.root),
            "commit": catalog.commit,
            "dirty": catalog.dirty,
            "files": [list(pair) for pair in served.texts],
        }
        return gzip.compress(json.dumps(document, sort_keys=True).encode("utf-8"), mtime=0)

    def restore(self, data: bytes) -> Catalog:
        """Serve the catalog of a snapshot (linted again). The directory's state is kept:
        `last_failure` still says why it is not served. Raises `CatalogError` when the
        snapshot is unreadable or no longer lints clean."""
        texts, commit, dirty = _decode_snapshot(data)
        contents = [FileContent(self.root / rel, text.encode("utf-8")) for rel, text in texts]
        parsed = parse_contents(self.root, contents)
        if parsed.has_errors:
            raise CatalogError(parsed.diagnostics)
        catalog = build(parsed, commit=commit, dirty=dirty)
        with self._lock:
            self._served = _Served(catalog, texts, _digest(contents, commit, dirty))
        log.warning(
            "serving the stored catalog %s (%d runbooks) until %s gives a good one",
            catalog.version,
            len(catalog.runbooks),
            self.root,
        )
        return catalog

    def start(self, stored: bytes | None = None) -> ReloadResult:
        """The first load, at the bot's start: the directory's catalog; when it has errors,
        the `stored` snapshot of the last good one (the failure stays in `last_failure`).

        Raises `CatalogUnavailable` with the directory's errors when neither is usable.
        """
        result = self.reload()
        if result.ok:
            return result
        if stored is not None:
            try:
                self.restore(stored)
                return result
            except CatalogError as exc:
                log.error("the stored catalog cannot be served either: %s", exc)
        raise CatalogUnavailable(result.report(), result.diagnostics)

    @classmethod
    def from_snapshot(
        cls, data: bytes, root: str | os.PathLike[str], **kwargs: Any
    ) -> CatalogSource:
        """A source for `root` that serves the snapshot until the directory gives a good one."""
        source = cls(root, **kwargs)
        source.restore(data)
        return source

    # --- internals ------------------------------------------------------------------------

    def _fingerprint(self, resolved: str, files: list[tuple[str, str, StatKey]]) -> Fingerprint:
        return Fingerprint(
            resolved if os.path.exists(resolved) else "",
            tuple(files),
            self._git_state(resolved),
        )

    def _git_state(self, resolved: str) -> tuple[StatKey, ...]:
        if not self.with_git or self.commit_override:
            return ()
        cached = self._git_paths
        if cached is None or cached[0] != resolved:
            cached = self._git_paths = (resolved, _git_files(Path(resolved)))
        return tuple(_stat_key(_stat(path)) for path in cached[1])

    def _read_consistent(self) -> _Read:
        self._git_paths = None  # HEAD may name another branch now: find its ref again
        for _ in range(READ_ATTEMPTS):
            resolved = os.path.realpath(self.root)  # followed once: all reads below it
            files = _scan(Path(resolved))
            before = self._fingerprint(resolved, files)
            contents = [_read_file(self.root / rel, real) for rel, real, _ in files]
            commit, dirty = (None, False)
            if before.resolved:
                # As configured, not resolved: a git-sync link names its commit. Should
                # the link flip meanwhile, the check below sees it and reads again.
                commit, dirty = catalog_commit(
                    self.root, override=self.commit_override, with_git=self.with_git
                )
            after = self._fingerprint(resolved, _scan(Path(resolved)))
            if after != before or os.path.realpath(self.root) != resolved:
                continue
            # Written so recently that a rewrite may not change the stat data: keep the
            # bytes, and let check() compare them until the timestamps tell changes apart.
            now_ns = time.time_ns()
            racy = {
                rel: content.data
                for (rel, _, key), content in zip(files, contents, strict=True)
                if key[3] + RACY_WINDOW_NS > now_ns and content.size is None and not content.error
            }
            newest = max((key[3] for rel, _, key in files if rel in racy), default=0)
            return _Read(
                before,
                contents,
                commit,
                dirty,
                _digest(contents, commit, dirty),
                racy,
                newest + RACY_WINDOW_NS,
            )
        raise _Unstable

    def _racy_changed(self) -> bool:
        if not self._racy:
            return False
        resolved = Path(self._attempted.resolved if self._attempted else self.root)
        for rel, data in self._racy.items():
            if _read_file(self.root / rel, str(resolved / rel)).data != data:
                return True
        if time.time_ns() > self._racy_until_ns:
            self._racy = {}  # settled: any later write changes the stat data
        return False

    def _load(self, read: _Read, started: float) -> ReloadResult:
        if not read.fingerprint.resolved:
            parsed = parse_catalog(self.root, run_rules=False)  # says it does not exist
            return self._failed(started, read.commit, tuple(parsed.diagnostics), self._why(parsed))
        if not read.contents:
            # Lint passes an empty folder, but serving it would drop every runbook: far
            # more often a mount not ready or a wrong path than a catalog emptied on purpose.
            return self._failed(
                started,
                read.commit,
                (),
                f"no catalog files (*.yaml, *.yml) under {self.root}: not loaded; still "
                f"serving {self._serving()}",
            )
        try:
            parsed = parse_contents(self.root, read.contents)
            if parsed.has_errors:
                return self._failed(
                    started, read.commit, tuple(parsed.diagnostics), self._why(parsed)
                )
            catalog = build(parsed, commit=read.commit, dirty=read.dirty)
        except Exception as exc:  # a loader bug must not stop the bot serving what it has
            log.exception("catalog reload of %s crashed", self.root)
            return self._failed(
                started,
                read.commit,
                (),
                f"catalog at {self.root} could not be loaded ({type(exc).__name__}); "
                f"still serving {self._serving()}",
            )
        texts = tuple(
            (rel, content.data.decode("utf-8"))
            for rel, content in zip(read.fingerprint.paths, read.contents, strict=True)
        )
        self._served = _Served(catalog, texts, read.digest)
        self._failure = None
        result = self._result("success", started, catalog)
        log.info(
            "catalog %s loaded from %s: %d runbooks, %d actions, in %.3f s",
            catalog.version,
            self.root,
            len(catalog.runbooks),
            len(catalog.actions),
            result.seconds,
        )
        self._callback(self.on_loaded, catalog, result)
        return self._finish(result)

    def _why(self, parsed: ParsedCatalog) -> str:
        errors = sum(1 for d in parsed.diagnostics if d.severity == "error")
        noun = "error" if errors == 1 else "errors"
        return (
            f"catalog at {self.root} has {errors} {noun} (runbookctl lint shows them): "
            f"not loaded; still serving {self._serving()}"
        )

    def _serving(self) -> str:
        served = self._served
        return served.catalog.version if served else "nothing (no good catalog yet)"

    def _result(self, outcome: Outcome, started: float, catalog: Catalog) -> ReloadResult:
        now = self.clock()
        return ReloadResult(outcome, now, now - started, catalog.commit, catalog.version)

    def _failed(
        self,
        started: float,
        commit: str | None,
        diagnostics: tuple[Diagnostic, ...],
        reason: str,
    ) -> ReloadResult:
        now = self.clock()
        ordered = tuple(sorted(diagnostics, key=lambda d: d.severity != "error"))
        version = commit[:12] if commit else ""
        result = ReloadResult("failed", now, now - started, commit, version, ordered, reason)
        self._failure = result
        log.error("%s", result.report())
        self._callback(self.on_failed, result)
        return self._finish(result)

    def _finish(self, result: ReloadResult) -> ReloadResult:
        metrics.catalog_reloads.labels(result=result.outcome).inc()
        return result

    def _callback(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # the catalog changed either way; the caller's bug is logged
            log.exception("catalog %s callback failed", fn.__name__)

    def _guarded(self, fn: Callable[[], ReloadResult]) -> None:
        try:
            fn()
        except Exception:  # the loop must outlive any one reload
            log.exception("catalog check of %s failed", self.root)


# --- the file system ----------------------------------------------------------------------


def _scan(root: Path) -> list[tuple[str, str, StatKey]]:
    """Catalog files under root as `discover_files` finds them: (relative, real path, stat).

    Same rules: ``*.yaml``/``*.yml``, hidden files and folders skipped, the root's
    ``tests/`` folder (runbook tests) skipped, symlinks followed, each directory once (a
    symlink loop ends), files and folders in name order.
    """
    try:
        st = root.stat()
    except OSError:
        return []
    if not root.is_dir():
        return [("", str(root), _stat_key(st))]  # a one-file catalog: root / "" is root
    found: list[tuple[str, str, StatKey]] = []
    _walk(str(root), "", {(st.st_dev, st.st_ino)}, found)
    return found


def _walk(
    top: str, prefix: str, seen: set[tuple[int, int]], found: list[tuple[str, str, StatKey]]
) -> None:
    # The hot loop of check(): one stat per catalog file, none for other entries whose
    # type the directory listing tells (d_type), a C-level sort key.
    try:
        with os.scandir(top) as listing:
            entries = sorted(listing, key=_BY_NAME)
    except OSError:
        return
    folders: list[os.DirEntry[str]] = []
    for entry in entries:
        name = entry.name
        if name.startswith(".") or (not prefix and name == TESTS_FOLDER):
            continue  # hidden files and folders, and runbook tests, as lint skips them
        if name.endswith(_YAML):
            try:
                st = entry.stat()
            except OSError:  # dangling link, link loop: lint reports it (RB001)
                found.append((prefix + name, entry.path, _NO_STAT))
                continue
            if S_ISDIR(st.st_mode):
                folders.append(entry)
            else:
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                found.append((prefix + name, entry.path, key))
        elif _is_dir(entry):
            folders.append(entry)
    for entry in folders:
        try:
            st = entry.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            _walk(entry.path, f"{prefix}{entry.name}/", seen, found)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stat(path: os.DirEntry[str] | Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _read_file(shown: Path, real: str) -> FileContent:
    try:
        with open(real, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                return FileContent(shown, size=size)
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return FileContent(shown, error=exc.strerror or str(exc))
    return FileContent(shown, data)


def _git_files(root: Path) -> tuple[Path, ...]:
    """HEAD, the ref it names and packed-refs of the repository holding root, if any."""
    for folder in (root, *root.parents):
        dot_git = folder / ".git"
        try:
            if dot_git.is_dir():
                git_dir = common = dot_git
            elif dot_git.is_file():  # a linked worktree: "gitdir: <path>"
                text = dot_git.read_text("utf-8").strip()
                if not text.startswith("gitdir:"):
                    return ()
                git_dir = (folder / text.removeprefix("gitdir:").strip()).resolve()
                common_file = git_dir / "commondir"
                common = (
                    (git_dir / common_file.read_text("utf-8").strip()).resolve()
                    if common_file.is_file()
                    else git_dir
                )
            else:
                continue
            head = (git_dir / "HEAD").read_text("utf-8").strip()
        except OSError:
            return ()
        files = [git_dir / "HEAD", common / "packed-refs"]
        if head.startswith("ref:"):
            files.append(common / head.removeprefix("ref:").strip())
        return tuple(files)
    return ()


def _digest(contents: Sequence[FileContent], commit: str | None, dirty: bool) -> str:
    h = hashlib.sha256()
    h.update(f"{commit}\0{dirty}\0".encode())
    for content in contents:
        h.update(f"{content.path}\0{content.size}\0{content.error}\0{len(content.data)}\0".encode())
        h.update(content.data)
    return h.hexdigest()


def _decode_snapshot(data: bytes) -> tuple[tuple[tuple[str, str], ...], str | None, bool]:
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        document = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogUnavailable(f"the stored catalog snapshot is unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != SNAPSHOT_FORMAT:
        raise CatalogUnavailable("the stored catalog snapshot is not one this bot can read")
    files = document.get("files")
    if not isinstance(files, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
        for pair in files
    ):
        raise CatalogUnavailable("the stored catalog snapshot has no files")
    commit = document.get("commit")
    texts = tuple((rel, text) for rel, text in files)
    return texts, commit if isinstance(commit, str) else None, bool(document.get("dirty"))


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
