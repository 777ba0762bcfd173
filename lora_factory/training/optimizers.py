"""The optimizers a LoRA run can use: AdamW (torch's, or bitsandbytes' 8-bit one on GPUs) and Prodigy.

The config's "adamw" is resolved once per run (`resolve_optimizer`) to what will really
run, so that the run's identity, its metadata and a resumed run all agree on it.
"""

from __future__ import annotations

import importlib.util

import torch

# Where each optimizer's class lives (kohya writes the class path into `ss_optimizer`).
OPTIMIZER_CLASSES = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "prodigy": "prodigyopt.prodigy.Prodigy",
}


class OptimizerUnavailableError(RuntimeError):
    """The configured optimizer cannot run here; the message says what to install or change."""


def bitsandbytes_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def resolve_optimizer(name: str, device: torch.device) -> str:
    """The optimizer that will run: "adamw" becomes "adamw8bit" where bitsandbytes and a GPU are present."""
    if name == "adamw":
        return "adamw8bit" if bitsandbytes_usable(device) else "adamw"
    if name == "adamw8bit" and not bitsandbytes_usable(device):
        raise OptimizerUnavailableError(
            "optimizer 'adamw8bit' needs a CUDA GPU and the bitsandbytes package "
            f"(device here: {device.type}); install bitsandbytes on the GPU machine or use optimizer='adamw'"
        )
    if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise OptimizerUnavailableError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt")
    return name


def build_optimizer(
    name: str, groups: list[dict], weight_decay: float, warmup_steps: int = 0
) -> torch.optim.Optimizer:
    """The optimizer for parameter `groups` (each with its own "lr")."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # The settings Prodigy's authors recommend for diffusion fine-tuning: bias
        # correction on, and (with a warm-up) the safeguard that keeps the step-size
        # estimate from growing during the warm-up.
        return Prodigy(
            groups,
            weight_decay=weight_decay,
            use_bias_correction=True,
            safeguard_warmup=warmup_steps > 0,
        )
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_description(name: str, weight_decay: float, warmup_steps: int = 0) -> str:
    """kohya's `ss_optimizer` form: the optimizer's class path and its arguments."""
    arguments = f"weight_decay={weight_decay}"
    if name == "prodigy":
        arguments += f",use_bias_correction=True,safeguard_warmup={warmup_steps > 0}"
    return f"{OPTIMIZER_CLASSES[name]}({arguments})"
