"""A tiny code location for test_gpu_pool.py: a character's chain in miniature.

`data_stage` (no pool) -> `training` (pool `gpu`) -> `previews` (pool `gpu`), partitioned
like the factory, in `monitored_executor` (the factory's executor). A sensor requests a
run of `first`, a run of `second` and a second run of `first`.

The steps shake hands through flag files in $GPU_POOL_TEST_FLAGS, so that the test does
not hang on timing: `second`'s data stage ends only once a GPU step of `first` has begun,
and the first run's `training` ends only once `second`'s data stage has begun and a step
of another run is waiting for the `gpu` slot. Each wait gives up after HANDSHAKE_S: where the steps
cannot run at the same time the runs still end, and the test says what did not overlap.
"""

import os
import time
from pathlib import Path

import dagster as dg

from lora_factory.run_health import monitored_executor

HANDSHAKE_S = 60.0
characters = dg.StaticPartitionsDefinition(["first", "second"])


def _flags() -> Path:
    return Path(os.environ["GPU_POOL_TEST_FLAGS"])


def _wait_until(condition) -> None:
    deadline = time.monotonic() + HANDSHAKE_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


@dg.asset(partitions_def=characters)
def data_stage(context: dg.AssetExecutionContext) -> None:
    (_flags() / f"data_started_{context.partition_key}").touch()
    if context.partition_key == "second":
        _wait_until((_flags() / "gpu_started_first").exists)


def _another_run_waits_for_the_gpu(context: dg.AssetExecutionContext) -> bool:
    info = context.instance.event_log_storage.get_concurrency_info("gpu")
    return bool(info.pending_run_ids - {context.run.run_id})


@dg.asset(partitions_def=characters, deps=[data_stage], pool="gpu")
def training(context: dg.AssetExecutionContext) -> None:
    (_flags() / f"gpu_started_{context.partition_key}").touch()
    if context.run.tags.get("dagster/run_key") == "first":
        _wait_until((_flags() / "data_started_second").exists)
        _wait_until(lambda: _another_run_waits_for_the_gpu(context))


@dg.asset(partitions_def=characters, deps=[training], pool="gpu")
def previews() -> None:
    time.sleep(0.3)


chain_job = dg.define_asset_job(
    "chain_job",
    selection=[data_stage, training, previews],
    partitions_def=characters,
    executor_def=monitored_executor,
)


@dg.sensor(job=chain_job, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def three_runs():
    # Run keys make these runs once, however often the sensor ticks.
    yield dg.RunRequest(run_key="first", partition_key="first")
    yield dg.RunRequest(run_key="second", partition_key="second")
    yield dg.RunRequest(run_key="first_again", partition_key="first")


defs = dg.Definitions(
    assets=[data_stage, training, previews], jobs=[chain_job], sensors=[three_runs]
)
