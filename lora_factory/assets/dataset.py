"""captions and buckets: from clean crops to the kohya training folder.

torch is imported inside the assets: Dagster imports this code location in every
process (webserver, daemon, sensors), which need none of it.
"""

import io
import json

import dagster as dg
import pandas as pd

from lora_factory.assets.cleaning import cleaned_crops
from lora_factory.assets.metadata import counts_metadata, table_metadata
from lora_factory.assets.stage import Stage
from lora_factory.bucketing.buckets import (
    make_bucket_resolutions,
    resize_and_crop,
    select_bucket,
)
from lora_factory.bucketing.export import ExportRow, write_kohya_folder
from lora_factory.bucketing.repeats import assign_repeats
from lora_factory.captioning.captions import CaptionConfig, caption_dataset
from lora_factory.captioning.tags import escape_for_prompt
from lora_factory.partitions import characters_partitions
from lora_factory.provenance import frame_hash
from lora_factory.resources import (
    BaseModelResource,
    CharacterIndex,
    FactoryStorage,
    VisionModelsResource,
)
from lora_factory.storage import atomic_write_json, read_table, write_table


class CaptionSettings(dg.Config):
    """How crops are captioned (styles from seed 003: fluid / semi-static / static)."""

    style: str = "semi-static"
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    core_threshold: float = 0.35
    remove_underscores: bool = True
    fold_generic: bool = False


class BucketSettings(dg.Config):
    """Aspect-ratio buckets (kohya's algorithm). 0 means derived from the base model:
    resolution = its native size (512 for SD1.5), min/max = resolution / 2 and x 2
    (256 / 1024 at 512, never below one step). Steps of 64 px: SD1.5's VAE (x8) and
    UNet (x8) need sides divisible by 64."""

    resolution: int = 0
    min_size: int = 0
    max_size: int = 0
    step: int = 64
    no_upscale: bool = False
    max_repeats: int = 20


@dg.asset(
    partitions_def=characters_partitions,
    group_name="dataset",
    code_version="1",
    deps=[cleaned_crops],
    description=(
        "One caption per crop: tagger output cleaned (implied, blacklisted and meta tags "
        "dropped), core feature tags (hair, eyes, ...) present in >= 35% of crops folded "
        "into the trigger word, which comes first; outfit clusters with their tags."
    ),
)
def captions(
    context: dg.AssetExecutionContext,
    config: CaptionSettings,
    storage: FactoryStorage,
    character_index: CharacterIndex,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    row = character_index.row(context.partition_key)
    stage = Stage(
        context,
        storage,
        config,
        upstream=("cleaned_crops",),
        extra={"tagger": vision_models.tagger, "trigger": row.trigger, "banned": row.banned_tags},
    )
    table_path = stage.store.table_path("captions", stage.key)
    clusters_path = stage.store.table_path("captions", stage.key, "clusters")
    summary_path = stage.store.artefact_dir("captions", stage.key) / "summary.json"
    if stage.needs_build(table_path, clusters_path, summary_path):
        crops = read_table(stage.store.table_path("cleaned_crops", stage.key))
        tagger = vision_models.load(stage.store).tagger
        predictions = tagger.predict(stage.images(crops["crop_sha256"]))
        context.log.info(f"tagged {len(predictions)} crops")
        result = caption_dataset(
            crops,
            predictions,
            row.trigger,
            CaptionConfig(**config.model_dump(), extra_blacklist=tuple(row.banned_tags)),
        )
        table = result.table.merge(
            crops[["crop_sha256", "kind", "aesthetic_label"]], on="crop_sha256", how="left"
        )
        write_table(table, table_path)
        write_table(result.clusters, clusters_path)
        atomic_write_json(
            summary_path,
            {
                # As captions write it, so prompts and the model card use the same words.
                "trigger_word": escape_for_prompt(row.trigger, config.remove_underscores),
                "core_tags": result.core_tags,
                "tag_frequency": result.tag_frequency,
            },
        )
        stage.finish(frame_hash(table, ["crop_sha256", "caption", "cluster"]), {})
    table = read_table(table_path)
    clusters = read_table(clusters_path)
    summary = json.loads(summary_path.read_text())
    top = sorted(summary["tag_frequency"].items(), key=lambda item: -item[1])[:30]
    return stage.result(
        {
            "dagster/row_count": len(table),
            "trigger_word": summary["trigger_word"],
            "core_tags": dg.MetadataValue.md(", ".join(f"`{t}`" for t in summary["core_tags"])),
            "outfit_clusters": table_metadata(clusters),
            "top_tags": counts_metadata(dict(top)),
            "captions": table_metadata(table[["crop_sha256", "kind", "cluster", "caption"]]),
        }
    )


@dg.asset(
    partitions_def=characters_partitions,
    group_name="dataset",
    code_version="1",
    deps=[captions],
    description=(
        "Aspect-ratio buckets with kohya's algorithm (nearest aspect ratio; resize then "
        "centre crop), repeats that balance outfit clusters, crop kinds and quality tiers, "
        "and a kohya training folder (<repeats>_<name>/ image + caption pairs)."
    ),
)
def buckets(
    context: dg.AssetExecutionContext,
    config: BucketSettings,
    storage: FactoryStorage,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    stage = Stage(context, storage, config, upstream=("captions",), extra={"base": base_model.source})
    table_path = stage.store.table_path("buckets", stage.key)
    groups_path = stage.store.table_path("buckets", stage.key, "groups")
    dataset_dir = stage.store.artefact_dir("buckets", stage.key) / "train"
    if stage.needs_build(table_path, groups_path, dataset_dir):
        from lora_factory.training.base_model import native_resolution

        resolution = config.resolution or native_resolution(base_model.resolve(stage.store))
        step = config.step
        bucket_sizes = make_bucket_resolutions(
            max_reso=(resolution, resolution),
            min_size=config.min_size or max(step, resolution // 2),
            max_size=config.max_size or resolution * 2,
            divisible=step,
        )
        table = read_table(stage.store.table_path("captions", stage.key))
        plan = assign_repeats(table, max_repeats=config.max_repeats)
        table["group"] = plan.row_groups.to_numpy()
        table["repeats"] = plan.row_repeats().to_numpy()
        rows, placed = [], []
        for record, image in zip(
            table.itertuples(index=False), stage.images(table["crop_sha256"]), strict=True
        ):
            bucket, resized, error = select_bucket(
                image.width, image.height, bucket_sizes, no_upscale=config.no_upscale, reso_steps=step
            )
            trained = resize_and_crop(image, bucket, resized)
            encoded = io.BytesIO()
            trained.save(encoded, format="PNG")
            stem = record.crop_sha256[:16]
            rows.append(ExportRow(encoded.getvalue(), record.caption, int(record.repeats), stem))
            placed.append(
                {
                    "bucket_width": bucket[0],
                    "bucket_height": bucket[1],
                    "aspect_error": abs(error),
                    "image_path": f"{record.repeats}_{stage.key}/{stem}.png",
                }
            )
        write_kohya_folder(dataset_dir, stage.key, rows)
        table = pd.concat([table, pd.DataFrame(placed)], axis=1)
        write_table(table, table_path)
        write_table(plan.groups, groups_path)
        stage.finish(
            frame_hash(table, ["crop_sha256", "caption", "repeats", "bucket_width", "bucket_height"]),
            {"resolution": resolution},
        )
    table = read_table(table_path)
    groups = read_table(groups_path)
    bucket_counts = (
        table.groupby(["bucket_width", "bucket_height"]).size().reset_index(name="images")
    )
    return stage.result(
        {
            "dagster/row_count": len(table),
            "resolution": stage.stamp.summary["resolution"],
            "samples_per_epoch": int((table["repeats"]).sum()),
            "mean_aspect_error": float(table["aspect_error"].mean()) if len(table) else 0.0,
            "buckets": table_metadata(bucket_counts),
            "repeat_groups": table_metadata(groups),
            "train_data_dir": dg.MetadataValue.path(str(dataset_dir)),
        }
    )
