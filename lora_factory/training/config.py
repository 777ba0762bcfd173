"""Training settings for one character LoRA, with defaults from the community's practice.

Fields left at `None` are decided by the dataset's size (`TrainingConfig.resolved`), so
that ten thousand characters can be trained without hand-tuning each one:

- rank (network dim) grows with the number of images, inside the seeds' 4..32 range, and
  alpha is half the rank (the seeds' "alpha half of rank or less");
- the UNet's 3x3 convolutions are left alone unless `conv_rank` is set (kohya's
  `conv_dim`, "LoCon"; its alpha, `conv_alpha`, is half of it unless given);
- the number of epochs follows CyberHarem's idea that small datasets need many passes and
  big ones few (`EPOCHS_BY_DATASET_SIZE`); the step budget is epochs x batches per pass
  (or `max_train_epochs` passes over the repeated samples, or `max_train_steps`);
- learning rates follow the optimizer: AdamW's usual 1e-4 (UNet) / 5e-5 (text encoder),
  Prodigy's 1.0 (it estimates the step size itself; the rate only scales its estimate);
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
# A training run's manifest in its output folder (here, not in train.py, so that reading it
# does not import torch).
MANIFEST_NAME = "run.json"
# Every step's training loss (step, epoch, loss, learning_rate), next to the checkpoints.
LOSS_LOG_NAME = "loss.csv"

# "adamw" is bitsandbytes' 8-bit AdamW when bitsandbytes and a GPU are present (a quarter of
# the optimizer memory), torch's AdamW otherwise; "adamw8bit" insists on the 8-bit one.
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
# (UNet, text encoder) learning rates when none are given.
DEFAULT_LEARNING_RATES = {"adamw": (1e-4, 5e-5), "adamw8bit": (1e-4, 5e-5), "prodigy": (1.0, 1.0)}
DEFAULT_MULTIRES_NOISE_DISCOUNT = 0.3  # kohya's
# LoRA (kohya's networks.lora), LoHa (Hadamard product) and LoKr (Kronecker product), the
# last two written in LyCORIS' layout.
NETWORK_TYPES = ("lora", "loha", "lokr")
LR_SCHEDULERS = ("constant", "cosine")
DEFAULT_LR_SCHEDULER = "cosine"
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
    network_type: str = "lora"
    rank: int | None = None  # None: from the dataset size (4..32)
    alpha: float | None = None  # None: rank / 2
    # kohya's conv_dim / conv_alpha ("LoCon"): with a rank, the UNet's ResNet blocks and
    # down/upsamplers are adapted too (3x3 convolutions at this rank, their 1x1 shortcut
    # and time-embedding projection at `rank`). 0: attention blocks only; None: the base
    # model's default, else 0.
    conv_rank: int | None = None
    conv_alpha: float | None = None  # None: conv_rank / 2
    lokr_factor: int = -1  # LoKr's Kronecker factor; -1: the factor nearest the square root
    unet_learning_rate: float | None = None  # None: the base model's default, else the optimizer's
    text_encoder_learning_rate: float | None = None
    train_text_encoder: bool = True  # kohya's LoRA trains both by default; False: UNet only
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_scheduler: str | None = None  # None: the base model's default, else cosine
    lr_warmup_steps: int = 0
    batch_size: int = 4
    # None: max_train_epochs, else the base model's default, else from the dataset size
    max_train_steps: int | None = None
    max_train_epochs: int | None = None  # passes over the repeated samples; exclusive with steps
    # None: the base model's default when its length is used, else about TARGET_CHECKPOINTS saves
    save_every_n_steps: int | None = None
    log_every_n_steps: int = 10
    resolution: int = 512  # the bucketing resolution; recorded in the LoRA's metadata
    seed: int = 0
    min_snr_gamma: float | None = 5.0  # None or 0 disables min-SNR weighting
    # Coarse noise (training.noise); None: the base model's default, else off. kohya's noise
    # offset is a random constant per latent channel (~0.05-0.1); its multi-resolution noise
    # adds noise at up to `multires_noise_iterations` halvings of the latent size, level k
    # weighted `multires_noise_discount ** k` (None: 0.3, kohya's default).
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float | None = None
    input_perturbation: float = 0.0  # extra noise on the model input only (Ning et al. 2023); ~0.1
    caption_shuffle: bool = True
    keep_tokens: int = 1  # the trigger word stays first when captions are shuffled
    caption_dropout: float = 0.0  # share of captions left empty
    # Share of the tags after the first keep_tokens left out of each caption (kohya's
    # caption_tag_dropout_rate): the trigger word then carries the character on its own,
    # not together with the tags that always come with it. None: the base model's default, else 0.
    caption_tag_dropout: float | None = None
    flip: bool = False  # only for symmetric characters
    mixed_precision: str = "auto"  # auto: "no" on CPU, bf16 (or fp16) on GPU
    save_precision: str = "fp16"
    clip_skip: int = 2
    gradient_checkpointing: bool = False
    # torch.compile the UNet (adapters included): fused kernels, far fewer launches. Pays on
    # GPUs where the host cannot launch kernels as fast as the GPU runs them (SD1.5 at 512 px,
    # batch 8); compiling takes minutes at the start of a run (SD1.5 on an H200: over a minute
    # and a half), and once more when bucket shapes start to vary (then compiled as dynamic).
    torch_compile: bool = False
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if self.conv_rank is not None and self.conv_rank < 0:
            problems.append(f"conv_rank must be >= 0, got {self.conv_rank}")
        if self.conv_alpha is not None and self.conv_alpha <= 0:
            problems.append(f"conv_alpha must be > 0, got {self.conv_alpha}")
        if self.conv_alpha is not None and self.conv_rank == 0:
            problems.append("conv_alpha is set but conv_rank is 0 (no conv adapters): give conv_rank too")
        if self.network_type not in NETWORK_TYPES:
            problems.append(f"network_type {self.network_type!r} is not one of {NETWORK_TYPES}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            problems.append(f"lokr_factor must be -1 (automatic) or >= 1, got {self.lokr_factor}")
        for name in ("unet_learning_rate", "text_encoder_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.lr_scheduler is not None and self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler {self.lr_scheduler!r} is not one of {LR_SCHEDULERS}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            problems.append(f"mixed_precision {self.mixed_precision!r} is not one of {MIXED_PRECISIONS}")
        if self.save_precision not in SAVE_PRECISIONS:
            problems.append(f"save_precision {self.save_precision!r} is not one of {SAVE_PRECISIONS}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_train_steps", "max_train_epochs", "save_every_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.max_train_steps is not None and self.max_train_epochs is not None:
            problems.append("give max_train_steps or max_train_epochs, not both")
        for name in ("noise_offset", "input_perturbation", "multires_noise_iterations"):
            if (getattr(self, name) or 0) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.multires_noise_discount is not None and not 0.0 < self.multires_noise_discount <= 1.0:
            problems.append(f"multires_noise_discount must be in (0, 1], got {self.multires_noise_discount}")
        if self.log_every_n_steps < 1:
            problems.append(f"log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        for name in ("caption_dropout", "caption_tag_dropout"):
            if not 0.0 <= (getattr(self, name) or 0.0) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.keep_tokens < 0:
            problems.append(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.clip_skip < 1:
            problems.append(f"clip_skip must be >= 1 (A1111 convention), got {self.clip_skip}")
        if problems:
            raise ValueError("invalid TrainingConfig: " + "; ".join(problems))

    def resolved(self, n_images: int, batches_per_epoch: int | None = None) -> TrainingConfig:
        """A copy with every dataset-dependent field (None) decided for `n_images` images.

        `batches_per_epoch` (of the bucket sampler, repeats included) turns
        `max_train_epochs` into steps; without it an epoch is ceil(n_images / batch_size).
        """
        rank = self.rank if self.rank is not None else rank_for_dataset(n_images)
        alpha = self.alpha if self.alpha is not None else rank / 2
        conv_rank = self.conv_rank or 0
        if self.conv_alpha is not None and not conv_rank:
            raise ValueError("invalid TrainingConfig: conv_alpha is set but no conv_rank: give conv_rank too")
        conv_alpha = (self.conv_alpha or conv_rank / 2) if conv_rank else None
        if self.max_train_steps is not None:
            steps = self.max_train_steps
        elif self.max_train_epochs is not None:
            steps = self.max_train_epochs * (batches_per_epoch or math.ceil(n_images / self.batch_size))
        else:
            steps = steps_for_dataset(n_images, self.batch_size)
        save_every = self.save_every_n_steps or max(1, math.ceil(steps / TARGET_CHECKPOINTS))
        unet_lr, text_encoder_lr = DEFAULT_LEARNING_RATES[self.optimizer]
        return replace(
            self,
            rank=rank,
            alpha=alpha,
            conv_rank=conv_rank,
            conv_alpha=conv_alpha,
            max_train_steps=steps,
            max_train_epochs=None,  # now counted in steps
            save_every_n_steps=save_every,
            lr_scheduler=self.lr_scheduler or DEFAULT_LR_SCHEDULER,
            unet_learning_rate=self.unet_learning_rate or unet_lr,
            text_encoder_learning_rate=self.text_encoder_learning_rate or text_encoder_lr,
            noise_offset=self.noise_offset or 0.0,
            multires_noise_iterations=self.multires_noise_iterations or 0,
            multires_noise_discount=self.multires_noise_discount or DEFAULT_MULTIRES_NOISE_DISCOUNT,
            caption_tag_dropout=self.caption_tag_dropout or 0.0,
        )

    @property
    def is_resolved(self) -> bool:
        return None not in (
            self.rank,
            self.alpha,
            self.conv_rank,
            self.max_train_steps,
            self.save_every_n_steps,
            self.lr_scheduler,
            self.unet_learning_rate,
            self.text_encoder_learning_rate,
            self.noise_offset,
            self.multires_noise_iterations,
            self.multires_noise_discount,
            self.caption_tag_dropout,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
