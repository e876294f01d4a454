"""Run one catalog command as a subprocess: argv, templates, timeout, output, secrets, expect.

This module is the only place where text from an incident (a PagerDuty title, a detail
field, anything an outside system can put in an alert) meets a process. Its job is to
make sure that text can only ever be *data* for the command, never part of it.

Safety reasoning
================

No shell by default.
    A command string is split into argv with ``shlex.split`` *before* any template is
    substituted, and the process is started with a list argv (``shell=False``). A value
    such as ``$(rm -rf /)``, ``; reboot``, a backtick, a newline or ``*`` therefore lands
    inside exactly one argument, byte for byte, and nothing parses it again. A list
    command is one template per argument. The program itself (argv[0]) may not come
    from a template: choosing *which* program runs is not data.

    What this cannot prevent is the program's own interpretation of an argument: a
    value starting with ``-`` is still an option to most tools (write
    ``--name={{ value }}`` or put ``--`` before positional values), and a program that
    runs an argument as code parses it again: ``sh -c '... {{ value }}'``, ``ssh host
    ...`` (the remote shell joins and parses the words), ``kubectl exec ... -- sh -c``,
    ``eval``. Placeholders in such arguments are as dangerous as ``shell: true``.

``shell: true`` is an explicit opt-in (and lint flags it).
    The template is run by ``/bin/sh -c`` and every substituted value is passed through
    ``shlex.quote``. A single-quoted word is only inert where the shell reads a plain
    word, so the template is scanned first: inside ``"..."`` or ``'...'`` the quote is
    closed around the value and reopened; inside backticks, ``${...}``, arithmetic,
    a ``#`` comment or after a here-document the bot cannot quote reliably and refuses
    with a ``TemplateError`` (``check_shell_template`` lets lint report it earlier).

Templates.
    Only ``{{ dotted.name }}``, looked up in nested mappings (``{{ incident.title }}``,
    ``{{ params.window }}``, ``{{ incident.details.namespace }}``). A step's params may
    use the incident too (``render_params``); they are rendered first, and their values
    then enter the command like any other value. There are no
    expressions or filters, so there is nothing to evaluate. An unknown name, a null
    value or a NUL character raises ``TemplateError``: a command is never run with a
    silently empty argument. Other ``{{...}}`` text (``docker inspect --format
    '{{.State.Status}}'``) is left as it is.

The process and everything it starts are stopped.
    The command starts in its own session, so it leads a process group. On timeout the
    whole group gets SIGTERM, then SIGKILL after ``TERMINATE_GRACE_SECONDS``; a command
    that ignores SIGTERM or forks children does not outlive ``run()``. When the command
    exits on its own, processes it left running in its group are stopped the same way.
    On Linux the bot becomes a child subreaper so it can reap those orphans itself
    instead of leaving zombies to an init that may not reap (a container's PID 1).
    A process that moves itself to another session (``setsid``, daemons) escapes this.

Output is bounded and masked before it leaves.
    stdout and stderr share one pipe, read by a background thread into a ring of chunks
    that keeps only the tail, so memory stays bounded whatever the command prints. The
    kept bytes are decoded as UTF-8 (undecodable bytes replaced), secrets are masked,
    and a marker line says how many earlier bytes were dropped. Masking happens on a
    little more than the cap before the final cut, so a secret straddling the cut is
    not left half visible. Secrets are the values of the ``secret_env`` variables (at
    least ``MIN_SECRET_LENGTH`` characters, so a short value does not mask everything)
    and regexes: ``DEFAULT_SECRET_PATTERNS`` always, plus ``secret_patterns``. A pattern
    with a group named ``secret`` masks only that group (``password=********``).
    The argv returned is masked the same way: it is what the audit log and chat show.

Results and errors
==================

A problem with the *spec* raises before anything starts, so a half-valid step never
runs: ``TemplateError`` (a ``ValueError``) for templates, ``ValueError`` for an invalid
regex, timeout or cap. Everything that happens once the command is ready to start is
an ``ExecutionResult``; its ``status`` follows the ``expect`` semantics:

1. the process could not be started (missing program, bad cwd): ``"error"``;
2. it ran longer than ``timeout``: ``"timeout"``;
3. exit code 0 and (no plain pattern, or some plain pattern matches): ``"success"``;
4. otherwise, some ``allow_failure`` pattern matches: ``"allowed_failure"``;
5. otherwise ``"failed"``; the detail says whether the exit code was non-zero or no
   expected pattern matched.

Patterns are searched with ``re.search`` and ``re.MULTILINE`` in the output as returned
(the kept tail, masked), so the decision can always be explained from what is shown.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ResultStatus = Literal["success", "allowed_failure", "failed", "timeout", "error"]

SHELL = "/bin/sh"
TERMINATE_GRACE_SECONDS = 2.0
# After SIGKILL the kernel needs a moment, and orphans need a reaper; this bounds the wait.
KILL_WAIT_SECONDS = 2.0
# A process outside the group (a daemon that called setsid) can hold the output pipe open
# forever; stop reading after this long once the group is gone.
OUTPUT_DRAIN_SECONDS = 1.0
MASK = "********"
MIN_SECRET_LENGTH = 4

DEFAULT_SECRET_PATTERNS: tuple[re.Pattern[str], ...] = (
    # Slack bot, user, app-level and refresh tokens.
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{6,}"),
    re.compile(r"\bxapp-[A-Za-z0-9-]{6,}"),
    # Authorization headers (PagerDuty and most HTTP APIs); the scheme stays readable.
    re.compile(r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/=-]{4,})"),
    # AWS access key ids (long-term AKIA and temporary ASIA).
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    # key=value and key: value pairs, also inside JSON/YAML and env dumps (DB_PASSWORD=...,
    # PagerDuty's `Token token=...`); only the value is masked so the line stays useful.
    re.compile(
        r"(?i)(?:password|passwd|token|secret|api[_-]?key)[\"']?\s*[=:]\s*[\"']?"
        r"(?P<secret>[^\s\"'&;,]+)"
    ),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*\}\}")
_READ_CHUNK = 65536
# Kept beyond the cap so secrets crossing the cut are masked whole before cutting.
_MASK_SLACK_BYTES = 4096
_POLL_SECONDS = 0.01
_MAX_LISTED_VARIABLES = 40
_PR_SET_CHILD_SUBREAPER = 36


class TemplateError(ValueError):
    """A command template cannot be rendered: unknown variable, unusable value or syntax."""


class ExpectationLike(Protocol):
    """Anything with the two fields of an ``expect`` entry (the catalog model has them)."""

    @property
    def pattern(self) -> str: ...

    @property
    def allow_failure(self) -> bool: ...


@dataclass(frozen=True)
class Expectation:
    """One ``expect`` entry: a regex searched in the output."""

    pattern: str
    allow_failure: bool = False


@dataclass(frozen=True)
class CommandSpec:
    """Everything needed to run one command; the engine builds it from a catalog action."""

    command: str | Sequence[str]
    shell: bool = False
    timeout: float = 60.0
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Sequence[str] = ()
    expect: Sequence[Expectation] = ()
    cwd: str | None = None
    # `command` is a final argv and `env` final values, rendered where the step was
    # claimed (a pull runner runs what the bot rendered and signed): no template is read.
    rendered: bool = False


@dataclass(frozen=True)
class ExecutionResult:
    """What happened; ``output``, ``argv`` and ``detail`` are masked and safe to show."""

    status: ResultStatus
    exit_code: int | None  # negative: killed by that signal (subprocess convention)
    output: str
    duration: float
    argv: tuple[str, ...]
    matched: str | None
    detail: str


# --- templates -------------------------------------------------------------------------


def template_variables(text: str) -> list[str]:
    """The variables a template refers to, in order of first use, without repeats."""
    return list(dict.fromkeys(m.group(1) for m in _PLACEHOLDER.finditer(text)))


def render_params(params: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with the ``{{ incident.… }}`` placeholders in their string values rendered.

    A step's params (``url: "https://{{ incident.details.host }}/healthz"``) are rendered
    once, from the incident, before the command is built; the command then places each
    rendered value where it says ``{{ params.url }}``, as it places any value: inside a
    single argument, never split or parsed again. Rendering follows the command's rules
    (``_PLACEHOLDER`` and ``_resolve``): an unknown variable, a null value or a NUL
    character raises `TemplateError`, and text that is not a placeholder stays as it is.
    A param may not refer to ``params`` (no order between params, no loops): that raises
    `TemplateError` too. Strings inside lists and mappings are rendered the same way;
    keys and other values are returned unchanged, in a new dict.
    """
    return {name: _render_param(value, context, name) for name, value in params.items()}


def _render_param(value: Any, context: Mapping[str, Any], name: str) -> Any:
    if isinstance(value, str):
        if "{{" not in value:
            return value

        def substitute(match: re.Match[str]) -> str:
            variable = match.group(1)
            if variable == "params" or variable.startswith("params."):
                raise TemplateError(
                    f"param {name!r} refers to {{{{ {variable} }}}}: a param can use the "
                    "incident ({{ incident.… }}), not other params"
                )
            return _resolve(variable, context)

        return _PLACEHOLDER.sub(substitute, value)
    if isinstance(value, Mapping):
        return {key: _render_param(item, context, name) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render_param(item, context, name) for item in value]
    return value


def render_argv(spec: CommandSpec, context: Mapping[str, Any]) -> list[str]:
    """The argv ``run`` would start, with templates substituted (secrets not masked)."""
    if spec.rendered:
        if isinstance(spec.command, str):
            raise TemplateError("a rendered command must be a list of arguments")
        argv = list(spec.command)
    elif spec.shell:
        if not isinstance(spec.command, str):
            raise TemplateError("a `shell: true` command must be a single string")
        argv = [SHELL, "-c", _render_shell(spec.command, context)]
    elif isinstance(spec.command, str):
        argv = _render_split(spec.command, context)
    else:
        templates = list(spec.command)
        if templates and _PLACEHOLDER.search(templates[0]):
            raise _program_from_template(templates[0])
        argv = [_render_text(t, context) for t in templates]
    if not argv or not argv[0]:
        raise TemplateError("the command is empty")
    for arg in argv:
        if "\x00" in arg:
            raise TemplateError(f"the command contains a NUL character: {arg!r}")
    return argv


def check_shell_template(text: str) -> None:
    """Raise ``TemplateError`` if a placeholder sits where ``shell: true`` cannot quote it."""
    positions = _scan_shell(text)
    for match in _PLACEHOLDER.finditer(text):
        _shell_quoting(match, positions)


def _render_text(template: str, context: Mapping[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda m: _resolve(m.group(1), context), template)


def _render_split(template: str, context: Mapping[str, Any]) -> list[str]:
    # Placeholders may contain spaces (`{{ a.b }}`), so they are swapped for markers that
    # shlex keeps inside one token, and only then replaced by values, which are never split.
    marker = _unused_character(template)
    names: list[str] = []

    def to_marker(match: re.Match[str]) -> str:
        names.append(match.group(1))
        return f"{marker}{len(names) - 1}{marker}"

    try:
        tokens = shlex.split(_PLACEHOLDER.sub(to_marker, template))
    except ValueError as exc:
        raise TemplateError(f"cannot split the command {template!r}: {exc}") from None
    if tokens and marker in tokens[0]:
        raise _program_from_template(template)
    values = [_resolve(name, context) for name in names]
    marked = re.compile(re.escape(marker) + r"(\d+)" + re.escape(marker))
    return [marked.sub(lambda m: values[int(m.group(1))], token) for token in tokens]


def _unused_character(text: str) -> str:
    for code in range(0xE000, 0xF900):  # the Unicode private use area
        if chr(code) not in text:
            return chr(code)
    raise TemplateError("the command uses every private-use character; cannot split it")


def _program_from_template(template: str) -> TemplateError:
    return TemplateError(
        f"the program to run cannot come from a template: {template!r}; "
        "name the program literally and pass values as arguments"
    )


def _resolve(name: str, context: Mapping[str, Any]) -> str:
    node: Any = context
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise TemplateError(_unknown_variable_message(name, context))
        node = node[part]
    if node is None:
        raise TemplateError(f"template variable {{{{ {name} }}}} has no value (null)")
    if isinstance(node, bool):
        text = "true" if node else "false"  # as written in YAML, not Python's True
    elif isinstance(node, str):
        text = node
    elif isinstance(node, Mapping | list | tuple):
        text = json.dumps(node, ensure_ascii=False, separators=(",", ":"), default=str)
    else:
        text = str(node)
    if "\x00" in text:
        raise TemplateError(
            f"the value of {{{{ {name} }}}} contains a NUL character, "
            "which cannot be passed to a command"
        )
    return text


def _unknown_variable_message(name: str, context: Mapping[str, Any]) -> str:
    available = _available_variables(context)
    if not available:
        return f"unknown template variable {{{{ {name} }}}}; no variables are available"
    shown = ", ".join(available[:_MAX_LISTED_VARIABLES])
    more = len(available) - _MAX_LISTED_VARIABLES
    suffix = f" and {more} more" if more > 0 else ""
    return f"unknown template variable {{{{ {name} }}}}; available: {shown}{suffix}"


def _available_variables(context: Mapping[str, Any]) -> list[str]:
    names: list[str] = []

    def walk(prefix: str, node: Mapping[Any, Any], depth: int) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping) and value and depth < 8:
                walk(f"{path}.", value, depth + 1)
            else:
                names.append(path)

    walk("", context, 0)
    return sorted(names)


# --- shell mode --------------------------------------------------------------------------

_WORD_BREAK = frozenset(" \t\n;&|()<>")
_UNSAFE_CONTEXTS = {
    "`": "inside backticks (use $(...) instead)",
    "${": "inside ${...}",
    "((": "inside an arithmetic expression",
    '"': "inside nested quotes",
    "'": "inside nested quotes",
}


def _render_shell(template: str, context: Mapping[str, Any]) -> str:
    positions = _scan_shell(template)

    def quoted(match: re.Match[str]) -> str:
        position = _shell_quoting(match, positions)
        value = shlex.quote(_resolve(match.group(1), context))
        if position == "double":
            return f'"{value}"'  # close "...", add the quoted word, reopen
        if position == "single":
            return f"'{value}'"
        return value

    return _PLACEHOLDER.sub(quoted, template)


def _shell_quoting(match: re.Match[str], positions: Mapping[int, str]) -> str:
    position = positions.get(match.start(), "right after a backslash or $")
    if position in ("plain", "double", "single"):
        return position
    raise TemplateError(
        f"cannot quote {match.group(0)} safely in a `shell: true` command: it is {position}; "
        "put it in a plain word or inside double quotes"
    )


def _scan_shell(template: str) -> dict[int, str]:
    """Follow the shell's quoting to see where each placeholder sits.

    Returns, per placeholder start offset, ``plain``, ``double``, ``single`` or a reason
    it cannot be quoted. It errs on the side of refusing: a construct it does not follow
    (here-documents, ``case`` inside a subshell, bash's ``$'...'``) makes every later
    placeholder refused rather than guessed.
    """
    matches = {m.start(): m for m in _PLACEHOLDER.finditer(template)}
    positions: dict[int, str] = {}
    stack: list[str] = []
    doubt: str | None = None
    i, n = 0, len(template)
    while i < n:
        match = matches.get(i)
        if match is not None:
            positions[i] = doubt or _position_in(stack)
            i = match.end()
            continue
        top = stack[-1] if stack else ""
        char, after = template[i], template[i + 1 : i + 2]
        if top == "'":
            if char == "'":
                stack.pop()
            i += 1
            continue
        if char == "\\":
            i += 2
            continue
        if template.startswith("$((", i):
            stack.append("((")
            i += 3
            continue
        if char == "$" and after in ("(", "{"):
            stack.append("$" + after)
            i += 2
            continue
        if char == "`":
            if top == "`":
                stack.pop()
            else:
                stack.append("`")
            i += 1
            continue
        if top == '"':
            if char == '"':
                stack.pop()
            i += 1
            continue
        if char == "$" and after == "'":
            doubt = doubt or "after a $'...' string, which shells read differently"
            stack.append("'")
            i += 2
            continue
        if char in "'\"":
            stack.append(char)
            i += 1
            continue
        if top == "${":
            if char == "}":
                stack.pop()
            i += 1
            continue
        if top == "((":
            if template.startswith("))", i):
                stack.pop()
                i += 2
                continue
            if char == "(":
                stack.append("(")
            i += 1
            continue
        # From here on the shell is reading commands: top level, $(...), (...) or `...`.
        at_word_start = i == 0 or template[i - 1] in _WORD_BREAK
        if char == "#" and at_word_start:
            end = template.find("\n", i)
            end = n if end < 0 else end
            for start in matches:
                if i <= start < end:
                    positions[start] = "inside a # comment"
            i = end
            continue
        if char == "(":
            if after == "(":
                stack.append("((")
                i += 2
            else:
                stack.append("(")
                i += 1
            continue
        if char == ")":
            if top in ("(", "$("):
                stack.pop()
            i += 1
            continue
        if template.startswith("<<", i):
            doubt = doubt or "after a here-document (<<), whose body the shell expands"
            i += 2
            continue
        if stack and at_word_start and re.match(r"case(?=[\s;&|()<>]|$)", template[i:]):
            doubt = doubt or "after a `case` inside (...), which the bot cannot follow"
        i += 1
    if stack:
        # The scanner and the shell disagree, or the command is broken: guess nothing.
        for start in matches:
            positions[start] = "in a command with unbalanced quotes or parentheses"
    return positions


def _position_in(stack: list[str]) -> str:
    if "`" in stack:
        # Backslashes are processed before the backtick's command is parsed, and a
        # backtick in the value would end it early: no quoting survives that.
        return _UNSAFE_CONTEXTS["`"]
    # $(...) starts a fresh command whatever surrounds it, so only what is inside counts.
    inner = stack[len(stack) - stack[::-1].index("$(") :] if "$(" in stack else stack
    *outer, last = inner or [""]
    if last in ("'", '"') and all(c == "(" for c in outer):
        return "single" if last == "'" else "double"
    for context in inner:
        if context != "(":
            return _UNSAFE_CONTEXTS[context]
    return "plain"


# --- secrets -------------------------------------------------------------------------------


def not_run(detail: str) -> dict[str, Any]:
    """The result, as executors report it (``ExecutionResult`` as a mapping), of a command
    that did not run: status ``error``, `detail` saying why."""
    return {
        "status": "error",
        "exit_code": None,
        "output": "",
        "duration": 0.0,
        "argv": [],
        "matched": None,
        "detail": detail,
    }


def mask_secrets(
    text: str,
    secrets: Iterable[str],
    patterns: Sequence[str | re.Pattern[str]] = DEFAULT_SECRET_PATTERNS,
) -> str:
    """Replace secret values (at least ``MIN_SECRET_LENGTH`` long) and pattern matches."""
    values = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    if values:
        # One alternation, longest first, so a secret containing another is masked whole.
        text = re.sub("|".join(re.escape(v) for v in values), MASK, text)
    for pattern in _compile_secret_patterns(patterns):
        text = pattern.sub(_mask_match, text)
    return text


def _mask_match(match: re.Match[str]) -> str:
    if "secret" not in match.re.groupindex or match.group("secret") is None:
        return MASK
    whole, offset = match.group(0), match.start()
    return whole[: match.start("secret") - offset] + MASK + whole[match.end("secret") - offset :]


def _compile_secret_patterns(
    patterns: Iterable[str | re.Pattern[str]],
) -> list[re.Pattern[str]]:
    return [p if isinstance(p, re.Pattern) else _compile(p, "secret pattern") for p in patterns]


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, what: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"invalid {what} {pattern!r}: {exc}") from None


# --- expect ------------------------------------------------------------------------------


def evaluate_expect(
    expect: Iterable[ExpectationLike], exit_code: int | None, output: str
) -> tuple[ResultStatus, str | None, str]:
    """Decide the status of a finished command: ``(status, matched pattern, detail)``."""
    compiled = [(e, _compile(e.pattern, "expect pattern", re.MULTILINE)) for e in expect]
    plain = [(e, regex) for e, regex in compiled if not e.allow_failure]
    tolerated = [(e, regex) for e, regex in compiled if e.allow_failure]
    if exit_code == 0:
        if not plain:
            return "success", None, "exit 0"
        for expectation, regex in plain:
            if regex.search(output):
                return "success", expectation.pattern, f"exit 0, matched {expectation.pattern!r}"
        failure = "exit 0, but no expected pattern matched"
    else:
        failure = _describe_exit(exit_code)
    for expectation, regex in tolerated:
        if regex.search(output):
            return (
                "allowed_failure",
                expectation.pattern,
                f"{failure}; allowed failure {expectation.pattern!r} matched",
            )
    return "failed", None, failure


def _describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "no exit code"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"non-zero exit code {exit_code}"


# --- running -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A command ready to start: everything `run` checks and renders before it starts a
    process (also what `runbookctl test` uses, which starts none)."""

    argv: list[str]
    env: dict[str, str]  # the whole environment of the process
    secrets: tuple[str, ...]  # values of `secret_env` variables, masked in what is shown
    patterns: tuple[re.Pattern[str], ...]
    shown_argv: tuple[str, ...]  # masked: what the audit log and chat show

    def masked(self, text: str) -> str:
        return mask_secrets(text, self.secrets, self.patterns)


def prepare(
    spec: CommandSpec,
    context: Mapping[str, Any],
    *,
    output_cap: int = 64_000,
    secret_patterns: Sequence[str | re.Pattern[str]] = (),
) -> Prepared:
    """Check ``spec`` and render it with ``context``; raises ``TemplateError`` /
    ``ValueError`` for an unusable spec, as `run` does before starting anything."""
    if output_cap <= 0:
        raise ValueError(f"output_cap must be positive, not {output_cap}")
    if spec.timeout <= 0:
        raise ValueError(f"timeout must be positive, not {spec.timeout}")
    patterns = tuple(_compile_secret_patterns([*DEFAULT_SECRET_PATTERNS, *secret_patterns]))
    evaluate_expect(spec.expect, 0, "")  # invalid regexes fail now, not after the command ran
    argv = render_argv(spec, context)
    env = {**os.environ, **render_env(spec, context)}
    secrets = tuple(env[name] for name in spec.secret_env if env.get(name))
    shown_argv = tuple(mask_secrets(arg, secrets, patterns) for arg in argv)
    return Prepared(argv, env, secrets, patterns, shown_argv)


def run(
    spec: CommandSpec,
    context: Mapping[str, Any],
    *,
    output_cap: int = 64_000,
    secret_patterns: Sequence[str | re.Pattern[str]] = (),
    on_start: Callable[[int], None] | None = None,
) -> ExecutionResult:
    """Run ``spec`` with ``context`` for its templates and report what happened.

    ``secret_patterns`` are masked in addition to ``DEFAULT_SECRET_PATTERNS``.
    ``on_start`` receives the pid (which is also the process group id) once started.
    Raises ``TemplateError``/``ValueError`` for an unusable spec, before starting anything.
    """
    ready = prepare(spec, context, output_cap=output_cap, secret_patterns=secret_patterns)
    argv, env, masked, shown_argv = ready.argv, ready.env, ready.masked, ready.shown_argv
    _become_subreaper()
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return ExecutionResult(
            status="error",
            exit_code=None,
            output="",
            duration=time.monotonic() - started,
            argv=shown_argv,
            matched=None,
            detail=masked(f"could not start: {exc}"),
        )

    tail = OutputTail.for_command(output_cap, ready.secrets)
    assert process.stdout is not None  # stdout=PIPE
    stop_reading = threading.Event()
    reader = threading.Thread(
        target=_pump,
        args=(process.stdout.fileno(), tail, stop_reading),
        name=f"executor-output-{process.pid}",
        daemon=True,
    )
    reader.start()
    timed_out = False
    try:
        if on_start is not None:
            on_start(process.pid)
        try:
            process.wait(timeout=max(0.0, started + spec.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        # Also on KeyboardInterrupt or a failing on_start: nothing may outlive run().
        stragglers = _stop_group(process)
        reader.join(OUTPUT_DRAIN_SECONDS)
        fully_read = not reader.is_alive()
        stop_reading.set()
        reader.join()
        process.stdout.close()
    notes: list[str] = []
    if stragglers and not timed_out:
        notes.append("stopped processes it left running")
    if not fully_read:
        notes.append("stopped reading output held open by a detached process")
    return conclude(
        spec,
        ready,
        exit_code=process.returncode,
        output=tail,
        output_cap=output_cap,
        duration=time.monotonic() - started,
        timed_out=timed_out,
        notes=notes,
    )


def conclude(
    spec: CommandSpec,
    ready: Prepared,
    *,
    exit_code: int | None,
    output: OutputTail,
    output_cap: int,
    duration: float,
    timed_out: bool,
    notes: Sequence[str] = (),
) -> ExecutionResult:
    """The result of a command that ran, wherever it ran (a local process, a Kubernetes
    Job's pod): its output's tail capped and masked, its status by ``expect`` (a timeout
    is a timeout whatever the output says), `notes` added to the detail."""
    shown = _shown_output(output, output_cap, ready.masked)
    status: ResultStatus
    matched: str | None
    if timed_out:
        status, matched = "timeout", None
        detail = f"killed after {spec.timeout:g}s timeout"
    else:
        status, matched, detail = evaluate_expect(spec.expect, exit_code, shown)
    return ExecutionResult(
        status=status,
        exit_code=exit_code,
        output=shown,
        duration=duration,
        argv=ready.shown_argv,
        matched=matched,
        detail="; ".join([detail, *notes]),
    )


def render_env(spec: CommandSpec, context: Mapping[str, Any]) -> dict[str, str]:
    """The variables ``spec.env`` adds to the process's environment, rendered."""
    rendered: dict[str, str] = {}
    for name, template in spec.env.items():
        if not name or "=" in name or "\x00" in name:
            raise ValueError(f"invalid environment variable name {name!r}")
        value = template if spec.rendered else _render_text(template, context)
        if "\x00" in value:
            raise TemplateError(f"environment variable {name} contains a NUL character")
        rendered[name] = value
    return rendered


def _shown_output(tail: OutputTail, cap: int, masked: Callable[[str], str]) -> str:
    text = masked(tail.data().decode("utf-8", errors="replace"))
    if tail.total <= cap:
        return text
    encoded = text.encode("utf-8")
    if len(encoded) > cap:
        # "ignore" only drops the one character the cut may have split.
        text = encoded[-cap:].decode("utf-8", errors="ignore")
    return f"[... {tail.total - cap} bytes of earlier output dropped ...]\n{text}"


class OutputTail:
    """The last ``keep`` bytes of a stream, in chunks: memory stays near ``keep``."""

    @classmethod
    def for_command(cls, output_cap: int, secrets: Iterable[str]) -> OutputTail:
        """A tail that keeps what `conclude` needs for `output_cap`: a little more than the
        cap, so secrets crossing the cut are masked whole before cutting."""
        longest_secret = max((len(s.encode()) for s in secrets), default=0)
        return cls(output_cap + _MASK_SLACK_BYTES + longest_secret)

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.total = 0
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def append(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self.keep:
            self._size -= len(self._chunks.popleft())

    def data(self) -> bytes:
        return b"".join(self._chunks)[-self.keep :]


def _pump(fd: int, tail: OutputTail, stop: threading.Event) -> None:
    # select() with a timeout rather than a blocking read, so run() can give up on a pipe
    # that a detached process keeps open.
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not stop.is_set():
            if not selector.select(timeout=0.05):
                continue
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except OSError:
                return
            if not chunk:
                return
            tail.append(chunk)


def _stop_group(process: subprocess.Popen[bytes]) -> bool:
    """Stop every process in the command's group; True if any besides the leader was found.

    Signalling the group is safe from pid reuse: a process group id stays reserved while
    any member, including the unreaped leader, exists.
    """
    pgid = process.pid
    if _group_gone(process, pgid) or not _signal_group(pgid, signal.SIGTERM):
        return False
    stragglers = process.returncode is not None
    deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
    while not _group_gone(process, pgid):
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_SECONDS)
    else:
        return stragglers
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while not _group_gone(process, pgid) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    if process.returncode is None:
        process.wait()  # SIGKILL cannot be ignored; this returns promptly
    return stragglers


def _group_gone(process: subprocess.Popen[bytes], pgid: int) -> bool:
    _reap_group(process, pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a member we may not signal (setuid) still exists
    return False


def _reap_group(process: subprocess.Popen[bytes], pgid: int) -> None:
    # Zombies still count as group members, so orphans we adopted as subreaper are reaped
    # here. Only after Popen has reaped the leader: reaping it by group would steal its
    # exit status from Popen.
    if process.poll() is None:
        return
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _signal_group(pgid: int, signum: signal.Signals) -> bool:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # some members could not be signalled; the caller keeps waiting for them
    return True


@functools.cache
def _become_subreaper() -> None:
    """Adopt orphaned descendants so their zombies can be reaped (Linux only).

    Without this, a killed command's children are reparented to PID 1; in a container
    where the bot is PID 1, or under an init that reaps lazily, they would linger as
    zombies in the group. Done on first use, not at import.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # best effort: without it, orphans wait for init to reap them
