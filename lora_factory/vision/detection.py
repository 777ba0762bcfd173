"""YOLOv8 ONNX detectors (deepghs person / half-body / head / face models, or the tiny ones).

Inference follows the models' authors' own code (deepghs' imgutils, `generic/yolo.py`):

- Input: "images" [N,3,S,S] float32 RGB 0..1. The picture (transparency on white) is
  resized straight to S x S, aspect not kept, with Pillow's bicubic filter (the default
  imgutils relies on). `resize="letterbox"` instead letterboxes as ultralytics' own
  predictor does (aspect kept, bilinear, centred on grey 114).
- Output: "output0" [N, 4+nc, anchors], each anchor a box (cx, cy, w, h in input pixels)
  and one score per class. Decoding: anchors whose best class score is above the
  confidence threshold, one class-agnostic greedy NMS whose box sides count
  (x1 - x0 + 1) pixels, boxes scaled back to the picture, clipped to it and rounded to
  whole pixels (half to even).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lora_factory.vision import runtime
from lora_factory.vision.imageops import rgb_on_white

# YOLOv8 at 640 gains a little from batching even on a CPU.
DEFAULT_BATCH = runtime.BatchSizes(cpu=4, cuda=16)

LETTERBOX_COLOUR = (114, 114, 114)
DEFAULT_SIZE = 640
# "stretch": imgutils' resize, which the deepghs models' recommended thresholds were
# measured with. "letterbox": ultralytics' predictor, the geometry the models were
# trained with; on very wide or tall pictures it keeps figures' proportions (a 1200x300
# picture is squeezed 4x vertically by "stretch"), at the price of results that no
# longer match the reference.
RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class Detection:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in original image pixels
    score: float
    label: str

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class Geometry:
    """Where the picture went in the model input: resized to `resized` (width, height)
    and placed at `pad` (left, top)."""

    resized: tuple[int, int]
    pad: tuple[int, int] = (0, 0)


def _encode(image: Image.Image) -> np.ndarray:
    """[1,3,H,W] float32 RGB 0..1, computed as imgutils' `rgb_encode` does."""
    return (np.asarray(image).transpose(2, 0, 1)[None] / 255.0).astype(np.float32)


def stretch(image: Image.Image, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, Geometry]:
    """Resize to a `size` square, aspect not kept (imgutils' `_image_preprocess`)."""
    image = rgb_on_white(image)
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return _encode(resized), Geometry((size, size))


def letterbox(image: Image.Image, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, Geometry]:
    """Resize keeping the aspect ratio, centre on a `size` square of grey 114 (ultralytics)."""
    image = rgb_on_white(image)
    width, height = image.size
    scale = min(size / width, size / height)
    new_width, new_height = round(width * scale), round(height * scale)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    # Same split as ultralytics: the odd pixel of padding goes to the right/bottom.
    pad_left = round((size - new_width) / 2 - 0.1)
    pad_top = round((size - new_height) / 2 - 0.1)
    canvas = Image.new("RGB", (size, size), LETTERBOX_COLOUR)
    canvas.paste(image, (pad_left, pad_top))
    return _encode(canvas), Geometry((new_width, new_height), (pad_left, pad_top))


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (continuous coordinates)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression as imgutils' `_yolo_nms`; indices of kept boxes,
    best score first (equal scores: the lower index first).

    boxes: [K,4] (x0, y0, x1, y1). A box side counts (x1 - x0 + 1) pixels, and a box is
    dropped when its IoU with a kept, better box exceeds `iou_threshold`. Computed in
    the boxes' own dtype (float32 for model outputs), as the reference does.
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms got {len(boxes)} boxes but {len(scores)} scores")
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    # Equal scores keep their anchor order. The reference's `scores.argsort()[::-1]`
    # leaves them to numpy's unstable sort, which orders them differently under numpy
    # 1.26 and 2.x (a random-weight YOLOv8m with thousands of equal scores keeps 354 boxes
    # under one and 345 under the other): here the answer does not depend on the machine.
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        intersection = width * height
        overlap = intersection / (areas[best] + areas[rest] - intersection)
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def labels_from_metadata(names: str) -> list[str]:
    """Class names from ultralytics' "names" metadata, a python dict literal like
    "{0: 'person'}" (parsed as a literal, never evaluated)."""
    try:
        mapping = ast.literal_eval(names)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"cannot parse the model's 'names' metadata {names!r}: {error}") from None
    if not isinstance(mapping, dict) or sorted(mapping) != list(range(len(mapping))):
        raise ValueError(f"'names' metadata must map 0..n-1 to class names, got {names!r}")
    return [str(mapping[index]) for index in range(len(mapping))]


def _model_file(model_path: Path) -> Path:
    model_path = Path(model_path)
    return model_path / "model.onnx" if model_path.is_dir() else model_path


class YoloDetector:
    """A YOLOv8 detection model; `detect` returns boxes in original image pixels."""

    def __init__(
        self,
        model_path: Path,
        conf_threshold: float,
        iou_threshold: float = 0.7,
        labels: list[str] | None = None,
        providers: str = "auto",
        batch_size: int | runtime.BatchSizes = DEFAULT_BATCH,
        resize: str = "stretch",
    ):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.model_path = _model_file(model_path)
        self.session = runtime.create_session(self.model_path, providers)
        self.batch_size = runtime.batch_size_for(self.session, batch_size)
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.resize = resize
        metadata = self.session.get_modelmeta().custom_metadata_map
        if labels is None:
            if "names" not in metadata:
                raise ValueError(
                    f"{self.model_path} has no 'names' metadata: pass labels=[...] to YoloDetector"
                )
            labels = labels_from_metadata(metadata["names"])
        self.labels = list(labels)
        default = DEFAULT_SIZE
        if "imgsz" in metadata:
            default = max(ast.literal_eval(metadata["imgsz"]))
        height, width = runtime.input_hw(self.session, (default, default), "NCHW")
        if height != width:
            raise ValueError(f"{self.model_path}: only square inputs are supported, got {height}x{width}")
        self.size = height

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, Geometry]:
        """The model input for one picture and where the picture went in it."""
        return (stretch if self.resize == "stretch" else letterbox)(image, self.size)

    def detect(self, images: Iterable[Image.Image], batch_size: int | None = None) -> list[list[Detection]]:
        """Detections per image, best score first."""
        batch_size = batch_size or self.batch_size
        detections = []
        for chunk in runtime.chunks(images, batch_size):
            prepared = [self.prepare(image) for image in chunk]
            outputs = runtime.run_batched(self.session, np.concatenate([array for array, _ in prepared]), batch_size)
            detections += [
                self._decode(output, geometry, image.size)
                for output, (_, geometry), image in zip(outputs, prepared, chunk, strict=True)
            ]
        return detections

    def _decode(self, output: np.ndarray, geometry: Geometry, image_size: tuple[int, int]) -> list[Detection]:
        if output.ndim != 2 or output.shape[0] != 4 + len(self.labels):
            raise ValueError(
                f"{self.model_path}: expected a YOLOv8 output [4+{len(self.labels)}, anchors] per "
                f"image, got {output.shape}"
            )
        candidates = output[:, output[4:].max(axis=0) > self.conf_threshold].T
        if not len(candidates):
            return []
        centre_x, centre_y, width, height = candidates[:, :4].T
        boxes = np.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2], 1)
        class_scores = candidates[:, 4:]
        kept = nms(boxes, class_scores.max(axis=1), self.iou_threshold)

        def back(value: float, axis: int) -> int:
            # imgutils' `_xy_postprocess`, in float64 as it runs under the numpy it pins (< 2).
            original = (float(value) - geometry.pad[axis]) / geometry.resized[axis] * image_size[axis]
            return int(np.round(np.clip(original, 0, image_size[axis])))

        detections = []
        for index in kept:
            x0, y0, x1, y1 = boxes[index]
            box = (back(x0, 0), back(y0, 1), back(x1, 0), back(y1, 1))
            best = int(class_scores[index].argmax())
            detections.append(Detection(box, float(class_scores[index, best]), self.labels[best]))
        return detections
