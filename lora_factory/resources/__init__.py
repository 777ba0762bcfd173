"""Dagster resources: configuration objects that hand the core what it needs."""

from lora_factory.resources.anime import AnimeSeries
from lora_factory.resources.index import CharacterIndex
from lora_factory.resources.models import BaseModelResource, VisionModelsResource
from lora_factory.resources.sites import ImageSites, SiteConfig
from lora_factory.resources.storage import FactoryStorage

__all__ = [
    "AnimeSeries",
    "BaseModelResource",
    "CharacterIndex",
    "FactoryStorage",
    "ImageSites",
    "SiteConfig",
    "VisionModelsResource",
]
