"""Identity tolerance: how the demo identity model scores imperfect pictures of a character.

RecScore's fidelity (`evaluation.recscore.fidelity`) asks the identity model whether a
preview shows the character of the dataset. Generated previews are never pixel-perfect:
an autoencoder round trip blurs edges and shifts colours, sampling adds noise. Real CCIP
recognises imperfect generations; a demo replica that matched colours within a hard
tolerance called a slightly blurred rendering of a character someone else, so every
LoRA scored 0. This script measures it: fidelity of each demo character's dataset-like
crops (full, upper body and head crops of drawn posts, as cleaning cuts them) against
the same crops after each degradation, for the soft colour reading the demo identity
model uses and for a hard within-radius reading, side by side. Two floors: other demo
characters' crops (should stay at 0) and random demo-world figures (chance).

    python -m lora_factory.benchmarks.identity_tolerance [--crops 12] [--base-model DIR]

`--base-model` adds a round trip through that model's autoencoder (a diffusers pipeline
folder, such as the demo base model) at its native resolution.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from lora_factory.cleaning.crops import three_stage_crops
from lora_factory.demo.characters import DEMO_CHARACTERS, DemoCharacter
from lora_factory.demo.drawing import draw_post
from lora_factory.demo.tiny_models import identity_model_files
from lora_factory.demo.world_population import generate_population
from lora_factory.evaluation.recscore import dataset_upper_bound, fidelity
from lora_factory.storage import atomic_write_bytes
from lora_factory.vision.identity import IdentityModel

Degradation = Callable[[Image.Image], Image.Image]


def _jpeg(quality: int) -> Degradation:
    def degrade(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    return degrade


def _shift(offsets: tuple[int, int, int]) -> Degradation:
    def degrade(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.int16) + np.asarray(offsets, dtype=np.int16)
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    return degrade


def _noise(sigma: float, seed: int = 0) -> Degradation:
    def degrade(image: Image.Image) -> Image.Image:
        noise = np.random.default_rng(seed).normal(0.0, sigma, (image.height, image.width, 3))
        return Image.fromarray((np.asarray(image, dtype=np.float64) + noise).round().clip(0, 255).astype(np.uint8))

    return degrade


def _rescaled(side: int) -> Degradation:
    def degrade(image: Image.Image) -> Image.Image:
        small = image.resize((side, side * image.height // max(1, image.width) or 1), Image.Resampling.BILINEAR)
        return small.resize(image.size, Image.Resampling.BICUBIC)

    return degrade


DEGRADATIONS: dict[str, Degradation] = {
    "none": lambda image: image,
    "gaussian blur r=1": lambda image: image.filter(ImageFilter.GaussianBlur(1)),
    "gaussian blur r=2": lambda image: image.filter(ImageFilter.GaussianBlur(2)),
    "gaussian blur r=4": lambda image: image.filter(ImageFilter.GaussianBlur(4)),
    "JPEG q=40": _jpeg(40),
    "JPEG q=15": _jpeg(15),
    "colour shift +20 (all channels)": _shift((20, 20, 20)),
    "colour cast (+25 R, -25 B)": _shift((25, 0, -25)),
    "noise sigma 8": _noise(8.0),
    "noise sigma 20": _noise(20.0),
    "64 px wide and back": _rescaled(64),
}


def autoencoder_round_trip(pipeline_dir: Path) -> Degradation:
    """Encode and decode through a diffusers pipeline's VAE at its native square resolution."""
    import torch

    from lora_factory.training.base_model import load_base_model, native_resolution

    vae = load_base_model(pipeline_dir, device="cpu").vae
    side = native_resolution(pipeline_dir)

    @torch.no_grad()
    def degrade(image: Image.Image) -> Image.Image:
        square = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
        pixels = torch.from_numpy(square).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0]
        out = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(out).resize(image.size, Image.Resampling.BICUBIC)

    return degrade


def character_crops(character: DemoCharacter, count: int, seed: int = 0) -> list[Image.Image]:
    """`count` crops of `character` as cleaning cuts them (full, upper, head; JPEG 85)."""
    rng = random.Random(f"{character.key}/{seed}")
    crops: list[Image.Image] = []
    while len(crops) < count:
        outfit = rng.randrange(len(character.outfits))
        size = (rng.randrange(420, 800), rng.randrange(520, 800))
        post = draw_post([(character, outfit)], size, rng, rng.choice(["white_background", "blue_background"]))
        figure = post.figures[0]
        for crop in three_stage_crops(post.image.size, figure.box, [figure.half_body_box], [figure.head_box]):
            crops.append(_jpeg(85)(post.image.crop(crop.box)))
    return crops[:count]


def write_identity_model(folder: Path, soft: bool) -> Path:
    for name, data in identity_model_files(soft).items():
        atomic_write_bytes(folder / name, data)
    return folder


def tolerance_table(
    models: dict[str, IdentityModel],
    degradations: dict[str, Degradation],
    crops_per_character: int = 12,
    characters: Sequence[DemoCharacter] = DEMO_CHARACTERS,
) -> pd.DataFrame:
    """Mean fidelity over `characters`: one row per degradation and floor, one column per model."""
    crops = {c.key: character_crops(c, crops_per_character) for c in characters}
    population = [figure.image for figure in generate_population(2, crops_per_character * 2, 128)]
    rows: dict[str, dict[str, float]] = {}
    for model_name, model in models.items():
        dataset = {key: model.embed(images) for key, images in crops.items()}
        bounds = {key: dataset_upper_bound(features, model) for key, features in dataset.items()}

        def mean_fidelity(previews_of: Callable[[str], np.ndarray]) -> float:
            return float(np.mean([fidelity(previews_of(key), dataset[key], model, bounds[key]) for key in dataset]))

        for label, degrade in degradations.items():
            degraded = {key: model.embed([degrade(image) for image in images]) for key, images in crops.items()}
            rows.setdefault(label, {})[model_name] = mean_fidelity(degraded.__getitem__)
        others = "other demo characters (floor: 0)"
        rows.setdefault(others, {})[model_name] = mean_fidelity(
            lambda key: np.concatenate([features for other, features in dataset.items() if other != key])
        )
        population_features = model.embed(population)
        rows.setdefault("random demo-world figures (chance)", {})[model_name] = mean_fidelity(
            lambda key: population_features
        )
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "previews"
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=12, help="dataset crops per demo character")
    parser.add_argument("--base-model", type=Path, help="also round-trip through this pipeline's autoencoder")
    args = parser.parse_args(argv)
    degradations = dict(DEGRADATIONS)
    if args.base_model:
        degradations["autoencoder round trip"] = autoencoder_round_trip(args.base_model)
    with tempfile.TemporaryDirectory() as work:
        models = {
            reading: IdentityModel(write_identity_model(Path(work) / reading, soft=reading == "soft"), providers="cpu")
            for reading in ("hard", "soft")
        }
        table = tolerance_table(models, degradations, args.crops)
    table["soft - hard"] = table["soft"] - table["hard"]
    print(f"RecScore fidelity, mean over the {len(DEMO_CHARACTERS)} demo characters, {args.crops} crops each")
    print(table.round(3).to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
