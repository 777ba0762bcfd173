"""The demo booru: its catalogue, its faults, its drawings and its Danbooru-style HTTP API."""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import requests
from PIL import Image

from lora_factory.cleaning.dedup import (
    DEFAULT_MAX_DISTANCE,
    pairwise_hamming,
    perceptual_hash,
)
from lora_factory.demo import booru as demo
from lora_factory.demo.booru import DemoBooru, DemoBooruServer
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post, figure_shapes, width_ratio
from lora_factory.demo.palette import (
    BACKGROUNDS,
    EYE_COLOURS,
    HAIR_COLOURS,
    SKIN,
    TAG_COLOURS,
)
from lora_factory.demo.poses import SHOULDER_Y, random_pose

ALLOWED_COLOURS = {*TAG_COLOURS.values(), SKIN, *BACKGROUNDS.values()}


@pytest.fixture(scope="module")
def booru() -> DemoBooru:
    return DemoBooru(seed=0)


@pytest.fixture(scope="module")
def server(booru: DemoBooru):
    with DemoBooruServer(booru) as running:
        yield running


def _get(server: DemoBooruServer, path: str, **params) -> requests.Response:
    return requests.get(f"{server.url}{path}", params=params, timeout=10)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _posts_of_kind(booru: DemoBooru, kind: str) -> list[dict]:
    return [p for p in booru.posts if booru.truth[p["id"]].kind == kind]


def test_catalogue_is_deterministic_per_seed(booru: DemoBooru) -> None:
    again = DemoBooru(seed=0)
    assert again.posts == booru.posts
    assert again.tags == booru.tags
    assert [again.file(f"{p['md5']}.{p['file_ext']}") for p in again.posts if "md5" in p] == [
        booru.file(f"{p['md5']}.{p['file_ext']}") for p in booru.posts if "md5" in p
    ]
    other = DemoBooru(seed=1)
    assert {p.get("md5") for p in other.posts} != {p.get("md5") for p in booru.posts}


def test_every_character_has_its_post_count_and_franchise(booru: DemoBooru) -> None:
    for character in DEMO_CHARACTERS + demo.UNRELATED_CHARACTERS:
        posts = booru.posts_for_tag(character.booru_tag)
        assert len(posts) == character.posts, character.key
        assert all(p["tag_string_copyright"] == character.franchise for p in posts)
    ids = [p["id"] for p in booru.posts]
    assert ids == sorted(set(ids))
    assert {p["rating"] for p in booru.posts} == {"g", "s", "q", "e"}


@pytest.mark.parametrize("character", DEMO_CHARACTERS, ids=lambda c: c.key)
def test_pagination_returns_every_post_of_a_tag_exactly_once(
    booru: DemoBooru, server: DemoBooruServer, character
) -> None:
    expected = [p["id"] for p in booru.posts_for_tag(character.booru_tag)]
    max_requests = len(expected) + 2  # a broken cursor must fail the test, not loop forever
    by_number: list[int] = []
    for page in range(1, max_requests):
        batch = _get(server, "/posts.json", tags=character.booru_tag, page=page, limit=7).json()
        if not batch:
            break
        by_number += [p["id"] for p in batch]
    by_cursor: list[int] = []
    cursor: dict[str, str] = {}
    for _ in range(max_requests):
        batch = _get(server, "/posts.json", tags=character.booru_tag, limit=6, **cursor).json()
        if not batch:
            break
        by_cursor += [p["id"] for p in batch]
        cursor = {"page": f"b{batch[-1]['id']}"}
    assert by_number == expected == by_cursor  # newest first, no repeats, none missing
    assert expected == sorted(expected, reverse=True)


def test_posts_query_semantics(booru: DemoBooru, server: DemoBooruServer) -> None:
    tag = "ash_(ember_knights)"
    default = _get(server, "/posts.json", tags=tag).json()
    assert len(default) == demo.POSTS_DEFAULT_LIMIT
    assert len(_get(server, "/posts.json", limit=0).json()) == 1  # limits are clamped, not refused
    assert demo._parse_limit("5000", demo.POSTS_MAX_LIMIT) == demo.POSTS_MAX_LIMIT
    assert _get(server, "/posts.json", limit="many").status_code == 422
    both = _get(server, "/posts.json", tags=f"{tag} monochrome", limit=200).json()
    assert both and all({tag, "monochrome"} <= set(p["tag_string"].split()) for p in both)
    without = _get(server, "/posts.json", tags=f"{tag} -monochrome", limit=200).json()
    assert len(both) + len(without) == len(booru.posts_for_tag(tag))
    general = _get(server, "/posts.json", tags=f"{tag} rating:g order:score", limit=200).json()
    assert general and {p["rating"] for p in general} == {"g"}
    after = _get(server, "/posts.json", tags=tag, page=f"a{default[5]['id']}", limit=3).json()
    assert [p["id"] for p in after] == [p["id"] for p in default[2:5]]
    assert _get(server, "/posts.json", tags="no_such_tag").json() == []
    assert _get(server, "/posts.json", page="1001").status_code == 410
    assert _get(server, "/posts.json", page="x3").status_code == 422
    assert _get(server, "/nothing_here.json").status_code == 404


def test_post_json_has_danbooru_fields_and_absolute_urls(server: DemoBooruServer) -> None:
    post = _get(server, "/posts.json", tags="lumi", limit=1).json()[0]
    for field_name in (
        "id", "md5", "file_ext", "file_url", "large_file_url", "preview_file_url", "image_width",
        "image_height", "file_size", "rating", "tag_string", "tag_string_character",
        "tag_string_copyright", "tag_string_general", "tag_string_artist", "tag_string_meta",
        "created_at", "score",
    ):  # fmt: skip
        assert field_name in post, field_name
    assert post["file_url"] == f"{server.url}/data/{post['md5']}.{post['file_ext']}"
    assert "_truth" not in post and "kind" not in post
    preview = requests.get(post["preview_file_url"], timeout=10)
    assert preview.headers["Content-Type"] == "image/jpeg"
    assert max(_decode(preview.content).size) == demo.PREVIEW_SIZE


def test_tag_glob_search_finds_both_ash_characters(server: DemoBooruServer) -> None:
    search = {"search[name_matches]": "ash*", "search[category]": "4", "search[order]": "count"}
    characters = _get(server, "/tags.json", limit=10, **search).json()
    assert [t["name"] for t in characters] == [
        "ash_(ember_knights)",  # 34 posts
        "ash_(pocket_tamers)",  # 30 posts
        "ashley_(other_franchise)",
    ]
    assert [t["post_count"] for t in characters] == [34, 30, demo.ASHLEY.posts]
    any_category = _get(server, "/tags.json", **{"search[name_matches]": "ASH*"}).json()
    assert ("ashtray", 0) in [(t["name"], t["category"]) for t in any_category]
    franchise = _get(
        server, "/tags.json", **{"search[name_matches]": "*tamers*", "search[category]": "3"}
    ).json()
    assert [t["name"] for t in franchise] == ["pocket_tamers"]
    # Without a wildcard the pattern is an exact name.
    assert _get(server, "/tags.json", **{"search[name_matches]": "ash"}).json() == []
    assert len(_get(server, "/tags.json", limit=2).json()) == 2


def test_served_files_match_their_md5_except_the_corrupt_one(
    booru: DemoBooru, server: DemoBooruServer
) -> None:
    served = _get(server, "/posts.json", limit=200).json()
    assert len(served) == len(booru.posts)
    hidden = [p for p in served if booru.truth[p["id"]].kind == demo.HIDDEN]
    assert len(hidden) == 1 and "md5" not in hidden[0] and "file_url" not in hidden[0]
    corrupt_seen = 0
    for post in served:
        if "file_url" not in post:
            continue
        response = requests.get(post["file_url"], timeout=10)
        assert response.status_code == 200
        content_type = {"png": "image/png", "jpg": "image/jpeg"}[post["file_ext"]]
        assert response.headers["Content-Type"] == content_type
        if booru.truth[post["id"]].kind == demo.CORRUPT:
            corrupt_seen += 1
            assert hashlib.md5(response.content).hexdigest() != post["md5"]
            assert len(response.content) < post["file_size"]
            with pytest.raises((OSError, SyntaxError)):
                _decode(response.content)
        else:
            assert hashlib.md5(response.content).hexdigest() == post["md5"]
            assert len(response.content) == post["file_size"]
            assert _decode(response.content).size == (post["image_width"], post["image_height"])
    assert corrupt_seen == 1
    missing = _get(server, f"/data/{'0' * 32}.png")
    assert missing.status_code == 404 and missing.json()["success"] is False


def test_fault_quotas_per_character(booru: DemoBooru) -> None:
    for position, character in enumerate(DEMO_CHARACTERS):
        kinds = Counter(booru.truth[p["id"]].kind for p in booru.posts_for_tag(character.booru_tag))
        for kind, quota in demo._fault_quotas(character.posts, position).items():
            assert kinds[kind] == quota, (character.key, kind)
        assert 0.03 <= kinds[demo.WRONG_CHARACTER] / character.posts <= 0.08
        assert kinds[demo.NORMAL] >= character.posts // 2
    everything = Counter(t.kind for t in booru.truth.values())
    assert everything[demo.CORRUPT] == 1 and everything[demo.HIDDEN] == 1
    assert everything[demo.TRANSPARENT] >= 1 and everything[demo.NO_HUMANS] == demo.ASHTRAY_POSTS


def test_faulty_posts_look_like_their_fault(booru: DemoBooru) -> None:
    def image_of(post: dict) -> Image.Image:
        return _decode(booru.file(f"{post['md5']}.{post['file_ext']}")[0])

    for post in _posts_of_kind(booru, demo.WRONG_CHARACTER):
        truth = booru.truth[post["id"]]
        assert not truth.shows_tagged_character and len(truth.characters) == 1
        drawn = next(c for c in DEMO_CHARACTERS if c.key == truth.characters[0])
        assert drawn.hair in post["tag_string_general"].split()  # tags describe what is drawn
    for post in _posts_of_kind(booru, demo.MULTI_PERSON):
        truth = booru.truth[post["id"]]
        assert truth.shows_tagged_character and len(truth.figures) in (2, 3)
        general = set(post["tag_string_general"].split())
        assert "solo" not in general and general & {"multiple_girls", "1boy", "2girls"}
        boxes = sorted(figure.box for figure in truth.figures)
        assert all(left[2] < right[0] for left, right in zip(boxes, boxes[1:]))  # gaps between
    for post in _posts_of_kind(booru, demo.MONOCHROME):
        assert image_of(post).mode == "L" and "monochrome" in post["tag_string_general"].split()
        assert not set(post["tag_string_general"].split()) & set(HAIR_COLOURS)
    for post in _posts_of_kind(booru, demo.SMALL):
        assert max(post["image_width"], post["image_height"]) <= 160
        assert "lowres" in post["tag_string_meta"]
    for post in _posts_of_kind(booru, demo.TRANSPARENT):
        image = image_of(post)
        assert image.mode == "RGBA" and image.getpixel((0, 0)) == (0, 0, 0, 0)
    for post in _posts_of_kind(booru, demo.NORMAL):
        assert 512 <= post["image_width"] <= 768 and 512 <= post["image_height"] <= 768
        assert "solo" in post["tag_string_general"].split()
    by_id = {p["id"]: p for p in booru.posts}
    for kind in demo.DERIVED_KINDS:
        for post in _posts_of_kind(booru, kind):
            source = by_id[booru.truth[post["id"]].duplicate_of]
            assert source["id"] < post["id"]
            assert source["tag_string_character"] == post["tag_string_character"]
            if kind == demo.EXACT_DUPLICATE:
                assert post["md5"] == source["md5"]
                continue
            assert post["md5"] != source["md5"]
            original, copy = image_of(source).convert("RGB"), image_of(post).convert("RGB")
            resized = kind == demo.NEAR_DUPLICATE_RESIZED
            assert (copy.size != original.size) == resized
            difference = np.abs(
                np.asarray(copy.resize(original.size), dtype=float) - np.asarray(original, dtype=float)
            )
            assert difference.mean() < 8, (kind, post["id"])


def test_drawn_pictures_use_only_palette_colours_and_big_eyes() -> None:
    rng = random.Random(3)
    for character in DEMO_CHARACTERS + demo.UNRELATED_CHARACTERS:
        for outfit_index in range(len(character.outfits)):
            background = rng.choice(sorted(BACKGROUNDS))
            drawn = draw_post([(character, outfit_index)], (rng.randint(512, 768), 640), rng, background)
            pixels = np.asarray(drawn.image)
            colours = {tuple(int(v) for v in c) for c in np.unique(pixels.reshape(-1, 3), axis=0)}
            assert colours <= ALLOWED_COLOURS, colours - ALLOWED_COLOURS
            expected = {HAIR_COLOURS[character.hair], EYE_COLOURS[character.eyes], SKIN}
            drawn_tags = (*character.features, *character.outfits[outfit_index])
            expected |= {TAG_COLOURS[tag] for tag in drawn_tags}
            assert expected <= colours, character.key
            (figure,) = drawn.figures
            left, top, right, bottom = figure.head_box
            assert 0.18 <= (bottom - top) / (figure.box[3] - figure.box[1]) <= 0.3
            head = pixels[top:bottom, left:right]
            eye_columns = (head == EYE_COLOURS[character.eyes]).all(axis=-1).any(axis=0)
            # Two eyes, each at least 6% of the head wide.
            assert eye_columns.sum() >= 2 * 0.06 * (right - left)
    figures = [(c, 0) for c in DEMO_CHARACTERS[:3]]
    first = draw_post(figures, (768, 560), random.Random(9))
    again = draw_post(figures, (768, 560), random.Random(9))
    assert first.image.tobytes() == again.image.tobytes() and first.figures == again.figures
    for figure in first.figures:
        left, top, right, bottom = figure.box
        assert 0 <= left < right <= 768 and 0 <= top < bottom <= 560


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(mask)
    return int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1


def test_truth_boxes_are_exactly_the_drawn_pixels() -> None:
    rng = random.Random(5)
    for character in DEMO_CHARACTERS + demo.UNRELATED_CHARACTERS:
        for outfit_index in range(len(character.outfits)):
            drawn = draw_post([(character, outfit_index)], (600, 640), rng)
            figure_pixels = (np.asarray(drawn.image) != BACKGROUNDS["white_background"]).any(axis=-1)
            (figure,) = drawn.figures
            assert figure.box == _box_of(figure_pixels)
            assert figure.half_body_box == _box_of(figure_pixels[: figure.half_body_box[3]])
            assert figure.head_box == _box_of(figure_pixels[: figure.head_box[3]])
            top, height = figure.box[1], figure.box[3] - figure.box[1]
            assert 0.55 <= (figure.half_body_box[3] - top) / height <= 0.6  # cut at the hips
            # Twice as tall as wide at least: the half-body detector relies on it.
            assert figure.box[2] - figure.box[0] < height / 2


def test_random_poses_stay_within_what_the_tiny_models_handle() -> None:
    rng = random.Random(0)
    for _ in range(200):
        pose = random_pose(rng)
        for side in (-1, 1):
            _, elbow, hand = pose.arm(side)
            assert elbow[1] > SHOULDER_Y and hand[1] > SHOULDER_Y  # arms point down, below the head
        for character in DEMO_CHARACTERS + demo.UNRELATED_CHARACTERS:
            for outfit in character.outfits:
                # Full figures are over twice as tall as wide (they are ~97 units tall).
                assert width_ratio(figure_shapes(character, outfit, pose)) < 0.47


def test_solo_figures_of_one_outfit_are_not_near_duplicates(booru: DemoBooru) -> None:
    """Every post poses its figure differently, as real posts do, so the cleaning
    chain's person-level near-duplicate removal keeps them apart."""
    for character in DEMO_CHARACTERS:
        hashes_by_outfit: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for post in booru.posts_for_tag(character.booru_tag):
            truth = booru.truth[post["id"]]
            if truth.kind != demo.NORMAL:
                continue
            (figure,) = truth.figures
            image = _decode(booru.file(f"{post['md5']}.{post['file_ext']}")[0]).convert("RGB")
            hashes_by_outfit[figure.outfit].append(perceptual_hash(image.crop(figure.box)))
        for outfit, hashes in hashes_by_outfit.items():
            assert len(hashes) >= 5, (character.key, outfit)
            distances = pairwise_hamming(hashes, hashes)[np.triu_indices(len(hashes), k=1)]
            apart = (distances > DEFAULT_MAX_DISTANCE).mean()
            assert apart >= 0.95, (character.key, outfit, apart)


def test_server_logs_requests_and_injects_faults(booru: DemoBooru) -> None:
    with DemoBooruServer(booru) as server:
        server.inject_fault("/posts.json", 429, count=1, headers={"Retry-After": "2"})
        refused = _get(server, "/posts.json", tags="lumi")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"
        assert _get(server, "/posts.json", tags="lumi").status_code == 200
        assert _get(server, "/tags.json").status_code == 200
        paths = [path.split("?")[0] for _, path in server.requests]
        assert paths == ["/posts.json", "/posts.json", "/tags.json"]
        times = [t for t, _ in server.requests]
        assert times == sorted(times)
        url = server.url
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/tags.json", timeout=2)
    with pytest.raises(RuntimeError, match="start"):
        _ = server.url
