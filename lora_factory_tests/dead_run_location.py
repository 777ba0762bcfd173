"""A tiny code location for test_dead_runs.py: one `gpu`-pool asset, two runs from a sensor."""

import time

import dagster as dg

from lora_factory.run_health import monitored_executor


@dg.asset(pool="gpu")
def gpu_step(context: dg.AssetExecutionContext) -> None:
    # The held run keeps the `gpu` pool until the test kills it.
    while context.run.tags.get("hold") == "yes":
        time.sleep(0.2)


tiny_job = dg.define_asset_job("tiny_job", selection=[gpu_step], executor_def=monitored_executor)


@dg.sensor(job=tiny_job, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def two_runs():
    # Run keys make these two runs once, however often the sensor ticks.
    yield dg.RunRequest(run_key="held", tags={"hold": "yes"})
    yield dg.RunRequest(run_key="queued")


defs = dg.Definitions(assets=[gpu_step], jobs=[tiny_job], sensors=[two_runs])
