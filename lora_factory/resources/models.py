from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import dagster as dg

from lora_factory.storage import FactoryStore, cached_sha256
from lora_factory.training.config import TrainingConfig
from lora_factory.vision.registry import DEFAULT_MODELS, ModelRegistry


class VisionModelsResource(dg.ConfigurableResource):
    """Which vision model fills each role: a registry name (see README for the real models;
    a missing one fails with the command that fetches it) or a local file/folder path."""

    tagger: str = DEFAULT_MODELS["tagger"]
    identity: str = DEFAULT_MODELS["identity"]
    person: str = DEFAULT_MODELS["person"]
    halfbody: str = DEFAULT_MODELS["halfbody"]
    head: str = DEFAULT_MODELS["head"]
    face: str = DEFAULT_MODELS["face"]
    monochrome: str = DEFAULT_MODELS["monochrome"]
    classification: str = DEFAULT_MODELS["classification"]
    rating: str = DEFAULT_MODELS["rating"]
    aesthetic: str = DEFAULT_MODELS["aesthetic"]
    offline: bool = True
    # Images per model call by role, e.g. {"tagger": 64} on a large GPU; unset roles
    # use the defaults by device (vision.models.DEFAULT_BATCH_SIZES).
    batch_sizes: dict[str, int] = {}

    def names(self) -> dict[str, str]:
        return {role: getattr(self, role) for role in DEFAULT_MODELS}

    def versions(self, store: FactoryStore, roles: tuple[str, ...] = tuple(DEFAULT_MODELS)) -> dict[str, dict]:
        """Per role, the model's name and the sha256 of its files. Stages keep this in their
        fingerprints: a model replaced under the same name (a moved revision, other files at
        a local path, a demo model rebuilt by a newer version) rebuilds what the old one
        decided instead of trusting it."""
        registry = self.registry(store)
        cache = store.root / "cache" / "file_sha256.json"
        versions = {}
        for role in roles:
            files = registry.files(getattr(self, role))
            versions[role] = {
                "name": getattr(self, role),
                "files": {name: cached_sha256(path, cache) for name, path in files.items()},
            }
        return versions

    def registry(self, store: FactoryStore) -> ModelRegistry:
        """Where the names are looked up; a subclass may register models it builds itself."""
        return ModelRegistry(store.models_dir, offline=self.offline)

    def load(self, store: FactoryStore):
        from lora_factory.vision.models import VisionModels

        return VisionModels.load(self.registry(store), names=self.names(), batch_sizes=self.batch_sizes)

    def load_identity(self, store: FactoryStore):
        """Only the identity model (tag matching needs no other)."""
        from lora_factory.vision.identity import IdentityModel

        return IdentityModel(self.registry(store).resolve(self.identity))


# TrainingConfig fields that a base model deployment decides when a run leaves them None
# (the training length, which max_train_epochs also decides, and the save interval chosen
# for that length are handled on their own).
UNSET_TRAINING_FIELDS = (
    "unet_learning_rate", "text_encoder_learning_rate", "lr_scheduler", "conv_rank",
    "noise_offset", "multires_noise_iterations", "multires_noise_discount", "caption_tag_dropout",
)  # fmt: skip


@dataclass(frozen=True)
class BaseModelDefaults:
    """What training and previews use for the settings a run leaves undecided (None: their
    usual rule: training length by dataset size, the optimizer's learning rates, 20
    sampling steps, guidance 7, one preview per prompt, previews rendered 4 at a time,
    kohya's bucket step of 64 px)."""

    max_train_steps: int | None = None
    save_every_n_steps: int | None = None
    unet_learning_rate: float | None = None
    text_encoder_learning_rate: float | None = None
    lr_scheduler: str | None = None
    conv_rank: int | None = None
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float | None = None
    caption_tag_dropout: float | None = None
    sampling_steps: int | None = None
    guidance: float | None = None
    previews_per_prompt: int | None = None
    preview_batch_size: int | None = None
    bucket_step: int | None = None

    def training(self, config: TrainingConfig) -> TrainingConfig:
        """`config` with these defaults where it leaves the length, the saves, the
        learning rates and their schedule, the conv rank, the training noise or the caption
        tag dropout undecided. The save interval comes only with the length it was chosen
        for: a run of another length gets its usual number of checkpoints."""
        if self.max_train_steps and config.max_train_steps is None and config.max_train_epochs is None:
            config = replace(config, max_train_steps=self.max_train_steps)
            if self.save_every_n_steps and config.save_every_n_steps is None:
                config = replace(config, save_every_n_steps=self.save_every_n_steps)
        for name in UNSET_TRAINING_FIELDS:
            if getattr(self, name) and getattr(config, name) is None:
                config = replace(config, **{name: getattr(self, name)})
        return config

    def training_defaults(self) -> dict:
        """The defaults `training` applies: part of what a LoRA is trained with, so a changed
        one retrains as a changed run setting does."""
        return {name: getattr(self, name) for name in ("max_train_steps", "save_every_n_steps", *UNSET_TRAINING_FIELDS)}


class BaseModelResource(dg.ConfigurableResource):
    """The SD1.5-family base model: a diffusers folder or a single-file `.safetensors`
    checkpoint."""

    source: str = ""
    clip_skip: int = 2

    # Code, not configuration: a real base model leaves every setting to the run's config
    # and the dataset; a subclass for a stand-in model (the demo's) may shorten runs and
    # mark its releases as synthetic.
    defaults: ClassVar[BaseModelDefaults] = BaseModelDefaults()
    synthetic_demo: ClassVar[bool] = False

    def identity(self, store: FactoryStore) -> dict:
        """The base model's source and the sha256 of its files (cached by size and
        modification time, so a reused run does not hash gigabytes again)."""
        path = self.resolve(store)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        cache = store.root / "cache" / "file_sha256.json"
        return {
            "source": self.source,
            "files": {p.relative_to(path).as_posix() if path.is_dir() else p.name: cached_sha256(p, cache)
                      for p in files},
        }

    def resolve(self, store: FactoryStore) -> Path:
        if not self.source:
            raise ValueError(
                "no base model: set BaseModelResource.source (the `base_model` resource) to an "
                "SD1.5 .safetensors file or a diffusers folder"
            )
        path = Path(self.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"base model {self.source!r} not found: set BaseModelResource.source to an "
                "SD1.5 .safetensors file or a diffusers folder"
            )
        return path
