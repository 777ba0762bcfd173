"""cleaned_crops: from surviving posts to identity-checked 3-stage crops.

LanceDB and ONNX Runtime are imported inside the asset: Dagster imports this code
location in every process (webserver, daemon, sensors), which need neither.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
from PIL import Image

from lora_factory.assets.metadata import counts_metadata, rounded, table_entries, table_metadata
from lora_factory.assets.anime import AnimePostsFiles, anime_posts
from lora_factory.assets.scraping import MatchedTagsFiles, matched_tags
from lora_factory.assets.settings import core_config, settings_for
from lora_factory.assets.stage import AssetFiles, Stage, UpstreamError, character_asset, character_check
from lora_factory.cleaning.pipeline import CleaningConfig, clean_character
from lora_factory.engines import VISION_ON_GPU
from lora_factory.provenance import frame_hash
from lora_factory.reporting import contact_sheet_png, markdown_image
from lora_factory.resources import FactoryStorage, VisionModelsResource
from lora_factory.storage import StoredImages, read_table, write_table


class CleanedCropsFiles(AssetFiles):
    """cleaned_crops' tables (crops, drops, quarantine) and the crop images they name (blobs)."""

    asset = "cleaned_crops"

    def crops(self) -> pd.DataFrame:
        return self.read_table()

    def images(self, hashes: Iterable[str]) -> Iterator[Image.Image]:
        """Crop images as RGB, one at a time; each blob is checked against its sha256."""
        return self.store.blobs.images(hashes)

    def image_sequence(self, hashes: Iterable[str]) -> StoredImages:
        """Crop images read only when indexed (a sample of many reads only the sample)."""
        return self.store.blobs.image_sequence(hashes)

    def image_path(self, sha256: str) -> Path:
        """The stored file of one crop, after checking its bytes."""
        if not self.store.blobs.verify(sha256):
            raise UpstreamError(
                f"crop {sha256} of {self.key} is missing or damaged: re-materialize cleaned_crops "
                "for this character (a run of the whole chain repairs it)"
            )
        return self.store.blobs.path(sha256)


# What the metadata panel shows of the crops table, with shorter headers (every column is
# in its Parquet file).
CROP_COLUMNS = {
    "kind": "kind", "site": "site", "post_id": "post_id", "width": "width", "height": "height",
    "aesthetic_label": "quality", "aesthetic_score": "aesthetic", "identity_agreement": "identity",
    "crop_sha256": "crop_sha256",
}

CleaningSettings = settings_for(
    CleaningConfig,
    "The cleaning chain's thresholds (lora_factory.cleaning.pipeline.CleaningConfig) and its "
    "blocking checks.",
    exclude=("log_every",),
    extra={
        # Blocking check: fewer crops than this fails the partition.
        "min_crops": (int, 10),
        # Blocking check: below this share of persons in the dominant identity cluster the
        # tag mostly shows someone else (a namesake, a mis-tag) and a LoRA would learn a mix.
        "min_identity_purity": (float, 0.5),
        # Cosine distance under which a crop counts as the same drawing as another
        # character's crop (reported, not dropped: a duo picture may rightly serve both);
        # None: the embedding store's default (lora_factory.cleaning.embeddings).
        "cross_character_distance": (float | None, None),
    },
)


@character_asset(
    gpu=VISION_ON_GPU,
    group_name="dataset",
    code_version="2",
    deps=[matched_tags, anime_posts],
    check_specs=[
        character_check(
            "enough_crops",
            "cleaned_crops",
            blocking=True,
            description="Blocks training when cleaning left fewer crops than `min_crops`.",
        ),
        character_check(
            "identity_purity",
            "cleaned_crops",
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
        context,
        storage,
        CleanedCropsFiles,
        config,
        reads=(MatchedTagsFiles, AnimePostsFiles),
        extra={"models": vision_models.versions(storage.store())},
    )
    crops_path = stage.files.table_path()
    drops_path = stage.files.table_path("drops")
    quarantine_path = stage.files.table_path("quarantine")
    embeddings = EmbeddingStore(stage.store.lancedb_dir)
    if stage.reused is not None and embeddings.character_digest(stage.key) != stage.reused.output_hash:
        stage.distrust(f"identity vectors in {stage.files.relative(stage.store.lancedb_dir)} are missing or differ")
    if stage.needs_build():
        # Web posts and the character's anime figures (site `anime:<series>`), cleaned alike.
        posts, anime = stage.read(MatchedTagsFiles).posts(), stage.read(AnimePostsFiles).posts()
        if len(anime):
            posts = pd.concat([posts, anime], ignore_index=True)
        result = clean_character(
            stage.key,
            posts,
            stage.store.blobs,
            vision_models.load(stage.store),
            core_config(CleaningConfig, config),
            embeddings,
            log=context.log.info,
        )
        write_table(result.crops, crops_path)
        write_table(result.drops, drops_path)
        write_table(result.quarantine, quarantine_path)
        stage.finish(
            frame_hash(result.crops, ["crop_sha256", "kind"]),
            {"crops": len(result.crops), "purity": result.purity},
            blobs=result.crops["crop_sha256"],
        )
    crops = read_table(crops_path)
    drops = read_table(drops_path)
    quarantine = read_table(quarantine_path)
    sample = crops.head(48)

    def contact_sheet() -> str:
        images = list(stage.images(sample["crop_sha256"]))
        return markdown_image(contact_sheet_png(images, labels=list(sample["kind"]), thumb=96, cols=8), "crops")

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
            metadata={"purity": rounded(purity), "minimum": config.min_identity_purity},
        ),
    ]
    return stage.result(
        {
            "dagster/row_count": len(crops),
            "crops_by_kind": dg.MetadataValue.json(crops["kind"].value_counts().to_dict()),
            "identity_purity": rounded(purity),
            "cross_character_duplicates": int(shared["crop_sha256"].nunique()),
            "cross_character_pairs": table_metadata(shared, max_rows=20),
            "drops_by_reason": counts_metadata(drops["reason"].value_counts().to_dict()),
            **table_entries(
                "drops", drops[["reason", "site", "post_id", "detail"]], stage.files.relative(drops_path)
            ),
            "quarantined": len(quarantine),
            **table_entries(
                "quarantine", quarantine[["reason", "site", "post_id", "detail"]], stage.files.relative(quarantine_path)
            ),
            **table_entries(
                "crops",
                crops[[c for c in CROP_COLUMNS if c in crops.columns]],
                stage.files.relative(crops_path),
                max_rows=15,
                rename=CROP_COLUMNS,
            ),
        },
        check_results=checks,
        pictures={"contact_sheet": contact_sheet},
    )
