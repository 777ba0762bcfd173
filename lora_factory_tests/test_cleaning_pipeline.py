"""The cleaning chain on the demo booru's posts, with the built-in tiny vision models.

The demo booru plants the faults real boards have (wrong character, several people,
monochrome, tiny, transparent, duplicates, a truncated file) and says which post is
which (`DemoBooru.truth`), so every filter is measured against the truth.
"""

import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_factory.cleaning.dedup import hamming, perceptual_hash
from lora_factory.cleaning.embeddings import EmbeddingStore
from lora_factory.cleaning.pipeline import CROP_COLUMNS, CleaningConfig, clean_character
from lora_factory.demo import booru as demo
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
from lora_factory.storage import BlobStore
from lora_factory.vision.models import VisionModels

CHARACTER = DEMO_CHARACTERS[0]
# The chain as the factory runs it (the demo booru poses every figure differently, so
# person-level dedup keeps distinct figures apart); only the log is more frequent.
DEMO_CONFIG = CleaningConfig(log_every=10)


@pytest.fixture(scope="module")
def booru() -> demo.DemoBooru:
    return demo.DemoBooru(seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> VisionModels:
    return VisionModels.load(tiny_registry(tmp_path_factory.mktemp("models")), names=TINY_MODELS)


def scraped(booru: demo.DemoBooru, blobs: BlobStore, tag: str) -> pd.DataFrame:
    """What the scrape step stores: the files as blobs and a manifest row per post."""
    rows = []
    for post in booru.posts_for_tag(tag):
        if "md5" not in post:  # hidden from anonymous users: never downloaded
            continue
        data, _ = booru.file(f"{post['md5']}.{post['file_ext']}")
        rows.append({"sha256": blobs.put(data), "site": "demo", "post_id": post["id"], "rating": post["rating"]})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cleaned(booru, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("factory")
    blobs = BlobStore(root / "blobs")
    posts = scraped(booru, blobs, CHARACTER.booru_tag)
    store = EmbeddingStore(root / "lancedb")
    logs: list[str] = []
    result = clean_character(CHARACTER.key, posts, blobs, models, DEMO_CONFIG, store, log=logs.append)
    return result, posts, blobs, store, logs


def kind_of(booru, post_id) -> str:
    return booru.truth[int(post_id)].kind


@pytest.fixture(scope="module")
def subset(cleaned, booru) -> pd.DataFrame:
    """A few posts for the variant runs: the wrong-character ones and six normal ones."""
    _, posts, *_ = cleaned
    kinds = posts["post_id"].map(lambda p: kind_of(booru, p))
    return pd.concat([posts[kinds == demo.WRONG_CHARACTER], posts[kinds == demo.NORMAL].head(6)])


def quiet(_: str) -> None:
    pass


def test_every_post_is_accounted_for(cleaned):
    result, posts, *_ = cleaned
    with_crops = set(result.crops["post_id"])
    dropped = set(result.drops["post_id"])
    quarantined = set(result.quarantine["post_id"])
    assert set(posts["post_id"]) == with_crops | dropped | quarantined
    counted = {k: v for k, v in result.counts.items() if k not in ("posts", "crop_too_small")
               and not k.startswith(("persons", "crops"))}
    assert sum(counted.values()) == len(result.drops) + len(result.quarantine)


def test_planted_faults_are_removed(cleaned, booru):
    result, *_ = cleaned
    reasons = result.drops.assign(kind=[kind_of(booru, p) for p in result.drops["post_id"]])
    kept_kinds = {kind_of(booru, p) for p in result.crops["post_id"]}
    assert demo.WRONG_CHARACTER not in kept_kinds
    assert demo.MONOCHROME not in kept_kinds
    assert demo.SMALL not in kept_kinds
    # The identity filter removes the wrong characters (the sampled-filter test checks it
    # removes exactly them); one can go before it as a whole-picture near duplicate of an
    # unrelated post: pHash of a lone figure on a plain background collides now and then.
    wrong_reasons = set(reasons.loc[reasons["kind"] == demo.WRONG_CHARACTER, "reason"])
    assert "identity_outlier" in wrong_reasons
    assert wrong_reasons <= {"identity_outlier", "near_duplicate"}
    assert set(reasons.loc[reasons["kind"] == demo.MONOCHROME, "reason"]) == {"monochrome"}
    assert set(reasons.loc[reasons["kind"] == demo.SMALL, "reason"]) == {"too_small"}
    corrupt = [p for p in result.quarantine["post_id"] if kind_of(booru, p) == demo.CORRUPT]
    assert len(corrupt) == len(result.quarantine)
    if corrupt:
        assert set(result.quarantine["reason"]) == {"truncated"}


def test_duplicates_keep_exactly_one_copy(cleaned, booru):
    result, *_ = cleaned
    kept_posts = set(result.crops["post_id"])
    for post_id, truth in booru.truth.items():
        if truth.tagged_character == CHARACTER.key and truth.kind in demo.DERIVED_KINDS:
            pair = {post_id, truth.duplicate_of}
            assert len(pair & kept_posts) == 1, (truth.kind, pair)
    assert result.counts.get("exact_duplicate", 0) == 1


def test_multi_person_posts_keep_only_the_character(cleaned, booru):
    result, *_ = cleaned
    multi = result.crops[[kind_of(booru, p) == demo.MULTI_PERSON for p in result.crops["post_id"]]]
    assert len(multi) > 0
    for row in multi[multi["kind"] == "full"].itertuples():
        figures = booru.truth[int(row.post_id)].figures
        centre = (row.x0 + row.x1) / 2
        owner = min(figures, key=lambda f: abs((f.box[0] + f.box[2]) / 2 - centre))
        assert owner.character_key == CHARACTER.key


def test_normal_posts_give_three_crops(cleaned, booru):
    result, *_ = cleaned
    normal = result.crops[[kind_of(booru, p) == demo.NORMAL for p in result.crops["post_id"]]]
    per_post = normal.groupby("post_id")["kind"].apply(set)
    assert (per_post == {"full", "upper", "head"}).mean() >= 0.9


def test_crops_are_stored_as_png_and_embedded(cleaned):
    result, _, blobs, store, _ = cleaned
    assert list(result.crops.columns) == CROP_COLUMNS
    assert result.crops["crop_sha256"].is_unique
    for row in result.crops.head(12).itertuples():
        image = Image.open(io.BytesIO(blobs.get(row.crop_sha256)))
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (row.width, row.height) == (row.x1 - row.x0, row.y1 - row.y0)
        assert min(image.size) >= 64
    assert result.embeddings.shape == (len(result.crops), 768)
    assert result.crops["embedding_row"].tolist() == list(range(len(result.crops)))
    stored = store.vectors_of(CHARACTER.key)
    assert set(stored["crop_sha256"]) == set(result.crops["crop_sha256"])
    assert 0.8 <= result.purity < 1.0
    assert result.crops["aesthetic_label"].notna().all()
    assert result.crops["aesthetic_score"].between(0, 1).all()


def test_transparent_pictures_are_cleaned_on_white(cleaned, booru):
    result, _, blobs, *_ = cleaned
    transparent = result.crops[[kind_of(booru, p) == demo.TRANSPARENT for p in result.crops["post_id"]]]
    for row in transparent.itertuples():
        pixels = np.asarray(Image.open(io.BytesIO(blobs.get(row.crop_sha256))))
        assert (pixels[0, 0] > 200).all()  # a corner of the crop is background: white


def test_progress_is_logged(cleaned):
    _, posts, _, _, logs = cleaned
    assert sum("first pass" in line for line in logs) >= 2
    assert any(f"first pass {len(posts)}/{len(posts)}" in line for line in logs)
    assert "identity purity" in logs[-1]


def test_rerun_is_idempotent(cleaned, subset, models, tmp_path):
    _, _, blobs, _, _ = cleaned
    store = EmbeddingStore(tmp_path / "lancedb")
    first = clean_character(CHARACTER.key, subset, blobs, models, DEMO_CONFIG, store, log=quiet)
    again = clean_character(CHARACTER.key, subset, blobs, models, DEMO_CONFIG, store, log=quiet)
    assert again.crops["crop_sha256"].tolist() == first.crops["crop_sha256"].tolist()
    assert np.array_equal(again.embeddings, first.embeddings)
    assert store.count(CHARACTER.key) == len(first.crops) > 0


def test_sampled_identity_filter_agrees_on_the_outliers(cleaned, subset, models, booru):
    _, _, blobs, _, _ = cleaned
    wrong = {p for p in subset["post_id"] if kind_of(booru, p) == demo.WRONG_CHARACTER}
    full = clean_character(CHARACTER.key, subset, blobs, models, DEMO_CONFIG, None, log=quiet)
    sampled_config = replace(DEMO_CONFIG, identity_reference_size=5)
    sampled = clean_character(CHARACTER.key, subset, blobs, models, sampled_config, None, log=quiet)
    for result in (full, sampled):
        assert set(result.drops.loc[result.drops["reason"] == "identity_outlier", "post_id"]) == wrong
    assert sampled.identity_cluster_sizes[0] == full.identity_cluster_sizes[0]


def test_identity_filter_off_keeps_outliers_but_measures_purity(cleaned, subset, models, booru):
    _, _, blobs, _, _ = cleaned
    config = replace(DEMO_CONFIG, identity_filter=False)
    unfiltered = clean_character(CHARACTER.key, subset, blobs, models, config, None, log=quiet)
    assert unfiltered.purity < 1.0
    kinds = {kind_of(booru, p) for p in unfiltered.crops["post_id"]}
    assert demo.WRONG_CHARACTER in kinds
    assert (unfiltered.crops["identity_cluster"] > 0).any()
    assert "identity_outlier" not in set(unfiltered.drops["reason"])


def reframed(image: Image.Image, box) -> Image.Image:
    """The same drawn figure in a new composition: cut out, on a wider white picture,
    at the other side (what a re-upload with a different crop or canvas looks like)."""
    figure = image.crop(box)
    canvas = Image.new("RGB", (image.width + 200, image.height), "white")
    left = 20 if box[0] > image.width / 2 else canvas.width - figure.width - 20
    canvas.paste(figure, (left, box[1]))
    return canvas


def test_person_dedup_collapses_the_same_figure_in_another_picture(cleaned, subset, models, booru):
    _, _, blobs, _, _ = cleaned
    normal = subset[[kind_of(booru, p) == demo.NORMAL for p in subset["post_id"]]]
    original = normal.iloc[0]
    image = Image.open(io.BytesIO(blobs.get(original["sha256"]))).convert("RGB")
    copy = reframed(image, booru.truth[int(original["post_id"])].figures[0].box)
    # Different pictures as a whole: only the person-level dedup can see the copy.
    assert hamming(perceptual_hash(copy), perceptual_hash(image)) > DEMO_CONFIG.phash_max_distance
    buffer = io.BytesIO()
    copy.save(buffer, "PNG")
    copy_row = {"sha256": blobs.put(buffer.getvalue()), "site": "demo", "post_id": -1, "rating": "g"}
    posts = pd.concat([normal, pd.DataFrame([copy_row])], ignore_index=True)

    deduped = clean_character(CHARACTER.key, posts, blobs, models, DEMO_CONFIG, None, log=quiet)
    off = replace(DEMO_CONFIG, person_phash_max_distance=None)
    undeduped = clean_character(CHARACTER.key, posts, blobs, models, off, None, log=quiet)
    collapsed = deduped.drops[deduped.drops["reason"] == "near_duplicate_person"]
    # Exactly the pair collapses: the other (differently posed) figures all stay.
    assert set(collapsed["post_id"]) <= {original["post_id"], -1} and len(collapsed) == 1
    assert deduped.counts["persons_kept"] == undeduped.counts["persons_kept"] - 1


def test_rating_filter_and_missing_blobs(cleaned, subset, models, tmp_path):
    _, _, blobs, _, _ = cleaned
    config = replace(DEMO_CONFIG, allowed_ratings=("safe",))
    filtered = clean_character(CHARACTER.key, subset, blobs, models, config, None, log=quiet)
    rated = filtered.drops["reason"].str.startswith("rating_")
    assert set(filtered.drops.loc[rated, "reason"]) <= {"rating_r15", "rating_r18"}
    kept_ratings = filtered.crops["post_id"]
    assert len(kept_ratings) > 0
    empty_store = BlobStore(tmp_path / "empty")
    missing = clean_character(CHARACTER.key, subset, empty_store, models, DEMO_CONFIG, None, log=quiet)
    assert set(missing.quarantine["reason"]) == {"missing_blob"}
    assert missing.crops.empty and missing.purity == 0.0


def test_bad_posts_table_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match="post_id"):
        clean_character("x", pd.DataFrame({"sha256": []}), BlobStore(tmp_path), models)
