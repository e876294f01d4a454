"""`runbookctl test`: run the runbook tests beside the catalog, like pytest runs tests.

A thin shell over `bot.runbooktests`: find the test files and their catalog, print what
failed with the expected and actual path and the test's file:line, then `N passed, N
failed`. Exit codes like lint's: 0 all passed, 1 a test failed or a test file (or the
catalog) has errors, 2 usage errors (click). Nothing is executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bot.catalog.diagnostics import Diagnostic
from runbookctl.common import default_catalog
from runbookctl.lint import format_github, format_text

if TYPE_CHECKING:
    from bot.catalog.model import Catalog
    from bot.runbooktests.runner import Verdict

FORMATS = ("text", "json", "github")


@dataclass
class Target:
    """One catalog and the test files to run against it."""

    root: Path
    files: list[Path] = field(default_factory=list)
    whole_folder: bool = False  # the catalog's tests/ folder (vs. files named one by one)


@click.command(name="test")
@click.argument("paths", nargs=-1, type=click.Path(exists=True), metavar="[PATH | FILE...]")
@click.option(
    "--catalog",
    "catalog_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The catalog the tests run against (default: the nearest folder above each test "
    "file with a catalog.yaml).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="text for people, json for tools, github for GitHub Actions annotations.",
)
@click.option(
    "-k",
    "keyword",
    default=None,
    metavar="TEXT",
    help="Run only the tests whose name contains TEXT (case-insensitive).",
)
@click.option(
    "--verbose/--quiet",
    "-v/-q",
    default=False,
    show_default=True,
    help="Name every test with the path it took, not only the failures.",
)
def test(
    paths: tuple[str, ...],
    catalog_dir: str | None,
    output_format: str,
    keyword: str | None,
    verbose: bool,
) -> None:
    """Run the runbook tests of the catalog at PATH (its tests/ folder), or test FILEs.

    PATH defaults to $RUNBOOK_CATALOG or ./runbooks. Each test gives an incident and the
    outcome to assume for each step, and the path the runbook must take; it runs
    through the bot's engine, policy and environment rule with nothing executed. Exits
    0 when every test passes, 1 when a test fails or a test file or the catalog has
    errors, 2 on usage errors.
    """
    from bot.runbooktests import files as test_files
    from bot.runbooktests.runner import run_test

    targets = _targets(paths, catalog_dir)
    diagnostics: list[Diagnostic] = []
    verdicts: list[Verdict] = []
    catalog_problems: list[str] = []
    for target in targets:
        catalog, problems = _load(target.root)
        diagnostics.extend(problems)
        suite = test_files.read(target.files, _display)
        diagnostics.extend(suite.diagnostics)
        if catalog is None:
            catalog_problems.append(
                f"the catalog {_display(target.root)} has errors, so its tests cannot run: "
                "fix them first (runbookctl lint)"
            )
            continue
        if target.whole_folder and not target.files:
            catalog_problems.append(
                f"no runbook tests in {_display(test_files.catalog_tests_dir(target.root))}: "
                "write one (see docs/catalog.md, Runbook tests), or run `runbookctl test` "
                "on another catalog"
            )
        for case in suite.tests:
            if keyword and keyword.lower() not in case.name.lower():
                continue
            verdicts.append(run_test(catalog, case))
    errors = sum(1 for d in diagnostics if d.severity == "error") + len(catalog_problems)
    failed = sum(1 for v in verdicts if not v.passed)
    passed = len(verdicts) - failed
    if output_format == "json":
        click.echo(_json(verdicts, diagnostics, catalog_problems, passed, failed, errors))
    elif output_format == "github":
        for line in format_github(diagnostics):
            click.echo(line)
        for line in _github(verdicts):
            click.echo(line)
        for problem in catalog_problems:
            click.echo(f"::error title=runbookctl test::{_escape(problem)}")
        click.echo(summary(passed, failed, errors))
    else:
        for line in _text(verdicts, diagnostics, catalog_problems, verbose):
            click.echo(line)
        click.echo(summary(passed, failed, errors))
    if failed or errors:
        click.get_current_context().exit(1)


# --- what to run -------------------------------------------------------------------------------


def _targets(paths: Sequence[str], catalog_dir: str | None) -> list[Target]:
    """(catalog, test files) to run: a catalog directory runs its tests/ folder; a folder
    inside a catalog's tests/ folder, or a file, runs against that catalog (--catalog, or
    the nearest folder above holding catalog.yaml)."""
    from bot.catalog.loader import CATALOG_MARKERS, TESTS_FOLDER
    from bot.runbooktests import files as test_files

    def has_settings(folder: Path) -> bool:
        return any((folder / m).is_file() for m in CATALOG_MARKERS)

    def catalog_holding(folder: Path) -> Path | None:
        """The catalog whose tests/ folder is `folder` or holds it."""
        for candidate in (folder.absolute(), *folder.absolute().parents):
            if candidate.name == TESTS_FOLDER and has_settings(candidate.parent):
                return candidate.parent
        return None

    chosen = Path(catalog_dir) if catalog_dir is not None else None
    if not paths:
        root = chosen or Path(default_catalog())
        if not root.is_dir():
            raise click.BadParameter(
                f"catalog directory {str(root)!r} does not exist", param_hint="'PATH'"
            )
        paths = (str(root),)
    targets: dict[Path, Target] = {}

    def add(root: Path, files: list[Path], whole: bool = False) -> None:
        target = targets.setdefault(root.resolve(), Target(root))
        target.whole_folder = target.whole_folder or whole
        target.files.extend(files)

    for text in paths:
        path = Path(text)
        if path.is_dir():
            if chosen is not None and path.resolve() == chosen.resolve():
                add(path, test_files.yaml_files_under(test_files.catalog_tests_dir(path)), True)
                continue
            holder = chosen or catalog_holding(path)
            if holder is None:  # a catalog directory: its own tests
                add(path, test_files.yaml_files_under(test_files.catalog_tests_dir(path)), True)
                continue
            if chosen is not None and has_settings(path):
                raise click.UsageError(
                    f"{text} is a catalog of its own: run its tests without --catalog"
                )
            add(holder, test_files.yaml_files_under(path))
            continue
        found = chosen or test_files.catalog_of(path)
        if found is None:
            raise click.BadParameter(
                f"no catalog.yaml in the folders above {text}: pass the catalog with --catalog DIR",
                param_hint="'PATH'",
            )
        add(found, [path])
    for target in targets.values():
        target.files = list(dict.fromkeys(target.files))
    return list(targets.values())


def _load(root: Path) -> tuple[Catalog | None, list[Diagnostic]]:
    """The catalog, or None and its errors (tests cannot run on a broken catalog)."""
    from bot.catalog.loader import load_catalog
    from bot.errors import CatalogError

    try:
        return load_catalog(root), []
    except CatalogError as exc:
        return None, [d for d in exc.diagnostics if d.severity == "error"]


def _display(path: Path) -> str:
    """A file as messages name it: relative to the working directory when under it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


# --- output ----------------------------------------------------------------------------------


def summary(passed: int, failed: int, errors: int) -> str:
    text = f"{passed} passed, {failed} failed"
    if errors:
        text += f", {errors} error" + ("" if errors == 1 else "s")
    return text


def _location(verdict: Verdict, line: int | None = None) -> str:
    return f"{verdict.test.file}:{line if line is not None else verdict.test.line}"


def _headline(verdict: Verdict) -> str:
    first = verdict.mismatches[0]
    return (
        f"{_location(verdict, first.line)}: FAILED {verdict.test.name!r}: "
        f"{first.what}: expected {first.expected}; got {first.actual}"
    )


def _text(
    verdicts: Sequence[Verdict],
    diagnostics: Sequence[Diagnostic],
    catalog_problems: Sequence[str],
    verbose: bool,
) -> list[str]:
    from bot.runbooktests.runner import show_path

    lines = format_text(diagnostics)
    lines.extend(f"error: {problem}" for problem in catalog_problems)
    by_file: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_file.setdefault(verdict.test.file, []).append(verdict)
    if not verbose:
        # pytest's progress: one line per file, a dot per passed test, F per failed one
        for file, results in by_file.items():
            lines.append(f"{file} {''.join('.' if v.passed else 'F' for v in results)}")
    for verdict in verdicts:
        if verdict.passed:
            if verbose:
                lines.append(
                    f"{_location(verdict)}: passed {verdict.test.name!r}: "
                    f"{show_path(verdict.observed.path)} ({verdict.observed.status})"
                )
            continue
        lines.append(_headline(verdict))
        for mismatch in verdict.mismatches[1:]:
            lines.append(
                f"    {mismatch.what}: expected {mismatch.expected}; got {mismatch.actual} "
                f"(line {mismatch.line})"
            )
        for mismatch in verdict.mismatches:
            if mismatch.fix:
                lines.append(f"    fix ({mismatch.what}): {mismatch.fix}")
        if any(m.what.endswith("thread") for m in verdict.mismatches):
            lines.append("    the thread:")
            lines.extend(f"      | {line}" for line in verdict.observed.thread.splitlines())
        elif verbose or not any(m.what == "path" for m in verdict.mismatches):
            lines.append(f"    path: {show_path(verdict.observed.path)}")
    return lines


def _github(verdicts: Sequence[Verdict]) -> list[str]:
    lines = []
    for verdict in verdicts:
        for mismatch in verdict.mismatches:
            fix = f" Fix: {mismatch.fix}" if mismatch.fix else ""
            properties = ",".join(
                f"{name}={_escape_property(str(value))}"
                for name, value in (
                    ("file", verdict.test.file),
                    ("line", mismatch.line),
                    ("title", f"runbook test failed: {verdict.test.name}"),
                )
            )
            message = f"{mismatch.what}: expected {mismatch.expected}; got {mismatch.actual}.{fix}"
            lines.append(f"::error {properties}::{_escape(message)}")
    return lines


def _json(
    verdicts: Sequence[Verdict],
    diagnostics: Sequence[Diagnostic],
    catalog_problems: Sequence[str],
    passed: int,
    failed: int,
    errors: int,
) -> str:
    return json.dumps(
        {
            "tests": [
                {
                    "file": v.test.file,
                    "line": v.test.line,
                    "name": v.test.name,
                    "outcome": "passed" if v.passed else "failed",
                    "failures": [m.as_dict() for m in v.mismatches],
                    "observed": v.observed.as_dict(),
                }
                for v in verdicts
            ],
            "diagnostics": [d.as_dict() for d in diagnostics],
            "problems": list(catalog_problems),
            "passed": passed,
            "failed": failed,
            "errors": errors,
        },
        indent=2,
        ensure_ascii=False,
    )


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape(text).replace(":", "%3A").replace(",", "%2C")
