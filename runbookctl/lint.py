"""`runbookctl lint`: check the catalog, in CI, in pre-commit and in an editor's terminal.

Exit codes: 0 clean, 1 errors (or warnings with ``--strict``), 2 usage errors (click).
This module imports only the catalog core: it runs on every commit and must start fast
(no Slack, PagerDuty, HTTP or metrics code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import click

from bot.catalog.diagnostics import Diagnostic, excerpt
from bot.catalog.loader import TESTS_FOLDER, find_catalog_root, parse_catalog
from bot.catalog.reader import default_jobs
from runbookctl.common import default_catalog

FORMATS = ("text", "json", "github")


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True), metavar="[PATH | FILE...]")
@click.option(
    "--catalog",
    "catalog_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The catalog the FILEs belong to (default: the nearest folder above each with a "
    "catalog.yaml).",
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
    "--strict/--no-strict",
    default=False,
    show_default=True,
    help="Fail (exit 1) on warnings too, not only on errors.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes reading files in large catalogs (default: the CPUs available, up to 4).",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Remember each file's parse and schema check here, keyed by its content, the "
    "schema and the tool version (for CI; safe to delete).",
)
def lint(
    paths: tuple[str, ...],
    catalog_dir: str | None,
    output_format: str,
    strict: bool,
    jobs: int | None,
    cache_dir: str | None,
) -> None:
    """Check the catalog at PATH (default: $RUNBOOK_CATALOG or ./runbooks), or FILEs.

    A directory is checked as a whole catalog. A FILE is checked in the context of its
    catalog (--catalog, or the nearest folder above it holding catalog.yaml), and only
    its problems are reported. Every problem comes with its file, line, column, rule
    code and how to fix it. Exits 0 when clean, 1 when there are errors (or warnings
    with --strict), 2 on usage errors.
    """
    runs, runbook_tests = _what_to_lint(paths, catalog_dir)
    diagnostics: list[Diagnostic] = []
    files = 0
    for root, only in runs:
        parsed = parse_catalog(root, only=only, jobs=jobs or default_jobs(), cache_dir=cache_dir)
        diagnostics.extend(parsed.diagnostics)
        files += parsed.files
    if runbook_tests:
        # Runbook tests are not catalog documents: checked against their own schema
        # (running them is `runbookctl test`).
        from bot.runbooktests.files import read

        suite = read(runbook_tests, _display_path)
        diagnostics.extend(suite.diagnostics)
        files += suite.files
    errors = sum(1 for d in diagnostics if d.severity == "error")
    warnings = len(diagnostics) - errors
    if output_format == "json":
        click.echo(format_json(diagnostics, errors, warnings, files))
    elif output_format == "github":
        for line in format_github(diagnostics):
            click.echo(line)
        click.echo(summary(errors, warnings, files))
    else:
        for line in format_text(diagnostics):
            click.echo(line)
        click.echo(summary(errors, warnings, files))
    if errors or (strict and warnings):
        click.get_current_context().exit(1)


def _what_to_lint(
    paths: tuple[str, ...], catalog_dir: str | None
) -> tuple[list[tuple[str, list[str] | None]], list[Path]]:
    """(catalog root, files to report or None for all) for each catalog to check, and
    the runbook test files among the paths (in, or being, a catalog's tests/ folder)."""
    tests = [p for p in paths if _in_tests_folder(Path(p), catalog_dir)]
    paths = tuple(p for p in paths if p not in tests)
    runbook_tests = [f for t in tests for f in _yaml_files(Path(t))]
    if tests and not paths:
        return [], runbook_tests
    return _catalog_runs(paths, catalog_dir), runbook_tests


def _in_tests_folder(path: Path, catalog_dir: str | None) -> bool:
    root = (
        Path(catalog_dir)
        if catalog_dir
        else find_catalog_root(path / "x" if path.is_dir() else path)
    )
    if root is None:
        return False
    try:
        parts = path.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return False
    return bool(parts) and parts[0] == TESTS_FOLDER


def _yaml_files(path: Path) -> list[Path]:
    from bot.runbooktests.files import yaml_files_under

    return yaml_files_under(path)


def _display_path(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _catalog_runs(
    paths: tuple[str, ...], catalog_dir: str | None
) -> list[tuple[str, list[str] | None]]:
    directories = [p for p in paths if Path(p).is_dir()]
    files = [p for p in paths if not Path(p).is_dir()]
    if catalog_dir is not None and directories:
        raise click.UsageError(
            "--catalog goes with FILEs; to check a whole catalog, pass its directory alone"
        )
    if not paths:
        root = catalog_dir or default_catalog()
        if not Path(root).is_dir():
            raise click.BadParameter(
                f"catalog directory {root!r} does not exist", param_hint="'PATH'"
            )
        return [(root, None)]
    runs: list[tuple[str, list[str] | None]] = [(d, None) for d in directories]
    by_root: dict[str, list[str]] = {}
    for file in files:
        root = catalog_dir or _root_above(file)
        by_root.setdefault(root, []).append(file)
    runs.extend(by_root.items())
    return runs


def _root_above(file: str) -> str:
    found = find_catalog_root(file)
    if found is None:
        raise click.BadParameter(
            f"no catalog.yaml in the folders above {file}: pass the catalog with --catalog DIR",
            param_hint="'FILE'",
        )
    return str(found)


def summary(errors: int, warnings: int, files: int) -> str:
    return f"{_count(errors, 'error')}, {_count(warnings, 'warning')} in {_count(files, 'file')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_text(diagnostics: Sequence[Diagnostic]) -> list[str]:
    """Each diagnostic, the source line with a caret under the column, and the fix."""
    lines: list[str] = []
    read: dict[str, list[str] | None] = {}
    for d in diagnostics:
        lines.append(
            f"{d.file}:{d.line}:{d.col}: {d.severity} {d.code} [{d.rule}] {d.message} ({d.path})"
        )
        lines.extend(excerpt(d.file, d.line, d.col, read))
        lines.append(f"    fix: {d.fix}")
    return lines


def format_json(diagnostics: Sequence[Diagnostic], errors: int, warnings: int, files: int) -> str:
    return json.dumps(
        {
            "diagnostics": [d.as_dict() for d in diagnostics],
            "errors": errors,
            "warnings": warnings,
            "files": files,
        },
        indent=2,
        ensure_ascii=False,
    )


def format_github(diagnostics: Sequence[Diagnostic]) -> list[str]:
    """GitHub Actions workflow commands: one annotation per diagnostic."""
    lines: list[str] = []
    for d in diagnostics:
        properties = ",".join(
            f"{name}={_escape_property(str(value))}"
            for name, value in (
                ("file", d.file),
                ("line", d.line),
                ("col", d.col),
                ("title", f"{d.code} {d.rule}"),
            )
        )
        message = _escape_data(f"{d.message} ({d.path}). Fix: {d.fix}")
        lines.append(f"::{d.severity} {properties}::{message}")
    return lines


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
