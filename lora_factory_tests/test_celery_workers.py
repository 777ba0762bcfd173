"""The factory on several workers with Dagster's celery executor, all real processes.

A `dagster-daemon` on the production instance yaml (PostgreSQL), the factory's sensor
starting the runs of two demo characters, RabbitMQ as the broker, and two
`dagster-celery worker` processes: one on queue `cpu`, one on queue `gpu`. The GPU worker
is SIGKILLed (its whole process group, as when a machine dies) while it trains; a new
one takes the step over from the queue and training resumes. The outputs must be the
bytes a single-process build makes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import psutil
import pytest
import yaml
from amqp.exceptions import NotFound
from conftest import PG, service_missing
from daemon_harness import kill_tree, start_daemon, wait_for
from kombu import Connection
from test_factory_chain import run_chain

from lora_factory.demo.deployment import DEMO_INDEX_PATH
from lora_factory.engines import CPU_QUEUE, GPU_QUEUE, celery_config
from lora_factory.provenance import Stamp
from lora_factory.resources import CharacterIndex
from lora_factory.training.train import STATE_DIR_NAME, STATE_FILE_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER_CELERY = Path(sys.executable).with_name("dagster-celery")
CHARACTERS = ["ash_ember_knights", "ash_pocket_tamers"]
GPU_STEPS = {"lora_checkpoints", "recscore_table"}
DATA_STEPS = {"raw_scrape", "matched_tags", "anime_posts", "cleaned_crops", "captions", "buckets", "chosen_model"}
RUNS_WAIT_S = 900  # two characters end to end on 2 shared cores, plus a retrained step
# The scrape tables record where and when each file was fetched: the demo booru listens on
# a new port in every process, and the time moves on. Everything else must be equal.
FETCH_COLUMNS = ["file_url", "downloaded_at"]


def broker_queues_idle(broker: str) -> None:
    """Empty queues `cpu` and `gpu` that no other worker listens on, or skip/fail."""
    try:
        with Connection(broker, connect_timeout=3) as connection:
            for queue in (CPU_QUEUE, GPU_QUEUE):
                channel = connection.channel()
                try:
                    _, _, consumers = channel.queue_declare(queue, passive=True)
                except NotFound:  # a new broker: the first worker declares it
                    continue
                if consumers:
                    pytest.fail(f"{consumers} other worker(s) already consume queue {queue!r} on {broker}")
                channel.queue_purge(queue)
    except (OSError, ConnectionError) as error:
        service_missing(f"no RabbitMQ broker answers at {broker} ({error})")


def start_worker(name: str, queue: str, concurrency: int, env: dict, log: Path, started: list) -> psutil.Popen:
    """`dagster-celery worker start` as an operator types it, in its own process group."""
    with log.open("a") as out:
        worker = psutil.Popen(
            [
                str(DAGSTER_CELERY), "worker", "start", "-A", "dagster_celery.app",
                "-y", str(REPO_ROOT / "lora_factory" / "celery.yaml"), "-q", queue, "-n", name,
                "--", "--concurrency", str(concurrency),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started.append(worker)
    return worker


def step_workers(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, str]]:
    """(step, celery worker) for every time a worker started executing a step of the run."""
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    return [
        (record.step_key, record.dagster_event.engine_event_data.metadata["Celery worker"].value)
        for record in records
        if record.dagster_event and "Celery worker" in record.dagster_event.engine_event_data.metadata
    ]


def stored_outputs(home: Path, key: str) -> dict[str, dict[str, str]]:
    """Per asset, the sha256 of every file its stamp for `key` records."""
    outputs = {}
    for stamp_file in sorted((home / "stamps").glob(f"*/{key}.json")):
        stamp = Stamp.from_json(json.loads(stamp_file.read_text()))
        outputs[stamp_file.parent.name] = {path: record.sha256 for path, record in stamp.files.items()}
    return outputs


def without_fetch_columns(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).drop(columns=FETCH_COLUMNS)


@pytest.mark.timeout(2400)  # two characters built twice on 2 shared cores
def test_two_characters_on_celery_workers_with_a_worker_killed(tmp_path, scratch_database, started, monkeypatch):
    broker = celery_config()["broker"]
    broker_queues_idle(broker)
    index = tmp_path / "index.yaml"
    demo_index = yaml.safe_load(DEMO_INDEX_PATH.read_text())
    demo_index["characters"] = [row for row in demo_index["characters"] if row["key"] in CHARACTERS]
    index.write_text(yaml.safe_dump(demo_index))

    # The reference: the same two characters built in one process.
    reference = tmp_path / "single_process"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("characters", CHARACTERS)
        for key in CHARACTERS:
            result = run_chain(instance, reference, key, character_index=CharacterIndex(index_path=str(index)))
            assert result.success, key

    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    home = tmp_path / "shared_home"  # the filesystem every worker mounts
    postgres = {
        "DAGSTER_PG_HOST": PG["host"],
        "DAGSTER_PG_PORT": str(PG["port"]),
        "DAGSTER_PG_USER": PG["user"],
        "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
        "DAGSTER_PG_DB": scratch_database,
    }
    for name, value in postgres.items():  # this process reads the same instance
        monkeypatch.setenv(name, value)
    env = {
        **os.environ,
        # As in an activated environment: the worker command starts `celery` from PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DAGSTER_HOME": str(dagster_home),
        "LF_EXECUTOR": "celery",
        "LF_HOME": str(home),
        "LF_INDEX_PATH": str(index),
    }
    cpu_log, gpu_log, daemon_log = tmp_path / "cpu.log", tmp_path / "gpu.log", tmp_path / "daemon.log"
    start_worker("cpu", CPU_QUEUE, 2, env, cpu_log, started)
    gpu_worker = start_worker("gpu", GPU_QUEUE, 1, env, gpu_log, started)
    for name, log in (("cpu", cpu_log), ("gpu", gpu_log)):
        wait_for(f"celery worker {name}", lambda: f"{name}@{socket.gethostname()} ready." in log.read_text(), log)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        start_daemon("lora_factory.definitions", dagster_home, daemon_log, started, env=env)

        def character_runs() -> list[dg.DagsterRun]:
            return list(instance.get_runs(dg.RunsFilter(job_name="character_job")))

        # Kill the GPU worker once a character has saved its first checkpoint and the
        # training state that a retry resumes from (written just after the LoRA file).
        def first_checkpoint() -> Path | None:
            saved = sorted(home.glob("artefacts/lora_checkpoints/*/*-000024.safetensors"))
            return next((p for p in saved if (p.parent / STATE_DIR_NAME / STATE_FILE_NAME).is_file()), None)

        checkpoint = wait_for("a first checkpoint", first_checkpoint, gpu_log, timeout=RUNS_WAIT_S)
        killed = kill_tree(gpu_worker)
        interrupted = checkpoint.parent.name
        assert not (checkpoint.parent / f"{interrupted}-000096.safetensors").exists(), "killed too late"
        start_worker("gpu2", GPU_QUEUE, 1, env, gpu_log, started)

        def both_finished() -> bool:
            runs = character_runs()
            return len(runs) == 2 and all(run.is_finished for run in runs)

        wait_for("both character runs to finish", both_finished, daemon_log, timeout=RUNS_WAIT_S)
        runs = {run.tags["dagster/partition"]: run for run in character_runs()}
        for key, run in runs.items():
            assert run.status == dg.DagsterRunStatus.SUCCESS, (key, gpu_log.read_text()[-3000:])

        host = socket.gethostname()
        for key, run in runs.items():
            placed = step_workers(instance, run.run_id)
            assert {step for step, _ in placed} == GPU_STEPS | DATA_STEPS
            for step, worker in placed:
                expected = {f"gpu@{host}", f"gpu2@{host}"} if step in GPU_STEPS else {f"cpu@{host}"}
                assert worker in expected, (key, step, worker)
            training = [worker for step, worker in placed if step == "lora_checkpoints"]
            if key == interrupted:
                # Started on the killed worker, finished on its replacement from the state
                # the first one saved.
                assert training == [f"gpu@{host}", f"gpu2@{host}"], training
                messages = [r.user_message for r in instance.all_logs(run.run_id) if r.step_key == "lora_checkpoints"]
                assert any("resuming the interrupted run" in m for m in messages), messages
            else:
                assert len(training) == 1
    assert len(killed) >= 2  # the worker and the child process executing the step

    for key in CHARACTERS:
        ours, theirs = stored_outputs(home, key), stored_outputs(reference, key)
        assert set(ours) == GPU_STEPS | DATA_STEPS
        assert set(ours) == set(theirs)
        for asset in ours:
            assert set(ours[asset]) == set(theirs[asset]), (key, asset)
            for path, digest in ours[asset].items():
                if digest == theirs[asset][path]:
                    continue
                # Only where and when the scrape fetched each file may differ.
                assert asset in {"raw_scrape", "matched_tags"} and path.endswith(".parquet"), (key, path)
                pd.testing.assert_frame_equal(
                    without_fetch_columns(home / path), without_fetch_columns(reference / path)
                )
