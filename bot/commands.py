"""`/runbook` in chat: run, list, status, help. The core of the slash command, without Slack.

The Slack adapter checks the request (signature, workspace) and hands the text, the user
and the channel here; what comes back is the private answer. ``run`` starts nothing
itself: it puts a trigger in the durable inbox, exactly as a PagerDuty delivery does, so
a manual run goes through the same engine, policy, approvals and audit as a page. Its
incident names the runbook (no matching), the channel it was asked in (a new thread)
and who started it (who may then not approve its steps unless the action allows).

Who may start a runbook: the nearest ``runners`` (action, runbook, catalog) and, without
any, its approvers. The environment is decided by the one rule (``resolve_environment``:
the catalog's ``services`` mapping, else RUNBOOK_ENV); ``env=`` may only confirm it.

Text is split like a shell would split it (``shlex``) and never run: ``key=value``
values become incident details, which templates substitute as single arguments.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import shlex
from collections.abc import Callable, Collection
from dataclasses import dataclass

from bot import policy
from bot.catalog.environment import resolve_environment
from bot.catalog.model import Approvers, Catalog, Runbook
from bot.engine import Incident, incident_item
from bot.states import IncidentStatus
from bot.store import Store

MAX_TEXT = 4000  # characters of command text read at all
MAX_ARGS = 20
MAX_VALUE = 500
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SUBCOMMANDS = ("run", "list", "status", "help")

HELP = (
    "*/runbook* starts and follows runbooks from Slack:\n"
    "• `/runbook run RUNBOOK [key=value …] [env=ENV]` starts RUNBOOK here, in a new thread; "
    "each `key=value` becomes `incident.details.key` for its steps (quote values with "
    'spaces: `note="disk full"`)\n'
    "• `/runbook list [SERVICE]` lists the runbooks (of one service)\n"
    "• `/runbook status [INCIDENT]` shows an incident's steps, or the open incidents\n"
    "• `/runbook help` shows this"
)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class CommandRequest:
    text: str
    user: str
    channel: str
    trigger: str  # unique per invocation: the inbox dedupe key


class Refused(Exception):
    """A command that starts nothing; its text says why and what would work."""


MemberOf = Callable[[str, str], bool]
Put = Callable[..., bool]


class Commands:
    def __init__(
        self,
        catalog: Callable[[], Catalog],
        store: Store,
        put: Put,
        *,
        default_env: str = "",
        member_of: MemberOf | None = None,
        bot_users: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.put = put
        self.default_env = default_env
        self.member_of: MemberOf = member_of or (lambda user, group: False)
        self.bot_users = bot_users

    def handle(self, request: CommandRequest) -> str:
        """The private answer to one invocation."""
        try:
            words = self._words(request.text)
            if not words or words[0] == "help":
                return HELP
            verb, args = words[0].lower(), words[1:]
            if verb == "run":
                return self._run(request, args)
            if verb == "list":
                return self._list(args)
            if verb == "status":
                return self._status(args)
            close = difflib.get_close_matches(verb, SUBCOMMANDS, n=1)
            hint = f"Did you mean `/runbook {close[0]}`? " if close else ""
            raise Refused(f"`{_escape(verb[:40])}` is not a /runbook command. {hint}{HELP}")
        except Refused as refused:
            return str(refused)

    # --- parsing ---------------------------------------------------------------------------

    def _words(self, text: str) -> list[str]:
        if len(text) > MAX_TEXT:
            raise Refused(
                f"That command is {len(text):,} characters long; /runbook reads at most "
                f"{MAX_TEXT:,}. Nothing was started."
            )
        try:
            return shlex.split(text, comments=False, posix=True)
        except ValueError as exc:  # an unbalanced quote or a trailing backslash
            raise Refused(
                f"Could not read that command ({exc}): close every quote, e.g. "
                '`/runbook run RUNBOOK note="disk full"`. Nothing was started.'
            ) from None

    def _params(self, args: list[str]) -> dict[str, str]:
        if len(args) > MAX_ARGS:
            raise Refused(f"Too many arguments ({len(args)}; at most {MAX_ARGS}).")
        params: dict[str, str] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or not _KEY.fullmatch(key):
                raise Refused(
                    f"`{_escape(arg[:60])}` is not a `key=value` argument: write "
                    "`name=value` (letters, digits and _ in the name). Nothing was started."
                )
            if key in params:
                raise Refused(f"`{key}` is given twice. Nothing was started.")
            if len(value) > MAX_VALUE:
                raise Refused(f"The value of `{key}` is over {MAX_VALUE} characters.")
            params[key] = value
        return params

    # --- run -------------------------------------------------------------------------------

    def _run(self, request: CommandRequest, args: list[str]) -> str:
        if not args:
            raise Refused("Which runbook? `/runbook run RUNBOOK [key=value …]`; `/runbook list`.")
        catalog = self.catalog()
        runbook = self._runbook(catalog, args[0])
        params = self._params(args[1:])
        self._may_start(catalog, runbook, request.user)
        service = params.pop("service", "") or next(
            (s for s in runbook.match.services if s != "*"), ""
        )
        if not service:
            raise Refused(
                f"Runbook `{runbook.id}` matches any service: say which one with "
                "`service=NAME`. Nothing was started."
            )
        asked = params.pop("env", "")
        choice = resolve_environment(catalog, service, "", self.default_env)
        if not choice.env:
            raise Refused(
                f"No environment for service `{_escape(service)}`: {choice.detail}. Map it "
                "under `services:` in the catalog (or set RUNBOOK_ENV). Nothing was started."
            )
        if asked and asked != choice.env:
            raise Refused(
                f"`env={_escape(asked)}` is not allowed: {choice.detail}, and a manual run "
                f"cannot choose another environment. Leave `env=` out or write "
                f"`env={choice.env}`. Nothing was started."
            )
        digest = hashlib.sha256(request.trigger.encode()).hexdigest()[:10].upper()
        incident = Incident(
            id=f"RUN-{digest}",
            title=f"Manual run of {runbook.title or runbook.id}",
            service=service,
            urgency="manual",
            env=choice.env,
            details=params,
            started_by=request.user,
        )
        item = incident_item(incident, source="slack")
        item["key"] = f"slack:command:{request.trigger}"
        item["payload"] = {
            **item["payload"],
            "runbook_id": runbook.id,
            "channel": request.channel,
        }
        self.put(**item)
        return (
            f"Starting runbook `{runbook.id}` as {incident.id} in {choice.env} "
            f"({choice.detail}): a new thread follows in this channel."
        )

    def _runbook(self, catalog: Catalog, name: str) -> Runbook:
        by_id = {r.id: r for r in catalog.runbooks}
        found = by_id.get(name)
        if found is not None:
            return found
        close = difflib.get_close_matches(name, list(by_id), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise Refused(
            f"There is no runbook `{_escape(name[:80])}`.{hint} `/runbook list` shows them. "
            "Nothing was started."
        )

    def _may_start(self, catalog: Catalog, runbook: Runbook, user: str) -> None:
        needed: list[Approvers] = [catalog.runners_for(runbook)]
        needed += [
            step.action.safety.runners
            for step in runbook.steps
            if step.action.safety.runners is not None
        ]
        for runners in needed:
            who = policy.authorize(
                user, runners, member_of=self.member_of, bot_users=self.bot_users()
            )
            if not who.allowed:
                listed = [f"<@{u}>" for u in runners.users] + [
                    f"<!subteam^{g}>" for g in runners.groups
                ]
                raise Refused(
                    f"You may not start `{runbook.id}`: "
                    f"{who.reason.replace('approvers', 'runners')}. "
                    f"Ask {', '.join(listed) or 'the catalog owners'} (its `runners`). "
                    "Nothing was started."
                )

    # --- list and status -------------------------------------------------------------------

    def _list(self, args: list[str]) -> str:
        catalog = self.catalog()
        service = args[0].lower() if args else ""
        found = [
            r
            for r in catalog.runbooks
            if not service or service in (s.lower() for s in r.match.services)
        ]
        if not found:
            return f"No runbook for service `{_escape(service)}`. `/runbook list` shows all."
        lines = [
            f"• `{r.id}` — {_escape(r.title or r.id)} (services: "
            f"{_escape(', '.join(r.match.services))}; {len(r.steps)} steps)"
            for r in sorted(found, key=lambda r: r.id)[:50]
        ]
        more = f"\n…and {len(found) - 50} more" if len(found) > 50 else ""
        return "Runbooks (start one with `/runbook run RUNBOOK`):\n" + "\n".join(lines) + more

    def _status(self, args: list[str]) -> str:
        if not args:
            open_ = self.store.incidents(IncidentStatus.OPEN)[:20]
            if not open_:
                return "No open incident."
            return "Open incidents (`/runbook status INCIDENT` for one):\n" + "\n".join(
                f"• {_escape(i.id)} — {_escape(i.title)} (runbook {i.runbook_id or 'none'})"
                for i in open_
            )
        incident = self.store.incident(args[0])
        if incident is None:
            raise Refused(
                f"No incident `{_escape(args[0][:80])}`. `/runbook status` lists the open ones."
            )
        steps = self.store.step_runs_of(incident.id)
        lines = [
            f"*{_escape(incident.id)}* — {_escape(incident.title)}: {incident.status}, "
            f"runbook {incident.runbook_id or 'none'}, environment {incident.env or 'unknown'}"
        ]
        lines += [f"• {_escape(s.step_id)}: {s.status}" for s in steps] or ["No step yet."]
        return "\n".join(lines)
