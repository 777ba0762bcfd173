"""The training noise of a diffusion step: Gaussian, optionally with coarse noise on top.

SD1.5's noise schedule never destroys a picture completely: at the last timestep 7% of
the clean latents remain, and a picture's coarsest structure (its overall colour cast,
the colour of a large region) survives the noise best, because averaging many latent
pixels averages their noise away. A model trained on such inputs can read those colours
from its input, while sampling starts from pure noise, whose coarse structure is random.
Two remedies that kohya's sd-scripts offers, under its names:
- noise offset: a random constant per latent channel (the coarsest level only);
- multi-resolution ("pyramid") noise: Gaussian noise at every coarser scale, halving the
  resolution each level and scaling the level's noise by `discount ** level`.
Either way the target is the noise actually added, so the model learns to take coarse
colour and brightness from the text instead of from its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None = None,
    offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.0,
) -> torch.Tensor:
    """Noise of `shape` ([batch, channels, height, width]) for one training step.

    With nothing set it is exactly `torch.randn(shape, generator=generator)`, so a run
    without these options draws the random numbers it always drew.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    if multires_iterations:
        noise = multires_noise(noise, multires_iterations, multires_discount, generator)
    return noise


def multires_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`noise` plus Gaussian noise at up to `iterations` coarser scales (each half the
    previous one's resolution, weighted `discount ** level`, upsampled bilinearly), scaled
    back to unit variance per sample. Stops at the level that is one latent pixel wide or
    high: nothing coarser exists."""
    batch, channels, height, width = noise.shape
    for level in range(1, iterations + 1):
        coarse_height, coarse_width = max(1, height >> level), max(1, width >> level)
        coarse = torch.randn((batch, channels, coarse_height, coarse_width), generator=generator)
        upsampled = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        noise = noise + discount**level * upsampled
        if coarse_height == 1 or coarse_width == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)
