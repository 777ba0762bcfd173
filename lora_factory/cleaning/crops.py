"""Three crops of every person: full body, upper body, head (CyberHarem's 3-stage crop).

Training on all three framings teaches the LoRA the character at every distance; a
dataset of full-body shots alone renders small, muddy faces. The head crop is the head
box made square and 1.5 times larger, so hair and ornaments around the face are in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
CropKind = Literal["full", "upper", "head"]
CROP_KINDS: tuple[CropKind, ...] = ("full", "upper", "head")

HEAD_ENLARGE = 1.5
# A detection belongs to a person when most of it lies inside the person's box.
MIN_INSIDE_SHARE = 0.5
# An upper-body crop almost equal to the full crop (a picture that is a half-body shot
# already) would only double that picture's weight.
MAX_OVERLAP_WITH_FULL = 0.9


@dataclass(frozen=True)
class Crop:
    kind: CropKind
    box: Box

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


def clip_box(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    """Round a float box outwards to whole pixels and clip it to the image."""
    width, height = image_size
    x0, y0, x1, y1 = box
    return (
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(width, math.ceil(x1)),
        min(height, math.ceil(y1)),
    )


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection_area(a: Sequence[float], b: Sequence[float]) -> float:
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def share_inside(inner: Sequence[float], outer: Sequence[float]) -> float:
    """How much of `inner`'s area lies inside `outer` (0 for an empty box)."""
    area = box_area(inner)
    return intersection_area(inner, outer) / area if area > 0 else 0.0


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    overlap = intersection_area(a, b)
    union = box_area(a) + box_area(b) - overlap
    return overlap / union if union > 0 else 0.0


def squared_head_box(head_box: Sequence[float], image_size: tuple[int, int],
                     enlarge: float = HEAD_ENLARGE) -> Box:
    """The head box made square around its centre, `enlarge` times its longer side."""
    x0, y0, x1, y1 = head_box
    side = max(x1 - x0, y1 - y0) * enlarge
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    return clip_box(
        (centre_x - side / 2, centre_y - side / 2, centre_x + side / 2, centre_y + side / 2),
        image_size,
    )


def first_inside(boxes: Sequence[Sequence[float]], container: Sequence[float]) -> Sequence[float] | None:
    """The first box (detectors list them by score) that lies mostly inside `container`."""
    for box in boxes:
        if share_inside(box, container) >= MIN_INSIDE_SHARE:
            return box
    return None


def three_stage_crops(
    image_size: tuple[int, int],
    person_box: Sequence[float],
    halfbody_boxes: Sequence[Sequence[float]],
    head_boxes: Sequence[Sequence[float]],
    min_crop_side: int = 0,
) -> list[Crop]:
    """Full, upper and head crops of one person; all boxes in the picture's pixels.

    - full: the person box;
    - upper: the first half-body box inside the person box, cut to the person box,
      skipped when it is nearly the whole person box;
    - head: the first head box inside the person box, squared and enlarged x1.5,
      clipped to the picture (not to the person: hair may stick out of the person box).
    Crops whose shorter side is below `min_crop_side` are left out.
    """
    full = clip_box(person_box, image_size)
    if box_area(full) == 0:
        raise ValueError(f"person box {tuple(person_box)} is empty inside a {image_size} picture")
    crops = [Crop("full", full)]
    halfbody = first_inside(halfbody_boxes, full)
    if halfbody is not None:
        upper = clip_box(
            (max(halfbody[0], full[0]), max(halfbody[1], full[1]),
             min(halfbody[2], full[2]), min(halfbody[3], full[3])),
            image_size,
        )
        if box_area(upper) > 0 and iou(upper, full) < MAX_OVERLAP_WITH_FULL:
            crops.append(Crop("upper", upper))
    head = first_inside(head_boxes, full)
    if head is not None:
        crops.append(Crop("head", squared_head_box(head, image_size)))
    return [crop for crop in crops if min(crop.width, crop.height) >= min_crop_side]
