"""Python decorators over the same safety policy as catalog steps.

For teams that drive steps from Python code rather than from the YAML catalog::

    from bot import guard

    guard.configure(env="staging", confirmer=guard.ConsoleConfirmer())

    @guard.require_confirmation(message="Clear cache?", timeout=120)
    @guard.allowed_envs(["staging", "dev"])
    def clear_cache(cmd):
        return shell(cmd)

Calling ``clear_cache`` outside the allowed environments raises ``PolicyViolation`` before
anything runs (and before anyone is asked); inside, it asks through the configured
``Confirmer`` and runs only when a human approved within the timeout, else it raises
``ApprovalDenied``. The decisions are ``bot.policy``'s: ``policy.decide`` for the
environment (so a production environment needs a promotion record here too, and an
environment the catalog does not declare is refused) and ``policy.may_run`` for the
approval. Nothing here decides on its own.

Configuration is module-level (``configure``) because decorators run at import time and
the environment is only known when the program runs; the environment is read at each
call, from ``configure(env=...)`` or else ``$RUNBOOK_ENV``. With ``store=`` every
decision is written to ``automation_events``, so ``runbookctl report`` sees these
functions next to catalog actions (``action`` is the function's name, or ``action=``).

Confirmers (the ``Confirmer`` protocol: ``confirm(message, timeout)`` returns
``"approved"``, ``"rejected"`` or ``"expired"``):
  * ``ConsoleConfirmer``: a y/N prompt on the terminal; no answer in time is ``expired``;
  * ``BotConfirmer``: asks the running bot (``POST /guard/requests``, authenticated with
    ``RUNBOOK_GUARD_TOKEN``), which posts the request in Slack and records it like any
    step: durable, approved by the catalog's approvers (buttons or reactions), audited
    and counted. The function runs once approved, and its result is reported back to
    the thread. ``configure(bot_url=...)`` sets it up::

        guard.configure(env="staging", bot_url="https://runbook-bot.internal")
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import select
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import IO, Any, Literal, ParamSpec, Protocol, TypeVar

from bot import policy
from bot.catalog.model import Action, Location, Promotion, Safety, Settings
from bot.errors import ApprovalDenied, PolicyViolation
from bot.states import Event

P = ParamSpec("P")
R = TypeVar("R")
Verdict = Literal["approved", "rejected", "expired"]
GUARD_ATTRIBUTE = "__runbook_guard__"  # the environment guard, seen by outer decorators
GUARDED_ATTRIBUTE = "__runbook_guarded__"  # the wrapper records its own execution


class Confirmer(Protocol):
    def confirm(self, message: str, timeout: float) -> Verdict: ...


class AuditStore(Protocol):
    """The part of ``bot.store.Store`` the guard writes to."""

    def record_event(self, **values: Any) -> None: ...


@dataclass(frozen=True)
class GuardConfig:
    env: str | None = None  # None: $RUNBOOK_ENV at each call
    confirmer: Confirmer | None = None
    settings: Settings = field(default_factory=Settings)  # declared environments
    store: AuditStore | None = None
    service: str = ""  # recorded in automation_events.service
    catalog_commit: str = "python-guard"

    @property
    def current_env(self) -> str:
        return self.env if self.env is not None else os.environ.get("RUNBOOK_ENV", "")


_config = GuardConfig()
_config_lock = threading.Lock()
_UNSET: Any = object()


def configure(
    *,
    env: str | None = _UNSET,
    confirmer: Confirmer | None = _UNSET,
    bot_url: str | None = None,
    token: str | None = None,
    settings: Settings | None = None,
    store: AuditStore | None = _UNSET,
    service: str | None = None,
) -> GuardConfig:
    """Set what the guards use; arguments left out keep their current value.

    ``bot_url`` (with ``token``, else ``$RUNBOOK_GUARD_TOKEN``) builds a ``BotConfirmer``
    when no ``confirmer`` is given: requests are asked in Slack by the running bot.
    """
    global _config
    changes: dict[str, Any] = {}
    if env is not _UNSET:
        changes["env"] = env
    if confirmer is not _UNSET:
        changes["confirmer"] = confirmer
    elif bot_url is not None:
        changes["confirmer"] = BotConfirmer(bot_url, token=token)
    if settings is not None:
        changes["settings"] = settings
    if store is not _UNSET:
        changes["store"] = store
    if service is not None:
        changes["service"] = service
    with _config_lock:
        _config = replace(_config, **changes)
        return _config


def reset() -> None:
    """Back to defaults (no confirmer: every confirmation fails closed)."""
    global _config
    with _config_lock:
        _config = GuardConfig()


def current() -> GuardConfig:
    return _config


@contextmanager
def configured(**kwargs: Any) -> Iterator[GuardConfig]:
    """``configure`` for a block, then restore what was there (tests, scripts)."""
    global _config
    before = _config
    try:
        yield configure(**kwargs)
    finally:
        with _config_lock:
            _config = before


# --- the decorators ---------------------------------------------------------------------


@dataclass(frozen=True)
class _EnvGuard:
    name: str
    action: Action  # scopes and promotions, as a catalog action would declare them


def _action_id(fn: Callable[..., Any]) -> str:
    # automation_events.action: the function's dotted name, readable in reports
    return f"{fn.__module__}.{fn.__qualname__}"


def _location(fn: Callable[..., Any]) -> Location:
    try:
        return Location(inspect.getsourcefile(fn) or "?", inspect.getsourcelines(fn)[1])
    except (OSError, TypeError):
        return Location("?")


def allowed_envs(
    envs: Iterable[str],
    *,
    promotions: Mapping[str, str] | None = None,
    action: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the function only in `envs`; elsewhere raise ``PolicyViolation`` without running.

    A production environment (as declared in the configured settings) also needs a
    promotion record, exactly like a catalog action: ``promotions={"prod": "https://…"}``
    maps it to the evidence URL.
    """
    scopes = tuple(envs)
    if not scopes or not all(isinstance(e, str) and e for e in scopes):
        raise ValueError("allowed_envs needs at least one environment name")
    records = tuple(
        Promotion(env=env, evidence_url=url, by="python") for env, url in (promotions or {}).items()
    )

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        name = action or _action_id(fn)
        guard = _EnvGuard(
            name=name,
            action=Action(
                id=name,
                command=(),
                location=_location(fn),
                safety=Safety(requires_approval=False, scopes=scopes, promotions=records),
            ),
        )

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            _check_env(guard, fn)
            return _run(fn, name, args, kwargs)

        setattr(wrapper, GUARD_ATTRIBUTE, guard)
        setattr(wrapper, GUARDED_ATTRIBUTE, True)
        return wrapper

    return decorate


def require_confirmation(
    message: str,
    timeout: float = 600.0,
    *,
    action: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Ask a human through the configured confirmer; run only when approved in time.

    Raises ``ApprovalDenied`` when rejected or expired (or when the confirmer answered
    after `timeout`), and ``PolicyViolation`` when no confirmer is configured. When the
    function is also guarded by ``allowed_envs``, the environment is checked first:
    nobody is asked about a call that could not run anyway.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        inner: _EnvGuard | None = getattr(fn, GUARD_ATTRIBUTE, None)
        name = action or (inner.name if inner else _action_id(fn))

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if inner is not None:
                _check_env(inner, fn)
            report = _confirm(name, message, timeout)
            try:
                result = _run(fn, name, args, kwargs)
            except BaseException as exc:
                report(False, type(exc).__name__)
                raise
            report(True, "")
            return result

        if inner is not None:
            setattr(wrapper, GUARD_ATTRIBUTE, inner)
        setattr(wrapper, GUARDED_ATTRIBUTE, True)
        return wrapper

    return decorate


def _check_env(guard: _EnvGuard, fn: Callable[..., Any]) -> None:
    config = _config
    env = config.current_env
    decision = policy.decide(guard.action, env, config.settings)
    if not decision.blocked:
        return
    scopes = ", ".join(guard.action.safety.scopes)
    shown = env or "(none: set RUNBOOK_ENV or guard.configure(env=...))"
    text = f"{fn.__qualname__}() may not run in environment {shown}; allowed in: {scopes}"
    if env in guard.action.safety.scopes:
        # in scope, yet blocked: an undeclared environment or a missing promotion
        if config.settings.is_production(env):
            text += (
                f". {env} is a production environment: pass its promotion evidence, "
                f'allowed_envs([...], promotions={{"{env}": "https://…"}})'
            )
        else:
            text += f". {decision.reason}"
    _record(config, name=guard.name, env=env, status=Event.BLOCKED, detail=text)
    raise PolicyViolation(text)


Report = Callable[[bool, str], None]  # (the function returned, detail) -> to the asker


def _no_report(ok: bool, detail: str) -> None:
    return None


def _confirm(name: str, message: str, timeout: float) -> Report:
    """Ask; raise unless approved in time. Returns where to report the function's end."""
    config = _config
    env = config.current_env
    confirmer = config.confirmer
    if confirmer is None:
        raise PolicyViolation(
            f"{name} requires confirmation but no confirmer is configured: call "
            "bot.guard.configure(confirmer=bot.guard.ConsoleConfirmer()) or "
            "configure(bot_url=...)"
        )
    decision = policy.Decision("needs_approval", "requires confirmation by a human")
    _record(config, name=name, env=env, status=Event.REQUIRES_MANUAL, detail=message)
    started = time.monotonic()
    report: Report = _no_report
    if isinstance(confirmer, BotConfirmer):
        verdict, report = confirmer.ask(message, timeout, function=name, env=env)
    else:
        verdict = confirmer.confirm(message, timeout)
    late = time.monotonic() - started > timeout
    state: policy.ApprovalState = (
        verdict if verdict in ("approved", "rejected", "expired") else "rejected"
    )
    if state == "approved" and late:
        state = "expired"
    check = policy.may_run(decision, approval=state, incident_open=True)
    _record(config, name=name, env=env, status=Event(state), detail=message)
    if not check.allowed:
        raise ApprovalDenied(f"{name} did not run: {check.reason}")
    return report


def _run(fn: Callable[P, R], name: str, args: Any, kwargs: Any) -> R:
    if getattr(fn, GUARDED_ATTRIBUTE, False):
        # another guard inside: it checks again (cheap, and right if the configuration
        # changed meanwhile) and records the execution itself
        return fn(*args, **kwargs)
    config = _config
    env = config.current_env
    _record(config, name=name, env=env, status=Event.EXECUTED)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        _record(config, name=name, env=env, status=Event.FAILED, detail=type(exc).__name__)
        raise
    _record(config, name=name, env=env, status=Event.SUCCEEDED)
    return result


def _record(config: GuardConfig, *, name: str, env: str, status: Event, detail: str = "") -> None:
    if config.store is None:
        return
    config.store.record_event(
        incident_id=None,
        service=config.service or None,
        action=name,
        env=env or None,
        status=str(status),
        actor=None,
        detail=detail or None,
        catalog_commit=config.catalog_commit,
    )


# --- confirmers ----------------------------------------------------------------------------


class ConsoleConfirmer:
    """A ``[y/N]`` prompt. Only ``y``/``yes`` approves; no answer within the timeout expires.

    The timeout needs a stream with a file descriptor (a terminal, a pipe); for other
    streams (``io.StringIO``) the answer is read without one.
    """

    def __init__(self, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stderr

    def confirm(self, message: str, timeout: float) -> Verdict:
        self.stdout.write(f"{message} [y/N] (expires in {timeout:g}s): ")
        self.stdout.flush()
        line = self._readline(timeout)
        if line is None:
            self.stdout.write("\nno answer in time: not run\n")
            self.stdout.flush()
            return "expired"
        return "approved" if line.strip().lower() in ("y", "yes") else "rejected"

    def _readline(self, timeout: float) -> str | None:
        try:
            fd = self.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return self.stdin.readline()
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1)  # byte by byte: never read past the answer's line
            if not chunk:
                break  # end of input: whatever was typed (nothing: rejected)
            data += chunk
        return data.decode("utf-8", "replace")


log = logging.getLogger(__name__)
POLL_SECONDS = (0.05, 1.0)  # first and longest wait between looks at a pending request


class BotConfirmer:
    """Ask the running bot, which asks in Slack (``bot.guardapi``); wait for the decision.

    Fails closed: a bot that cannot be reached, refuses the token or answers nothing
    usable is a rejection (the function does not run).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("RUNBOOK_GUARD_TOKEN", "")
        self.client = client  # an httpx.Client to use; None: one per request, closed after
        self.clock = clock
        self.sleep = sleep

    @contextmanager
    def _http(self) -> Iterator[Any]:
        if self.client is not None:
            yield self.client
            return
        import httpx

        with httpx.Client(timeout=10) as client:
            yield client

    def confirm(self, message: str, timeout: float) -> Verdict:
        return self.ask(message, timeout, function="bot.guard", env="")[0]

    def ask(
        self, message: str, timeout: float, *, function: str, env: str
    ) -> tuple[Verdict, Report]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request_id = uuid.uuid4().hex
        body = {
            "request_id": request_id,
            "function": function,
            "message": message,
            "timeout": timeout,
            "env": env,
        }
        with self._http() as http:
            return self._ask(http, body, headers, timeout)

    def _ask(
        self, http: Any, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> tuple[Verdict, Report]:
        try:
            asked = http.post(f"{self.url}/guard/requests", json=body, headers=headers)
        except Exception as exc:
            log.error("could not ask the bot at %s: %s", self.url, type(exc).__name__)
            return "rejected", _no_report
        if asked.status_code != 202:
            log.error("the bot refused the request: HTTP %s", asked.status_code)
            return "rejected", _no_report
        where = f"{self.url}/guard/requests/{asked.json()['id']}"
        deadline = self.clock() + timeout
        wait = POLL_SECONDS[0]
        while True:
            try:
                status = str(http.get(where, headers=headers).json().get("status"))
            except Exception as exc:  # the bot restarting: the request is durable there
                log.warning("could not read the request's status: %s", type(exc).__name__)
                status = "pending"
            if status != "pending":
                break
            if self.clock() >= deadline:
                return "expired", _no_report
            self.sleep(min(wait, max(0.0, deadline - self.clock())))
            wait = min(POLL_SECONDS[1], wait * 2)
        verdict: Verdict = "rejected"  # anything but a clear answer fails closed
        if status == "approved":
            verdict = "approved"
        elif status == "expired":
            verdict = "expired"

        def report(ok: bool, detail: str) -> None:
            try:
                with self._http() as client:
                    client.post(
                        f"{where}/result", json={"ok": ok, "detail": detail}, headers=headers
                    )
            except Exception as exc:  # the function ran; the thread misses its result
                log.warning("could not report the result to the bot: %s", type(exc).__name__)

        return verdict, report
