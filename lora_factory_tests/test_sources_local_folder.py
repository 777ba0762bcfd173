"""A local folder of images with tag sidecars, scraped like a site."""

from __future__ import annotations

import json

import pytest
from sources_loopback import image_bytes

from lora_factory.sources.base import (
    CHARACTER_CATEGORY,
    UNKNOWN_CATEGORY,
    MediaPolicy,
    SiteTag,
)
from lora_factory.sources.http import DownloadRefused, SiteError
from lora_factory.sources.local_folder import LocalFolderClient
from lora_factory.sources.scrape import scrape_character
from lora_factory.storage import BlobStore

TAG = "ash_(ember_knights)"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pictures"
    (root / "sub").mkdir(parents=True)
    (root / ".trash").mkdir()
    files = {
        "a.png": image_bytes(1), "b.jpg": image_bytes(2, fmt="JPEG"), "c.png": image_bytes(3),
        "sub/d.png": image_bytes(4, (20, 20)), ".trash/e.png": image_bytes(5),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "a.txt").write_text(f"{TAG}, long hair, blue eyes\n")
    (root / "b.json").write_text(json.dumps({"tags": {"1girl": 0.98, TAG: 0.9}, "character_tags": [TAG],
                                             "copyright_tags": ["ember_knights"], "rating": "s"}))
    (root / "sub/d.png.txt").write_text(f"1girl {TAG} solo")
    (root / ".trash/e.txt").write_text(TAG)  # hidden folder: ignored
    outside = tmp_path / "outside.png"
    outside.write_bytes(image_bytes(6))
    (tmp_path / "outside.txt").write_text(TAG)
    (root / "link.png").symlink_to(outside)  # leads out of the folder: ignored
    (root / "link.txt").write_text(TAG)
    return root, files


def test_lists_tagged_images_with_their_sidecar_tags(folder):
    root, files = folder
    client = LocalFolderClient("my_pictures", root, page_limit=2)
    pages = list(client.iter_pages(TAG, 10))
    posts = [p for page in pages for p in page]
    assert [p.post_id for p in posts] == ["a.png", "b.jpg", "sub/d.png"] and len(pages) == 2
    a, b, d = posts
    assert a.tags == [TAG, "long_hair", "blue_eyes"] and a.character_tags == []
    assert b.character_tags == [TAG] and b.copyright_tags == ["ember_knights"] and b.rating == "s"
    assert (d.width, d.height, d.file_size) == (20, 20, len(files["sub/d.png"]))
    assert [client.download(p) for p in posts] == [files["a.png"], files["b.jpg"], files["sub/d.png"]]


def test_tag_search_counts_sidecar_tags(folder):
    root, _ = folder
    client = LocalFolderClient("my_pictures", root)
    assert client.search_tags("ash*") == [SiteTag(TAG, 3, CHARACTER_CATEGORY)]
    assert client.search_tags("long*") == [SiteTag("long_hair", 1, UNKNOWN_CATEGORY)]  # unknown passes the filter


def test_scrapes_into_blobs_and_a_manifest(folder, tmp_path):
    root, files = folder
    client = LocalFolderClient("my_pictures", root, page_limit=1)
    result = scrape_character("ash", {"my_pictures": [TAG]}, {"my_pictures": client}, BlobStore(tmp_path / "blobs"),
                              tmp_path / "manifest.parquet", log=lambda line: None)
    assert result.counts.new_posts == 3 and result.manifest["error"].isna().all()
    # A file added later sorts last: a folder is not listed newest-first, so the re-run does
    # not stop at its first page of stored pictures and still finds it.
    (root / "zz_new.png").write_bytes(image_bytes(9))
    (root / "zz_new.txt").write_text(TAG)
    again = scrape_character("ash", {"my_pictures": [TAG]}, {"my_pictures": client}, BlobStore(tmp_path / "blobs"),
                             tmp_path / "manifest.parquet", log=lambda line: None)
    assert again.counts.new_posts == 1 and again.counts.reused_posts == 3


def test_caps_and_broken_sidecars_are_clear(folder):
    root, _ = folder
    small_cap = LocalFolderClient("my_pictures", root, media=MediaPolicy(max_pixels=100), max_file_bytes=10**6)
    posts = list(small_cap.iter_posts(TAG, 10))
    assert [p.post_id for p in posts] == ["a.png", "b.jpg"]  # sub/d.png (20x20) is over 100 pixels
    tiny_files = LocalFolderClient("my_pictures", root, max_file_bytes=50)
    with pytest.raises(DownloadRefused, match="over the limit of 50 bytes"):
        tiny_files.download(posts[0])
    (root / "b.json").write_text("{not json")
    with pytest.raises(SiteError, match="sidecar is not valid JSON"):
        list(LocalFolderClient("my_pictures", root).iter_posts(TAG, 10))
    with pytest.raises(ValueError, match="does not exist"):
        LocalFolderClient("my_pictures", root / "missing")
