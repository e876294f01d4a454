"""`runbookctl lint`: every rule on a broken catalog, the bundled catalog, the CLI.

tests/lint_cases/ holds one small broken catalog per rule. The offending lines carry a
comment ``# expect: RB0xx`` (several codes: ``# expect: RB034, RB027``); a diagnostic
about the catalog directory itself is marked ``# expect-root: RB0xx`` anywhere. The test
lints each case and requires exactly the marked diagnostics, so fixtures cannot drift.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.catalog import parse_catalog, rules
from bot.catalog.diagnostics import Diagnostic
from bot.catalog.schemacheck import quick_is_valid, schema
from bot.catalog.yamlsource import MAX_FILE_BYTES
from runbookctl.lint import format_github, lint

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "lint_cases"
BUNDLED = ROOT / "runbooks"
MARKER = re.compile(r"#\s*expect(-root)?:\s*(RB\d{3}(?:\s*,\s*RB\d{3})*)")

Expected = set[tuple[str, int, str]]


def expected_diagnostics(case: Path) -> Expected:
    expected: Expected = set()
    for file in sorted(case.rglob("*.y*ml")):
        for number, line in enumerate(file.read_text("utf-8").splitlines(), start=1):
            found = MARKER.search(line)
            if not found:
                continue
            for code in re.split(r"\s*,\s*", found.group(2)):
                if found.group(1):
                    expected.add((str(case.resolve()), 1, code))
                else:
                    expected.add((str(file.resolve()), number, code))
    return expected


def reported(diagnostics: list[Diagnostic]) -> Expected:
    return {(str(Path(d.file).resolve()), d.line, d.code) for d in diagnostics}


def case_dirs() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_each_rule_is_reported_on_the_marked_line(case: Path) -> None:
    expected = expected_diagnostics(case)
    assert expected, f"{case.name} has no `# expect:` marker"
    assert case.name.startswith(tuple(f"{code.lower()}-" for _, _, code in expected))
    diagnostics = parse_catalog(case).diagnostics
    assert reported(diagnostics) == expected, "\n".join(d.format() for d in diagnostics)
    for d in diagnostics:
        assert d.message and d.fix and d.rule
        assert d.path.startswith("$")


def documented_codes() -> set[str]:
    return set(re.findall(r"^\s+(RB\d{3}) [EW/]+ ", rules.__doc__ or "", re.MULTILINE))


def test_every_documented_code_has_a_case_or_a_test() -> None:
    covered = {name.split("-")[0].upper() for name in os.listdir(CASES)}
    covered |= {"RB004", "RB009"}  # generated below: a 1 MiB file, a missing path
    assert documented_codes() - covered == set()
    assert {"RB020", "RB023", "RB028", "RB034"} <= documented_codes()


def test_file_over_the_size_limit(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text("kind: catalog\nenvironments: [{name: dev}]\n")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    diagnostics = parse_catalog(tmp_path).diagnostics
    assert [(Path(d.file).name, d.line, d.code) for d in diagnostics] == [("big.yaml", 1, "RB004")]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text("kind: catalog\nenvironments: [{name: dev}]\n")
    (tmp_path / "latin1.yaml").write_bytes(b"id: caf\xe9\ncommand: x\n")
    diagnostics = parse_catalog(tmp_path).diagnostics
    assert [(d.code, d.line) for d in diagnostics] == [("RB001", 1)]


def test_a_symlink_loop_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text("kind: catalog\nenvironments: [{name: dev}]\n")
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    diagnostics = parse_catalog(tmp_path).diagnostics
    assert [(Path(d.file).name, d.code) for d in diagnostics] == [("loop.yaml", "RB001")]
    assert "Too many levels of symbolic links" in diagnostics[0].message


def test_an_empty_catalog_is_a_warning(tmp_path: Path) -> None:
    empty = CliRunner().invoke(lint, [str(tmp_path)])
    assert empty.exit_code == 0
    assert "RB042" in empty.output and "no actions or runbooks found" in empty.output
    assert empty.output.endswith("0 errors, 1 warning in 0 files\n")
    assert CliRunner().invoke(lint, ["--strict", str(tmp_path)]).exit_code == 1


@pytest.mark.parametrize(
    "mention",
    [
        "",
        "<!subteam^S0ONCALL>",
        "<!subteam^S0ONCALL|@oncall>",
        "<@U024BE7LH>",
        "<@W0TEAM|amy>",
        "<!here>",
        "<!channel>",
        "<@U1> <!subteam^S2>",
        "<@U1>, <@U2>",
    ],
)
def test_slack_mentions_that_notify(mention: str) -> None:
    assert rules.mention_problem(mention) is None


@pytest.mark.parametrize(
    ("mention", "fix"),
    [
        ("@sre-leads", "<!subteam^S…>"),
        ("@alice", "<@U…>"),
        ("@here", "write `<!here>`"),
        ("@channel", "write `<!channel>`"),
        ("U024BE7LH", "write `<@U024BE7LH>`"),
        ("@U024BE7LH", "write `<@U024BE7LH>`"),
        ("S0ONCALL", "write `<!subteam^S0ONCALL>`"),
        ("!subteam^S0ONCALL", "write `<!subteam^S0ONCALL>`"),
        ("<!here> sre-leads", "<!subteam^S…>"),
        ("<#C024BE7LR>", "<!subteam^S…>"),
    ],
)
def test_slack_mentions_that_notify_nobody_say_the_fix(mention: str, fix: str) -> None:
    problem = rules.mention_problem(mention)
    assert problem is not None and fix in problem[1]


def test_missing_catalog_path(tmp_path: Path) -> None:
    diagnostics = parse_catalog(tmp_path / "nowhere").diagnostics
    assert [d.code for d in diagnostics] == ["RB009"]


# --- destructive commands: the heuristic on its own ---------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "rm -rf /var/cache/app",
        "rm -fr /tmp/x",
        "rm -r -f /tmp/x",
        "/bin/rm --recursive --force /tmp/x",
        "sudo rm -Rf /tmp/x",
        ["rm", "-rf", "/tmp/x"],
        "redis-cli FLUSHALL",
        "redis-cli -n 2 flushdb",
        ["psql", "-c", "drop database orders"],
        "mysql -e 'DROP SCHEMA app'",
        "psql -c 'TRUNCATE TABLE sessions'",
        "psql -c 'DELETE FROM sessions'",
        "kubectl -n web delete deployment api",
        "kubectl drain node-1 --ignore-daemonsets",
        "terraform destroy -auto-approve",
        "terraform apply -destroy",
        "helm uninstall api",
        "helm delete api",
        "mkfs.ext4 /dev/sdb1",
        "dd if=/dev/zero of=/dev/sda bs=1M",
        "shutdown -h now",
        "systemctl reboot",
        "halt",
        "bash -c 'cd / && rm -rf tmp/x'",
        "sh -ec 'echo start; rm -rf /tmp/x'",
        "echo a && reboot",
    ],
)
def test_destructive_commands_are_recognised(command: str | list[str]) -> None:
    assert rules.destructive_operation(command)


@pytest.mark.parametrize(
    "command",
    [
        "rm /tmp/lockfile",
        "rm -f /tmp/lockfile",
        "docker run --rm alpine true",
        "kubectl get pods",
        "kubectl rollout restart deployment/api",
        "helm list",
        "terraform plan",
        "psql -c 'DELETE FROM sessions WHERE expires < now()'",
        "redis-cli INFO memory",
        "df -h /",
        "dd if=/dev/sda of=/backup/disk.img",
        "iptables -A INPUT -s 10.0.0.1 -j DROP",
        ["journalctl", "--vacuum-size=500M"],
    ],
)
def test_harmless_commands_are_not_flagged(command: str | list[str]) -> None:
    assert rules.destructive_operation(command) is None


# --- params a step sets ----------------------------------------------------------------

ERROR_RATE = (
    "id: check-error-rate\n"
    "command: \"promtool query instant http://prometheus:9090 'up[{{ params.window }}]'\"\n"
    "params: {window: 5m}\n"
    "expect: [{pattern: '=>'}]\n"
)


def runbook_with_step(step: str) -> str:
    return f"kind: runbook\nid: api\nmatch: {{services: [api]}}\nsteps:\n  - {step}\n"


def test_a_misspelt_param_is_an_error_with_the_right_name_suggested() -> None:
    typo = lint_texts(
        {
            "actions/check-error-rate.yaml": ERROR_RATE,
            "runbooks/api.yaml": runbook_with_step(
                "{action: check-error-rate, params: {windw: 1m}}"
            ),
        }
    )
    assert [(d.code, d.severity, d.path) for d in typo] == [
        ("RB035", "error", "$.steps[0].params.windw")
    ]
    assert "'windw'" in typo[0].message
    assert typo[0].fix.startswith("did you mean 'window'?")
    fixed = lint_texts(
        {
            "actions/check-error-rate.yaml": ERROR_RATE,
            "runbooks/api.yaml": runbook_with_step(
                "{action: check-error-rate, params: {window: 1m}}"
            ),
        }
    )
    assert fixed == []


# --- template-like text the executor would not substitute ------------------------------


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("--title={{ incident.title|upper }}", "incident.title"),
        ("{{incident.title }}}", "incident.title"),
        ("{{{ incident.title }}}", "incident.title"),
        ("{{ params.x.y(z) }}", "params.x"),
        ("{{ incident. title }}", "incident.title"),
        ("kubectl -n {{ incident.details.namespace } get pods", "incident.details.namespace"),
        ("{{ incident.details['namespace'] }}", "incident.details.namespace"),
        ("{{ upper incident.title }}", "incident.title"),
    ],
)
def test_malformed_templates_are_recognised(text: str, meant: str) -> None:
    (found,) = rules.malformed_templates(text)
    assert found[2] == meant


@pytest.mark.parametrize(
    "text",
    [
        "{{ incident.title }} and {{ params.window }}",
        "{{incident.details.some-key}}",
        "{{ params }}",
        '{"window": {{ params.window }}}',  # the last brace closes the JSON object
        "docker inspect --format '{{.State.Status}}'",
        "{{ .Values.image.tag }}",
        "kubectl get pods -o go-template='{{range .items}}{{.metadata.name}}{{end}}'",
        '{{ if eq .reason "incident" }}yes{{ end }}',
        "{{ $params.x }}",
        "plain text, no braces",
    ],
)
def test_other_braces_are_not_flagged(text: str) -> None:
    assert rules.malformed_templates(text) == []


# --- placeholders that a program parses as shell code ----------------------------------


@pytest.mark.parametrize(
    ("command", "shell", "program"),
    [
        ('sh -c "grep -F {{ incident.title }} app.log"', False, "sh -c"),
        (["bash", "-ec", "grep {{ incident.title }} app.log"], False, "bash -c"),
        (["/bin/dash", "-e", "-c", "echo {{ params.x }}"], False, "dash -c"),
        ("zsh -o pipefail -c 'echo {{ params.x }}'", False, "zsh -c"),
        ("ssh web1 journalctl -u {{ incident.details.unit }}", False, "ssh"),
        (
            ["ssh", "-p", "2222", "web1", "--", "systemctl", "restart", "{{ params.unit }}"],
            False,
            "ssh",
        ),
        ("kubectl exec -n ns pod -- sh -c 'kill {{ params.pid }}'", False, "sh -c"),
        ("docker exec -it web bash -lc 'tail {{ params.file }}'", False, "bash -c"),
        ("sudo -u postgres ksh -c 'psql -c {{ params.q }}'", False, "ksh -c"),
        ("/usr/bin/env FOO=1 sh -c 'echo {{ incident.title }}'", False, "sh -c"),
        ("xargs -I{} sh -c 'echo {} {{ params.x }}'", False, "sh -c"),
        ("su -c 'systemctl restart {{ params.unit }}' root", False, "su -c"),
        ("runuser -u app -- sh -c 'echo {{ params.x }}'", False, "sh -c"),
        ("watch -n 5 'ls {{ params.dir }}'", False, "watch"),
        ("eval {{ params.script }}", True, "eval"),
        ('journalctl -u app | ssh logs "cat >> /srv/{{ incident.id }}.log"', True, "ssh"),
    ],
    ids=repr,
)
def test_placeholders_parsed_again_by_a_shell_are_found(
    command: str | list[str], shell: bool, program: str
) -> None:
    assert [found.program for found in rules.reparsed_templates(command, shell=shell)] == [program]


@pytest.mark.parametrize(
    ("command", "shell"),
    [
        (["sh", "-c", 'grep -F -- "$1" app.log', "sh", "{{ incident.title }}"], False),
        ("sh -c 'grep -F -- \"$TITLE\" app.log'", False),
        ("bash deploy.sh {{ params.version }}", False),
        ("ssh -i key.pem -p 22 {{ incident.details.host }} uptime", False),
        ("kubectl exec pod -- ls {{ params.dir }}", False),
        ("kubectl get pods -n {{ incident.details.namespace }}", False),
        ("grep ssh {{ incident.title }}", False),
        ("watch -x ls {{ params.dir }}", False),
        ('journalctl -u "{{ incident.details.unit }}" | grep -c sh', True),
        ("sh -c 'echo unbalanced {{ params.x }}", False),
    ],
    ids=repr,
)
def test_placeholders_that_stay_arguments_are_not_flagged(
    command: str | list[str], shell: bool
) -> None:
    assert rules.reparsed_templates(command, shell=shell) == []


def test_a_reparsed_placeholder_is_an_error_without_approval() -> None:
    action = (
        "id: restart-remote\n"
        "command: [ssh, web1, systemctl, restart, '{{ params.unit }}']\n"
        "params: {unit: app}\n"
        "expect: [{pattern: '^$'}]\n"
    )
    guarded = lint_texts({"actions/restart-remote.yaml": action})
    unattended = lint_texts(
        {"actions/restart-remote.yaml": action + "safety: {requires_approval: false}\n"}
    )
    assert [(d.code, d.severity, d.path) for d in guarded] == [("RB037", "warning", "$.command[4]")]
    assert [(d.code, d.severity) for d in unattended] == [("RB037", "error")]
    assert "parsed by a shell on the other end" in guarded[0].message


# --- the bundled catalog ---------------------------------------------------------------


# The bundled catalog's files; its runbook tests (tests/) are checked by test_runbooktests.py.
BUNDLED_FILES = sorted(
    p for p in BUNDLED.rglob("*.yaml") if p.relative_to(BUNDLED).parts[0] != "tests"
)


def test_bundled_catalog_is_clean() -> None:
    parsed = parse_catalog(BUNDLED)
    assert parsed.diagnostics == []
    assert parsed.files == len(BUNDLED_FILES)


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda p: str(p.relative_to(BUNDLED)))
def test_bundled_file_is_valid_against_the_published_schema(path: Path) -> None:
    """What an editor (yaml-language-server) or check-jsonschema sees: the top-level oneOf."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    data = yaml.safe_load(path.read_text("utf-8"))
    assert list(validator.iter_errors(data)) == []


def test_bundled_catalog_passes_strict_lint() -> None:
    result = CliRunner().invoke(lint, ["--strict", str(BUNDLED)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("0 errors, 0 warnings in 17 files")


# --- the command line ------------------------------------------------------------------


def test_exit_codes() -> None:
    runner = CliRunner()
    assert runner.invoke(lint, [str(BUNDLED)]).exit_code == 0
    assert runner.invoke(lint, [str(CASES / "rb021-unknown-action")]).exit_code == 1
    warnings_only = str(CASES / "rb024-missing-expect")
    assert runner.invoke(lint, [warnings_only]).exit_code == 0
    assert runner.invoke(lint, ["--no-strict", warnings_only]).exit_code == 0
    assert runner.invoke(lint, ["--strict", warnings_only]).exit_code == 1
    assert runner.invoke(lint, [str(CASES / "does-not-exist")]).exit_code == 2
    assert runner.invoke(lint, ["--format", "xml", str(BUNDLED)]).exit_code == 2


def test_default_path_comes_from_runbook_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_CATALOG", str(CASES / "rb021-unknown-action"))
    result = CliRunner().invoke(lint, [])
    assert result.exit_code == 1
    assert "RB021" in result.output


def test_default_path_missing_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RUNBOOK_CATALOG", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(lint, [])
    assert result.exit_code == 2
    assert "does not exist" in result.output


# --- runbook tests beside the catalog ----------------------------------------------------


def test_the_tests_folder_at_the_root_is_not_part_of_the_catalog(tmp_path: Path) -> None:
    write_catalog(
        tmp_path,
        {
            "actions/restart.yaml": RESTART,
            "tests/web.yaml": "kind: test\nname: web down\nsteps: {restart: {exit_code: 0}}\n",
            "tests/broken.yaml": "kind: test\n  steps: [\n",  # runbookctl test reports it
        },
    )
    result = CliRunner().invoke(lint, ["--strict", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.endswith("0 errors, 0 warnings in 2 files\n")


def test_linting_a_runbook_test_file_checks_it_against_the_test_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = "kind: test\nname: ok\nincident: {service: web, title: down}\nexpect: {runbook: null}\n"
    write_catalog(
        tmp_path,
        {
            "actions/restart.yaml": RESTART,
            "tests/good.yaml": good,
            "tests/more/typo.yaml": good.replace("expect:", "expekt:"),
        },
    )
    monkeypatch.chdir(tmp_path)
    clean = CliRunner().invoke(lint, ["tests/good.yaml", "actions/restart.yaml"])
    assert (clean.exit_code, clean.output) == (0, "0 errors, 0 warnings in 2 files\n")
    folder = CliRunner().invoke(lint, ["tests"])
    assert folder.exit_code == 1
    assert folder.output.startswith(
        "tests/more/typo.yaml:1:1: error RT010 [test-schema] the test has no `expect`"
    )
    assert "unknown key `expekt` in the test ($.expekt)" in folder.output
    assert "fix: did you mean `expect`?" in folder.output
    assert folder.output.endswith("2 errors, 0 warnings in 2 files\n")


def test_a_runbook_test_elsewhere_in_the_catalog_is_told_where_it_belongs(
    tmp_path: Path,
) -> None:
    write_catalog(
        tmp_path,
        {
            "actions/restart.yaml": RESTART,
            "runbooks/web-test.yaml": "kind: test\nname: web down\n",
            "actions/tests/check.yaml": "id: check\ncommand: x\nexpect: [{pattern: x}]\n",
        },
    )
    result = CliRunner().invoke(lint, [str(tmp_path)])
    assert result.exit_code == 1
    assert (
        f"{tmp_path}/runbooks/web-test.yaml:1:7: error RB010 [schema] a runbook test "
        "(`kind: test`) is not a catalog document ($.kind)"
    ) in result.output
    assert "fix: move it to the `tests/` folder at the root of the catalog" in result.output
    assert "actions/tests/check.yaml" not in result.output  # an action like any other
    assert "1 error, 0 warnings in 4 files" in result.output


# --- linting files in the context of their catalog -------------------------------------


def write_catalog(root: Path, texts: dict[str, str]) -> Path:
    for name, text in {"catalog.yaml": SETTINGS, **texts}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return root


RESTART = "id: restart\ncommand: systemctl restart app\nexpect: [{pattern: '^$'}]\n"


def test_a_file_is_linted_in_its_catalog_and_only_its_problems_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_catalog(
        tmp_path,
        {
            "actions/restart.yaml": RESTART,
            "actions/broken.yaml": "id: broken\ncommand: x\ntimout: 1s\n",
            "runbooks/web.yaml": runbook_with_step("{action: restart}"),
            "runbooks/typo.yaml": runbook_with_step("{action: restrat}").replace("api", "db"),
        },
    )
    monkeypatch.chdir(tmp_path)
    clean = CliRunner().invoke(lint, ["runbooks/web.yaml"])
    assert (clean.exit_code, clean.output) == (0, "0 errors, 0 warnings in 1 file\n")
    typo = CliRunner().invoke(lint, ["runbooks/web.yaml", "runbooks/typo.yaml"])
    assert typo.exit_code == 1
    assert "runbooks/typo.yaml:5:" in typo.output and "did you mean 'restart'?" in typo.output
    assert "broken.yaml" not in typo.output
    assert typo.output.endswith("1 error, 0 warnings in 2 files\n")
    # from a folder inside the catalog, and with the catalog named
    monkeypatch.chdir(tmp_path / "runbooks")
    assert CliRunner().invoke(lint, ["web.yaml"]).exit_code == 0
    named = CliRunner().invoke(lint, ["--catalog", str(tmp_path), "typo.yaml"])
    assert named.exit_code == 1 and "typo.yaml:5:" in named.output


def test_a_file_outside_any_catalog_is_a_usage_error(tmp_path: Path) -> None:
    lone = tmp_path / "lone.yaml"
    lone.write_text(RESTART, "utf-8")
    result = CliRunner().invoke(lint, [str(lone)])
    assert result.exit_code == 2
    assert "no catalog.yaml in the folders above" in result.output
    assert "--catalog" in result.output


def test_a_file_from_elsewhere_can_be_linted_against_a_named_catalog(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog", {"actions/restart.yaml": RESTART})
    draft = tmp_path / "drafts" / "web.yaml"
    draft.parent.mkdir()
    draft.write_text(runbook_with_step("{action: restart}"), "utf-8")
    result = CliRunner().invoke(lint, ["--catalog", str(catalog), str(draft)])
    assert (result.exit_code, result.output) == (0, "0 errors, 0 warnings in 1 file\n")
    both = CliRunner().invoke(lint, ["--catalog", str(catalog), str(catalog)])
    assert both.exit_code == 2


# --- reading in parallel and from a cache -----------------------------------------------


def test_files_read_by_worker_processes_give_what_one_process_gives(tmp_path: Path) -> None:
    from bot.catalog import reader
    from bot.catalog.loader import _displayer, discover_files

    if not reader._can_fork():
        pytest.skip("worker processes are forked only where fork exists and no thread runs")
    write_catalog(
        tmp_path,
        {
            **{f"actions/a{i}.yaml": RESTART.replace("restart", f"a{i}") for i in range(7)},
            "actions/bad.yaml": "id: Bad\ncommand: [x]\n",
            "actions/syntax.yaml": "id: x\ncommand: echo: hi\n",
            "runbooks/web.yaml": runbook_with_step("{action: a1, when: 'incident.x'}"),
        },
    )
    paths = discover_files(tmp_path)
    display = _displayer(tmp_path)
    alone = [reader.read_file(path, tmp_path, display) for path in paths]

    def seen(results: list[reader.FileResult]) -> list[object]:
        return [
            (r.diagnostics, [(d.file, d.index, d.kind, d.data) for d in r.docs]) for r in results
        ]

    for jobs in (2, 3):
        assert seen(reader._read_in_parallel(paths, tmp_path, display, jobs)) == seen(alone)
    assert CliRunner().invoke(lint, ["--jobs", "2", str(tmp_path)]).output == (
        CliRunner().invoke(lint, ["--jobs", "1", str(tmp_path)]).output
    )


def test_the_cache_remembers_files_by_content(tmp_path: Path) -> None:
    catalog = write_catalog(
        tmp_path / "catalog",
        {
            "actions/restart.yaml": RESTART,
            "runbooks/web.yaml": runbook_with_step("{action: restart}"),
        },
    )
    cache = tmp_path / "cache"
    first = CliRunner().invoke(lint, ["--cache", str(cache), str(catalog)])
    assert first.output == "0 errors, 0 warnings in 3 files\n"
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 3
    again = CliRunner().invoke(lint, ["--cache", str(cache), str(catalog)])
    assert again.output == first.output
    assert sorted(cache.glob("*.json")) == entries  # nothing new: every file was a hit
    # A changed file is a new key, read afresh; the old entry is simply not used.
    (catalog / "actions/restart.yaml").write_text(RESTART + "timout: 1s\n", "utf-8")
    changed = CliRunner().invoke(lint, ["--cache", str(cache), str(catalog)])
    assert changed.exit_code == 1 and "timout" in changed.output
    assert len(list(cache.glob("*.json"))) == 4
    # An entry that cannot be read is a miss, never a crash.
    for entry in cache.glob("*.json"):
        entry.write_text("{not json", "utf-8")
    assert CliRunner().invoke(lint, ["--cache", str(cache), str(catalog)]).output == changed.output


def test_a_cached_entry_is_used_instead_of_reading_the_file(tmp_path: Path) -> None:
    """What proves the cache is read: an entry edited by hand shows in the output."""
    catalog = write_catalog(tmp_path / "catalog", {"actions/restart.yaml": RESTART})
    cache = tmp_path / "cache"
    CliRunner().invoke(lint, ["--cache", str(cache), str(catalog)])
    for entry in cache.glob("*.json"):
        plain = json.loads(entry.read_text("utf-8"))
        for doc in plain[0]:
            if doc[1] == "action":
                doc[2]["command"] = "rm -rf /var/lib/app"
                doc[2]["safety"] = {"requires_approval": False}
        entry.write_text(json.dumps(plain), "utf-8")
    result = CliRunner().invoke(lint, ["--cache", str(cache), str(catalog)])
    assert "RB026" in result.output


def test_text_format() -> None:
    case = CASES / "rb021-unknown-action"
    result = CliRunner().invoke(lint, [str(case)])
    lines = result.output.splitlines()
    assert re.fullmatch(
        r".*runbook\.yaml:6:13: error RB021 \[unknown-action\] unknown action "
        r"'restart-ngnix' \(\$\.steps\[0\]\.action\)",
        lines[0],
    )
    assert lines[1:3] == [
        "     6 |   - action: restart-ngnix  # expect: RB021",
        "       |             ^",
    ]
    assert lines[3].startswith("    fix: ")
    assert lines[-1] == "1 error, 0 warnings in 2 files"


def test_json_format() -> None:
    case = CASES / "rb027-shell"
    result = CliRunner().invoke(lint, ["--format", "json", str(case)])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert (report["errors"], report["warnings"], report["files"]) == (1, 1, 2)
    assert [d["code"] for d in report["diagnostics"]] == ["RB027", "RB027"]
    first = report["diagnostics"][0]
    assert set(first) == {
        "file",
        "line",
        "col",
        "code",
        "rule",
        "severity",
        "message",
        "fix",
        "path",
    }
    assert (first["line"], first["severity"], first["path"]) == (8, "warning", "$.steps[0].shell")


def test_github_format() -> None:
    case = CASES / "rb027-shell"
    result = CliRunner().invoke(lint, ["--format", "github", str(case)])
    lines = result.output.splitlines()
    pattern = r"::(error|warning) file=[^,]+,line=(\d+),col=(\d+),title=(RB\d{3}) ([a-z-]+)::.+"
    annotations = [re.fullmatch(pattern, line) for line in lines[:-1]]
    assert all(annotations), lines
    assert [(m.group(1), m.group(2), m.group(4)) for m in annotations if m] == [
        ("warning", "8", "RB027"),
        ("error", "12", "RB027"),
    ]
    assert ". Fix: " in lines[0]


def test_github_format_escapes_workflow_command_syntax() -> None:
    diagnostic = Diagnostic(
        code="RB023",
        rule="invalid-regex",
        severity="error",
        message="100% wrong:\nsecond line\r",
        fix="a, b: c",
        file="odd,name:x.yaml",
        line=3,
        col=4,
        path="$.expect[0]",
    )
    (line,) = format_github([diagnostic])
    assert line == (
        "::error file=odd%2Cname%3Ax.yaml,line=3,col=4,title=RB023 invalid-regex::"
        "100%25 wrong:%0Asecond line%0D ($.expect[0]). Fix: a, b: c"
    )


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_CATALOG"}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_entry_points_in_real_subprocesses() -> None:
    module = _run(sys.executable, "-m", "runbookctl", "lint", "--strict", "runbooks")
    assert module.returncode == 0, module.stdout + module.stderr
    assert module.stdout.strip() == "0 errors, 0 warnings in 17 files"
    broken = _run(sys.executable, "-m", "runbookctl", "lint", str(CASES / "rb029-invalid-when"))
    assert broken.returncode == 1
    assert broken.stdout.count("error RB029") == 4
    usage = _run(sys.executable, "-m", "runbookctl", "lint", "no/such/dir")
    assert usage.returncode == 2
    script = Path(sys.executable).with_name("runbookctl")
    if script.exists():  # the console script, when the package is installed
        assert _run(str(script), "lint", "runbooks").returncode == 0


FORBIDDEN = ("slack_bolt", "slack_sdk", "pagerduty", "prometheus_client", "httpx")


@pytest.mark.slow
@pytest.mark.parametrize(
    "target", ["runbooks", "runbooks/tests/payments-elevated-5xx.yaml"], ids=["catalog", "test"]
)
def test_lint_does_not_import_chat_pagerduty_http_or_metrics_code(target: str) -> None:
    probe = (
        "import json, sys\n"
        "from runbookctl.cli import cli\n"
        "try:\n"
        f"    cli.main(args=['lint', {target!r}], prog_name='runbookctl')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = _run(sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    assert "bot.catalog.yamlsource" in modules
    assert [m for m in modules if m.split(".")[0] in FORBIDDEN] == []
    assert "bot.engine" not in modules


# --- the linter never crashes ----------------------------------------------------------

SETTINGS = (
    "kind: catalog\nenvironments: [{name: dev}, {name: staging}, {name: prod, production: true}]\n"
)


def lint_texts(texts: dict[str, str]) -> list[Diagnostic]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "catalog.yaml").write_text(SETTINGS, "utf-8")
        for name, text in texts.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, "utf-8")
        diagnostics = parse_catalog(root).diagnostics
    for d in diagnostics:
        assert re.fullmatch(r"RB\d{3}", d.code)
        assert d.line >= 1 and d.col >= 1
        assert d.severity in ("error", "warning")
    return diagnostics


YAML_BITS = st.sampled_from(
    [
        *"abc:-[]{}&*!|>'\"#,?%@`\\ \t\n0123456789",
        "kind: ",
        "id: ",
        "command: ",
        "steps:\n  - ",
        "action: ",
        "expect:\n  - pattern: ",
        "match:\n  services: [",
        "&x ",
        "*x",
        "<<: ",
        "!!python/name:os.system",
        "!!binary",
        "---\n",
        "{{ incident.title }}",
        "\n  ",
    ]
)
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(st.lists(YAML_BITS | st.text(max_size=5), max_size=60).map("".join))
def test_random_yamlish_text_never_crashes(text: str) -> None:
    lint_texts({"actions/random.yaml": text, "random.yml": text})


@SLOW
@given(st.lists(YAML_BITS | st.text(max_size=5), max_size=60).map("".join))
def test_the_plain_reading_gives_what_the_careful_one_gives(text: str) -> None:
    """Files without anchors skip the careful conversion; both must make the same data."""
    from bot.catalog import yamlsource

    try:
        nodes = list(yamlsource._compose_all(text))
    except (yaml.YAMLError, RecursionError):
        return
    for index, node in enumerate(nodes):
        if node is None or "&" in text:
            continue
        careful = yamlsource._Converter(yamlsource.SourceDoc("x.yaml", index, None))
        try:
            expected = careful.convert(node, (), frozenset())
        except yamlsource._Unsafe:
            expected = "refused"
        try:
            plain = yamlsource._plain(node)
        except yamlsource._NeedsCare:
            continue  # the careful path reads it
        assert not careful.errors
        assert repr(plain) == repr(expected)  # repr: a .nan equals itself


SCALAR_TEXTS = st.sampled_from(
    [
        *("yes", "No", "on", "~", "null", "1_000", "0x1F", "0o17", "1:30", ".inf", ".nan"),
        *("2026-10-02", "2026-10-02T09:14:00+00:00", "5m", "1e3", "+1", "-0", "010", "="),
    ]
) | st.text(alphabet="0123456789.:-+_eExXoObBtTrRuUfFaAlLsSnN~ ", max_size=8)


@SLOW
@given(st.lists(SCALAR_TEXTS, min_size=1, max_size=8))
def test_remembered_scalar_types_are_the_ones_pyyaml_gives(texts: list[str]) -> None:
    """The loader remembers which type a plain scalar's text is; PyYAML must agree."""
    from bot.catalog import yamlsource

    text = "".join(f"k{i}: {t}\n" for i, t in enumerate(texts))
    text += "---\n" + "".join(f"- {t}\n" for t in texts)
    for _ in range(2):  # the second time from what was remembered
        try:
            ours = list(yamlsource._compose_all(text))
            theirs = list(yaml.compose_all(text, Loader=yaml.CSafeLoader))
        except yaml.YAMLError:
            return
        assert [_tags(n) for n in ours] == [_tags(n) for n in theirs]


def _tags(node: object) -> object:
    if isinstance(node, yaml.MappingNode):
        return [(_tags(k), _tags(v)) for k, v in node.value]
    if isinstance(node, yaml.SequenceNode):
        return [_tags(v) for v in node.value]
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else None


KEYS = st.sampled_from(
    [
        "kind",
        "id",
        "command",
        "steps",
        "action",
        "expect",
        "pattern",
        "safety",
        "scopes",
        "match",
        "services",
        "symptoms",
        "when",
        "params",
        "env",
        "shell",
        "on_failure",
        "environments",
        "name",
        "promotions",
        "requires_approval",
        "priority",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["action", "runbook", "catalog", "prod", "dev", "x", "*"])
)
NESTED = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=25,
)


@SLOW
@given(NESTED)
def test_random_nested_data_never_crashes(data: object) -> None:
    lint_texts({"runbooks/random.yaml": yaml.safe_dump(data, allow_unicode=True)})


# Documents that pass the schema, with random text where rules look: commands,
# templates, patterns, conditions, scopes. This is where the semantic rules run.
IDS = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
PIECES = [
    *"abc ()[]{}|*+?.\\'\"-=;&$`#_",
    *("{{ ", " }}", "incident.", "params.", "steps['", "rm -rf ", "DROP TABLE "),
]
TEXT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=20).map("".join)
COMMAND = TEXT | st.lists(TEXT, min_size=1, max_size=4)
ACTION = st.fixed_dictionaries(
    {"id": IDS, "command": COMMAND},
    optional={
        "shell": st.booleans(),
        "expect": st.lists(st.fixed_dictionaries({"pattern": TEXT}), max_size=2),
        "params": st.dictionaries(
            st.sampled_from(["a", "b", "window"]), st.none() | TEXT, max_size=2
        ),
        "env": st.dictionaries(st.sampled_from(["A", "B"]), TEXT, max_size=2),
        "safety": st.fixed_dictionaries(
            {},
            optional={
                "requires_approval": st.booleans(),
                "scopes": st.lists(st.sampled_from(["dev", "staging", "prod", "qa"]), unique=True),
            },
        ),
    },
)
STEP = st.fixed_dictionaries(
    {"action": IDS},
    optional={
        "id": IDS,
        "when": TEXT,
        "params": st.dictionaries(st.sampled_from(["a", "b"]), TEXT, max_size=2),
        "on_failure": st.sampled_from(["stop", "continue"])
        | st.fixed_dictionaries({"rollback": IDS}),
    },
) | ACTION.map(lambda a: {k: v for k, v in a.items() if k != "params"})
RUNBOOK = st.fixed_dictionaries(
    {
        "kind": st.just("runbook"),
        "id": IDS,
        "match": st.fixed_dictionaries(
            {
                "services": st.lists(
                    st.sampled_from(["web", "Web", "*", "db"]), min_size=1, max_size=2
                )
            },
            optional={"symptoms": st.lists(TEXT, max_size=2), "priority": st.integers(-2, 2)},
        ),
        "steps": st.lists(STEP, min_size=1, max_size=4),
    },
    optional={"on_resolve": st.lists(STEP, max_size=2)},
)


@SLOW
@given(st.lists(ACTION, max_size=3), st.lists(RUNBOOK, min_size=1, max_size=3))
def test_schema_shaped_documents_never_crash(actions: list[object], runbooks: list[object]) -> None:
    texts = {f"actions/a{i}.yaml": yaml.safe_dump(a) for i, a in enumerate(actions)}
    texts["runbooks/all.yaml"] = yaml.safe_dump_all(runbooks)
    lint_texts(texts)


# --- pre-commit and CI examples --------------------------------------------------------


def test_pre_commit_hook_definitions() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text("utf-8"))
    assert [h["id"] for h in hooks] == ["runbookctl-lint", "runbookctl-test"]
    assert [h["entry"] for h in hooks] == ["runbookctl lint", "runbookctl test"]
    for hook in hooks:
        assert hook["language"] == "python"
        assert hook["pass_filenames"] is False
        assert all(re.search(hook["files"], name) for name in ("a.yaml", "runbooks/b.yml"))
        assert not re.search(hook["files"], "README.md")


def test_github_actions_example_lints_and_tests_with_annotations() -> None:
    from runbookctl.cli import cli

    workflow = yaml.safe_load((ROOT / "deploy/ci/github-actions-catalog.yml").read_text("utf-8"))
    steps = workflow["jobs"]["lint"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout@") for u in uses)
    setup = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"
    runs = [s["run"] for s in steps if "run" in s]
    assert any("pip install" in r for r in runs)
    assert runs[-2:] == [
        "runbookctl lint --format github runbooks",
        "runbookctl test --format github runbooks",
    ]
    # the commands the example runs work on this repository's own catalog
    for command in runs[-2:]:
        args = [*command.split()[1:-1], str(BUNDLED)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output


def test_ci_runs_the_bundled_runbook_tests_after_lint() -> None:
    ci = (ROOT / ".ci" / "run").read_text("utf-8").splitlines()
    assert ci.index("runbookctl test runbooks") > ci.index("runbookctl lint --strict runbooks")


# --- the loader's fast schema check agrees with the full schema ------------------------


def full_is_valid(kind: str, data: object) -> bool:
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": schema()["$defs"]}).is_valid(
        data
    )


def tweak(doc: dict[str, object], key: str, value: object, where: int) -> dict[str, object]:
    """`doc` with one key set, at the top or in one of its steps."""
    steps = doc.get("steps")
    if isinstance(steps, list) and steps and where:
        steps = [dict(s) for s in steps]
        steps[where % len(steps)][key] = value
        return {**doc, "steps": steps}
    return {**doc, key: value}


@SLOW
@given(
    st.sampled_from(["action", "runbook"]),
    ACTION | RUNBOOK,
    KEYS | st.sampled_from(["name", "timeout", "secrets", "description", "bogus"]),
    NESTED,
    st.integers(0, 4),
    st.booleans(),
)
def test_fast_schema_check_agrees_with_the_full_schema(
    kind: str, doc: dict[str, object], key: str, value: object, where: int, change: bool
) -> None:
    data = tweak(doc, key, value, where) if change else doc
    assert quick_is_valid(kind, data) == full_is_valid(kind, data)


@SLOW
@given(
    st.sampled_from(["action", "runbook"]),
    ACTION | RUNBOOK,
    KEYS | st.sampled_from(["timeout", "secrets", "bogus"]),
    NESTED,
    st.integers(0, 4),
)
def test_what_is_left_of_a_broken_document_passes_the_schema(
    kind: str, doc: dict[str, object], key: str, value: object, where: int
) -> None:
    """The rules run on the valid rest of a document with schema errors: it must be valid."""
    from bot.catalog import schemawords
    from bot.catalog.schemacheck import schema_errors
    from bot.catalog.yamlsource import SourceDoc

    data = tweak(doc, key, value, where)
    source = SourceDoc("x.yaml", 0, data, kind=kind, text=yaml.safe_dump(data))
    errors, usable, dropped = schema_errors(source)
    if not errors:
        assert usable is data and dropped == ()
        return
    assert all(d.message and d.fix for d in errors)
    if usable is not None:
        with_kind = {**usable, "kind": kind} if kind == "runbook" else usable
        assert quick_is_valid(kind, schemawords._stand_ins(with_kind))
        assert dropped


CATALOG_DOC = st.fixed_dictionaries(
    {
        "kind": st.just("catalog"),
        "environments": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["dev", "prod", "a b", ""]) | NESTED},
                optional={"production": st.booleans() | NESTED},
            ),
            max_size=3,
        ),
    },
    optional={
        "approvers": st.fixed_dictionaries(
            {},
            optional={
                "users": st.lists(st.sampled_from(["U1", "W2", "@alice", "U1"]) | NESTED),
                "groups": st.lists(st.sampled_from(["S1", "s1", "S1"])),
            },
        ),
        "defaults": st.fixed_dictionaries(
            {},
            optional={
                "timeout": st.sampled_from([0, -1, 1.5, 30, "10m", "10min", "1.5h", True, None]),
                "approval_timeout": NESTED,
            },
        ),
        "promotion": st.fixed_dictionaries(
            {},
            optional={
                "min_successful_runs": st.sampled_from([0, -1, 2.0, 2.5, True, "3"]),
                "window": st.sampled_from([1, "1h", "h"]),
            },
        ),
        "services": st.dictionaries(st.text(max_size=3), st.sampled_from(["dev", "x y", 1])),
        "escalation": st.fixed_dictionaries({}, optional={"mention": NESTED, "pagerduty": NESTED}),
    },
)


@SLOW
@given(st.sampled_from(["action", "runbook", "catalog"]), CATALOG_DOC | NESTED)
def test_fast_schema_check_agrees_on_settings_and_on_anything(kind: str, data: object) -> None:
    assert quick_is_valid(kind, data) == full_is_valid(kind, data)


def lint_case_documents() -> list[object]:
    return [
        doc
        for path in sorted(CASES.rglob("*.y*ml"))
        for doc in _safe_documents(path.read_text("utf-8"))
        if isinstance(doc, dict)
    ]


def _safe_documents(text: str) -> list[object]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return []


def test_fast_schema_check_agrees_on_every_lint_case_document() -> None:
    documents = lint_case_documents()
    assert len(documents) > 50
    for doc in documents:
        for kind in ("action", "runbook", "catalog"):
            assert quick_is_valid(kind, doc) == full_is_valid(kind, doc), (kind, doc)


def test_the_schema_compiles_without_falling_back_to_jsonschema() -> None:
    from bot.catalog.schemacheck import _fast_validators

    assert _fast_validators() is not None


@pytest.mark.parametrize(
    "subschema",
    [
        {"maxLength": 3},
        {"patternProperties": {"^x": {}}},
        {"enum": [1, True]},
        {"type": "array", "items": {"type": "object"}, "uniqueItems": True},
        {"$ref": "https://example.com/other.json"},
        {"unevaluatedProperties": False, "if": {"required": ["a"]}},
    ],
    ids=repr,
)
def test_the_generator_refuses_what_it_cannot_translate_exactly(subschema: object) -> None:
    from bot.catalog.fastschema import Unsupported, generate

    with pytest.raises(Unsupported):
        generate({"doc": subschema}, ("doc",))


def test_benchmark_catalog_is_valid_and_lint_clean(tmp_path: Path) -> None:
    """bench/bench_lint.py compares like with like only if its catalog passes both."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_catalog", ROOT / "bench/gen_catalog.py")
    assert spec is not None and spec.loader is not None
    gen_catalog = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_catalog)
    files = gen_catalog.generate(tmp_path, runbooks=30, steps=300, actions=12)
    # Steps vary as real ones do: few are identical to another (a cache of seen steps
    # would otherwise flatter the linter).
    assert gen_catalog.duplicate_share(tmp_path) < 0.15
    parsed = parse_catalog(tmp_path)
    assert (parsed.files, parsed.diagnostics) == (files, [])
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    for path in tmp_path.rglob("*.yaml"):
        assert validator.is_valid(yaml.safe_load(path.read_text("utf-8"))), path
    again = tmp_path / "again"
    gen_catalog.generate(again, runbooks=30, steps=300, actions=12)
    first = tmp_path / "runbooks/runbook-00007.yaml"
    assert (again / "runbooks/runbook-00007.yaml").read_text() == first.read_text()
