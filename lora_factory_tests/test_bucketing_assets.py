"""The captions and buckets assets on a small drawn dataset: what they write, what the UI
gets, and that an unchanged re-run reuses the stored result."""

from __future__ import annotations

import io
import json
import random
import tomllib
import zipfile

import dagster as dg
import pandas as pd
import pytest

from lora_factory.assets.dataset import buckets, captions
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.deployment import TINY_BASE_MODEL, demo_resources
from lora_factory.demo.drawing import draw_post
from lora_factory.provenance import StampBook, record_files
from lora_factory.resources import FactoryStorage
from lora_factory.storage import FactoryStore, read_table, write_table
from lora_factory.vision.registry import DEFAULT_MODELS

CHARACTER = "ash_ember_knights"
PICTURES = 12  # 6 per outfit


def store_crops(home) -> None:
    """Full / upper / head crops of drawn pictures, stored as cleaning would store them."""
    store = FactoryStore(home)
    ash = next(c for c in DEMO_CHARACTERS if c.key == CHARACTER)
    rng = random.Random(3)
    rows = []
    for picture in range(PICTURES):
        post = draw_post([(ash, picture % 2)], (240, 360), rng)
        figure = post.figures[0]
        boxes = {"full": figure.box, "upper": figure.half_body_box, "head": figure.head_box}
        for kind, box in boxes.items():
            crop = post.image.crop(box)
            buffer = io.BytesIO()
            crop.save(buffer, "PNG")
            rows.append(
                {
                    "crop_sha256": store.blobs.put(buffer.getvalue()),
                    "source_sha256": f"picture{picture}",
                    "person_index": 0,
                    "kind": kind,
                    "aesthetic_label": "good",
                    "aesthetic_score": 0.9 if picture < 4 else 0.5,
                }
            )
    table = store.table_path("cleaned_crops", CHARACTER)
    write_table(pd.DataFrame(rows), table)
    StampBook(store).write("cleaned_crops", CHARACTER, "test", "crops-v1", {}, record_files(store.root, [table]))


def materialize(instance, home, caption_config=None, bucket_config=None):
    run_config = {"ops": {"buckets": {"config": {"resolution": 128, "batch_size": 2, **(bucket_config or {})}}}}
    if caption_config:
        run_config["ops"]["captions"] = {"config": caption_config}
    result = dg.materialize(
        [captions, buckets],
        partition_key=CHARACTER,
        instance=instance,
        resources={"storage": FactoryStorage(home=str(home)), **demo_resources(base_model=TINY_BASE_MODEL)},
        run_config=run_config,
    )
    return {
        event.asset_key.to_user_string(): {
            key: value.value for key, value in event.event_specific_data.materialization.metadata.items()
        }
        for event in result.get_asset_materialization_events()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    store_crops(home)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("characters", [CHARACTER])
        first = materialize(instance, home)
        again = materialize(instance, home)
        static = materialize(instance, home, {"style": "static", "outfit_triggers": True,
                                              "outfit_trigger_min_images": 6})
        yield home, first, again, static


def test_captions_metadata_shows_captions_core_tags_and_clusters(runs):
    _, first, _, _ = runs
    meta = first["captions"]
    assert meta["trigger_word"] == "ash ek" and meta["caption_style"] == "semi-static"
    assert "`red_hair`" in meta["core_tags"] and "`yellow_eyes`" in meta["core_tags"]
    shares = {r.data["core_tag"]: r.data["share_of_crops"] for r in meta["core_tag_shares"].records}
    assert shares["red_hair"] >= 0.35
    clusters = [r.data for r in meta["outfit_clusters"].records]
    assert sorted(c["tags"] for c in clusters) == ["green_dress", "navy_jacket, beige_skirt"]
    assert [c["images"] for c in clusters] == [6, 6]
    assert meta["outfit_cluster_sheets"].count("data:image/webp;base64,") == 2
    # A sample of the captions, caption first; the whole table is a file.
    captions_shown = [r.data for r in meta["captions"].records]
    assert len(captions_shown) == 20 < 3 * PICTURES
    assert list(captions_shown[0]) == ["caption", "kind", "cluster", "crop_sha256"]
    assert all(c["caption"].startswith("ash ek") and "red hair" not in c["caption"] for c in captions_shown)
    assert meta["captions_table_path"] == f"tables/captions/{CHARACTER}.parquet"
    # The index's `ash_ek` is written as captions write tags: the metadata says so.
    assert "`ash_ek`" in meta["trigger_word_in_index"] and "type `ash ek`" in meta["trigger_word_in_index"]


def test_buckets_write_the_training_folder_config_frequencies_and_package(runs):
    home, first, _, _ = runs
    meta = first["buckets"]
    table = read_table(FactoryStore(home).table_path("buckets", CHARACTER))
    # Steps per epoch as kohya counts them: per bucket, ceil(samples / batch size 2).
    samples = table.groupby(["bucket_width", "bucket_height"])["repeats"].sum()
    assert meta["steps_per_epoch"] == sum(-(-int(n) // 2) for n in samples)
    assert meta["steps_per_epoch_batch_size"] == 2
    assert "4/8/16" in meta["repeat_rule"]
    assert meta["mean_aspect_error"] == pytest.approx(table["aspect_error"].mean())
    assert sum(r.data["images"] for r in meta["buckets"].records) == 3 * PICTURES

    # Paths in metadata are relative to the home; image_dir to the config's own folder.
    config_path = home / meta["kohya_dataset_config"]
    config = tomllib.loads(config_path.read_text())
    folders = {s["image_dir"]: s["num_repeats"] for s in config["datasets"][0]["subsets"]}
    assert folders == {f"train/{r}_{CHARACTER}": r for r in sorted(set(table["repeats"]))}
    assert all((config_path.parent / folder).is_dir() for folder in folders)
    assert (home / meta["train_data_dir"]) == config_path.parent / "train"
    assert config["datasets"][0]["resolution"] == [128, 128]
    frequency = json.loads((home / meta["tag_frequency"]).read_text())
    assert set(frequency) == {f"{r}_{CHARACTER}" for r in set(table["repeats"])}
    assert sum(f["ash ek"] for f in frequency.values()) == 3 * PICTURES

    with zipfile.ZipFile(home / meta["dataset_package"]) as package:
        names = package.namelist()
        package_meta = json.loads(package.read("meta.json"))
    assert len(names) == 2 * 3 * PICTURES + 1
    assert "red_hair" in package_meta["core_tags"]
    assert package_meta["crops_by_kind"] == {"full": PICTURES, "head": PICTURES, "upper": PICTURES}
    assert sorted(c["size"] for c in package_meta["clusters"]) == [18, 18]
    versions = package_meta["versions"]
    assert versions["tagger"]["model"] == "tiny-tagger" and len(versions["tagger"]["model_sha256"]) == 64
    assert versions["code"] == {"captions": "3", "buckets": "3"}
    # Every vision model that decided what is in the package, with its files' sha256.
    assert set(versions["vision_models"]) == set(DEFAULT_MODELS)
    assert all(len(sha) == 64 for role in versions["vision_models"].values() for sha in role["files"].values())


def test_unchanged_inputs_are_reused_and_a_new_style_rebuilds(runs):
    _, first, again, static = runs
    assert not first["captions"]["reused"] and not first["buckets"]["reused"]
    assert again["captions"]["reused"] and again["buckets"]["reused"]
    assert again["buckets"]["steps_per_epoch"] == first["buckets"]["steps_per_epoch"]
    assert not static["captions"]["reused"] and not static["buckets"]["reused"]
    # Static with outfit triggers: the biggest outfit folds into the character trigger,
    # the other one gets a trigger of its own.
    clusters = [r.data for r in static["captions"]["outfit_clusters"].records]
    assert clusters[0]["folded_tags"] == clusters[0]["tags"] and clusters[0]["trigger"] == ""
    assert clusters[1]["trigger"] == clusters[1]["tags"].replace(", ", "_")


def test_buckets_take_kohyas_step_unless_the_model_sets_its_own_and_refuse_a_step_it_cannot_take(runs, tmp_path):
    _, first, _, _ = runs
    assert first["buckets"]["bucket_settings"]["bucket_reso_steps"] == 64  # the tiny model sets no step
    # Its sides must be multiples of 16 (VAE x8, one UNet downsample): 24 px steps would
    # break training much later; they are refused before anything is written.
    store_crops(tmp_path)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("characters", [CHARACTER])
        with pytest.raises(dg.Failure, match="bucket step 24 px does not fit the base model.*multiples of 16 px"):
            materialize(instance, tmp_path, bucket_config={"step": 24, "min_size": 48, "max_size": 240})
    assert not (tmp_path / "artefacts/buckets" / CHARACTER / "meta.json").exists()
