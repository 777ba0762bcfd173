"""A classifier's `preprocess.json`: the stages deepghs ships beside some models, applied
as imgutils applies them (`preprocess/pillow.py`: resize, center_crop, pad_to_size,
convert_rgb, to_tensor, maybe_to_tensor, rescale, normalize), to an RGB picture.

The file holds {"stages": [{"type": "resize", "size": 448, "interpolation": "bicubic"},
...]}; the last stage must leave a [3,H,W] float array.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageColor

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# torchvision's integer interpolation codes, which some files use.
RESAMPLING_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming", 1: "lanczos"}

Stage = Callable[[Any], Any]


def _resampling(value: int | str) -> Image.Resampling:
    name = RESAMPLING_CODES.get(value) if isinstance(value, int) else str(value).lower()
    if name not in RESAMPLING:
        raise ValueError(f"unknown interpolation {value!r} in preprocess.json")
    return RESAMPLING[name]


def _resize(size: int | Sequence[int], interpolation: int | str = "bilinear", max_size: int | None = None,
            antialias: bool = True) -> Stage:
    resample = _resampling(interpolation)

    def apply(image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(size, int) or len(size) == 1:  # the short side
            short = size if isinstance(size, int) else size[0]
            new = (short, int(short * height / width)) if width < height else (int(short * width / height), short)
            if max_size is not None and max(new) > max_size:
                new_w, new_h = new
                new = (int(max_size * new_w / new_h), max_size) if new_h > new_w else (max_size, int(max_size * new_h / new_w))
        else:  # (height, width)
            new = (size[1], size[0])
        if new == image.size:
            return image
        if resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
            return image.resize(new, resample, reducing_gap=None if antialias else 1.0)
        return image.resize(new, resample)

    return apply


def _center_crop(size: int | Sequence[int]) -> Stage:
    crop_h, crop_w = (size, size) if isinstance(size, int) else (size[0], size[-1])

    def apply(image: Image.Image) -> Image.Image:
        width, height = image.size
        if width < crop_w or height < crop_h:  # padded with black first
            pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
            canvas = Image.new(image.mode, (width + pad_w, height + pad_h), (0, 0, 0))
            canvas.paste(image, (pad_w // 2, pad_h // 2))
            image, (width, height) = canvas, canvas.size
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return image.crop((left, top, left + crop_w, top + crop_h))

    return apply


def _pad_to_size(size: int | Sequence[int], background_color: Any = "white", interpolation: str = "bilinear") -> Stage:
    target_w, target_h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if isinstance(background_color, str):
        colour = ImageColor.getrgb(background_color)[:3]
    elif isinstance(background_color, int):
        colour = (background_color,) * 3
    else:
        colour = tuple(background_color)[:3]
    resample = _resampling(interpolation)

    def apply(image: Image.Image) -> Image.Image:
        ratio = min(target_w / image.width, target_h / image.height)
        new_w, new_h = round(image.width * ratio), round(image.height * ratio)
        canvas = Image.new("RGB", (target_w, target_h), colour)
        canvas.paste(image.resize((new_w, new_h), resample), ((target_w - new_w) // 2, (target_h - new_h) // 2))
        return canvas

    return apply


def _to_tensor() -> Stage:
    return lambda image: np.asarray(image).transpose(2, 0, 1).astype(np.float32) / 255


def _maybe_to_tensor() -> Stage:
    return lambda value: value if isinstance(value, np.ndarray) else _to_tensor()(value)


def _rescale(rescale_factor: float = 1 / 255) -> Stage:
    factor = np.float32(rescale_factor)
    return lambda array: array * factor


def _normalize(mean: float | Sequence[float], std: float | Sequence[float], inplace: bool = False) -> Stage:
    mean = np.asarray(mean if isinstance(mean, (list, tuple)) else [mean], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std if isinstance(std, (list, tuple)) else [std], dtype=np.float32).reshape(-1, 1, 1)
    return lambda array: (array - mean) / std


def _convert_rgb(force_background: str | None = "white") -> Stage:
    # The picture reaching the stages is already RGB with transparency on white.
    return lambda image: image


STAGES: dict[str, Callable[..., Stage]] = {
    "resize": _resize,
    "center_crop": _center_crop,
    "pad_to_size": _pad_to_size,
    "convert_rgb": _convert_rgb,
    "to_tensor": _to_tensor,
    "maybe_to_tensor": _maybe_to_tensor,
    "rescale": _rescale,
    "normalize": _normalize,
}


def build_stages(stages: list[dict]) -> Callable[[Image.Image], np.ndarray]:
    """One function from an RGB picture to the model's [3,H,W] float32 input."""
    built = []
    for stage in stages:
        options = dict(stage)
        kind = options.pop("type", None)
        if kind not in STAGES:
            raise ValueError(f"preprocess.json stage {stage!r}: type must be one of {sorted(STAGES)}")
        built.append(STAGES[kind](**options))

    def apply(image: Image.Image) -> np.ndarray:
        value: Any = image
        for stage in built:
            value = stage(value)
        if not isinstance(value, np.ndarray) or value.ndim != 3:
            raise ValueError("preprocess.json must end with an image tensor (to_tensor, normalize, ...)")
        return value.astype(np.float32)

    return apply


def read_preprocess(model_file: Path) -> Callable[[Image.Image], np.ndarray] | None:
    """The stages of `preprocess.json` next to the model file, or None when there is none."""
    path = Path(model_file).parent / "preprocess.json"
    if not path.is_file():
        return None
    return build_stages(json.loads(path.read_text(encoding="utf-8"))["stages"])
