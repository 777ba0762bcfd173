"""The demo base model: a small SD1.5-shaped text-to-image model trained on the demo world.

The tiny random-weight model (`lora_factory.training.tiny_sd`) only checks that the
factory's plumbing works: it draws noise, so a LoRA trained on it learns nothing one
can see. This model is trained on the demo world's own pictures (a generic population
of figures, `lora_factory.demo.world_population`, never the index's characters), so it
draws figures in the world's flat colours and follows their tags (`red hair`, `horns`,
`navy jacket`, `upper body`). A LoRA trained on it then has a real character to learn.

The package ships FULL_BUILD's model (`lora_factory/demo/base_model/`, 11 MB, about 160
CPU-minutes to build on one thread). Its autoencoder is faithful (held-out figures: hair
colour survives a round trip in 64/64, eye colour in 38/44, mean error 4/255), it draws
figures in the world's framings, in squares and in the factory's tall bucket shapes, and
follows hair, top and eye colour words (20/36, 22/24 and 17/30 against chances of 6/36,
6/24 and 6/30; `measure_colour_following`).

Stages: 1. the autoencoder on crops; 2. its decoder alone on whole pictures; 3. UNet and
text encoder together from scratch, 6,000 steps; 4. both refined for 6,000 more steps on
12,000 fresh figures, with the loss weighed up on eyes and features
(`REGION_LOSS_WEIGHTS`) and the text encoder also asked to name every tag from its last
token (`TAG_NAMING_WEIGHT`); 5. both trained 2,000 more steps on 8,000 fresh figures,
half of them square and half cut and bucketed as the factory cuts and buckets its
training pictures (`FACTORY_BUCKETS`: 64x192, 96x160, 128x128, ...), with stage 4's
losses. Stage 4 is what made colour words work: on the same stage-3 model, 6,000 more
plain steps reached hair 16/36 and tops 20/24, the same steps with tag naming hair 27/36
and tops 19/24. Stage 5 is what let the factory's LoRAs learn more: a model that only saw
squares draws broken figures at 64x192 or 96x160, so LoRAs trained on those buckets
learnt from broken pictures (RecScore fidelity of the demo's four LoRAs at their chosen
step, same buckets: 0.09 / 0.20 / 0.27 / 0.10 on the stage-4 model, 0.18 / 0.20 / 0.55 /
0.10 after stage 5; eye colours are what they still miss most). 6. both trained 1,000 more
steps on 4,000 fresh figures of stage 5's shapes, with stage 4's losses, on noise with
coarse random structure (kohya's noise offset and multi-resolution noise,
`COARSE_NOISE_*`): SD1.5's schedule leaves a 16x16 latent's coarse structure readable at
the last timestep (started there from 7% of a picture, the model redraws its exact
layout), so stages 3-5 also read colours from their input, and at sampling from the
noise's random coarse structure. The demo's LoRAs train on the same noise; fidelity
0.29 / 0.10 / 0.64 / 0.10 after stage 6.

It is a diffusers `StableDiffusionPipeline` folder with SD1.5's component classes and
layout, only smaller; the factory loads it like any SD1.5 model
(`training.base_model.load_base_model`), and LoRA keys follow SD1.5's rules:
- VAE: `AutoencoderKL`, x8 downsampling to 4 latent channels, 128 px images. Trained on
  random 64 px crops (it is convolutional; crops cost a quarter), then its decoder alone
  is fine-tuned on whole pictures with the encoder frozen (colour is what the first
  stage learns last). The scaling factor gives the latents unit variance.
- Text encoder: `CLIPTextModel`, width 64, 4 layers, with a CLIP-style byte-level BPE
  whose merges build every word of the demo world's tags (and of the preview prompts'
  quality tags and standard negative prompt) as one token, so captions fit in 77 tokens.
  It is trained with clip skip 2 (penultimate layer), the factory's default.
- UNet: `UNet2DConditionModel`, 16x16 latents, block_out_channels (32, 64, 64), one
  layer per block, cross-attention in the first two down and last two up blocks and in
  the middle, as SD1.5 places it. Epsilon prediction on SD1.5's DDPM schedule
  (scaled_linear 0.00085-0.012, 1000 steps), Min-SNR-5 loss weighting (converges
  faster), an exponential moving average of the weights is what is saved. 10% of the
  captions are dropped (empty, or the standard negative prompt, which previews use as
  their negative prompt) so that classifier-free guidance (3-5 suits it) works.

Rebuild: `python -m lora_factory.demo.base_model_build --out DIR` (FULL_BUILD's step counts;
`--tiny` for a seconds-long smoke build; `--resume-from DIR` runs only the stages after
those of a model built up to stage 3, 4 or 5, with the same result as a build from
scratch). Every phase runs on one CPU thread from fixed seeds, so a rebuild on the same
torch version and CPU kind gives byte-identical weights (checked by building twice and
comparing the weight files' sha256); another torch version or CPU instruction set may
change float rounding and so the weights, but not what the model has learnt. `--measure DIR` re-runs the measurements
(`measure_autoencoder`, `measure_colour_following`) and writes sample grids.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_factory.demo.palette import (
    BACKGROUNDS,
    EYE_COLOURS,
    FEATURE_COLOURS,
    GARMENT_COLOURS,
    HAIR_COLOURS,
    SKIN,
)
from lora_factory.demo.world_population import (
    COARSE_NOISE_MULTIRES_DISCOUNT,
    COARSE_NOISE_MULTIRES_ITERATIONS,
    COARSE_NOISE_OFFSET,
    FACTORY_BUCKETS,
    FRAMINGS,
    caption_text,
    generate_population,
    population_figure,
)
from lora_factory.evaluation import prompts as preview_prompt_sets
from lora_factory.training.base_model import encode_token_ids, tokenize_captions
from lora_factory.training.noise import training_noise
from lora_factory.training.sd15_architecture import SD15_NOISE_SCHEDULE
from lora_factory.training.tiny_sd import (
    END_OF_WORD,
    MAX_TOKENS,
    clip_text_encoder,
    save_pipeline,
    sd15_pipeline,
    write_byte_level_bpe,
)

RECIPE_VERSION = 5
BUILD_MARKER = "demo_base_model.json"
IMAGE_SIZE = 128
LATENT_SIZE = IMAGE_SIZE // 8
CLIP_SKIP = 2  # the factory's default: the model is trained the way LoRAs will be
TRAIN_POPULATION_SEED = 0
HELDOUT_POPULATION_SEED = 1  # a different population: never seen in training
REFINE_POPULATION_SEED = 2  # stage 4's figures: none of them seen by the earlier stages
SHAPES_POPULATION_SEED = 3  # stage 5's figures
COLOUR_POPULATION_SEED = 4  # stage 6's figures
# Every stage a build runs, in order; a build may stop after "unet", "refine" or "shapes"
# (a recipe-2, -3 or -4 model) and be resumed from there.
STAGES = ("vae", "decoder", "unet", "refine", "shapes", "colour")

VAE_CHANNELS = (16, 32, 64, 64)
VAE_CROP = 64
UNET_CHANNELS = (32, 64, 64)
UNET_HEADS = 4
TEXT_WIDTH = 64
TEXT_LAYERS = 4

# Caption augmentation: unconditional captions for classifier-free guidance (half empty,
# half the standard negative prompt, so a negative prompt acts like an empty one), tag
# dropout (a prompt that leaves a tag out still draws a figure), and the quality tags
# that preview prompts start with.
EMPTY_CAPTION_SHARE = 0.05
NEGATIVE_CAPTION_SHARE = 0.05
TAG_DROPOUT = 0.1
QUALITY_PREFIX_SHARE = 0.3
MIN_SNR_GAMMA = 5.0
# Stage 4 weighs the diffusion loss by region (extra weight over 1, on the latent pixels a
# region touches): eyes are one or two latent pixels, so an unweighted loss barely cares
# what colour they are, and eye colour is what tells two characters apart.
REGION_LOSS_WEIGHTS = {"eyes": 8.0, "features": 3.0, "hair": 1.0}
REGION_COLOUR_RADIUS = 24.0  # RGB distance: a pixel of that colour, resizing blends included
# Stage 4 also asks the text encoder to name every tag from the tag's last token (a linear
# head, dropped after the build): `green hair` then reaches the UNet as one token that
# says "green hair", not as `green` next to `hair` for the UNet to pair up.
TAG_NAMING_WEIGHT = 0.05
RECONSTRUCTION_MSE_WEIGHT = 4.0
RECONSTRUCTION_PATCH_WEIGHT = 2.0


@dataclass(frozen=True)
class BuildSteps:
    """How much of everything one build draws and trains."""

    train_images: int
    vae_steps: int
    vae_batch: int
    decoder_steps: int
    decoder_batch: int
    unet_steps: int
    unet_batch: int
    vae_lr: float = 1e-3
    refine_images: int = 0
    refine_steps: int = 0
    refine_batch: int = 16
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    refine_lr: float = 3e-4
    refine_warmup: int = 100
    tag_naming_weight: float = TAG_NAMING_WEIGHT
    shapes_images: int = 0
    shapes_steps: int = 0
    shapes_batch: int = 16
    shapes_lr: float = 2e-4
    shapes_warmup: int = 100
    colour_images: int = 0
    colour_steps: int = 0
    colour_batch: int = 16
    colour_lr: float = 1e-4
    colour_warmup: int = 100
    colour_noise_offset: float = COARSE_NOISE_OFFSET
    colour_multires_iterations: int = COARSE_NOISE_MULTIRES_ITERATIONS
    colour_multires_discount: float = COARSE_NOISE_MULTIRES_DISCOUNT
    ema_decay: float = 0.999


FULL_BUILD = BuildSteps(
    train_images=4000,
    vae_steps=3000,
    vae_batch=12,
    decoder_steps=400,
    decoder_batch=8,
    unet_steps=6000,
    unet_batch=16,
    refine_images=12000,
    refine_steps=6000,
    refine_batch=16,
    shapes_images=8000,
    shapes_steps=2000,
    shapes_batch=16,
    colour_images=4000,
    colour_steps=1000,
    colour_batch=16,
)
TINY_BUILD = BuildSteps(
    train_images=24,
    vae_steps=3,
    vae_batch=4,
    decoder_steps=2,
    decoder_batch=4,
    unet_steps=3,
    unet_batch=4,
    unet_warmup=1,
    refine_images=24,
    refine_steps=3,
    refine_batch=4,
    refine_warmup=1,
    shapes_images=24,
    shapes_steps=3,
    shapes_batch=4,
    shapes_warmup=1,
    colour_images=24,
    colour_steps=3,
    colour_batch=4,
    colour_warmup=1,
)


# ----------------------------------------------------------------------------- tokenizer
# CLIP's pre-tokenizer splits text into letter runs, single digits and punctuation runs
# (`1girl` -> `1`, `girl`); these are the ASCII cases of its pattern.
_PRE_TOKEN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def world_words() -> list[str]:
    """Every pre-token of the demo world's tags and of the preview prompts' fixed parts."""
    tags = [
        *HAIR_COLOURS, *EYE_COLOURS, *FEATURE_COLOURS, *GARMENT_COLOURS, *BACKGROUNDS,
        *FRAMINGS, "1girl", "1boy", "2girls", "multiple_girls", "solo", "long_hair",
        "short_hair", "standing", "looking_at_viewer", "simple_background", "monochrome",
        "greyscale", "no_humans", "transparent_background",
    ]  # fmt: skip
    tags += [garment.rsplit("_", 1)[-1] for garment in GARMENT_COLOURS]
    prompt_tags = [
        *preview_prompt_sets.QUALITY_TAGS,
        *(tag for group in (
            preview_prompt_sets.FRAMING_PROMPTS, preview_prompt_sets.OUTFIT_CHANGE_PROMPTS,
            (preview_prompt_sets.FEMALE_OUTFIT_CHANGE, preview_prompt_sets.MALE_OUTFIT_CHANGE),
            preview_prompt_sets.POSE_PROMPTS, preview_prompt_sets.EXPRESSION_PROMPTS,
        ) for _, group_tags in group for tag in group_tags),
    ]  # fmt: skip
    text = " ".join([caption_text(tags + prompt_tags), preview_prompt_sets.STANDARD_NEGATIVE_PROMPT])
    return sorted(set(_PRE_TOKEN.findall(text.lower())))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-token: merge the best-ranked adjacent pair until none is known."""
    pieces = [*word[:-1], word[-1] + END_OF_WORD]
    while len(pieces) > 1:
        best = min(pairwise(pieces), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, index = [], 0
        while index < len(pieces):
            if index + 1 < len(pieces) and (pieces[index], pieces[index + 1]) == best:
                merged.append(pieces[index] + pieces[index + 1])
                index += 2
            else:
                merged.append(pieces[index])
                index += 1
        pieces = merged
    return pieces


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word of `words` is a single token.

    Each word is joined from the left, one merge at a time, on top of what earlier merges
    already make of it. A merge is only ever appended: at every step of an earlier word's
    BPE a better-ranked merge applied, so later merges never change its result.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    made = set()
    for word in words:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if "".join(pair) in made:  # the same token from another split: one vocab entry each
                raise ValueError(f"merging {pair} for {word!r} would make a token twice")
            made.add("".join(pair))
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _bpe(word, ranks)
    return merges


def write_world_tokenizer(folder: Path) -> dict[str, int]:
    """Write the demo world's CLIP tokenizer files (`vocab.json`, `merges.txt`); return the vocab."""
    words = [word for word in world_words() if len(word) > 1]  # one letter is a token already
    return write_byte_level_bpe(folder, merges=word_merges(words))


# ---------------------------------------------------------------------------- data
def population_tensor(seed: int, count: int) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """`count` population figures as uint8 [N, 3, H, W] pixels, with their tags."""
    pixels = torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    tags = []
    for index, figure in enumerate(generate_population(seed, count, IMAGE_SIZE)):
        pixels[index] = _pixels(figure.image)
        tags.append(figure.tags)
    return pixels, tags


def population_by_shape(seed: int, count: int) -> dict[tuple[int, int], tuple[torch.Tensor, list[tuple[str, ...]]]]:
    """`count` population figures, every other one square (as stages 1-4 draw them) and
    the rest cut and bucketed the way the factory makes its training sets
    (`FACTORY_BUCKETS`), grouped by (width, height) in size order: uint8 pixels and tags."""
    by_shape: dict[tuple[int, int], tuple[list[torch.Tensor], list[tuple[str, ...]]]] = {}
    for index in range(count):
        figure = population_figure(seed, index, IMAGE_SIZE, buckets=None if index % 2 == 0 else FACTORY_BUCKETS)
        pixels, tags = by_shape.setdefault(figure.image.size, ([], []))
        pixels.append(_pixels(figure.image))
        tags.append(figure.tags)
    return {shape: (torch.stack(pixels), tags) for shape, (pixels, tags) in sorted(by_shape.items())}


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def training_caption_tags(tags: Sequence[str], rng: random.Random) -> list[str] | None:
    """The tags of one augmented caption, in caption order; None for the standard negative
    prompt (a text, not tags); [] for the empty caption."""
    draw = rng.random()
    if draw < EMPTY_CAPTION_SHARE:
        return []
    if draw < EMPTY_CAPTION_SHARE + NEGATIVE_CAPTION_SHARE:
        return None
    kept = [tag for tag in tags if rng.random() >= TAG_DROPOUT]
    rng.shuffle(kept)
    if rng.random() < QUALITY_PREFIX_SHARE:
        kept = [*preview_prompt_sets.QUALITY_TAGS, *kept]
    return kept


def caption_of(tags: list[str] | None) -> str:
    return preview_prompt_sets.STANDARD_NEGATIVE_PROMPT if tags is None else caption_text(tags)


# ---------------------------------------------------------------------------- models
def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: x8 like SD1.5
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # measured after training
    )


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=UNET_HEADS,  # SD1.5's config calls the head count "attention_head_dim"
        norm_num_groups=16,
        use_linear_projection=False,  # SD1.5: proj_in / proj_out are 1x1 convolutions
    )


def new_text_encoder(vocab: dict[str, int]):
    return clip_text_encoder(vocab, width=TEXT_WIDTH, layers=TEXT_LAYERS, intermediate_size=4 * TEXT_WIDTH)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth: a factor of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- training
Log = Callable[[str], None]


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 (as SD's VAE) + MSE + L1 of 4x4 patch means.

    Colour is what an autoencoder learns last, and what the demo world is about: the
    patch-mean term weighs each small region's average colour (what the identity model
    and the tagger read) above its edges, and MSE punishes the few large colour errors
    that L1 alone tolerates. Held-out figures whose hair colour survives a round trip:
    11/64 after 500 steps with L1 alone, 14/64 with these terms; 57/64 after 2,000 steps
    with them (`measure_autoencoder`).
    """
    pooled = torch.nn.functional.avg_pool2d
    return (
        (reconstruction - target).abs().mean()
        + RECONSTRUCTION_MSE_WEIGHT * (reconstruction - target).pow(2).mean()
        + RECONSTRUCTION_PATCH_WEIGHT * (pooled(reconstruction, 4) - pooled(target, 4)).abs().mean()
    )


def train_vae(pixels: torch.Tensor, steps: BuildSteps, seed: int, log: Log):
    """Stage 1: the whole autoencoder on random crops (`reconstruction_loss` + a tiny KL term)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = new_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=steps.vae_lr, weight_decay=0.0)
    started = time.monotonic()
    for step in range(steps.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = steps.vae_lr * _cosine_lr(step, steps.vae_steps, min(50, steps.vae_steps // 10 + 1))
        batch = torch.stack([_random_crop(pixels[rng.randrange(len(pixels))], rng) for _ in range(steps.vae_batch)])
        target = to_unit_range(batch)
        posterior = vae.encode(target).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = reconstruction_loss(reconstruction, target) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log_progress(log, "vae", step, steps.vae_steps, loss.item(), started)
    return vae


def _random_crop(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    top, left = rng.randrange(IMAGE_SIZE - VAE_CROP + 1), rng.randrange(IMAGE_SIZE - VAE_CROP + 1)
    return image[:, top : top + VAE_CROP, left : left + VAE_CROP]


def finetune_decoder(vae, pixels: torch.Tensor, steps: BuildSteps, seed: int, log: Log) -> None:
    """Stage 2: the decoder alone on whole pictures, from the frozen encoder's latents."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    decoder_parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(decoder_parameters, lr=steps.vae_lr / 2, weight_decay=0.0)
    started = time.monotonic()
    for step in range(steps.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = steps.vae_lr / 2 * _cosine_lr(step, steps.decoder_steps, 1)
        target = to_unit_range(pixels[[rng.randrange(len(pixels)) for _ in range(steps.decoder_batch)]])
        with torch.no_grad():
            latents = vae.encode(target).latent_dist.mode()  # what LoRA training encodes with
        loss = reconstruction_loss(vae.decode(latents).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log_progress(log, "decoder", step, steps.decoder_steps, loss.item(), started)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Unscaled latents (posterior mode) of every picture."""
    chunks = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
    return torch.cat([vae.encode(to_unit_range(chunk)).latent_dist.mode() for chunk in chunks])


@dataclass(frozen=True)
class DiffusionPhase:
    """One text-to-image training phase of the build: how long, how fast, which losses."""

    name: str
    steps: int
    batch: int
    lr: float
    warmup: int
    ema_decay: float
    tag_naming_weight: float  # 0: no tag-naming loss on the text encoder
    noise_offset: float = 0.0  # see `training.noise`
    multires_iterations: int = 0
    multires_discount: float = 0.0


def stage3_phase(steps: BuildSteps) -> DiffusionPhase:
    """Stage 3: UNet and text encoder from scratch, a plain loss."""
    return DiffusionPhase("unet", steps.unet_steps, steps.unet_batch, steps.unet_lr, steps.unet_warmup,
                          steps.ema_decay, tag_naming_weight=0.0)  # fmt: skip


def stage4_phase(steps: BuildSteps) -> DiffusionPhase:
    """Stage 4: stage 3's models refined on fresh figures, the text encoder naming tags
    (`_stage_4` also weighs the loss up on eyes and features)."""
    return DiffusionPhase("refine", steps.refine_steps, steps.refine_batch, steps.refine_lr, steps.refine_warmup,
                          steps.ema_decay, tag_naming_weight=steps.tag_naming_weight)  # fmt: skip


def stage5_phase(steps: BuildSteps) -> DiffusionPhase:
    """Stage 5: stage 4's models on fresh figures of the factory's bucket shapes, with
    stage 4's losses."""
    return DiffusionPhase("shapes", steps.shapes_steps, steps.shapes_batch, steps.shapes_lr, steps.shapes_warmup,
                          steps.ema_decay, tag_naming_weight=steps.tag_naming_weight)  # fmt: skip


def stage6_phase(steps: BuildSteps) -> DiffusionPhase:
    """Stage 6: stage 5's models on fresh figures of the same shapes, with stage 4's
    losses, on noise with coarse random structure (noise offset and multi-resolution)."""
    return DiffusionPhase("colour", steps.colour_steps, steps.colour_batch, steps.colour_lr, steps.colour_warmup,
                          steps.ema_decay, tag_naming_weight=steps.tag_naming_weight,
                          noise_offset=steps.colour_noise_offset,
                          multires_iterations=steps.colour_multires_iterations,
                          multires_discount=steps.colour_multires_discount)  # fmt: skip


def region_loss_weights(pixels: torch.Tensor, tags: Sequence[Sequence[str]], chunk: int = 256) -> torch.Tensor:
    """[N, 1, H/8, W/8] loss weights on the latent grid, mean 1 per picture: 1 everywhere,
    plus `REGION_LOSS_WEIGHTS[part]` on every latent pixel that covers some of the
    figure's eye, feature or hair colour."""
    colour_of = {"eyes": EYE_COLOURS, "features": FEATURE_COLOURS, "hair": HAIR_COLOURS}
    weights = []
    for first in range(0, len(pixels), chunk):
        images = pixels[first : first + chunk].float()
        extra = torch.zeros(len(images), 1, *images.shape[-2:])
        for row, figure_tags in enumerate(tags[first : first + chunk]):
            for part, weight in REGION_LOSS_WEIGHTS.items():
                for tag in figure_tags:
                    if tag in colour_of[part]:
                        rgb = torch.tensor(colour_of[part][tag], dtype=torch.float32)[:, None, None]
                        near = (images[row] - rgb).pow(2).sum(dim=0).sqrt() <= REGION_COLOUR_RADIUS
                        extra[row, 0] = torch.maximum(extra[row, 0], weight * near.float())
        latent_weights = 1.0 + torch.nn.functional.max_pool2d(extra, 8)
        weights.append(latent_weights / latent_weights.mean(dim=(1, 2, 3), keepdim=True))
    return torch.cat(weights)


def tag_index(tags: Iterable[Sequence[str]]) -> dict[str, int]:
    """Every tag a training caption may hold, numbered: the tag-naming head's classes."""
    return {tag: i for i, tag in enumerate(sorted({*preview_prompt_sets.QUALITY_TAGS, *(t for f in tags for t in f)}))}


def tag_ends(token_ids: torch.Tensor, caption_tags: Sequence[list[str] | None], tokenizer, classes: dict[str, int]):
    """(caption, token position, tag class) of every tag's last token: the token before a
    comma or the end token. Captions that are not tags (the negative prompt) are skipped."""
    separators = torch.tensor([tokenizer.convert_tokens_to_ids(",</w>"), tokenizer.eos_token_id])
    rows, positions, labels = [], [], []
    for row, kept in enumerate(caption_tags):
        if not kept:
            continue
        ends = torch.nonzero(torch.isin(token_ids[row, 1:], separators)).flatten()
        ends = ends[: len(kept)]  # positions of the token before each separator
        if len(ends) != len(kept):
            raise ValueError(f"caption {kept} does not tokenize into one segment per tag")
        rows += [row] * len(kept)
        positions += ends.tolist()
        labels += [classes[tag] for tag in kept]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long), torch.tensor(labels)


@dataclass(frozen=True)
class LatentGroup:
    """Training pictures of one size: scaled latents [N, 4, h, w], their tags, and
    optionally loss weights [N, 1, h, w] (see `region_loss_weights`)."""

    latents: torch.Tensor
    tags: list[tuple[str, ...]]
    loss_weights: torch.Tensor | None = None


def train_text_to_image(
    make_models: Callable[[], tuple[torch.nn.Module, torch.nn.Module]],
    groups: Sequence[LatentGroup],
    tokenizer,
    phase: DiffusionPhase,
    seed: int,
    log: Log,
    snapshot: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None,
    snapshot_every: int = 1000,
):
    """Train text encoder and UNet together as a text-to-image diffusion model.

    `make_models()` gives the (UNet, text encoder) to train; it is called after seeding,
    so that new models' initialisation belongs to the phase's random stream. Epsilon
    prediction on SD1.5's schedule with Min-SNR weighting. Each batch comes from one
    group (pictures of one size), chosen in proportion to the groups' sizes. Returns the
    exponential moving averages of both models (what sampling should use).
    `snapshot(step, unet, text_encoder)` is handed those averages every `snapshot_every`
    steps, so that a long build can be looked at before it ends.
    """
    import copy

    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    rng = random.Random(seed)
    unet, text_encoder = make_models()
    models = torch.nn.ModuleList([unet, text_encoder]).train().requires_grad_(True)
    averaged = copy.deepcopy(models).requires_grad_(False)
    trained = list(models.parameters())
    classes = tag_index(tags for group in groups for tags in group.tags)
    naming_head = None
    if phase.tag_naming_weight > 0:
        naming_head = torch.nn.Linear(TEXT_WIDTH, len(classes))
        trained += list(naming_head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=phase.lr, weight_decay=0.01)
    schedule = DDPMScheduler(**SD15_NOISE_SCHEDULE)
    alphas_cumprod = schedule.alphas_cumprod
    started = time.monotonic()
    for step in range(phase.steps):
        for group in optimizer.param_groups:
            group["lr"] = phase.lr * _cosine_lr(step, phase.steps, phase.warmup)
        # One group: no draw, so single-size phases keep the random stream they always had.
        group = groups[0] if len(groups) == 1 else rng.choices(groups, weights=[len(g.tags) for g in groups])[0]
        picks = [rng.randrange(len(group.tags)) for _ in range(phase.batch)]
        caption_tags = [training_caption_tags(group.tags[i], rng) for i in picks]
        token_ids = tokenize_captions(tokenizer, [caption_of(kept) for kept in caption_tags])
        clean = group.latents[picks]
        if phase.noise_offset or phase.multires_iterations:
            noise = training_noise(clean.shape, None, phase.noise_offset, phase.multires_iterations,
                                   phase.multires_discount)  # fmt: skip
        else:  # stages 3-5 drew theirs so (`randn_like` keeps the latents' memory layout): same bytes
            noise = torch.randn_like(clean)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(picks),))
        noisy = schedule.add_noise(clean, noise, timesteps)
        hidden = encode_token_ids(text_encoder, token_ids, CLIP_SKIP)
        predicted = unet(noisy, timesteps, hidden).sample
        squared_error = (predicted - noise).pow(2)
        if group.loss_weights is not None:
            squared_error = squared_error * group.loss_weights[picks]
        # Min-SNR-gamma weighting for epsilon prediction: min(SNR, gamma) / SNR.
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
        loss = (weight * squared_error.mean(dim=(1, 2, 3))).mean()
        if naming_head is not None:
            rows, positions, labels = tag_ends(token_ids, caption_tags, tokenizer, classes)
            naming = torch.nn.functional.cross_entropy(naming_head(hidden[rows, positions]), labels)
            loss = loss + phase.tag_naming_weight * naming
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        decay = min(phase.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, current in zip(averaged.parameters(), models.parameters(), strict=True):
                average.lerp_(current, 1 - decay)
        _log_progress(log, phase.name, step, phase.steps, loss.item(), started)
        if snapshot is not None and (step + 1) % snapshot_every == 0 and step + 1 < phase.steps:
            snapshot(step + 1, averaged[0], averaged[1])
    return averaged[0], averaged[1]


def _log_progress(log: Log, phase: str, step: int, total: int, loss: float, started: float) -> None:
    if step % 50 == 0 or step == total - 1:
        elapsed = time.monotonic() - started
        log(f"{phase} step {step + 1}/{total} loss {loss:.4f} elapsed {elapsed:.0f}s")


# ---------------------------------------------------------------------------- build
@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Torch on one CPU thread (float sums in a fixed order), the caller's setting restored after.

    Restoring matters: the thread count changes float rounding, so a process left on one
    thread would train other models to different bytes than a fresh process does.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@one_cpu_thread()
def build_demo_base_model(
    out: Path,
    steps: BuildSteps = FULL_BUILD,
    seed: int = 0,
    log: Log = print,
    snapshots: Path | None = None,
    resume_from: Path | None = None,
) -> Path:
    """Train the demo base model and save its pipeline folder at `out` (which must not exist).

    One CPU thread, fixed seeds (see the module docstring on reproducibility). The
    folder appears atomically: it is built next to `out` and renamed. With `snapshots`,
    the diffusion stages' intermediate models are saved there too (`unet_001000`, ...).
    `resume_from` is a model built by the same recipe and seed that stopped after stage
    3, 4 or 5 (a recipe-2, -3 or -4 model): its stages are taken as they are and only the
    later ones run, which gives the same bytes as a build from scratch.
    """
    from transformers import CLIPTokenizer

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    began = time.monotonic()
    try:
        vocab = write_world_tokenizer(staging / "tokenizer_source")
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer_source", model_max_length=MAX_TOKENS)
        log(f"tokenizer: {len(vocab)} tokens")
        marker = {"recipe_version": RECIPE_VERSION, "seed": seed, "steps": asdict(steps), "torch": torch.__version__}

        def save(folder: Path, vae, unet, text_encoder, stages: list[str]) -> None:
            _save_pipeline(folder, vae, text_encoder, tokenizer, unet, staging / "tokenizer_source",
                           {**marker, "stages": stages})  # fmt: skip

        with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
            if resume_from is not None:
                vae, unet, text_encoder, stages = load_built_stages(Path(resume_from), steps, seed, vocab)
                log(f"stages {', '.join(stages)} from {resume_from}")
            else:
                vae, unet, text_encoder = _stages_1_to_3(steps, seed, tokenizer, vocab, log, save, snapshots)
                stages = ["vae", "decoder", "unet"]
            later = {
                "refine": (steps.refine_steps, _stage_4),
                "shapes": (steps.shapes_steps, _stage_5),
                "colour": (steps.colour_steps, _stage_6),
            }
            for stage in STAGES[len(stages) :]:
                stage_steps, run_stage = later[stage]
                if not stage_steps:
                    break  # a build that stops here (the tests' short builds may)
                snapshot = _snapshot_saver(save, snapshots, vae, stage, [*stages, stage], log)
                unet, text_encoder = run_stage(vae, unet, text_encoder, steps, seed, tokenizer, log, snapshot)
                stages.append(stage)
        build_dir = staging / "pipeline"
        save(build_dir, vae, unet, text_encoder, stages)
        build_dir.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"built {out} in {time.monotonic() - began:.0f}s")
    return out


def _snapshot_saver(save, snapshots: Path | None, vae, phase: str, stages: list[str], log: Log):
    if snapshots is None:
        return None

    def snapshot(step: int, unet, text_encoder) -> None:
        folder = snapshots / f"{phase}_{step:06d}"
        save(folder, vae, unet, text_encoder, stages)
        log(f"saved snapshot {folder}")

    return snapshot


def _stages_1_to_3(steps: BuildSteps, seed: int, tokenizer, vocab: dict[str, int], log: Log, save, snapshots):
    """The autoencoder (stages 1 and 2), then UNet and text encoder from scratch (stage 3)."""
    pixels, tags = population_tensor(TRAIN_POPULATION_SEED + seed, steps.train_images)
    log(f"drew {len(pixels)} training figures")
    vae = train_vae(pixels, steps, seed, log)
    finetune_decoder(vae, pixels, steps, seed + 1, log)
    vae.eval()
    latents = encode_latents(vae, pixels)
    # Rounded, so the config holds a readable number; latents get unit variance.
    scaling_factor = float(f"{1.0 / latents.std().item():.5g}")
    vae.register_to_config(scaling_factor=scaling_factor)
    log(f"vae scaling factor {scaling_factor}")
    unet, text_encoder = train_text_to_image(
        lambda: (new_unet(), new_text_encoder(vocab)), [LatentGroup(latents * scaling_factor, tags)], tokenizer,
        stage3_phase(steps), seed + 2, log,
        snapshot=_snapshot_saver(save, snapshots, vae, "unet", ["vae", "decoder", "unet"], log),
    )  # fmt: skip
    return vae, unet, text_encoder


def _weighted_group(vae, pixels: torch.Tensor, tags: list[tuple[str, ...]]) -> LatentGroup:
    """Pictures as a training group with eye/feature-weighted loss (`region_loss_weights`)."""
    return LatentGroup(encode_latents(vae, pixels) * vae.config.scaling_factor, tags, region_loss_weights(pixels, tags))


def _stage_4(vae, unet, text_encoder, steps: BuildSteps, seed: int, tokenizer, log: Log, snapshot):
    """Stage 3's models refined on fresh figures (`stage4_phase`)."""
    pixels, tags = population_tensor(REFINE_POPULATION_SEED + seed, steps.refine_images)
    log(f"drew {len(pixels)} figures for refinement")
    group = _weighted_group(vae, pixels, tags)
    del pixels
    return train_text_to_image(
        lambda: (unet, text_encoder), [group], tokenizer, stage4_phase(steps), seed + 3, log, snapshot=snapshot
    )


def _stage_5(vae, unet, text_encoder, steps: BuildSteps, seed: int, tokenizer, log: Log, snapshot):
    """Stage 4's models taught the shapes of the factory's training pictures (`stage5_phase`).

    The factory trains LoRAs on kohya buckets (tall full-body crops of 64x192 or 96x160
    px, square heads); a model that only ever saw 128 px squares draws broken figures at
    those shapes, so a LoRA trained on them learns from a model out of its depth.
    """
    figures = population_by_shape(SHAPES_POPULATION_SEED + seed, steps.shapes_images)
    return _train_on_shapes(vae, unet, text_encoder, figures, tokenizer, stage5_phase(steps), seed + 4, log, snapshot)


def _stage_6(vae, unet, text_encoder, steps: BuildSteps, seed: int, tokenizer, log: Log, snapshot):
    """Stage 5's models taught to take colour from the text, not from the noise (`stage6_phase`)."""
    figures = population_by_shape(COLOUR_POPULATION_SEED + seed, steps.colour_images)
    return _train_on_shapes(vae, unet, text_encoder, figures, tokenizer, stage6_phase(steps), seed + 5, log, snapshot)


def _train_on_shapes(vae, unet, text_encoder, by_shape: dict, tokenizer, phase: DiffusionPhase, seed: int, log: Log,
                     snapshot):  # fmt: skip
    """Train on `population_by_shape` figures, one weighted latent group per shape."""
    log("drew figures of shapes " + ", ".join(f"{w}x{h}: {len(t)}" for (w, h), (_, t) in by_shape.items()))
    groups = [_weighted_group(vae, pixels, tags) for pixels, tags in by_shape.values()]
    by_shape.clear()  # the pixels: only the latents are needed from here on
    return train_text_to_image(lambda: (unet, text_encoder), groups, tokenizer, phase, seed, log, snapshot=snapshot)


def load_built_stages(folder: Path, steps: BuildSteps, seed: int, vocab: dict[str, int]):
    """(vae, unet, text encoder, stages) of a model that this recipe built with these steps
    and seed as far as stage 3 or further (`stages` lists them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    marker_path = folder / BUILD_MARKER
    if not marker_path.is_file():
        raise FileNotFoundError(f"{folder} has no {BUILD_MARKER}: not a demo base model build")
    marker = json.loads(marker_path.read_text())
    stages = marker.get("stages", ["vae", "decoder", "unet"])  # recipe 2 ended with stage 3
    problems = []
    if tuple(stages) not in [STAGES[:count] for count in range(3, len(STAGES))]:
        problems.append(f"it holds stages {stages}, not stages 1-3, 1-4 or 1-5 of {list(STAGES)}")
    if marker["seed"] != seed:
        problems.append(f"it was built with seed {marker['seed']}, not {seed}")
    ours, theirs = asdict(steps), marker["steps"]
    for stage in ("unet", *stages[3:]):
        if (mismatch := _stage_settings(theirs, stage)) != (wanted := _stage_settings(ours, stage)):
            problems.append(f"its stage {stage!r} ran {mismatch}, not {wanted}")
    if json.loads((folder / "tokenizer" / "vocab.json").read_text()) != vocab:
        problems.append("its tokenizer is not this recipe's")
    if problems:
        raise ValueError(f"cannot resume from {folder}: " + "; ".join(problems))
    # Fresh models with the saved weights: loading would also stamp the folder's path into
    # their configs, which a build from scratch does not have.
    saved_vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae = new_vae()
    vae.load_state_dict(saved_vae.state_dict())
    vae.register_to_config(scaling_factor=saved_vae.config.scaling_factor)
    unet = new_unet()
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
    text_encoder = new_text_encoder(vocab)
    text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())
    return vae.eval(), unet, text_encoder, list(stages)


def _save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, tokenizer_source: Path, marker: dict) -> None:
    save_pipeline(sd15_pipeline(vae, text_encoder, tokenizer, unet), folder, tokenizer_source)
    (folder / BUILD_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- measurements
# Every colour a demo picture may hold; a pixel is read as its nearest one.
WORLD_COLOURS: dict[str, tuple[int, int, int]] = {
    **HAIR_COLOURS, **EYE_COLOURS, **FEATURE_COLOURS, **GARMENT_COLOURS, "skin": SKIN, **BACKGROUNDS,
}  # fmt: skip
_NAMES = list(WORLD_COLOURS)
_RGB = torch.tensor([WORLD_COLOURS[name] for name in _NAMES], dtype=torch.float32)


def nearest_world_colours(image: torch.Tensor) -> torch.Tensor:
    """For a float [3, H, W] 0..255 image, the index in WORLD_COLOURS of each pixel's nearest colour."""
    pixels = image.permute(1, 2, 0).reshape(-1, 3)
    return torch.cdist(pixels, _RGB).argmin(dim=1).reshape(image.shape[1:])


@one_cpu_thread()
def measure_autoencoder(pipeline_dir: Path, count: int = 64, seed: int = HELDOUT_POPULATION_SEED) -> dict:
    """Round-trip error of the VAE on held-out figures, and whether hair and eye colours survive.

    A colour survives in a figure when the reconstructed pixels where the original shows
    exactly that colour are, on average, nearest to that colour among all world colours.
    """
    from lora_factory.training.base_model import load_base_model

    vae = load_base_model(pipeline_dir, device="cpu").vae
    errors, survived = [], {"hair": [], "eyes": []}
    region_errors = {"hair": [], "eyes": []}
    with torch.no_grad():
        for figure in generate_population(seed, count, IMAGE_SIZE):
            original = torch.from_numpy(np.array(figure.image)).permute(2, 0, 1)
            latents = vae.encode(to_unit_range(original[None])).latent_dist.mode()
            decoded = ((vae.decode(latents).sample[0].clamp(-1, 1) + 1) * 127.5).round()
            errors.append((decoded - original.float()).abs().mean(dim=(1, 2)))
            for part, tag in (("hair", figure.character.hair), ("eyes", figure.character.eyes)):
                rgb = torch.tensor(WORLD_COLOURS[tag], dtype=torch.float32)
                mask = (original.float() == rgb[:, None, None]).all(dim=0)
                if not mask.any():
                    continue  # too small to hold one pure pixel after downscaling
                mean = decoded[:, mask].mean(dim=1)
                nearest = _NAMES[torch.cdist(mean[None], _RGB).argmin().item()]
                survived[part].append(nearest == tag)
                region_errors[part].append((decoded[:, mask] - rgb[:, None]).abs().mean().item())
    per_channel = torch.stack(errors).mean(dim=0)
    return {
        "figures": count,
        "mean_abs_error_rgb": [round(v, 2) for v in per_channel.tolist()],
        **{
            f"{part}_survives": f"{sum(flags)}/{len(flags)}" for part, flags in survived.items()
        },
        **{
            f"{part}_region_abs_error": round(float(np.mean(values)), 2) if values else None
            for part, values in region_errors.items()
        },
    }


# The step settings each later stage owns; "unet" stands for stages 1-3, which own the rest.
_STAGE_SETTINGS = {"refine": ("refine_", "tag_naming"), "shapes": ("shapes_",), "colour": ("colour_",)}


def _stage_settings(steps: dict, stage: str) -> dict:
    """The step settings `stage` ran with, out of a BuildSteps dict (a marker's, say)."""
    if stage == "unet":
        later = tuple(prefix for prefixes in _STAGE_SETTINGS.values() for prefix in prefixes)
        return {key: value for key, value in steps.items() if not key.startswith(later)}
    return {key: value for key, value in steps.items() if key.startswith(_STAGE_SETTINGS[stage])}


def _face_of(nearest: torch.Tensor) -> torch.Tensor:
    """The part of a colour-index map inside the face: the box around the skin of the
    picture's upper half (an upper-body figure's face; arms and legs lie lower)."""
    upper = nearest[: nearest.shape[0] // 2]
    rows, columns = torch.nonzero(upper == _NAMES.index("skin"), as_tuple=True)
    if len(rows) == 0:
        return nearest[:0]
    return upper[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]


def colour_prompt(part: str, colour_tag: str) -> str:
    """An upper-body prompt asking for one hair, eye or top colour, the rest fixed."""
    look = {"hair": "red_hair", "eyes": "blue_eyes", "top": "orange_shirt"}
    look[part] = colour_tag
    top_noun = look["top"].rsplit("_", 1)[-1]
    tags = ["1girl", "solo", "long_hair", look["hair"], look["eyes"], top_noun, "skirt", look["top"],
            "beige_skirt", "upper_body", "looking_at_viewer", "white_background", "simple_background"]  # fmt: skip
    return caption_text(tags)


COLOUR_CHOICES = {
    "hair": tuple(HAIR_COLOURS),
    "eyes": tuple(EYE_COLOURS),
    "top": ("orange_shirt", "blue_shirt", "navy_jacket", "brown_coat"),
}


@one_cpu_thread()
def measure_colour_following(
    pipeline_dir: Path,
    part: str = "hair",
    seeds: Sequence[int] = tuple(range(6)),
    guidance: float = 4.0,
    steps: int = 20,
    grid_path: Path | None = None,
) -> dict:
    """Does text-to-image follow colour tags? Render one prompt per colour with the same seeds.

    For every image, the pixels nearest to one of the part's colours are counted per
    colour (eye colours inside the face only: a muddy brown top is not brown eyes); the
    image follows the prompt when the asked colour has the most. Chance is
    1 / (number of colours). Renders with the factory's `PreviewRenderer` (DPM++ 2M,
    clip skip 2, empty negative prompt). `grid_path` saves the images, a row per colour.
    """
    from lora_factory.evaluation.previews import PreviewRenderer
    from lora_factory.evaluation.prompts import PreviewPrompt

    colours = COLOUR_CHOICES[part]
    renderer = PreviewRenderer(pipeline_dir, steps=steps, guidance=guidance, device="cpu", batch_size=len(seeds))
    candidate_ids = torch.tensor([_NAMES.index(c) for c in colours])
    hits, shares, rows = 0, {}, []
    for colour in colours:
        prompts = [PreviewPrompt(f"{colour}_{s}", colour_prompt(part, colour), "", s) for s in seeds]
        images = renderer.render(None, prompts)
        rows.append(images)
        asked = []
        for image in images:
            nearest = nearest_world_colours(torch.from_numpy(np.array(image)).permute(2, 0, 1).float())
            if part == "eyes":
                nearest = _face_of(nearest)
            counts = torch.stack([(nearest == i).sum() for i in candidate_ids])
            hits += int(counts.argmax().item() == colours.index(colour) and counts.max() > 0)
            asked.append(counts[colours.index(colour)].item() / max(1, counts.sum().item()))
        shares[colour] = round(float(np.mean(asked)), 3)
    if grid_path is not None:
        save_grid(rows, grid_path)
    total = len(colours) * len(seeds)
    return {
        "part": part,
        "images": total,
        "follows": f"{hits}/{total}",
        "chance": round(1 / len(colours), 3),
        "asked_colour_share": shares,  # of the part's colour pixels, the asked colour's share
    }


def save_grid(rows: Sequence[Sequence[Image.Image]], path: Path) -> Path:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


@one_cpu_thread()
def save_samples(pipeline_dir: Path, folder: Path, guidance: float = 4.0, steps: int = 20) -> list[Path]:
    """Sample grids for a person to look at: held-out captions, the factory's framings,
    and tall bucket shapes (`shape_<w>x<h>.png`: what the factory's LoRAs train on)."""
    from lora_factory.evaluation.previews import PreviewRenderer
    from lora_factory.evaluation.prompts import PreviewPrompt

    renderer = PreviewRenderer(pipeline_dir, steps=steps, guidance=guidance, device="cpu", batch_size=8)
    figures = list(generate_population(HELDOUT_POPULATION_SEED, 16, IMAGE_SIZE))
    prompts = [PreviewPrompt(str(i), f.caption, "", i) for i, f in enumerate(figures)]
    generated = renderer.render(None, prompts)
    # Row pairs: the held-out figure drawn by the world, then the model's picture of its caption.
    rows = [[f.image for f in figures[:8]], generated[:8], [f.image for f in figures[8:]], generated[8:]]
    paths = [save_grid(rows, folder / "heldout_captions.png")]
    (folder / "heldout_captions.txt").write_text("\n".join(f.caption for f in figures) + "\n")
    def framed(framing: str) -> list[PreviewPrompt]:
        caption = caption_text([
            "1girl", "solo", "long_hair", "pink_hair", "purple_eyes", "horns", "dress", "green_dress",
            framing, "white_background", "simple_background",
        ])  # fmt: skip
        return [PreviewPrompt(f"{framing}{seed}", caption, "", seed) for seed in range(8)]

    paths.append(save_grid([renderer.render(None, framed(framing)) for framing in FRAMINGS], folder / "framings.png"))
    for (width, height), framing in (((64, 192), "full_body"), ((96, 160), "upper_body")):
        shaped = PreviewRenderer(pipeline_dir, steps=steps, guidance=guidance, device="cpu", batch_size=8,
                                 size=(width, height))  # fmt: skip
        paths.append(save_grid([shaped.render(None, framed(framing))], folder / f"shape_{width}x{height}.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="build the model into this new folder")
    parser.add_argument("--tiny", action="store_true", help="a smoke build with tiny step counts")
    parser.add_argument("--snapshots", type=Path, help="also save the diffusion stages' intermediate models here")
    parser.add_argument("--resume-from", type=Path, help="a model built up to stage 3, 4 or 5: run the stages after it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=Path, help="measure this built model (and write --samples)")
    parser.add_argument("--samples", type=Path, help="folder for sample grids (with --measure)")
    args = parser.parse_args(argv)
    if not args.out and not args.measure:
        parser.error("give --out (build) and/or --measure")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.out:
        build_demo_base_model(
            args.out, TINY_BUILD if args.tiny else FULL_BUILD, args.seed, log, args.snapshots, args.resume_from
        )
    if args.measure:
        log(json.dumps(measure_autoencoder(args.measure)))
        for part in COLOUR_CHOICES:
            grid = args.samples / f"colour_{part}.png" if args.samples else None
            log(json.dumps(measure_colour_following(args.measure, part, grid_path=grid)))
        if args.samples:
            for path in save_samples(args.measure, args.samples):
                log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
