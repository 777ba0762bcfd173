"""Choosing where steps run (`LF_EXECUTOR`) and how each step is placed."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest
from dagster._config import validate_config
from dagster_celery import celery_executor

from lora_factory.definitions import defs
from lora_factory.engines import (
    CELERY_QUEUE_TAG,
    DEFAULT_CELERY_CONFIG,
    celery_config,
    executor_named,
)
from lora_factory.run_health import monitored_executor


def test_in_process_is_the_default_and_unknown_names_are_refused():
    assert executor_named("in_process") is monitored_executor
    with pytest.raises(ValueError, match="use in_process, celery or k8s"):
        executor_named("dask")


def test_celery_executor_runs_with_the_workers_config():
    executor = executor_named("celery")
    default = executor.config_schema.as_field().default_value
    assert default == celery_config(DEFAULT_CELERY_CONFIG)
    assert validate_config(celery_executor.config_schema.config_type, default).success
    # A lost worker's step goes back to the queue instead of vanishing with it.
    assert default["config_source"]["task_acks_late"] is True
    assert default["config_source"]["task_reject_on_worker_lost"] is True


def test_a_bad_celery_config_file_names_itself(tmp_path, monkeypatch):
    bad = tmp_path / "celery.yaml"
    bad.write_text("broker: pyamqp://elsewhere//\n")  # missing execution: config:
    monkeypatch.setenv("LF_CELERY_CONFIG", str(bad))
    with pytest.raises(ValueError, match=f"{bad} is not a celery worker config"):
        executor_named("celery")


def test_gpu_steps_go_to_the_gpu_queue_and_pool():
    for job_name in ("character_job", "index_job"):
        for node in defs.resolve_job_def(job_name).graph.node_defs:
            assert isinstance(node, dg.OpDefinition)
            queue = node.tags[CELERY_QUEUE_TAG]
            assert queue == ("gpu" if node.pool == "gpu" else "cpu"), node.name
    gpu = {n.name for n in defs.resolve_job_def("character_job").graph.node_defs if n.pool == "gpu"}
    assert gpu == {"lora_checkpoints", "recscore_table"}


def test_vision_steps_can_be_placed_on_gpus():
    # Placement is read when the code location loads: load it in a fresh process.
    code = (
        "from lora_factory.definitions import defs\n"
        "nodes = defs.resolve_job_def('character_job').graph.node_defs\n"
        "print(sorted(n.name for n in nodes if n.pool == 'gpu' and n.tags['dagster-celery/queue'] == 'gpu'))\n"
    )
    env = {**os.environ, "LF_VISION_ON_GPU": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == str(
        ["anime_posts", "captions", "cleaned_crops", "lora_checkpoints", "matched_tags", "recscore_table"]
    )
