import dagster as dg

from lora_factory.engines import configured_executor

# LF_EXECUTOR: in_process (default), celery or k8s (lora_factory/engines.py).
executor = configured_executor()

# Every per-character asset, from scraping to the published release.
character_job = dg.define_asset_job(
    name="character_job",
    selection=dg.AssetSelection.groups("dataset", "training", "evaluation"),
    description="Build one character's LoRA end to end (one partition = one character).",
    # In-process by default: all stages run in the run worker, one after another, so a
    # run whose every stage is reused takes seconds instead of a process start and an
    # import of torch & co. per stage (measurements in run_health.py). Only the GPU steps
    # (`lora_checkpoints`, `recscore_table`) take a slot of the `gpu` pool, at op
    # granularity, so other characters' data stages run meanwhile. Records the run worker,
    # so run monitoring can fail the run if that process dies.
    executor_def=executor,
)

# The index as a table: the sensor runs it whenever the index file changes, so the
# `character_index` asset (and its data version) always tells what the file holds.
index_job = dg.define_asset_job(
    name="index_job",
    selection=dg.AssetSelection.groups("index"),
    description="Read the character index file into the `character_index` table.",
    executor_def=executor,
)

# One anime series: its episodes' figures, then their identity clusters. The sensor runs
# it when a series is new to the index or its episode files change; characters bound to
# a series wait for its clusters.
series_job = dg.define_asset_job(
    name="series_job",
    selection=dg.AssetSelection.groups("anime"),
    description="Find every figure in an anime series' episodes and cluster them by identity.",
    executor_def=executor,
)
