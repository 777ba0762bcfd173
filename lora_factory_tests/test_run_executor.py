"""The factory's executor: in-process by default, recording its run worker, returning GPU
memory after each step (see `monitored_executor` in lora_factory/run_health.py)."""

from __future__ import annotations

import os
import shutil
import sys
from types import SimpleNamespace

import dagster as dg

from lora_factory.definitions import defs
from lora_factory.demo.run import EMBEDDED_INSTANCE
from lora_factory.jobs import character_job, index_job
from lora_factory.run_health import RunWorker, monitored_executor, release_cached_gpu_memory


def test_every_job_runs_in_process_by_default():
    assert character_job.executor_def is monitored_executor
    assert index_job.executor_def is monitored_executor
    # The UI's Materialize and asset backfills run the implicit asset job.
    assert defs.resolve_implicit_global_asset_job_def().executor_def is monitored_executor
    assert monitored_executor.config_schema.as_field().default_value == {"in_process": {}}


def test_only_the_gpu_stages_hold_the_gpu_pool():
    job = defs.resolve_job_def("character_job")
    pools = {node.name: node.definition.pool for node in job.graph.nodes}
    assert {name for name, pool in pools.items() if pool} == {"lora_checkpoints", "recscore_table"}
    assert set(pools.values()) == {None, "gpu"}


@dg.asset
def data_step() -> None:
    pass


@dg.asset(deps=[data_step], pool="gpu")
def gpu_step() -> None:
    pass


two_steps = dg.define_asset_job("two_steps", [data_step, gpu_step], executor_def=monitored_executor)
two_steps_defs = dg.Definitions(assets=[data_step, gpu_step], jobs=[two_steps])


def resolved_two_steps() -> dg.JobDefinition:
    return two_steps_defs.resolve_job_def("two_steps")


def test_in_process_run_records_its_worker_and_returns_gpu_memory(tmp_path, monkeypatch):
    shutil.copy(EMBEDDED_INSTANCE, tmp_path / "dagster.yaml")  # `gpu` at op granularity
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        # A torch whose CUDA is in use: each release notes who holds the `gpu` slot then.
        released_while_held_by = []

        def empty_cache():
            info = instance.event_log_storage.get_concurrency_info("gpu")
            released_while_held_by.append(info.active_run_ids)

        cuda = SimpleNamespace(is_initialized=lambda: True, empty_cache=empty_cache)
        monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))

        result = dg.execute_job(dg.reconstructable(resolved_two_steps), instance=instance)
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        # In process: the run worker is this very process.
        assert RunWorker.of(run).pid == os.getpid()
        # Once per step; the GPU step's memory went back before its slot did.
        assert released_while_held_by == [set(), {result.run_id}]
        assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0


def test_gpu_memory_release_leaves_torch_alone_where_cuda_is_unused(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert release_cached_gpu_memory() is False
    assert "torch" not in sys.modules  # nothing imported it
    cuda = SimpleNamespace(is_initialized=lambda: False, empty_cache=lambda: 1 / 0)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert release_cached_gpu_memory() is False
