"""The bundle of vision models the pipeline uses, loaded through a `ModelRegistry`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_factory.vision import classifiers, detection, identity, tagger
from lora_factory.vision.classifiers import ImageClassifier
from lora_factory.vision.detection import YoloDetector
from lora_factory.vision.identity import IdentityModel
from lora_factory.vision.registry import DEFAULT_MODELS, ModelNotFoundError, ModelRegistry
from lora_factory.vision.runtime import BatchSizes
from lora_factory.vision.tagger import WD14Tagger

DETECTOR_ROLES = ("person", "halfbody", "head", "face")
CLASSIFIER_ROLES = ("monochrome", "classification", "rating", "aesthetic")
ROLES = ("tagger", "identity", *DETECTOR_ROLES, *CLASSIFIER_ROLES)

# Confidence and NMS IoU thresholds when neither the caller nor the model's spec gives
# one: imgutils' defaults for each detector (`detect_person`, `detect_halfbody`,
# `detect_heads`, `detect_faces`).
DEFAULT_CONF_THRESHOLDS = {"person": 0.3, "halfbody": 0.5, "head": 0.4, "face": 0.25}
DEFAULT_IOU_THRESHOLDS = {"person": 0.5, "halfbody": 0.7, "head": 0.7, "face": 0.7}
DEFAULT_CLASSIFIER_SIZE = 384
# Images per call by role: each wrapper's default, by device (`BatchSizes` says why CPU
# batches are small). The aesthetic model is a classifier but a SwinV2 at 448, like the
# tagger, so it gets the tagger's.
DEFAULT_BATCH_SIZES: dict[str, BatchSizes] = {
    "tagger": tagger.DEFAULT_BATCH,
    "identity": identity.DEFAULT_BATCH,
    **{role: detection.DEFAULT_BATCH for role in DETECTOR_ROLES},
    **{role: classifiers.DEFAULT_BATCH for role in ("monochrome", "classification", "rating")},
    "aesthetic": tagger.DEFAULT_BATCH,
}


@dataclass
class VisionModels:
    tagger: WD14Tagger
    identity: IdentityModel
    person: YoloDetector
    halfbody: YoloDetector
    head: YoloDetector
    face: YoloDetector
    monochrome: ImageClassifier
    classification: ImageClassifier
    rating: ImageClassifier
    aesthetic: ImageClassifier

    @classmethod
    def load(
        cls,
        registry: ModelRegistry,
        names: Mapping[str, str | Path] | None = None,
        thresholds: Mapping[str, float] | None = None,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        providers: str = "auto",
        batch_sizes: Mapping[str, int] | None = None,
    ) -> VisionModels:
        """Load every role's model; `names` overrides some roles (default: DEFAULT_MODELS),
        `thresholds` overrides detector confidence thresholds by role, `batch_sizes`
        fixes the images per call of some roles (default: `DEFAULT_BATCH_SIZES`, by device)."""
        names = {**DEFAULT_MODELS, **(names or {})}
        thresholds = dict(thresholds or {})
        batch: dict[str, int | BatchSizes] = {**DEFAULT_BATCH_SIZES, **(batch_sizes or {})}
        unknown = (set(names) | set(thresholds) | set(batch)) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown vision roles {sorted(unknown)}; roles are {list(ROLES)}")

        def defaults(role: str) -> Mapping[str, float | str]:
            try:
                return registry.spec(str(names[role])).defaults
            except ModelNotFoundError:  # a local path: no spec, no defaults
                return {}

        def detector(role: str) -> YoloDetector:
            conf = thresholds.get(role, defaults(role).get("conf_threshold", DEFAULT_CONF_THRESHOLDS[role]))
            iou = defaults(role).get("iou_threshold", DEFAULT_IOU_THRESHOLDS[role])
            resize = str(defaults(role).get("resize", "stretch"))
            return YoloDetector(registry.resolve(names[role]), conf_threshold=float(conf), iou_threshold=float(iou),
                                providers=providers, batch_size=batch[role], resize=resize)

        def classifier(role: str) -> ImageClassifier:
            size = int(defaults(role).get("input_size", DEFAULT_CLASSIFIER_SIZE))
            return ImageClassifier(registry.resolve(names[role]), input_size=size, providers=providers,
                                   batch_size=batch[role])

        return cls(
            tagger=WD14Tagger(
                registry.resolve(names["tagger"]),
                general_threshold=general_threshold,
                character_threshold=character_threshold,
                providers=providers,
                batch_size=batch["tagger"],
            ),
            identity=IdentityModel(registry.resolve(names["identity"]), providers=providers,
                                   batch_size=batch["identity"]),
            **{role: detector(role) for role in DETECTOR_ROLES},
            **{role: classifier(role) for role in CLASSIFIER_ROLES},
        )

