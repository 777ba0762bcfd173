"""The adapter training step as a LightningModule: cached VAE latents, seeded noise, epsilon
(or v) prediction, min-SNR weighted MSE, noise offset and input perturbation, AdamW or
Prodigy on the adapters only.

Adapters are peft LoRA / LoHa / LoKr layers on the modules kohya's `networks.lora` trains
for SD1.5 (see `adapters.py`). All randomness of a step (noise, timesteps) comes from a
generator seeded with (seed, global step), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import lightning as L
import safetensors.torch
import torch
import torch.nn.functional as F

from lora_factory.storage import atomic_write_bytes, sha256_file

# add_lora_adapters is re-exported: other stages build LoRA adapters from here.
from lora_factory.training.adapters import add_adapters, add_lora_adapters  # noqa: F401
from lora_factory.training.base_model import (
    BaseModel,
    encode_token_ids,
    tokenize_captions,
)
from lora_factory.training.config import TrainingConfig
from lora_factory.training.dataset import BucketDataLoader, CaptionedLatentDataset
from lora_factory.training.kohya_format import peft_to_kohya_state_dict
from lora_factory.training.noise import training_noise
from lora_factory.training.optimizers import build_optimizer

VAE_BATCH_SIZE = 8


class LatentCache:
    """VAE latents (already x scaling factor) of one dataset's (example, flip) pairs: in
    memory for the run, and optionally on disk keyed by (base model weights, image bytes,
    bucket, flip) so that another run on the same images skips the VAE."""

    def __init__(
        self,
        base: BaseModel,
        dataset: CaptionedLatentDataset,
        cache_dir: Path | None = None,
        image_hashes: list[str] | None = None,
    ):
        self.base = base
        self.dataset = dataset
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None and image_hashes is None:
            image_hashes = [sha256_file(Path(example.image_path)) for example in dataset.examples]
        self.image_hashes = image_hashes
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}

    def _disk_path(self, index: int, flip: bool) -> Path:
        bucket = self.dataset.examples[index].bucket
        text = f"{self.base.sha256}:{self.image_hashes[index]}:{bucket[0]}x{bucket[1]}:{int(flip)}"
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def fill(self, device: torch.device, log: Callable[[str], None] = print) -> None:
        """Make sure every (example, flip variant) of the dataset has its latent."""
        examples = self.dataset.examples
        wanted = [(index, flip) for index in range(len(examples)) for flip in self.dataset.flip_variants()]
        missing = [item for item in wanted if item not in self.latents]
        if self.cache_dir is not None:
            for item in list(missing):
                path = self._disk_path(*item)
                if path.is_file():
                    self.latents[item] = safetensors.torch.load_file(path)["latent"]
                    missing.remove(item)
        if not missing:
            return
        log(f"encoding {len(missing)} training images with the VAE")
        vae = self.base.vae
        original_device = next(vae.parameters()).device
        vae.to(device)
        try:
            by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = {}
            for item in missing:
                by_bucket.setdefault(examples[item[0]].bucket, []).append(item)
            for items in by_bucket.values():
                for start in range(0, len(items), VAE_BATCH_SIZE):
                    chunk = items[start : start + VAE_BATCH_SIZE]
                    pixels = torch.stack([self.dataset.load_pixels(index, flip) for index, flip in chunk])
                    # The distribution's mean: deterministic, and the VAE's variance is tiny.
                    encoded = vae.encode(pixels.to(device, dtype=vae.dtype)).latent_dist.mode()
                    encoded = (encoded * vae.config.scaling_factor).float().cpu()
                    for item, latent in zip(chunk, encoded):
                        self.latents[item] = latent.contiguous()
                        if self.cache_dir is not None:
                            data = safetensors.torch.save({"latent": self.latents[item]})
                            atomic_write_bytes(self._disk_path(*item), data)
        finally:
            vae.to(original_device)

    def batch(self, example_ids: list[int], flips: list[bool]) -> torch.Tensor:
        return torch.stack([self.latents[(index, flip)] for index, flip in zip(example_ids, flips)])


def skip_adapter_input_casts(*models: torch.nn.Module) -> None:
    """Stop peft casting each adapter's input to its fp32 weights' dtype.

    Training runs either in fp32 (nothing to cast) or under autocast, which computes the
    adapter in bf16 / fp16 whatever its input: there the cast is an exact round trip
    (bf16 -> fp32 -> bf16) that costs two kernels per adapter and step: 702 of the 10,381
    operations an SD1.5 step dispatches (rank 32), on GPUs where launching kernels is what
    limits a step.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False


class LoraTrainingModule(L.LightningModule):
    def __init__(
        self,
        base: BaseModel,
        dataset: CaptionedLatentDataset,
        config: TrainingConfig,
        latent_cache: LatentCache | None = None,
        log: Callable[[str], None] = print,
    ):
        super().__init__()
        if not config.is_resolved:
            raise ValueError("LoraTrainingModule needs a resolved TrainingConfig: call config.resolved(n_images)")
        self.config = config
        self.base = base  # a plain dataclass: its VAE is not registered, so it is not trained or saved
        self.dataset = dataset
        self.latent_cache = latent_cache or LatentCache(base, dataset)
        self.print_log = log
        self.unet = base.unet
        self.text_encoder = base.text_encoder
        self.train_text_encoder = config.train_text_encoder
        trained_text_encoder = self.text_encoder if config.train_text_encoder else None
        lora_parameters = add_adapters(
            self.unet,
            trained_text_encoder,
            config.network_type,
            config.rank,
            config.alpha,
            config.seed,
            config.lokr_factor,
            config.conv_rank,
            config.conv_alpha,
        )
        skip_adapter_input_casts(self.unet, self.text_encoder)
        unet_ids = {id(parameter) for parameter in self.unet.parameters()}
        self.unet_lora_parameters = [p for p in lora_parameters if id(p) in unet_ids]
        self.text_encoder_lora_parameters = [p for p in lora_parameters if id(p) not in unet_ids]
        # Train mode (gradient checkpointing only acts in train mode); SD1.5's UNet and CLIP
        # have no dropout or batch norm, so a frozen text encoder computes the same either way.
        self.unet.train()
        self.text_encoder.train()
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                # transformers 5 renamed the switch; older versions only have the old name.
                enable = getattr(self.text_encoder, "activation_checkpointing_enable", None)
                (enable or self.text_encoder.gradient_checkpointing_enable)()
        if config.torch_compile:
            # The forward only, in place: parameter names (and so saved files) stay as they
            # are. (torch 2.13's `Module.compile()` leaves the module uncompiled.)
            self.unet.forward = torch.compile(self.unet.forward)
        # Checkpoints hold only the adapters (see on_save_checkpoint); the frozen base
        # weights come from the base model when a run resumes.
        self.strict_loading = False
        scheduler = base.noise_scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def train_dataloader(self) -> BucketDataLoader:
        return BucketDataLoader(self.dataset, self.config.batch_size)

    def on_fit_start(self) -> None:
        self.latent_cache.fill(self.device, self.print_log)

    def step_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        latents = self.latent_cache.batch(batch["example_ids"], batch["flips"])
        generator = self.step_generator(self.global_step)
        config = self.config
        noise = training_noise(latents.shape, generator, config.noise_offset, config.multires_noise_iterations,
                               config.multires_noise_discount)  # fmt: skip
        timesteps = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=generator)
        model_input_noise = noise
        if self.config.input_perturbation:
            # Input perturbation (Ning et al. 2023): the model sees slightly different noise
            # than it is asked to predict, which reduces the train/sampling exposure bias.
            model_input_noise = noise + self.config.input_perturbation * torch.randn(latents.shape, generator=generator)
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)

        noisy_latents = self._add_noise(latents, model_input_noise.to(self.device), timesteps)
        input_ids = tokenize_captions(self.base.tokenizer, batch["captions"]).to(self.device)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden_states = encode_token_ids(self.text_encoder, input_ids, self.config.clip_skip)
        prediction = self.unet(noisy_latents, timesteps, hidden_states).sample

        target = noise if self.prediction_type == "epsilon" else self._velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma:
            per_sample = per_sample * self._min_snr_weights(timesteps)
        return per_sample.mean()

    def _add_noise(self, latents, noise, timesteps):
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise

    def _velocity(self, latents, noise, timesteps):
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents

    def _min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): easy, low-noise timesteps stop dominating the loss."""
        alpha_bar = self.alphas_cumprod[timesteps]
        snr = alpha_bar / (1 - alpha_bar)
        clipped = torch.clamp(snr, max=self.config.min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        groups = [{"params": self.unet_lora_parameters, "lr": self.config.unet_learning_rate}]
        if self.text_encoder_lora_parameters:
            groups.append(
                {"params": self.text_encoder_lora_parameters, "lr": self.config.text_encoder_learning_rate}
            )
        optimizer = build_optimizer(
            self.config.optimizer, groups, self.config.weight_decay, self.config.lr_warmup_steps
        )
        name = self.config.lr_scheduler
        if name == "constant" and self.config.lr_warmup_steps:
            name = "constant_with_warmup"
        scheduler = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=self.config.lr_warmup_steps,
            num_training_steps=self.config.max_train_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {name: value for name, value in state.items() if name in trainable}

    def kohya_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return peft_to_kohya_state_dict(
            self.unet,
            self.text_encoder if self.train_text_encoder else None,
            alpha=self.config.alpha,
            conv_alpha=self.config.conv_alpha,
            dtype=dtype,
        )
