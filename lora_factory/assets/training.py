"""lora_checkpoints: train the character's LoRA on the bucketed dataset.

torch and Lightning are imported inside the asset (see assets/dataset.py for why).
"""

from pathlib import Path

import dagster as dg
import pandas as pd

from lora_factory.assets.dataset import BucketsFiles, CaptionsFiles, buckets, captions
from lora_factory.assets.metadata import rounded, table_metadata
from lora_factory.assets.settings import core_config, settings_for
from lora_factory.assets.stage import AssetFiles, Stage, character_asset
from lora_factory.captioning.captions import tag_frequency
from lora_factory.provenance import fingerprint
from lora_factory.resources import BaseModelResource, FactoryStorage
from lora_factory.reporting import markdown_image, metric_curve_png
from lora_factory.storage import read_json, read_table, write_table
from lora_factory.training.config import LOSS_LOG_NAME, MANIFEST_NAME, TrainingConfig

TrainingSettings = settings_for(
    TrainingConfig,
    "Training knobs (lora_factory.training.config.TrainingConfig); None means \"decided for you\": "
    "rank, alpha and the training length from the dataset size (more images, fewer epochs), "
    "learning rates from the optimizer, unless the base model deployment sets a default.",
    exclude=("resolution", "clip_skip"),  # from the buckets and the base model
)


# The loss table in the metadata: the mean over this many runs of steps (loss.csv has all).
LOSS_TABLE_ROWS = 20


class LoraCheckpointsFiles(AssetFiles):
    """lora_checkpoints' table (step, epoch, home-relative path, sha256), the LoRA files and
    `run.json` (the resolved training settings that really ran)."""

    asset = "lora_checkpoints"

    def table(self) -> pd.DataFrame:
        return self.read_table()

    def checkpoint(self, step: int) -> Path:
        """The LoRA file saved at `step`, after checking its bytes."""
        table = self.table()
        rows = table[table["step"] == int(step)]
        if rows.empty:
            raise ValueError(f"{self.key} has no checkpoint at step {step} (steps {sorted(table['step'])})")
        return self.verified(self.store.root / rows["path"].iloc[0])

    def checkpoints(self) -> list[tuple[int, Path]]:
        return [(int(step), self.checkpoint(step)) for step in self.table()["step"]]


@character_asset(
    group_name="training",
    code_version="4",
    deps=[buckets, captions],
    gpu=True,
    description=(
        "A LoRA / LoHa / LoKr (peft, trained with Lightning on the base model) saved every N "
        "steps in kohya / LyCORIS format with ss_* metadata, loadable by AUTOMATIC1111, ComfyUI "
        "and kohya (LoRA also by diffusers). Runs in the `gpu` concurrency pool, one GPU per "
        "run; a killed run resumes from its last saved state."
    ),
)
def lora_checkpoints(
    context: dg.AssetExecutionContext,
    config: TrainingSettings,
    storage: FactoryStorage,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    stage = Stage(
        context,
        storage,
        LoraCheckpointsFiles,
        config,
        reads=(BucketsFiles, CaptionsFiles),
        extra={
            "base": base_model.identity(storage.store()),
            "clip_skip": base_model.clip_skip,
            "defaults": base_model.defaults.training_defaults(),
        },
    )
    table_path = stage.files.table_path()
    output_dir = stage.files.folder
    if stage.needs_build():
        from lora_factory.training.dataset import TrainingExample
        from lora_factory.training.train import train_lora

        bucketed = stage.read(BucketsFiles)
        dataset = bucketed.table()
        examples = [
            TrainingExample(
                image_path=bucketed.training_image(record.image_path),
                caption=record.caption,
                bucket=(int(record.bucket_width), int(record.bucket_height)),
                repeats=int(record.repeats),
            )
            for record in dataset.itertuples(index=False)
        ]
        # kohya's folders: one per repeat count, `<repeats>_<name>`.
        folders = {f"{r}_{stage.key}": rows for r, rows in dataset.groupby("repeats")}
        resolution = bucketed.resolution()
        training_config = base_model.defaults.training(
            core_config(TrainingConfig, config, resolution=resolution, clip_skip=base_model.clip_skip)
        )
        checkpoints = train_lora(
            base_model.resolve(stage.store),
            examples,
            output_dir,
            training_config,
            output_name=stage.key,
            trigger_word=stage.read(CaptionsFiles).summary().trigger_word,
            tag_frequency={
                folder: tag_frequency(rows["caption"]) for folder, rows in folders.items()
            },
            dataset_dirs={
                folder: {"n_repeats": int(rows["repeats"].iloc[0]), "img_count": len(rows)}
                for folder, rows in folders.items()
            },
            log=context.log.info,
            latent_cache_dir=stage.store.root / "cache" / "latents",
            # Several GPUs: each concurrent run (the `gpu` pool) claims a different one.
            gpu_lock_dir=stage.store.root / "locks" / "gpu",
        )
        table = pd.DataFrame(
            [
                {"step": c.step, "epoch": c.epoch, "path": stage.files.relative(c.path), "sha256": c.sha256}
                for c in checkpoints
            ]
        )
        write_table(table, table_path)
        stage.finish(fingerprint(list(table["sha256"])), {"checkpoints": len(table)})
    table = read_table(table_path)
    run = read_json(output_dir / MANIFEST_NAME)
    losses = pd.read_csv(output_dir / LOSS_LOG_NAME)
    return stage.result(
        {
            "dagster/row_count": len(table),
            # The resolved settings that really ran (rank, steps, learning rates, optimizer).
            "training_config": dg.MetadataValue.json(run["config"]),
            "checkpoints": table_metadata(table[["step", "epoch", "path", "sha256"]], max_rows=100),
            "final_checkpoint": dg.MetadataValue.path(table["path"].iloc[-1]),
            "output_dir": dg.MetadataValue.path(stage.files.relative(output_dir)),
            # A number, so that the UI's plots chart it across runs.
            "final_loss": dg.MetadataValue.float(rounded(final_loss(losses))),
            "loss": table_metadata(loss_windows(losses, windows=LOSS_TABLE_ROWS), max_rows=LOSS_TABLE_ROWS),
            "loss_table_path": dg.MetadataValue.path(stage.files.relative(output_dir / LOSS_LOG_NAME)),
        },
        pictures={
            "loss_curve": lambda: markdown_image(
                metric_curve_png(smoothed_loss(losses), ys=("loss", "smoothed"), title="training loss"), "loss"
            )
        },
    )


def final_loss(losses: pd.DataFrame) -> float:
    """The mean loss of the last tenth of the steps: one step's loss is mostly noise (its
    timesteps and noise are random)."""
    return float(losses["loss"].tail(max(1, len(losses) // 10)).mean())


def loss_windows(losses: pd.DataFrame, windows: int = 50) -> pd.DataFrame:
    """The loss averaged over at most `windows` runs of consecutive steps (the table the UI
    shows; every step is in the run's `loss.csv`)."""
    group = (losses.index * windows // max(1, len(losses))).rename("window")
    return losses.groupby(group).agg(
        step=("step", "last"), epoch=("epoch", "last"), loss=("loss", "mean"), learning_rate=("learning_rate", "last")
    ).reset_index(drop=True)


def smoothed_loss(losses: pd.DataFrame) -> pd.DataFrame:
    """Every step's loss with a moving average over a twentieth of the run."""
    window = max(1, len(losses) // 20)
    return losses.assign(smoothed=losses["loss"].rolling(window, min_periods=1).mean())
