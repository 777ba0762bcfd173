import io
import json
import os
import tomllib
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_factory.bucketing.buckets import (
    KohyaBuckets,
    make_bucket_resolutions,
    resize_and_crop,
    select_bucket,
)
from lora_factory.bucketing.export import (
    ExportRow,
    folder_tag_frequency,
    kohya_dataset_config,
    write_dataset_package,
    write_kohya_folder,
)
from lora_factory.bucketing.repeats import (
    assign_repeats,
    describe_rule,
    quality_tier,
    steps_per_epoch,
)

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


# (image size, settings) -> (bucket, resized size), each worked out by hand from kohya's
# rules (library/train_util.py BucketManager.select_bucket, model_util.
# make_bucket_resolutions); the comments carry the arithmetic.
KOHYA_CASES = [
    # Upscaling mode, 512 / 256..1024 / 64: nearest aspect ratio, scaled to cover.
    # 2.0 -> 704x320 (2.2) beats 640x384 (1.67) and 768x320 (2.4); 2.0 < 2.2, so widths
    # match: 704/1000 = 0.704 -> 704 x 352.
    ((1000, 500), (512, False), (704, 320), (704, 352)),
    # 1.0 -> 512x512, enlarged 512/300.
    ((300, 300), (512, False), (512, 512), (512, 512)),
    # An image of a bucket's size stays as it is.
    ((448, 576), (512, False), (448, 576), (448, 576)),
    # 0.6 -> 384x640 exactly; 384/600 = 0.64 -> 384 x 640.
    ((600, 1000), (512, False), (384, 640), (384, 640)),
    # 1.333 -> 576x448 (1.286, error 0.048); wider than the bucket, so heights match:
    # 448/900 -> width 597.3 -> 597.
    ((1200, 900), (512, False), (576, 448), (597, 448)),
    # 0.667 -> 384x640 (0.6, error 0.067) beats 448x576 (0.778); heights match:
    # 640/1500 -> width 426.7 -> 427.
    ((1000, 1500), (512, False), (384, 640), (427, 640)),
    # Resolution 500: square side floor(sqrt(250000)/64)*64 = 448.
    ((600, 600), (500, False), (448, 448), (448, 448)),
    # No-upscale mode, max area 512*512 = 262144.
    # 60000 px fit: size kept, bucket rounded down: 300-44, 200-8.
    ((300, 200), (512, True), (256, 192), (300, 200)),
    # 2.0: width sqrt(262144*2) = 724.1 -> 704, height for it 352 -> 320 (ratio 2.2);
    # height 362.0 -> 320, width for it 640 (ratio 2.0, exact): the height wins,
    # resized 640 x 320, bucket the same.
    ((2000, 1000), (512, True), (640, 320), (640, 320)),
    # 0.667: width 418.0 -> 384, height for it 576 (exact); height 627.1 -> 576, width
    # 384 (exact): a tie goes to the height: resized int(576*2/3+0.5) = 384 x 576.
    ((1000, 1500), (512, True), (384, 576), (384, 576)),
    # 1.4: width 605.8 -> 576, height for it 411.4 -> 384 (ratio 1.5, error 0.1);
    # height 432.7 -> 384, width for it 537.6 -> 512 (1.333, error 0.067): the height
    # wins: resized int(384*1.4+0.5) = 538 x 384, bucket 538-26 = 512 x 384.
    ((700, 500), (512, True), (512, 384), (538, 384)),
    # Resolution 500: max area 250000: sides sqrt(250000) = 500 -> 448 both ways.
    ((600, 600), (500, True), (448, 448), (448, 448)),
]


@pytest.mark.parametrize(("size", "settings", "bucket", "resized"), KOHYA_CASES)
def test_buckets_match_kohya(size, settings, bucket, resized):
    resolution, no_upscale = settings
    choice = KohyaBuckets(resolution, 256, 1024, 64, no_upscale=no_upscale).select(*size)
    assert (choice.bucket, choice.resized) == (bucket, resized)
    assert choice.aspect_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    image = Image.new("RGB", size, (10, 20, 30))
    assert resize_and_crop(image, choice.bucket, choice.resized).size == bucket


def test_bucket_list_follows_kohya_at_other_settings():
    # Width 1088 would need height (262144 // 1088) // 64 * 64 = 192 < 256: kohya skips it.
    wide = make_bucket_resolutions((512, 512), 256, 2048, 64)
    assert max(w for w, _ in wide) == 1024 and (1088, 192) not in wide
    at_500 = make_bucket_resolutions((500, 500), 256, 1024, 64)
    assert (448, 448) in at_500 and (512, 512) not in at_500
    # Width 256: (250000 // 256) // 64 * 64 = 960.
    assert (256, 960) in at_500 and (256, 1024) not in at_500


def test_kohya_rounds_the_bucket_range_and_checks_the_resolution():
    buckets = KohyaBuckets(512, min_size=200, max_size=1100, step=64)
    assert (buckets.min_size, buckets.max_size) == (192, 1152)  # down, up to the step
    with pytest.raises(ValueError, match="min bucket size"):
        KohyaBuckets(512, min_size=576)
    with pytest.raises(ValueError, match="max bucket size"):
        KohyaBuckets(768, max_size=704)
    assert KohyaBuckets(512, no_upscale=True).resolutions == []  # buckets follow the images
    assert KohyaBuckets((512, 768)).settings()["resolution"] == [512, 768]


@pytest.mark.parametrize("no_upscale", [False, True])
def test_an_exported_image_stays_in_its_bucket(no_upscale):
    # The training folder holds bucket-sized images: sd-scripts, with the same settings,
    # must put each one in that bucket without resizing it.
    buckets = KohyaBuckets(512, 256, 1024, 64, no_upscale=no_upscale)
    for size in [(1000, 500), (333, 777), (2000, 1000), (640, 900), (300, 200)]:
        first = buckets.select(*size)
        again = buckets.select(*first.bucket)
        assert again.bucket == again.resized == first.bucket


def test_no_upscale_refuses_images_thinner_than_a_step():
    with pytest.raises(ValueError, match="smaller than one"):
        KohyaBuckets(512, no_upscale=True).select(40, 300)
    with pytest.raises(ValueError, match="max_area"):
        select_bucket(300, 200, SD15_BUCKETS, no_upscale=True)


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


def test_quality_tiers_from_the_aesthetic_score_repeat_4_8_16():
    # Hand-made datasets repeat their low / medium / high quality groups 4 / 8 / 16 times.
    table = pd.DataFrame(
        {"kind": "full", "aesthetic_score": [0.1, 0.2, 0.5, 0.6, 0.8, 0.9], "aesthetic_label": "normal"}
    )
    plan = assign_repeats(table)
    assert dict(zip(plan.groups["tier"], plan.groups["repeats"] * 4, strict=True)) == {
        "low": 4, "medium": 8, "high": 16
    }
    assert plan.row_repeats().tolist() == [1, 1, 2, 2, 4, 4]
    # The score wins over the label; cut points are settings.
    assert assign_repeats(table, quality_cuts=(0.0, 0.95)).groups["tier"].tolist() == ["medium"]
    assert quality_tier(0.25) == "medium" and quality_tier(0.75) == "high"
    with pytest.raises(ValueError, match="quality cuts"):
        quality_tier(0.5, (0.8, 0.2))
    rule = describe_rule()
    assert "0.5:1.0:2.0" in rule and "head crops 0.5" in rule and "capped at 20" in rule


def test_steps_per_epoch_as_kohya_counts_them():
    # 3 full crops of cluster 0 (repeats 1) in bucket A, 1 of cluster 1 (repeats 3) in
    # bucket B: bucket A holds 3 samples, B 3; batch 2 -> ceil(3/2) + ceil(3/2) = 4.
    table = crops_table({(0, "full", "good"): 3, (1, "full", "good"): 1})
    plan = assign_repeats(table)
    assert plan.row_repeats().tolist() == [1, 1, 1, 3]
    assert plan.steps_per_epoch(2, buckets=pd.Series(["a", "a", "a", "b"])) == 4
    assert plan.steps_per_epoch(2) == 3  # one bucket: ceil(6 / 2)


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


def test_kohya_dataset_config_names_the_folders_and_bucket_settings(tmp_path):
    train = tmp_path / "train"
    buckets = KohyaBuckets(512, 256, 1024, 64, no_upscale=True)
    path = kohya_dataset_config(tmp_path / "dataset_config.toml", train, "ash", [2, 1, 2], buckets.settings(), 4)
    config = tomllib.loads(path.read_text())
    # Names as sd-scripts' config_util schema spells them.
    assert config["general"] == {"caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1}
    dataset = config["datasets"][0]
    assert dataset["resolution"] == [512, 512] and dataset["batch_size"] == 4
    assert dataset["enable_bucket"] and dataset["bucket_no_upscale"]
    assert (dataset["min_bucket_reso"], dataset["max_bucket_reso"], dataset["bucket_reso_steps"]) == (256, 1024, 64)
    assert [(s["image_dir"], s["num_repeats"]) for s in dataset["subsets"]] == [
        (str(train / "1_ash"), 1),
        (str(train / "2_ash"), 2),
    ]


def test_tag_frequency_per_folder_counts_like_kohya():
    rows = [
        ExportRow(png(), "Ash, skirt", 2),
        ExportRow(png(), "ash, dress, dress", 2),
        ExportRow(png(), "ash", 1),
    ]
    assert folder_tag_frequency(rows, "ash") == {
        "1_ash": {"ash": 1},
        "2_ash": {"ash": 2, "dress": 2, "skirt": 1},  # lower-cased, every token counted
    }


def test_dataset_package_holds_pairs_and_meta_and_is_reproducible(tmp_path):
    source = tmp_path / "crop.png"
    source.write_bytes(png((1, 2, 3), (20, 30)))
    rows = [
        ExportRow(png((255, 0, 0)), "ash, skirt", 3, stem="b_crop"),
        ExportRow(source, "ash, dress", 1, stem="a_crop"),
    ]
    meta = {"core_tags": ["red_hair"], "clusters": [{"cluster": 0, "size": 2}]}
    first = write_dataset_package(tmp_path / "one.zip", rows, meta)
    second = write_dataset_package(tmp_path / "two.zip", rows[::-1], meta)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        assert archive.namelist() == ["a_crop.png", "a_crop.txt", "b_crop.png", "b_crop.txt", "meta.json"]
        assert archive.read("a_crop.png") == source.read_bytes()
        assert archive.read("b_crop.txt") == b"ash, skirt\n"
        assert json.loads(archive.read("meta.json")) == meta
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="stem"):
        write_dataset_package(tmp_path / "bad.zip", [ExportRow(png(), "ash", 1)], meta)
    with pytest.raises(ValueError, match="same stem"):
        write_dataset_package(tmp_path / "bad.zip", [rows[0], rows[0]], meta)
