"""Benchmark: `runbookctl lint` against check-jsonschema on the same generated catalog.

    python bench/bench_lint.py [--runbooks 2000] [--steps 20000] [--actions 200] [--runs 3]

Generates a catalog (bench/gen_catalog.py) into a temporary directory, then times, as
subprocesses, wall clock, best of ``--runs``:

  * ``runbookctl lint DIR``: YAML with positions, the schema, and every semantic rule;
  * ``check-jsonschema --schemafile bot/catalog/schema.json FILE...``: the schema only.

Both must succeed on the generated catalog (it is valid and lint-clean), or the numbers
would compare an early exit. The figure that matters is the ratio, measured in one run
on one machine: lint / check-jsonschema, lower is better, the target is below 1.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gen_catalog import generate  # noqa: E402  (a sibling script, not a package)

REPO = HERE.parent
SCHEMA = REPO / "bot" / "catalog" / "schema.json"


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


def best_of(runs: int, argv: list[str], cwd: Path) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-2000:]
            raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{tail}")
        best = min(best, elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runbooks", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--actions", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-lint-") as tmp:
        root = Path(tmp)
        files = generate(root, args.runbooks, args.steps, args.actions)
        paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
        print(
            f"catalog: {files} files, {args.runbooks} runbooks, {args.steps} steps, "
            f"{args.actions} actions; best of {args.runs} runs, wall clock"
        )
        lint = best_of(args.runs, [*tool("runbookctl"), "lint", "--strict", "."], root)
        print(f"runbookctl lint --strict:  {lint:8.2f} s  (schema + semantic rules)")
        reference = best_of(
            args.runs, [*tool("check-jsonschema"), "--schemafile", str(SCHEMA), *paths], root
        )
        print(f"check-jsonschema:          {reference:8.2f} s  (schema only)")
        print(f"ratio lint / check-jsonschema: {lint / reference:.2f} (target: < 1)")


if __name__ == "__main__":
    main()
