"""Loading an SD1.5-family base model for LoRA training, and encoding prompts the A1111 way.

A base model is a diffusers folder (`model_index.json`, `unet/`, `vae/`, ...) or a single
`.safetensors` checkpoint (the form anime models are shared in). Single files are read
with diffusers' `from_single_file`, which needs the SD1.5 *configuration* (layer sizes,
tokenizer, scheduler): offline it comes from the `config` argument (any SD1.5 diffusers
folder, e.g. a copy of stable-diffusion-v1-5 without its weights) or from the local Hugging
Face cache; nothing is downloaded.

Every weight is frozen: LoRA adapters added later are the only trainable parameters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_factory.storage import sha256_file

# The configuration diffusers uses for an SD1.5 single file when none is given.
SD15_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")


class BaseModelError(ValueError):
    """The base model cannot be loaded as asked; the message says how to fix it."""


@dataclass
class BaseModel:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # a DDPMScheduler with the model's training noise schedule
    name: str
    sha256: str  # of the weights: the file itself, or the folder's weight files together
    source: str


def native_resolution(source: str | Path) -> int:
    """The image side the base model was trained at: UNet sample size x VAE factor.

    A single-file checkpoint is SD1.5-family here, trained at 512.
    """
    configs = _pipeline_configs(source)
    if configs is None:
        return 512
    unet, vae = configs
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def side_multiple(source: str | Path) -> int:
    """What picture sides must be multiples of for the model: the VAE's factor times the
    UNet's (it halves the latents once per down block but the last). 64 for SD1.5, and
    for a single-file checkpoint (SD1.5-family here)."""
    configs = _pipeline_configs(source)
    return 64 if configs is None else side_multiple_of(*configs)


def _pipeline_configs(source: str | Path) -> tuple[dict, dict] | None:
    """The UNet's and the VAE's configs of a diffusers folder; None for a single file."""
    folder = Path(source)
    if folder.is_file():
        return None
    try:
        return (
            json.loads((folder / "unet" / "config.json").read_text()),
            json.loads((folder / "vae" / "config.json").read_text()),
        )
    except FileNotFoundError as error:
        raise BaseModelError(f"{folder} is not a diffusers pipeline folder: {error}") from error


def side_multiple_of(unet_config: Mapping, vae_config: Mapping) -> int:
    """`side_multiple` from the UNet's and the VAE's configs."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(unet_config["block_out_channels"]) - 1)


def pick_device() -> torch.device:
    """The device to run on, chosen at run time: the first GPU when there is one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision is slow and lossy there); bf16 on GPUs that have it, else fp16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base_model(
    source: str | Path,
    clip_skip: int = 2,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: str | Path | None = None,
    weights_sha256: str | None = None,
) -> BaseModel:
    """Load an SD1.5 diffusers folder or single `.safetensors` file, all weights frozen.

    `dtype` defaults to fp32 on CPU and bf16/fp16 on GPU. The VAE follows bf16 but stays
    fp32 under fp16: SD1.5-family VAEs overflow to NaN in fp16 (A1111's --no-half-vae),
    never in bf16, whose range is fp32's. Attention runs through torch's scaled-dot-product
    attention (flash / memory-efficient kernels on GPUs). `config` is only
    used for single files: an SD1.5 diffusers folder that supplies the configuration.
    `clip_skip` is checked against the text encoder's depth here, so that a wrong value
    fails before training starts. `weights_sha256` skips re-hashing weights that the caller
    already hashed (`base_weights_sha256`).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = Path(source).expanduser()
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or default_dtype(device)
    vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    if not path.exists():
        raise BaseModelError(
            f"base model {str(source)!r} not found: give an SD1.5 diffusers folder or a .safetensors file"
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        pipeline = StableDiffusionPipeline.from_pretrained(
            path,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=True,
            dtype={"default": dtype, "vae": vae_dtype},
        )
    elif path.suffix == ".safetensors":
        pipeline = _load_single_file(path, config, dtype)
    else:
        raise BaseModelError(
            f"{path}: unsupported base model file type {path.suffix!r}; use a .safetensors "
            "checkpoint (pickled .ckpt files are refused: they can run code when loaded)"
        )

    base = BaseModel(
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        name=path.stem if path.is_file() else path.name,
        sha256=weights_sha256 or base_weights_sha256(path),
        source=str(path),
    )
    check_clip_skip(base.text_encoder, clip_skip)
    if vae_dtype == torch.float32:
        base.vae.float()  # `float()` rather than `to(dtype)`: diffusers warns on the latter
    use_sdpa_attention(base)
    for module in (base.unet, base.text_encoder, base.vae):
        module.requires_grad_(False)
        module.to(device)
        module.eval()
    return base


def use_sdpa_attention(base: BaseModel) -> None:
    """Route the UNet's and text encoder's attention through torch's fused SDPA kernels."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    base.unet.set_attn_processor(AttnProcessor2_0())
    base.text_encoder.set_attn_implementation("sdpa")


def _load_single_file(path: Path, config: str | Path | None, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if config is not None:
        config_dir = Path(config).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise BaseModelError(
                f"config {str(config)!r} is not an SD1.5 diffusers folder (no model_index.json)"
            )
        config_ref = str(config_dir)
    elif _cached_on_this_machine(SD15_CONFIG_REPO):
        config_ref = SD15_CONFIG_REPO
    else:
        raise BaseModelError(
            f"{path} is a single-file checkpoint and its SD1.5 configuration cannot be found offline: "
            f"pass config=<an SD1.5 diffusers folder> (the json/tokenizer files of {SD15_CONFIG_REPO} "
            "are enough), or put that repository in the local Hugging Face cache"
        )
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path),
            config=config_ref,
            local_files_only=True,
            # Passed explicitly: otherwise diffusers fetches the safety checker's image
            # processor from the Hub even when the checker itself is not loaded.
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=dtype,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise BaseModelError(
            f"{path} could not be loaded as an SD1.5 checkpoint with config {config_ref!r}: {error}"
        ) from error


def _cached_on_this_machine(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def base_weights_sha256(source: str | Path) -> str:
    """The identity of a base model's weights: a single file's sha256, or the folder's."""
    path = Path(source).expanduser()
    return folder_weights_sha256(path) if path.is_dir() else sha256_file(path)


def folder_weights_sha256(folder: Path) -> str:
    """One hash for a diffusers folder's weights: sha256 over (relative path, file sha256) pairs.

    Configs and tokenizer files are left out on purpose: re-saving a model with another
    library version rewrites its json files without changing what it computes.
    """
    files = sorted(
        file
        for component in WEIGHT_COMPONENTS
        for file in (folder / component).glob("*")
        if file.suffix in WEIGHT_SUFFIXES
    )
    if not files:
        raise BaseModelError(f"{folder} holds no weight files under {', '.join(WEIGHT_COMPONENTS)}")
    listing = [[file.relative_to(folder).as_posix(), sha256_file(file)] for file in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def check_clip_skip(text_encoder: torch.nn.Module, clip_skip: int) -> None:
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise BaseModelError(
            f"clip_skip={clip_skip} is out of range for a text encoder with {layers} layers "
            "(1 = last layer, 2 = penultimate, the anime/NAI convention)"
        )


def tokenize_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's context (77 for SD1.5), as SD does."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompt(base: BaseModel, captions: list[str], clip_skip: int = 2) -> torch.Tensor:
    """Text-encoder hidden states for `captions` with A1111/kohya clip skip.

    clip skip N takes the hidden states N layers from the end and applies the final layer
    norm (clip skip 1 is the ordinary last hidden state). Note that diffusers' own
    `clip_skip` pipeline argument counts differently: its 1 is this 2.
    """
    input_ids = tokenize_captions(base.tokenizer, captions).to(base.text_encoder.device)
    return encode_token_ids(base.text_encoder, input_ids, clip_skip)


def encode_token_ids(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    check_clip_skip(text_encoder, clip_skip)
    output = text_encoder(input_ids, output_hidden_states=True)
    hidden = output.hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden)


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel; older versions keep the layers under `text_model`.
    owner = getattr(text_encoder, "text_model", text_encoder)
    return owner.final_layer_norm
