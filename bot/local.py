"""The state machine in one thread: for `runbookctl simulate` and tests of the engine.

The same store, inbox, engine and outbox as the bot, wired without threads: `settle()`
applies every queued item, runs the steps it claimed (inline or as a dry run) and
delivers every effect, until nothing is left to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bot import executor as executor_module
from bot.catalog.model import Catalog
from bot.engine import Engine, Incident, incident_item
from bot.inbox import Inbox
from bot.jobs import DryRunExecutor, InlineExecutor, JobEnd, end_item
from bot.outbox import OutboxSender, Transport
from bot.states import InboxKind
from bot.store import Store, now


class LocalRuntime:
    def __init__(
        self,
        catalog: Catalog,
        store: Store,
        *,
        transports: Mapping[str, Transport] | None = None,
        dry_run: bool = False,
        runner: Callable[..., executor_module.ExecutionResult] = executor_module.run,
        clock: Callable[[], float] = now,
        everywhere: bool = False,
        **engine_options: Any,
    ) -> None:
        self.store = store
        self.clock = clock
        self.inbox = Inbox(store, self._apply, catalog_commit=lambda: self.engine.catalog.version)
        self.executor: InlineExecutor | DryRunExecutor = (
            DryRunExecutor(self._ended)
            if dry_run
            else InlineExecutor(self._ended, runner, everywhere=everywhere)
        )
        self.outbox = OutboxSender(store, transports or {}, clock=clock)
        engine_options.setdefault("chat", bool(transports))
        self.engine = Engine(catalog, store, self.executor, clock=clock, **engine_options)

    def _apply(self, item: Any) -> None:
        self.engine.apply(item)

    def _ended(self, end: JobEnd) -> None:
        self.put(**end_item(end))

    def put(self, **item: Any) -> bool:
        item.setdefault("received_at", self.clock())
        return self.inbox.put(**item)

    def settle(self) -> None:
        """Apply, run and deliver until nothing is left."""
        while self.inbox.drain() + self.outbox.drain():
            pass

    # --- conveniences that enter the inbox like the real intake does -----------------------

    def open(self, incident: Incident, **options: Any) -> str:
        self.put(**incident_item(incident, **options))
        self.settle()
        return incident.id

    def decide(
        self,
        step_run_id: int,
        user: str,
        verb: str = "approve",
        *,
        channel: str = "",
        key: str = "",
    ) -> None:
        """An approve / reject / pause / resume, as a responder's reaction would bring it."""
        step = self.store.step_run(step_run_id)
        if step is None:
            raise KeyError(step_run_id)
        kinds = {
            "approve": InboxKind.APPROVE,
            "reject": InboxKind.REJECT,
            "pause": InboxKind.PAUSE,
            "resume": InboxKind.RESUME,
        }
        self.put(
            source="local",
            key=key
            or f"local:{verb}:{step_run_id}:{user}:{self.clock()!r}:{self.store.count_queued()}",
            incident_id=step.incident_id,
            kind=kinds[verb],
            payload={"step_run_id": step_run_id, "user": user, "channel": channel},
        )
        self.settle()

    def resolve(self, incident_id: str, *, actor: str = "local", occurred_at: str = "") -> None:
        self.put(
            source="local",
            key=f"local:resolve:{incident_id}:{self.clock()!r}",
            incident_id=incident_id,
            kind=InboxKind.RESOLVED,
            payload={"actor": actor, "occurred_at": occurred_at},
        )
        self.settle()

    def expire_due(self) -> None:
        for item in self.engine.due_expiries():
            self.put(**item)
        self.settle()
