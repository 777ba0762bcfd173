"""peft adapters on the modules kohya's networks train for SD1.5: LoRA, LoHa and LoKr.

Targets are kohya's `networks.lora` ones: every Linear and 1x1 convolution inside the
UNet's Transformer2DModel blocks (attention q/k/v/out, feed-forward, proj_in/proj_out) and
the CLIP text encoder's attention (q/k/v/out_proj) and MLP (fc1/fc2). LyCORIS' LoHa and
LoKr apply to the same modules here, so that the three kinds differ only in how each
module's weight update is factored.
"""

from __future__ import annotations

import torch

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ADAPTER_NAME = "default"
# The names peft gives the trainable tensors of each kind of adapter.
ADAPTER_PARAMETER_MARKERS = (".lora_", ".hada_", ".lokr_")


def adapter_config(network_type: str, rank: int, alpha: float, targets: tuple[str, ...], lokr_factor: int = -1):
    """The peft config of one kind of adapter. Every kind starts as a zero update (one
    factor initialised to zero), so the untrained adapter leaves the base model unchanged."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if network_type == "lora":
        # Down (A) Kaiming-uniform, up (B) zero: kohya's initialisation too.
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    if network_type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    if network_type == "lokr":
        return LoKrConfig(
            r=rank, alpha=alpha, target_modules=list(targets), init_weights=True, decompose_factor=lokr_factor
        )
    raise ValueError(f"unknown network type {network_type!r}: use 'lora', 'loha' or 'lokr'")


def add_adapters(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    network_type: str,
    rank: int,
    alpha: float,
    seed: int = 0,
    lokr_factor: int = -1,
) -> list[torch.nn.Parameter]:
    """Inject peft adapters (in place) and return their parameters, in fp32.

    `text_encoder=None` trains the UNet only. Initialisation draws from a private random
    state seeded with `seed`, leaving the caller's untouched.
    """
    parameters = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for model, targets in ((unet, UNET_TARGET_MODULES), (text_encoder, TEXT_ENCODER_TARGET_MODULES)):
            if model is None:
                continue
            model.add_adapter(adapter_config(network_type, rank, alpha, targets, lokr_factor), adapter_name=ADAPTER_NAME)
            for name, parameter in model.named_parameters():
                if any(marker in name for marker in ADAPTER_PARAMETER_MARKERS):
                    # Half-precision base weights train fp32 adapters: small updates survive.
                    parameter.data = parameter.data.float()
                    parameter.requires_grad_(True)
                    parameters.append(parameter)
    return parameters


def add_lora_adapters(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    rank: int,
    alpha: float,
    seed: int = 0,
) -> list[torch.nn.Parameter]:
    """`add_adapters` for plain LoRA."""
    return add_adapters(unet, text_encoder, "lora", rank, alpha, seed)
