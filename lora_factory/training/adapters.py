"""peft adapters on the modules kohya's networks train for SD1.5: LoRA, LoHa and LoKr.

Targets are kohya's `networks.lora` ones: every Linear and 1x1 convolution inside the
UNet's Transformer2DModel blocks (attention q/k/v/out, feed-forward, proj_in/proj_out) and
the CLIP text encoder's attention (q/k/v/out_proj) and MLP (fc1/fc2). LyCORIS' LoHa and
LoKr apply to the same modules here, so that the three kinds differ only in how each
module's weight update is factored.

With a conv rank (kohya's `conv_dim`, "LoCon"), the modules of the UNet's ResNet blocks and
down/upsamplers join them as kohya's `networks.lora` picks them: the 3x3 convolutions at
the conv rank and alpha, the 1x1 shortcut and the time-embedding projection at the rank.
"""

from __future__ import annotations

import torch

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_CONV_TARGET_MODULES = ("conv1", "conv2", "conv", "conv_shortcut", "time_emb_proj")
UNET_3X3_CONV_MODULES = ("conv1", "conv2", "conv")  # `conv`: the down/upsamplers' convolution
ADAPTER_NAME = "default"
# The names peft gives the trainable tensors of each kind of adapter.
ADAPTER_PARAMETER_MARKERS = (".lora_", ".hada_", ".lokr_")


def adapter_config(
    network_type: str,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    lokr_factor: int = -1,
    conv_rank: int = 0,
    conv_alpha: float | None = None,
):
    """The peft config of one kind of adapter. Every kind starts as a zero update (one
    factor initialised to zero), so the untrained adapter leaves the base model unchanged.
    With `conv_rank`, the 3x3 convolutions among `targets` get that rank and `conv_alpha`."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    patterns = {}
    if conv_rank:
        conv_targets = [name for name in targets if name in UNET_3X3_CONV_MODULES]
        patterns = {
            "rank_pattern": dict.fromkeys(conv_targets, conv_rank),
            "alpha_pattern": dict.fromkeys(conv_targets, conv_alpha if conv_alpha is not None else conv_rank / 2),
        }
    if network_type == "lora":
        # Down (A) Kaiming-uniform, up (B) zero: kohya's initialisation too.
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True, **patterns)
    if network_type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True, **patterns)
    if network_type == "lokr":
        return LoKrConfig(
            r=rank, alpha=alpha, target_modules=list(targets), init_weights=True, decompose_factor=lokr_factor,
            **patterns,
        )  # fmt: skip
    raise ValueError(f"unknown network type {network_type!r}: use 'lora', 'loha' or 'lokr'")


def add_adapters(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    network_type: str,
    rank: int,
    alpha: float,
    seed: int = 0,
    lokr_factor: int = -1,
    conv_rank: int = 0,
    conv_alpha: float | None = None,
) -> list[torch.nn.Parameter]:
    """Inject peft adapters (in place) and return their parameters, in fp32.

    `text_encoder=None` trains the UNet only; `conv_rank` adds the UNet's convolutions. Initialisation draws from a private random
    state seeded with `seed`, leaving the caller's untouched.
    """
    parameters = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_targets = UNET_TARGET_MODULES + (UNET_CONV_TARGET_MODULES if conv_rank else ())
        for model, targets in ((unet, unet_targets), (text_encoder, TEXT_ENCODER_TARGET_MODULES)):
            if model is None:
                continue
            config = adapter_config(network_type, rank, alpha, targets, lokr_factor, conv_rank, conv_alpha)
            model.add_adapter(config, adapter_name=ADAPTER_NAME)
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
