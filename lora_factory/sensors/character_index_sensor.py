"""Keeps the `characters` partitions in step with the index file and starts runs.

The cursor holds the hash of the whole index (nothing to do when it is unchanged) and
the hash of every row, so that only new or edited rows get a run. A changed index also
gets a run of `index_job`, so the `character_index` asset stays true to the file. The run key is the
character key plus its row hash: Dagster never launches the same run key twice, so a
row edited back and forth does not re-run a version it already built.
"""

from __future__ import annotations

import json

import dagster as dg

from lora_factory.index.character_index import index_hash
from lora_factory.jobs import character_job, index_job
from lora_factory.partitions import characters_partitions
from lora_factory.resources import CharacterIndex


def _read_cursor(cursor: str | None) -> tuple[str | None, dict[str, str]]:
    if not cursor:
        return None, {}
    state = json.loads(cursor)
    return state["index_hash"], state["rows"]


@dg.sensor(
    jobs=[character_job, index_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Adds/removes `characters` partitions from the index and runs new or edited rows.",
)
def character_index_sensor(
    context: dg.SensorEvaluationContext, character_index: CharacterIndex
) -> dg.SensorResult | dg.SkipReason:
    rows = character_index.enabled_rows()
    current_hash = index_hash(rows)
    previous_hash, previous_rows = _read_cursor(context.cursor)
    if current_hash == previous_hash:
        return dg.SkipReason(f"character index unchanged ({len(rows)} enabled characters)")

    row_hashes = {row.key: row.content_hash() for row in rows}
    existing = set(context.instance.get_dynamic_partitions(characters_partitions.name))
    to_add = sorted(set(row_hashes) - existing)
    to_remove = sorted(existing - set(row_hashes))
    changed = [key for key, digest in row_hashes.items() if previous_rows.get(key) != digest]

    partition_requests = []
    if to_add:
        partition_requests.append(characters_partitions.build_add_request(to_add))
    if to_remove:
        # Only the partition goes: everything already built for it stays on disk.
        partition_requests.append(characters_partitions.build_delete_request(to_remove))
    context.log.info(
        f"index {current_hash}: {len(to_add)} new, {len(changed)} new or edited, "
        f"{len(to_remove)} removed"
    )
    character_runs = [
        dg.RunRequest(
            job_name=character_job.name,
            partition_key=key,
            run_key=f"{key}:{row_hashes[key]}",
            tags={"lora_factory/row_hash": row_hashes[key]},
        )
        for key in changed
    ]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(job_name=index_job.name, run_key=f"index:{current_hash}"), *character_runs],
        dynamic_partitions_requests=partition_requests,
        cursor=json.dumps({"index_hash": current_hash, "rows": row_hashes}, sort_keys=True),
    )
