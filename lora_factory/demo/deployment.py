"""The demo deployment (`LF_DEPLOYMENT=demo`): the demo booru, the tiny vision models, the
tiny SD1.5-shaped base model and the demo characters, so the factory runs end to end on
a laptop with nothing to configure or fetch. Its LoRAs and scores are meaningless.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lora_factory.demo.service import demo_booru_url
from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
from lora_factory.resources import (
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
TINY_BASE_MODEL = "tiny-sd15"


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
    """The tiny random-weight SD1.5-shaped model, built under the factory's models folder."""

    source: str = TINY_BASE_MODEL

    # Random weights make its LoRAs meaningless: train only long enough for a few real
    # checkpoints, render previews quickly, and say so in every release.
    defaults: ClassVar[BaseModelDefaults] = BaseModelDefaults(
        max_train_steps=96, save_every_n_steps=24, sampling_steps=8
    )
    synthetic_demo: ClassVar[bool] = True

    def resolve(self, store: FactoryStore) -> Path:
        if self.source != TINY_BASE_MODEL:
            raise ValueError(
                f"the demo base model is always {TINY_BASE_MODEL!r}, got {self.source!r}: for a real "
                "model, set LF_DEPLOYMENT=production and BaseModelResource.source"
            )
        from lora_factory.training.tiny_sd import build_tiny_sd15  # torch: only when a stage needs it

        return build_tiny_sd15(store.models_dir / TINY_BASE_MODEL)


def demo_resources(index_path: str | Path = DEMO_INDEX_PATH) -> dict:
    """Every resource of the demo deployment but the factory's storage."""
    return {
        "character_index": CharacterIndex(index_path=str(index_path)),
        "image_sites": DemoImageSites(),
        "vision_models": DemoVisionModels(),
        "base_model": DemoBaseModel(),
    }
