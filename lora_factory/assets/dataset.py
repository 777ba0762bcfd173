"""captions and buckets: from clean crops to the kohya training folder and the dataset
package.

torch is imported inside the assets: Dagster imports this code location in every
process (webserver, daemon, sensors), which need none of it.
"""

import io
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from lora_factory.assets.cleaning import CleanedCropsFiles, cleaned_crops
from lora_factory.assets.index import character_index
from lora_factory.assets.metadata import table_entries, table_metadata
from lora_factory.assets.settings import core_config, settings_for
from lora_factory.assets.stage import AssetFiles, Stage, character_asset
from lora_factory.bucketing.buckets import KohyaBuckets, resize_and_crop
from lora_factory.bucketing.export import (
    ExportRow,
    folder_tag_frequency,
    kohya_dataset_config,
    write_dataset_package,
    write_kohya_folder,
)
from lora_factory.bucketing.repeats import (
    DEFAULT_KIND_WEIGHTS,
    RepeatPlan,
    assign_repeats,
    describe_rule,
)
from lora_factory.captioning.captions import CaptionConfig, caption_dataset
from lora_factory.engines import VISION_ON_GPU
from lora_factory.provenance import frame_hash
from lora_factory.reporting import contact_sheet_png, markdown_image
from lora_factory.resources import (
    BaseModelResource,
    CharacterIndex,
    FactoryStorage,
    VisionModelsResource,
)
from lora_factory.storage import (
    atomic_write_json,
    read_json,
    read_table,
    sha256_file,
    write_table,
)

CAPTIONS_CODE_VERSION = "3"
BUCKETS_CODE_VERSION = "3"
DEFAULT_BUCKET_STEP = 64  # kohya's --bucket_reso_steps


@dataclass(frozen=True)
class CaptionSummary:
    """What captions decided for the whole dataset (summary.json)."""

    trigger_word: str  # as captions write it, so prompts and the model card use the same words
    style: str
    core_tags: list[str]
    core_share: dict[str, float]
    outfit_triggers: dict[str, str]
    tag_frequency: dict[str, int]
    tagger: dict[str, Any]


class CaptionsFiles(AssetFiles):
    """captions' caption table (one row per crop), outfit clusters and summary.json."""

    asset = "captions"

    @property
    def summary_path(self) -> Path:
        return self.folder / "summary.json"

    def table(self) -> pd.DataFrame:
        return self.read_table()

    def clusters(self) -> pd.DataFrame:
        return self.read_table("clusters")

    def summary(self) -> CaptionSummary:
        return CaptionSummary(**read_json(self.verified(self.summary_path)))


class BucketsFiles(AssetFiles):
    """buckets' table (crop, caption, repeats, bucket, image path), repeat groups, the kohya
    training folder `train/`, its dataset config, tag frequencies, meta.json and the package."""

    asset = "buckets"

    @property
    def train_dir(self) -> Path:
        return self.folder / "train"

    def table(self) -> pd.DataFrame:
        return self.read_table()

    def meta(self) -> dict[str, Any]:
        return read_json(self.verified(self.folder / "meta.json"))

    def resolution(self) -> int:
        return int(self.meta()["buckets"]["settings"]["resolution"][0])  # square: [side, side]

    def training_image(self, relative: str) -> Path:
        """One picture of the training folder (`<repeats>_<key>/<stem>.png`), checked."""
        return self.verified(self.train_dir / relative)


CaptionSettings = settings_for(
    CaptionConfig,
    """How crops are captioned. Styles: `fluid` prunes nothing, `semi-static`
    prunes the core tags, `static` prunes the core tags and the dominant outfit.
    `fold_generic` / `fold_species`: 1girl/1boy/solo and species tags (horse_girl)
    count as core tags. Outfit triggers: clusters of at least
    `outfit_trigger_min_images` pictures get a trigger named after their garments.""",
    exclude=("extra_blacklist",),  # the index row's banned tags
)


class BucketSettings(dg.Config):
    """Aspect-ratio buckets (kohya's algorithm, both modes) and repeats. 0 means derived
    from the base model: resolution = its native size (512 for SD1.5), min/max =
    resolution / 2 and x 2 (256 / 1024 at 512, never below one step), step = kohya's
    64 px (SD1.5's VAE (x8) and UNet (x8) need sides divisible by 64) unless the
    deployment's base model sets its own; a step the model cannot take is refused.
    `batch_size` is the one steps per epoch are reported for (and written into the
    kohya dataset config)."""

    resolution: int = 0
    min_size: int = 0
    max_size: int = 0
    step: int = 0
    no_upscale: bool = False
    max_repeats: int = 20
    head_weight: float = DEFAULT_KIND_WEIGHTS["head"]
    quality_low_below: float = 0.25  # aesthetic score under this: low tier
    quality_high_from: float = 0.75  # aesthetic score from this: high tier
    batch_size: int = 4


def package_version() -> str:
    try:
        return version("lora_factory")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "not installed"


@character_asset(
    gpu=VISION_ON_GPU,
    group_name="dataset",
    code_version=CAPTIONS_CODE_VERSION,
    deps=[cleaned_crops, character_index],
    description=(
        "One caption per crop: tagger output (scores kept) cleaned (implied, blacklisted "
        "and meta tags dropped, synonyms merged), core feature tags (hair, eyes, ...) "
        "present in >= 35% of crops folded into the trigger word, which comes first; "
        "caption style fluid / semi-static / static; outfit clusters with their tags and "
        "optional outfit triggers."
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
        CaptionsFiles,
        config,
        reads=(CleanedCropsFiles,),
        extra={
            "tagger": vision_models.versions(storage.store(), ("tagger",)),
            "trigger": row.trigger,
            "banned": row.banned_tags,
        },
    )
    table_path = stage.files.table_path()
    clusters_path = stage.files.table_path("clusters")
    summary_path = stage.files.summary_path
    if stage.needs_build():
        caption_config = core_config(CaptionConfig, config, extra_blacklist=tuple(row.banned_tags))
        cleaned = stage.read(CleanedCropsFiles)
        crops = cleaned.crops()
        tagger = vision_models.load(stage.store).tagger
        # The configured thresholds, not the model's defaults, decide what the tagger returns.
        tagger.general_threshold = caption_config.general_threshold
        tagger.character_threshold = caption_config.character_threshold
        predictions = tagger.predict(cleaned.images(crops["crop_sha256"]))
        context.log.info(f"tagged {len(predictions)} crops")
        result = caption_dataset(crops, predictions, row.trigger, caption_config)
        keep = [c for c in ("crop_sha256", "kind", "source_sha256", "aesthetic_label", "aesthetic_score")
                if c in crops.columns]
        table = result.table.merge(crops[keep], on="crop_sha256", how="left")
        write_table(table, table_path)
        write_table(result.clusters, clusters_path)
        atomic_write_json(
            summary_path,
            {
                # As captions write it, so prompts and the model card use the same words.
                "trigger_word": result.trigger_word,
                "style": caption_config.style,
                "core_tags": result.core_tags,
                "core_share": result.core_share,
                "outfit_triggers": {
                    str(c): t for c, t in zip(result.clusters["cluster"], result.clusters["trigger"], strict=True) if t
                },
                "tag_frequency": result.tag_frequency,
                "tagger": {
                    "model": vision_models.tagger,
                    "model_sha256": sha256_file(tagger.model_dir / "model.onnx"),
                    "general_threshold": caption_config.general_threshold,
                    "character_threshold": caption_config.character_threshold,
                },
            },
        )
        stage.finish(frame_hash(table, ["crop_sha256", "caption", "cluster"]), {})
    table = read_table(table_path)
    clusters = read_table(clusters_path)
    summary = CaptionSummary(**read_json(summary_path))
    top = pd.DataFrame(
        sorted(summary.tag_frequency.items(), key=lambda item: (-item[1], item[0]))[:30], columns=["tag", "captions"]
    )
    core = pd.DataFrame(list(summary.core_share.items()), columns=["core_tag", "share_of_crops"])
    return stage.result(
        {
            "dagster/row_count": len(table),
            # Exactly what a prompt must contain: as the captions (and the model card) write it.
            "trigger_word": summary.trigger_word,
            **_trigger_note(row.trigger, summary.trigger_word),
            "caption_style": summary.style,
            "core_tags": dg.MetadataValue.md(", ".join(f"`{t}`" for t in summary.core_tags)),
            "core_tag_shares": table_metadata(core),
            "outfit_clusters": table_metadata(_listed(clusters)),
            "top_tags": table_metadata(top),
            **table_entries(
                "captions",
                table[["caption", "kind", "cluster", "crop_sha256"]],
                stage.files.relative(table_path),
                max_rows=20,
            ),
            "tagger": dg.MetadataValue.json(summary.tagger),
        },
        pictures={"outfit_cluster_sheets": lambda: _cluster_sheets(stage, table, clusters)},
    )


def _trigger_note(written: str, typed: str) -> dict[str, dg.MetadataValue]:
    """When the captions write the index's trigger word differently (underscores as
    spaces, lower case, brackets escaped, like every caption tag), say which to type."""
    if written == typed:
        return {}
    return {
        "trigger_word_in_index": dg.MetadataValue.md(
            f"The index's `{written}` is written in the captions, preview prompts and model card "
            f"as `{typed}`, like every caption tag: type `{typed}` in a prompt."
        )
    }


def _listed(frame: pd.DataFrame) -> pd.DataFrame:
    """Tag-list columns as comma-separated text, for the UI's tables."""
    out = frame.copy()
    for column in out.columns:
        if len(out) and not isinstance(out[column].iloc[0], str) and hasattr(out[column].iloc[0], "__len__"):
            out[column] = out[column].map(lambda tags: ", ".join(map(str, tags)))
    return out


def _cluster_sheets(stage: Stage, table: pd.DataFrame, clusters: pd.DataFrame) -> str:
    """Per outfit cluster: its tags, trigger and a contact sheet of its body crops."""
    parts = []
    for cluster in clusters.itertuples():
        members = table[(table["cluster"] == cluster.cluster) & (table["kind"] != "head")].head(8)
        heading = f"**cluster {cluster.cluster}** ({cluster.size} crops, {cluster.images} pictures)"
        if cluster.trigger:
            heading += f", trigger `{cluster.trigger}`"
        parts.append(f"{heading}: {', '.join(cluster.tags) or '(no outfit tags)'}")
        if len(members):
            sheet = contact_sheet_png(list(stage.images(members["crop_sha256"])), thumb=96, cols=8)
            parts.append(markdown_image(sheet, f"cluster {cluster.cluster}"))
    return "\n\n".join(parts)


@character_asset(
    group_name="dataset",
    code_version=BUCKETS_CODE_VERSION,
    deps=[captions, cleaned_crops],
    description=(
        "Aspect-ratio buckets exactly as kohya sd-scripts makes them (with or without "
        "upscaling), repeats that balance outfit clusters, crop kinds and quality tiers, "
        "a kohya training folder (<repeats>_<name>/ image + caption pairs) with its "
        "dataset config, the tag frequencies per folder, and a dataset package (zip of "
        "crop + caption pairs and meta.json)."
    ),
)
def buckets(
    context: dg.AssetExecutionContext,
    config: BucketSettings,
    storage: FactoryStorage,
    base_model: BaseModelResource,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    vision_versions = vision_models.versions(storage.store())
    stage = Stage(
        context,
        storage,
        BucketsFiles,
        config,
        reads=(CaptionsFiles, CleanedCropsFiles),
        extra={
            "base": base_model.source,
            "bucket_step": base_model.defaults.bucket_step,
            "vision": vision_versions,
        },
    )
    artefacts = stage.files.folder
    table_path = stage.files.table_path()
    groups_path = stage.files.table_path("groups")
    dataset_dir = stage.files.train_dir
    config_path = artefacts / "dataset_config.toml"
    frequency_path = artefacts / "tag_frequency.json"
    meta_path = artefacts / "meta.json"
    package_path = artefacts / f"{stage.key}_dataset.zip"
    if stage.needs_build():
        captioned = stage.read(CaptionsFiles)
        crops = stage.read(CleanedCropsFiles)
        from lora_factory.training.base_model import native_resolution, side_multiple

        model = base_model.resolve(stage.store)
        resolution = config.resolution or native_resolution(model)
        step = config.step or base_model.defaults.bucket_step or DEFAULT_BUCKET_STEP
        if step % side_multiple(model):
            raise ValueError(
                f"bucket step {step} px does not fit the base model, whose picture sides must be "
                f"multiples of {side_multiple(model)} px: set the buckets config's step to a multiple of it"
            )
        bucketing = KohyaBuckets.around(resolution, step, config.min_size, config.max_size, config.no_upscale)
        table = captioned.table()
        plan = assign_repeats(
            table,
            kind_weights={**DEFAULT_KIND_WEIGHTS, "head": config.head_weight},
            max_repeats=config.max_repeats,
            quality_cuts=(config.quality_low_below, config.quality_high_from),
        )
        table["group"] = plan.row_groups.to_numpy()
        table["repeats"] = plan.row_repeats().to_numpy()
        rows, placed = [], []
        for record, image in zip(
            table.itertuples(index=False), crops.images(table["crop_sha256"]), strict=True
        ):
            choice = bucketing.select(image.width, image.height)
            trained = resize_and_crop(image, choice.bucket, choice.resized)
            encoded = io.BytesIO()
            trained.save(encoded, format="PNG")
            stem = record.crop_sha256[:16]
            rows.append(ExportRow(encoded.getvalue(), record.caption, int(record.repeats), stem))
            placed.append(
                {
                    "width": image.width,
                    "height": image.height,
                    "bucket_width": choice.bucket[0],
                    "bucket_height": choice.bucket[1],
                    "resized_width": choice.resized[0],
                    "resized_height": choice.resized[1],
                    "aspect_error": abs(choice.aspect_error),
                    "image_path": f"{record.repeats}_{stage.key}/{stem}.png",
                }
            )
        write_kohya_folder(dataset_dir, stage.key, rows)
        table = pd.concat([table, pd.DataFrame(placed)], axis=1)
        steps = plan.steps_per_epoch(config.batch_size, buckets=_bucket_names(table))
        kohya_dataset_config(
            config_path, Path(dataset_dir.name), stage.key, table["repeats"], bucketing.settings(), config.batch_size
        )
        atomic_write_json(frequency_path, folder_tag_frequency(rows, stage.key))
        meta = _package_meta(stage, captioned, config, table, base_model, vision_versions, bucketing, plan, steps)
        atomic_write_json(meta_path, meta)
        write_dataset_package(
            package_path,
            [
                ExportRow(crops.image_path(record.crop_sha256), record.caption, 1, record.crop_sha256[:16])
                for record in table.itertuples(index=False)
            ],
            meta,
        )
        write_table(table, table_path)
        write_table(plan.groups, groups_path)
        stage.finish(
            frame_hash(table, ["crop_sha256", "caption", "repeats", "bucket_width", "bucket_height"]),
            {"resolution": resolution, "steps_per_epoch": steps, "batch_size": config.batch_size},
        )
    table = read_table(table_path)
    groups = read_table(groups_path)
    meta = read_json(meta_path)
    names = _bucket_names(table)
    bucket_counts = pd.DataFrame(
        {
            "bucket": names.groupby(names).size().index,
            "images": names.groupby(names).size().to_numpy(),
            "samples_per_epoch": table["repeats"].groupby(names).sum().to_numpy(),
        }
    )
    summary = stage.stamp.summary
    return stage.result(
        {
            "dagster/row_count": len(table),
            "resolution": summary["resolution"],
            "bucket_settings": dg.MetadataValue.json(meta["buckets"]["settings"]),
            "samples_per_epoch": int(table["repeats"].sum()),
            "steps_per_epoch": int(summary["steps_per_epoch"]),
            "steps_per_epoch_batch_size": int(summary["batch_size"]),
            "mean_aspect_error": float(table["aspect_error"].mean()) if len(table) else 0.0,
            "buckets": table_metadata(bucket_counts, max_rows=50),
            "repeat_rule": dg.MetadataValue.md(meta["repeats"]["rule"]),
            **table_entries(
                "repeat_groups", groups, stage.files.relative(groups_path), max_rows=30,
                first=["group", "images", "repeats", "samples", "share"],
            ),
            **table_entries(
                "images",
                table.assign(bucket=names)[["bucket", "repeats", "kind", "caption", "crop_sha256"]],
                stage.files.relative(table_path),
                max_rows=10,
            ),
            "crops_by_kind": dg.MetadataValue.json(meta["crops_by_kind"]),
            "train_data_dir": dg.MetadataValue.path(stage.files.relative(dataset_dir)),
            "kohya_dataset_config": dg.MetadataValue.path(stage.files.relative(config_path)),
            "tag_frequency": dg.MetadataValue.path(stage.files.relative(frequency_path)),
            "dataset_package": dg.MetadataValue.path(stage.files.relative(package_path)),
        }
    )


def _bucket_names(table: pd.DataFrame) -> pd.Series:
    return table["bucket_width"].astype(str) + "x" + table["bucket_height"].astype(str)


def _package_meta(
    stage: Stage,
    captioned: CaptionsFiles,
    config: BucketSettings,
    table: pd.DataFrame,
    base_model: BaseModelResource,
    vision_versions: dict[str, dict],
    bucketing: KohyaBuckets,
    plan: RepeatPlan,
    steps_per_epoch: int,
) -> dict:
    """meta.json of the dataset package: what is in it and what made it."""
    summary = captioned.summary()
    clusters = captioned.clusters()
    names = _bucket_names(table)
    return {
        "character": stage.key,
        "trigger_word": summary.trigger_word,
        "caption_style": summary.style,
        "core_tags": summary.core_tags,
        "core_share": summary.core_share,
        "clusters": [
            {
                "cluster": int(c.cluster),
                "size": int(c.size),
                "images": int(c.images),
                "tags": list(c.tags),
                "folded_tags": list(c.folded_tags),
                "trigger": c.trigger,
            }
            for c in clusters.itertuples()
        ],
        "crops": len(table),
        "crops_by_kind": {str(k): int(n) for k, n in table["kind"].value_counts().sort_index().items()},
        "crops_by_cluster": {str(k): int(n) for k, n in table["cluster"].value_counts().sort_index().items()},
        "buckets": {
            "settings": bucketing.settings(),
            "counts": {str(k): int(n) for k, n in names.value_counts().sort_index().items()},
            "mean_aspect_error": round(float(table["aspect_error"].mean()), 6) if len(table) else 0.0,
        },
        "repeats": {
            "rule": describe_rule(
                {**DEFAULT_KIND_WEIGHTS, "head": config.head_weight},
                max_repeats=config.max_repeats,
                quality_cuts=(config.quality_low_below, config.quality_high_from),
            ),
            "groups": json.loads(plan.groups.to_json(orient="records")),
            "samples_per_epoch": int(plan.samples_per_epoch),
            "steps_per_epoch": steps_per_epoch,
            "batch_size": config.batch_size,
        },
        "versions": {
            "lora_factory": package_version(),
            "code": {"captions": CAPTIONS_CODE_VERSION, "buckets": BUCKETS_CODE_VERSION},
            "upstream_data": stage.upstream_hashes,
            "tagger": summary.tagger,
            "vision_models": vision_versions,
            "base_model": base_model.source,
        },
    }
