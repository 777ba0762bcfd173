"""Keeps the `characters` partitions in step with the index file and starts runs.

The cursor holds the index file's signature (size, modification time, sha256), the hash
of the enabled rows and the hash of every row, so that only new or edited rows get a run,
and an unchanged file costs one stat per tick. A changed index also gets a run of
`index_job`, so the `character_index` asset stays true to the file. The run key is the
character key plus its row hash: Dagster never launches the same run key twice, so a row
edited back and forth does not re-run a version it already built.

A first tick over thousands of new rows adds every partition at once but requests runs
in batches of `RUNS_PER_TICK`; the rest wait in the cursor for the next ticks, so the
run queue is fed at a pace it absorbs.

Anime series: the series the enabled rows name (`anime_series`) are the `series`
partitions. A series new to the index, or whose episode files changed (names, sizes,
modification times; a stat per file and tick), gets a run of `series_job`, and the rows
that name it run again after it: a row waits in the cursor until the run of every series
it names, for the episode files as they are now, has succeeded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG

from lora_factory.index.character_index import index_hash
from lora_factory.jobs import character_job, index_job, series_job
from lora_factory.partitions import characters_partitions, series_partitions
from lora_factory.resources import AnimeSeries, CharacterIndex, FactoryStorage

RUNS_PER_TICK = 200  # 10,000 new characters: 50 ticks, 25 minutes at one tick per 30 s


@dataclass
class IndexCursor:
    signature: tuple[int, int] | None = None  # the file's size and modification time
    file_sha256: str | None = None
    index_hash: str | None = None  # of the enabled rows
    rows: dict[str, str] = field(default_factory=dict)  # key -> row hash, enabled rows
    pending: list[str] = field(default_factory=list)  # keys whose run is still to request
    series: dict[str, str] = field(default_factory=dict)  # series -> listing of its episode files

    @classmethod
    def parse(cls, cursor: str | None) -> IndexCursor:
        if not cursor:
            return cls()
        state = json.loads(cursor)
        signature = state.get("signature")
        return cls(
            signature=tuple(signature) if signature else None,
            file_sha256=state.get("file_sha256"),
            index_hash=state.get("index_hash"),
            rows=state.get("rows", {}),
            pending=state.get("pending", []),
            series=state.get("series", {}),
        )

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dg.sensor(
    jobs=[character_job, index_job, series_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Adds/removes `characters` and `series` partitions from the index and runs new or edited "
        "rows, and anime series whose episodes changed (their characters after them)."
    ),
)
def character_index_sensor(
    context: dg.SensorEvaluationContext,
    character_index: CharacterIndex,
    anime_series: AnimeSeries,
    storage: FactoryStorage,
) -> dg.SensorResult | dg.SkipReason:
    state = IndexCursor.parse(context.cursor)
    store = storage.store()
    listings = {name: anime_series.listing(name, store) for name in state.series}
    if not state.pending and state.signature == character_index.signature() and listings == state.series:
        return dg.SkipReason(f"character index unchanged ({len(state.rows)} enabled characters)")

    snapshot = character_index.snapshot()
    rows = snapshot.enabled_rows()
    current_hash = index_hash(rows)
    index_changed = current_hash != state.index_hash
    runs: list[dg.RunRequest] = []
    partition_requests = []
    if index_changed:
        row_hashes = {row.key: row.content_hash() for row in rows}
        existing = set(context.instance.get_dynamic_partitions(characters_partitions.name))
        to_add = sorted(set(row_hashes) - existing)
        to_remove = sorted(existing - set(row_hashes))
        changed = [key for key, digest in row_hashes.items() if state.rows.get(key) != digest]
        if to_add:
            partition_requests.append(characters_partitions.build_add_request(to_add))
        if to_remove:
            # Only the partition goes: everything already built for it stays on disk.
            partition_requests.append(characters_partitions.build_delete_request(to_remove))
        context.log.info(
            f"index {current_hash}: {len(to_add)} new, {len(changed)} new or edited, "
            f"{len(to_remove)} removed"
        )
        pending = list(dict.fromkeys(key for key in (*state.pending, *changed) if key in row_hashes))
        runs.append(dg.RunRequest(job_name=index_job.name, run_key=f"index:{current_hash}"))
    else:
        row_hashes, pending = state.rows, state.pending

    # Anime series: partitions, runs of new or changed series, and their characters after them.
    series_of = {row.key: row.anime_series for row in rows if row.anime_series}
    named = sorted({name for names in series_of.values() for name in names})
    listings = {name: listings.get(name) or anime_series.listing(name, store) for name in named}
    existing_series = set(context.instance.get_dynamic_partitions(series_partitions.name))
    if set(named) - existing_series:
        partition_requests.append(series_partitions.build_add_request(sorted(set(named) - existing_series)))
    if existing_series - set(named):
        partition_requests.append(series_partitions.build_delete_request(sorted(existing_series - set(named))))
    changed_series = [name for name in named if state.series.get(name) != listings[name]]
    runs += [
        dg.RunRequest(job_name=series_job.name, partition_key=name, run_key=_series_run_key(name, listings[name]))
        for name in changed_series
    ]
    again = [key for key, names in series_of.items() if set(names) & set(changed_series)]
    pending = list(dict.fromkeys([*pending, *again]))
    built = {name: _series_built(context.instance, _series_run_key(name, listings[name])) for name in named}
    ready = [key for key in pending if all(built[name] for name in series_of.get(key, ()))]
    waiting = [key for key in pending if key not in ready]
    if waiting:
        context.log.info(f"{len(waiting)} characters wait for the clusters of their anime series")
    batch, pending = ready[:RUNS_PER_TICK], ready[RUNS_PER_TICK:] + waiting
    runs += [
        dg.RunRequest(
            job_name=character_job.name,
            partition_key=key,
            run_key=":".join([key, row_hashes[key], *(listings[name] for name in series_of.get(key, ()))]),
            tags={"lora_factory/row_hash": row_hashes[key]},
        )
        for key in batch
    ]
    if len(pending) > len(waiting):
        context.log.info(f"{len(batch)} runs requested, {len(pending) - len(waiting)} more on the next ticks")
    cursor = IndexCursor(
        snapshot.signature, snapshot.sha256, current_hash, row_hashes, pending, listings
    ).dumps()
    if not runs and not partition_requests:
        # Touched or reformatted, same rows: remember the new signature, start nothing.
        return dg.SensorResult(skip_reason=f"character index rows unchanged ({len(rows)} enabled)", cursor=cursor)
    return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=partition_requests, cursor=cursor)


def _series_run_key(series: str, listing: str) -> str:
    return f"series:{series}:{listing}"


def _series_built(instance: dg.DagsterInstance, run_key: str) -> bool:
    """Whether the series run for these episode files has succeeded."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return bool(runs) and runs[0].status == dg.DagsterRunStatus.SUCCESS
