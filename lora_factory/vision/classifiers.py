"""deepghs image classifiers (monochrome, anime classification, rating, aesthetic,
AI-corruption), or the tiny ones.

Inference follows the models' authors' code (deepghs' imgutils, `generic/classify.py`):
RGB with transparency on white; then the stages of the `preprocess.json` next to the
model when there is one (see `transforms`); otherwise resized to the model's input size
(read from the model when fixed, else `input_size`, 384 as imgutils) with bilinear
resampling, /255, normalised with mean 0.5 / std 0.5 (in float64, then float32), NCHW.
The output named "output" is read. Labels come from `meta.json` ({"labels": [...]})
next to the model file (or the model's "labels" metadata).

Outputs: deepghs exports end in a softmax, so the "output" tensor already holds
probabilities. `output_kind="auto"` checks that (every row within [0, 1] and summing to
1) and applies a softmax otherwise, so a model exported with raw logits still gives
probabilities; pass "probabilities" or "logits" to decide explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from lora_factory.vision import runtime
from lora_factory.vision.imageops import rgb_on_white
from lora_factory.vision.transforms import read_preprocess

# Small convnet classifiers (MobileNetV3-class) gain a little from batching even on a CPU.
DEFAULT_BATCH = runtime.BatchSizes(cpu=4, cuda=32)

OUTPUT_KINDS = ("auto", "probabilities", "logits")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def looks_like_probabilities(rows: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Every row within [0, 1] and summing to 1 (a softmax output)."""
    rows = np.asarray(rows, dtype=np.float64)
    in_range = bool(np.all(rows >= -tolerance) and np.all(rows <= 1 + tolerance))
    return in_range and bool(np.allclose(rows.sum(axis=1), 1.0, atol=tolerance * rows.shape[1]))


def _model_file(model_path: Path) -> Path:
    model_path = Path(model_path)
    return model_path / "model.onnx" if model_path.is_dir() else model_path


def read_labels(model_file: Path, metadata: dict[str, str]) -> list[str]:
    """Labels from `meta.json` next to the model file, else from the model's "labels"
    metadata (a JSON list)."""
    meta = model_file.parent / "meta.json"
    if meta.is_file():
        labels, source = json.loads(meta.read_text(encoding="utf-8")).get("labels"), str(meta)
    elif "labels" in metadata:
        labels, source = json.loads(metadata["labels"]), f"{model_file}'s 'labels' metadata"
    else:
        raise FileNotFoundError(
            f"no labels for {model_file}: put its meta.json ({{\"labels\": [...]}}) next to it "
            "or pass labels=[...]"
        )
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{source} must hold a list of class names, got {labels!r}")
    return labels


class ImageClassifier:
    """A single-label image classifier; `predict` gives label -> probability per image."""

    def __init__(
        self,
        model_path: Path,
        labels: list[str] | None = None,
        input_size: int = 384,
        providers: str = "auto",
        output_kind: str = "auto",
        batch_size: int | runtime.BatchSizes = DEFAULT_BATCH,
    ):
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        self.model_path = _model_file(model_path)
        self.session = runtime.create_session(self.model_path, providers)
        if labels is None:
            labels = read_labels(self.model_path, self.session.get_modelmeta().custom_metadata_map)
        self.labels = list(labels)
        names = [output.name for output in self.session.get_outputs()]
        # deepghs exports may add "embedding" or "logits" outputs; the reference reads "output".
        self.output_index = names.index("output") if "output" in names else 0
        outputs = self.session.get_outputs()[self.output_index].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels):
            raise ValueError(f"{self.model_path} has {outputs} outputs but {len(self.labels)} labels: {self.labels}")
        height, width = runtime.input_hw(self.session, (input_size, input_size), "NCHW")
        self.size = (width, height)
        self.stages = read_preprocess(self.model_path)
        self.output_kind = output_kind
        self.batch_size = runtime.batch_size_for(self.session, batch_size)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """[1,3,H,W] float32: the preprocess.json stages, or RGB normalised to -1..1."""
        image = rgb_on_white(image)
        if self.stages is not None:
            return self.stages(image)[None]
        resized = image.resize(self.size, Image.Resampling.BILINEAR)
        data = (np.asarray(resized).transpose(2, 0, 1) / 255.0).astype(np.float32)
        return ((data - np.float64(0.5)) / np.float64(0.5)).astype(np.float32)[None]

    def predict(self, images: Iterable[Image.Image], batch_size: int | None = None) -> list[dict[str, float]]:
        batch_size = batch_size or self.batch_size
        predictions = []
        for chunk in runtime.chunks(images, batch_size):
            batch = np.concatenate([self.preprocess(image) for image in chunk])
            outputs = runtime.run_batched(self.session, batch, batch_size, self.output_index)
            if self.output_kind == "logits" or (self.output_kind == "auto" and not looks_like_probabilities(outputs)):
                outputs = softmax(outputs)
            predictions += [dict(zip(self.labels, map(float, row), strict=True)) for row in outputs]
        return predictions
