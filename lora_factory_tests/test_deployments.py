"""The two deployments of definitions.py: the demo (the default) and production, whose
code never loads the demo and whose resources say what to configure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_factory.definitions import deployment_resources
from lora_factory.demo.deployment import DemoBaseModel, DemoImageSites, DemoVisionModels
from lora_factory.index.character_index import CharacterIndexError
from lora_factory.resources import BaseModelResource
from lora_factory.storage import FactoryStore
from lora_factory.training.config import TrainingConfig
from lora_factory.vision.registry import DEFAULT_MODELS, ModelNotFoundError

# Imports every module but the demo's and the benchmarks' (which draw demo pictures) and
# the production definitions, then lists what of the demo got loaded.
PRODUCTION_IMPORTS = """
import importlib, json, pkgutil, sys
import dagster as dg
import lora_factory
for top in pkgutil.iter_modules(lora_factory.__path__, "lora_factory."):
    if top.name in ("lora_factory.demo", "lora_factory.benchmarks"):
        continue
    module = importlib.import_module(top.name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), f"{top.name}."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
from lora_factory.definitions import defs
dg.Definitions.validate_loadable(defs)
print(json.dumps({
    "demo_modules": sorted(m for m in sys.modules if m.startswith("lora_factory.demo")),
    "resources": {key: type(value).__name__ for key, value in defs.resources.items()},
}))
"""


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> dict:
    env = {**os.environ, "LF_DEPLOYMENT": "production", "LF_HOME": str(tmp_path_factory.mktemp("home"))}
    env.pop("LF_INDEX_PATH", None)
    done = subprocess.run(
        [sys.executable, "-c", PRODUCTION_IMPORTS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_production_code_imports_nothing_from_the_demo(production):
    assert production["demo_modules"] == []


def test_production_definitions_load_with_the_plain_resources(production):
    assert production["resources"] == {
        "storage": "FactoryStorage",
        "character_index": "CharacterIndex",
        "image_sites": "ImageSites",
        "vision_models": "VisionModelsResource",
        "base_model": "BaseModelResource",
    }


def test_an_unknown_deployment_fails_naming_the_deployments():
    with pytest.raises(ValueError, match="LF_DEPLOYMENT='staging' is not a deployment: use one of demo, production"):
        deployment_resources("staging")


def test_production_resources_fail_clearly_until_configured(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("LF_INDEX_PATH", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    resources = deployment_resources("production")
    store = FactoryStore(tmp_path / "home")

    with pytest.raises(CharacterIndexError, match="set LF_INDEX_PATH"):
        resources["character_index"].rows()
    with pytest.raises(ValueError, match="SD1.5 .safetensors file or a diffusers folder"):
        resources["base_model"].resolve(store)
    assert resources["vision_models"].names() == DEFAULT_MODELS
    with pytest.raises(ModelNotFoundError, match="hf download SmilingWolf/wd-swinv2-tagger-v3"):
        resources["vision_models"].load(store)
    clients, skipped = resources["image_sites"].build()
    assert sorted(clients) == ["danbooru", "konachan", "safebooru", "yandere"] and skipped == []


def test_the_demo_is_the_default_deployment(monkeypatch):
    monkeypatch.delenv("LF_INDEX_PATH", raising=False)
    resources = deployment_resources("demo")
    assert isinstance(resources["image_sites"], DemoImageSites)
    assert isinstance(resources["vision_models"], DemoVisionModels)
    assert isinstance(resources["base_model"], DemoBaseModel)
    assert len(resources["character_index"].enabled_rows()) == 4


def test_only_the_demo_base_model_shortens_runs_and_marks_releases():
    assert BaseModelResource.defaults.training(TrainingConfig()) == TrainingConfig()
    assert BaseModelResource.defaults.sampling_steps is None and not BaseModelResource.synthetic_demo
    demo = DemoBaseModel.defaults.training(TrainingConfig())
    assert (demo.max_train_steps, demo.save_every_n_steps, DemoBaseModel.defaults.sampling_steps) == (96, 24, 8)
    assert DemoBaseModel.synthetic_demo
    # What a run's settings decide stays decided.
    by_epochs = DemoBaseModel.defaults.training(TrainingConfig(max_train_epochs=3, save_every_n_steps=5))
    assert (by_epochs.max_train_steps, by_epochs.max_train_epochs, by_epochs.save_every_n_steps) == (None, 3, 5)


def test_the_demo_base_model_is_only_the_tiny_one(tmp_path):
    with pytest.raises(ValueError, match="LF_DEPLOYMENT=production"):
        DemoBaseModel(source="/models/real").resolve(FactoryStore(tmp_path))
