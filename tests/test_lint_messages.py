"""The words of lint: one broken file per message, and the exact text lint prints for it.

tests/lint_messages/cases/<folder>/<name>.yaml is put into a copy of the small, clean
catalog in tests/lint_messages/catalog (under actions/ or runbooks/; a settings case
replaces catalog.yaml) and linted on its own, as `runbookctl lint FILE` does from the
catalog's root. The output must equal <name>.txt beside it, so a change of wording shows
in review. After changing a message on purpose, rewrite the expected files with
``UPDATE_LINT_MESSAGES=1 python -m pytest tests/test_lint_messages.py`` and read the diff.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bot.catalog.schemacheck import quick_is_valid
from bot.catalog.yamlsource import parse_documents
from runbookctl.lint import lint

HERE = Path(__file__).resolve().parent / "lint_messages"
BASE = HERE / "catalog"
CASES = sorted((HERE / "cases").glob("*/*.yaml"))
UPDATE = os.environ.get("UPDATE_LINT_MESSAGES") == "1"


def placed(case: Path) -> str:
    folder = case.parent.name
    return "catalog.yaml" if folder == "settings" else f"{folder}/{case.name}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_message_for_each_broken_file(
    case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "catalog"
    shutil.copytree(BASE, root)
    target = placed(case)
    shutil.copy(case, root / target)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(lint, [target])
    expected = case.with_suffix(".txt")
    if UPDATE:
        expected.write_text(result.output, "utf-8")
    assert result.exit_code == 1, result.output
    assert result.output == expected.read_text("utf-8")


def test_the_base_catalog_is_clean() -> None:
    result = CliRunner().invoke(lint, ["--strict", str(BASE)])
    assert result.exit_code == 0, result.output


def test_every_case_has_its_expected_text() -> None:
    assert CASES
    for case in CASES:
        assert case.with_suffix(".txt").exists(), f"{case} has no expected text"
    texts = sorted((HERE / "cases").glob("*/*.txt"))
    assert [t.with_suffix(".yaml") for t in texts] == CASES


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_fast_schema_check_agrees_on_each_case(case: Path) -> None:
    from jsonschema import Draft202012Validator

    from bot.catalog.schemacheck import schema

    docs, _ = parse_documents(case.read_text("utf-8"), case.name)
    for doc in docs:
        for kind in ("action", "runbook", "catalog"):
            full = Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": schema()["$defs"]})
            assert quick_is_valid(kind, doc.data) == full.is_valid(doc.data)
