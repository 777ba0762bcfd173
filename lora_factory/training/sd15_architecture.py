"""The full-size SD1.5 architecture, built from its configuration with random weights.

Used where the real layer sizes matter but the real weights do not: checking that every
key of an exported LoRA names a module of a real SD1.5 UNet / CLIP-L text encoder (built
on the meta device: no memory, no time), and measuring training speed and FLOPs on the
real shapes. The numbers are those of the released SD1.5 configs (runwayml /
stable-diffusion-v1-5: unet, vae and text_encoder config.json).
"""

from __future__ import annotations

import torch

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # the head count, under diffusers' historical name
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "use_linear_projection": False,  # proj_in / proj_out are 1x1 convolutions
}
SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower.
CLIP_L_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD15_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def build_sd15_unet() -> torch.nn.Module:
    """SD1.5's UNet2DConditionModel (860M parameters) on the current default device."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD15_UNET_CONFIG)


def build_sd15_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD15_VAE_CONFIG)


def build_clip_l_text_encoder(bos_token_id: int = 49406, eos_token_id: int = 49407) -> torch.nn.Module:
    """CLIP-L's text encoder (123M parameters); token ids can follow a smaller tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        **CLIP_L_TEXT_CONFIG, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id
    )
    return CLIPTextModel(config)


def build_sd15_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_NOISE_SCHEDULE)
