"""A stand-in for the part of the Kubernetes API the Job executor uses (``bot.kube``).

A real HTTP server on 127.0.0.1 (plain HTTP: the official client talks to it through a
``Configuration`` whose ``host`` is `FakeKubernetes.url`), answering as the API server,
the Job controller and a kubelet would, for:

- ``POST/GET/DELETE /apis/batch/v1/namespaces/NS/jobs[/NAME]``: create (a JSON body with
  its ``Content-Type``, else ``415``; ``409 AlreadyExists`` for a name in use), get, list
  by ``labelSelector``, delete (with ``propagationPolicy``: ``Background`` and
  ``Foreground`` delete the Job's pods, which kills their processes; ``Orphan`` leaves
  them);
- ``GET /api/v1/namespaces/NS/pods`` by ``labelSelector`` (``job-name``,
  ``controller-uid`` and their ``batch.kubernetes.io/`` forms, and the template's labels);
- ``GET /api/v1/namespaces/NS/pods/NAME/log`` (stdout and stderr together, as text;
  with ``follow=true`` streamed, chunked, until the container ends or its pod is deleted).

What it models:

- the Job controller with ``backoffLimit: 0`` and ``restartPolicy: Never``: one pod per
  Job, created with it, and never a second one, whatever happens to the first; a pod that
  exits non-zero or disappears fails the Job (``BackoffLimitExceeded``), one that exits 0
  completes it (``Complete``); `pods_created` counts pods per Job;
- the kubelet: the container's ``command`` RUNS as a local subprocess (in a session of its
  own), with ``$(NAME)`` expanded from the container's ``env`` and ``$$`` read as ``$``,
  as the kubelet does; its environment is the container's ``env`` plus this machine's
  ``PATH`` (there is no image to bring one); the pod's phase goes Running, then Succeeded
  or Failed, and the container's ``terminated`` state carries the exit code (128 + the
  signal for a killed process, as container runtimes report it), reason and times;
- ``activeDeadlineSeconds``, counted from the Job's creation: the process is killed, the
  pod deleted (as the Job controller deletes active pods, its log with it), and the Job
  fails with reason ``DeadlineExceeded``;
- ``ttlSecondsAfterFinished``: a finished Job and its pods are deleted that long after;
- a lost node (`lose_pod`): the process is killed and the pod object removed, with no
  terminated state left to read.

What it does not model: scheduling, nodes and resources (``resources`` are stored, not
enforced), images (ignored: commands run on this machine, as the test's user), RBAC
(any request is allowed; the service account is recorded on the pod, not checked,
unless `service_accounts` names the ones that exist: a Job whose account is missing
gets no pod, as the real controller cannot create one, until its deadline), watch
streams, field selectors, set-based label selectors,
``resourceVersion`` conflicts, authentication, finalizers and owner references beyond
the Job's own pods, and any other kind or API.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .base import FakeServer, Reply, Request

_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(/log)?)?$")
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Pod:
    namespace: str
    name: str
    job: str
    labels: dict[str, str]
    spec: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    log: bytearray = field(default_factory=bytearray)
    phase: str = "Pending"
    terminated: dict[str, Any] | None = None
    started_at: str = ""

    def manifest(self, uid: str) -> dict[str, Any]:
        container = self.spec["containers"][0]
        state: dict[str, Any]
        if self.terminated is not None:
            state = {"terminated": self.terminated}
        elif self.phase == "Running":
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": self.spec,
            "status": {
                "phase": self.phase,
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container.get("image", ""),
                        "imageID": "",
                        "ready": self.phase == "Running",
                        "restartCount": 0,
                        "state": state,
                    }
                ],
            },
        }


@dataclass
class _Job:
    manifest: dict[str, Any]
    created: float  # time.monotonic()
    pod: _Pod | None = None
    finished: float | None = None

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.manifest["status"]
        return status


class FakeKubernetes(FakeServer):
    """The Kubernetes API subset of ``bot.kube``, with Jobs whose commands really run.

    ``service_accounts``: {(namespace, name)} that exist; None (default): any.
    """

    def __init__(self, *, service_accounts: set[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.service_accounts = service_accounts
        self.jobs: dict[tuple[str, str], _Job] = {}
        self.pods: dict[tuple[str, str], _Pod] = {}
        self.pods_created: dict[str, int] = {}  # Job name -> pods ever created for it
        self.jobs_created: dict[str, int] = {}  # Job name -> times a Job of that name was made
        self._uids = itertools.count(1)
        self._gathering: dict[str, threading.Barrier] = {}
        self.arrived: list[str] = []  # names of calls as they arrive, before they are handled
        self._ticker = threading.Thread(target=self._tick, name="fake-kube-controller", daemon=True)
        self._ticker.start()

    # -- for tests ------------------------------------------------------------------------

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            found = self.jobs.get((namespace, name))
            return found.manifest if found is not None else None

    def pod_of(self, namespace: str, job: str) -> _Pod | None:
        with self._cond:
            found = self.jobs.get((namespace, job))
            return found.pod if found is not None else None

    def running_pids(self) -> list[int]:
        """Process ids of containers still running."""
        with self._cond:
            return [
                p.process.pid
                for p in self.pods.values()
                if p.process is not None and p.process.poll() is None
            ]

    def lose_pod(self, namespace: str, job: str) -> None:
        """The pod's node is lost: its process is killed and the pod object removed, with
        no terminated state left. The Job controller (backoffLimit 0) fails the Job and
        makes no second pod."""
        with self._cond:
            found = self.jobs[(namespace, job)]
            pod = found.pod
            assert pod is not None, f"Job {job} has no pod"
            self._kill(pod)
            self.pods.pop((namespace, pod.name), None)
            pod.phase = "Unknown"
            if not found.status.get("conditions"):
                self._fail(
                    found, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )
            self._cond.notify_all()

    def gather(self, name: str, count: int) -> None:
        """Hold the answers to the next `count` calls named `name` until all of them were
        handled (at most 10 s): racing clients each see the state before any next call."""
        with self._cond:
            self._gathering[name] = threading.Barrier(count, timeout=10)

    def _dispatch(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> Any:
        name = self.call_name(Request(method, target.split("?", 1)[0], {}, {}, {}, None))
        with self._cond:
            barrier = self._gathering.get(name)
            self.arrived.append(name)  # before any latency: the request is in
            self._cond.notify_all()
        reply = super()._dispatch(method, target, headers, raw)
        if barrier is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                if barrier.wait() == 0:
                    with self._cond:
                        self._gathering.pop(name, None)
        return reply

    def stop(self) -> None:
        with self._cond:
            for pod in list(self.pods.values()):
                self._kill(pod)
        super().stop()

    # -- the API --------------------------------------------------------------------------

    def call_name(self, request: Request) -> str:
        if found := _JOBS.match(request.path):
            verb = {"POST": "create", "DELETE": "delete"}.get(request.method, "get")
            if verb == "get" and found.group(2) is None:
                verb = "list"
            return f"{verb} jobs"
        if found := _PODS.match(request.path):
            return "read log" if found.group(3) else "list pods"
        return f"{request.method} {request.path}"

    def error_body(self, status: int) -> Any:
        return _status(status, "InternalError", "the stand-in was told to fail")

    def handle(self, request: Request) -> Reply:
        if found := _JOBS.match(request.path):
            namespace, name = found.group(1), found.group(2)
            if request.method == "POST" and name is None:
                if not request.headers.get("content-type", "").startswith("application/json"):
                    return Reply(415, _status(415, "UnsupportedMediaType", "send JSON"))
                return self._create(namespace, request.json)
            if request.method == "GET" and name is None:
                selector = _selector(request.query.get("labelSelector", ""))
                items = [
                    j.manifest
                    for (ns, _), j in sorted(self.jobs.items())
                    if ns == namespace and _matches(j.manifest["metadata"]["labels"], selector)
                ]
                return Reply(
                    200,
                    {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items},
                )
            job = self.jobs.get((namespace, name or ""))
            if job is None:
                return Reply(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            if request.method == "GET":
                return Reply(200, job.manifest)
            if request.method == "DELETE":
                body = request.json or {}
                policy = request.query.get("propagationPolicy") or body.get("propagationPolicy")
                self._delete(job, orphan=policy == "Orphan")
                return Reply(200, _status(200, "", "", status="Success"))
        if found := _PODS.match(request.path):
            namespace, name, log = found.groups()
            if name is None and request.method == "GET":
                selector = _selector(request.query.get("labelSelector", ""))
                items = []
                for (ns, _), pod in sorted(self.pods.items()):
                    if ns == namespace and _matches(pod.labels, selector):
                        job = self.jobs.get((ns, pod.job))
                        uid = job.manifest["metadata"]["uid"] if job else ""
                        items.append(pod.manifest(uid))
                return Reply(
                    200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
                )
            pod = self.pods.get((namespace, name or ""))
            if pod is None:
                return Reply(404, _status(404, "NotFound", f'pods "{name}" not found'))
            if log and request.method == "GET":
                if request.query.get("follow") == "true":
                    return Reply(200, self._follow(pod))
                return Reply(200, bytes(pod.log))
        return Reply(404, _status(404, "NotFound", "the stand-in does not serve this"))

    def _follow(self, pod: _Pod) -> Iterator[bytes]:
        """The log so far, then what the container writes, until it ends or its pod is
        deleted (sent outside the stand-in's lock)."""
        sent = 0
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda sent=sent: len(pod.log) > sent or self._log_ended(pod), timeout=0.5
                )
                data = bytes(pod.log[sent:])
                ended = self._log_ended(pod)
            sent += len(data)
            if data:
                yield data
            elif ended or self._stopped:
                return

    def _log_ended(self, pod: _Pod) -> bool:
        return pod.terminated is not None or self.pods.get((pod.namespace, pod.name)) is not pod

    # -- the Job controller and the kubelet ---------------------------------------------

    def _create(self, namespace: str, body: Any) -> Reply:
        try:
            metadata, spec = body["metadata"], body["spec"]
            name = metadata["name"]
            template = spec["template"]["spec"]
            assert template["restartPolicy"] in ("Never", "OnFailure")
            assert template["containers"][0]["command"]
        except (KeyError, TypeError, IndexError, AssertionError):
            return Reply(422, _status(422, "Invalid", "Job.batch is invalid"))
        if (namespace, name) in self.jobs:
            return Reply(409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists'))
        uid = f"uid-{next(self._uids)}-{secrets.token_hex(4)}"
        manifest = {
            **body,
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                **metadata,
                "namespace": namespace,
                "uid": uid,
                "labels": dict(metadata.get("labels") or {}),
                "creationTimestamp": _now(),
            },
            "status": {"startTime": _now(), "active": 0},
        }
        job = _Job(manifest, time.monotonic())
        self.jobs[(namespace, name)] = job
        self.jobs_created[name] = self.jobs_created.get(name, 0) + 1
        account = template.get("serviceAccountName", "default")
        if self.service_accounts is None or (namespace, account) in self.service_accounts:
            self._start_pod(namespace, job, uid)
        return Reply(201, manifest)

    def _start_pod(self, namespace: str, job: _Job, uid: str) -> None:
        template = job.manifest["spec"]["template"]
        pod_name = f"{job.name}-{secrets.token_hex(3)}"
        labels = {
            **(template.get("metadata", {}).get("labels") or {}),
            "job-name": job.name,
            "batch.kubernetes.io/job-name": job.name,
            "controller-uid": uid,
            "batch.kubernetes.io/controller-uid": uid,
        }
        pod = _Pod(namespace, pod_name, job.name, labels, template["spec"])
        self.pods[(namespace, pod_name)] = pod
        job.pod = pod
        self.pods_created[job.name] = self.pods_created.get(job.name, 0) + 1
        container = template["spec"]["containers"][0]
        env = {
            e["name"]: kubelet_expand(e.get("value", ""), {}) for e in container.get("env") or []
        }
        argv = [kubelet_expand(arg, env) for arg in container["command"]]
        try:
            pod.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                start_new_session=True,
            )
        except OSError as exc:  # the runtime cannot start it: StartError, exit 128
            pod.log.extend(str(exc).encode())
            self._terminate(job, pod, 128, "StartError")
            return
        pod.phase, pod.started_at = "Running", _now()
        job.status["active"] = 1
        threading.Thread(target=self._run, args=(job, pod), daemon=True).start()

    def _run(self, job: _Job, pod: _Pod) -> None:
        process = pod.process
        assert process is not None and process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            with self._cond:
                pod.log.extend(chunk)
                self._cond.notify_all()
        process.stdout.close()
        code = process.wait()
        with self._cond:
            if pod.terminated is None and pod.phase == "Running":
                exit_code = 128 - code if code < 0 else code
                self._terminate(job, pod, exit_code, "Completed" if code == 0 else "Error")
            self._cond.notify_all()

    def _terminate(self, job: _Job, pod: _Pod, exit_code: int, reason: str) -> None:
        pod.terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": pod.started_at or _now(),
            "finishedAt": _now(),
        }
        pod.phase = "Succeeded" if exit_code == 0 else "Failed"
        job.status["active"] = 0
        if job.status.get("conditions"):
            return
        if exit_code == 0:
            job.status["succeeded"] = 1
            job.status["completionTime"] = _now()
            job.status["conditions"] = [_condition("Complete", "", "")]
            job.finished = time.monotonic()
        else:
            self._fail(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    def _fail(self, job: _Job, reason: str, message: str) -> None:
        job.status["active"] = 0
        job.status["failed"] = 1
        job.status["conditions"] = [_condition("Failed", reason, message)]
        job.finished = time.monotonic()

    def _tick(self) -> None:
        """Deadlines and TTLs, every 20 ms."""
        while not self._stopped:
            time.sleep(0.02)
            now = time.monotonic()
            with self._cond:
                for job in list(self.jobs.values()):
                    spec = job.manifest["spec"]
                    deadline = spec.get("activeDeadlineSeconds")
                    if (
                        job.finished is None
                        and deadline is not None
                        and now - job.created >= deadline
                    ):
                        pod = job.pod
                        if pod is not None:
                            self._kill(pod)
                            self.pods.pop((pod.namespace, pod.name), None)
                        self._fail(
                            job, "DeadlineExceeded", "Job was active longer than specified deadline"
                        )
                        self._cond.notify_all()
                    ttl = spec.get("ttlSecondsAfterFinished")
                    if job.finished is not None and ttl is not None and now - job.finished >= ttl:
                        self._delete(job, orphan=False)
                        self._cond.notify_all()

    def _delete(self, job: _Job, *, orphan: bool) -> None:
        namespace = job.manifest["metadata"]["namespace"]
        self.jobs.pop((namespace, job.name), None)
        if job.pod is not None and not orphan:
            self._kill(job.pod)
            self.pods.pop((namespace, job.pod.name), None)

    def _kill(self, pod: _Pod) -> None:
        if pod.process is not None and pod.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pod.process.pid, signal.SIGKILL)
        if pod.terminated is None:
            pod.phase = "Failed"  # its process was killed: no terminated state to read


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of a container's command and env values: ``$(NAME)`` from
    env (left as it is when unknown), ``$$`` is ``$``, read left to right."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VARIABLE.sub(replace, text)


def _selector(text: str) -> dict[str, str]:
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"the stand-in knows only k=v selectors: {text!r}")
    return {k.strip(): v.strip().removeprefix("=") for k, v in pairs}


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason or None,
        "message": message or None,
        "lastProbeTime": _now(),
        "lastTransitionTime": _now(),
    }


def _status(code: int, reason: str, message: str, *, status: str = "Failure") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": status,
        "message": message,
        "reason": reason,
        "code": code,
    }
