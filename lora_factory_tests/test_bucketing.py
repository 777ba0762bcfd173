import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_factory.bucketing.buckets import make_bucket_resolutions, resize_and_crop, select_bucket
from lora_factory.bucketing.export import ExportRow, write_kohya_folder
from lora_factory.bucketing.repeats import assign_repeats, steps_per_epoch

SD15_BUCKETS = make_bucket_resolutions((512, 512), 256, 1024, 64)


def png(colour=(255, 0, 0), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


# ---- buckets -------------------------------------------------------------------------


def test_sd15_buckets_follow_the_rules():
    assert (512, 512) in SD15_BUCKETS
    for expected in [(256, 1024), (320, 768), (384, 640), (448, 576), (576, 448), (1024, 256)]:
        assert expected in SD15_BUCKETS
    assert SD15_BUCKETS == sorted(SD15_BUCKETS)
    for width, height in SD15_BUCKETS:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert 64 <= min(width, height) and max(width, height) <= 1024
        assert (height, width) in SD15_BUCKETS
    # Each width from 256 to 1024 with the tallest height that fits, and the transposes.
    loop = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384),
            (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    assert set(SD15_BUCKETS) == set(loop) | {(h, w) for w, h in loop}


def test_bucket_parameters_are_checked():
    with pytest.raises(ValueError, match="multiple"):
        make_bucket_resolutions((512, 512), 250)
    with pytest.raises(ValueError, match="larger"):
        make_bucket_resolutions((512, 512), 1024, 256)


def test_nearest_aspect_ratio_bucket_and_cover_size():
    bucket, resized, error = select_bucket(1000, 500, SD15_BUCKETS)
    # ratio 2.0: 704x320 (2.2) is nearer than 640x384 (1.67) or 768x320 (2.4).
    assert bucket == (704, 320)
    assert resized == (704, 352)  # covers the bucket; the height is cropped
    assert error == pytest.approx(0.2)
    assert select_bucket(300, 300, SD15_BUCKETS)[:2] == ((512, 512), (512, 512))  # upscaled


def test_exact_bucket_size_wins():
    assert select_bucket(448, 576, SD15_BUCKETS) == ((448, 576), (448, 576), 0.0)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones():
    bucket, resized, _ = select_bucket(300, 200, SD15_BUCKETS, no_upscale=True)
    assert resized == (300, 200) and bucket == (256, 192)
    bucket, resized, _ = select_bucket(2000, 1000, SD15_BUCKETS, no_upscale=True, max_area=512 * 512)
    assert resized[0] * resized[1] <= 512 * 512 * 1.01
    assert abs(resized[0] / resized[1] - 2.0) < 0.02
    assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
    assert bucket[0] <= resized[0] and bucket[1] <= resized[1]
    with pytest.raises(ValueError, match="smaller than one"):
        select_bucket(40, 300, SD15_BUCKETS, no_upscale=True)


def test_resize_and_crop_keeps_the_centre():
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (90, 40, 110, 60))  # red square in the centre
    out = resize_and_crop(image, (128, 128))
    assert out.size == (128, 128)
    assert out.getpixel((64, 64)) == (255, 0, 0)
    # The sides of the wide picture are what was cut.
    pixels = np.asarray(out)
    assert (pixels[:, 0] == (0, 0, 255)).all()
    bucket, resized, _ = select_bucket(1000, 500, SD15_BUCKETS)
    assert resize_and_crop(Image.new("RGB", (1000, 500)), bucket, resized).size == bucket


# ---- repeats -------------------------------------------------------------------------


def crops_table(counts: dict[tuple[int, str, str], int]) -> pd.DataFrame:
    rows = [
        {"cluster": cluster, "kind": kind, "aesthetic_label": label}
        for (cluster, kind, label), count in counts.items()
        for _ in range(count)
    ]
    return pd.DataFrame(rows)


def test_each_group_contributes_about_equally_and_heads_half():
    table = crops_table({(0, "full", "good"): 10, (1, "full", "good"): 2, (0, "head", "good"): 10})
    plan = assign_repeats(table)
    repeats = dict(zip(plan.groups["group"], plan.groups["repeats"], strict=True))
    assert repeats == {"c0_full_medium": 2, "c1_full_medium": 10, "c0_head_medium": 1}
    samples = dict(zip(plan.groups["group"], plan.groups["samples"], strict=True))
    assert samples["c0_full_medium"] == samples["c1_full_medium"] == 2 * samples["c0_head_medium"]
    assert plan.samples_per_epoch == 50
    assert plan.row_repeats().tolist() == [2] * 10 + [10] * 2 + [1] * 10


def test_better_aesthetic_tiers_are_repeated_more():
    table = crops_table({(0, "full", "best"): 4, (0, "full", "normal"): 4, (0, "full", "worst"): 4})
    repeats = dict(zip(*assign_repeats(table).groups[["tier", "repeats"]].to_numpy().T, strict=True))
    assert repeats == {"low": 1, "medium": 2, "high": 4}


def test_repeats_are_capped():
    table = crops_table({(0, "full", "good"): 100, (1, "full", "good"): 1})
    plan = assign_repeats(table, max_repeats=8)
    assert plan.groups["repeats"].tolist() == [1, 8]


def test_steps_per_epoch_batches_each_bucket_alone():
    assert steps_per_epoch([5, 4, 0], 4) == 3
    table = crops_table({(0, "full", "good"): 3})
    plan = assign_repeats(table)
    assert plan.steps_per_epoch(2) == 2
    assert plan.steps_per_epoch(2, buckets=pd.Series(["a", "b", "b"])) == 2


def test_repeats_need_known_kinds():
    with pytest.raises(ValueError, match="kind"):
        assign_repeats(pd.DataFrame({"kind": ["feet"]}))
    assert assign_repeats(pd.DataFrame({"kind": []})).samples_per_epoch == 0


# ---- export --------------------------------------------------------------------------


def test_kohya_folder_pairs_images_with_captions(tmp_path):
    rows = [
        ExportRow(png((255, 0, 0)), "ash, skirt", 3),
        ExportRow(png((0, 255, 0)), "ash, dress", 3),
        ExportRow(png((0, 0, 255)), "ash", 1, stem="head_0"),
    ]
    root = write_kohya_folder(tmp_path / "dataset", "ash", rows)
    assert sorted(p.name for p in root.iterdir()) == ["1_ash", "3_ash"]
    assert sorted(p.name for p in (root / "1_ash").iterdir()) == ["head_0.png", "head_0.txt"]
    three = sorted((root / "3_ash").iterdir())
    assert len(three) == 4
    for image in (p for p in three if p.suffix == ".png"):
        caption = image.with_suffix(".txt").read_text()
        assert caption in ("ash, skirt\n", "ash, dress\n")


def test_kohya_folder_is_idempotent_and_drops_stale_files(tmp_path):
    root = tmp_path / "dataset"
    rows = [ExportRow(png((255, 0, 0)), "ash, skirt", 3), ExportRow(png((0, 0, 255)), "ash", 1)]
    write_kohya_folder(root, "ash", rows)
    other = write_kohya_folder(root, "lumi", [ExportRow(png((9, 9, 9)), "lumi", 2)])
    before = {p: os.stat(p).st_mtime_ns for p in root.rglob("*") if p.is_file()}
    write_kohya_folder(root, "ash", rows)
    assert {p: os.stat(p).st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    write_kohya_folder(root, "ash", rows[:1])
    assert not (root / "1_ash").exists()
    assert len(list((root / "3_ash").iterdir())) == 2
    assert len(list((other / "2_lumi").iterdir())) == 2  # another dataset is untouched


def test_kohya_folder_refuses_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        write_kohya_folder(tmp_path, "ash", [ExportRow(b"<html>", "ash", 1)])
    with pytest.raises(ValueError, match="appears twice"):
        write_kohya_folder(tmp_path, "ash", [ExportRow(png(), "a", 1), ExportRow(png(), "b", 1)])
    with pytest.raises(ValueError, match="dataset name"):
        write_kohya_folder(tmp_path, "../escape", [])
    with pytest.raises(ValueError, match="repeats"):
        write_kohya_folder(tmp_path, "ash", [ExportRow(png(), "a", 0)])


def test_kohya_folder_copies_image_files(tmp_path):
    source = tmp_path / "crop.png"
    source.write_bytes(png((1, 2, 3)))
    root = write_kohya_folder(tmp_path / "out", "ash", [ExportRow(source, "ash", 2, stem="crop")])
    assert (root / "2_ash" / "crop.png").read_bytes() == source.read_bytes()
