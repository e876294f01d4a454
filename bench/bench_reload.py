"""Benchmark: live reload of the catalog (bot.catalog.source), and what watching costs.

    python bench/bench_reload.py [--runbooks 2000] [--steps 20000] [--actions 200]
                                 [--runs 7] [--checks 2000]

For the bundled catalog and a generated one (bench/gen_catalog.py), each in its own Git
repository in a temporary directory:

  * **commit → served**: a commit changes one action file; from the moment `git commit`
    returns until `CatalogSource.current()` returns a catalog with the new commit, with
    the reload asked for the way SIGHUP asks (`request_reload()`, served by the `run()`
    thread). Median and range over ``--runs``. With periodic checks instead of SIGHUP,
    add up to ``RUNBOOK_CATALOG_REFRESH`` (10 s) of waiting. Reference: loading the same
    directory once with `load_catalog` (what a restart did), measured the same way.
  * **CPU per check**: process CPU time of ``--checks`` no-change `check()` calls, per
    call, against two references doing the least a change detector can do: one
    `os.stat` per catalog file (paths known in advance), and an `os.walk` of the tree
    with an `os.stat` of every YAML file. The share of one core at the default refresh
    (10 s) follows.

Subject and reference are measured in turns, so other load on the machine falls on both:
read the ratios, not the absolute times, when the machine is busy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from gen_catalog import generate  # noqa: E402  (a sibling script, not a package)

from bot.catalog import Catalog, load_catalog  # noqa: E402
from bot.catalog.source import CatalogSource, ReloadResult  # noqa: E402

DEFAULT_REFRESH_SECONDS = 10.0


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Bench", "-c", "user.email=bench@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def make_repo(root: Path) -> None:
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "catalog")


def change_and_commit(root: Path, target: Path, n: int) -> str:
    with target.open("a", encoding="utf-8") as f:
        f.write(f"# change {n}\n")
    git(root, "commit", "-q", "-a", "-m", f"change {n}")
    return git(root, "rev-parse", "HEAD")


def reload_times(root: Path, runs: int) -> tuple[list[float], list[float]]:
    """Commit → served, and the reference load, taken in turns so that noise from other
    processes on the machine falls on both alike."""
    served = threading.Event()
    wanted: list[str] = []

    def on_loaded(catalog: Catalog, result: ReloadResult) -> None:
        # Runs right after current() starts returning the new catalog.
        if wanted and catalog.commit == wanted[-1]:
            served.set()

    source = CatalogSource(root, on_loaded=on_loaded)
    first = source.reload()
    if first.outcome != "success":
        raise SystemExit(f"{root} does not load:\n{first.report()}")
    target = next(p for p in sorted(root.rglob("*.yaml")) if "actions" in p.parts)
    stop = threading.Event()
    loop = threading.Thread(target=source.run, args=(stop, 0), daemon=True)
    loop.start()
    reloads: list[float] = []
    loads: list[float] = []
    try:
        for n in range(runs):
            wanted.append(change_and_commit(root, target, n))
            served.clear()
            start = time.perf_counter()
            source.request_reload()
            if not served.wait(300):
                raise SystemExit(f"reload never served {wanted[-1]}: {source.last_failure}")
            reloads.append(time.perf_counter() - start)
            assert source.current().commit == wanted[-1]

            start = time.perf_counter()
            load_catalog(root)  # what a restart did, and still does at start
            loads.append(time.perf_counter() - start)
    finally:
        stop.set()
        source.close()
        loop.join(10)
    return reloads, loads


def cpu_per_call(fns: list[Callable[[], object]], calls: int, rounds: int = 10) -> list[float]:
    """Process CPU per call of each function, in `rounds` interleaved blocks."""
    for fn in fns:
        fn()  # warm caches, as a long-running bot's are
    spent = [0.0] * len(fns)
    block = max(1, calls // rounds)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.process_time()
            for _ in range(block):
                fn()
            spent[i] += time.process_time() - start
    return [total / (block * rounds) for total in spent]


def stat_each(paths: list[str]) -> Callable[[], object]:
    def run() -> object:
        return [os.stat(p) for p in paths]

    return run


def walk_and_stat(root: Path) -> Callable[[], object]:
    def run() -> object:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.stat(os.path.join(dirpath, f)) for f in filenames if f.endswith(".yaml")]
        return found

    return run


def check_cost(root: Path, calls: int) -> tuple[float, float, float, int]:
    source = CatalogSource(root)
    source.reload()
    assert source.check().outcome == "unchanged"
    paths = [str(root / rel) for rel in source.fingerprint().paths]
    check, stat_ref, walk_ref = cpu_per_call(
        [source.check, stat_each(paths), walk_and_stat(root)], calls
    )
    return check, stat_ref, walk_ref, len(paths)


def spread(values: list[float], unit: float, fmt: str) -> str:
    return (
        f"median {statistics.median(values) / unit:{fmt}} "
        f"(range {min(values) / unit:{fmt}}–{max(values) / unit:{fmt}})"
    )


def bench(name: str, root: Path, runs: int, checks: int) -> None:
    make_repo(root)
    served, restart = reload_times(root, runs)
    check, stat_ref, walk_ref, files = check_cost(root, checks)
    print(f"\n{name}: {files} files")
    print(f"  commit → served (SIGHUP):   {spread(served, 1e-3, '.1f')} ms over {runs} commits")
    print(f"  reference, load_catalog:    {spread(restart, 1e-3, '.1f')} ms")
    ratio = statistics.median(served) / statistics.median(restart)
    print(f"    ratio reload / load:      {ratio:.2f}")
    print(f"  CPU per no-change check():  {check * 1e6:,.0f} µs")
    print(f"  reference, os.stat per file:{stat_ref * 1e6:,.0f} µs ({check / stat_ref:.1f}×)")
    print(f"  reference, os.walk + stat:  {walk_ref * 1e6:,.0f} µs ({check / walk_ref:.1f}×)")
    share = check / DEFAULT_REFRESH_SECONDS * 100
    print(f"  one core at RUNBOOK_CATALOG_REFRESH=10: {share:.4f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runbooks", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--actions", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--checks", type=int, default=2000)
    args = parser.parse_args()
    if shutil.which("git") is None:
        raise SystemExit("git is not installed")
    os.environ.pop("RUNBOOK_CATALOG_COMMIT", None)
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as scratch:
        os.environ["GIT_CEILING_DIRECTORIES"] = scratch
        bundled = Path(scratch, "bundled")
        shutil.copytree(REPO / "runbooks", bundled)
        bench("bundled catalog", bundled, args.runs, args.checks)
        generated = Path(scratch, "generated")
        generate(generated, args.runbooks, args.steps, args.actions)
        label = f"generated catalog ({args.runbooks} runbooks, {args.steps} steps)"
        bench(label, generated, args.runs, max(20, args.checks // 20))


if __name__ == "__main__":
    main()
