"""Run-worker health: a run whose worker process died is failed, so it frees its pools.

Dagster's run monitoring checks a STARTED run only through the run launcher's
`check_run_worker_health`, which `DefaultRunLauncher` does not implement: a run whose
worker died without reporting (a killed `execute_in_process` run such as `make demo`, or
a daemon-launched run whose code server died with it) would stay STARTED forever and hold
its `gpu` pool slot. So every run records its worker (host, pid, process start time) in a
run tag, and `MonitoredRunLauncher` checks that process. The instance yamls use it.

`monitored_executor` is the executor of every job on one machine: in-process by default
(the reasons are at its definition), multiprocess by run config. The celery executor
(`engines.py`) records its run worker the same way.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
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
    Field,
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


def free_pool_slots(instance: DagsterInstance, run_id: str) -> None:
    """Free the op-granularity pool slots (`gpu`) a run's steps claimed or wait for."""
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def fail_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark STARTED runs whose worker died as failed, as run monitoring would; their ids."""
    failed = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        health = check_run_worker(run)
        if health.status == WorkerStatus.FAILED:
            instance.report_run_failed(run, f"The {health.msg}; marking the run failed.")
            free_pool_slots(instance, run.run_id)
            failed.append(run.run_id)
    return failed


class MonitoredRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run worker health check works (for run monitoring)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        health = check_run_worker(run)
        if health.status == WorkerStatus.FAILED:
            # Run monitoring marks the run failed on this answer (DefaultRunLauncher cannot
            # resume runs), but frees the step's `gpu` slot only `free_slots_after_run_end_seconds`
            # later, on a later poll. The worker is gone, so nothing uses the slot: free it now.
            free_pool_slots(self._instance, run.run_id)
        return health


def release_cached_gpu_memory() -> bool:
    """Hand the GPU memory torch keeps cached in this process back; whether there was any.

    In-process, a run's GPU steps share the run worker: without this, a run whose
    `recscore_table` waits for the `gpu` slot would keep what `lora_checkpoints` cached
    (gigabytes) while another run trains on that GPU. Only its CUDA context stays.
    """
    torch = sys.modules.get("torch")  # never imports torch itself
    if torch is None or not torch.cuda.is_initialized():
        return False
    gc.collect()  # Lightning's trainer and diffusers' pipelines hold tensors in cycles
    torch.cuda.empty_cache()
    return True


class _WorkerRecordingExecutor(Executor):
    def __init__(self, inner: Executor):
        self._inner = inner

    def execute(self, plan_context, execution_plan) -> Iterator:
        # Runs in the run worker (the orchestrating process), before any step.
        worker = RunWorker.current(plan_context.run_id)
        plan_context.instance.add_run_tags(plan_context.run_id, worker.tags())
        for event in self._inner.execute(plan_context, execution_plan):
            yield event
            if event.is_step_success or event.is_step_failure:
                # In-process: before the executor frees the step's pool slot on this event.
                release_cached_gpu_memory()

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def __getattr__(self, name: str) -> Any:
        # The executor's own API, which its execution loop reads back from the plan
        # context (celery's `app_args`).
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


# Dagster's default executor with in_process as the default (multiprocess by run config),
# recording the run worker for the health check.
#
# Why in-process: the multiprocess executor starts a fresh Python process per step, and
# each imports Dagster, the code location and its stage's libraries (torch, onnxruntime,
# lancedb, ...) again. A daemon-launched `character_job` run whose 8 stages are all
# reused (demo home, 2 shared cores, run start to end) took 31-43 s multiprocess, 12-16 s
# multiprocess with a forkserver preloading those modules (it imports them all once per
# run, then every step still builds its context in a new process and uses ~1.5 GB), and
# 3.5-5 s in-process. A character's stages form a chain, so running them one after another
# loses no parallelism; characters run side by side as separate runs. A run worker killed
# mid-step (OOM, SIGKILL) fails its run through the health check, and run retries retry
# it (a step process dying under multiprocess is a step failure, which is not retried).
# A step in pool `gpu` waits inside its run for a slot (op granularity) and frees it when
# it ends; the GPU memory it cached goes back first (`release_cached_gpu_memory`).
# `execute_in_process` ignores a job's executor (it is always in-process): pass
# `**in_process_run_args()` there instead.
def monitored(executor_def: ExecutorDefinition, default_config: Any, name: str) -> ExecutorDefinition:
    """`executor_def` with `default_config` as its default run config, recording the run
    worker (the process orchestrating the steps) for the health check."""
    return ExecutorDefinition(
        name=name,
        config_schema=Field(executor_def.config_schema.config_type, default_value=default_config),
        requirements=executor_def.get_requirements,
        executor_creation_fn=lambda init_context: _WorkerRecordingExecutor(
            executor_def.executor_creation_fn(init_context)
        ),
        description=f"{executor_def.name}, recording the run worker for run monitoring.",
    )


monitored_executor = monitored(multi_or_in_process_executor, {"in_process": {}}, "monitored_executor")
