"""Training settings for one character LoRA, with defaults from the community's practice.

Fields left at `None` are decided by the dataset's size (`TrainingConfig.resolved`), so
that ten thousand characters can be trained without hand-tuning each one:

- rank (network dim) grows with the number of images, inside the seeds' 4..32 range, and
  alpha is half the rank (the seeds' "alpha half of rank or less");
- the number of epochs follows CyberHarem's idea that small datasets need many passes and
  big ones few (`EPOCHS_BY_DATASET_SIZE`); the step budget is epochs x batches per pass;
- checkpoints are saved about `TARGET_CHECKPOINTS` times per run, so that the step picker
  downstream has a curve to choose from whatever the run's length.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace

# (largest dataset size, epochs). Reproduces the shape of CyberHarem's table: 80 epochs
# for <=100 images down to 6 epochs beyond 10k; the middle rows are interpolated.
EPOCHS_BY_DATASET_SIZE: tuple[tuple[int, int], ...] = (
    (100, 80),
    (200, 50),
    (500, 30),
    (1_000, 20),
    (2_000, 15),
    (5_000, 10),
    (10_000, 8),
)
EPOCHS_ABOVE_TABLE = 6

# (largest dataset size, rank): more images carry more detail worth a bigger network.
RANK_BY_DATASET_SIZE: tuple[tuple[int, int], ...] = ((50, 4), (200, 8), (1_000, 16))
RANK_ABOVE_TABLE = 32

TARGET_CHECKPOINTS = 10

OPTIMIZERS = ("adamw",)
LR_SCHEDULERS = ("constant", "cosine")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")


def epochs_for_dataset(n_images: int) -> int:
    if n_images < 1:
        raise ValueError(f"a training set needs at least one image, got {n_images}")
    for max_images, epochs in EPOCHS_BY_DATASET_SIZE:
        if n_images <= max_images:
            return epochs
    return EPOCHS_ABOVE_TABLE


def steps_for_dataset(n_images: int, batch_size: int) -> int:
    """Optimizer steps for `n_images` distinct images: epochs from the table x batches per pass.

    Counted on distinct images, not on repeats: repeats rebalance which images are seen,
    they should not multiply the training budget.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return epochs_for_dataset(n_images) * math.ceil(n_images / batch_size)


def rank_for_dataset(n_images: int) -> int:
    for max_images, rank in RANK_BY_DATASET_SIZE:
        if n_images <= max_images:
            return rank
    return RANK_ABOVE_TABLE


@dataclass(frozen=True)
class TrainingConfig:
    rank: int | None = None  # None: from the dataset size (4..32)
    alpha: float | None = None  # None: rank / 2
    unet_learning_rate: float = 1e-4
    text_encoder_learning_rate: float = 5e-5
    train_text_encoder: bool = True  # kohya's LoRA trains both by default
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    batch_size: int = 4
    max_train_steps: int | None = None  # None: from the dataset size (steps_for_dataset)
    save_every_n_steps: int | None = None  # None: about TARGET_CHECKPOINTS saves per run
    log_every_n_steps: int = 10
    resolution: int = 512  # the bucketing resolution; recorded in the LoRA's metadata
    seed: int = 0
    min_snr_gamma: float | None = 5.0  # None or 0 disables min-SNR weighting
    noise_offset: float = 0.0
    caption_shuffle: bool = True
    keep_tokens: int = 1  # the trigger word stays first when captions are shuffled
    caption_dropout: float = 0.0
    flip: bool = False  # only for symmetric characters
    mixed_precision: str = "auto"  # auto: "no" on CPU, bf16 (or fp16) on GPU
    save_precision: str = "fp16"
    clip_skip: int = 2
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler {self.lr_scheduler!r} is not one of {LR_SCHEDULERS}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            problems.append(f"mixed_precision {self.mixed_precision!r} is not one of {MIXED_PRECISIONS}")
        if self.save_precision not in SAVE_PRECISIONS:
            problems.append(f"save_precision {self.save_precision!r} is not one of {SAVE_PRECISIONS}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_train_steps", "save_every_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.log_every_n_steps < 1:
            problems.append(f"log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.keep_tokens < 0:
            problems.append(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.clip_skip < 1:
            problems.append(f"clip_skip must be >= 1 (A1111 convention), got {self.clip_skip}")
        if problems:
            raise ValueError("invalid TrainingConfig: " + "; ".join(problems))

    def resolved(self, n_images: int) -> TrainingConfig:
        """A copy with every dataset-dependent field (None) decided for `n_images` images."""
        rank = self.rank if self.rank is not None else rank_for_dataset(n_images)
        alpha = self.alpha if self.alpha is not None else rank / 2
        steps = self.max_train_steps or steps_for_dataset(n_images, self.batch_size)
        save_every = self.save_every_n_steps or max(1, math.ceil(steps / TARGET_CHECKPOINTS))
        return replace(self, rank=rank, alpha=alpha, max_train_steps=steps, save_every_n_steps=save_every)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.rank, self.alpha, self.max_train_steps, self.save_every_n_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
