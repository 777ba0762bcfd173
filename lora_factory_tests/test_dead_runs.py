"""Runs whose worker process died are failed, so they stop holding the `gpu` pool.

Real processes: a `dagster-daemon run` on a temp instance (the embedded instance yaml, with
short intervals) and a `make demo` run, each SIGKILLed mid-run.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import psutil
from daemon_harness import (
    REPO_ROOT,
    WAIT_S,
    kill_tree,
    run_with_key,
    start_daemon,
    wait_for,
    write_instance,
)
from dagster._core.launcher import WorkerStatus

from lora_factory.run_health import RunWorker, check_run_worker

LOCATION = Path(__file__).with_name("dead_run_location.py")


def step_started(instance: dg.DagsterInstance, run: dg.DagsterRun | None) -> bool:
    return run is not None and bool(
        instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
    )


def gpu_slot_holders(instance: dg.DagsterInstance) -> set[str]:
    return instance.event_log_storage.get_concurrency_info("gpu").active_run_ids


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    failures = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    return failures[-1].dagster_event.message if failures else ""


def test_daemon_fails_a_killed_run_and_launches_the_queued_one(tmp_path, started):
    home = tmp_path / "dagster_home"
    write_instance(home)
    log = tmp_path / "daemon.log"

    def start() -> psutil.Popen:
        return start_daemon(LOCATION, home, log, started)

    def held_run_in_its_step() -> dg.DagsterRun | None:
        run = run_with_key(instance, "held")
        return run if step_started(instance, run) else None

    with dg.DagsterInstance.from_config(str(home)) as instance:
        # As on any instance that has queued a `gpu` run before: Dagster learns a pool's
        # default limit on the first dequeue that sees it and enforces it from the next.
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        daemon = start()
        held = wait_for("the held run's step", held_run_in_its_step, log)
        worker = RunWorker.of(held)
        assert worker is not None, held.tags
        # The recorded worker is the run worker Dagster itself reports, not a step process.
        pids = instance.all_logs(held.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        assert any(f"(pid: {worker.pid})" in entry.message for entry in pids)
        # Its step holds the one `gpu` slot (op granularity); the other run waits in the queue.
        assert gpu_slot_holders(instance) == {held.run_id}
        assert run_with_key(instance, "queued").status == dg.DagsterRunStatus.QUEUED

        # The whole tree dies at once, code server included, as when the machine or
        # `dagster dev` is killed (a code server that survives reports its dead runs itself).
        assert worker.pid in kill_tree(daemon)
        assert run_with_key(instance, "held").status == dg.DagsterRunStatus.STARTED

        start()
        wait_for(
            "the killed run to fail",
            lambda: run_with_key(instance, "held").status == dg.DagsterRunStatus.FAILURE,
            log,
        )
        message = failure_message(instance, held.run_id)
        assert f"run worker process {worker.pid} on {worker.host}" in message
        assert "died" in message
        # Freed as the run is failed, not `free_slots_after_run_end_seconds` (120 s) later.
        assert held.run_id not in gpu_slot_holders(instance)
        wait_for(
            "the queued run to finish",
            lambda: run_with_key(instance, "queued").status == dg.DagsterRunStatus.SUCCESS,
            log,
        )


def test_next_demo_fails_the_run_of_a_killed_demo(tmp_path, started):
    home = tmp_path / "factory"
    log = tmp_path / "demo.log"

    def demo(character: str) -> list[str]:
        arguments = ["--home", str(home), "--character", character]
        return [sys.executable, "-m", "lora_factory.demo.run", *arguments]

    with log.open("w") as out:
        killed = psutil.Popen(
            demo("ash_ember_knights"),
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started.append(killed)
    # Past the index run: the instance exists and the character's run is starting.
    wait_for("the index run", lambda: "=== ash_ember_knights ===" in log.read_text(), log)
    with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
        started_runs = dg.RunsFilter(
            job_name="character_job", statuses=[dg.DagsterRunStatus.STARTED]
        )
        run = wait_for(
            "the character's run", lambda: next(iter(instance.get_runs(started_runs)), None), log
        )
        worker = RunWorker.of(run)
        assert worker is not None and worker.pid == killed.pid
        kill_tree(killed)
        status = instance.get_run_by_id(run.run_id).status
        assert status == dg.DagsterRunStatus.STARTED, f"the run ended before the kill: {status}"

        # The next demo marks it failed before anything else (the unknown key then stops it).
        rerun = subprocess.run(
            demo("not_a_character"),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
        assert rerun.returncode == 2, rerun.stderr
        assert f"marked run {run.run_id} failed: its worker process died" in rerun.stderr
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert f"run worker process {worker.pid}" in failure_message(instance, run.run_id)


def _run(worker: RunWorker | None, run_id: str | None = None) -> dg.DagsterRun:
    run_id = run_id or (worker.run_id if worker else str(uuid.uuid4()))
    return dg.DagsterRun(job_name="tiny_job", run_id=run_id, tags=worker.tags() if worker else {})


def test_health_check_knows_a_dead_worker_from_a_reused_pid():
    run_id = str(uuid.uuid4())
    alive = RunWorker.current(run_id)
    assert check_run_worker(_run(alive)).status == WorkerStatus.RUNNING

    # Same pid, another process start time: the pid was reused, the worker is gone.
    reused = dataclasses.replace(alive, started=alive.started - 100)
    health = check_run_worker(_run(reused))
    assert health.status == WorkerStatus.FAILED and "died" in health.msg

    child = psutil.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = dataclasses.replace(alive, pid=child.pid, started=child.create_time())
    assert check_run_worker(_run(dead)).status == WorkerStatus.RUNNING
    child.kill()
    child.wait()
    assert check_run_worker(_run(dead)).status == WorkerStatus.FAILED


def test_health_check_leaves_alone_what_it_cannot_judge():
    run_id = str(uuid.uuid4())
    gone = dataclasses.replace(RunWorker.current(run_id), started=0.0)
    assert check_run_worker(_run(gone)).status == WorkerStatus.FAILED
    # On another host: left to that host's launcher.
    elsewhere = dataclasses.replace(gone, host="another-host")
    assert check_run_worker(_run(elsewhere)).status == WorkerStatus.RUNNING
    # Copied from the parent run by a retry, before the retry's own worker recorded itself.
    assert check_run_worker(_run(gone, run_id=str(uuid.uuid4()))).status == WorkerStatus.RUNNING
    # Never recorded (a run from before this check existed).
    assert check_run_worker(_run(None)).status == WorkerStatus.RUNNING
