"""CCIP character identity (deepghs/ccip_onnx, or the tiny one).

A model folder holds `model_feat.onnx` (image -> 768-d feature), `model_metrics.onnx`
(a batch of features [K,768] -> pairwise differences [K,K], lower = more alike) and
`metrics.json` whose "threshold" separates same-character pairs (at or below) from others.
Inference follows the models' authors' code (deepghs' imgutils, `metrics/ccip.py`): RGB
(transparency on white), resized to 384x384 bilinear (aspect not kept), /255 in float32,
CLIP mean/std normalisation in float64, NCHW float32; same character when
difference <= threshold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from lora_factory.vision import runtime
from lora_factory.vision.imageops import rgb_on_white

# CAFormer-S36 at 384: batching on a CPU gains nothing and holds more activations.
DEFAULT_BATCH = runtime.BatchSizes(cpu=1, cuda=32)

# float64, as the reference normalises (the result is cast to float32 afterwards).
CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)
DEFAULT_SIZE = 384


class IdentityModel:
    """Character identity features and their pairwise differences."""

    def __init__(
        self, model_dir: Path, providers: str = "auto", batch_size: int | runtime.BatchSizes = DEFAULT_BATCH
    ):
        self.model_dir = Path(model_dir)
        metrics_path = self.model_dir / "metrics.json"
        if not metrics_path.is_file():
            raise FileNotFoundError(
                f"{metrics_path} is missing: a CCIP model folder holds model_feat.onnx, "
                "model_metrics.onnx and metrics.json"
            )
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        if "threshold" not in metrics:
            raise ValueError(f"{metrics_path} has no 'threshold' key")
        self.threshold = float(metrics["threshold"])
        self.feature_session = runtime.create_session(self.model_dir / "model_feat.onnx", providers)
        self.metrics_session = runtime.create_session(self.model_dir / "model_metrics.onnx", providers)
        height, width = runtime.input_hw(self.feature_session, (DEFAULT_SIZE, DEFAULT_SIZE), "NCHW")
        self.size = (width, height)
        self.dim = self.feature_session.get_outputs()[0].shape[-1]
        self.batch_size = runtime.batch_size_for(self.feature_session, batch_size)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """[1,3,H,W] float32, CLIP-normalised RGB."""
        resized = rgb_on_white(image).resize(self.size, Image.Resampling.BILINEAR)
        data = np.asarray(resized).transpose(2, 0, 1).astype(np.float32) / 255.0
        return ((data - CLIP_MEAN) / CLIP_STD)[None].astype(np.float32)

    def embed(self, images: Iterable[Image.Image], batch_size: int | None = None) -> np.ndarray:
        """[N, dim] float32 features."""
        batch_size = batch_size or self.batch_size
        features = [np.zeros((0, self.dim), dtype=np.float32)]
        for chunk in runtime.chunks(images, batch_size):
            batch = np.concatenate([self.preprocess(image) for image in chunk])
            features.append(runtime.run_batched(self.feature_session, batch, batch_size).astype(np.float32))
        return np.concatenate(features)

    def difference(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[N,M] differences between every feature of `a` [N,dim] and of `b` [M,dim].

        The metrics model compares one batch with itself, so a and b go in together and
        the off-diagonal block comes out.
        """
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        for name, value in (("a", a), ("b", b)):
            if value.ndim != 2 or value.shape[1] != self.dim:
                raise ValueError(f"{name} must be [count, {self.dim}] features, got shape {value.shape}")
        if not len(a) or not len(b):
            return np.zeros((len(a), len(b)), dtype=np.float32)
        model_input = self.metrics_session.get_inputs()[0].name
        (pairwise,) = self.metrics_session.run(None, {model_input: np.concatenate([a, b])})
        return pairwise[: len(a), len(a) :]

    def same_character(self, difference: np.ndarray) -> np.ndarray:
        """Boolean array: which differences mean the same character (difference <= threshold,
        as imgutils' `ccip_same`)."""
        return np.asarray(difference) <= self.threshold
