"""Where the steps of a run execute: on one machine, on celery workers, or in Kubernetes pods.

`LF_EXECUTOR` picks the executor of every job (and of the UI's Materialize):
- `in_process` (the default): the run worker executes a character's steps one after
  another (`run_health.monitored_executor`); several characters run side by side as runs.
- `celery`: Dagster's `celery_executor`. Every step is a task on RabbitMQ, in queue `cpu`
  or `gpu` (its `dagster-celery/queue` tag), executed by `dagster-celery worker` processes
  on any machine that shares the instance (PostgreSQL) and the factory's home.
  The broker, backend and task settings are read from `LF_CELERY_CONFIG` (default: the
  `celery.yaml` next to this module), the same file the workers are started with.
- `k8s`: dagster-k8s's `k8s_job_executor`. Every step is a Kubernetes Job whose resources
  and node selector come from its `dagster-k8s/config` tag; with the official Helm chart
  (values in `helm-values.yaml` next to this module) and its `K8sRunLauncher`.

Every step carries both tags (`step_tags`); an executor reads the ones it knows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from lora_factory.run_health import monitored, monitored_executor

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
CELERY_QUEUE_TAG = "dagster-celery/queue"
K8S_CONFIG_TAG = "dagster-k8s/config"
DEFAULT_CELERY_CONFIG = Path(__file__).with_name("celery.yaml")
HELM_VALUES = Path(__file__).with_name("helm-values.yaml")

# ONNX Runtime runs the vision models on the GPU of the machine their step runs on, when
# it has one. LF_VISION_ON_GPU=1 places the vision steps (tag matching by looks, cleaning,
# captioning) like the GPU steps: on GPU workers or pods, holding a slot of pool `gpu`.
VISION_ON_GPU = os.environ.get("LF_VISION_ON_GPU") == "1"

# The node label a cluster's GPU node pool carries (set it when creating the pool, or
# change it here to the cloud's own label, e.g. `cloud.google.com/gke-accelerator`).
GPU_NODE_SELECTOR = {"lora-factory/node-pool": "gpu"}

# Pod sizes per kind of step, from what the steps use with the real models: a data step
# (scraping, cleaning with the ONNX detectors, tagger and CCIP, captions, buckets) peaks
# at a few GB; a GPU step holds the SD1.5 base model in RAM while it moves to the GPU.
_CPU_STEP_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "2", "memory": "6Gi"},
            "limits": {"memory": "12Gi"},
        }
    }
}
_GPU_STEP_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        }
    },
    "pod_spec_config": {
        "node_selector": GPU_NODE_SELECTOR,
        # GPU node pools are usually tainted so that only pods asking for a GPU land there.
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


def step_tags(gpu: bool) -> dict[str, Any]:
    """Op tags placing a step: its celery queue and its Kubernetes pod."""
    return {
        CELERY_QUEUE_TAG: GPU_QUEUE if gpu else CPU_QUEUE,
        K8S_CONFIG_TAG: _GPU_STEP_K8S_CONFIG if gpu else _CPU_STEP_K8S_CONFIG,
    }


def celery_config(path: str | Path | None = None) -> dict[str, Any]:
    """The celery executor config (broker, backend, config_source) of a worker config file."""
    path = Path(path or os.environ.get("LF_CELERY_CONFIG") or DEFAULT_CELERY_CONFIG)
    try:
        document = yaml.safe_load(path.read_text())
        return dict(document["execution"]["config"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a celery worker config (a yaml file with execution: config: "
            f"broker/backend/config_source): {error}"
        ) from error


def executor_named(name: str) -> dg.ExecutorDefinition:
    """The executor `LF_EXECUTOR=<name>` selects."""
    if name == "in_process":
        return monitored_executor
    if name == "celery":
        # Imported only when chosen: a one-machine deployment needs neither package.
        from dagster_celery import celery_executor

        return monitored(celery_executor, celery_config(), "celery_executor")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        # The K8sRunLauncher checks the health of its run pods itself.
        return k8s_job_executor
    raise ValueError(f"LF_EXECUTOR={name!r} is not an executor: use in_process, celery or k8s")


def configured_executor() -> dg.ExecutorDefinition:
    return executor_named(os.environ.get("LF_EXECUTOR") or "in_process")
