"""Aspect-ratio buckets, following kohya sd-scripts' rules so a dataset prepared here
trains the same way in sd-scripts.

Buckets: for a training resolution W x H, every (width, height) with both sides
multiples of `divisible`, one side running from `min_size` to `max_size`, and the other
side as large as fits in the area W x H (in whole `divisible` blocks, at most
`max_size`), plus the square of that area. An image goes to the bucket whose aspect
ratio is nearest its own, is scaled so it covers the bucket, and is centre-cropped to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

Size = tuple[int, int]  # width, height


def make_bucket_resolutions(
    max_reso: Size = (512, 512),
    min_size: int = 256,
    max_size: int = 1024,
    divisible: int = 64,
) -> list[Size]:
    """All bucket sizes for training resolution `max_reso`, sorted."""
    width_limit, height_limit = max_reso
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value % divisible:
            raise ValueError(f"{name} ({value}) must be a multiple of divisible ({divisible})")
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) is larger than max_size ({max_size})")
    if width_limit < divisible or height_limit < divisible:
        raise ValueError(f"max_reso {max_reso} is smaller than one {divisible}-pixel block")
    # The area budget counted in divisible x divisible blocks keeps every side a multiple.
    area_blocks = (width_limit // divisible) * (height_limit // divisible)
    square = int(math.sqrt(area_blocks)) * divisible
    resolutions = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (area_blocks // (width // divisible)) * divisible)
        resolutions.add((width, height))
        resolutions.add((height, width))
    return sorted(resolutions)


def round_to_steps(value: float, steps: int) -> int:
    """Round to the nearest pixel, then down to a multiple of `steps`."""
    pixels = int(value + 0.5)
    return pixels - pixels % steps


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size `width` x `height` scales to so that it just covers `bucket`."""
    bucket_width, bucket_height = bucket
    aspect = width / height
    if aspect > bucket_width / bucket_height:  # wider than the bucket: match heights
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

    Default: the predefined bucket with the nearest aspect ratio (an exact size match
    wins); the image is scaled, up or down, to cover it. With `no_upscale`, images are
    only ever scaled down (to `max_area`, default the largest bucket's area) and the
    bucket is the resized size rounded down to `reso_steps`, as sd-scripts'
    `bucket_no_upscale` does. The error is bucket aspect ratio minus image aspect ratio.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets and not no_upscale:
        raise ValueError("no buckets: build them with make_bucket_resolutions()")
    aspect = width / height
    if not no_upscale:
        if (width, height) in set(map(tuple, buckets)):
            bucket = (width, height)
        else:
            ratios = np.array([w / h for w, h in buckets])
            bucket = tuple(buckets[int(np.abs(ratios - aspect).argmin())])
        resized = cover_size(width, height, bucket)
    else:
        limit = max_area if max_area is not None else max(w * h for w, h in buckets)
        resized = (width, height)
        if width * height > limit:
            resized = _downscaled_size(width, height, limit, reso_steps)
        bucket = (resized[0] - resized[0] % reso_steps, resized[1] - resized[1] % reso_steps)
        if min(bucket) == 0:
            raise ValueError(
                f"a {width}x{height} image is smaller than one {reso_steps}-pixel bucket step; "
                "drop it before bucketing (raise the minimum crop size)"
            )
    return bucket, resized, bucket[0] / bucket[1] - aspect


def _downscaled_size(width: int, height: int, max_area: int, steps: int) -> Size:
    """Scale into `max_area` keeping the aspect ratio, snapping the side (width or
    height) whose rounding to `steps` distorts the aspect ratio least."""
    aspect = width / height
    scaled_width = math.sqrt(max_area * aspect)
    scaled_height = max_area / scaled_width
    width_snapped = round_to_steps(scaled_width, steps)
    height_for_width = round_to_steps(width_snapped / aspect, steps)
    height_snapped = round_to_steps(scaled_height, steps)
    width_for_height = round_to_steps(height_snapped * aspect, steps)
    error_width = abs(width_snapped / max(height_for_width, 1) - aspect)
    error_height = abs(width_for_height / max(height_snapped, 1) - aspect)
    if error_width < error_height:
        return width_snapped, int(width_snapped / aspect + 0.5)
    return int(height_snapped * aspect + 0.5), height_snapped


def resize_and_crop(image: Image.Image, bucket: Size, resized_size: Size | None = None) -> Image.Image:
    """Scale `image` to cover `bucket` (or to `resized_size`), then cut the centre out."""
    bucket_width, bucket_height = bucket
    target = resized_size or cover_size(image.width, image.height, bucket)
    if target[0] < bucket_width or target[1] < bucket_height:
        raise ValueError(f"resized size {target} does not cover bucket {bucket}")
    # Area averaging for shrinking avoids aliasing; Lanczos for enlarging keeps edges.
    shrinking = target[0] * target[1] < image.width * image.height
    method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    resized = image.resize(target, method) if target != image.size else image
    left = (target[0] - bucket_width) // 2
    top = (target[1] - bucket_height) // 2
    return resized.crop((left, top, left + bucket_width, top + bucket_height))
