"""`runbookctl lint`: check the catalog, in CI, in pre-commit and in an editor's terminal.

Exit codes: 0 clean, 1 errors (or warnings with ``--strict``), 2 usage errors (click).
This module imports only the catalog core: it runs on every commit and must start fast
(no Slack, PagerDuty, HTTP or metrics code).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from bot.catalog.diagnostics import Diagnostic
from bot.catalog.loader import parse_catalog
from runbookctl.common import default_catalog

FORMATS = ("text", "json", "github")


@click.command()
@click.argument(
    "path",
    required=False,
    type=click.Path(exists=True),
    default=default_catalog,
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
def lint(path: str, output_format: str, strict: bool) -> None:
    """Check the catalog at PATH (default: $RUNBOOK_CATALOG or ./runbooks).

    Every problem is reported with its file, line, column, rule code and how to fix it.
    Exits 0 when clean, 1 when there are errors (or warnings with --strict).
    """
    parsed = parse_catalog(path)
    diagnostics = parsed.diagnostics
    errors = sum(1 for d in diagnostics if d.severity == "error")
    warnings = len(diagnostics) - errors
    if output_format == "json":
        click.echo(format_json(diagnostics, errors, warnings, parsed.files))
    elif output_format == "github":
        for line in format_github(diagnostics):
            click.echo(line)
        click.echo(summary(errors, warnings, parsed.files))
    else:
        for line in format_text(diagnostics):
            click.echo(line)
        click.echo(summary(errors, warnings, parsed.files))
    if errors or (strict and warnings):
        click.get_current_context().exit(1)


def summary(errors: int, warnings: int, files: int) -> str:
    return f"{_count(errors, 'error')}, {_count(warnings, 'warning')} in {_count(files, 'file')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_text(diagnostics: Sequence[Diagnostic]) -> list[str]:
    lines: list[str] = []
    for d in diagnostics:
        lines.append(
            f"{d.file}:{d.line}:{d.col}: {d.severity} {d.code} [{d.rule}] {d.message} ({d.path})"
        )
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
