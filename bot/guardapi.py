"""The bot's endpoint for ``bot.guard`` decorators: ask in Slack, answer when decided.

    POST /guard/requests              {"request_id", "function", "message", "timeout", "env"}
                                      -> 202 {"id": "GRD-<request_id>", "status": "pending"}
    GET  /guard/requests/<id>         -> {"status": pending|approved|rejected|expired,
                                          "decided_by", "detail"}
    POST /guard/requests/<id>/result  {"ok": true|false, "detail"} -> 202

Every request carries ``Authorization: Bearer <RUNBOOK_GUARD_TOKEN>``; without that
setting every request is refused (deny by default). A request becomes an incident of the
durable inbox, exactly like a page: its runbook is one step (``bot.engine.guard_runbook``)
that needs an authorized approver of the catalog (buttons or reactions, the same rules,
audit and metrics), posted in the catalog's default channel. Once approved the step is
claimed for the program that asked; its result, reported back, is the step's result.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from bot.config import Config
from bot.engine import Incident, guard_runbook_id, incident_item
from bot.states import InboxKind, Phase, StepStatus
from bot.store import Store
from bot.web import BadRequest, json_object

PREFIX = "/guard/requests"
ID_PREFIX = "GRD-"
MAX_BODY = 16_384
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_FUNCTION = re.compile(r"[A-Za-z_][A-Za-z0-9_.<>:-]{0,199}")
_ENV = re.compile(r"[A-Za-z0-9_-]{0,64}")
MAX_MESSAGE = 2000
MAX_TIMEOUT = 86_400.0

# How the asking program reads a step's status.
_VERDICTS = {
    StepStatus.AWAITING_APPROVAL: "pending",
    StepStatus.APPROVED: "pending",  # about to be claimed
    StepStatus.RUNNING: "approved",
    StepStatus.SUCCESS: "approved",
    StepStatus.FAILED: "approved",
    StepStatus.REJECTED: "rejected",
    StepStatus.EXPIRED: "expired",
}

Put = Callable[..., bool]
StartResponse = Callable[..., Any]


class GuardApi:
    def __init__(self, config: Config, store: Store, put: Put, channel: Callable[[], str]) -> None:
        self.token = config.guard_token
        self.store = store
        self.put = put
        self.channel = channel

    def wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not self._authorized(environ):
            return _json(start_response, "401 Unauthorized", {"error": _NOT_AUTHORIZED})
        method = environ.get("REQUEST_METHOD", "GET")
        rest = str(environ.get("PATH_INFO", "")).removeprefix(PREFIX).strip("/")
        try:
            if not rest and method == "POST":
                return self._ask(json_object(environ, MAX_BODY), start_response)
            parts = rest.split("/")
            if len(parts) == 1 and parts[0] and method == "GET":
                return self._status(parts[0], start_response)
            if len(parts) == 2 and parts[1] == "result" and method == "POST":
                return self._result(parts[0], json_object(environ, MAX_BODY), start_response)
        except BadRequest as exc:
            return _json(start_response, "400 Bad Request", {"error": str(exc)})
        return _json(start_response, "404 Not Found", {"error": "no such guard route"})

    def _authorized(self, environ: dict[str, Any]) -> bool:
        expected = self.token.reveal()
        if not expected:
            return False  # deny by default: no token configured, nobody may ask
        given = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), expected.encode()
        )

    def _ask(self, body: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if set(body) != {"request_id", "function", "message", "timeout", "env"}:
            raise BadRequest("expected exactly request_id, function, message, timeout, env")
        request_id, function, message = body["request_id"], body["function"], body["message"]
        timeout, env = body["timeout"], body["env"]
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise BadRequest("request_id: 8 to 64 letters, digits, - or _")
        if not isinstance(function, str) or not _FUNCTION.fullmatch(function):
            raise BadRequest("function: a Python dotted name")
        if not isinstance(message, str) or not 0 < len(message) <= MAX_MESSAGE:
            raise BadRequest(f"message: 1 to {MAX_MESSAGE} characters")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 1 <= timeout <= MAX_TIMEOUT
        ):
            raise BadRequest(f"timeout: seconds from 1 to {MAX_TIMEOUT:g}")
        if not isinstance(env, str) or not _ENV.fullmatch(env):
            raise BadRequest("env: an environment name")
        incident_id = ID_PREFIX + request_id
        item = incident_item(
            Incident(id=incident_id, title=message, service="bot.guard", env=env),
            source="guard",
        )
        item["payload"] = {
            **item["payload"],
            "runbook_id": guard_runbook_id(function, float(timeout)),
            "channel": self.channel(),
        }
        self.put(**item)
        return _json(start_response, "202 Accepted", {"id": incident_id, "status": "pending"})

    def _status(self, incident_id: str, start_response: StartResponse) -> Iterable[bytes]:
        if not incident_id.startswith(ID_PREFIX):
            return _json(start_response, "404 Not Found", {"error": "not a guard request"})
        steps = self.store.step_runs_of(incident_id)
        if not steps:
            # Received, not applied yet (or never received: the asker posted it first).
            return _json(start_response, "200 OK", {"status": "pending"})
        step = steps[-1]
        approval = self.store.approval(step.id)
        status = _VERDICTS.get(step.status, "rejected")
        return _json(
            start_response,
            "200 OK",
            {
                "status": status,
                "decided_by": (approval.decided_by or "") if approval else "",
                "detail": step.detail or str(step.status),
            },
        )

    def _result(
        self, incident_id: str, body: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        if set(body) != {"ok", "detail"} or not isinstance(body["ok"], bool):
            raise BadRequest("expected exactly ok (true or false) and detail")
        detail = str(body["detail"])[:500]
        running = [
            s for s in self.store.step_runs_of(incident_id) if s.status is StepStatus.RUNNING
        ]
        if not incident_id.startswith(ID_PREFIX) or not running:
            return _json(start_response, "409 Conflict", {"error": "no approved step runs"})
        step = running[-1]
        self.put(
            source="guard",
            key=f"step:{step.id}:{step.attempt}:end",
            incident_id=incident_id,
            kind=InboxKind.FINISHED,
            payload={
                "step_run_id": step.id,
                "attempt": step.attempt,
                "phase": str(Phase.MAIN),
                "status": str(StepStatus.SUCCESS if body["ok"] else StepStatus.FAILED),
                "exit_code": 0 if body["ok"] else 1,
                "output": "",
                "detail": detail or ("returned" if body["ok"] else "raised"),
                "duration": None,
                "argv": [],
            },
        )
        return _json(start_response, "202 Accepted", {"status": "recorded"})


_NOT_AUTHORIZED = "send Authorization: Bearer <RUNBOOK_GUARD_TOKEN> (unset: no one may ask)"


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
