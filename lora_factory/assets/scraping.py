"""raw_scrape and matched_tags: from the character's names to the posts that are really them."""

import dagster as dg
import pandas as pd

from lora_factory.assets.index import character_index
from lora_factory.assets.metadata import table_entries, table_metadata, text_entry
from lora_factory.assets.stage import AssetFiles, Stage, character_asset
from lora_factory.engines import VISION_ON_GPU
from lora_factory.matching.tag_matching import match_character, surviving_posts
from lora_factory.matching.visual import (
    VISUAL_SAMPLE_SIZE,
    VisualCheck,
    embed_reference_images,
    manifest_sampler,
)
from lora_factory.provenance import frame_hash
from lora_factory.resources import (
    CharacterIndex,
    FactoryStorage,
    ImageSites,
    VisionModelsResource,
)
from lora_factory.sources.scrape import find_and_scrape
from lora_factory.storage import read_table, sha256_file, write_table

# Columns that identify what was scraped (not where from: the demo booru's port changes).
MANIFEST_IDENTITY = ["site", "post_id", "candidate_tag", "sha256"]


class RawScrapeFiles(AssetFiles):
    """raw_scrape's tables: the manifest (one row per site, post and candidate tag) and the
    candidate tags found per site. The images themselves are blobs, by the manifest's sha256."""

    asset = "raw_scrape"

    def manifest(self) -> pd.DataFrame:
        return self.read_table()

    def candidates(self) -> pd.DataFrame:
        return self.read_table("candidates")


class MatchedTagsFiles(AssetFiles):
    """matched_tags' tables: the decision per candidate tag, and the posts that survive."""

    asset = "matched_tags"

    def posts(self) -> pd.DataFrame:
        return self.read_table("posts")


@character_asset(
    group_name="dataset",
    code_version="2",
    deps=[character_index],
    description=(
        "Posts found on each enabled site for the character's candidate tags (tag search "
        "over every name in the index): images stored once by sha256, and a Parquet "
        "manifest (site, post id, url, md5, size, rating, site tags, candidate tag). "
        "Incremental: a re-run downloads only posts it does not hold."
    ),
)
def raw_scrape(
    context: dg.AssetExecutionContext,
    storage: FactoryStorage,
    character_index: CharacterIndex,
    image_sites: ImageSites,
) -> dg.MaterializeResult:
    stage = Stage(context, storage, RawScrapeFiles, reusable=False)
    row = character_index.row(stage.key)
    clients, skipped_sites = image_sites.build()
    for message in skipped_sites:
        context.log.warning(message)
    result = find_and_scrape(
        stage.key,
        row.all_names,
        clients,
        stage.store.blobs,
        stage.files.table_path(),
        franchise=row.franchise,
        site_tags=row.site_tags,
        max_posts_per_tag=image_sites.max_posts_per_tag,
        log=context.log.info,
    )
    counts, manifest, candidates = result.counts, result.manifest, result.candidates
    if counts.repaired:
        context.log.warning(f"{stage.key}: {counts.repaired} damaged or missing images downloaded again")
    stage.finish(
        frame_hash(manifest, MANIFEST_IDENTITY) + frame_hash(candidates),
        {"posts": len(manifest), "new": counts.new_posts},
    )
    return stage.result(
        {
            "dagster/row_count": len(manifest),
            "images": int(manifest["sha256"].nunique()),
            "new_posts": counts.new_posts,
            "reused_posts": counts.reused_posts,
            "failed_downloads": counts.failed,
            "skipped_animated": counts.animated_skipped,
            "skipped_over_pixel_cap": counts.oversize_skipped,
            "downloaded_mb": round(counts.downloaded_bytes / 2**20, 2),
            "repaired_images": counts.repaired,
            "site_errors": dg.MetadataValue.md("\n".join(f"- {e}" for e in result.site_errors) or "none"),
            "skipped_sites": dg.MetadataValue.md("\n".join(f"- {m}" for m in skipped_sites) or "none"),
            # The other counts are summed above; every column is in the scrape's log.
            "per_tag": table_metadata(
                result.per_tag[["site", "candidate_tag", "posts", "new_posts", "reused_posts", "failed", "pages",
                                "stop_reason"]],
                rename={"new_posts": "new", "reused_posts": "reused", "stop_reason": "stopped"},
            ),
            "candidates": table_metadata(candidates, first=["site", "tag", "post_count"]),
            "manifest_sample": table_metadata(
                manifest[["site", "post_id", "candidate_tag", "rating", "width", "height", "error", "sha256"]],
                max_rows=10,
            ),
            "manifest_path": dg.MetadataValue.path(stage.files.relative(stage.files.table_path())),
        }
    )


class MatchingSettings(dg.Config):
    """Visual evidence for tag matching (thresholds: lora_factory.matching.visual)."""

    visual_evidence: bool = True  # embed a sample of each candidate's solo pictures
    visual_sample_size: int = VISUAL_SAMPLE_SIZE


@character_asset(
    gpu=VISION_ON_GPU,
    group_name="dataset",
    code_version="3",
    deps=[raw_scrape, character_index],
    description=(
        "For each site, which candidate tag really is this character: name similarity, "
        "franchise co-occurrence in the posts, post count and visual consistency (identity "
        "embeddings of a sample of solo pictures against the index's reference images or "
        "the dominant look across sites) as evidence, an outcome (trusted / likely / "
        "uncertain / rejected) and a confidence; a name that collides with another "
        "franchise's character is rejected. Index overrides (site_tags, banned_tags) win. "
        "Keeps the posts that survive."
    ),
)
def matched_tags(
    context: dg.AssetExecutionContext,
    config: MatchingSettings,
    storage: FactoryStorage,
    character_index: CharacterIndex,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    row = character_index.row(context.partition_key)
    reference_paths = character_index.reference_paths(row)
    extra = {"row": row.content_hash()}
    if config.visual_evidence:
        extra["identity_model"] = vision_models.versions(storage.store(), ("identity",))
        extra["reference_images"] = [sha256_file(p) if p.is_file() else str(p) for p in reference_paths]
    stage = Stage(context, storage, MatchedTagsFiles, config, reads=(RawScrapeFiles,), extra=extra)
    table_path = stage.files.table_path()
    posts_path = stage.files.table_path("posts")
    if stage.needs_build():
        scraped = stage.read(RawScrapeFiles)
        manifest = scraped.manifest()
        candidates = scraped.candidates()
        visual = None
        if config.visual_evidence:
            identity = vision_models.load_identity(stage.store)
            visual = VisualCheck(
                identity,
                manifest_sampler(manifest, stage.store.blobs.get, identity.embed, config.visual_sample_size),
                embed_reference_images(reference_paths, identity.embed, stage.key),
            )
        match = match_character(
            stage.key,
            row.display_name,
            row.names,
            row.franchise,
            candidates,
            manifest,
            forced_tags=row.site_tags,
            banned_tags=row.banned_tags,
            visual=visual,
        )
        if not match.chosen:
            raise RuntimeError(
                f"{stage.key}: no candidate tag was trusted on any site:\n"
                + match.table[["site", "tag", "outcome", "evidence"]].to_string(index=False)
                + "\nForce the right tag with site_tags: {<site>: <tag>} in the index row."
            )
        posts = surviving_posts(manifest, match.chosen)
        write_table(match.table, table_path)
        write_table(posts, posts_path)
        stage.finish(frame_hash(posts, MANIFEST_IDENTITY), {"posts": len(posts)})
    table = read_table(table_path)
    posts = read_table(posts_path)
    chosen = table[table["chosen"]]
    for record in table.itertuples(index=False):
        context.log.info(f"{record.site} {record.tag}: {record.outcome} — {record.evidence}")
    return stage.result(
        {
            "dagster/row_count": len(posts),
            "chosen_tags": dg.MetadataValue.md(
                "\n".join(
                    f"- **{r.site}**: `{r.tag}` ({r.outcome}, confidence {r.confidence:.2f}"
                    + ("" if pd.isna(r.visual_consistency) else f", visual {r.visual_consistency:.0%}")
                    + ")"
                    for r in chosen.itertuples(index=False)
                )
            ),
            "outcomes": dg.MetadataValue.json(table["outcome"].value_counts().to_dict()),
            "rejected": int((table["outcome"] == "rejected").sum()),
            # The evidence is long text: an entry of its own, one line per candidate.
            "candidates": table_metadata(
                table[["site", "tag", "outcome", "confidence", "post_count", "name_similarity", "franchise_share",
                       "visual_consistency"]],
                rename={"post_count": "posts", "name_similarity": "name", "franchise_share": "franchise",
                        "visual_consistency": "visual"},
            ),
            "evidence": text_entry(
                f"**{r.site}** `{r.tag}` ({r.outcome}): {r.evidence}" for r in table.itertuples(index=False)
            ),
            **table_entries(
                "surviving_posts",
                posts[["site", "post_id", "candidate_tag", "rating", "width", "height", "sha256"]],
                stage.files.relative(posts_path),
                max_rows=10,
            ),
        }
    )
