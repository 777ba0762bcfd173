"""`make demo`'s entry point (lora_factory.demo.run): its home and its FAILED line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._utils.tags import TagConcurrencyLimitsCounter

from lora_factory.demo.run import EMBEDDED_INSTANCE, failure_message
from lora_factory.run_health import MonitoredRunLauncher

REPO_ROOT = Path(__file__).resolve().parents[1]
# What `main` does first, started by several processes at the same moment.
FIRST_START = """
import sys, time
from pathlib import Path
import dagster as dg
from lora_factory.demo.run import prepare_home
home, ready, go = map(Path, sys.argv[1:])
ready.touch()
while not go.exists():
    time.sleep(0.002)
prepare_home(home)
with dg.DagsterInstance.get() as instance:
    print("runs:", instance.get_runs_count())
"""


def test_processes_creating_one_fresh_home_at_once(tmp_path):
    home, go = tmp_path / "factory", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_START, str(home), str(flag), str(go)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert stdout.strip() == "runs: 0"


def test_embedded_instance_runs_one_run_per_character_at_a_time(tmp_path):
    shutil.copy(EMBEDDED_INSTANCE, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_launcher, MonitoredRunLauncher)
        assert instance.run_monitoring_enabled
        concurrency = instance.get_concurrency_config()
        limits = concurrency.run_queue_config.tag_concurrency_limits
        # Only the GPU steps hold the `gpu` pool, so other characters' data stages go on.
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs == 3
        assert instance.run_coordinator.dequeue_interval_seconds == 1

    # The queued run coordinator's own counter, with one run of `surtr` in progress.
    def run(partition: str) -> dg.DagsterRun:
        return dg.DagsterRun(job_name="character_job", tags={"dagster/partition": partition})

    counter = TagConcurrencyLimitsCounter(limits, [run("surtr")])
    assert counter.is_blocked(run("surtr"))
    assert not counter.is_blocked(run("yae_miko"))


@dg.asset
def missing_model():
    raise dg.Failure(description="Model tiny-tagger is missing: run `hf download some/repo`.")


def parse(text: str) -> dict:
    return dict(line.split("=") for line in text.splitlines())


@dg.asset
def broken_table():
    try:
        parse("no equals sign")
    except ValueError as error:
        raise RuntimeError("could not read the table") from error


def test_failed_line_gives_a_failures_description():
    result = dg.materialize([missing_model], raise_on_error=False)
    assert failure_message(result) == (
        "missing_model: Model tiny-tagger is missing: run `hf download some/repo`."
    )


def test_failed_line_gives_the_innermost_cause_of_other_errors():
    result = dg.materialize([broken_table], raise_on_error=False)
    message = failure_message(result)
    assert message.startswith("broken_table: ValueError: dictionary update sequence element")
    assert "Error occurred while executing" not in message
