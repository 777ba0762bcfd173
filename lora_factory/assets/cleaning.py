"""cleaned_crops: from surviving posts to identity-checked 3-stage crops.

LanceDB and ONNX Runtime are imported inside the asset: Dagster imports this code
location in every process (webserver, daemon, sensors), which need neither.
"""

import dagster as dg

from lora_factory.assets.metadata import counts_metadata, table_metadata
from lora_factory.assets.scraping import matched_tags
from lora_factory.assets.stage import Stage
from lora_factory.cleaning.pipeline import CleaningConfig, clean_character
from lora_factory.partitions import characters_partitions
from lora_factory.provenance import frame_hash
from lora_factory.reporting import contact_sheet_png, markdown_image
from lora_factory.resources import FactoryStorage, VisionModelsResource
from lora_factory.storage import read_table, write_table


class CleaningSettings(dg.Config):
    """The cleaning chain's main knobs (every threshold: lora_factory.cleaning.pipeline)."""

    min_side: int = CleaningConfig.min_side
    min_crop_side: int = CleaningConfig.min_crop_side
    phash_max_distance: int = CleaningConfig.phash_max_distance
    require_one_face: bool = CleaningConfig.require_one_face
    identity_filter: bool = CleaningConfig.identity_filter
    keep_classes: list[str] = list(CleaningConfig.keep_classes)
    allowed_ratings: list[str] = []  # empty: every rating
    min_crops: int = 10  # blocking check: fewer crops than this fails the partition
    # Blocking check: below this share of persons in the dominant identity cluster the
    # tag mostly shows someone else (a namesake, a mis-tag) and a LoRA would learn a mix.
    min_identity_purity: float = 0.5
    # Cosine distance under which a crop counts as the same drawing as another
    # character's crop (reported, not dropped: a duo picture may rightly serve both);
    # None: the embedding store's default (lora_factory.cleaning.embeddings).
    cross_character_distance: float | None = None

    def cleaning_config(self) -> CleaningConfig:
        return CleaningConfig(
            min_side=self.min_side,
            min_crop_side=self.min_crop_side,
            phash_max_distance=self.phash_max_distance,
            require_one_face=self.require_one_face,
            identity_filter=self.identity_filter,
            keep_classes=tuple(self.keep_classes),
            allowed_ratings=tuple(self.allowed_ratings) or None,
        )


@dg.asset(
    partitions_def=characters_partitions,
    group_name="dataset",
    code_version="1",
    deps=[matched_tags],
    check_specs=[
        dg.AssetCheckSpec(
            name="enough_crops",
            asset="cleaned_crops",
            blocking=True,
            description="Blocks training when cleaning left fewer crops than `min_crops`.",
        ),
        dg.AssetCheckSpec(
            name="identity_purity",
            asset="cleaned_crops",
            blocking=True,
            description=(
                "Blocks training when fewer than `min_identity_purity` of the face-checked "
                "persons belong to the dominant identity cluster."
            ),
        ),
    ],
    description=(
        "The cleaning chain: decode (corrupt files quarantined with a reason), RGB on "
        "white, monochrome and comic/3D filters, exact and perceptual dedup, person split, "
        "one face per person, identity filter (dominant identity cluster), 3-stage crops "
        "(full body / upper body / head). Crops are content addressed; identity "
        "embeddings go to LanceDB."
    ),
)
def cleaned_crops(
    context: dg.AssetExecutionContext,
    config: CleaningSettings,
    storage: FactoryStorage,
    vision_models: VisionModelsResource,
) -> dg.MaterializeResult:
    from lora_factory.cleaning.embeddings import EmbeddingStore

    stage = Stage(
        context, storage, config, upstream=("matched_tags",), extra={"models": vision_models.names()}
    )
    crops_path = stage.store.table_path("cleaned_crops", stage.key)
    drops_path = stage.store.table_path("cleaned_crops", stage.key, "drops")
    quarantine_path = stage.store.table_path("cleaned_crops", stage.key, "quarantine")
    embeddings = EmbeddingStore(stage.store.lancedb_dir)
    if stage.needs_build(crops_path, drops_path, quarantine_path):
        posts = read_table(stage.store.table_path("matched_tags", stage.key, "posts"))
        result = clean_character(
            stage.key,
            posts,
            stage.store.blobs,
            vision_models.load(stage.store),
            config.cleaning_config(),
            embeddings,
            log=context.log.info,
        )
        write_table(result.crops, crops_path)
        write_table(result.drops, drops_path)
        write_table(result.quarantine, quarantine_path)
        stage.finish(
            frame_hash(result.crops, ["crop_sha256", "kind"]),
            {"crops": len(result.crops), "purity": result.purity},
        )
    crops = read_table(crops_path)
    drops = read_table(drops_path)
    quarantine = read_table(quarantine_path)
    sample = crops.head(48)
    sheet = contact_sheet_png(
        list(stage.images(sample["crop_sha256"])), labels=list(sample["kind"]), thumb=96, cols=8
    )
    purity = float(stage.stamp.summary["purity"])
    # Asked on every run, reused or not: other characters' crops change independently.
    distance = {} if config.cross_character_distance is None else {"threshold": config.cross_character_distance}
    shared = embeddings.cross_character_duplicates(stage.key, **distance)
    checks = [
        dg.AssetCheckResult(
            check_name="enough_crops",
            passed=len(crops) >= config.min_crops,
            metadata={"crops": len(crops), "minimum": config.min_crops},
        ),
        dg.AssetCheckResult(
            check_name="identity_purity",
            passed=purity >= config.min_identity_purity,
            metadata={"purity": purity, "minimum": config.min_identity_purity},
        ),
    ]
    return stage.result(
        {
            "dagster/row_count": len(crops),
            "crops_by_kind": dg.MetadataValue.json(crops["kind"].value_counts().to_dict()),
            "identity_purity": purity,
            "cross_character_duplicates": int(shared["crop_sha256"].nunique()),
            "cross_character_pairs": table_metadata(shared, max_rows=20),
            "drops_by_reason": counts_metadata(drops["reason"].value_counts().to_dict()),
            "quarantined": len(quarantine),
            "quarantine": table_metadata(quarantine),
            "contact_sheet": dg.MetadataValue.md(markdown_image(sheet, "crops")),
            "crops": table_metadata(crops, max_rows=30),
        },
        check_results=checks,
    )
