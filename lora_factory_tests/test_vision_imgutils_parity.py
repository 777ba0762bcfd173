"""The vision wrappers answer as the models' authors' own inference code: deepghs' imgutils
(detectors, CCIP, classifiers) run on the same ONNX files, over pictures of many sizes,
aspect ratios and modes. SmilingWolf's tagger code is the tagger's reference; imgutils'
copy of it is compared too, and differs on purpose for greyscale and transparent-palette
pictures (README, "Vision models").

imgutils runs in its own environment (`lora_factory.vision.reference`); without it these
tests skip, except under CI, where `make install` has built it and they must run.

The same comparison on the real architectures at their real sizes (random weights) is
slow: LF_SLOW_TESTS=1 runs it.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
from PIL import Image

from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post
from lora_factory.demo.tiny_models import TINY_MODELS, build_tiny_model
from lora_factory.vision.classifiers import ImageClassifier
from lora_factory.vision.detection import YoloDetector
from lora_factory.vision.identity import IdentityModel
from lora_factory.vision.models import (
    CLASSIFIER_ROLES,
    DEFAULT_CONF_THRESHOLDS,
    DEFAULT_IOU_THRESHOLDS,
    DETECTOR_ROLES,
)
from lora_factory.vision.reference import HubCache, Job, imgutils_unavailable, place_models, run_imgutils
from lora_factory.vision.tagger import WD14Tagger

SCORE_TOLERANCE = 1e-5
BOX_IOU_MIN = 0.999


def _require_imgutils() -> None:
    reason = imgutils_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"imgutils must run under CI: {reason}")
    pytest.skip(reason)


# ------------------------------------------------------------------------- pictures


def _drawn(size: tuple[int, int], number: int, figures: int = 1) -> Image.Image:
    rng = random.Random(number)
    cast = [(DEMO_CHARACTERS[(number + i) % len(DEMO_CHARACTERS)], 0) for i in range(figures)]
    return draw_post(cast, size, rng).image


def _with_alpha(image: Image.Image) -> Image.Image:
    """RGBA: an alpha ramp over the picture and a fully transparent band hiding black."""
    rgba = image.convert("RGBA")
    width, height = rgba.size
    ramp = np.tile(np.linspace(40, 255, width, dtype=np.float64), (height, 1)).astype(np.uint8)
    pixels = np.asarray(rgba).copy()
    pixels[..., 3] = ramp
    pixels[: height // 6, :, :] = (0, 0, 0, 0)
    return Image.fromarray(pixels, "RGBA")


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    """P: 64 colours, the background's index transparent (hiding its colour)."""
    palette = image.quantize(64)
    palette.info["transparency"] = palette.getpixel((0, 0))
    return palette


def _png(image: Image.Image) -> Image.Image:
    """What both sides read: the picture after a lossless PNG round trip."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def pictures() -> dict[str, Image.Image]:
    base = _drawn((640, 720), 1)
    pictures = {
        "square": _drawn((640, 640), 2),
        "tall": _drawn((300, 1200), 3),
        "wide": _drawn((1200, 300), 4, figures=3),
        "wide group": _drawn((1400, 700), 5, figures=2),
        "odd": _drawn((333, 517), 6),
        "tiny": _drawn((300, 400), 7).resize((24, 32), Image.Resampling.BILINEAR),
        "huge": _drawn((2400, 3000), 8),
        "rgba": _with_alpha(base),
        "la": _with_alpha(base).convert("LA"),
        "greyscale": base.convert("L"),
        "palette": base.quantize(128),
        "palette transparent": _palette_with_transparency(base),
    }
    return {kind: _png(image) for kind, image in pictures.items()}


# Deliberate differences: the project's answer on these equals imgutils' answer on the
# picture as the project reads it (README, "Vision models").
def as_project_reads(role: str, kind: str, image: Image.Image) -> Image.Image:
    if kind == "palette transparent":  # on white, where imgutils shows the hidden colour
        return _png(image.convert("RGBA"))
    if kind == "greyscale" and role == "tagger":  # SmilingWolf's code; imgutils lightens it
        return _png(image.convert("RGB"))
    return image


# -------------------------------------------------------------------- comparisons


def box_iou(a, b) -> float:
    """IoU of two integer pixel boxes (x0, y0, x1, y1), as areas of the continuous boxes;
    two identical degenerate boxes count as the same."""
    if tuple(a) == tuple(b):
        return 1.0
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union if union > 0 else 0.0


def compare_detections(ours, theirs) -> dict:
    """Same count; each of our boxes matched to the reference box of the same label with
    the closest score, then the largest overlap (boxes of equal score may come in either
    order); score difference and IoU of the matched pairs."""
    row = {"count_ours": len(ours), "count_imgutils": len(theirs), "max_score_diff": 0.0, "min_iou": 1.0}
    if len(ours) != len(theirs):
        return row
    unmatched = list(theirs)
    for detection in ours:
        candidates = [answer for answer in unmatched if answer[1] == detection.label]
        if not candidates:
            row["min_iou"] = 0.0
            continue
        box, _, score = best = min(
            candidates, key=lambda answer: (abs(answer[2] - detection.score), -box_iou(detection.box, answer[0])))
        unmatched.remove(best)
        row["max_score_diff"] = max(row["max_score_diff"], abs(detection.score - score))
        row["min_iou"] = min(row["min_iou"], box_iou(detection.box, box))
    return row


def _assert_detection_rows(rows: dict[str, dict]) -> None:
    failures = {
        kind: row for kind, row in rows.items()
        if row["count_ours"] != row["count_imgutils"] or row["max_score_diff"] > SCORE_TOLERANCE
        or row["min_iou"] < BOX_IOU_MIN
    }  # fmt: skip
    assert not failures, failures


def _report(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    for kind, row in rows.items():
        print(f"  {kind:<22}" + "  ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                                         for key, value in row.items()))


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {role: build_tiny_model(name, root / name) for role, name in TINY_MODELS.items()}


@pytest.fixture(scope="module")
def oracle(tiny_folders, tmp_path_factory):
    """imgutils' answers on the tiny models for every role and picture."""
    _require_imgutils()
    cache = HubCache(tmp_path_factory.mktemp("hf"))
    place_models(cache, tiny_folders)
    images = pictures()
    jobs = [Job(role, [as_project_reads(role, kind, image) for kind, image in images.items()])
            for role in TINY_MODELS]  # fmt: skip
    results = run_imgutils(cache, jobs, tmp_path_factory.mktemp("oracle"))
    return images, dict(zip(TINY_MODELS, results, strict=True))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("role", DETECTOR_ROLES)
def test_detectors_match_imgutils(oracle, tiny_folders, role):
    images, answers = oracle
    # The real models' settings: imgutils' resize, thresholds and NMS.
    detector = YoloDetector(tiny_folders[role], conf_threshold=DEFAULT_CONF_THRESHOLDS[role],
                            iou_threshold=DEFAULT_IOU_THRESHOLDS[role], providers="cpu")  # fmt: skip
    found = detector.detect(list(images.values()))
    rows = {kind: compare_detections(ours, theirs)
            for kind, ours, theirs in zip(images, found, answers[role]["detections"], strict=True)}  # fmt: skip
    _report(f"{role} detector vs imgutils", rows)
    _assert_detection_rows(rows)
    # Not vacuous: the tiny detectors find things in most of these pictures.
    assert sum(row["count_ours"] > 0 for row in rows.values()) >= len(rows) // 2


@pytest.mark.parametrize("role", CLASSIFIER_ROLES)
def test_classifiers_match_imgutils(oracle, tiny_folders, role):
    images, answers = oracle
    classifier = ImageClassifier(tiny_folders[role], providers="cpu")
    ours = classifier.predict(list(images.values()))
    rows = {}
    for kind, mine, theirs in zip(images, ours, answers[role]["scores"], strict=True):
        assert set(mine) == set(theirs), kind
        rows[kind] = {"max_score_diff": max(abs(mine[label] - theirs[label]) for label in mine)}
    _report(f"{role} classifier vs imgutils", rows)
    assert max(row["max_score_diff"] for row in rows.values()) <= SCORE_TOLERANCE, rows


def test_ccip_matches_imgutils(oracle, tiny_folders):
    images, answers = oracle
    theirs = answers["identity"]
    identity = IdentityModel(tiny_folders["identity"], providers="cpu")
    features = identity.embed(list(images.values()))
    np.testing.assert_allclose(features, np.asarray(theirs["features"]), atol=SCORE_TOLERANCE, rtol=0)
    difference = identity.difference(features, features)
    np.testing.assert_allclose(difference, np.asarray(theirs["differences"]), atol=SCORE_TOLERANCE, rtol=0)
    same = identity.same_character(difference)
    assert same.tolist() == theirs["same"]
    assert same.any() and not same.all()  # both decisions occur among these pictures
    print(f"\nCCIP vs imgutils: max feature diff {np.abs(features - theirs['features']).max():.3g}, "
          f"max difference diff {np.abs(difference - theirs['differences']).max():.3g}, same-character identical")


def test_ccip_same_character_includes_the_threshold(tiny_folders):
    identity = IdentityModel(tiny_folders["identity"], providers="cpu")
    assert identity.same_character(np.array([identity.threshold])).tolist() == [True]
    assert identity.same_character(np.array([np.nextafter(identity.threshold, 1)])).tolist() == [False]


def test_tagger_matches_imgutils(oracle, tiny_folders):
    images, answers = oracle
    plain = WD14Tagger(tiny_folders["tagger"], providers="cpu")
    mcut = WD14Tagger(tiny_folders["tagger"], use_mcut=True, providers="cpu")
    rows = {}
    for kind, ours, with_mcut, theirs in zip(images, plain.predict(list(images.values())),
                                             mcut.predict(list(images.values())), answers["tagger"]["tags"],
                                             strict=True):  # fmt: skip
        difference = float(np.abs(ours.scores - np.asarray(theirs["prediction"])).max())
        rows[kind] = {"max_score_diff": difference}
        assert set(ours.general) == set(theirs["general"]), kind
        assert set(ours.character) == set(theirs["character"]), kind
        assert set(with_mcut.general) == set(theirs["general_mcut"]), kind
        assert set(with_mcut.character) == set(theirs["character_mcut"]), kind
        assert ours.rating == pytest.approx(theirs["rating"], abs=SCORE_TOLERANCE)
    _report("WD14 tagger vs imgutils", rows)
    assert max(row["max_score_diff"] for row in rows.values()) <= SCORE_TOLERANCE, rows
    assert any(answer["general"] for answer in answers["tagger"]["tags"])


def test_letterbox_remains_available_and_differs_from_the_reference(oracle, tiny_folders):
    """The ultralytics geometry is kept as an option; on a 4:1 picture it is not the
    reference's answer (which is why it is not the default for the real models)."""
    images, answers = oracle
    detector = YoloDetector(tiny_folders["person"], conf_threshold=DEFAULT_CONF_THRESHOLDS["person"],
                            iou_threshold=DEFAULT_IOU_THRESHOLDS["person"], providers="cpu", resize="letterbox")
    kinds = list(images)
    wide = kinds.index("wide")
    (found,) = detector.detect([images["wide"]])
    row = compare_detections(found, answers["person"]["detections"][wide])
    assert row["count_ours"] != row["count_imgutils"] or row["min_iou"] < BOX_IOU_MIN or \
        row["max_score_diff"] > SCORE_TOLERANCE


# ----------------------------------------------------------- real sizes (slow)

slow = pytest.mark.skipif(not os.environ.get("LF_SLOW_TESTS"),
                          reason="real-size parity takes minutes: set LF_SLOW_TESTS=1")  # fmt: skip
REAL_SIZE_KINDS = ("square", "tall", "wide", "tiny", "rgba", "greyscale")


def _textured(image: Image.Image, number: int) -> Image.Image:
    """The picture with +-24 of noise on its colour channels. Random weights score every
    anchor over a flat background alike, and boxes of equal score are kept in an order
    that is numpy's, not the model's (README): the noise leaves no flat region."""
    pixels = np.asarray(image).astype(np.int16)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    colours = pixels.shape[-1] - (1 if image.mode in ("RGBA", "LA") else 0)  # alpha stays
    pixels[..., :colours] += np.random.default_rng(number).integers(-24, 25, pixels.shape[:2] + (1,), dtype=np.int16)
    return _png(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).squeeze(-1) if image.mode == "L"
                                else np.clip(pixels, 0, 255).astype(np.uint8), image.mode))


@pytest.fixture(scope="module")
def real_size(tmp_path_factory):
    """imgutils' answers on the real architectures at their real sizes (random weights,
    cached with the cleaning benchmark's models)."""
    from lora_factory.benchmarks.cleaning_throughput import (
        PLAIN_ROLES,
        build_plain_reference_models,
        default_work_dir,
        plain_wrappers,
    )

    _require_imgutils()
    folders = build_plain_reference_models(default_work_dir().resolve() / "reference-models")
    cache = HubCache(tmp_path_factory.mktemp("hf-real"))
    place_models(cache, folders)
    images = {kind: _textured(image, number) for number, (kind, image) in enumerate(pictures().items())
              if kind in REAL_SIZE_KINDS}  # fmt: skip
    jobs = [Job(role, [as_project_reads(role, kind, image) for kind, image in images.items()])
            for role in PLAIN_ROLES]  # fmt: skip
    results = run_imgutils(cache, jobs, tmp_path_factory.mktemp("oracle-real"))
    return images, plain_wrappers(folders), dict(zip(PLAIN_ROLES, results, strict=True))


@slow
def test_real_size_detector_matches_imgutils(real_size):
    images, wrappers, answers = real_size
    found = wrappers["person"].detect(list(images.values()))
    rows = {kind: compare_detections(ours, theirs)
            for kind, ours, theirs in zip(images, found, answers["person"]["detections"], strict=True)}  # fmt: skip
    _report("YOLOv8m (random weights) vs imgutils", rows)
    _assert_detection_rows(rows)
    assert any(row["count_ours"] for row in rows.values())


@slow
def test_real_size_classifier_ccip_and_tagger_match_imgutils(real_size):
    images, wrappers, answers = real_size
    pictures_ = list(images.values())
    rating = wrappers["rating"].predict(pictures_)
    rating_diff = max(abs(mine[label] - theirs[label])
                      for mine, theirs in zip(rating, answers["rating"]["scores"], strict=True) for label in mine)
    features = wrappers["identity"].embed(pictures_)
    feature_diff = float(np.abs(features - np.asarray(answers["identity"]["features"])).max())
    difference = wrappers["identity"].difference(features, features)
    same = wrappers["identity"].same_character(difference).tolist()
    tags = wrappers["tagger"].predict(pictures_)
    tag_diff = max(float(np.abs(ours.scores - np.asarray(theirs["prediction"])).max())
                   for ours, theirs in zip(tags, answers["tagger"]["tags"], strict=True))
    print(f"\nreal sizes vs imgutils: MobileNetV3 max score diff {rating_diff:.3g}, CAFormer-S36 max feature "
          f"diff {feature_diff:.3g}, SwinV2-B max tag score diff {tag_diff:.3g}")
    assert rating_diff <= SCORE_TOLERANCE and feature_diff <= SCORE_TOLERANCE and tag_diff <= SCORE_TOLERANCE
    assert same == answers["identity"]["same"]
    for ours, theirs in zip(tags, answers["tagger"]["tags"], strict=True):
        assert set(ours.general) == set(theirs["general"]) and set(ours.character) == set(theirs["character"])


PREPROCESS_STAGES = {
    "timm": [{"type": "resize", "size": 384, "interpolation": "bicubic"}, {"type": "center_crop", "size": 384},
             {"type": "maybe_to_tensor"}, {"type": "normalize", "mean": 0.5, "std": 0.5}],
    "padded": [{"type": "convert_rgb"}, {"type": "pad_to_size", "size": 384}, {"type": "to_tensor"},
               {"type": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}],
}  # fmt: skip


@pytest.mark.parametrize("name", PREPROCESS_STAGES)
def test_classifier_follows_preprocess_json_as_imgutils(tmp_path, name):
    """A classifier folder that ships a preprocess.json is prepared by its stages."""
    import json

    _require_imgutils()
    folder = build_tiny_model(TINY_MODELS["rating"], tmp_path / "rating")
    (folder / "preprocess.json").write_text(json.dumps({"stages": PREPROCESS_STAGES[name]}))
    cache = HubCache(tmp_path / "hf")
    place_models(cache, {"rating": folder})
    images = {kind: image for kind, image in pictures().items() if kind in ("wide", "tall", "tiny", "rgba")}
    (answer,) = run_imgutils(cache, [Job("rating", list(images.values()))], tmp_path / "oracle")
    classifier = ImageClassifier(folder, providers="cpu")
    assert classifier.stages is not None
    ours = classifier.predict(list(images.values()))
    difference = max(abs(mine[label] - theirs[label]) for mine, theirs in zip(ours, answer["scores"], strict=True)
                     for label in mine)  # fmt: skip
    assert difference <= SCORE_TOLERANCE
    # The stages matter: without them the same pictures score differently.
    (folder / "preprocess.json").unlink()
    plain = ImageClassifier(folder, providers="cpu").predict(list(images.values()))
    assert max(abs(a[label] - b[label]) for a, b in zip(plain, ours, strict=True) for label in a) > SCORE_TOLERANCE
