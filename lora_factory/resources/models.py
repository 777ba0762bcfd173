from __future__ import annotations

from pathlib import Path

import dagster as dg

from lora_factory.storage import FactoryStore, cached_sha256

TINY_BASE_MODEL = "tiny-sd15"


class VisionModelsResource(dg.ConfigurableResource):
    """Which vision model fills each role: a registry name (`tiny-*` are the built-in
    demo replicas, see README for the real ones) or a local file/folder path."""

    tagger: str = "tiny-tagger"
    identity: str = "tiny-identity"
    person: str = "tiny-person"
    halfbody: str = "tiny-halfbody"
    head: str = "tiny-head"
    face: str = "tiny-face"
    monochrome: str = "tiny-monochrome"
    classification: str = "tiny-classification"
    rating: str = "tiny-rating"
    aesthetic: str = "tiny-aesthetic"
    offline: bool = True
    # Images per model call by role, e.g. {"tagger": 64} on a large GPU; unset roles
    # use the defaults by device (vision.models.DEFAULT_BATCH_SIZES).
    batch_sizes: dict[str, int] = {}

    def names(self) -> dict[str, str]:
        return {
            role: getattr(self, role)
            for role in (
                "tagger",
                "identity",
                "person",
                "halfbody",
                "head",
                "face",
                "monochrome",
                "classification",
                "rating",
                "aesthetic",
            )
        }

    def load(self, store: FactoryStore):
        from lora_factory.vision.models import VisionModels
        from lora_factory.vision.registry import ModelRegistry

        registry = ModelRegistry(store.models_dir, offline=self.offline)
        return VisionModels.load(registry, names=self.names(), batch_sizes=self.batch_sizes)

    def load_identity(self, store: FactoryStore):
        """Only the identity model (tag matching needs no other)."""
        from lora_factory.vision.identity import IdentityModel
        from lora_factory.vision.registry import ModelRegistry

        registry = ModelRegistry(store.models_dir, offline=self.offline)
        return IdentityModel(registry.resolve(self.identity))


class BaseModelResource(dg.ConfigurableResource):
    """The SD1.5-family base model: `tiny-sd15` (the built-in random-weight demo model),
    a diffusers folder, or a single-file `.safetensors` checkpoint."""

    source: str = TINY_BASE_MODEL
    clip_skip: int = 2

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
        if self.source == TINY_BASE_MODEL:
            from lora_factory.training.tiny_sd import build_tiny_sd15

            return build_tiny_sd15(store.models_dir / TINY_BASE_MODEL)
        path = Path(self.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"base model {self.source!r} not found: set BaseModelResource.source to a "
                "diffusers folder or an SD1.5 .safetensors file (or 'tiny-sd15' for the demo)"
            )
        return path
