"""YOLOv8 ONNX detectors (deepghs person / half-body / head / face models, or the tiny ones).

Input: "images" [N,3,S,S] float32 RGB 0..1, letterboxed as ultralytics does (aspect kept,
centred, grey 114 padding). Output: "output0" [N, 4+nc, anchors], each anchor a box
(cx, cy, w, h in letterbox pixels) and one score per class. Decoding: best class per
anchor, confidence filter, class-wise NMS, boxes mapped back to the original image.
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


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original image pixels
    score: float
    label: str

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


def letterbox(image: Image.Image, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio, centre on a `size` square of grey 114.

    Returns ([1,3,size,size] float32 RGB 0..1, scale, (pad_left, pad_top)); an original
    point (x, y) lands at (x * scale + pad_left, y * scale + pad_top).
    """
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
    array = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
    return array, scale, (pad_left, pad_top)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best score first.

    boxes: [K,4] (x0, y0, x1, y1); a box is dropped when its IoU with a kept, better
    box exceeds `iou_threshold`.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms got {len(boxes)} boxes but {len(scores)} scores")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        low = np.maximum(boxes[best, :2], boxes[rest, :2])
        high = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        intersection = np.prod(np.clip(high - low, 0, None), axis=1)
        union = areas[best] + areas[rest] - intersection
        overlap = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
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
    ):
        self.model_path = _model_file(model_path)
        self.session = runtime.create_session(self.model_path, providers)
        self.batch_size = runtime.batch_size_for(self.session, batch_size)
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
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

    def detect(self, images: Iterable[Image.Image], batch_size: int | None = None) -> list[list[Detection]]:
        """Detections per image, best score first."""
        batch_size = batch_size or self.batch_size
        detections = []
        for chunk in runtime.chunks(images, batch_size):
            prepared = [letterbox(image, self.size) for image in chunk]
            outputs = runtime.run_batched(self.session, np.concatenate([array for array, _, _ in prepared]), batch_size)
            detections += [
                self._decode(output, scale, pad, image.size)
                for output, (_, scale, pad), image in zip(outputs, prepared, chunk, strict=True)
            ]
        return detections

    def _decode(
        self, output: np.ndarray, scale: float, pad: tuple[int, int], image_size: tuple[int, int]
    ) -> list[Detection]:
        if output.ndim != 2 or output.shape[0] != 4 + len(self.labels):
            raise ValueError(
                f"{self.model_path}: expected a YOLOv8 output [4+{len(self.labels)}, anchors] per "
                f"image, got {output.shape}"
            )
        class_scores = output[4:]
        classes = class_scores.argmax(axis=0)
        scores = class_scores.max(axis=0)
        keep = scores > self.conf_threshold
        if not keep.any():
            return []
        centre_x, centre_y, width, height = output[:4, keep]
        boxes = np.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2], 1)
        scores, classes = scores[keep], classes[keep]
        # Class-wise NMS: shift each class to its own region so classes never suppress
        # each other (the same trick as ultralytics).
        offsets = classes[:, None].astype(np.float64) * (4.0 * self.size)
        kept = nms(boxes + offsets, scores, self.iou_threshold)
        image_width, image_height = image_size
        limits = np.array([image_width, image_height, image_width, image_height], dtype=np.float64)
        pads = np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float64)
        detections = []
        for index in kept:
            original = np.clip((boxes[index] - pads) / scale, 0, limits)
            box = tuple(float(v) for v in original)
            if box[2] > box[0] and box[3] > box[1]:
                detections.append(Detection(box, float(scores[index]), self.labels[int(classes[index])]))
        return detections
