"""The demo deployment (`LF_DEPLOYMENT=demo`): the demo booru, the tiny vision models, the
demo base model and the demo characters, so the factory runs end to end on a laptop with
nothing to configure or fetch, and its LoRAs really learn their characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lora_factory.demo.service import demo_booru_url
from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
from lora_factory.demo.world_population import (
    BUCKET_STEP,
    COARSE_NOISE_MULTIRES_DISCOUNT,
    COARSE_NOISE_MULTIRES_ITERATIONS,
    COARSE_NOISE_OFFSET,
)
from lora_factory.resources import (
    AnimeSeries,
    BaseModelResource,
    CharacterIndex,
    ImageSites,
    SiteConfig,
    VisionModelsResource,
)
from lora_factory.resources.models import BaseModelDefaults
from lora_factory.storage import FactoryStore
from lora_factory.vision.registry import ModelRegistry

DEMO_INDEX_PATH = Path(__file__).with_name("index.yaml")
# A Danbooru-API site on loopback, so it may go faster than a real site.
DEMO_SITE = {"name": "demo", "api": "danbooru", "requests_per_second": 50.0}
DEMO_BASE_MODEL = "demo-base"
DEMO_BASE_MODEL_DIR = Path(__file__).with_name("base_model")  # shipped with the package
TINY_BASE_MODEL = "tiny-sd15"
DEMO_SERIES = "starlight_tv"
# Training and previews on the demo base model (see DemoBaseModel).
# Measured on Kaede's crops: 4e-3 / 2e-3 moved previews furthest toward her within 300
# steps (1e-3 barely moved them, 1e-2 broke them; 1,200 steps added nothing); with caption
# tag dropout (below), 3e-3 / 1.5e-3 did better on make demo's data. The small
# base model draws colour in its ResNet convolutions: on her whole-figure crops, adapting
# the attention blocks alone left her previews at fidelity 0.1-0.2, adding the
# convolutions (kohya's conv_dim) reached 0.3-0.6; on the demo's own bucketed dataset
# 0.1 against 0.0.
DEMO_TRAIN_STEPS = 300
DEMO_SAVE_EVERY = 75
DEMO_UNET_LEARNING_RATE = 3e-3
DEMO_TEXT_ENCODER_LEARNING_RATE = 1.5e-3
DEMO_CONV_RANK = 8
# A cosine schedule spends the last third of 300 steps at a small fraction of the rate;
# held constant, make demo's LoRAs reached 0.44 / 0.28 / 0.70 / 0.13 fidelity at their
# chosen steps instead of 0.33 / 0.27 / 0.68 / 0.07. A constant rate can overshoot late in
# a run; RecScore's step choice and curve are there for that.
DEMO_LR_SCHEDULER = "constant"
# Every caption of a demo character carries the same few outfit and background tags, so a
# LoRA learns the character together with them and loses it in prompts that leave them out
# or add pose and expression words. Leaving out each tag after the trigger word 30% of the
# time, make demo's LoRAs reached 0.39 / 0.47 / 0.82 / 0.13 fidelity at their chosen steps
# instead of 0.25 / 0.47 / 0.64 / 0.13 (training seed 1: 0.29 / 0.58 / 0.67 / 0.07 instead
# of 0.24 / 0.43 / 0.61 / 0.13), and with the learning rates above (3e-3 / 1.5e-3, not
# 4e-3 / 2e-3) 0.37 / 0.63 / 0.77 / 0.10 (seed 1: 0.30 / 0.67 / 0.68 / 0.17).
DEMO_CAPTION_TAG_DROPOUT = 0.3
DEMO_PREVIEWS_PER_PROMPT = 3
# On a CPU this small model renders faster in bigger batches: 30 previews on 2 cores took
# 9.6-16.4 s (median 14.4) 4 at a time, 6.9-7.4 s 16 at a time, 6.5-11.1 s 33 at a time.
DEMO_PREVIEW_BATCH_SIZE = 16
DEMO_GUIDANCE = 4.0  # what the base model was trained for (10% unconditional captions)


class DemoImageSites(ImageSites):
    """Sites with the demo booru among them (by default, only it)."""

    sites: list[SiteConfig] = [DEMO_SITE]

    def site_configs(self) -> list[SiteConfig]:
        # The demo booru is started in the process that scrapes, on a free port: its URL
        # is known only then.
        return [
            site.model_copy(update={"base_url": demo_booru_url()})
            if site.name == DEMO_SITE["name"] and site.enabled and not site.base_url
            else site
            for site in super().site_configs()
        ]


class DemoVisionModels(VisionModelsResource):
    """The tiny models: ONNX graphs built on first use, with the real models' signatures."""

    tagger: str = TINY_MODELS["tagger"]
    identity: str = TINY_MODELS["identity"]
    person: str = TINY_MODELS["person"]
    halfbody: str = TINY_MODELS["halfbody"]
    head: str = TINY_MODELS["head"]
    face: str = TINY_MODELS["face"]
    monochrome: str = TINY_MODELS["monochrome"]
    classification: str = TINY_MODELS["classification"]
    rating: str = TINY_MODELS["rating"]
    aesthetic: str = TINY_MODELS["aesthetic"]

    def registry(self, store: FactoryStore) -> ModelRegistry:
        return tiny_registry(store.models_dir, offline=self.offline)


class DemoBaseModel(BaseModelResource):
    """The demo base model, shipped with the package: a small SD1.5-shaped text-to-image
    model trained on a population of demo-world figures (never the index's characters),
    so it draws the demo world and follows its tags, and a LoRA has a character to learn.
    `python -m lora_factory.demo.base_model_build` rebuilds it."""

    source: str = DEMO_BASE_MODEL

    # Suited to this small model and the demo's budget on a laptop CPU: a short run at
    # higher learning rates than a real model takes, previews at its native size with
    # the guidance it was trained for.
    defaults: ClassVar[BaseModelDefaults] = BaseModelDefaults(
        max_train_steps=DEMO_TRAIN_STEPS,
        save_every_n_steps=DEMO_SAVE_EVERY,
        unet_learning_rate=DEMO_UNET_LEARNING_RATE,
        text_encoder_learning_rate=DEMO_TEXT_ENCODER_LEARNING_RATE,
        lr_scheduler=DEMO_LR_SCHEDULER,
        conv_rank=DEMO_CONV_RANK,
        caption_tag_dropout=DEMO_CAPTION_TAG_DROPOUT,
        # The coarse noise its last build stage trained on (see world_population).
        noise_offset=COARSE_NOISE_OFFSET,
        multires_noise_iterations=COARSE_NOISE_MULTIRES_ITERATIONS,
        multires_noise_discount=COARSE_NOISE_MULTIRES_DISCOUNT,
        sampling_steps=20,
        guidance=DEMO_GUIDANCE,
        # Rendering is cheap here (~0.15 s a preview): three seeds a prompt make fidelity
        # move in steps of ~0.03 instead of ~0.1, so the chosen step is not a coin toss.
        previews_per_prompt=DEMO_PREVIEWS_PER_PROMPT,
        preview_batch_size=DEMO_PREVIEW_BATCH_SIZE,
        # Its sides go in steps of 32 px (SD1.5's: 64): at 128 px, steps of 64 leave
        # tall crops two shapes, 64x192 or a square, and cut a third off most of them.
        bucket_step=BUCKET_STEP,
    )
    synthetic_demo: ClassVar[bool] = True

    def resolve(self, store: FactoryStore) -> Path:
        if self.source != DEMO_BASE_MODEL:
            raise ValueError(
                f"the demo base model is always {DEMO_BASE_MODEL!r}, got {self.source!r}: for a real "
                "model, set LF_DEPLOYMENT=production and BaseModelResource.source"
            )
        from lora_factory.demo.base_model_build import BUILD_MARKER

        if not (DEMO_BASE_MODEL_DIR / BUILD_MARKER).is_file():
            raise FileNotFoundError(
                f"the demo base model is missing from {DEMO_BASE_MODEL_DIR}: reinstall the package, or "
                f"rebuild it with `python -m lora_factory.demo.base_model_build --out {DEMO_BASE_MODEL_DIR}`"
            )
        return DEMO_BASE_MODEL_DIR


class TinyBaseModel(BaseModelResource):
    """The tiny random-weight SD1.5-shaped model, built on first use: it checks the
    factory's plumbing in seconds (the tests use it), but draws noise, so its LoRAs learn
    nothing one can see."""

    source: str = TINY_BASE_MODEL

    # Random weights: train only long enough for a few real checkpoints, render quickly.
    defaults: ClassVar[BaseModelDefaults] = BaseModelDefaults(
        max_train_steps=96, save_every_n_steps=24, sampling_steps=8
    )
    synthetic_demo: ClassVar[bool] = True

    def resolve(self, store: FactoryStore) -> Path:
        if self.source != TINY_BASE_MODEL:
            raise ValueError(f"the tiny base model is always {TINY_BASE_MODEL!r}, got {self.source!r}")
        from lora_factory.training.tiny_sd import build_tiny_sd15  # torch: only when a stage needs it

        return build_tiny_sd15(store.models_dir / TINY_BASE_MODEL)


class DemoAnimeSeries(AnimeSeries):
    """The demo series: the demo world animated into short synthetic episodes
    (`lora_factory.demo.episodes`: scene cuts, pans, several figures at once, and Kaede's
    look-alike Midori), made once on first use under the factory's home."""

    series: dict[str, str] = {DEMO_SERIES: ""}

    def videos(self, name: str, store: FactoryStore) -> list[Path]:
        if name == DEMO_SERIES and not self.series.get(name):
            from lora_factory.demo.episodes import demo_factory_series

            return demo_factory_series(store.root / "demo" / "series" / name)
        return super().videos(name, store)

    def listing(self, name: str, store: FactoryStore) -> str:
        if name == DEMO_SERIES and not self.series.get(name):
            return "demo series"  # made once, never changes: not worth making in a sensor tick
        return super().listing(name, store)


DEMO_BASE_MODELS: dict[str, type[BaseModelResource]] = {
    DEMO_BASE_MODEL: DemoBaseModel,
    TINY_BASE_MODEL: TinyBaseModel,
}


def demo_resources(index_path: str | Path = DEMO_INDEX_PATH, base_model: str = DEMO_BASE_MODEL) -> dict:
    """Every resource of the demo deployment but the factory's storage; `base_model` is a
    DEMO_BASE_MODELS name (`LF_DEMO_BASE_MODEL`)."""
    if base_model not in DEMO_BASE_MODELS:
        raise ValueError(
            f"LF_DEMO_BASE_MODEL={base_model!r} is not a demo base model: use one of {', '.join(DEMO_BASE_MODELS)}"
        )
    return {
        "character_index": CharacterIndex(index_path=str(index_path)),
        "image_sites": DemoImageSites(),
        "vision_models": DemoVisionModels(),
        "base_model": DEMO_BASE_MODELS[base_model](),
        "anime_series": DemoAnimeSeries(),
    }
