"""Aspect-ratio buckets exactly as kohya sd-scripts makes them, so that an image with the
same settings lands in the same bucket at the same resized size here and there.

kohya's rules (library/model_util.py `make_bucket_resolutions`, library/train_util.py
`BucketManager` and `adjust_min_max_bucket_reso_by_steps`):

- settings: the training resolution W x H, `min_size` rounded down and `max_size`
  rounded up to a multiple of `step`; the resolution must lie within them.
- bucket list (upscaling mode): the square of side floor(sqrt(W*H) / step) * step, and
  for every width from `min_size` to `max_size` in steps, the height
  min(max_size, floor((W*H // width) / step) * step) when it is at least `min_size`,
  with the transposed bucket too.
- upscaling mode: an image whose size is a bucket stays as it is; otherwise it goes
  to the bucket of the nearest aspect ratio (the first in sorted order on a tie) and is
  scaled, up or down, so that it covers the bucket (heights match when the image is
  wider than the bucket), each side rounded half up.
- no-upscale mode (`bucket_no_upscale`): no bucket list; an image larger than W*H in
  area is scaled into that area (its long or short side snapped to `step`, whichever
  distorts the aspect ratio less), a smaller one keeps its size; the bucket is the
  resized size rounded down to `step`, so images are only ever cropped, never enlarged.
- then: resize (area averaging when no side grows, Lanczos otherwise) and cut the
  centre out: (resized - bucket) // 2 from the left and the top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

Size = tuple[int, int]  # width, height


def adjust_bucket_range(resolution: Size, min_size: int, max_size: int, step: int) -> tuple[int, int]:
    """kohya's min/max bucket sides: `min_size` rounded down, `max_size` rounded up to
    `step`; the resolution must fit between them (kohya refuses it otherwise)."""
    if step < 1:
        raise ValueError(f"bucket step must be positive, got {step}")
    if min(resolution) < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    min_size -= min_size % step
    if max_size % step:
        max_size += step - max_size % step
    if min(resolution) < min_size:
        raise ValueError(
            f"min bucket size {min_size} is larger than the resolution {resolution}: lower it "
            "or raise the resolution"
        )
    if max(resolution) > max_size:
        raise ValueError(
            f"max bucket size {max_size} is smaller than the resolution {resolution}: raise it "
            "or lower the resolution"
        )
    return min_size, max_size


def make_bucket_resolutions(
    max_reso: Size = (512, 512),
    min_size: int = 256,
    max_size: int = 1024,
    divisible: int = 64,
) -> list[Size]:
    """All bucket sizes for training resolution `max_reso`, sorted (kohya's list)."""
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value % divisible:
            raise ValueError(
                f"{name} ({value}) must be a multiple of divisible ({divisible}); "
                "adjust_bucket_range() rounds it the way kohya does"
            )
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) is larger than max_size ({max_size})")
    max_area = max_reso[0] * max_reso[1]
    if max_area < divisible * divisible:
        raise ValueError(f"max_reso {max_reso} is smaller than one {divisible}-pixel block")
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def round_to_steps(value: float, steps: int) -> int:
    """Round half up to a pixel, then down to a multiple of `steps`."""
    pixels = int(value + 0.5)
    return pixels - pixels % steps


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size `width` x `height` scales to so that it just covers `bucket`."""
    bucket_width, bucket_height = bucket
    if width / height > bucket_width / bucket_height:  # wider than the bucket: match heights
        scale = bucket_height / height
    else:
        scale = bucket_width / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def select_bucket(
    width: int,
    height: int,
    buckets: Sequence[Size],
    no_upscale: bool = False,
    max_area: int | None = None,
    reso_steps: int = 64,
) -> tuple[Size, Size, float]:
    """(bucket, resized size, aspect-ratio error) for a `width` x `height` image.

    Upscaling mode picks from `buckets` (make_bucket_resolutions). `no_upscale` needs
    `max_area`, the training resolution's W x H, and ignores `buckets`. The error is
    the bucket's aspect ratio minus the image's, as kohya reports it.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    if not no_upscale:
        if not buckets:
            raise ValueError("no buckets: build them with make_bucket_resolutions()")
        if (width, height) in set(map(tuple, buckets)):
            bucket = (width, height)
        else:
            ratios = np.array([w / h for w, h in buckets])
            bucket = tuple(buckets[int(np.abs(ratios - aspect).argmin())])
        resized = cover_size(width, height, bucket)
    else:
        if max_area is None or max_area <= 0:
            raise ValueError("no_upscale needs max_area: the training resolution's width x height")
        resized = (width, height)
        if width * height > max_area:
            resized = _downscaled_size(width, height, max_area, reso_steps)
        bucket = (resized[0] - resized[0] % reso_steps, resized[1] - resized[1] % reso_steps)
        if min(bucket) == 0:
            raise ValueError(
                f"a {width}x{height} image is smaller than one {reso_steps}-pixel bucket step "
                "once resized; drop it before bucketing (raise the minimum crop size)"
            )
    return bucket, resized, bucket[0] / bucket[1] - aspect


def _downscaled_size(width: int, height: int, max_area: int, steps: int) -> Size:
    """Scale into `max_area` keeping the aspect ratio, snapping the side (width or
    height) whose rounding to `steps` distorts the aspect ratio less (kohya's rule)."""
    aspect = width / height
    scaled_width = math.sqrt(max_area * aspect)
    scaled_height = max_area / scaled_width
    width_snapped = round_to_steps(scaled_width, steps)
    height_for_width = round_to_steps(width_snapped / aspect, steps)
    height_snapped = round_to_steps(scaled_height, steps)
    width_for_height = round_to_steps(height_snapped * aspect, steps)
    if 0 in (width_snapped, height_for_width, height_snapped):
        raise ValueError(
            f"a {width}x{height} image is too narrow for {steps}-pixel buckets in an area of "
            f"{max_area}: drop it before bucketing"
        )
    error_width = abs(width_snapped / height_for_width - aspect)
    error_height = abs(width_for_height / height_snapped - aspect)
    if error_width < error_height:
        return width_snapped, int(width_snapped / aspect + 0.5)
    return int(height_snapped * aspect + 0.5), height_snapped


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size
    resized: Size
    aspect_error: float  # bucket aspect ratio minus image aspect ratio


class KohyaBuckets:
    """kohya's bucketing with one set of settings (sd-scripts' `--resolution`,
    `--min_bucket_reso`, `--max_bucket_reso`, `--bucket_reso_steps`,
    `--bucket_no_upscale`)."""

    def __init__(
        self,
        resolution: int | Size = 512,
        min_size: int = 256,
        max_size: int = 1024,
        step: int = 64,
        no_upscale: bool = False,
    ):
        self.resolution: Size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.min_size, self.max_size = adjust_bucket_range(self.resolution, min_size, max_size, step)
        self.step = step
        self.no_upscale = no_upscale
        self.max_area = self.resolution[0] * self.resolution[1]
        # kohya builds no predefined list in no-upscale mode: buckets follow the images.
        self.resolutions: list[Size] = (
            [] if no_upscale else make_bucket_resolutions(self.resolution, self.min_size, self.max_size, step)
        )

    @classmethod
    def around(cls, resolution: int, step: int, min_size: int = 0, max_size: int = 0, no_upscale: bool = False):
        """Buckets for square `resolution` with the factory's defaults for what is 0:
        sides from resolution / 2 (never below one step) to resolution x 2."""
        return cls(
            resolution,
            min_size=min_size or max(step, resolution // 2),
            max_size=max_size or resolution * 2,
            step=step,
            no_upscale=no_upscale,
        )

    def select(self, width: int, height: int) -> BucketChoice:
        bucket, resized, error = select_bucket(
            width, height, self.resolutions, self.no_upscale, self.max_area, self.step
        )
        return BucketChoice(bucket, resized, error)

    def settings(self) -> dict:
        """The settings as kohya's dataset config names them."""
        return {
            "resolution": list(self.resolution),
            "enable_bucket": True,
            "min_bucket_reso": self.min_size,
            "max_bucket_reso": self.max_size,
            "bucket_reso_steps": self.step,
            "bucket_no_upscale": self.no_upscale,
        }


def resize_and_crop(image: Image.Image, bucket: Size, resized_size: Size | None = None) -> Image.Image:
    """Scale `image` to cover `bucket` (or to `resized_size`), then cut the centre out."""
    bucket_width, bucket_height = bucket
    target = resized_size or cover_size(image.width, image.height, bucket)
    if target[0] < bucket_width or target[1] < bucket_height:
        raise ValueError(f"resized size {target} does not cover bucket {bucket}")
    # kohya: area averaging when no side grows (no aliasing), Lanczos when one does.
    shrinking = image.width >= target[0] and image.height >= target[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    resized = image.resize(target, method) if target != image.size else image
    left = (target[0] - bucket_width) // 2
    top = (target[1] - bucket_height) // 2
    return resized.crop((left, top, left + bucket_width, top + bucket_height))
