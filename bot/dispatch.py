"""Which executor runs a claimed step: the one its action's ``executor:`` names.

The engine reserves a runner for the step's placement and the claim records the runner
id; the id's prefix says which executor has the step, so ``start`` and, after a restart,
``recover`` go back to the same one:

  local:TOKEN        ``SupervisedExecutor`` (``bot.jobs``): the bot's own host
  runner:POOL:ID     ``RunnerHub`` (``bot.hub``): a pull runner of POOL
  k8s:…              the Kubernetes executor (``bot.kube``), when one is registered
  refused:KIND:ID    no executor for that kind here: the step ends ``error`` at once,
                     with the reason in the thread, and nothing runs

Only a placement with an executor runs; there is no fallback to the bot's own host.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Protocol

from bot import executor, messages
from bot.catalog.model import LOCAL, KubernetesPlacement, Placement, RunnerPlacement
from bot.engine import Job
from bot.jobs import JobEnd, Recovery, Sink
from bot.store import StepRun

REFUSED_PREFIX = "refused:"
KUBERNETES_PREFIX = "k8s:"
RUNNER_PREFIX = "runner:"


class PlacedExecutor(Protocol):
    """An executor for one kind of placement (the bot's host, a runner pool)."""

    def reserve(self, placement: Placement = LOCAL) -> str: ...
    def release(self, runner: str) -> None: ...
    def start(self, runner: str, job: Job) -> None: ...
    def recover(
        self,
        steps: Iterable[StepRun],
        job_of: Callable[[StepRun], Job | None],
        restart: Callable[[StepRun], None],
    ) -> list[Recovery]: ...
    def forget(self, runner: str) -> None: ...


class KubernetesPort(Protocol):
    """What the dispatcher needs of ``bot.kube.KubernetesExecutor``: runner ids it
    reserves start with ``k8s:``; `start` gets the action's placement. Its `recover`
    needs no restart callback: a step whose Job was never asked for comes back
    ``not_started`` and is started again like a local one."""

    def reserve(self) -> str: ...
    def release(self, runner: str) -> None: ...
    def start(self, runner: str, job: Job, target: KubernetesPlacement) -> None: ...
    def recover(
        self, steps: Iterable[StepRun], job_of: Callable[[StepRun], Job | None]
    ) -> list[Recovery]: ...
    def forget(self, runner: str) -> None: ...


class Dispatcher:
    """The engine's executor: routes each step to the executor of its placement."""

    dry_run = False

    def __init__(
        self,
        local: PlacedExecutor,
        sink: Sink,
        *,
        runners: PlacedExecutor | None = None,
        kubernetes: KubernetesPort | None = None,
        unavailable: Callable[[Placement], str] = messages.executor_unavailable,
    ) -> None:
        self.local = local
        self.sink = sink
        self.runners = runners
        self.kubernetes = kubernetes
        self.unavailable = unavailable

    def _placed(self, runner: str) -> PlacedExecutor | None:
        if runner.startswith(RUNNER_PREFIX):
            return self.runners
        if runner.startswith((REFUSED_PREFIX, KUBERNETES_PREFIX)):
            return None
        return self.local

    # --- Executor ------------------------------------------------------------------------

    def reserve(self, placement: Placement = LOCAL) -> str:
        if isinstance(placement, RunnerPlacement):
            if self.runners is not None:
                return self.runners.reserve(placement)
        elif isinstance(placement, KubernetesPlacement):
            if self.kubernetes is not None:
                return self.kubernetes.reserve()
        else:
            return self.local.reserve(placement)
        return f"{REFUSED_PREFIX}{placement.kind}:{secrets.token_hex(8)}"

    def release(self, runner: str) -> None:
        if runner.startswith(KUBERNETES_PREFIX) and self.kubernetes is not None:
            self.kubernetes.release(runner)
            return
        placed = self._placed(runner)
        if placed is not None:
            placed.release(runner)

    def start(self, runner: str, job: Job) -> None:
        if runner.startswith(KUBERNETES_PREFIX) and self.kubernetes is not None:
            assert isinstance(job.placement, KubernetesPlacement)
            self.kubernetes.start(runner, job, job.placement)
            return
        placed = self._placed(runner)
        if placed is None:
            self.sink(self._refusal(job))
            return
        placed.start(runner, job)

    def _refusal(self, job: Job) -> JobEnd:
        return JobEnd(
            job.step_run_id,
            job.attempt,
            job.incident_id,
            job.phase,
            executor.not_run(self.unavailable(job.placement)),
        )

    # --- after a restart -------------------------------------------------------------------

    def recover(
        self,
        steps: Iterable[StepRun],
        job_of: Callable[[StepRun], Job | None],
        restart: Callable[[StepRun], None],
    ) -> list[Recovery]:
        """Each executor recovers its own steps; a refused step is refused again (it
        never started); a Kubernetes step with no Kubernetes executor is interrupted."""
        local: list[StepRun] = []
        remote: list[StepRun] = []
        kube: list[StepRun] = []
        found: list[Recovery] = []
        for step in steps:
            if step.runner.startswith(RUNNER_PREFIX):
                remote.append(step)
            elif step.runner.startswith(KUBERNETES_PREFIX):
                kube.append(step)
            elif step.runner.startswith(REFUSED_PREFIX):
                job = job_of(step)
                reason = self.unavailable(job.placement) if job else "its executor is gone"
                found.append(Recovery(step, result=executor.not_run(reason)))
            else:
                local.append(step)
        found += self.local.recover(local, job_of, restart)
        if remote:
            if self.runners is not None:
                found += self.runners.recover(remote, job_of, restart)
            else:
                found += [Recovery(step, interrupted=True) for step in remote]
        if kube:
            if self.kubernetes is not None:
                found += self.kubernetes.recover(kube, job_of)
            else:
                found += [Recovery(step, interrupted=True) for step in kube]
        return found

    def forget(self, runner: str) -> None:
        if runner.startswith(KUBERNETES_PREFIX) and self.kubernetes is not None:
            self.kubernetes.forget(runner)
            return
        placed = self._placed(runner)
        if placed is not None:
            placed.forget(runner)
