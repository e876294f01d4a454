"""The Kubernetes Job executor (``bot.kube``) with the official client, against a stand-in.

`FakeKubernetes` (tests/fakes/kube_api.py) answers the API subset the executor uses over
real HTTP and RUNS each Job's container command as a local process; its docstring says
what it models (one pod per Job, never a second; deadlines; TTLs; lost pods) and what it
does not. "The bot restarted" is a new executor on the same state directory, after the
old one stopped watching, or after its process was killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import action, catalog, py, runbook, step
from fakes import FakeKubernetes, FakeSlack
from fakes.kube_api import kubelet_expand
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client as k8s
from runner_harness import marks, write_catalog
from slack_harness import Bot, wait_for
from test_jobs import Ends

from bot import executor
from bot.catalog.model import KubernetesPlacement
from bot.dispatch import Dispatcher
from bot.engine import Incident, Job
from bot.jobs import InlineExecutor, JobEnd, end_item
from bot.kube import (
    LABEL_ATTEMPT,
    LABEL_INCIDENT,
    LABEL_STEP_RUN,
    RUNNER_PREFIX,
    KubernetesExecutor,
    job_name,
    kubelet_literal,
)
from bot.local import LocalRuntime
from bot.states import InboxKind, StepStatus
from bot.store import StepRun, Store

NS = "payments"
TARGET = KubernetesPlacement(
    namespace=NS,
    image="registry.example.com/ops/tools:1.4",
    service_account="payments-fixer",
    resources={"requests": {"cpu": "50m"}, "limits": {"memory": "64Mi", "cpu": "1"}},
    ttl_seconds_after_finished=300,
)
POLL = 0.02
REPO = Path(__file__).resolve().parent.parent


def job(
    command: str | tuple[str, ...],
    *,
    step_run_id: int = 1,
    attempt: int = 1,
    timeout: float = 20.0,
    expect: tuple[executor.Expectation, ...] = (),
    env: dict[str, str] | None = None,
    secret_env: tuple[str, ...] = (),
    shell: bool = False,
    output_cap: int = 10_000,
    title: str = "Payments API elevated 5xx",
) -> Job:
    return Job(
        step_run_id=step_run_id,
        attempt=attempt,
        incident_id="Q1PAYMENTS",
        phase="main",
        action_id="check-error-rate",
        spec=executor.CommandSpec(
            command=command,
            shell=shell,
            timeout=timeout,
            env=env or {},
            secret_env=secret_env,
            expect=expect,
        ),
        context={"incident": {"id": "Q1PAYMENTS", "title": title}},
        output_cap=output_cap,
        secret_patterns=(),
    )


def step_of(runner: str, step_run_id: int = 1, attempt: int = 1) -> StepRun:
    return StepRun(
        id=step_run_id,
        run_id=1,
        incident_id="Q1PAYMENTS",
        step_index=0,
        step_id="check",
        action="check-error-rate",
        attempt=attempt,
        status=StepStatus.RUNNING,
        runner=runner,
    )


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        yield fake
        assert fake.errors == []


def api_client(fake: FakeKubernetes) -> k8s.ApiClient:
    return k8s.ApiClient(k8s.Configuration(host=fake.url))


@pytest.fixture
def make(kube: FakeKubernetes, tmp_path: Path) -> Iterator[Any]:
    made: list[KubernetesExecutor] = []

    def new(sink: Ends, **options: Any) -> KubernetesExecutor:
        options.setdefault("poll_interval", POLL)
        made_one = KubernetesExecutor(
            tmp_path / "state", sink, api_client=api_client(kube), **options
        )
        made.append(made_one)
        return made_one

    yield new
    for one in made:
        one.close(grace=5)


def run_one(make: Any, a_job: Job, target: KubernetesPlacement = TARGET) -> JobEnd:
    ends = Ends()
    kube_executor = make(ends)
    kube_executor.start(kube_executor.reserve(), a_job, target)
    end = ends.wait()[0]
    wait_for(lambda: kube_executor.running() == 0, what="the watcher to finish")
    return end


def gate_command(gate: Path, then: str = "print('done')") -> tuple[str, ...]:
    """A command that waits for `gate` to exist: the test decides when it ends."""
    return py(f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\n{then}")


# --- a step runs as a Job -----------------------------------------------------------------


def test_a_step_runs_as_one_job_and_its_result_reaches_the_sink(
    kube: FakeKubernetes, make: Any
) -> None:
    end = run_one(make, job(py("print('OK: 0.2% errors')"), expect=(executor.Expectation("OK"),)))

    assert end.result is not None
    assert end.result["status"] == "success"
    assert end.result["exit_code"] == 0
    assert end.result["output"] == "OK: 0.2% errors\n"
    assert end.result["matched"] == "OK"
    item = end_item(end)
    assert item["kind"] == InboxKind.FINISHED and item["key"] == "step:1:1:end"
    name = job_name("runbook-bot", job(()))
    assert kube.jobs_created == {name: 1} and kube.pods_created == {name: 1}
    # Its end is stored: the Job is deleted (its pods with it).
    wait_for(lambda: kube.job(NS, name) is None, what="the Job to be deleted")
    assert kube.calls_to("delete jobs")[0].params["propagationPolicy"] == "Background"


def test_the_job_is_what_the_action_and_target_say(
    kube: FakeKubernetes, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-the-bots-own-token")
    a_job = job(
        ("printf", "%s", "{{ incident.title }}"),
        timeout=12.5,
        env={"WINDOW": "5m for {{ incident.id }}"},
    )
    end = run_one(make, a_job)
    assert end.result is not None and end.result["status"] == "success"

    created = kube.calls_to("create jobs")[0].json
    assert created["metadata"]["name"] == "runbook-bot-step-1-1"
    labels = created["metadata"]["labels"]
    assert labels[LABEL_STEP_RUN] == "1" and labels[LABEL_ATTEMPT] == "1"
    assert labels[LABEL_INCIDENT] == "Q1PAYMENTS"
    spec = created["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 13  # the timeout, rounded up
    assert spec["ttlSecondsAfterFinished"] == 300
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "payments-fixer"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/ops/tools:1.4"
    assert container["resources"] == {
        "requests": {"cpu": "50m"},
        "limits": {"memory": "64Mi", "cpu": "1"},
    }
    assert container["command"] == ["printf", "%s", "Payments API elevated 5xx"]
    # The action's env only: the bot's own credentials never go into a Job.
    assert container["env"] == [{"name": "WINDOW", "value": "5m for Q1PAYMENTS"}]


@pytest.mark.parametrize(
    "command",
    [
        ("printf", "<%s>", "{{ incident.title }}"),
        "printf '<%s>' {{ incident.title }}",
    ],
    ids=["list", "string"],
)
def test_templated_values_stay_single_arguments(make: Any, command: Any) -> None:
    title = "a b; rm -rf / && echo `id` $(TOKEN) $$ $(HOME) 'q' \"d\""
    end = run_one(make, job(command, title=title, env={"TOKEN": "kubelet-would-expand-this"}))
    # One argument, byte for byte: no shell split it and the kubelet expanded nothing.
    assert end.result is not None and end.result["output"] == f"<{title}>"
    assert end.result["argv"][-1] == title


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(alphabet=st.sampled_from("$()AB_ x{}\\"), max_size=30) | st.text(max_size=30),
)
def test_the_kubelet_passes_every_argument_on_unchanged(value: str) -> None:
    env = {"A": "expanded-a", "B": "", "A_B": "expanded-a-b"}
    assert kubelet_expand(kubelet_literal(value), env) == value


def test_a_shell_action_runs_under_sh_with_its_values_quoted(make: Any) -> None:
    end = run_one(
        make,
        job("echo {{ incident.title }} | tr a-z A-Z", shell=True, title="x; echo injected"),
    )
    assert end.result is not None and end.result["output"] == "X; ECHO INJECTED\n"


def test_exit_code_expect_masking_and_cap_as_for_a_local_run(make: Any) -> None:
    code = (
        "import os, sys\n"
        "print('x' * 5000)\n"
        "print('password=hunter2hunter2')\n"
        "print('db:', os.environ['DB_PASS'])\n"
        "sys.exit(3)"
    )
    a_job = job(
        py(code),
        env={"DB_PASS": "s3cr3t-value"},
        secret_env=("DB_PASS",),
        output_cap=200,
        expect=(executor.Expectation("db:", allow_failure=True),),
    )
    end = run_one(make, a_job)
    assert end.result is not None
    result = end.result
    assert result["exit_code"] == 3
    assert result["status"] == "allowed_failure"
    assert result["detail"].startswith("non-zero exit code 3")
    assert "s3cr3t-value" not in result["output"] and "hunter2" not in result["output"]
    assert "db: ********" in result["output"] and "password=********" in result["output"]
    assert (
        result["output"].startswith("[... ")
        and "bytes of earlier output dropped" in result["output"]
    )
    # The same judgement as a local run of the same command gives.
    local = executor.run(a_job.spec, a_job.context, output_cap=200)
    assert (local.status, local.exit_code, local.output) == (
        result["status"],
        result["exit_code"],
        result["output"],
    )


def test_an_unrenderable_job_is_an_error_and_no_job_is_made(
    kube: FakeKubernetes, make: Any
) -> None:
    end = run_one(make, job(("echo", "{{ incident.missing }}")))
    assert end.result is not None and end.result["status"] == "error"
    assert "unknown template variable" in end.result["detail"]
    assert kube.calls_to("create jobs") == []


def test_a_job_the_api_refuses_is_an_error(kube: FakeKubernetes, make: Any, tmp_path: Path) -> None:
    kube.fail("create jobs", status=403)
    end = run_one(make, job(py("print(1)")))
    assert end.result is not None and end.result["status"] == "error"
    assert "refused its Job (403" in end.result["detail"]
    assert kube.jobs == {} and list((tmp_path / "state").glob("k8s-*")) == []


def test_through_the_engine_each_step_is_a_job_and_its_end_is_applied(
    kube: FakeKubernetes, make: Any, tmp_path: Path
) -> None:
    on_cluster = {"executor": TARGET}
    check = dataclasses.replace(
        action("check-error-rate", py("print('rate => 0.5')"), expect=[("=> [0-9.]+", False)]),
        **on_cluster,
    )
    verify = dataclasses.replace(action("verify", py("print('ok')")), **on_cluster)
    store = Store(tmp_path / "state.db")
    try:
        cat = catalog(runbook("payments-5xx", (step(check), step(verify)), symptoms=("5xx",)))
        runtime = LocalRuntime(cat, store, default_env="staging")
        ends = Ends()
        # The bot's own dispatch: the action's placement says Kubernetes.
        runtime.engine.executor = Dispatcher(InlineExecutor(ends), ends, kubernetes=make(ends))
        runtime.open(Incident(id="P1", title="Payments API elevated 5xx", service="payments"))
        for count in (1, 2):  # the first step's end is applied, then the second is claimed
            runtime.put(**end_item(ends.wait(count)[-1]))
            runtime.settle()

        done = {s.step_id: s for s in store.step_runs_of("P1")}
        assert {k: str(s.status) for k, s in done.items()} == {
            "check-error-rate": "success",
            "verify": "success",
        }
        assert all(s.runner.startswith(RUNNER_PREFIX) for s in done.values())
        run = store.run("P1", "main")
        assert run is not None and str(run.status) == "completed"
        names = {job_name("runbook-bot", job((), step_run_id=s.id)) for s in done.values()}
        assert kube.jobs_created == dict.fromkeys(names, 1)
        assert kube.pods_created == dict.fromkeys(names, 1)
    finally:
        store.close()


# --- timeouts and lost pods -----------------------------------------------------------------


def test_the_deadline_kills_the_command_and_ends_in_timeout(
    kube: FakeKubernetes, make: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    # sh, not Python: it starts in milliseconds even on a busy machine, well before the
    # deadline (which counts from the Job's creation).
    script = (
        f"echo $$ > {pid_file}; echo 'checking 3 replicas, password=hunter2hunter2'; exec sleep 60"
    )
    end = run_one(make, job(("sh", "-c", script), timeout=2))

    assert end.result is not None and end.result["status"] == "timeout"
    assert end.result["detail"].startswith("killed after 2s timeout")
    # Kubernetes deleted the pod and its log: the output is what was followed, masked.
    assert end.result["output"] == "checking 3 replicas, password=********\n"
    pid = int(pid_file.read_text())
    wait_for(lambda: not _alive(pid), what="the command to be killed")
    assert kube.pods_created == {"runbook-bot-step-1-1": 1}


def test_a_job_whose_pod_never_runs_times_out_and_says_where_to_look(tmp_path: Path) -> None:
    # The Job's service account does not exist: the Job controller cannot make its pod,
    # and the Job stays active until its deadline.
    with FakeKubernetes(service_accounts={(NS, "someone-else")}) as kube:
        ends = Ends()
        kube_executor = KubernetesExecutor(
            tmp_path / "state", ends, api_client=api_client(kube), poll_interval=POLL
        )
        kube_executor.start(kube_executor.reserve(), job(py("print('OK')"), timeout=1), TARGET)
        (end,) = ends.wait()
        kube_executor.close(grace=5)
        assert kube.errors == []
    assert end.result is not None and end.result["status"] == "timeout"
    assert end.result["output"] == "" and end.result["exit_code"] is None
    assert (
        "no pod of its Job was seen running; "
        "kubectl -n payments describe job runbook-bot-step-1-1 says why"
    ) in end.result["detail"]
    assert kube.pods_created == {}


def test_a_lost_pod_is_interrupted_and_never_replaced(
    kube: FakeKubernetes, make: Any, tmp_path: Path
) -> None:
    ends = Ends()
    kube_executor = make(ends)
    kube_executor.start(kube_executor.reserve(), job(gate_command(tmp_path / "gate")), TARGET)
    name = "runbook-bot-step-1-1"
    kube.wait_until(lambda: kube.running_pids())

    kube.lose_pod(NS, name)

    (end,) = ends.wait()
    assert end.result is None
    assert "its pod was lost" in end.detail
    item = end_item(end)
    assert item["kind"] == InboxKind.INTERRUPTED and "not re-run" in item["payload"]["detail"]
    assert kube.pods_created == {name: 1} and kube.jobs_created == {name: 1}
    assert len(kube.calls_to("create jobs")) == 1


def test_an_api_outage_while_watching_delays_the_result_and_loses_nothing(
    kube: FakeKubernetes, make: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    ends = Ends()
    kube_executor = make(ends)
    kube_executor.start(kube_executor.reserve(), job(gate_command(gate, "print('OK')")), TARGET)
    kube.wait_until(lambda: kube.running_pids())
    kube.down(503)
    gate.touch()
    kube.wait_until(lambda: [c for c in kube.calls if c.status == 503])
    kube.up()

    (end,) = ends.wait()
    assert end.result is not None and end.result["output"] == "OK\n"
    assert kube.pods_created == {"runbook-bot-step-1-1": 1}


# --- once per step and attempt -----------------------------------------------------------


def test_two_starts_of_one_attempt_make_one_job(kube: FakeKubernetes, make: Any) -> None:
    # Both look before either creates: one create wins, the other is answered
    # 409 Conflict and watches the winner's Job.
    kube.gather("list jobs", 2)
    ends = Ends()
    kube_executor = make(ends)
    a_job = job(py("print('OK')"))
    kube_executor.start(kube_executor.reserve(), a_job, TARGET)
    kube_executor.start(kube_executor.reserve(), a_job, TARGET)
    first = ends.wait()[0]
    wait_for(lambda: kube_executor.running() == 0)

    assert first.result is not None and first.result["status"] == "success"
    assert sorted(c.status for c in kube.calls_to("create jobs")) == [201, 409]
    assert kube.jobs_created == {"runbook-bot-step-1-1": 1}
    assert kube.pods_created == {"runbook-bot-step-1-1": 1}
    # Both ends, if two came, are the same inbox item: the first stored wins.
    assert {end_item(e)["key"] for e in ends.ends} == {"step:1:1:end"}


def test_a_lost_create_answer_watches_the_job_it_made(kube: FakeKubernetes, make: Any) -> None:
    kube.lose_answer("create jobs")  # created, but the client never hears it
    end = run_one(make, job(py("print('OK')")), TARGET)
    assert end.result is not None and end.result["status"] == "success"
    assert kube.jobs_created == {"runbook-bot-step-1-1": 1}


def test_a_new_attempt_is_a_new_job(kube: FakeKubernetes, make: Any) -> None:
    run_one(make, job(py("print(1)"), attempt=1))
    run_one(make, job(py("print(2)"), attempt=2))
    assert kube.jobs_created == {"runbook-bot-step-1-1": 1, "runbook-bot-step-1-2": 1}


# --- after a restart --------------------------------------------------------------------


def test_restart_reattaches_to_a_running_and_to_a_finished_job(
    kube: FakeKubernetes, make: Any, tmp_path: Path
) -> None:
    running_gate, finished_gate = tmp_path / "gate-running", tmp_path / "gate-finished"
    jobs = {
        1: job(gate_command(running_gate, "print('OK late')"), step_run_id=1),
        2: job(gate_command(finished_gate, "print('OK early')"), step_run_id=2),
    }
    before = make(Ends(), poll_interval=3600)  # looks once, then waits to be closed
    runners = {sid: before.reserve() for sid in jobs}
    for sid, a_job in jobs.items():
        before.start(runners[sid], a_job, TARGET)
    kube.wait_until(lambda: len(kube.running_pids()) == 2)
    assert before.close() is False  # it stops watching; the Jobs go on
    wait_for(lambda: before.running() == 0)
    finished_gate.touch()
    kube.wait_until(lambda: kube.job(NS, "runbook-bot-step-2-1")["status"].get("succeeded"))

    ends = Ends()
    after = make(ends)
    found = after.recover([step_of(runners[sid], sid) for sid in jobs], lambda step: jobs[step.id])

    assert [r.attached for r in found] == [True, True]
    (end,) = ends.wait()
    assert end.step_run_id == 2 and end.result is not None
    assert end.result["output"] == "OK early\n"
    running_gate.touch()
    late = ends.wait(2)[1]
    assert late.step_run_id == 1 and late.result is not None
    assert late.result["output"] == "OK late\n"
    assert set(kube.pods_created.values()) == {1}
    assert len(kube.calls_to("create jobs")) == 2


def test_restart_without_a_marker_says_never_started(make: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "k8s-garbled.json").write_text("{not json")
    (state / "k8s-settled.json").write_text("{}")  # its step's end is stored
    steps = [
        # The bot died between the claim and asking for the Job: nothing was asked for.
        step_of(RUNNER_PREFIX + "abc", 1),
        # A marker that cannot be read: a Job may exist somewhere.
        step_of(RUNNER_PREFIX + "garbled", 2),
        # Not a Kubernetes runner at all.
        step_of("local:xyz", 3),
    ]
    found = make(Ends()).recover(steps, lambda step: job((), step_run_id=step.id))
    assert [(r.not_started, r.interrupted) for r in found] == [
        (True, False),
        (False, True),
        (False, True),
    ]
    assert sorted(p.name for p in state.iterdir()) == ["k8s-garbled.json"]


def test_restart_finds_a_job_removed_by_its_ttl_interrupted_never_again(
    kube: FakeKubernetes, make: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    a_job = job(gate_command(gate))
    short = KubernetesPlacement(
        **{
            "namespace": NS,
            "image": "tools",
            "service_account": "fixer",
            "ttl_seconds_after_finished": 0,
        }
    )
    before = make(Ends(), poll_interval=3600)
    runner = before.reserve()
    before.start(runner, a_job, short)
    kube.wait_until(lambda: kube.running_pids())
    before.close()
    gate.touch()
    kube.wait_until(lambda: kube.jobs_created and not kube.jobs)  # finished, then its TTL

    ends = Ends()
    found = make(ends).recover([step_of(runner)], lambda step: a_job)
    assert found[0].attached
    (end,) = ends.wait()
    assert end.result is None
    assert "runbook-bot-step-1-1 is gone: deleted, removed by its TTL" in end.detail
    assert len(kube.calls_to("create jobs")) == 1


@pytest.mark.parametrize("moment", ["step running", "create in flight"])
def test_kill_9_of_the_bot_mid_step_then_recovery_in_a_new_process(
    kube: FakeKubernetes, make: Any, tmp_path: Path, moment: str
) -> None:
    state, gate = tmp_path / "state", tmp_path / "gate"
    a_job = job(gate_command(gate, "print('OK from the pod')"), step_run_id=7)
    if moment == "create in flight":
        # The API server takes its time: the bot dies after sending the create, before
        # the answer; the Job is made all the same.
        kube.set_latency(2.0, "create jobs")
    bot = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BOT_PROCESS,
            str(REPO),
            kube.url,
            str(state),
            json.dumps(a_job.spec.command),
            json.dumps({"namespace": NS, "image": "tools", "service_account": "fixer"}),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert bot.stdout is not None
        runner = bot.stdout.readline().strip()
        assert runner.startswith(RUNNER_PREFIX)
        if moment == "create in flight":
            kube.wait_until(lambda: "create jobs" in kube.arrived, timeout=15)
            assert (state / f"k8s-{runner.removeprefix(RUNNER_PREFIX)}.json").exists()
        else:
            kube.wait_until(lambda: kube.running_pids(), timeout=15)
        os.kill(bot.pid, signal.SIGKILL)
        bot.wait(10)
        if moment == "create in flight":
            assert kube.jobs_created == {}  # killed before the API server made it
            kube.wait_until(lambda: kube.jobs_created, timeout=15)
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()
        assert bot.stdout is not None
        bot.stdout.close()

    ends = Ends()
    found = make(ends).recover([step_of(runner, 7)], lambda step: a_job)
    assert found[0].attached
    gate.touch()
    (end,) = ends.wait()
    assert end.result is not None and end.result["output"] == "OK from the pod\n"
    assert kube.jobs_created == {"runbook-bot-step-7-1": 1}
    assert kube.pods_created == {"runbook-bot-step-7-1": 1}


_BOT_PROCESS = textwrap.dedent(
    """
    import json, sys, threading
    sys.path.insert(0, sys.argv[1])
    from kubernetes import client as k8s
    from bot import executor
    from bot.engine import Job
    from bot.catalog.model import KubernetesPlacement
    from bot.kube import KubernetesExecutor

    url, state, command, target = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    api = k8s.ApiClient(k8s.Configuration(host=url))
    bot = KubernetesExecutor(state, lambda end: None, api_client=api, poll_interval=0.02)
    runner = bot.reserve()
    print(runner, flush=True)
    spec = executor.CommandSpec(command=tuple(command), timeout=20.0)
    job = Job(7, 1, "Q1PAYMENTS", "main", "check-error-rate", spec, {}, 10_000, ())
    bot.start(runner, job, KubernetesPlacement(**json.loads(target)))
    threading.Event().wait()  # until the test kills this process
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone: the stand-in reaps its children in its own time.
    status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return status != "Z"


def use_kubeconfig(kube: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBECONFIG names the stand-in, as an operator's kubeconfig names a cluster."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "stand-in", "cluster": {"server": kube.url}}],
                "users": [{"name": "bot", "user": {"token": "kubeconfig-token"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "stand-in", "user": "bot"}}],
                "current-context": "ctx",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not inside a pod
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))


def test_the_bot_runs_a_kubernetes_action_as_a_job_once_a_cluster_is_configured(
    kube: FakeKubernetes, slack: FakeSlack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole bot (RUNBOOK_KUBERNETES=auto, KUBECONFIG set): the catalog's Kubernetes
    action runs as one Job, its result reaches the thread, nothing runs on the bot's host
    instead."""
    root = tmp_path / "catalog"
    write_catalog(root)
    use_kubeconfig(kube, tmp_path, monkeypatch)
    bot = Bot(root, slack)
    try:
        incident = Incident(id="PK1", title="edge trouble", service="kube", env="staging")
        bot.open_incident(incident, settle=False)

        def status() -> str:
            runs = bot.app.store.step_runs_of("PK1")
            return str(runs[-1].status) if runs else ""

        wait_for(lambda: status() == "success", what="the Job's result applied")
        done = bot.app.store.step_runs_of("PK1")[-1]
        assert done.runner.startswith(RUNNER_PREFIX) and done.output.strip() == "OK"
        assert marks(root / "marks.txt") == {"PK1:in-cluster": 1}
        assert list(kube.jobs_created.values()) == [1] and list(kube.pods_created.values()) == [1]
        run = bot.app.store.run("PK1")
        assert run is not None and str(run.status) == "completed"
    finally:
        bot.stop()


def test_without_a_client_it_finds_the_api_from_the_kubeconfig(
    kube: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_kubeconfig(kube, tmp_path, monkeypatch)
    ends = Ends()
    kube_executor = KubernetesExecutor(tmp_path / "state", ends, poll_interval=POLL)
    kube_executor.start(kube_executor.reserve(), job(py("print('OK')")), TARGET)
    (end,) = ends.wait()
    kube_executor.close(grace=5)
    assert end.result is not None and end.result["output"] == "OK\n"
    assert kube.calls_to("create jobs")[0].headers["authorization"] == "Bearer kubeconfig-token"


def test_without_any_api_configured_a_step_is_an_error_and_nothing_is_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    ends = Ends()
    kube_executor = KubernetesExecutor(tmp_path / "state", ends, poll_interval=POLL)
    kube_executor.start(kube_executor.reserve(), job(py("print('OK')")), TARGET)
    (end,) = ends.wait()
    assert end.result is not None and end.result["status"] == "error"
    assert "no Kubernetes API to run it on" in end.result["detail"]
    assert list(tmp_path.glob("state/k8s-*")) == []


def test_the_stand_in_runs_one_pod_per_job_even_when_asked_twice(kube: FakeKubernetes) -> None:
    batch = k8s.BatchV1Api(api_client(kube))
    body = {
        "metadata": {"name": "twice"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "command": list(py("print(1)"))}],
                }
            }
        },
    }
    headers = {"Content-Type": "application/json"}
    batch.create_namespaced_job(NS, body, _headers=headers)
    with pytest.raises(k8s.ApiException) as conflict:
        batch.create_namespaced_job(NS, body, _headers=headers)
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["reason"] == "AlreadyExists"
    assert kube.pods_created == {"twice": 1}
