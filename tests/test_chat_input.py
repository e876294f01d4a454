"""Open-ended chat input: button values and /runbook text, whatever people (or forgers)
send. Nothing raises; what is refused starts nothing; what is accepted is exactly one of
ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builders import APPROVER, action, catalog, runbook, step
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.chat.slack import ButtonValue
from bot.commands import CommandRequest, Commands
from bot.store import Store

FINGERPRINT = st.text("0123456789abcdef", min_size=12, max_size=12)


@given(st.text(max_size=3000))
def test_any_text_decodes_to_nothing_or_a_well_formed_button(text: str) -> None:
    found = ButtonValue.decode(text)
    if found is not None:
        assert found.step_run_id > 0 and len(found.fingerprint) == 12 and found.incident_id


@given(st.text(min_size=1, max_size=100), st.integers(1, 2**62), FINGERPRINT)
def test_a_button_value_round_trips(incident: str, step_id: int, fingerprint: str) -> None:
    value = ButtonValue(incident, step_id, fingerprint)
    assert ButtonValue.decode(value.encode()) == value


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=5000))
def test_any_command_text_is_answered_and_only_run_puts_anything(
    tmp_path_factory: Any, text: str
) -> None:
    path: Path = tmp_path_factory.mktemp("db") / "state.db"
    store = Store(path)
    put: list[dict[str, Any]] = []
    check = action("check", approvers=None)
    cat = catalog(runbook("payments-errors", [step(check)], services=("payments",)))
    commands = Commands(
        lambda: cat,
        store,
        lambda **item: put.append(item) or True,
        default_env="staging",
        member_of=lambda user, group: False,
    )
    try:
        answer = commands.handle(CommandRequest(text, APPROVER, "COPS", "1.2.3"))
    finally:
        store.close()
    assert isinstance(answer, str) and answer
    if put:
        assert answer.startswith("Starting runbook")
        (item,) = put
        assert item["payload"]["runbook_id"] == "payments-errors"
        assert all(isinstance(v, str) for v in item["payload"]["details"].values())
