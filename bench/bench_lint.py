"""Benchmark: `runbookctl lint` against the YAML parse floor and check-jsonschema.

    python bench/bench_lint.py [--sizes 200,2000,8000] [--runs 5] [--jobs N] [--cache]

For each size N, generates a catalog of N runbook files (10 steps each) and N/10 actions
(bench/gen_catalog.py) into a temporary directory, then times, as subprocesses, wall
clock, round-robin so that drift of the machine hits all three alike:

  * ``runbookctl lint --strict DIR``: YAML with positions, the schema, every semantic rule;
  * the parse floor: a Python that only reads every file of DIR with PyYAML's C loader
    (``yaml.load(text, Loader=yaml.CSafeLoader)``): no positions, no schema, no rules;
  * ``check-jsonschema --schemafile bot/catalog/schema.json FILE...``: the schema only.

Lint and check-jsonschema must succeed on the generated catalog (it is valid and
lint-clean), or the numbers would compare an early exit. The figures that matter are
the ratios, each taken within one round and summarised over the rounds as the median
and the range: lint / floor (target: at most 3) and lint / check-jsonschema (target:
below 1). ``--jobs`` is passed to lint (default: lint decides); ``--cache`` adds lint
with a warm ``--cache DIR`` (what CI sees when few files changed).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gen_catalog import duplicate_share, generate  # noqa: E402  (a sibling script)

REPO = HERE.parent
SCHEMA = REPO / "bot" / "catalog" / "schema.json"

# What "merely parsing the same files" means: discover them as lint does, read each,
# and build its Python data with the C loader.
FLOOR = """
import os, sys, yaml
for folder, dirs, names in os.walk(sys.argv[1]):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(names):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(folder, name), "rb") as f:
                yaml.load(f.read(), Loader=yaml.CSafeLoader)
"""


def tool(name: str) -> list[str]:
    """The console script next to this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "runbookctl":
        return [sys.executable, "-m", "runbookctl"]
    raise SystemExit(f"{name} is not installed: pip install -e '.[bench]'")


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-2000:]
        raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{tail}")
    return elapsed


def spread(values: list[float], unit: str = "") -> str:
    """Median and range, e.g. `1.93 (1.85-2.10)`."""
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f}{unit})"


def bench_size(runbooks: int, runs: int, jobs: int | None, cache: bool) -> None:
    actions = max(20, runbooks // 10)
    with tempfile.TemporaryDirectory(prefix="bench-lint-") as tmp:
        root = Path(tmp) / "catalog"
        files = generate(root, runbooks, runbooks * 10, actions)
        paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
        lint_argv = [*tool("runbookctl"), "lint", "--strict", "."]
        if jobs is not None:
            lint_argv[-1:-1] = ["--jobs", str(jobs)]
        commands = {
            "lint": lint_argv,
            "floor": [sys.executable, "-c", FLOOR, "."],
            "check-jsonschema": [*tool("check-jsonschema"), "--schemafile", str(SCHEMA), *paths],
        }
        if cache:
            warm = [*lint_argv[:-1], "--cache", str(Path(tmp) / "lint-cache"), "."]
            timed(warm, root)  # fill it
            commands["lint --cache (warm)"] = warm
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, argv in commands.items():
                times[name].append(timed(argv, root))
        print(
            f"\n{runbooks} runbook files + {actions} actions + catalog.yaml = {files} files, "
            f"{runbooks * 10} steps ({duplicate_share(root):.0%} repeat an earlier step); "
            f"{runs} rounds, seconds, median (range)"
        )
        for name, values in times.items():
            print(f"  {name:<22} {spread(values, ' s')}")
        for name in [n for n in commands if n.startswith("lint")]:
            floor = [a / b for a, b in zip(times[name], times["floor"], strict=True)]
            reference = [a / b for a, b in zip(times[name], times["check-jsonschema"], strict=True)]
            print(f"  {name} / floor:            {spread(floor)}  (target: <= 3)")
            print(f"  {name} / check-jsonschema: {spread(reference)}  (target: < 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="200,2000,8000",
        help="runbook files per catalog, comma-separated (default: 200,2000,8000)",
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds per size (default: 5)")
    parser.add_argument("--jobs", type=int, default=None, help="passed to runbookctl lint")
    parser.add_argument("--cache", action="store_true", help="also time lint --cache, warm")
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        bench_size(size, args.runs, args.jobs, args.cache)


if __name__ == "__main__":
    main()
