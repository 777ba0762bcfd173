"""lora_checkpoints: train the character's LoRA on the bucketed dataset.

torch and Lightning are imported inside the asset (see assets/dataset.py for why).
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from lora_factory.assets.dataset import BucketsFiles, CaptionsFiles, buckets, captions
from lora_factory.assets.metadata import table_metadata
from lora_factory.assets.stage import AssetFiles, Stage, character_asset
from lora_factory.captioning.captions import tag_frequency
from lora_factory.provenance import fingerprint
from lora_factory.resources import BaseModelResource, FactoryStorage
from lora_factory.resources.models import TINY_BASE_MODEL
from lora_factory.storage import read_json, read_table, write_table
from lora_factory.training.config import TrainingConfig

# The tiny demo base model has random weights: its LoRAs are meaningless, so the demo
# trains only long enough to make a few real checkpoints.
TINY_MODEL_STEPS = 96
TINY_MODEL_SAVE_EVERY = 24


class TrainingSettings(dg.Config):
    """Training knobs; 0 means "decided for you": rank, alpha and the training length from
    the dataset size (more images, fewer epochs), learning rates from the optimizer."""

    network_type: str = "lora"  # lora | loha | lokr (LyCORIS layout)
    rank: int = 0
    alpha: float = 0.0
    lokr_factor: int = -1
    max_train_steps: int = 0
    max_train_epochs: int = 0
    save_every_n_steps: int = 0
    batch_size: int = 4
    optimizer: str = "adamw"  # adamw (8-bit with bitsandbytes on a GPU) | adamw8bit | prodigy
    unet_learning_rate: float = 0.0
    text_encoder_learning_rate: float = 0.0
    train_text_encoder: bool = True
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    caption_shuffle: bool = True
    caption_dropout: float = 0.0
    flip: bool = False
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0

    def training_config(self, resolution: int, clip_skip: int, tiny_base: bool) -> TrainingConfig:
        steps = self.max_train_steps or None
        if steps is None and not self.max_train_epochs and tiny_base:
            steps = TINY_MODEL_STEPS
        save_every = self.save_every_n_steps or (TINY_MODEL_SAVE_EVERY if tiny_base else None)
        return TrainingConfig(
            network_type=self.network_type,
            rank=self.rank or None,
            alpha=self.alpha or None,
            lokr_factor=self.lokr_factor,
            max_train_steps=steps,
            max_train_epochs=self.max_train_epochs or None,
            save_every_n_steps=save_every,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            unet_learning_rate=self.unet_learning_rate or None,
            text_encoder_learning_rate=self.text_encoder_learning_rate or None,
            train_text_encoder=self.train_text_encoder,
            lr_scheduler=self.lr_scheduler,
            lr_warmup_steps=self.lr_warmup_steps,
            min_snr_gamma=self.min_snr_gamma or None,
            noise_offset=self.noise_offset,
            input_perturbation=self.input_perturbation,
            caption_shuffle=self.caption_shuffle,
            caption_dropout=self.caption_dropout,
            flip=self.flip,
            mixed_precision=self.mixed_precision,
            gradient_checkpointing=self.gradient_checkpointing,
            resolution=resolution,
            clip_skip=clip_skip,
            seed=self.seed,
        )


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

    def run_config(self) -> dict[str, Any]:
        from lora_factory.training.train import MANIFEST_NAME

        return read_json(self.verified(self.folder / MANIFEST_NAME))["config"]


@character_asset(
    group_name="training",
    code_version="3",
    deps=[buckets, captions],
    pool="gpu",
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
        extra={"base": base_model.identity(storage.store()), "clip_skip": base_model.clip_skip},
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
        training_config = config.training_config(
            resolution, base_model.clip_skip, tiny_base=base_model.source == TINY_BASE_MODEL
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
    from lora_factory.training.train import MANIFEST_NAME

    table = read_table(table_path)
    run = read_json(output_dir / MANIFEST_NAME)
    return stage.result(
        {
            "dagster/row_count": len(table),
            # The resolved settings that really ran (rank, steps, learning rates, optimizer).
            "training_config": dg.MetadataValue.json(run["config"]),
            "checkpoints": table_metadata(table[["step", "epoch", "sha256", "path"]]),
            "final_checkpoint": dg.MetadataValue.path(table["path"].iloc[-1]),
            "output_dir": dg.MetadataValue.path(stage.files.relative(output_dir)),
        }
    )
