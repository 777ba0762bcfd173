"""WD14 taggers (SmilingWolf wd-*-tagger-v3 / v2, or the tiny one).

Preprocessing as the models' author's code (SmilingWolf's tagger app): RGB composited on
white, padded to a square on white (image centred), resized to the model's input size
with bicubic resampling, RGB -> BGR, float32 0..255, NHWC; tags above the thresholds,
or above MCut (characters at least 0.15). imgutils' `get_wd14_tags` answers the same
except on greyscale pictures, which it pastes through themselves as the mask (dark
pixels come out lighter), and on transparent palettes, whose hidden colour it shows. `selected_tags.csv` holds the tags in output order
with their category: 0 general, 4 character, 9 rating.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lora_factory.vision import runtime
from lora_factory.vision.imageops import rgb_on_white

# SwinV2-B at 448: batching on a CPU gains nothing and holds ~140 MB per image.
DEFAULT_BATCH = runtime.BatchSizes(cpu=1, cuda=16)

GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_SIZE = 448


@dataclass(frozen=True)
class TagPrediction:
    general: dict[str, float]  # above the general threshold, best first
    character: dict[str, float]  # above the character threshold, best first
    rating: dict[str, float]  # every rating tag
    scores: np.ndarray  # every tag's score, in `WD14Tagger.tag_names` order


def mcut_threshold(probabilities: np.ndarray) -> float:
    """Maximum Cut thresholding: the midpoint of the largest gap between sorted scores
    (in float64, as the reference code: a float32 midpoint can round onto a score)."""
    if len(probabilities) < 2:
        return 0.5
    ordered = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    gaps = ordered[:-1] - ordered[1:]
    cut = int(gaps.argmax())
    return float((ordered[cut] + ordered[cut + 1]) / 2)


def read_selected_tags(path: Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories from a WD14 `selected_tags.csv`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a WD14 model folder holds model.onnx and selected_tags.csv")
    names, categories = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"name", "category"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; expected tag_id,name,category,count")
        for row in reader:
            names.append(row["name"])
            categories.append(int(row["category"]))
    return names, np.asarray(categories)


class WD14Tagger:
    """A WD14 tagger from a folder holding `model.onnx` and `selected_tags.csv`."""

    def __init__(
        self,
        model_dir: Path,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        use_mcut: bool = False,
        providers: str = "auto",
        batch_size: int | runtime.BatchSizes = DEFAULT_BATCH,
    ):
        self.model_dir = Path(model_dir)
        self.tag_names, self.categories = read_selected_tags(self.model_dir / "selected_tags.csv")
        self.session = runtime.create_session(self.model_dir / "model.onnx", providers)
        self.batch_size = runtime.batch_size_for(self.session, batch_size)
        height, width = runtime.input_hw(self.session, (DEFAULT_SIZE, DEFAULT_SIZE), "NHWC")
        if height != width:
            raise ValueError(f"{self.model_dir}: expected a square input, got {height}x{width}")
        self.size = height
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tag_names):
            raise ValueError(
                f"{self.model_dir}: the model has {outputs[-1]} outputs but selected_tags.csv lists "
                f"{len(self.tag_names)} tags; the two files come from different models"
            )
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.use_mcut = use_mcut

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """[1, size, size, 3] float32 BGR 0..255."""
        image = rgb_on_white(image)
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[None, :, :, ::-1].copy()

    def predict(self, images: Iterable[Image.Image], batch_size: int | None = None) -> list[TagPrediction]:
        batch_size = batch_size or self.batch_size
        predictions = []
        for chunk in runtime.chunks(images, batch_size):
            scores = runtime.run_batched(self.session, np.concatenate([self.preprocess(image) for image in chunk]), batch_size)
            predictions += [self._prediction(row) for row in scores]
        return predictions

    def _selected(self, scores: np.ndarray, category: int, threshold: float, mcut_floor: float) -> dict[str, float]:
        indices = np.flatnonzero(self.categories == category)
        if self.use_mcut and len(indices):
            threshold = max(mcut_floor, mcut_threshold(scores[indices]))
        chosen = [i for i in indices if float(scores[i]) > threshold]
        chosen.sort(key=lambda i: -scores[i])
        return {self.tag_names[i]: float(scores[i]) for i in chosen}

    def _prediction(self, scores: np.ndarray) -> TagPrediction:
        scores = np.asarray(scores, dtype=np.float32)
        rating = {self.tag_names[i]: float(scores[i]) for i in np.flatnonzero(self.categories == RATING)}
        return TagPrediction(
            # With MCut, general tags use the cut as is and characters at least 0.15,
            # as in the WD14 reference app.
            general=self._selected(scores, GENERAL, self.general_threshold, 0.0),
            character=self._selected(scores, CHARACTER, self.character_threshold, 0.15),
            rating=rating,
            scores=scores,
        )
