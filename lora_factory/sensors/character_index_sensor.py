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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import dagster as dg

from lora_factory.index.character_index import index_hash
from lora_factory.jobs import character_job, index_job
from lora_factory.partitions import characters_partitions
from lora_factory.resources import CharacterIndex

RUNS_PER_TICK = 200  # 10,000 new characters: 50 ticks, 25 minutes at one tick per 30 s


@dataclass
class IndexCursor:
    signature: tuple[int, int] | None = None  # the file's size and modification time
    file_sha256: str | None = None
    index_hash: str | None = None  # of the enabled rows
    rows: dict[str, str] = field(default_factory=dict)  # key -> row hash, enabled rows
    pending: list[str] = field(default_factory=list)  # keys whose run is still to request

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
        )

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dg.sensor(
    jobs=[character_job, index_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Adds/removes `characters` partitions from the index and runs new or edited rows.",
)
def character_index_sensor(
    context: dg.SensorEvaluationContext, character_index: CharacterIndex
) -> dg.SensorResult | dg.SkipReason:
    state = IndexCursor.parse(context.cursor)
    if not state.pending and state.signature == character_index.signature():
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
    batch, pending = pending[:RUNS_PER_TICK], pending[RUNS_PER_TICK:]
    runs += [
        dg.RunRequest(
            job_name=character_job.name,
            partition_key=key,
            run_key=f"{key}:{row_hashes[key]}",
            tags={"lora_factory/row_hash": row_hashes[key]},
        )
        for key in batch
    ]
    if pending:
        context.log.info(f"{len(batch)} runs requested, {len(pending)} more on the next ticks")
    cursor = IndexCursor(snapshot.signature, snapshot.sha256, current_hash, row_hashes, pending).dumps()
    if not runs and not partition_requests:
        # Touched or reformatted, same rows: remember the new signature, start nothing.
        return dg.SensorResult(skip_reason=f"character index rows unchanged ({len(rows)} enabled)", cursor=cursor)
    return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=partition_requests, cursor=cursor)
