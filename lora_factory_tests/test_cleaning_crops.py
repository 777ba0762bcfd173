import pytest

from lora_factory.cleaning.crops import (
    Crop,
    clip_box,
    squared_head_box,
    three_stage_crops,
)

IMAGE = (400, 600)
PERSON = (100, 50, 300, 550)


def by_kind(crops: list[Crop]) -> dict[str, tuple[int, int, int, int]]:
    return {crop.kind: crop.box for crop in crops}


def test_three_crops_of_one_person():
    crops = three_stage_crops(IMAGE, PERSON, [(100, 50, 300, 300)], [(170, 60, 230, 130)])
    boxes = by_kind(crops)
    assert [crop.kind for crop in crops] == ["full", "upper", "head"]
    assert boxes["full"] == PERSON
    assert boxes["upper"] == (100, 50, 300, 300)
    # Head 60x70 -> square of side 70 * 1.5 = 105 around the centre (200, 95).
    assert boxes["head"] == (147, 42, 253, 148)


def test_head_crop_is_clipped_to_the_picture_not_to_the_person():
    box = squared_head_box((10, 5, 50, 45), (400, 600))
    assert box == (0, 0, 60, 55)
    crops = three_stage_crops(IMAGE, (20, 20, 120, 400), [], [(25, 25, 85, 85)])
    head = by_kind(crops)["head"]
    assert head[0] == 10 and head[1] == 10  # reaches outside the person box


def test_detections_outside_the_person_are_ignored_and_the_first_inside_wins():
    other_person_halfbody = (310, 50, 390, 300)
    crops = three_stage_crops(
        IMAGE,
        PERSON,
        [other_person_halfbody, (110, 60, 290, 320), (100, 50, 300, 280)],
        [(320, 60, 380, 120)],
    )
    boxes = by_kind(crops)
    assert boxes["upper"] == (110, 60, 290, 320)
    assert "head" not in boxes


def test_upper_crop_equal_to_the_full_crop_is_skipped():
    crops = three_stage_crops(IMAGE, PERSON, [(100, 50, 300, 545)], [])
    assert [crop.kind for crop in crops] == ["full"]


def test_small_crops_are_dropped():
    crops = three_stage_crops(IMAGE, PERSON, [(100, 50, 300, 300)], [(195, 60, 205, 70)], min_crop_side=40)
    assert [crop.kind for crop in crops] == ["full", "upper"]
    assert three_stage_crops(IMAGE, (0, 0, 30, 30), [], [], min_crop_side=40) == []


def test_boxes_are_rounded_outwards_and_clipped():
    assert clip_box((-5.5, 10.2, 399.1, 700), IMAGE) == (0, 10, 400, 600)


def test_empty_person_box_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        three_stage_crops(IMAGE, (500, 500, 600, 700), [], [])
