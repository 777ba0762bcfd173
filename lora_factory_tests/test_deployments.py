"""The two deployments of definitions.py: the demo (the default) and production, whose
code never loads the demo and whose resources say what to configure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_factory.assets.evaluation import EvaluationSettings, PreviewSettings, preview_settings
from lora_factory.definitions import deployment_resources
from lora_factory.demo.deployment import (
    DEMO_BASE_MODEL_DIR,
    DEMO_GUIDANCE,
    DEMO_LR_SCHEDULER,
    DEMO_PREVIEWS_PER_PROMPT,
    DEMO_PREVIEW_BATCH_SIZE,
    DEMO_SAVE_EVERY,
    DEMO_TEXT_ENCODER_LEARNING_RATE,
    DEMO_TRAIN_STEPS,
    DEMO_UNET_LEARNING_RATE,
    DemoBaseModel,
    DemoImageSites,
    DemoVisionModels,
    TinyBaseModel,
)
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
        "anime_series": "AnimeSeries",
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
    monkeypatch.delenv("LF_DEMO_BASE_MODEL", raising=False)
    resources = deployment_resources("demo")
    assert isinstance(resources["image_sites"], DemoImageSites)
    assert isinstance(resources["vision_models"], DemoVisionModels)
    assert isinstance(resources["base_model"], DemoBaseModel)
    assert len(resources["character_index"].enabled_rows()) == 4
    monkeypatch.setenv("LF_DEMO_BASE_MODEL", "tiny-sd15")
    assert isinstance(deployment_resources("demo")["base_model"], TinyBaseModel)
    monkeypatch.setenv("LF_DEMO_BASE_MODEL", "sd15")
    with pytest.raises(ValueError, match="LF_DEMO_BASE_MODEL='sd15' is not a demo base model: use one of demo-base, tiny"):
        deployment_resources("demo")


def test_only_the_demo_base_models_set_training_and_preview_defaults():
    assert BaseModelResource.defaults.training(TrainingConfig()) == TrainingConfig()
    assert BaseModelResource.defaults.sampling_steps is None and not BaseModelResource.synthetic_demo
    assert BaseModelResource.defaults.guidance is None
    tiny = TinyBaseModel.defaults.training(TrainingConfig())
    assert (tiny.max_train_steps, tiny.save_every_n_steps, TinyBaseModel.defaults.sampling_steps) == (96, 24, 8)
    assert tiny.unet_learning_rate is None and TinyBaseModel.synthetic_demo
    demo = DemoBaseModel.defaults.training(TrainingConfig())
    assert (demo.max_train_steps, demo.save_every_n_steps) == (DEMO_TRAIN_STEPS, DEMO_SAVE_EVERY)
    assert (demo.unet_learning_rate, demo.text_encoder_learning_rate) == (
        DEMO_UNET_LEARNING_RATE, DEMO_TEXT_ENCODER_LEARNING_RATE
    )  # fmt: skip
    assert demo.lr_scheduler == DEMO_LR_SCHEDULER == "constant"
    assert (DemoBaseModel.defaults.sampling_steps, DemoBaseModel.defaults.guidance) == (20, DEMO_GUIDANCE)
    assert DemoBaseModel.synthetic_demo
    # What a run's settings decide stays decided.
    decided = DemoBaseModel.defaults.training(
        TrainingConfig(max_train_epochs=3, save_every_n_steps=5, unet_learning_rate=1e-5, lr_scheduler="cosine")
    )
    assert decided.lr_scheduler == "cosine"
    assert (decided.max_train_steps, decided.max_train_epochs, decided.save_every_n_steps) == (None, 3, 5)
    assert (decided.unet_learning_rate, decided.text_encoder_learning_rate) == (1e-5, DEMO_TEXT_ENCODER_LEARNING_RATE)
    # The save interval was chosen for the demo's length: a run of its own length gets the
    # usual ten or so checkpoints, not one every DEMO_SAVE_EVERY steps.
    longer = DemoBaseModel.defaults.training(TrainingConfig(max_train_steps=3000)).resolved(100)
    assert (longer.max_train_steps, longer.save_every_n_steps) == (3000, 300)
    # Previews: a real model's at the usual settings (4 at a time for its GPU memory), the
    # demo's at its base model's guidance, 3 seeds a prompt, 16 at a time (faster on a CPU);
    # what a run's settings decide wins.
    assert preview_settings(EvaluationSettings(), BaseModelResource()) == PreviewSettings(
        sampling_steps=20, guidance=7.0, previews_per_prompt=1, batch_size=4, lora_scale=1.0, clip_skip=2, base_seed=42
    )
    assert preview_settings(EvaluationSettings(), TinyBaseModel()).sampling_steps == 8
    assert preview_settings(EvaluationSettings(), DemoBaseModel()) == PreviewSettings(
        sampling_steps=20, guidance=DEMO_GUIDANCE, previews_per_prompt=DEMO_PREVIEWS_PER_PROMPT,
        batch_size=DEMO_PREVIEW_BATCH_SIZE, lora_scale=1.0, clip_skip=2, base_seed=42,
    )  # fmt: skip
    run_settings = EvaluationSettings(
        sampling_steps=30, guidance=5.5, previews_per_prompt=2, preview_batch_size=2, base_seed=7
    )
    assert preview_settings(run_settings, DemoBaseModel()) == PreviewSettings(
        sampling_steps=30, guidance=5.5, previews_per_prompt=2, batch_size=2, lora_scale=1.0, clip_skip=2, base_seed=7
    )
    assert preview_settings(run_settings, DemoBaseModel()).describe() == (
        "DPM++ 2M, 30 steps, guidance 5.5, clip skip 2, LoRA strength 1, 2 seeds a prompt"
    )


def test_the_demo_base_model_is_the_shipped_one(tmp_path, monkeypatch):
    from lora_factory.demo import deployment
    from lora_factory.bucketing.buckets import KohyaBuckets
    from lora_factory.demo.world_population import FACTORY_BUCKETS
    from lora_factory.training.base_model import load_base_model, native_resolution, side_multiple

    path = DemoBaseModel().resolve(FactoryStore(tmp_path))
    assert path == DEMO_BASE_MODEL_DIR and native_resolution(path) == 128
    # Its UNet halves the latents twice: buckets go in steps of 32 px, and the buckets the
    # factory makes for it are the shapes its build's last stage trained on.
    assert side_multiple(path) == DemoBaseModel.defaults.bucket_step == 32
    assert KohyaBuckets.around(native_resolution(path), DemoBaseModel.defaults.bucket_step).settings() == (
        FACTORY_BUCKETS.settings()
    )
    assert BaseModelResource.defaults.bucket_step is None  # a real model: kohya's 64
    assert type(load_base_model(path, device="cpu").unet).__name__ == "UNet2DConditionModel"
    with pytest.raises(ValueError, match="LF_DEPLOYMENT=production"):
        DemoBaseModel(source="/models/real").resolve(FactoryStore(tmp_path))
    with pytest.raises(ValueError, match="always 'tiny-sd15'"):
        TinyBaseModel(source="/models/real").resolve(FactoryStore(tmp_path))
    monkeypatch.setattr(deployment, "DEMO_BASE_MODEL_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="lora_factory.demo.base_model_build --out"):
        DemoBaseModel().resolve(FactoryStore(tmp_path))
