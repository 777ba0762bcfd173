"""The wrappers on the real models, when their files are on this machine (the local
Hugging Face cache or `$LF_HOME/models/hub/<repo>/`); skipped otherwise. Nothing is
downloaded."""

import random

import numpy as np
import pytest

from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post
from lora_factory.storage import factory_home
from lora_factory.vision.classifiers import ImageClassifier
from lora_factory.vision.detection import YoloDetector
from lora_factory.vision.identity import IdentityModel
from lora_factory.vision.models import CLASSIFIER_ROLES, DEFAULT_IOU_THRESHOLDS, DETECTOR_ROLES
from lora_factory.vision.registry import DEFAULT_MODELS, ModelNotFoundError, ModelRegistry
from lora_factory.vision.tagger import WD14Tagger

REGISTRY = ModelRegistry(factory_home() / "models")


def real_model(role: str):
    name = DEFAULT_MODELS[role]
    try:
        return REGISTRY.resolve(name), REGISTRY.spec(name)
    except ModelNotFoundError:
        spec = REGISTRY.spec(name)
        pytest.skip(f"real {role} model absent: {spec.repo_id} files {', '.join(spec.files)} "
                    f"(fetch: {spec.fetch_command()})")  # fmt: skip


@pytest.fixture(scope="module")
def picture():
    return draw_post([(DEMO_CHARACTERS[2], 0)], (640, 720), random.Random(0)).image


def test_real_tagger(picture):
    folder, _ = real_model("tagger")
    (prediction,) = WD14Tagger(folder).predict([picture])
    assert list(prediction.rating) == ["general", "sensitive", "questionable", "explicit"]
    assert all(score > 0.35 for score in prediction.general.values())
    assert prediction.scores.ndim == 1 and len(prediction.scores) > 1000


def test_real_identity(picture):
    folder, _ = real_model("identity")
    identity = IdentityModel(folder)
    features = identity.embed([picture, picture.transpose(0)])
    assert features.shape == (2, 768)
    difference = identity.difference(features, features)
    assert difference.shape == (2, 2) and difference[0, 0] < identity.threshold
    assert 0.1 < identity.threshold < 0.3


@pytest.mark.parametrize("role", DETECTOR_ROLES)
def test_real_detectors(picture, role):
    path, spec = real_model(role)
    detector = YoloDetector(path, conf_threshold=spec.defaults["conf_threshold"],
                            iou_threshold=spec.defaults.get("iou_threshold", DEFAULT_IOU_THRESHOLDS[role]))
    assert detector.labels
    for detection in detector.detect([picture])[0]:
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 < x1 <= picture.width and 0 <= y0 < y1 <= picture.height
        assert detection.score > spec.defaults["conf_threshold"]


@pytest.mark.parametrize("role", CLASSIFIER_ROLES)
def test_real_classifiers(picture, role):
    path, spec = real_model(role)
    classifier = ImageClassifier(path, input_size=int(spec.defaults.get("input_size", 384)))
    (scores,) = classifier.predict([picture])
    assert list(scores) == classifier.labels
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.array(list(scores.values())) >= 0)
