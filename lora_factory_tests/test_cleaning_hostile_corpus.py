"""A corpus of broken and hostile files, built here, through `decode_image` and the chain.

Each file is either quarantined with the reason that names its fault, or decoded into
the picture a person would see (CMYK, 16-bit, palette with transparency on white, EXIF
rotation applied, the first frame of an animation). Run through `clean_character`
together with a few good demo posts, the partition must not crash, every post must end
up with crops, a drop or a quarantine row, and no stored blob may change or vanish.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_factory.cleaning.decode import DecodedImage, Quarantined, decode_image
from lora_factory.cleaning.pipeline import CleaningConfig, clean_character
from lora_factory.demo import booru as demo
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
from lora_factory.storage import BlobStore, sha256_bytes
from lora_factory.vision.models import VisionModels

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
SIZE = (160, 200)  # width, height: above the chain's 128 px minimum side


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def noise(width: int, height: int) -> Image.Image:
    """Incompressible pixels, so cutting the file in half really loses picture data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with ~1 KB of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + png_chunk(b"IEND", b"")
    )


def two_frames(fmt: str, **params) -> bytes:
    first, second = Image.new("RGB", SIZE, RED), Image.new("RGB", SIZE, BLUE)
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, **params)


def palette_with_transparency() -> bytes:
    """Left half index 1 (blue), right half index 0, which is the transparent entry."""
    image = Image.new("P", SIZE, 0)
    image.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    image.paste(1, (0, 0, SIZE[0] // 2, SIZE[1]))
    return encode(image, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    """Stored landscape 320x160, left half blue; EXIF orientation 6 = turn 90° clockwise."""
    image = Image.new("RGB", (320, 160), RED)
    image.paste(BLUE, (0, 0, 160, 160))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif, quality=95)


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@dataclass(frozen=True)
class Case:
    name: str
    file_ext: str  # the extension the site claims
    data: bytes
    reason: str | None  # the quarantine reason, or None when it must decode
    check: Callable[[DecodedImage], None] | None = None


def check_cmyk(result: DecodedImage) -> None:
    assert result.source_format == "JPEG" and "cmyk" in result.notes
    assert close(result.image.getpixel((10, 10)), RED)  # C=0 M=255 Y=255 K=0 is red


def check_16_bit(result: DecodedImage) -> None:
    assert "high_bit_depth" in result.notes
    # 40000 of 65535 scales to 156 of 255 (PIL alone would clip it to 255: white).
    assert result.image.getpixel((10, 10)) == (156, 156, 156)


def check_palette_alpha(result: DecodedImage) -> None:
    assert "alpha_on_white" in result.notes
    assert result.image.getpixel((10, 10)) == BLUE
    assert result.image.getpixel((SIZE[0] - 10, 10)) == WHITE  # transparent -> white, not red


def check_first_frame(result: DecodedImage) -> None:
    assert "animated_first_frame" in result.notes and result.size == SIZE
    assert close(result.image.getpixel((10, 10)), RED)


def check_exif(result: DecodedImage) -> None:
    assert "exif_rotated" in result.notes
    assert result.source_size == (320, 160) and result.size == (160, 320)
    assert close(result.image.getpixel((80, 40)), BLUE)  # the stored left half is now on top
    assert close(result.image.getpixel((80, 280)), RED)


def check_png_named_jpg(result: DecodedImage) -> None:
    assert result.source_format == "PNG" and result.size == SIZE  # sniffed, name ignored


def build_corpus() -> list[Case]:
    png = encode(noise(*SIZE), "PNG")
    jpeg = encode(noise(*SIZE), "JPEG", quality=95)
    sixteen_bit = Image.fromarray(np.full((SIZE[1], SIZE[0]), 40_000, dtype=np.uint16))
    return [
        Case("truncated_png", "png", png[: len(png) // 2], "truncated"),
        Case("truncated_jpeg", "jpg", jpeg[: len(jpeg) // 2], "truncated"),
        Case("zero_bytes", "jpg", b"", "empty"),
        Case("decompression_bomb", "png", bomb_png(), "too_many_pixels"),
        Case("html_error_page", "jpg",
             b"\n<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>", "html"),
        Case("random_bytes", "png", bytes(range(256)) * 8, "not_an_image"),
        Case("cmyk_jpeg", "jpg", encode(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG", quality=95),
             None, check_cmyk),
        Case("png_16_bit", "png", encode(sixteen_bit, "PNG"), None, check_16_bit),
        Case("palette_transparency", "png", palette_with_transparency(), None, check_palette_alpha),
        Case("animated_gif", "gif", two_frames("GIF", loop=0), None, check_first_frame),
        Case("animated_webp", "webp", two_frames("WEBP", lossless=True), None, check_first_frame),
        Case("exif_rotated_jpeg", "jpg", exif_rotated_jpeg(), None, check_exif),
        Case("png_named_jpg", "jpg", encode(noise(*SIZE), "PNG"), None, check_png_named_jpg),
    ]


CORPUS = build_corpus()


def test_the_corpus_is_what_it_claims():
    by_name = {case.name: case for case in CORPUS}
    assert len(by_name["decompression_bomb"].data) < 2_000
    assert by_name["png_named_jpg"].data.startswith(b"\x89PNG") and by_name["png_named_jpg"].file_ext == "jpg"
    assert Image.open(io.BytesIO(by_name["animated_webp"].data)).n_frames == 2
    assert Image.open(io.BytesIO(by_name["animated_gif"].data)).n_frames == 2
    assert Image.open(io.BytesIO(by_name["png_16_bit"].data)).mode.startswith("I")


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_decode_image_quarantines_or_repairs_each_file(case: Case):
    result = decode_image(case.data)
    if case.reason is not None:
        assert isinstance(result, Quarantined), result
        assert result.reason == case.reason, result
        assert result.detail
    else:
        assert isinstance(result, DecodedImage), result
        assert result.image.mode == "RGB"
        case.check(result)


def test_bomb_is_refused_below_pils_own_limit():
    # 7000x7000 = 49 MP passes PIL's bomb guard but not our 40 MP ceiling: ours refuses it.
    result = decode_image(bomb_png(7_000, 7_000))
    assert isinstance(result, Quarantined) and result.reason == "too_many_pixels"
    assert "40000000" in result.detail


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> VisionModels:
    return VisionModels.load(tiny_registry(tmp_path_factory.mktemp("models")), names=TINY_MODELS)


@pytest.fixture(scope="module")
def chain_run(models, tmp_path_factory):
    """The corpus plus four good demo posts of one character, through the whole chain."""
    blobs = BlobStore(tmp_path_factory.mktemp("store") / "blobs")
    character = DEMO_CHARACTERS[0]
    booru = demo.DemoBooru(seed=0)
    rows = []
    good = [p for p in booru.posts_for_tag(character.booru_tag)
            if "md5" in p and booru.truth[p["id"]].kind == demo.NORMAL][:4]
    for post in good:
        data, _ = booru.file(f"{post['md5']}.{post['file_ext']}")
        rows.append({"sha256": blobs.put(data), "site": "demo", "post_id": post["id"],
                     "file_ext": post["file_ext"], "case": "good"})
    for number, case in enumerate(CORPUS, start=1):
        rows.append({"sha256": blobs.put(case.data), "site": "hostile", "post_id": number,
                     "file_ext": case.file_ext, "case": case.name})
    posts = pd.DataFrame(rows)
    stored_before = {sha: blobs.get(sha) for sha in posts["sha256"]}
    result = clean_character(character.key, posts, blobs, models, CleaningConfig(), log=lambda _: None)
    return posts, blobs, stored_before, result


def test_chain_quarantines_each_hostile_file_with_its_reason(chain_run):
    posts, _, _, result = chain_run
    case_of = dict(zip(zip(posts["site"], posts["post_id"]), posts["case"]))
    quarantined = {case_of[(row.site, row.post_id)]: row.reason for row in result.quarantine.itertuples()}
    expected = {case.name: case.reason for case in CORPUS if case.reason is not None}
    assert quarantined == expected
    for case in CORPUS:
        if case.reason is not None:
            assert result.counts[f"quarantined_{case.reason}"] >= 1


def post_keys(frame: pd.DataFrame) -> set[tuple[str, int]]:
    return set(zip(frame["site"], frame["post_id"]))


def test_chain_accounts_for_every_post_and_keeps_the_good_ones(chain_run):
    posts, _, _, result = chain_run
    assert post_keys(posts) == post_keys(result.crops) | post_keys(result.drops) | post_keys(result.quarantine)
    # The repaired files are judged by the filters like any picture, never quarantined.
    decodable = {case.name for case in CORPUS if case.reason is None}
    repaired = post_keys(posts[posts["case"].isin(decodable)])
    assert len(repaired) == len(decodable)
    assert not repaired & post_keys(result.quarantine)
    good = post_keys(posts[posts["case"] == "good"])
    assert good & post_keys(result.crops), "the good demo posts must still give crops"


def test_chain_loses_nothing_stored(chain_run):
    _, blobs, stored_before, result = chain_run
    for sha, data in stored_before.items():
        assert blobs.has(sha) and blobs.get(sha) == data and sha256_bytes(data) == sha
    for sha in result.crops["crop_sha256"]:
        assert blobs.has(sha)
        assert Image.open(io.BytesIO(blobs.get(sha))).mode == "RGB"
