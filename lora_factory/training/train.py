"""Train one character LoRA: Lightning drives the loop, kohya-format files come out.

`train_lora` is reproducible and restartable:

- the run is identified by a hash of everything that decides its result (resolved config,
  base model weights, image bytes, captions, buckets, repeats, names and metadata); whether
  to train at all is the caller's decision (the `lora_checkpoints` asset reuses a verified
  earlier result), this hash only decides whether a resume point belongs to this run;
- every `save_every_n_steps` steps it writes `<output_name>-<step:06d>.safetensors` and a
  small Lightning checkpoint (adapters, optimizer, scheduler, loop and sampler position);
  a killed run with the same hash resumes from that checkpoint and produces the same
  files the uninterrupted run would have (all randomness is seeded by position);
- a run with a different hash replaces the previous run's files in `output_dir`;
- on a machine with several GPUs each run claims one free GPU (`gpu.claim_gpu`); a run
  that runs out of GPU memory fails with a message listing the settings to change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch

from lora_factory.storage import atomic_write_json, atomic_write_text, sha256_file
from lora_factory.training.base_model import base_weights_sha256, load_base_model, pick_device, side_multiple_of
from lora_factory.training.config import LOSS_LOG_NAME, MANIFEST_NAME, TrainingConfig
from lora_factory.training.dataset import CaptionedLatentDataset, TrainingExample
from lora_factory.training.gpu import claimed_device
from lora_factory.training.kohya_format import (
    SAVE_DTYPES,
    kohya_metadata,
    network_metadata,
    read_kohya_lora,
    save_kohya_lora,
)
from lora_factory.training.module import LatentCache, LoraTrainingModule
from lora_factory.training.optimizers import optimizer_description, resolve_optimizer

# Bump when a code change alters what a training run produces, so old runs are redone.
TRAINING_RECIPE_VERSION = 2
STATE_DIR_NAME = ".training_state"
STATE_FILE_NAME = "last.ckpt"
KOHYA_PRECISION_NAMES = {"32-true": "no", "16-mixed": "fp16", "bf16-mixed": "bf16"}
# Settings that change how a run reports, how fast it runs or how much memory it needs, not
# what it produces: a run that ran out of memory resumes from its last state with gradient
# checkpointing on.
NON_RESULT_FIELDS = ("log_every_n_steps", "gradient_checkpointing", "torch_compile")


class TrainingOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory; the message lists the settings that need less."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    epoch: int
    path: Path
    sha256: str


def checkpoint_file_name(output_name: str, step: int) -> str:
    return f"{output_name}-{step:06d}.safetensors"


def save_steps(max_train_steps: int, save_every_n_steps: int) -> list[int]:
    """The steps that get a LoRA file: every `save_every_n_steps`, and always the last one."""
    return sorted(set(range(save_every_n_steps, max_train_steps + 1, save_every_n_steps)) | {max_train_steps})


def train_lora(
    base_source: str | Path,
    examples: list[TrainingExample],
    output_dir: Path,
    config: TrainingConfig,
    output_name: str,
    trigger_word: str,
    tag_frequency: dict,
    dataset_dirs: dict,
    log: Callable[[str], None] = print,
    *,
    base_config: str | Path | None = None,
    latent_cache_dir: Path | None = None,
    device: torch.device | str | None = None,
    gpu_lock_dir: Path | None = None,
) -> list[CheckpointInfo]:
    """Train an adapter on `examples` and return its checkpoints, oldest first.

    `base_config` is passed to `load_base_model` for single-file base models;
    `latent_cache_dir` keeps VAE latents across runs (keyed by base weights + image bytes);
    `device` defaults to a GPU when there is one (with `gpu_lock_dir`, a free one claimed
    for this run; without, the first), else the CPU.
    """
    _check_output_name(output_name)
    if not examples:
        raise ValueError("no training examples: nothing to train on")
    with ExitStack() as stack:
        if device is None and gpu_lock_dir is not None:
            device = stack.enter_context(claimed_device(gpu_lock_dir, log=log))
        device = torch.device(device) if device is not None else pick_device()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return _train_on(
            base_source,
            examples,
            Path(output_dir),
            config,
            output_name,
            trigger_word,
            tag_frequency,
            dataset_dirs,
            log,
            base_config,
            latent_cache_dir,
            device,
        )


def _check_buckets_fit(examples: list[TrainingExample], multiple: int) -> None:
    """Refuse buckets the base model cannot take (sides not multiples of `multiple`)
    before anything of an earlier run is touched."""
    odd = [example for example in examples if example.bucket[0] % multiple or example.bucket[1] % multiple]
    if odd:
        raise ValueError(
            f"{len(odd)} training picture(s) have buckets the base model cannot take (its sides must be "
            f"multiples of {multiple} px), e.g. {odd[0].image_path}: {odd[0].bucket}; bucket with a step of {multiple}"
        )


def _train_on(
    base_source,
    examples,
    output_dir,
    config,
    output_name,
    trigger_word,
    tag_frequency,
    dataset_dirs,
    log,
    base_config,
    latent_cache_dir,
    device: torch.device,
) -> list[CheckpointInfo]:
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = CaptionedLatentDataset(
        examples,
        seed=config.seed,
        caption_shuffle=config.caption_shuffle,
        keep_tokens=config.keep_tokens,
        caption_dropout=config.caption_dropout,
        caption_tag_dropout=config.caption_tag_dropout or 0.0,  # the same as resolved() decides
        flip=config.flip,
    )
    batches_per_epoch = len(dataset.batch_sampler(config.batch_size))
    config = config.resolved(len(examples), batches_per_epoch)
    # What will really run ("adamw" may be the 8-bit one): part of the run's identity.
    config = replace(config, optimizer=resolve_optimizer(config.optimizer, device))

    base_hash = base_weights_sha256(base_source)
    precision = lightning_precision(config.mixed_precision, device)
    base = load_base_model(
        base_source,
        clip_skip=config.clip_skip,
        dtype=weights_dtype(precision),
        device="cpu",  # Lightning moves the trained parts to `device`
        config=base_config,
        weights_sha256=base_hash,
    )
    _check_buckets_fit(examples, side_multiple_of(base.unet.config, base.vae.config))
    image_hashes = [sha256_file(Path(example.image_path)) for example in examples]
    run_hash = _run_hash(
        config, base_hash, examples, image_hashes, output_name, trigger_word, tag_frequency, dataset_dirs
    )
    manifest_path = output_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    state_path = output_dir / STATE_DIR_NAME / STATE_FILE_NAME

    resume_from = None
    if manifest and manifest["run_hash"] == run_hash and state_path.is_file():
        resume_from = state_path
        log(f"{output_name}: resuming the interrupted run from {state_path.name}")
    elif manifest:
        _remove_previous_run(output_dir, manifest, log)
    atomic_write_json(manifest_path, {"run_hash": run_hash, "status": "running", "output_name": output_name})

    latent_cache = LatentCache(base, dataset, latent_cache_dir, image_hashes)
    module = LoraTrainingModule(base, dataset, config, latent_cache, log=log)
    metadata_for_step = _metadata_factory(
        config, base, output_name, trigger_word, tag_frequency, dataset_dirs, examples, batches_per_epoch, precision
    )
    saver = LoraCheckpointSaver(
        output_dir, output_name, config, batches_per_epoch, metadata_for_step, state_path, log
    )
    trainer = make_trainer(config, device, precision, [saver], output_dir / STATE_DIR_NAME)
    log(
        f"{output_name}: training {config.network_type} for {config.max_train_steps} steps "
        f"({len(examples)} images, {len(dataset)} samples per epoch, batch {config.batch_size}, "
        f"rank {config.rank}, alpha {config.alpha}"
        + (f", conv rank {config.conv_rank}, conv alpha {config.conv_alpha}" if config.conv_rank else "")
        + f", {config.optimizer}) on {device}, precision {precision}"
        + (", UNet compiled (the first step compiles it)" if config.torch_compile else "")
    )
    with quiet_lightning_warnings():
        try:
            # The resume state holds only tensors and plain containers: no pickled code runs.
            trainer.fit(module, ckpt_path=resume_from, weights_only=True)
        except torch.OutOfMemoryError as error:
            raise TrainingOutOfMemoryError(out_of_memory_advice(output_name, config, precision, device)) from error

    checkpoints = [
        _checkpoint_info(output_dir / checkpoint_file_name(output_name, step), step)
        for step in save_steps(config.max_train_steps, config.save_every_n_steps)
    ]
    atomic_write_json(
        manifest_path,
        {
            "run_hash": run_hash,
            "status": "finished",
            "output_name": output_name,
            "config": config.to_dict(),
            # Its name and weights identify the base model; not its path, which differs per
            # machine and mount point (the outputs stay byte-identical wherever they are made).
            "base_model": {"name": base.name, "sha256": base.sha256},
            "checkpoints": [
                {"step": c.step, "epoch": c.epoch, "file": c.path.name, "sha256": c.sha256} for c in checkpoints
            ],
        },
    )
    state_path.unlink(missing_ok=True)  # a finished run needs no resume point
    if state_path.parent.is_dir() and not any(state_path.parent.iterdir()):
        state_path.parent.rmdir()
    return checkpoints


def make_trainer(
    config: TrainingConfig, device: torch.device, precision: str, callbacks: list, root_dir: Path
) -> L.Trainer:
    """The Lightning trainer of a run: one device, no Lightning logging or checkpointing
    (the callbacks save what the factory needs), deterministic on CPU."""
    if device.type == "cuda":
        # Fastest conv algorithms for the fixed bucket shapes; TF32 for what stays in fp32.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" else 1,
        max_steps=config.max_train_steps,
        max_epochs=-1,
        precision=precision,
        deterministic=device.type == "cpu" or None,
        gradient_clip_val=config.max_grad_norm,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=root_dir,
        callbacks=callbacks,
    )


@contextmanager
def quiet_lightning_warnings() -> Iterator[None]:
    """Silence Lightning warnings that do not apply to these runs."""
    with warnings.catch_warnings():
        # Latents are cached in memory: loader workers would only add start-up time.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing to act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
        yield


def lightning_precision(mixed_precision: str, device: torch.device) -> str:
    """Lightning's precision name for a config's `mixed_precision` on `device`."""
    if mixed_precision == "auto":
        if device.type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if mixed_precision != "no" and device.type != "cuda":
        raise ValueError(f"mixed_precision={mixed_precision!r} needs a GPU; use 'no' or 'auto' on CPU")
    return {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[mixed_precision]


def weights_dtype(precision: str) -> torch.dtype:
    """Frozen base weights in the autocast dtype: half the memory, same compute."""
    return {"32-true": torch.float32, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[precision]


def out_of_memory_advice(output_name: str, config: TrainingConfig, precision: str, device: torch.device) -> str:
    """What to change, in the order that costs the result least, when a run does not fit in memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    changes = []
    if config.batch_size > 1:
        changes.append(f"batch_size={max(1, config.batch_size // 2)} (now {config.batch_size})")
    if not config.gradient_checkpointing:
        changes.append(
            "gradient_checkpointing=True (far less activation memory, about a third slower; "
            "the only change that keeps this run's progress)"
        )
    if precision == "32-true":
        changes.append("mixed_precision='bf16' (or 'fp16' on GPUs without bf16)")
    if config.optimizer != "adamw8bit":
        changes.append("optimizer='adamw8bit' (install bitsandbytes)")
    if config.train_text_encoder:
        changes.append("train_text_encoder=False")
    changes.append(f"a lower bucketing resolution (now {config.resolution}) or rank (now {config.rank})")
    return (
        f"{output_name}: out of memory on {device} training batch {config.batch_size} at resolution "
        f"{config.resolution}. Change one of: " + "; ".join(changes) + "."
    )


class LoraCheckpointSaver(L.Callback):
    """Writes the kohya LoRA file (then the resume state) at each save step, and logs progress."""

    def __init__(
        self,
        output_dir: Path,
        output_name: str,
        config: TrainingConfig,
        batches_per_epoch: int,
        metadata_for_step: Callable[[int, int], dict[str, str]],
        state_path: Path,
        log: Callable[[str], None],
    ):
        self.output_dir = output_dir
        self.output_name = output_name
        self.config = config
        self.batches_per_epoch = batches_per_epoch
        self.metadata_for_step = metadata_for_step
        self.state_path = state_path
        self.report = log  # not `self.log`: Lightning overwrites a callback's `log` attribute
        self.steps_to_save = set(save_steps(config.max_train_steps, config.save_every_n_steps))
        self._losses: list[float] = []
        self._window_start = time.perf_counter()
        self._window_first_step = 0
        self.loss_log = LossLog(output_dir / LOSS_LOG_NAME)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._window_start = time.perf_counter()
        self._window_first_step = trainer.global_step
        self.loss_log.start_at(trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        step = trainer.global_step
        loss = float(outputs["loss"])
        self._losses.append(loss)
        self.loss_log.append(step, self.epoch_of(step), loss, trainer.optimizers[0].param_groups[0]["lr"])
        if step in self.steps_to_save:
            self._save(trainer, module, step)
        if step % self.config.log_every_n_steps == 0 or step == self.config.max_train_steps:
            self._log_progress(trainer, step)

    def epoch_of(self, step: int) -> int:
        """The 1-based epoch a step belongs to (kohya's `ss_epoch`)."""
        return max(1, math.ceil(step / self.batches_per_epoch))

    def _save(self, trainer: L.Trainer, module: LoraTrainingModule, step: int) -> None:
        tensors = module.kohya_tensors(SAVE_DTYPES[self.config.save_precision])
        path = self.output_dir / checkpoint_file_name(self.output_name, step)
        save_kohya_lora(path, tensors, self.metadata_for_step(step, self.epoch_of(step)))
        if step < self.config.max_train_steps:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.state_path.with_name(self.state_path.name + ".partial")
            trainer.save_checkpoint(partial, weights_only=False)  # with optimizer and scheduler state
            os.replace(partial, self.state_path)
        self.report(f"{self.output_name}: saved {path.name}")

    def _log_progress(self, trainer: L.Trainer, step: int) -> None:
        now = time.perf_counter()
        steps_done = max(1, step - self._window_first_step)
        seconds_per_step = (now - self._window_start) / steps_done
        learning_rate = trainer.optimizers[0].param_groups[0]["lr"]
        self.report(
            f"{self.output_name}: step {step}/{self.config.max_train_steps} epoch {self.epoch_of(step)} "
            f"loss {self._losses[-1]:.4f} (mean {sum(self._losses) / len(self._losses):.4f}) "
            f"lr {learning_rate:.2e} {seconds_per_step:.3f} s/step"
        )
        self._losses.clear()
        self._window_start, self._window_first_step = now, step


class LossLog:
    """Every step's training loss in a CSV file (step, epoch, loss, learning_rate), the
    record kohya users read in TensorBoard. Floats are written exactly (repr), so a resumed
    run, which repeats the same seeded steps, writes the same file as an uninterrupted one."""

    HEADER = "step,epoch,loss,learning_rate\n"

    def __init__(self, path: Path):
        self.path = path

    def start_at(self, step: int) -> None:
        """Keep the records up to `step`, where training (re)starts: a resumed run repeats
        the steps after its last save."""
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()[1:] if int(line.split(",")[0]) <= step]
        atomic_write_text(self.path, self.HEADER + "".join(f"{line}\n" for line in kept))

    def append(self, step: int, epoch: int, loss: float, learning_rate: float) -> None:
        with self.path.open("a") as log:
            log.write(f"{step},{epoch},{loss!r},{float(learning_rate)!r}\n")


def _metadata_factory(
    config, base, output_name, trigger_word, tag_frequency, dataset_dirs, examples, batches_per_epoch, precision
):
    buckets: dict[str, int] = {}
    for example in examples:
        key = f"{example.bucket[0]}x{example.bucket[1]}"
        buckets[key] = buckets.get(key, 0) + example.repeats
    network_module, network_args = network_metadata(
        config.network_type, config.lokr_factor, config.conv_rank, config.conv_alpha
    )
    shared = dict(
        output_name=output_name,
        trigger_word=trigger_word,
        network_module=network_module,
        network_args=network_args,
        network_dim=config.rank,
        network_alpha=config.alpha,
        tag_frequency=tag_frequency,
        dataset_dirs=dataset_dirs,
        base_model_name=base.name,
        base_model_hash=base.sha256,
        seed=config.seed,
        resolution=config.resolution,
        optimizer=optimizer_description(config.optimizer, config.weight_decay, config.lr_warmup_steps),
        learning_rate=config.unet_learning_rate,
        text_encoder_learning_rate=config.text_encoder_learning_rate,
        train_text_encoder=config.train_text_encoder,
        clip_skip=config.clip_skip,
        max_train_steps=config.max_train_steps,
        num_train_images=sum(example.repeats for example in examples),
        num_batches_per_epoch=batches_per_epoch,
        batch_size=config.batch_size,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        min_snr_gamma=config.min_snr_gamma,
        noise_offset=config.noise_offset,
        # kohya writes the discount only with the iterations that use it
        multires_noise_iterations=config.multires_noise_iterations or None,
        multires_noise_discount=config.multires_noise_discount if config.multires_noise_iterations else None,
        input_perturbation=config.input_perturbation,
        num_epochs=math.ceil(config.max_train_steps / batches_per_epoch),
        gradient_checkpointing=config.gradient_checkpointing,
        caption_shuffle=config.caption_shuffle,
        keep_tokens=config.keep_tokens,
        caption_dropout=config.caption_dropout,
        caption_tag_dropout=config.caption_tag_dropout,
        flip=config.flip,
        mixed_precision=KOHYA_PRECISION_NAMES[precision],
        bucket_info={"buckets": buckets},
    )

    def metadata_for_step(step: int, epoch: int) -> dict[str, str]:
        return kohya_metadata(steps=step, epoch=epoch, **shared)

    return metadata_for_step


def _run_hash(
    config, base_hash, examples, image_hashes, output_name, trigger_word, tag_frequency, dataset_dirs
) -> str:
    config_fields = {key: value for key, value in config.to_dict().items() if key not in NON_RESULT_FIELDS}
    identity = {
        "recipe": TRAINING_RECIPE_VERSION,
        "config": config_fields,
        "base_model_sha256": base_hash,
        "examples": [
            [image_hash, example.caption, list(example.bucket), example.repeats]
            for example, image_hash in zip(examples, image_hashes)
        ],
        "output_name": output_name,
        "trigger_word": trigger_word,
        "tag_frequency": tag_frequency,
        "dataset_dirs": dataset_dirs,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _remove_previous_run(output_dir: Path, manifest: dict, log: Callable[[str], None]) -> None:
    """Delete the files a different earlier run left here, so they cannot be mistaken for this run's."""
    name = manifest.get("output_name")
    stale = sorted(output_dir.glob(f"{glob.escape(name)}-*.safetensors")) if name else []
    stale.append(output_dir / STATE_DIR_NAME / STATE_FILE_NAME)
    removed = 0
    for path in stale:
        if path.is_file():
            path.unlink()
            removed += 1
    if removed:
        log(f"removed {removed} files of a previous run with another configuration in {output_dir}")


def _checkpoint_info(path: Path, step: int) -> CheckpointInfo:
    if not path.is_file():
        raise RuntimeError(f"training ended without writing {path.name}: the run stopped early")
    _, metadata = read_kohya_lora(path)
    return CheckpointInfo(step=step, epoch=int(metadata["ss_epoch"]), path=path, sha256=sha256_file(path))


def _check_output_name(output_name: str) -> None:
    if not output_name or any(char in output_name for char in '/\\:*?"<>|') or output_name.startswith("."):
        raise ValueError(f"output_name {output_name!r} must be a plain file name stem (e.g. 'surtr_arknights')")

