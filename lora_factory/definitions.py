"""The lora_factory code location (loaded by workspace.yaml).

`LF_DEPLOYMENT` picks the resources, everything under LF_HOME (default ./.lora_factory):
- `demo` (the default): the demo booru, the tiny vision models, the demo base model
  (`LF_DEMO_BASE_MODEL=tiny-sd15`: the tiny random one, which checks the plumbing in
  seconds) and the demo characters (lora_factory.demo.deployment); nothing to configure.
- `production`: real image sites, the real vision models (fetched once into the Hugging
  Face cache), the base model set in `BaseModelResource.source` and the index named by
  LF_INDEX_PATH. Edit them here, or per run in the UI's launchpad.
"""

import os

import dagster as dg

from lora_factory.assets.anime import anime_posts, series_clusters, series_figures
from lora_factory.assets.cleaning import cleaned_crops
from lora_factory.assets.dataset import buckets, captions
from lora_factory.assets.evaluation import chosen_model, recscore_table
from lora_factory.assets.index import character_index
from lora_factory.assets.scraping import matched_tags, raw_scrape
from lora_factory.assets.training import lora_checkpoints
from lora_factory.jobs import character_job, executor, index_job, series_job
from lora_factory.resources import (
    AnimeSeries,
    BaseModelResource,
    CharacterIndex,
    FactoryStorage,
    ImageSites,
    VisionModelsResource,
)
from lora_factory.sensors import character_index_sensor
from lora_factory.storage import DEFAULT_HOME


def _demo_resources() -> dict:
    # Imported only here: the production deployment loads nothing of the demo.
    from lora_factory.demo.deployment import DEMO_BASE_MODEL, DEMO_INDEX_PATH, demo_resources

    return demo_resources(
        os.environ.get("LF_INDEX_PATH", DEMO_INDEX_PATH), os.environ.get("LF_DEMO_BASE_MODEL") or DEMO_BASE_MODEL
    )


def _production_resources() -> dict:
    return {
        "character_index": CharacterIndex(index_path=os.environ.get("LF_INDEX_PATH", "")),
        "image_sites": ImageSites(),
        "vision_models": VisionModelsResource(),
        "base_model": BaseModelResource(),
        "anime_series": AnimeSeries(),
    }


DEPLOYMENTS = {"demo": _demo_resources, "production": _production_resources}


def deployment_resources(deployment: str) -> dict:
    """The resources of a deployment named in DEPLOYMENTS."""
    if deployment not in DEPLOYMENTS:
        raise ValueError(
            f"LF_DEPLOYMENT={deployment!r} is not a deployment: use one of {', '.join(DEPLOYMENTS)}"
        )
    return {
        "storage": FactoryStorage(home=os.environ.get("LF_HOME", DEFAULT_HOME)),
        **DEPLOYMENTS[deployment](),
    }


defs = dg.Definitions(
    assets=[
        character_index,
        raw_scrape,
        matched_tags,
        series_figures,
        series_clusters,
        anime_posts,
        cleaned_crops,
        captions,
        buckets,
        lora_checkpoints,
        recscore_table,
        chosen_model,
    ],
    jobs=[character_job, index_job, series_job],
    sensors=[character_index_sensor],
    # For the UI's Materialize and asset backfills (the implicit asset job): the jobs'
    # executor (in-process unless LF_EXECUTOR says otherwise).
    executor=executor,
    resources=deployment_resources(os.environ.get("LF_DEPLOYMENT") or "demo"),
)
