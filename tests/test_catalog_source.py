"""Live reload of the catalog (bot.catalog.source), on real files, real Git repositories
and real signals.

Changes that must land *during* a read are made by a gate: a catalog file that is a
FIFO, whose read blocks until the test's gate thread opens it for writing. The gate
changes the directory while the reader is stopped half-way through the catalog, then
lets it go on, which makes the interleaving exact instead of a matter of timing.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot import metrics
from bot.catalog import Catalog, load_catalog, parse_catalog
from bot.catalog.loader import FileContent, commit_from_path, discover_files, parse_contents
from bot.catalog.source import CatalogSource, ReloadResult
from bot.catalog.yamlsource import MAX_FILE_BYTES
from bot.errors import CatalogError, CatalogUnavailable

GIT = shutil.which("git")
CASES = Path(__file__).resolve().parent / "lint_cases"
BUNDLED = Path(__file__).resolve().parent.parent / "runbooks"

SETTINGS = (
    "kind: catalog\n"
    "environments: [{name: dev}, {name: staging}, {name: prod, production: true}]\n"
    "approvers: {users: [U0ONCALL]}\n"
)


def action(ident: str, word: str) -> str:
    return (
        f"kind: action\nid: {ident}\ncommand: [echo, {word}]\nexpect: [{{pattern: {word}}}]\n"
        "safety: {requires_approval: false, scopes: [dev, staging]}\n"
    )


def runbook(*actions: str) -> str:
    steps = "".join(f"  - action: {a}\n" for a in actions)
    return f"kind: runbook\nid: web\nmatch: {{services: [web]}}\nsteps:\n{steps}"


def catalog_files(word: str) -> dict[str, str]:
    return {
        "catalog.yaml": SETTINGS,
        "actions/check.yaml": action("check", word),
        "runbooks/web.yaml": runbook("check"),
    }


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return root


def word_of(catalog: Catalog) -> str:
    """The echo word of the `check` action: which version of the catalog this is."""
    return catalog.actions["check"].command[1]


def reloads(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("runbook_catalog_reloads_total", {"result": result})
    return value or 0.0


def git(cwd: Path, *args: str) -> str:
    assert GIT is not None
    done = subprocess.run(
        [GIT, "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


@dataclasses.dataclass
class Calls:
    loaded: list[tuple[str, ReloadResult]] = dataclasses.field(default_factory=list)
    failed: list[ReloadResult] = dataclasses.field(default_factory=list)

    def on_loaded(self, catalog: Catalog, result: ReloadResult) -> None:
        self.loaded.append((word_of(catalog), result))

    def on_failed(self, result: ReloadResult) -> None:
        self.failed.append(result)


@pytest.fixture(autouse=True)
def outside_any_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Git must not find the repository the tests run from above tmp_path."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if GIT is None:
        pytest.skip("git is not installed")
    root = write(tmp_path / "catalog", catalog_files("v1"))
    git(root, "init", "-q")
    commit_all(root, "v1")
    return root


# --- reload on change ------------------------------------------------------------------------


def test_a_new_commit_is_served_and_nothing_new_is_unchanged(repo: Path) -> None:
    calls = Calls()
    source = CatalogSource(repo, on_loaded=calls.on_loaded, on_failed=calls.on_failed)
    first = source.reload()
    assert (first.outcome, first.commit) == ("success", git(repo, "rev-parse", "HEAD"))
    assert word_of(source.current()) == "v1"

    unchanged = reloads("unchanged")
    assert [source.check().outcome for _ in range(3)] == ["unchanged"] * 3
    assert reloads("unchanged") == unchanged + 3

    write(repo, {"actions/check.yaml": action("check", "v2")})
    v2 = commit_all(repo, "v2")
    success = reloads("success")
    result = source.check()
    assert (result.outcome, result.commit, result.version) == ("success", v2, v2[:12])
    assert word_of(source.current()) == "v2"
    assert source.current().commit == v2 and not source.current().dirty
    assert reloads("success") == success + 1
    assert [word for word, _ in calls.loaded] == ["v1", "v2"]
    assert calls.failed == []


def test_a_commit_that_changes_nothing_in_the_catalog_still_names_the_new_commit(
    repo: Path,
) -> None:
    source = CatalogSource(repo)
    source.reload()
    (repo / "README.md").write_text("not part of the catalog\n", "utf-8")
    head = commit_all(repo, "docs")
    assert source.check().outcome == "success"
    assert source.current().commit == head


def test_an_edit_not_yet_committed_is_served_as_dirty(repo: Path) -> None:
    source = CatalogSource(repo)
    source.reload()
    write(repo, {"actions/check.yaml": action("check", "v1b")})
    assert source.check().outcome == "success"
    assert source.current().dirty and source.current().version.endswith("-dirty")


def test_a_same_size_rewrite_right_after_a_load_is_seen(tmp_path: Path) -> None:
    """In place, same length, within the file system's timestamp granularity: the stat
    data may not change, so recently written files are compared by content."""
    root = write(tmp_path / "catalog", catalog_files("v0"))
    source = CatalogSource(root, with_git=False)
    source.reload()
    for n in range(1, 20):
        with open(root / "actions/check.yaml", "r+b") as f:
            f.write(action("check", f"v{n % 10}").encode())
        assert source.check().outcome == "success", n
        assert word_of(source.current()) == f"v{n % 10}"


def test_results_carry_the_injected_clock(tmp_path: Path) -> None:
    ticks = iter(range(100, 200, 5))
    root = write(tmp_path / "catalog", catalog_files("v1"))
    source = CatalogSource(root, with_git=False, clock=lambda: float(next(ticks)))
    result = source.reload()
    assert (result.at, result.seconds) == (105.0, 5.0)


# --- never a broken catalog ------------------------------------------------------------------


def test_a_broken_commit_after_a_good_one_keeps_serving_the_good_one(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    source = CatalogSource(repo, on_loaded=calls.on_loaded, on_failed=calls.on_failed)
    good = source.reload()
    (repo / "runbooks/web.yaml").write_text(
        "kind: runbook\nid: web\nmatch: {services: [web]\nsteps: []\n", "utf-8"
    )
    bad_commit = commit_all(repo, "broken")

    failed = reloads("failed")
    with caplog.at_level(logging.ERROR, logger="bot.catalog.source"):
        result = source.check()
    assert result.outcome == "failed" and not result.ok
    assert result.commit == bad_commit
    assert reloads("failed") == failed + 1
    assert source.current().commit == good.commit  # the last good one keeps serving
    assert source.last_failure == result
    report = result.report()
    assert f"not loaded; still serving {good.version}" in report
    assert "runbooks/web.yaml:4:1: error RB001 [yaml-syntax]" in report
    assert "runbooks/web.yaml:4:1" in caplog.text  # logged with file:line
    assert calls.failed == [result]

    # Looking again changes nothing and says nothing new; SIGHUP reports it again.
    caplog.clear()
    assert source.check().outcome == "unchanged"
    assert reloads("failed") == failed + 1 and caplog.text == ""
    assert source.reload(force=True).outcome == "failed"
    assert len(calls.failed) == 2

    write(
        repo, {"runbooks/web.yaml": runbook("check"), "actions/check.yaml": action("check", "v3")}
    )
    fixed = commit_all(repo, "fixed")
    assert source.check().outcome == "success"
    assert (source.current().commit, source.last_failure) == (fixed, None)
    assert [word for word, _ in calls.loaded] == ["v1", "v3"]


def test_reverting_a_broken_change_clears_the_failure(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    source = CatalogSource(root, with_git=False)
    source.reload()
    good = (root / "actions/check.yaml").read_text()
    (root / "actions/check.yaml").write_text("id: check\ncommand: [echo\n", "utf-8")
    assert source.check().outcome == "failed"
    (root / "actions/check.yaml").write_text(good, "utf-8")
    assert source.check().outcome == "unchanged"
    assert source.last_failure is None


def test_errors_at_start_serve_nothing_and_say_why(tmp_path: Path) -> None:
    root = write(
        tmp_path / "catalog", {**catalog_files("v1"), "runbooks/web.yaml": runbook("nope")}
    )
    source = CatalogSource(root, with_git=False)
    result = source.reload()
    assert result.outcome == "failed" and not source.loaded
    assert "still serving nothing (no good catalog yet)" in result.reason
    with pytest.raises(CatalogUnavailable, match="RB021"):
        source.current()
    with pytest.raises(CatalogUnavailable):
        source.snapshot()


def big_file(root: Path) -> None:
    (root / "big.yaml").write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))


def symlink_loop(root: Path) -> None:
    (root / "loop.yaml").symlink_to("loop.yaml")


def parse_error(root: Path) -> None:
    (root / "runbooks/web.yaml").write_text("kind: runbook\nid: [\n", "utf-8")


def root_gone(root: Path) -> None:
    shutil.rmtree(root)


def emptied(root: Path) -> None:
    for path in root.rglob("*.yaml"):
        path.unlink()


def not_utf8(root: Path) -> None:
    (root / "latin1.yaml").write_bytes(b"id: caf\xe9\ncommand: x\n")


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (parse_error, "RB001"),
        (big_file, "RB004"),
        (symlink_loop, "RB001"),
        (not_utf8, "RB001"),
        (root_gone, "RB009"),
        (emptied, "no catalog files"),
    ],
    ids=["parse-error", "huge-file", "symlink-loop", "not-utf8", "root-gone", "emptied"],
)
def test_bad_input_keeps_the_last_good_catalog(
    tmp_path: Path, damage: Callable[[Path], None], says: str
) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    source = CatalogSource(root, with_git=False)
    good = source.reload()
    damage(root)
    result = source.check()
    assert result.outcome == "failed"
    assert says in result.report()
    assert source.current() is not None and word_of(source.current()) == "v1"
    assert source.current().version == good.version


def test_a_folder_symlink_loop_is_walked_once(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    (root / "actions/back").symlink_to("..")
    source = CatalogSource(root, with_git=False)
    assert source.reload().outcome == "success"
    assert source.fingerprint().paths == (
        "catalog.yaml",
        "actions/check.yaml",
        "runbooks/web.yaml",
    )


# --- consistent snapshots: changes during the read -----------------------------------------


class Gate:
    """A FIFO catalog file: each read of it waits for this gate, which runs `during` on its
    first round only, while the reader is stopped at that file. (`rounds` counts opens,
    which may outnumber reads: the gate may open again before the reader has closed.)"""

    def __init__(self, path: Path, during: Callable[[], None]) -> None:
        self.path = path
        self.during = during
        self.rounds = 0
        self.stopping = False
        os.mkfifo(path)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY)  # waits for the reader
            except FileNotFoundError:  # `during` removed the gate's folder: its work is done
                return
            try:
                if self.stopping:
                    return
                self.rounds += 1
                self.round()
            finally:
                os.close(fd)  # the reader sees an empty file and goes on
            # Opening again succeeds while the reader still holds the FIFO (it then just
            # sees another empty file); a pause keeps that loop from spinning.
            time.sleep(0.001)

    def round(self) -> None:
        if self.rounds == 1:
            self.during()

    def stop(self) -> None:
        self.stopping = True
        if os.path.exists(self.path):
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(5)
            os.close(fd)


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    made: list[Gate] = []
    yield made
    for gate in made:
        gate.stop()


def replace_file(path: Path, text: str) -> None:
    """Write by rename, as git checkout and editors do: readers see old or new, whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, "utf-8")
    os.replace(temporary, path)


def test_a_change_between_two_files_is_never_half_loaded(tmp_path: Path, gates: list[Gate]) -> None:
    # Read order: a-action.yaml, catalog.yaml, m.yaml (the gate), z-runbook.yaml. The gate
    # renames the action and the runbook's reference to it at once: the first read would
    # see the old action with the new runbook, a catalog that never existed (RB021).
    root = write(
        tmp_path / "catalog",
        {
            "catalog.yaml": SETTINGS,
            "a-action.yaml": action("check", "v1"),
            "z-runbook.yaml": runbook("check"),
        },
    )

    def rename_the_action() -> None:
        replace_file(root / "a-action.yaml", action("check-v2", "v2"))
        replace_file(root / "z-runbook.yaml", runbook("check-v2"))

    gates.append(Gate(root / "m.yaml", rename_the_action))
    calls = Calls()
    source = CatalogSource(root, with_git=False, on_failed=calls.on_failed)
    failed = reloads("failed")
    result = source.reload()
    assert result.outcome == "success", result.report()  # read again, after the change
    (step,) = source.current().runbook("web").steps  # type: ignore[union-attr]
    assert step.action.id == "check-v2" and list(source.current().actions) == ["check-v2"]
    assert calls.failed == [] and reloads("failed") == failed


def test_a_file_deleted_mid_read_is_read_again_without_it(
    tmp_path: Path, gates: list[Gate]
) -> None:
    root = write(
        tmp_path / "catalog",
        {**catalog_files("v1"), "z-extra.yaml": action("extra", "x")},
    )
    gates.append(Gate(root / "m.yaml", lambda: (root / "z-extra.yaml").unlink()))
    source = CatalogSource(root, with_git=False)
    result = source.reload()
    assert result.outcome == "success", result.report()
    assert set(source.current().actions) == {"check"}


def test_a_directory_swapped_mid_read_serves_the_new_one_whole(
    tmp_path: Path, gates: list[Gate]
) -> None:
    """git-sync: `current` flips from one checkout to the next, and the old one is removed
    while the bot may still be reading it."""
    v1 = write(tmp_path / "v1", catalog_files("v1"))
    v2 = write(tmp_path / "v2", catalog_files("v2"))
    current = tmp_path / "current"
    current.symlink_to("v1")

    def swap() -> None:
        (tmp_path / "current.new").symlink_to("v2")
        os.replace(tmp_path / "current.new", current)
        shutil.rmtree(v1)

    gates.append(Gate(v1 / "m.yaml", swap))
    calls = Calls()
    source = CatalogSource(current, with_git=False, on_loaded=calls.on_loaded)
    result = source.reload()
    assert result.outcome == "success", result.report()
    assert [word for word, _ in calls.loaded] == ["v2"]
    assert source.fingerprint().resolved == str(v2.resolve())
    assert source.current().root == str(current)  # named as configured


def test_a_directory_that_never_settles_is_not_loaded(tmp_path: Path, gates: list[Gate]) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    gates.append(Gate(root / "m.yaml", lambda: None))
    source = CatalogSource(root, with_git=False)
    assert source.reload().outcome == "success"
    gates[0].stop()
    gates.clear()
    (root / "m.yaml").unlink()

    # Every read finds another file changed since it started: a gate that edits on each
    # of its rounds.
    class Restless(Gate):
        def round(self) -> None:
            replace_file(root / "z.yaml", action("z", f"z{self.rounds}"))

    gates.append(Restless(root / "m.yaml", lambda: None))
    result = source.reload()
    assert result.outcome == "failed"
    assert "kept changing while it was read" in result.reason
    assert word_of(source.current()) == "v1"


# --- where the commit comes from -----------------------------------------------------------


def git_sync(repo: Path, root: Path, commit: str) -> None:
    """Publish `commit` the way git-sync v4 does: a worktree named after the commit under
    <root>/.worktrees, and the `current` link flipped to it atomically."""
    worktree = root / ".worktrees" / commit
    git(repo, "worktree", "add", "-q", "--detach", str(worktree), commit)
    link = root / "current.new"
    link.symlink_to(Path(".worktrees") / commit)
    os.replace(link, root / "current")


@pytest.mark.parametrize("with_git", [True, False], ids=["git", "no-git"])
def test_git_sync_commits_are_named_with_or_without_git(tmp_path: Path, with_git: bool) -> None:
    if GIT is None:
        pytest.skip("git is not installed")
    upstream = write(
        tmp_path / "upstream", {f"runbooks/{k}": v for k, v in catalog_files("v1").items()}
    )
    git(upstream, "init", "-q")
    first = commit_all(upstream, "v1")
    synced = tmp_path / "git"
    synced.mkdir()
    git_sync(upstream, synced, first)

    catalog_dir = synced / "current" / "runbooks"  # what the chart sets RUNBOOK_CATALOG to
    assert commit_from_path(catalog_dir) == first
    source = CatalogSource(catalog_dir, with_git=with_git)
    assert source.reload().commit == first

    write(upstream, {"runbooks/actions/check.yaml": action("check", "v2")})
    second = commit_all(upstream, "v2")
    git_sync(upstream, synced, second)
    result = source.check()
    assert (result.outcome, result.commit) == ("success", second)
    assert word_of(source.current()) == "v2" and source.current().version == second[:12]


def test_the_commit_setting_wins_and_a_plain_folder_is_unversioned(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    plain = CatalogSource(root)
    assert plain.reload().version == "unversioned"  # nothing says which commit it is
    assert plain.current().commit is None
    pinned = CatalogSource(root, commit_override="0123456789abcdef0123456789abcdef01234567")
    assert pinned.reload().version == "0123456789ab"
    assert pinned.fingerprint().git == ()  # the setting wins: Git is not even looked at


def test_a_configmap_update_is_seen(tmp_path: Path) -> None:
    """The kubelet's layout: files are links through `..data`, which it flips atomically."""
    mount = tmp_path / "catalog"
    mount.mkdir()

    def publish(files: dict[str, str], stamp: str) -> None:
        hidden = mount / f"..{stamp}"
        write(hidden, {name.replace("/", "_"): text for name, text in files.items()})
        (mount / "..data_tmp").symlink_to(hidden.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        for name in files:
            link = mount / name.replace("/", "_")
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name.replace("/", "_"))

    publish(catalog_files("v1"), "2024_01_01")
    source = CatalogSource(mount, with_git=False)
    assert source.reload().outcome == "success"
    publish(catalog_files("v2"), "2024_01_02")
    assert source.check().outcome == "success"
    assert word_of(source.current()) == "v2"


# --- snapshots ---------------------------------------------------------------------------


def test_the_snapshot_round_trip_serves_the_same_catalog(repo: Path) -> None:
    source = CatalogSource(repo)
    source.reload()
    snapshot = source.snapshot()
    assert snapshot == source.snapshot()  # the same catalog, the same bytes

    # Next start: the directory has errors; the database still has the snapshot.
    (repo / "runbooks/web.yaml").write_text("steps: [\n", "utf-8")
    commit_all(repo, "broken")
    calls = Calls()
    restarted = CatalogSource(repo, on_loaded=calls.on_loaded)
    assert restarted.reload().outcome == "failed"
    restored = restarted.restore(snapshot)
    assert restored == source.current()
    assert restarted.current() == source.current()
    assert restarted.current().version == source.current().version
    assert restarted.last_failure is not None  # the directory's problem is still reported
    assert restarted.check().outcome == "unchanged"  # and not linted again every check

    write(
        repo, {"runbooks/web.yaml": runbook("check"), "actions/check.yaml": action("check", "v2")}
    )
    commit_all(repo, "fixed")
    assert restarted.check().outcome == "success"
    assert word_of(restarted.current()) == "v2" and restarted.last_failure is None


def test_start_falls_back_to_the_stored_catalog_else_refuses(repo: Path) -> None:
    first = CatalogSource(repo)
    assert first.start(None).outcome == "success"
    stored = first.snapshot()
    (repo / "actions/check.yaml").write_text("id: check\n", "utf-8")  # no command: RB010
    commit_all(repo, "broken")

    with_stored = CatalogSource(repo)
    result = with_stored.start(stored)
    assert result.outcome == "failed"  # what the directory holds, for the log and /readyz
    assert with_stored.current() == first.current()

    without = CatalogSource(repo)
    with pytest.raises(CatalogUnavailable) as refused:
        without.start(None)
    assert "actions/check.yaml:1:1: error RB010" in str(refused.value)
    with pytest.raises(CatalogUnavailable):
        CatalogSource(repo).start(b"not a snapshot")


def test_from_snapshot_and_a_directory_equal_to_it(repo: Path) -> None:
    source = CatalogSource(repo)
    source.reload()
    again = CatalogSource.from_snapshot(source.snapshot(), repo)
    assert again.current() == source.current()
    assert again.check().outcome == "unchanged"  # the directory holds the same catalog


def test_snapshots_that_cannot_be_served_are_refused(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    source = CatalogSource(root, with_git=False)
    source.reload()
    snapshot = source.snapshot()
    with pytest.raises(CatalogUnavailable, match="unreadable"):
        CatalogSource.from_snapshot(snapshot[:20], root)
    with pytest.raises(CatalogUnavailable, match="not one this bot can read"):
        CatalogSource.from_snapshot(b'{"format": "something else"}', root)
    # A snapshot this version's rules reject (here: edited by hand) is not served either.
    document = json.loads(gzip.decompress(snapshot))
    document["files"] = [["runbooks/web.yaml", runbook("missing")]]
    with pytest.raises(CatalogError, match="RB021"):
        CatalogSource.from_snapshot(json.dumps(document).encode(), root)


# --- one reload at a time: SIGHUP, the loop ----------------------------------------------------


def test_a_sighup_storm_reloads_one_at_a_time_and_coalesces(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    entered, release = threading.Event(), threading.Event()
    events: list[str] = []

    def on_loaded(catalog: Catalog, result: ReloadResult) -> None:
        events.append(f"loaded {word_of(catalog)}")
        if word_of(catalog) == "v2":
            entered.set()
            assert release.wait(10)
            events.append("v2 done")

    source = CatalogSource(root, with_git=False, on_loaded=on_loaded)
    source.reload()
    stop = threading.Event()
    loop = threading.Thread(target=source.run, args=(stop, 0))
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: source.request_reload())
    try:
        loop.start()
        write(root, {"actions/check.yaml": action("check", "v2")})
        os.kill(os.getpid(), signal.SIGHUP)
        assert entered.wait(10)  # the v2 reload is under way, held in on_loaded

        # A check from another thread waits for it; a storm of signals meanwhile.
        checker = threading.Thread(target=lambda: events.append(f"check {source.check().outcome}"))
        checker.start()
        write(root, {"actions/check.yaml": action("check", "v3")})
        for _ in range(200):
            os.kill(os.getpid(), signal.SIGHUP)
        assert source.reload_pending
        release.set()
        wait_until(lambda: word_of(source.current()) == "v3")
        checker.join(10)
    finally:
        signal.signal(signal.SIGHUP, previous)
        stop.set()
        source.close()
        loop.join(10)
    assert not loop.is_alive()
    # v2 finished before anything else started; the storm became one reload (v3), which
    # either the waiting check or the loop made, never both at once.
    assert events[:3] == ["loaded v1", "loaded v2", "v2 done"]
    assert events.count("loaded v3") == 1
    assert sorted(events[3:]) in (
        ["check success", "loaded v3"],
        ["check unchanged", "loaded v3"],
    )


def test_the_loop_checks_periodically_and_stops_when_asked(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    source = CatalogSource(root, with_git=False)
    source.reload()
    stop = threading.Event()
    loop = threading.Thread(target=source.run, args=(stop, 0.05))
    loop.start()
    try:
        write(root, {"actions/check.yaml": action("check", "v2")})
        wait_until(lambda: word_of(source.current()) == "v2")
    finally:
        stop.set()
        loop.join(5)
    assert not loop.is_alive()


def test_close_ends_the_loop_at_once_even_without_periodic_checks(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))
    source = CatalogSource(root, with_git=False)
    stop = threading.Event()
    loop = threading.Thread(target=source.run, args=(stop, 0))
    loop.start()
    source.request_reload()  # the first load may come from SIGHUP too
    wait_until(lambda: source.loaded)
    source.close()
    loop.join(5)
    assert not loop.is_alive()


def test_a_failing_callback_does_not_undo_the_reload(tmp_path: Path) -> None:
    root = write(tmp_path / "catalog", catalog_files("v1"))

    def broken(catalog: Catalog, result: ReloadResult) -> None:
        raise RuntimeError("the caller's bug")

    source = CatalogSource(root, with_git=False, on_loaded=broken)
    assert source.reload().outcome == "success"
    assert word_of(source.current()) == "v1"


# --- the reload reads what lint reads ----------------------------------------------------------


def lint_case_dirs() -> list[Path]:
    return [*sorted(p for p in CASES.iterdir() if p.is_dir()), BUNDLED]


@pytest.mark.parametrize("case", lint_case_dirs(), ids=lambda p: p.name)
def test_parse_contents_agrees_with_parse_catalog(case: Path) -> None:
    contents = [FileContent(path, path.read_bytes()) for path in discover_files(case)]
    from_bytes = parse_contents(case, contents)
    from_disk = parse_catalog(case)
    assert from_bytes.diagnostics == from_disk.diagnostics
    assert [(d.file, d.kind, d.data) for d in from_bytes.docs] == [
        (d.file, d.kind, d.data) for d in from_disk.docs
    ]


def test_the_bundled_catalog_reloads_as_it_loads() -> None:
    source = CatalogSource(BUNDLED, with_git=False)
    assert source.reload().outcome == "success"
    assert source.current() == load_catalog(BUNDLED, with_git=False)


def test_the_files_watched_are_the_files_lint_reads(tmp_path: Path) -> None:
    root = write(
        tmp_path / "catalog",
        {
            **catalog_files("v1"),
            ".hidden/ignored.yaml": "x: 1\n",
            "actions/.swap.yaml": "x: 1\n",
            "notes.txt": "not yaml\n",
            "more/extra.yml": action("extra", "x"),
            "tests/payments.yaml": "kind: test\nnot: a catalog document\n",
            "more/tests/nested.yaml": action("nested", "x"),  # only the root's tests/
        },
    )
    (root / "linked").symlink_to("actions")  # the same folder twice: once
    (root / "more/up").symlink_to("..")  # a loop
    (root / "dangling.yaml").symlink_to("nowhere.yaml")
    expected = [path.relative_to(root).as_posix() for path in discover_files(root)]
    assert list(CatalogSource(root).fingerprint().paths) == expected
    assert "dangling.yaml" in expected and "linked/check.yaml" not in expected
    assert "tests/payments.yaml" not in expected and "more/tests/nested.yaml" in expected


def test_a_change_to_the_runbook_tests_reloads_nothing(repo: Path) -> None:
    calls = Calls()
    source = CatalogSource(repo, on_loaded=calls.on_loaded, on_failed=calls.on_failed)
    source.reload()
    # not even a broken one: runbook tests are not the catalog (runbookctl test reads them)
    write(repo, {"tests/web.yaml": "kind: test\nsteps: [unclosed\n"})
    assert source.check().outcome == "unchanged"
    head = commit_all(repo, "a runbook test")
    result = source.check()
    assert (result.outcome, result.commit) == ("success", head)  # a new commit, same files
    assert word_of(source.current()) == "v1" and not calls.failed


def test_a_commit_on_a_branch_checked_out_since_is_seen(repo: Path) -> None:
    source = CatalogSource(repo)
    source.reload()
    git(repo, "checkout", "-q", "-b", "hotfix")
    assert source.check().outcome == "unchanged"  # HEAD moved, to the same commit
    (repo / "NOTES.md").write_text("outside the catalog\n", "utf-8")
    head = commit_all(repo, "notes on the hotfix branch")
    assert source.check().outcome == "success"
    assert source.current().commit == head


def test_checking_the_commit_never_locks_the_index(repo: Path) -> None:
    """The bot asks Git at every catalog check. A plain `git status` refreshes a stale
    index under .git/index.lock, so a person's commit (or git-sync) in the same checkout
    at that moment fails with "index.lock: File exists"; the bot's check writes nothing."""
    from bot.catalog.loader import git_commit

    check = repo / "actions" / "check.yaml"
    os.utime(check, ns=(0, 0))  # same content, stale stat data in the index
    index = repo / ".git" / "index"
    before = index.stat()
    assert git_commit(repo) == (git(repo, "rev-parse", "HEAD"), False)
    after = index.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    git(repo, "status", "--porcelain")  # what a plain status does: the index is rewritten
    assert index.stat().st_mtime_ns != before.st_mtime_ns or index.stat().st_ino != before.st_ino
