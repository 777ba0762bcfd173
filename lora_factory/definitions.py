"""The lora_factory code location (loaded by workspace.yaml).

Resources default to the embedded demo: the demo booru, the built-in tiny vision models
and the tiny SD1.5-shaped base model, all under LF_HOME (default ./.lora_factory).
Edit them here, or per run in the UI's launchpad, to use real sites and models.
"""

import os

import dagster as dg

from lora_factory.assets.cleaning import cleaned_crops
from lora_factory.assets.dataset import buckets, captions
from lora_factory.assets.evaluation import chosen_model, recscore_table
from lora_factory.assets.index import character_index
from lora_factory.assets.scraping import matched_tags, raw_scrape
from lora_factory.assets.training import lora_checkpoints
from lora_factory.index.character_index import DEMO_INDEX_PATH
from lora_factory.jobs import character_job
from lora_factory.resources import (
    BaseModelResource,
    CharacterIndex,
    FactoryStorage,
    ImageSites,
    VisionModelsResource,
)
from lora_factory.run_health import monitored_executor
from lora_factory.sensors import character_index_sensor
from lora_factory.storage import DEFAULT_HOME

defs = dg.Definitions(
    assets=[
        character_index,
        raw_scrape,
        matched_tags,
        cleaned_crops,
        captions,
        buckets,
        lora_checkpoints,
        recscore_table,
        chosen_model,
    ],
    jobs=[character_job],
    sensors=[character_index_sensor],
    # Records each run's worker process so run monitoring can fail runs whose worker died.
    executor=monitored_executor,
    resources={
        "storage": FactoryStorage(home=os.environ.get("LF_HOME", DEFAULT_HOME)),
        "character_index": CharacterIndex(
            index_path=os.environ.get("LF_INDEX_PATH", str(DEMO_INDEX_PATH))
        ),
        "image_sites": ImageSites(),
        "vision_models": VisionModelsResource(),
        "base_model": BaseModelResource(),
    },
)
