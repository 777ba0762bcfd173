"""The production instance config (repo-root dagster.yaml) against a real PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import psycopg2
from conftest import PG

from lora_factory.assets.index import character_index
from lora_factory.demo.deployment import DEMO_INDEX_PATH
from lora_factory.resources import CharacterIndex, FactoryStorage
from lora_factory.run_health import MonitoredRunLauncher

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_materialize_on_postgres_instance(scratch_database, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_PG_HOST", PG["host"])
    monkeypatch.setenv("DAGSTER_PG_PORT", str(PG["port"]))
    monkeypatch.setenv("DAGSTER_PG_USER", PG["user"])
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    monkeypatch.setenv("DAGSTER_PG_DB", scratch_database)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert isinstance(instance.run_launcher, MonitoredRunLauncher)
        assert instance.run_monitoring_enabled
        concurrency = instance.get_concurrency_config()
        run_queue = concurrency.run_queue_config
        assert run_queue.tag_concurrency_limits == [
            {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
        ]
        # Only the GPU steps hold the `gpu` pool (one slot per GPU); data stages of other
        # characters run meanwhile.
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.pool_config.default_pool_limit == 1
        assert run_queue.max_concurrent_runs == 6
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 120
        assert instance.event_log_storage.supports_global_concurrency_limits
        result = dg.materialize(
            [character_index],
            instance=instance,
            resources={
                "storage": FactoryStorage(home=str(tmp_path / "factory")),
                "character_index": CharacterIndex(index_path=str(DEMO_INDEX_PATH)),
            },
        )
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("character_index"))
        assert event is not None
        assert event.asset_materialization.metadata["characters"].value == 4

    # The runs really are in PostgreSQL, not in a local SQLite file.
    with psycopg2.connect(dbname=scratch_database, **PG) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            assert cursor.fetchone()[0] == 1
    assert not list(home.rglob("*.db"))
