"""Run-worker health: a run whose worker process died is failed, so it frees its pools.

Dagster's run monitoring checks a STARTED run only through the run launcher's
`check_run_worker_health`, which `DefaultRunLauncher` does not implement: a run whose
worker died without reporting (a killed `execute_in_process` run such as `make demo`, or
a daemon-launched run whose code server died with it) would stay STARTED forever and hold
its `gpu` pool slot. So every run records its worker (host, pid, process start time) in a
run tag, and `MonitoredRunLauncher` checks that process. The instance yamls use it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
from dagster import (
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultRunLauncher,
    Executor,
    ExecutorDefinition,
    RunsFilter,
    multi_or_in_process_executor,
)
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

WORKER_TAG = "lora_factory/run_worker"
# psutil derives a process's start time from the boot time, which clock adjustments can
# move by a second; a reused pid belongs to a process started at another moment.
START_TIME_TOLERANCE_S = 1.0


def _pid_namespace() -> str:
    # Two containers may share a hostname but not their pids.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class RunWorker:
    """The process executing a run, identified across pid reuse."""

    run_id: str
    host: str
    pid_namespace: str
    pid: int
    started: float  # process start time, seconds since the epoch

    @classmethod
    def current(cls, run_id: str) -> RunWorker:
        return cls(
            run_id=run_id,
            host=socket.gethostname(),
            pid_namespace=_pid_namespace(),
            pid=os.getpid(),
            started=psutil.Process().create_time(),
        )

    @classmethod
    def of(cls, run: DagsterRun) -> RunWorker | None:
        value = run.tags.get(WORKER_TAG)
        if not value:
            return None
        worker = cls(**json.loads(value))
        # Retries and re-executions copy their parent run's tags, worker included.
        return worker if worker.run_id == run.run_id else None

    def tags(self) -> dict[str, str]:
        return {WORKER_TAG: json.dumps(asdict(self))}

    def is_local(self) -> bool:
        return (self.host, self.pid_namespace) == (socket.gethostname(), _pid_namespace())

    def is_alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            same_process = abs(process.create_time() - self.started) < START_TIME_TOLERANCE_S
            return same_process and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:  # another user's live process
            return True

    def __str__(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"process {self.pid} on {self.host} (started {started})"


def in_process_run_args() -> dict[str, Any]:
    """`execute_in_process` arguments that record the calling process as the run's worker."""
    run_id = str(uuid.uuid4())
    return {"run_id": run_id, "tags": RunWorker.current(run_id).tags()}


def check_run_worker(run: DagsterRun) -> CheckRunHealthResult:
    """RUNNING unless the run's recorded worker ran on this host and is gone."""
    worker = RunWorker.of(run)
    if worker is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker recorded")
    if not worker.is_local():
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker {worker} is on another host")
    if worker.is_alive():
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker {worker} is alive")
    return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker {worker} died")


def fail_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark STARTED runs whose worker died as failed, as run monitoring would; their ids."""
    failed = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        health = check_run_worker(run)
        if health.status == WorkerStatus.FAILED:
            instance.report_run_failed(run, f"The {health.msg}; marking the run failed.")
            if instance.event_log_storage.supports_global_concurrency_limits:
                # Op-granularity pool slots; at run granularity the failure alone frees the pool.
                instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            failed.append(run.run_id)
    return failed


class MonitoredRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run worker health check works (for run monitoring)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return check_run_worker(run)


class _WorkerRecordingExecutor(Executor):
    def __init__(self, inner: Executor):
        self._inner = inner

    def execute(self, plan_context, execution_plan) -> Iterator:
        # Runs in the run worker (the orchestrating process), before any step.
        worker = RunWorker.current(plan_context.run_id)
        plan_context.instance.add_run_tags(plan_context.run_id, worker.tags())
        yield from self._inner.execute(plan_context, execution_plan)

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config


# Dagster's default executor (multiprocess, or in_process by run config), recording the
# run worker for the health check. `execute_in_process` ignores a job's executor: pass
# `**in_process_run_args()` there instead.
monitored_executor = ExecutorDefinition(
    name="monitored_multi_or_in_process_executor",
    config_schema=multi_or_in_process_executor.config_schema,
    requirements=multi_or_in_process_executor.get_requirements,
    executor_creation_fn=lambda init_context: _WorkerRecordingExecutor(
        multi_or_in_process_executor.executor_creation_fn(init_context)
    ),
    description="The default executor; records the run worker for run monitoring.",
)
