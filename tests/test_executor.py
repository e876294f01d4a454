"""The subprocess runner, driven through real processes: no mocks, no fake shell."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.executor import (
    DEFAULT_SECRET_PATTERNS,
    MASK,
    SHELL,
    TERMINATE_GRACE_SECONDS,
    CommandSpec,
    ExecutionResult,
    Expectation,
    TemplateError,
    check_shell_template,
    evaluate_expect,
    mask_secrets,
    render_argv,
    render_params,
    run,
    template_variables,
)

PY = sys.executable
PRINT_ARGV = "import json,sys; print(json.dumps(sys.argv[1:]))"
# A real program that reports exactly the argv it received.
ARGV_PRINTER = f"{shlex.quote(PY)} -c {shlex.quote(PRINT_ARGV)}"

INJECTIONS = [
    "$(rm -rf /)",
    "; reboot",
    "&& curl evil",
    "|| true",
    "| cat /etc/passwd",
    "> /tmp/owned",
    "`id`",
    "a\nb",
    "line\n; reboot",
    "*",
    "/etc/*",
    "-rf",
    "--help",
    "'",
    '"',
    "\\",
    "$HOME",
    "${HOME}",
    "~",
    "#not a comment",
    "a b  c",
    "\t",
    "",
    "{{ params.other }}",
    "ünïcødé ✓",
]


def printed_argv(result: ExecutionResult) -> Any:
    assert result.status == "success", result
    return json.loads(result.output)


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# --- no shell: values are single, inert arguments -------------------------------------------


@pytest.mark.parametrize("value", INJECTIONS)
def test_string_command_passes_each_value_as_exactly_one_argument(value: str) -> None:
    spec = CommandSpec(
        f"{ARGV_PRINTER} {{{{ params.v }}}} --opt={{{{params.v}}}} '{{{{ params.v }}}}'"
    )
    result = run(spec, {"params": {"v": value, "other": "EXPANDED"}})
    assert printed_argv(result) == [value, f"--opt={value}", value]


@pytest.mark.parametrize("value", INJECTIONS)
def test_list_command_passes_each_value_as_exactly_one_argument(value: str) -> None:
    spec = CommandSpec([PY, "-c", PRINT_ARGV, "{{ params.v }}", "pre {{ params.v }} post"])
    result = run(spec, {"params": {"v": value, "other": "EXPANDED"}})
    assert printed_argv(result) == [value, f"pre {value} post"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_shell_mode_quotes_values_wherever_they_stand(value: str) -> None:
    spec = CommandSpec(
        f'{ARGV_PRINTER} {{{{ params.v }}}} "double {{{{ params.v }}}}" '
        f"'single {{{{ params.v }}}}' \"$(printf %s {{{{ params.v }}}})\"",
        shell=True,
    )
    result = run(spec, {"params": {"v": value, "other": "EXPANDED"}})
    # $(...) drops trailing newlines: that is the shell, not the quoting.
    assert printed_argv(result) == [value, f"double {value}", f"single {value}", value.rstrip("\n")]
    assert result.argv[:2] == (SHELL, "-c")


@pytest.mark.parametrize("shell", [False, True], ids=["argv", "shell"])
def test_injected_text_never_touches_the_filesystem(tmp_path: Path, shell: bool) -> None:
    canary = tmp_path / "canary"
    canary.write_text("still here")
    attacks = [
        f"; rm -f {canary}",
        f"$(rm -f {canary})",
        f"`rm -f {canary}`",
        f"&& rm -f {canary}",
        f"\nrm -f {canary}",
        f"'; rm -f {canary}; echo '",
        f'"; rm -f {canary}; echo "',
        "; touch created",
        "$(touch created)",
        "\ntouch created #",
    ]
    command = (
        "echo {{ params.v }}; echo \"{{ params.v }}\"; echo '{{ params.v }}'"
        if shell
        else "echo {{ params.v }} \"{{ params.v }}\" '{{ params.v }}'"
    )
    for attack in attacks:
        result = run(
            CommandSpec(command, shell=shell, cwd=str(tmp_path)), {"params": {"v": attack}}
        )
        assert result.status == "success", result
        assert attack.strip() in result.output
    assert canary.read_text() == "still here"
    assert not (tmp_path / "created").exists()


_NO_NUL_TEXT = st.text().filter(lambda s: "\x00" not in s)


@given(value=_NO_NUL_TEXT)
def test_any_text_renders_to_exactly_itself(value: str) -> None:
    context = {"params": {"v": value}}
    assert render_argv(CommandSpec("prog --flag {{ params.v }} x{{params.v}}y"), context) == [
        "prog",
        "--flag",
        value,
        f"x{value}y",
    ]
    assert render_argv(CommandSpec(["prog", "{{ params.v }}"]), context) == ["prog", value]


@settings(max_examples=60, deadline=None)
@given(value=_NO_NUL_TEXT)
def test_any_text_survives_shell_quoting_through_a_real_shell(value: str) -> None:
    spec = CommandSpec(
        "printf '%s|' {{ params.v }} \"d{{ params.v }}\" 's{{ params.v }}'", shell=True
    )
    argv = render_argv(spec, {"params": {"v": value}})
    completed = subprocess.run(argv, capture_output=True, check=True, timeout=10)
    assert completed.stdout == f"{value}|d{value}|s{value}|".encode()


# --- templates in params: rendered from the incident, then single arguments ---------------

ALERT = {
    "id": "Q1",
    "title": "Payments API elevated 5xx",
    "service": "payments",
    "urgency": "high",
    "details": {"host": "api-1.internal", "ports": [80, 443], "region": None},
}


def test_params_are_rendered_from_the_incident() -> None:
    params = {
        "url": "https://{{ incident.details.host }}/healthz",
        "title": "{{incident.title}}",
        "window": "5m",
        "shard": 3,
        "verbose": True,
        "unset": None,
        "hosts": ["{{ incident.details.host }}", 7],
        "labels": {"service": "{{ incident.service }}", "n": 1},
        "ports": "{{ incident.details.ports }}",
    }
    rendered = render_params(params, {"incident": ALERT})
    assert rendered == {
        "url": "https://api-1.internal/healthz",
        "title": "Payments API elevated 5xx",
        "window": "5m",
        "shard": 3,
        "verbose": True,
        "unset": None,
        "hosts": ["api-1.internal", 7],
        "labels": {"service": "payments", "n": 1},
        "ports": "[80,443]",
    }
    assert params["url"] == "https://{{ incident.details.host }}/healthz"  # not changed


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"url": "{{ incident.details.hostname }}"}, r"unknown template variable .*available:"),
        ({"url": "{{ incident.details.region }}"}, r"has no value \(null\)"),
        ({"url": "{{ params.window }}", "window": "5m"}, r"param 'url' refers to .*params"),
        ({"all": "{{ params }}"}, r"not other params"),
        ({"nested": ["{{ params.x }}"]}, r"param 'nested' refers to"),
    ],
    ids=repr,
)
def test_a_param_that_cannot_be_rendered_is_a_template_error(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(TemplateError, match=message):
        render_params(params, {"incident": ALERT, "params": {"window": "1m", "x": 1}})


def test_text_in_params_that_is_not_a_placeholder_stays_as_it_is() -> None:
    params = {
        "format": "{{.State.Status}}",
        "json": '{"a": 1}',
        "odd": "{{ incident.title|upper }}",
    }
    assert render_params(params, {"incident": ALERT}) == params


def test_a_rendered_param_is_one_argument_of_the_command_that_uses_it() -> None:
    incident = {**ALERT, "details": {"host": "h; reboot $(id) {{ params.other }}"}}
    params = render_params({"url": "https://{{ incident.details.host }}/x"}, {"incident": incident})
    spec = CommandSpec(f"{ARGV_PRINTER} --url {{{{ params.url }}}}")
    result = run(spec, {"incident": incident, "params": {**params, "other": "EXPANDED"}})
    assert printed_argv(result) == ["--url", "https://h; reboot $(id) {{ params.other }}/x"]


@given(host=_NO_NUL_TEXT, title=_NO_NUL_TEXT)
def test_hostile_incident_values_stay_one_argument_through_params(host: str, title: str) -> None:
    incident = {**ALERT, "title": title, "details": {"host": host}}
    params = render_params(
        {"url": "https://{{ incident.details.host }}/healthz", "q": "{{ incident.title }}"},
        {"incident": incident},
    )
    assert params == {"url": f"https://{host}/healthz", "q": title}
    context = {"incident": incident, "params": params}
    assert render_argv(CommandSpec("curl --fail {{ params.url }} -d {{ params.q }}"), context) == [
        "curl",
        "--fail",
        f"https://{host}/healthz",
        "-d",
        title,
    ]
    assert render_argv(CommandSpec(["curl", "{{ params.url }}", "q={{ params.q }}"]), context) == [
        "curl",
        f"https://{host}/healthz",
        f"q={title}",
    ]


@settings(max_examples=40, deadline=None)
@given(host=_NO_NUL_TEXT)
def test_hostile_values_in_params_stay_inert_in_a_real_shell(host: str) -> None:
    incident = {**ALERT, "details": {"host": host}}
    params = render_params({"url": "https://{{ incident.details.host }}/x"}, {"incident": incident})
    spec = CommandSpec("printf '%s|' {{ params.url }} \"{{ params.url }}\"", shell=True)
    argv = render_argv(spec, {"incident": incident, "params": params})
    completed = subprocess.run(argv, capture_output=True, check=True, timeout=10)
    url = f"https://{host}/x"
    assert completed.stdout == f"{url}|{url}|".encode()


def test_a_nul_character_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"\{\{ params.v \}\} contains a NUL character"):
        render_argv(CommandSpec("echo {{ params.v }}"), {"params": {"v": "a\x00b"}})
    with pytest.raises(TemplateError, match="NUL"):
        run(
            CommandSpec("touch created {{ params.v }}", cwd=str(tmp_path)),
            {"params": {"v": "\x00"}},
        )
    assert not (tmp_path / "created").exists()


# --- templates -------------------------------------------------------------------------------

INCIDENT = {
    "incident": {"title": "Payments 5xx", "details": {"namespace": "payments"}},
    "params": {"window": "5m"},
}


def test_unknown_variable_names_it_and_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as caught:
        run(CommandSpec("touch created {{ incident.titel }}", cwd=str(tmp_path)), INCIDENT)
    assert str(caught.value) == (
        "unknown template variable {{ incident.titel }}; available: "
        "incident.details.namespace, incident.title, params.window"
    )
    assert not (tmp_path / "created").exists()


def test_a_null_value_is_an_error_not_an_empty_argument() -> None:
    with pytest.raises(TemplateError, match=r"\{\{ params.window \}\} has no value"):
        render_argv(CommandSpec("echo {{ params.window }}"), {"params": {"window": None}})


def test_values_are_written_as_in_yaml() -> None:
    context = {"params": {"on": True, "n": 5, "ratio": 0.5, "labels": {"app": "web"}}}
    argv = render_argv(
        CommandSpec("echo {{ params.on }} {{ params.n }} {{ params.ratio }} {{ params.labels }}"),
        context,
    )
    assert argv == ["echo", "true", "5", "0.5", '{"app":"web"}']


def test_other_curly_templates_are_left_for_the_program() -> None:
    spec = CommandSpec("docker inspect --format '{{.State.Status}}' {{ params.c }}")
    assert render_argv(spec, {"params": {"c": "web"}}) == [
        "docker",
        "inspect",
        "--format",
        "{{.State.Status}}",
        "web",
    ]


def test_template_variables_lists_each_name_once_in_order() -> None:
    text = (
        "kubectl -n {{ incident.details.namespace }} logs --since={{params.window}} "
        "{{ incident.details.namespace }} --template '{{.metadata.name}}'"
    )
    assert template_variables(text) == ["incident.details.namespace", "params.window"]


@pytest.mark.parametrize(
    "command",
    ["{{ params.tool }} --version", ["{{ params.tool }}", "--version"]],
    ids=["string", "list"],
)
def test_the_program_cannot_come_from_a_template(command: str | list[str]) -> None:
    with pytest.raises(TemplateError, match="program to run cannot come from a template"):
        render_argv(CommandSpec(command), {"params": {"tool": "/tmp/evil"}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (CommandSpec("echo 'unterminated"), "cannot split the command"),
        (CommandSpec(""), "the command is empty"),
        (CommandSpec(["echo", "{{ x }}"], shell=True), "must be a single string"),
    ],
)
def test_malformed_commands_are_template_errors(spec: CommandSpec, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render_argv(spec, {"x": "1"})


@pytest.mark.parametrize(
    ("template", "position"),
    [
        ("echo `echo {{ x }}`", "inside backticks"),
        ("echo hi # {{ x }}", "inside a # comment"),
        ("cat <<EOF\n{{ x }}\nEOF", "after a here-document"),
        ("echo ${UNSET:-{{ x }}}", r"inside \$\{...\}"),
        ("echo $(( {{ x }} + 1 ))", "inside an arithmetic expression"),
        ("echo \\{{ x }}", "right after a backslash"),
        ("echo $'tab\\t' {{ x }}", r"after a \$'...' string"),
        ('echo "{{ x }}', "unbalanced quotes"),
    ],
)
def test_shell_placeholders_the_bot_cannot_quote_are_refused(template: str, position: str) -> None:
    with pytest.raises(TemplateError, match=position):
        check_shell_template(template)
    with pytest.raises(TemplateError, match=position):
        render_argv(CommandSpec(template, shell=True), {"x": "$(reboot)"})


@pytest.mark.parametrize(
    "template",
    [
        "echo {{ x }} | grep -c {{ x }}",
        'echo "title: {{ x }}"',
        "echo 'title: {{ x }}'",
        'echo "$(echo "{{ x }}")"',
        "( cd /tmp && echo {{ x }} )",
        "case {{ x }} in a) echo a;; esac",
    ],
)
def test_shell_placeholders_in_quotable_positions_are_accepted(template: str) -> None:
    check_shell_template(template)


# --- timeouts and process groups -------------------------------------------------------------


def test_timeout_kills_a_group_that_ignores_sigterm_and_forks() -> None:
    started: list[int] = []
    spec = CommandSpec("sh -c 'trap \"\" TERM; echo ready; sleep 100 & sleep 100'", timeout=0.5)
    result = run(spec, {}, on_start=started.append)

    assert result.status == "timeout"
    assert result.detail == "killed after 0.5s timeout"
    assert result.exit_code == -signal.SIGKILL
    assert result.output == "ready\n"
    assert 0.5 + TERMINATE_GRACE_SECONDS <= result.duration < 0.5 + TERMINATE_GRACE_SECONDS + 2
    assert group_is_gone(started[0])


def test_timeout_stops_a_cooperative_command_without_waiting_for_the_grace() -> None:
    started: list[int] = []
    spec = CommandSpec("sh -c 'sleep 100 & sleep 100'", timeout=0.3)
    result = run(spec, {}, on_start=started.append)
    assert result.status == "timeout"
    assert result.exit_code == -signal.SIGTERM
    assert result.duration < 0.3 + TERMINATE_GRACE_SECONDS / 2
    assert group_is_gone(started[0])


def test_processes_left_running_after_exit_are_stopped() -> None:
    started: list[int] = []
    # The background sleep keeps the output pipe open: without stopping it, run() would hang.
    spec = CommandSpec("sh -c 'sleep 100 & echo started'", timeout=10)
    result = run(spec, {}, on_start=started.append)
    assert (result.status, result.output) == ("success", "started\n")
    assert result.detail == "exit 0; stopped processes it left running"
    assert result.duration < 2
    assert group_is_gone(started[0])


def test_a_detached_process_holding_the_output_does_not_hang_run() -> None:
    # Popen returns only once the child has exec'd, so it has left the group by then.
    code = (
        "import subprocess; "
        "print(subprocess.Popen(['sleep', '30'], start_new_session=True).pid, flush=True)"
    )
    result = run(CommandSpec([PY, "-c", code], timeout=10), {})
    detached = int(result.output.split()[0])
    try:
        assert result.status == "success"
        assert "stopped reading output held open by a detached process" in result.detail
        assert result.duration < 3
    finally:
        os.kill(detached, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # adopted only where we are subreaper
            os.waitpid(detached, 0)


def test_on_start_gets_the_pid_which_leads_its_own_group() -> None:
    started: list[int] = []
    code = "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"
    result = run(CommandSpec([PY, "-c", code]), {}, on_start=started.append)
    assert result.output.split() == [str(started[0])] * 3


# --- output ------------------------------------------------------------------------------------


def test_huge_output_keeps_the_tail_with_bounded_memory() -> None:
    line_count = 50 * 1024
    code = (
        "import sys\n"
        "line = b'x' * 1023 + b'\\n'\n"
        f"for _ in range({line_count}): sys.stdout.buffer.write(line)\n"
        "sys.stdout.buffer.write(b'THE-END\\n')\n"
    )
    cap = 10_000
    tracemalloc.start()
    try:
        result = run(CommandSpec([PY, "-c", code], timeout=30), {}, output_cap=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    total = line_count * 1024 + len("THE-END\n")
    marker, _, tail = result.output.partition("\n")
    assert result.status == "success"
    assert marker == f"[... {total - cap} bytes of earlier output dropped ...]"
    assert len(tail.encode()) == cap
    assert tail.endswith("x" * 1023 + "\nTHE-END\n")
    assert peak < 2_000_000, f"{peak} bytes traced while reading {total} bytes"


def test_output_is_decoded_safely() -> None:
    code = "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end \\xc3')"
    result = run(CommandSpec([PY, "-c", code]), {})
    assert result.output == "ok \ufffd\ufffd end \ufffd"


def test_the_cut_does_not_split_a_character() -> None:
    code = "import sys; sys.stdout.write('é' * 20000)"
    result = run(
        CommandSpec([PY, "-c", code], env={"PYTHONIOENCODING": "utf-8"}), {}, output_cap=1001
    )
    assert result.output == "[... 38999 bytes of earlier output dropped ...]\n" + "é" * 500


def test_stderr_is_merged_and_stdin_is_empty() -> None:
    code = (
        "import sys; print(repr(sys.stdin.read()), flush=True); print('to stderr', file=sys.stderr)"
    )
    result = run(CommandSpec([PY, "-c", code], timeout=5), {})
    assert result.output == "''\nto stderr\n"


def test_environment_is_inherited_plus_rendered_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECUTOR_TEST_INHERITED", "from the bot")
    code = "import os; print(os.environ['EXECUTOR_TEST_INHERITED'], '/', os.environ['NS'])"
    spec = CommandSpec([PY, "-c", code], env={"NS": "ns-{{ incident.details.namespace }}"})
    assert run(spec, INCIDENT).output == "from the bot / ns-payments\n"


# --- secrets -----------------------------------------------------------------------------------


def test_secret_env_values_are_masked_in_output_and_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INHERITED_CREDENTIAL", "inherited-value-42")
    code = (
        "import os, sys; "
        "print(os.environ['REDIS_AUTH'], os.environ['INHERITED_CREDENTIAL'], "
        "os.environ['SHORT'], sys.argv[1])"
    )
    spec = CommandSpec(
        [PY, "-c", code, "--auth={{ params.auth }}"],
        env={"REDIS_AUTH": "{{ params.auth }}", "SHORT": "abc"},
        secret_env=["REDIS_AUTH", "INHERITED_CREDENTIAL", "SHORT", "NOT_SET_ANYWHERE"],
    )
    result = run(spec, {"params": {"auth": "k3y-of-the-kingdom"}})

    assert result.output == f"{MASK} {MASK} abc --auth={MASK}\n"
    assert result.argv[-1] == f"--auth={MASK}"
    assert "k3y-of-the-kingdom" not in repr(result)


def test_default_patterns_mask_common_tokens_in_output() -> None:
    lines = [
        "slack xoxb-1234-5678-abcdefghij",
        "app xapp-1-A0123-456-abcdef",
        "Authorization: Bearer eyJhbGciOi.abc.def",
        "Authorization: Token token=y_NbAkKc66ryYTWUXYEu",
        "aws AKIAIOSFODNN7EXAMPLE",
        "https://example.test/?token=abc123&user=bob",
        "password=hunter22 user=bob",
        '{"password": "hunter22", "user": "bob"}',
        "DB_PASSWORD=hunter22",
    ]
    code = f"print({chr(10).join(lines)!r})"
    result = run(CommandSpec([PY, "-c", code]), {})
    assert result.output.splitlines() == [
        f"slack {MASK}",
        f"app {MASK}",
        f"Authorization: Bearer {MASK}",
        f"Authorization: Token token={MASK}",
        f"aws {MASK}",
        f"https://example.test/?token={MASK}&user=bob",
        f"password={MASK} user=bob",
        f'{{"password": "{MASK}", "user": "bob"}}',
        f"DB_PASSWORD={MASK}",
    ]


def test_secrets_in_the_argv_are_masked_by_pattern_too() -> None:
    result = run(CommandSpec(["echo", "--header", "Authorization: Bearer abcdef123"]), {})
    assert result.argv == ("echo", "--header", f"Authorization: Bearer {MASK}")
    assert result.output == f"--header Authorization: Bearer {MASK}\n"


def test_extra_secret_patterns_mask_only_their_secret_group() -> None:
    code = "print('session-id s3ss10n and status ok')"
    result = run(CommandSpec([PY, "-c", code]), {}, secret_patterns=[r"session-id (?P<secret>\w+)"])
    assert result.output == f"session-id {MASK} and status ok\n"
    with pytest.raises(ValueError, match=r"invalid secret pattern '\('"):
        run(CommandSpec(["true"]), {}, secret_patterns=["("])


def test_a_secret_straddling_the_cut_is_not_left_half_visible() -> None:
    code = "import os; print('x' * 1000 + os.environ['SECRET'] + 'y' * 95)"
    spec = CommandSpec([PY, "-c", code], env={"SECRET": "SECRETVALUE123"}, secret_env=["SECRET"])
    result = run(spec, {}, output_cap=100)
    assert "E123" not in result.output
    assert result.output.endswith("*" * 4 + "y" * 95 + "\n")


def test_mask_secrets_prefers_the_longest_secret_and_ignores_short_ones() -> None:
    text = "user=admin pass=admin-secret-long id=42"
    masked = mask_secrets(text, ["admin-secret", "admin-secret-long", "42"], patterns=())
    assert masked == f"user=admin pass={MASK} id=42"
    assert mask_secrets("token=abc", [], DEFAULT_SECRET_PATTERNS) == f"token={MASK}"


# --- expect ------------------------------------------------------------------------------------

OK = Expectation("OK")
EMPTY = Expectation(r"\(empty list or set\)", allow_failure=True)


@pytest.mark.parametrize(
    ("expect", "exit_code", "output", "outcome"),
    [
        ([], 0, "", ("success", None, "exit 0")),
        ([OK, EMPTY], 0, "OK\n", ("success", "OK", "exit 0, matched 'OK'")),
        ([Expectation("^OK$")], 0, "line\nOK\nmore", ("success", "^OK$", "exit 0, matched '^OK$'")),
        ([EMPTY], 0, "(empty list or set)", ("success", None, "exit 0")),
        ([OK], 0, "ERR", ("failed", None, "exit 0, but no expected pattern matched")),
        ([OK], 1, "OK", ("failed", None, "non-zero exit code 1")),
        (
            [OK, EMPTY],
            0,
            "(empty list or set)",
            (
                "allowed_failure",
                EMPTY.pattern,
                "exit 0, but no expected pattern matched; "
                f"allowed failure {EMPTY.pattern!r} matched",
            ),
        ),
        (
            [OK, EMPTY],
            1,
            "(empty list or set)",
            (
                "allowed_failure",
                EMPTY.pattern,
                f"non-zero exit code 1; allowed failure {EMPTY.pattern!r} matched",
            ),
        ),
        ([OK, EMPTY], 2, "boom", ("failed", None, "non-zero exit code 2")),
        ([], -9, "", ("failed", None, "killed by SIGKILL")),
        ([], None, "", ("failed", None, "no exit code")),
    ],
)
def test_evaluate_expect(
    expect: list[Expectation], exit_code: int | None, output: str, outcome: tuple[Any, ...]
) -> None:
    assert evaluate_expect(expect, exit_code, output) == outcome


def test_an_invalid_expect_pattern_names_itself_and_stops_the_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"invalid expect pattern '\(unclosed'"):
        evaluate_expect([Expectation("(unclosed")], 0, "")
    spec = CommandSpec("touch created", expect=[Expectation("(unclosed")], cwd=str(tmp_path))
    with pytest.raises(ValueError, match="unclosed"):
        run(spec, {})
    assert not (tmp_path / "created").exists()


@pytest.mark.parametrize(
    ("code", "status", "matched"),
    [
        ("print('OK')", "success", "OK"),
        ("print('(empty list or set)'); raise SystemExit(1)", "allowed_failure", EMPTY.pattern),
        ("print('ERR'); raise SystemExit(1)", "failed", None),
    ],
)
def test_run_applies_expect(code: str, status: str, matched: str | None) -> None:
    result = run(CommandSpec([PY, "-c", code], expect=[OK, EMPTY]), {})
    assert (result.status, result.matched) == (status, matched)


def test_a_missing_program_is_an_error_result() -> None:
    result = run(CommandSpec("definitely-not-a-program-7f3a --flag"), {})
    assert result.status == "error"
    assert result.exit_code is None
    assert result.detail == (
        "could not start: [Errno 2] No such file or directory: 'definitely-not-a-program-7f3a'"
    )
    assert result.argv == ("definitely-not-a-program-7f3a", "--flag")


def test_a_missing_working_directory_is_an_error_result(tmp_path: Path) -> None:
    result = run(CommandSpec("true", cwd=str(tmp_path / "missing")), {})
    assert (result.status, result.exit_code) == ("error", None)
    assert result.detail.startswith("could not start: [Errno 2]")


def test_durations_are_measured() -> None:
    before = time.monotonic()
    result = run(CommandSpec("sleep 0.2"), {})
    assert 0.2 <= result.duration <= time.monotonic() - before
