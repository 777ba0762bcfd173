"""The Kubernetes deployment (lora_factory/helm-values.yaml and the steps' `dagster-k8s/config`
tags) against dagster-k8s's and Dagster's own config schemas, and the Jobs dagster-k8s
builds from them. There is no cluster here: this proves the config is valid and places
every step, not that pods start."""

from __future__ import annotations

import importlib
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from lora_factory.definitions import defs
from lora_factory.engines import GPU_NODE_SELECTOR, HELM_VALUES, executor_named

REPO_ROOT = Path(__file__).resolve().parents[1]
VALUES = yaml.safe_load(HELM_VALUES.read_text())
GPU_STEPS = {"lora_checkpoints", "recscore_table"}


def rendered_launcher_config(values: dict) -> dict:
    """The K8sRunLauncher config the chart writes into the instance's dagster.yaml."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    return {
        "instance_config_map": "lora-factory-instance",  # the chart's own ConfigMap
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "load_incluster_config": launcher["loadInclusterConfig"],
        "image_pull_policy": launcher["imagePullPolicy"],
        "env_config_maps": launcher["envConfigMaps"],
        "env_secrets": launcher["envSecrets"],
        "env_vars": launcher["envVars"],
        "volumes": launcher["volumes"],
        "volume_mounts": launcher["volumeMounts"],
        "run_k8s_config": {"container_config": launcher["runK8sConfig"]["containerConfig"]},
    }


def rendered_instance_rules(values: dict) -> dict:
    """The queue, pools, monitoring and retry blocks the chart writes into dagster.yaml."""
    daemon = values["dagsterDaemon"]
    concurrency = values["concurrency"]
    return {
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "dequeue_interval_seconds": daemon["runCoordinator"]["config"]["queuedRunCoordinator"][
                    "dequeueIntervalSeconds"
                ]
            },
        },
        "concurrency": {
            "pools": {
                "granularity": concurrency["pools"]["granularity"],
                "default_limit": concurrency["pools"]["defaultLimit"],
            },
            "runs": {
                "max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"],
            },
        },
        "run_monitoring": {
            "enabled": daemon["runMonitoring"]["enabled"],
            "start_timeout_seconds": daemon["runMonitoring"]["startTimeoutSeconds"],
            "poll_interval_seconds": daemon["runMonitoring"]["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"],
        },
        "run_retries": {
            "enabled": daemon["runRetries"]["enabled"],
            "max_retries": daemon["runRetries"]["maxRetries"],
            "retry_on_asset_or_op_failure": daemon["runRetries"]["retryOnAssetOrOpFailure"],
        },
    }


def test_run_launcher_config_is_valid_for_dagster_k8s():
    assert VALUES["runLauncher"]["type"] == "K8sRunLauncher"
    result = validate_config(K8sRunLauncher.config_type(), rendered_launcher_config(VALUES))
    assert result.success, [error.message for error in result.errors]


def test_a_misspelt_launcher_key_is_caught():
    # The check above can fail: dagster-k8s rejects what it does not know.
    config = rendered_launcher_config(VALUES)
    config["volume_mount"] = config.pop("volume_mounts")
    assert not validate_config(K8sRunLauncher.config_type(), config).success


def test_cluster_instance_keeps_the_one_machine_rules():
    rules = rendered_instance_rules(VALUES)
    result = validate_config(dagster_instance_config_schema(), rules)
    assert result.success, [error.message for error in result.errors]
    one_machine = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    # Same behaviour, sized for a cluster: op-granularity GPU pool, one run per character,
    # dead runs failed and retried.
    assert rules["concurrency"]["pools"]["granularity"] == one_machine["concurrency"]["pools"]["granularity"] == "op"
    assert (
        rules["concurrency"]["runs"]["tag_concurrency_limits"]
        == one_machine["concurrency"]["runs"]["tag_concurrency_limits"]
    )
    assert rules["run_retries"] == one_machine["run_retries"]
    for key in ("enabled", "start_timeout_seconds", "free_slots_after_run_end_seconds"):
        assert rules["run_monitoring"][key] == one_machine["run_monitoring"][key]


def test_code_location_runs_steps_as_kubernetes_jobs():
    (deployment,) = VALUES["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert executor_named(env["LF_EXECUTOR"]) is k8s_job_executor
    assert env["LF_DEPLOYMENT"] == "production"
    assert env["LF_HOME"] == deployment["volumeMounts"][0]["mountPath"]
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("--module-name") + 1]
    assert isinstance(importlib.import_module(module).defs, dg.Definitions)
    assert validate_config(k8s_job_executor.config_schema.config_type, {}).success


def step_job(tags: dict):
    """The Kubernetes Job dagster-k8s builds for a step with these op tags."""
    job_config = DagsterK8sJobConfig(
        job_image="registry.example.com/lora-factory:0.1.0",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="lora-factory-instance",
    )
    return construct_dagster_k8s_job(
        job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        user_defined_k8s_config=get_user_defined_k8s_config(tags),
    )


STEP_TAGS = {node.name: node.tags for node in defs.resolve_job_def("character_job").graph.node_defs}


@pytest.mark.parametrize("step", sorted(STEP_TAGS))
def test_each_step_gets_its_pod(step):
    pod = step_job(STEP_TAGS[step]).spec.template.spec
    resources = pod.containers[0].resources
    assert resources.requests["cpu"] and resources.limits["memory"]
    if step in GPU_STEPS:
        assert resources.limits["nvidia.com/gpu"] == "1"
        assert pod.node_selector == GPU_NODE_SELECTOR
        assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
    else:
        assert "nvidia.com/gpu" not in resources.limits
        assert not pod.node_selector
