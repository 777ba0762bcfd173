"""The wrappers prepare images exactly as the real models expect, and decode their outputs
(stretch and letterbox, NMS, YOLO labels, MCut, probabilities vs logits). Agreement with
the authors' own inference code is checked in test_vision_imgutils_parity.py."""

import numpy as np
import onnx
import pytest
from PIL import Image

from lora_factory.demo.tiny_models import build_tiny_model
from lora_factory.vision.classifiers import (
    ImageClassifier,
    looks_like_probabilities,
    softmax,
)
from lora_factory.vision.detection import (
    YoloDetector,
    iou,
    labels_from_metadata,
    letterbox,
    nms,
    stretch,
)
from lora_factory.vision.identity import IdentityModel
from lora_factory.vision.tagger import WD14Tagger, mcut_threshold

RED, BLUE = (200, 10, 30), (10, 40, 220)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for name in ("tiny-tagger", "tiny-identity", "tiny-person", "tiny-monochrome"):
        build_tiny_model(name, root / name)
    return root


def wide_picture() -> Image.Image:
    """200x100: left half red, right half blue."""
    image = Image.new("RGB", (200, 100), RED)
    image.paste(BLUE, (100, 0, 200, 100))
    return image


def test_wd14_preprocess_pads_on_white_and_feeds_bgr_nhwc(models_dir):
    tagger = WD14Tagger(models_dir / "tiny-tagger")
    array = tagger.preprocess(wide_picture())
    assert array.shape == (1, 448, 448, 3) and array.dtype == np.float32
    # Padded to a square on white: the top and bottom quarters are white.
    assert np.all(array[0, :100] == 255.0) and np.all(array[0, -100:] == 255.0)
    # BGR order, values 0..255: the red half reads (B, G, R) = (30, 10, 200).
    np.testing.assert_allclose(array[0, 224, 50], [30, 10, 200], atol=1)
    np.testing.assert_allclose(array[0, 224, 400], [220, 40, 10], atol=1)


def test_wd14_preprocess_composites_transparency_on_white(models_dir):
    tagger = WD14Tagger(models_dir / "tiny-tagger")
    transparent = Image.new("RGBA", (448, 448), (0, 0, 0, 0))  # hidden black
    assert np.all(tagger.preprocess(transparent) == 255.0)


def test_identity_preprocess_is_ccip_clip_normalised_nchw(models_dir):
    identity = IdentityModel(models_dir / "tiny-identity")
    array = identity.preprocess(wide_picture())
    assert array.shape == (1, 3, 384, 384) and array.dtype == np.float32
    # Stretched to 384x384 (no padding), /255, CLIP mean/std.
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(array[0, :, 192, 50], (np.array(RED) / 255 - mean) / std, atol=1e-3)
    np.testing.assert_allclose(array[0, :, 192, 330], (np.array(BLUE) / 255 - mean) / std, atol=1e-3)


def test_classifier_preprocess_is_rgb_nchw_half_normalised(models_dir):
    classifier = ImageClassifier(models_dir / "tiny-monochrome")
    array = classifier.preprocess(wide_picture())
    assert array.shape == (1, 3, 384, 384) and array.dtype == np.float32
    np.testing.assert_allclose(array[0, :, 192, 50], (np.array(RED) / 255 - 0.5) / 0.5, atol=1e-3)
    assert array.min() >= -1.0 and array.max() <= 1.0


def test_stretch_resizes_to_the_square_without_keeping_the_aspect():
    array, geometry = stretch(wide_picture(), 640)
    assert array.shape == (1, 3, 640, 640) and array.dtype == np.float32
    assert geometry.resized == (640, 640) and geometry.pad == (0, 0)
    np.testing.assert_allclose(array[0, :, 320, 100], np.array(RED) / 255, atol=1e-6)  # RGB, 0..1
    # The red/blue border at x=100 of 200 lands in the middle, on every row.
    column = np.flatnonzero(array[0, 2, 320] > 0.5)[0]
    assert column == pytest.approx(320, abs=1)
    assert np.all(array[0, 2, 0, 330:] > 0.5) and np.all(array[0, 2, 639, 330:] > 0.5)


def test_letterbox_keeps_aspect_pads_grey_114_and_round_trips_coordinates():
    image = wide_picture()
    array, geometry = letterbox(image, 640)
    (pad_x, pad_y), scale = geometry.pad, geometry.resized[0] / image.width
    assert array.shape == (1, 3, 640, 640) and array.dtype == np.float32
    assert geometry.resized == (640, 320) and (pad_x, pad_y) == (0, 160)
    np.testing.assert_allclose(array[0, :, 10, 320], 114 / 255, atol=1e-6)  # padding
    np.testing.assert_allclose(array[0, :, 320, 100], np.array(RED) / 255, atol=1e-6)  # RGB, 0..1
    # The red/blue border at x=100 lands at 100 * scale + pad and maps back.
    column = np.flatnonzero(array[0, 2, 320] > 0.5)[0]
    assert (column - pad_x) / scale == pytest.approx(100, abs=0.5)


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=float)
    scores = np.array([0.8, 0.9, 0.7, 0.1])
    assert nms(boxes, scores, iou_threshold=0.5).tolist() == [1, 2]
    # Boxes that overlap less than the threshold both stay.
    assert nms(boxes[:2], scores[:2], iou_threshold=0.9).tolist() == [1, 0]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_nms_counts_box_sides_inclusively_as_the_reference():
    # Sides of (x1 - x0 + 1) pixels: these 11x11 boxes share 10x11 = 110 of 132 pixels,
    # IoU 0.833; with continuous sides (10x10, sharing 90 of 110) it would be 0.818.
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8], dtype=np.float32)
    assert nms(boxes, scores, iou_threshold=0.82).tolist() == [0]
    assert nms(boxes, scores, iou_threshold=0.84).tolist() == [0, 1]


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_yolo_labels_come_from_ultralytics_names_metadata(models_dir):
    assert labels_from_metadata("{0: 'person', 1: 'face'}") == ["person", "face"]
    with pytest.raises(ValueError, match="names"):
        labels_from_metadata("__import__('os')")
    detector = YoloDetector(models_dir / "tiny-person", conf_threshold=0.3)
    assert detector.labels == ["person"] and detector.size == 640


def test_yolo_decoding_maps_boxes_back_with_one_class_agnostic_nms(models_dir):
    detector = YoloDetector(models_dir / "tiny-person", conf_threshold=0.3, labels=["person", "face"])
    output = np.zeros((6, 8400), dtype=np.float32)
    # Two overlapping "person" boxes, a "face" box inside them and one elsewhere, in input pixels.
    output[:4, 0] = [320, 320, 100, 400]
    output[4, 0] = 0.9
    output[:4, 1] = [322, 320, 100, 400]
    output[4, 1] = 0.8
    output[:4, 2] = [320, 320, 100, 380]
    output[5, 2] = 0.7  # suppressed by the person box: NMS ignores classes, as the reference
    output[:4, 3] = [500, 100, 60, 60]
    output[5, 3] = 0.6
    output[:4, 4] = [100, 100, 50, 50]
    output[4, 4] = 0.2  # below the confidence threshold
    _, geometry = stretch(wide_picture(), 640)
    detections = detector._decode(output, geometry, image_size=(200, 100))
    assert [(d.label, round(d.score, 1)) for d in detections] == [("person", 0.9), ("face", 0.6)]
    # Input pixels (270, 120, 370, 520) of 640 scaled to 200x100, clipped, rounded half to even.
    assert detections[0].box == (84, 19, 116, 81)
    assert detections[1].box == (147, 11, 166, 20)
    assert all(isinstance(v, int) for d in detections for v in d.box)


def test_mcut_threshold_cuts_the_largest_gap():
    assert mcut_threshold(np.array([0.9, 0.85, 0.2, 0.1])) == pytest.approx(0.525)


def test_classifier_labels_from_meta_json_or_model_metadata(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMean", ["input"], ["output"], axes=[2, 3], keepdims=0)], "mean",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 3])],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.helper.set_model_props(model, {"labels": '["red", "green", "blue"]'})
    onnx.save(model, tmp_path / "model.onnx")
    classifier = ImageClassifier(tmp_path)
    assert classifier.labels == ["red", "green", "blue"] and classifier.size == (32, 32)
    # Channel means of a red picture in -1..1 are logits: the output gets a softmax.
    (scores,) = classifier.predict([Image.new("RGB", (10, 10), (255, 0, 0))])
    assert max(scores, key=scores.get) == "red" and sum(scores.values()) == pytest.approx(1.0)

    (tmp_path / "meta.json").write_text('{"labels": ["a", "b", "c"]}')
    assert ImageClassifier(tmp_path).labels == ["a", "b", "c"]
    bare = tmp_path / "bare"
    bare.mkdir()
    model.ClearField("metadata_props")
    onnx.save(model, bare / "model.onnx")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ImageClassifier(bare)


def test_classifier_outputs_softmax_only_for_logits():
    probabilities = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert looks_like_probabilities(probabilities)
    logits = np.array([[2.0, -1.0], [0.3, 0.1]])
    assert not looks_like_probabilities(logits)
    np.testing.assert_allclose(softmax(logits).sum(axis=1), 1.0)
    assert not looks_like_probabilities(np.array([[0.9, 0.9]]))  # sigmoid-like, not a softmax
