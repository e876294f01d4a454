"""The Kubernetes Job executor: a claimed step's command runs as a Job in a cluster.

An action with ``executor: {kubernetes: {namespace, image, service_account, ...}}`` runs
where the systems are: one Job per step attempt, in the target's namespace, as the
target's service account, with the target's image. The bot needs only the right to
create, get, list and delete Jobs and to read Pods and their logs in that namespace (the
Helm chart's ``kubernetes.namespaces``); what the command may do is the service
account's business (``kubernetes.serviceAccounts``).

The Job
=======

- ``restartPolicy: Never`` and ``backoffLimit: 0``: a pod that fails or is lost is never
  replaced, so the command starts at most once (a retry is a new, visible attempt);
- ``activeDeadlineSeconds`` is the action's timeout: it counts from the Job's start, so
  time spent scheduling or pulling the image counts too, and at the deadline Kubernetes
  kills the pod and fails the Job (``DeadlineExceeded``): a ``timeout`` result;
- ``ttlSecondsAfterFinished`` (the target's, default `DEFAULT_TTL_SECONDS`): the bot
  deletes a Job itself once its end is stored; the TTL removes the ones a stopped bot
  left behind. A Job removed by its TTL before a restarted bot read it ends the step
  ``interrupted``: keep it longer than the outages you want results to survive;
- the container's ``command`` is the argv rendered exactly as for a local run
  (`executor.prepare`: no shell unless the action says ``shell: true``, a templated value
  stays one argument). Every ``$`` is written ``$$``, because the kubelet expands
  ``$(NAME)`` in a command from the container's environment: an alert title holding
  ``$(DB_PASSWORD)`` must reach the command as that text;
- its environment is the action's ``env`` only, rendered. The bot's own environment
  (Slack and PagerDuty credentials) never goes into a Job. A ``secrets`` variable set by
  the action's ``env`` is a plain value of the Job, readable by whoever may read Jobs
  in the namespace; give the pod real secrets through its service account or image;
- labels name the bot (``runbook-bot.io/instance``), the step run, the attempt, the
  incident and the action; its name is ``<instance>-step-<step run>-<attempt>``.

Once a step
===========

Before it creates a Job, the executor writes a marker (``k8s-<token>.json`` in its state
directory, synced) naming the namespace and the Job. Creating is idempotent: the Job's
name is fixed by the step run and attempt, a Job already carrying its labels is watched
instead of created again, and ``409 Conflict`` on create means the same. After a
restart, `KubernetesExecutor.recover` reads the markers: no marker proves no Job was ever
asked for (the step never started, the engine may start it); with a marker, the Job is
looked up by its labels and watched; a finished one gives its real result, a missing one
ends the step ``interrupted`` (it may have run), never a second Job.

The outcome
===========

The executor polls the Job (every ``poll_interval`` seconds):

- ``Complete``, or ``Failed`` with its pod's container terminated (a non-zero exit): the
  pod's log is the output, the container's exit code the exit code, and the result is
  judged by `executor.conclude` as a local run is (output capped, secrets masked,
  ``expect``). Exit codes are Kubernetes' own: a command killed by a signal reports
  128 + the signal (137 for SIGKILL), not a negative number;
- ``Failed`` with reason ``DeadlineExceeded``: ``timeout``. Kubernetes deletes the pod at
  the deadline, and its log with it, so the executor follows the log (``follow=true``)
  from the moment it sees the pod: the output is what it read until the pod went. A Job
  whose pod was never seen running (unschedulable, no image, no service account) says
  to ``kubectl describe`` it;
- ``Failed`` with no terminated container (its pod deleted, evicted, lost with its node),
  or the Job gone before its end was read, or a log that cannot be read where ``expect``
  needs it: ``interrupted`` ("its pod was lost"); the command may or may not have had its
  effect, and the bot never starts it again.

Its end goes to the sink (a ``step.finished`` or ``step.interrupted`` inbox item, one per
attempt); only then is the Job deleted (propagation ``Background``) and its marker
removed. A step's duration is the container's, from its start and finish times (whole
seconds, as Kubernetes records them), or as the bot saw it when those say less than a
second (from the watch's start: up to one ``poll_interval`` more than the command took).

Errors
======

The catalog's schema and lint check an action's ``executor: {kubernetes: …}``.
A job that cannot be rendered, no API configured (neither in a pod nor a kubeconfig),
or a Job the API refuses (a 4xx answer other than 408, 409 and 429: it was not created)
ends ``error``. An API that does not answer is asked again for ``api_patience`` seconds;
after that, a Job that may have been created ends ``interrupted``. While a Job is
watched, an API that does not answer is asked again every ``poll_interval``, for as long
as it takes: the Job goes on in the cluster meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from bot import executor
from bot.catalog.model import KubernetesPlacement
from bot.engine import Job
from bot.jobs import JobEnd, Recovery, Sink
from bot.store import StepRun

log = logging.getLogger(__name__)

RUNNER_PREFIX = "k8s:"
CONTAINER = "step"
DEFAULT_TTL_SECONDS = 3600
DEFAULT_INSTANCE = "runbook-bot"
# How long a timed-out step waits for the end of its followed log (the pod is going).
_FOLLOW_DRAIN_SECONDS = 5.0

LABEL_INSTANCE = "runbook-bot.io/instance"
LABEL_STEP_RUN = "runbook-bot.io/step-run"
LABEL_ATTEMPT = "runbook-bot.io/attempt"
LABEL_INCIDENT = "runbook-bot.io/incident"
LABEL_ACTION = "runbook-bot.io/action"
ANNOTATION_INCIDENT = "runbook-bot.io/incident-id"  # the exact id, if the label had to change

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def api_client_from_environment() -> k8s.ApiClient:
    """An API client configured as a pod is (its service account), else from the
    kubeconfig (``KUBECONFIG``, ``~/.kube/config``); the process-wide default is left as
    it is. Raises ``kubernetes.config.ConfigException`` when neither is there."""
    configuration = k8s.Configuration()
    try:
        # The loaders have no type hints (no-untyped-call); they fill `configuration`.
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        # KUBECONFIG read now: the client's own default was read when it was imported.
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG") or None,
            client_configuration=configuration,
        )
    return k8s.ApiClient(configuration)


def kubelet_literal(arg: str) -> str:
    """`arg` as a container command's argument that the kubelet passes on unchanged: it
    expands ``$(NAME)`` from the container's environment and reads ``$$`` as ``$``, so
    every ``$`` is written ``$$``."""
    return arg.replace("$", "$$")


def job_name(instance: str, job: Job) -> str:
    """The Job's name: the same for a step run and attempt, whoever asks and when."""
    return f"{instance}-step-{job.step_run_id}-{job.attempt}"


@dataclass(frozen=True)
class _Marker:
    """Written (and synced) before a Job is asked for: where to look for it later."""

    namespace: str
    name: str
    step_run_id: int
    attempt: int


@dataclass
class _Outcome:
    result: executor.ExecutionResult | None  # None: interrupted
    detail: str = ""


class _Follower:
    """Follows a pod's log while it runs, so a pod deleted at its deadline leaves the
    output it wrote (Kubernetes deletes its log with it)."""

    def __init__(self, tail: executor.OutputTail) -> None:
        self._tail = tail
        self._lock = threading.Lock()
        self.ended = threading.Event()

    def append(self, chunk: bytes) -> None:
        with self._lock:
            self._tail.append(chunk)

    def snapshot(self, output_cap: int, secrets: Iterable[str]) -> executor.OutputTail:
        copy = executor.OutputTail.for_command(output_cap, secrets)
        with self._lock:
            copy.append(self._tail.data())
            copy.total = self._tail.total
        return copy


class _Unreadable(Exception):
    """A marker that cannot be read: a Job may have been asked for, somewhere."""


class _Stopped(Exception):
    """The executor is closing: the watcher leaves the Job to the next start's recover."""


class KubernetesExecutor:
    """Runs each job as a Kubernetes Job; its end comes to `sink` from a watcher thread.

    For the engine's dispatch (which knows each action's target):

    - `reserve` / `release` / `start(runner, job, target)` as the engine's ``Executor``,
      `start` with the action's `KubernetesPlacement` (from the catalog);
    - `recover(steps, job_of)` after a restart, for the steps whose runner starts with
      `RUNNER_PREFIX`: a `bot.jobs.Recovery` each; ``not_started`` ones may be started
      again (a new runner), ``attached`` ones end through the sink (a finished Job's
      result, a running one's when it ends, or an interruption). The markers say where
      each Job is, so no target is needed here;
    - `forget(runner)` once a recovered end is stored; `close(grace)`, `running()`.
    """

    dry_run = False

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        sink: Sink,
        *,
        api_client: k8s.ApiClient | None = None,
        instance: str = DEFAULT_INSTANCE,
        poll_interval: float = 1.0,
        api_patience: float = 60.0,
        request_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(instance) > 40 or not _DNS_LABEL.match(instance):
            raise ValueError(
                f"instance {instance!r} must be lower-case letters, digits and '-', at most 40"
            )
        self.state_dir = Path(state_dir)
        self.sink = sink
        self.instance = instance
        self.poll_interval = poll_interval
        self.api_patience = api_patience
        self.request_timeout = request_timeout
        self.clock = clock
        self._api_client = api_client
        self._lock = threading.Condition()
        self._running: dict[str, threading.Thread] = {}
        self._stop = threading.Event()

    # --- the API ---------------------------------------------------------------------------

    def _apis(self) -> tuple[k8s.BatchV1Api, k8s.CoreV1Api]:
        with self._lock:
            if self._api_client is None:
                self._api_client = api_client_from_environment()
            api_client = self._api_client
        return k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client)

    # --- Executor --------------------------------------------------------------------------

    def reserve(self) -> str:
        return RUNNER_PREFIX + secrets.token_hex(8)

    def release(self, runner: str) -> None:
        """Nothing is held before `start`: there is nothing to give back."""
        return None

    def start(self, runner: str, job: Job, target: KubernetesPlacement) -> None:
        """Create (or find) the step's Job and watch it in a thread; returns at once."""
        token = runner.removeprefix(RUNNER_PREFIX)
        self._watch_in_thread(token, job, lambda: self._create_and_watch(token, job, target))

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def close(self, grace: float = 0.0) -> bool:
        """Wait up to `grace` for watched Jobs to end, then stop watching the others (they
        go on in the cluster; the next start's `recover` finds them). True if none ran."""
        with self._lock:
            idle = self._lock.wait_for(lambda: not self._running, grace)
        self._stop.set()
        return idle

    # --- after a restart -------------------------------------------------------------------

    def recover(
        self, steps: Iterable[StepRun], job_of: Callable[[StepRun], Job | None]
    ) -> list[Recovery]:
        """What became of steps the last run of the bot left on Kubernetes.

        No marker: no Job was ever asked for, so ``not_started`` (the engine starts it
        again, with a new runner). A marker: the Job is found by its labels and watched
        (``attached``): its end, or an interruption if it is gone, comes to the sink.
        Markers no step refers to (their end is stored) are removed, so `steps` must be
        every step left on Kubernetes. Even so a wrongly removed marker cannot make a
        second Job: a restarted step looks for its attempt's Job before creating one.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        found: list[Recovery] = []
        referenced: set[str] = set()
        for step in steps:
            if not step.runner.startswith(RUNNER_PREFIX):
                found.append(Recovery(step, interrupted=True))
                continue
            token = step.runner.removeprefix(RUNNER_PREFIX)
            referenced.add(token)
            try:
                marker = self._read_marker(token)
            except _Unreadable:
                found.append(Recovery(step, interrupted=True))
                continue
            if marker is None:
                found.append(Recovery(step, not_started=True))
                continue
            job = job_of(step)
            if job is None:
                found.append(Recovery(step, interrupted=True))
                continue
            self._watch_in_thread(token, job, functools.partial(self._reattach, job, marker))
            found.append(Recovery(step, attached=True))
        for path in self.state_dir.glob("k8s-*.json"):
            if path.stem.removeprefix("k8s-") not in referenced:
                path.unlink(missing_ok=True)
        return found

    def forget(self, runner: str) -> None:
        """The end of a recovered step is stored: its marker is no longer needed."""
        self._marker_path(runner.removeprefix(RUNNER_PREFIX)).unlink(missing_ok=True)

    # --- a job's life ----------------------------------------------------------------------

    def _watch_in_thread(self, token: str, job: Job, body: Callable[[], _Outcome | None]) -> None:
        def watch() -> None:
            try:
                outcome = body()
                if outcome is not None:
                    self._deliver(token, job, outcome)
            except _Stopped:
                pass
            except Exception:
                # A bug here must not leave the step silently running forever: it is
                # reported as interrupted, and the Job is left for a person to look at.
                log.exception("watching the Kubernetes Job of step %s failed", job.step_run_id)
                self._deliver(
                    token,
                    job,
                    _Outcome(None, "the bot failed while watching its Kubernetes Job"),
                    delete=False,
                )
            finally:
                with self._lock:
                    self._running.pop(token, None)
                    self._lock.notify_all()

        thread = threading.Thread(target=watch, name=f"k8s-step-{job.step_run_id}", daemon=True)
        with self._lock:
            self._running[token] = thread
        thread.start()

    def _create_and_watch(
        self, token: str, job: Job, target: KubernetesPlacement
    ) -> _Outcome | None:
        try:
            ready = executor.prepare(
                job.spec,
                job.context,
                output_cap=job.output_cap,
                secret_patterns=job.secret_patterns,
            )
        except ValueError as exc:  # TemplateError and spec errors speak to people
            return _Outcome(_error(f"could not run: {exc}"))
        try:
            batch, _core = self._apis()
        except (k8s_config.ConfigException, OSError) as exc:
            return _Outcome(_error(f"could not start: no Kubernetes API to run it on ({exc})"))
        marker = _Marker(
            target.namespace, job_name(self.instance, job), job.step_run_id, job.attempt
        )
        self._write_marker(token, marker)
        body = self._job_body(job, target, ready)
        deadline = self.clock() + self.api_patience
        while True:
            try:
                if self._find_job(batch, marker) is None:
                    # Said outright: this client sends no Content-Type for a create.
                    batch.create_namespaced_job(
                        target.namespace,
                        body,
                        _headers={"Content-Type": "application/json"},
                        _request_timeout=self.request_timeout,
                    )
                break
            except ApiException as exc:
                if exc.status == 409:
                    break  # made by an earlier try whose answer was lost: watch that one
                if _refused(exc.status):
                    self._marker_path(token).unlink(missing_ok=True)
                    return _Outcome(_error(_refusal(exc, ready)), "")
                problem = f"{exc.status} {exc.reason}"
            except Exception as exc:  # no answer: the Job may or may not exist
                problem = type(exc).__name__
            if self.clock() >= deadline:
                return _Outcome(
                    None,
                    f"the Kubernetes API did not answer ({problem}); its Job "
                    f"{target.namespace}/{marker.name} may have been created",
                )
            log.warning("creating Job %s: %s; asking again", marker.name, problem)
            self._pause()
        return self._watch(job, marker, ready)

    def _reattach(self, job: Job, marker: _Marker) -> _Outcome | None:
        try:
            ready = executor.prepare(
                job.spec,
                job.context,
                output_cap=job.output_cap,
                secret_patterns=job.secret_patterns,
            )
        except ValueError as exc:
            return _Outcome(None, f"its command cannot be rendered any more ({exc})")
        return self._watch(job, marker, ready)

    def _watch(self, job: Job, marker: _Marker, ready: executor.Prepared) -> _Outcome:
        try:
            batch, core = self._apis()
        except (k8s_config.ConfigException, OSError) as exc:
            return _Outcome(None, f"no Kubernetes API to watch its Job {marker.name} ({exc})")
        started = self.clock()
        follower: _Follower | None = None
        while True:
            try:
                found = self._find_job(batch, marker)
                if found is None:
                    return _Outcome(
                        None,
                        f"its Kubernetes Job {marker.namespace}/{marker.name} is gone: "
                        "deleted, removed by its TTL or never created",
                    )
                if follower is None:
                    follower = self._follow(core, found, job, marker, ready)
                outcome = self._outcome(core, found, job, marker, ready, started, follower)
                if outcome is not None:
                    return outcome
            except ApiException as exc:
                log.warning("watching Job %s: %s %s", marker.name, exc.status, exc.reason)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                # No answer, or a garbled one: the Job goes on; ask again.
                log.warning("watching Job %s: %s", marker.name, type(exc).__name__)
            self._pause()

    def _outcome(
        self,
        core: k8s.CoreV1Api,
        found: k8s.V1Job,
        job: Job,
        marker: _Marker,
        ready: executor.Prepared,
        started: float,
        follower: _Follower | None,
    ) -> _Outcome | None:
        """The step's outcome if its Job has ended, else None."""
        status = found.status or k8s.V1JobStatus()
        conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
        complete, failed = conditions.get("Complete"), conditions.get("Failed")
        if complete is None and failed is None:
            return None
        uid = found.metadata.uid if found.metadata else None
        pods = core.list_namespaced_pod(
            marker.namespace,
            label_selector=f"controller-uid={uid}",
            _request_timeout=self.request_timeout,
        ).items
        pod = pods[0] if len(pods) == 1 else None
        terminated = _terminated(pod)
        timed_out = failed is not None and failed.reason == "DeadlineExceeded"
        if not timed_out and terminated is None:
            why = "its pod was lost" if not pods else "its pod ended without an exit code"
            if len(pods) > 1:
                why = f"its Job ran {len(pods)} pods"
            reason = failed.reason if failed is not None else "Complete"
            return _Outcome(None, f"{why} (Job {marker.namespace}/{marker.name}: {reason})")
        notes: list[str] = []
        tail = executor.OutputTail.for_command(job.output_cap, ready.secrets)
        if pod is not None and self._read_log(core, pod, marker.namespace, tail):
            pass  # the whole log, read again: a followed stream may have been cut short
        elif timed_out and follower is not None:
            follower.ended.wait(_FOLLOW_DRAIN_SECONDS)
            tail = follower.snapshot(job.output_cap, ready.secrets)
            notes.append("output as followed until its pod was deleted")
        elif timed_out:
            # Scheduling, the image pull or a missing service account held it: say where
            # to look, rather than leave a timeout that looks like a slow command.
            notes.append(
                "no pod of its Job was seen running; "
                f"kubectl -n {marker.namespace} describe job {marker.name} says why"
            )
        elif job.spec.expect and not timed_out:
            # The exit code alone cannot tell what `expect` would have said.
            return _Outcome(None, f"its pod's output was lost (Job {marker.name})")
        else:
            notes.append("its pod's output was gone with its pod")
        exit_code = terminated.exit_code if terminated is not None else None
        if terminated is not None and terminated.reason not in (None, "Completed", "Error"):
            notes.append(f"Kubernetes: {terminated.reason}")
        result = executor.conclude(
            job.spec,
            ready,
            exit_code=exit_code,
            output=tail,
            output_cap=job.output_cap,
            duration=_duration(terminated) or self.clock() - started,
            timed_out=timed_out,
            notes=notes,
        )
        return _Outcome(result)

    def _follow(
        self,
        core: k8s.CoreV1Api,
        found: k8s.V1Job,
        job: Job,
        marker: _Marker,
        ready: executor.Prepared,
    ) -> _Follower | None:
        """Start following the log of the Job's pod once it has one (None: not yet)."""
        uid = found.metadata.uid if found.metadata else None
        pods = core.list_namespaced_pod(
            marker.namespace,
            label_selector=f"controller-uid={uid}",
            _request_timeout=self.request_timeout,
        ).items
        running = [p for p in pods if p.status and p.status.phase not in (None, "Pending")]
        if len(running) != 1 or running[0].metadata is None or not running[0].metadata.name:
            return None
        follower = _Follower(executor.OutputTail.for_command(job.output_cap, ready.secrets))
        name = running[0].metadata.name

        def follow() -> None:
            try:
                response: Any = core.read_namespaced_pod_log(
                    name,
                    marker.namespace,
                    container=CONTAINER,
                    follow=True,
                    _preload_content=False,
                    # A quiet command sends nothing for a while; none runs past its deadline.
                    _request_timeout=(
                        self.request_timeout,
                        job.spec.timeout + self.request_timeout,
                    ),
                )
                try:
                    for chunk in response.stream(65536):
                        follower.append(chunk)
                finally:
                    response.release_conn()
            except Exception as exc:  # the log is read again at the end, if it still exists
                log.info("following the log of pod %s stopped: %s", name, type(exc).__name__)
            finally:
                follower.ended.set()

        threading.Thread(target=follow, name=f"k8s-log-{job.step_run_id}", daemon=True).start()
        return follower

    def _read_log(
        self, core: k8s.CoreV1Api, pod: k8s.V1Pod, namespace: str, tail: executor.OutputTail
    ) -> bool:
        """Stream the pod's log into `tail` (its end is kept); False if it cannot be read."""
        name = pod.metadata.name if pod.metadata else None
        if not name:
            return False
        try:
            # Not preloaded: a urllib3 response, read in chunks (typed as the whole text).
            response: Any = core.read_namespaced_pod_log(
                name,
                namespace,
                container=CONTAINER,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            )
        except ApiException:
            return False
        try:
            for chunk in response.stream(65536):
                tail.append(chunk)
        finally:
            response.release_conn()
        return True

    def _find_job(self, batch: k8s.BatchV1Api, marker: _Marker) -> k8s.V1Job | None:
        selector = ",".join(
            f"{k}={v}"
            for k, v in {
                LABEL_INSTANCE: self.instance,
                LABEL_STEP_RUN: marker.step_run_id,
                LABEL_ATTEMPT: marker.attempt,
            }.items()
        )
        items = batch.list_namespaced_job(
            marker.namespace, label_selector=selector, _request_timeout=self.request_timeout
        ).items
        named = [j for j in items if j.metadata and j.metadata.name == marker.name]
        return next(iter(named or items), None)

    def _deliver(self, token: str, job: Job, outcome: _Outcome, *, delete: bool = True) -> None:
        """Hand the end to the sink (which stores it), then remove the Job and the marker."""
        values = dataclasses.asdict(outcome.result) if outcome.result is not None else None
        self.sink(
            JobEnd(job.step_run_id, job.attempt, job.incident_id, job.phase, values, outcome.detail)
        )
        try:
            marker = self._read_marker(token)
        except _Unreadable:
            marker = None
        if delete and marker is not None:
            batch, _core = self._apis()
            try:
                batch.delete_namespaced_job(
                    marker.name,
                    marker.namespace,
                    propagation_policy="Background",
                    _request_timeout=self.request_timeout,
                )
            except Exception as exc:  # its TTL removes it
                log.info("could not delete Job %s (%s); its TTL will", marker.name, exc)
        self._marker_path(token).unlink(missing_ok=True)

    def _pause(self) -> None:
        if self._stop.wait(self.poll_interval):
            raise _Stopped

    # --- the Job ---------------------------------------------------------------------------

    def _job_body(
        self, job: Job, target: KubernetesPlacement, ready: executor.Prepared
    ) -> k8s.V1Job:
        labels = {
            LABEL_INSTANCE: self.instance,
            LABEL_STEP_RUN: str(job.step_run_id),
            LABEL_ATTEMPT: str(job.attempt),
            LABEL_INCIDENT: _label_value(job.incident_id),
            LABEL_ACTION: _label_value(job.action_id),
            "app.kubernetes.io/managed-by": "runbook-bot",
        }
        container = k8s.V1Container(
            name=CONTAINER,
            image=target.image,
            command=[kubelet_literal(arg) for arg in ready.argv],
            env=[k8s.V1EnvVar(name=name, value=ready.env[name]) for name in job.spec.env],
            resources=k8s.V1ResourceRequirements(
                requests=dict(target.resources.get("requests", {})) or None,
                limits=dict(target.resources.get("limits", {})) or None,
            ),
        )
        return k8s.V1Job(
            api_version="batch/v1",
            kind="Job",
            metadata=k8s.V1ObjectMeta(
                name=job_name(self.instance, job),
                labels=labels,
                annotations={ANNOTATION_INCIDENT: job.incident_id},
            ),
            spec=k8s.V1JobSpec(
                backoff_limit=0,
                active_deadline_seconds=max(1, math.ceil(job.spec.timeout)),
                ttl_seconds_after_finished=(
                    DEFAULT_TTL_SECONDS
                    if target.ttl_seconds_after_finished is None
                    else target.ttl_seconds_after_finished
                ),
                template=k8s.V1PodTemplateSpec(
                    metadata=k8s.V1ObjectMeta(labels=labels),
                    spec=k8s.V1PodSpec(
                        restart_policy="Never",
                        service_account_name=target.service_account,
                        containers=[container],
                    ),
                ),
            ),
        )

    # --- markers ---------------------------------------------------------------------------

    def _marker_path(self, token: str) -> Path:
        return self.state_dir / f"k8s-{token}.json"

    def _write_marker(self, token: str, marker: _Marker) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._marker_path(token)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(dataclasses.asdict(marker), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        directory = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself must survive a power loss
        finally:
            os.close(directory)

    def _read_marker(self, token: str) -> _Marker | None:
        try:
            data = json.loads(self._marker_path(token).read_text(encoding="utf-8"))
            return _Marker(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise _Unreadable(str(exc)) from None


def _terminated(pod: k8s.V1Pod | None) -> k8s.V1ContainerStateTerminated | None:
    if pod is None or pod.status is None:
        return None
    for status in pod.status.container_statuses or []:
        if status.name == CONTAINER and status.state is not None:
            terminated: k8s.V1ContainerStateTerminated | None = status.state.terminated
            return terminated
    return None


def _duration(terminated: k8s.V1ContainerStateTerminated | None) -> float | None:
    """The container's run time, when its times (whole seconds) tell more than zero."""
    if terminated is None:
        return None
    start, end = terminated.started_at, terminated.finished_at
    if isinstance(start, datetime) and isinstance(end, datetime) and end > start:
        return (end - start).total_seconds()
    return None


def _label_value(text: str) -> str:
    """`text` as a label value (63 characters of [A-Za-z0-9._-], alphanumeric ends)."""
    return _LABEL_VALUE_BAD.sub("-", text)[:63].strip("-._") or "none"


def _refused(status: int | None) -> bool:
    """A client error proves the Job was not created, and asking again gets the same
    answer; but a timeout (408) or throttling (429) is worth asking again."""
    return status is not None and 400 <= status < 500 and status not in (408, 409, 429)


def _refusal(exc: ApiException, ready: executor.Prepared) -> str:
    message = ""
    with contextlib.suppress(ValueError, TypeError):
        message = str(json.loads(exc.body or "").get("message") or "")
    told = f": {ready.masked(message)}" if message else ""
    return f"could not start: the Kubernetes API refused its Job ({exc.status} {exc.reason}){told}"


def _error(detail: str) -> executor.ExecutionResult:
    return executor.ExecutionResult(
        status="error",
        exit_code=None,
        output="",
        duration=0.0,
        argv=(),
        matched=None,
        detail=detail,
    )
