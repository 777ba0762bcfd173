"""character_index_sensor: add, change, remove, unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG
import pytest
import yaml

from lora_factory.resources import AnimeSeries, CharacterIndex, FactoryStorage
from lora_factory.sensors import character_index_sensor

ROWS = [
    {"key": "surtr_arknights", "display_name": "Surtr", "franchise": "arknights"},
    {"key": "yae_miko_genshin", "display_name": "Yae Miko", "franchise": "genshin_impact"},
]


def write_index(path: Path, rows: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"characters": rows}), encoding="utf-8")


@pytest.fixture()
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def evaluate(instance, index_path: Path, cursor: str | None, series: dict[str, str] | None = None):
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={
            "character_index": CharacterIndex(index_path=str(index_path)),
            "anime_series": AnimeSeries(series=series or {}),
            "storage": FactoryStorage(home=str(index_path.parent / "home")),
        },
    )
    result = character_index_sensor(context)
    if isinstance(result, dg.SensorResult) and result.skip_reason:
        return dg.SkipReason(result.skip_reason.skip_message)  # nothing to start (the cursor moved)
    if isinstance(result, dg.SensorResult):
        # A changed index always refreshes the `character_index` table first.
        if result.dynamic_partitions_requests or result.run_requests[0].job_name == "index_job":
            assert result.run_requests[0].job_name == "index_job"
            result = dg.SensorResult(
                run_requests=result.run_requests[1:],
                dynamic_partitions_requests=result.dynamic_partitions_requests,
                cursor=result.cursor,
            )
        for request in result.dynamic_partitions_requests or []:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
            else:
                for key in request.partition_keys:
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def partitions(instance) -> list[str]:
    return sorted(instance.get_dynamic_partitions("characters"))


def test_new_index_adds_partitions_and_requests_a_run_per_row(instance, tmp_path):
    index = tmp_path / "index.yaml"
    write_index(index, ROWS)
    result = evaluate(instance, index, cursor=None)
    assert partitions(instance) == ["surtr_arknights", "yae_miko_genshin"]
    keys = sorted(request.partition_key for request in result.run_requests)
    assert keys == ["surtr_arknights", "yae_miko_genshin"]
    run_keys = {request.run_key for request in result.run_requests}
    assert all(run_key.split(":")[0] in keys for run_key in run_keys)


def test_unchanged_index_does_nothing(instance, tmp_path):
    index = tmp_path / "index.yaml"
    write_index(index, ROWS)
    first = evaluate(instance, index, cursor=None)
    second = evaluate(instance, index, cursor=first.cursor)
    assert isinstance(second, dg.SkipReason)
    assert "unchanged" in second.skip_message


def test_edited_row_reruns_only_that_row_with_a_new_run_key(instance, tmp_path):
    index = tmp_path / "index.yaml"
    write_index(index, ROWS)
    first = evaluate(instance, index, cursor=None)
    old_run_key = next(r.run_key for r in first.run_requests if r.partition_key == "surtr_arknights")
    edited = [dict(ROWS[0], names=["スルト"]), ROWS[1]]
    write_index(index, edited)
    second = evaluate(instance, index, cursor=first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["surtr_arknights"]
    assert second.run_requests[0].run_key != old_run_key
    assert not second.dynamic_partitions_requests
    # Reformatting the file without changing any row changes nothing.
    index.write_text(yaml.safe_dump({"characters": edited}, indent=4), encoding="utf-8")
    assert isinstance(evaluate(instance, index, cursor=second.cursor), dg.SkipReason)


def test_removed_or_disabled_row_removes_the_partition_only(instance, tmp_path):
    index = tmp_path / "index.yaml"
    write_index(index, ROWS)
    first = evaluate(instance, index, cursor=None)
    write_index(index, [ROWS[0], dict(ROWS[1], enabled=False)])
    second = evaluate(instance, index, cursor=first.cursor)
    assert partitions(instance) == ["surtr_arknights"]
    assert second.run_requests == []


def test_invalid_index_fails_with_the_row_and_the_fix(instance, tmp_path):
    index = tmp_path / "index.yaml"
    write_index(index, [{"key": "Bad Key", "display_name": "X", "franchise": "y"}])
    with pytest.raises(ValueError, match=r"row 1: key 'Bad Key' must be a lowercase slug"):
        evaluate(instance, index, cursor=None)


def test_unchanged_file_is_not_even_read(instance, tmp_path, monkeypatch):
    index = tmp_path / "index.yaml"
    write_index(index, ROWS)
    first = evaluate(instance, index, cursor=None)

    def no_read(*args, **kwargs):
        raise AssertionError("an unchanged index must cost a stat, not a read")

    monkeypatch.setattr("lora_factory.resources.index.read_index", no_read)
    assert isinstance(evaluate(instance, index, cursor=first.cursor), dg.SkipReason)


def test_many_new_rows_add_every_partition_and_request_runs_in_batches(instance, tmp_path, monkeypatch):
    # The package re-exports the sensor under its module's name: patch the module itself.
    monkeypatch.setattr(sys.modules["lora_factory.sensors.character_index_sensor"], "RUNS_PER_TICK", 2)
    rows = [{"key": f"char_{n}", "display_name": f"Char {n}", "franchise": "demo"} for n in range(5)]
    index = tmp_path / "index.yaml"
    write_index(index, rows)
    requested, cursor = [], None
    for _ in range(3):
        result = evaluate(instance, index, cursor=cursor)
        requested += [request.partition_key for request in result.run_requests]
        cursor = result.cursor
        assert len(partitions(instance)) == 5  # all partitions from the first tick on
    assert requested == [f"char_{n}" for n in range(5)]
    assert isinstance(evaluate(instance, index, cursor=cursor), dg.SkipReason)


def test_anime_series_run_first_and_their_characters_after_them(instance, tmp_path):
    episodes = tmp_path / "episodes"
    episodes.mkdir()
    (episodes / "ep01.mkv").write_bytes(b"one")
    rows = [{**ROWS[0], "anime_series": ["arknights_tv"]}, ROWS[1]]
    write_index(tmp_path / "index.yaml", rows)
    series = {"arknights_tv": str(episodes)}

    first = evaluate(instance, tmp_path / "index.yaml", None, series)
    # The series is a partition with a run; the row that names it waits for its clusters.
    assert sorted(instance.get_dynamic_partitions("series")) == ["arknights_tv"]
    assert [(r.job_name, r.partition_key) for r in first.run_requests] == [
        ("series_job", "arknights_tv"), ("character_job", "yae_miko_genshin"),
    ]  # fmt: skip
    assert isinstance(evaluate(instance, tmp_path / "index.yaml", first.cursor, series), dg.SkipReason)

    series_run = first.run_requests[0]
    instance.add_run(dg.DagsterRun(job_name="series_job", run_id="a" * 36, status=dg.DagsterRunStatus.FAILURE,
                                   tags={RUN_KEY_TAG: series_run.run_key}))  # fmt: skip
    assert isinstance(evaluate(instance, tmp_path / "index.yaml", first.cursor, series), dg.SkipReason)
    instance.add_run(dg.DagsterRun(job_name="series_job", run_id="b" * 36, status=dg.DagsterRunStatus.SUCCESS,
                                   tags={RUN_KEY_TAG: series_run.run_key}))  # fmt: skip
    built = evaluate(instance, tmp_path / "index.yaml", first.cursor, series)
    assert [(r.job_name, r.partition_key) for r in built.run_requests] == [("character_job", "surtr_arknights")]
    assert isinstance(evaluate(instance, tmp_path / "index.yaml", built.cursor, series), dg.SkipReason)

    # A new episode: the series runs again, then its character (a new run key).
    (episodes / "ep02.mkv").write_bytes(b"two")
    changed = evaluate(instance, tmp_path / "index.yaml", built.cursor, series)
    assert [(r.job_name, r.partition_key) for r in changed.run_requests] == [("series_job", "arknights_tv")]
    instance.add_run(dg.DagsterRun(job_name="series_job", run_id="c" * 36, status=dg.DagsterRunStatus.SUCCESS,
                                   tags={RUN_KEY_TAG: changed.run_requests[0].run_key}))  # fmt: skip
    again = evaluate(instance, tmp_path / "index.yaml", changed.cursor, series)
    assert [(r.job_name, r.partition_key) for r in again.run_requests] == [("character_job", "surtr_arknights")]
    assert again.run_requests[0].run_key != built.run_requests[0].run_key
