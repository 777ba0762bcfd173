import dagster as dg

from lora_factory.partitions import characters_partitions

# Every per-character asset, from scraping to the published release.
character_job = dg.define_asset_job(
    name="character_job",
    selection=dg.AssetSelection.groups("dataset", "training", "evaluation"),
    partitions_def=characters_partitions,
    description="Build one character's LoRA end to end (one partition = one character).",
)
