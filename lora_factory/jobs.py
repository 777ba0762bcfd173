import dagster as dg

# Every per-character asset, from scraping to the published release.
character_job = dg.define_asset_job(
    name="character_job",
    selection=dg.AssetSelection.groups("dataset", "training", "evaluation"),
    description="Build one character's LoRA end to end (one partition = one character).",
)
