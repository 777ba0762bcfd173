"""Scraping several sites: the same picture stored once, re-runs that fetch only what is new,
runs killed mid-page that resume cleanly, and credentials that never reach a manifest or a log."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from site_fixtures import FakeDanbooruSite, FakeGelbooru, make_post
from sources_loopback import LoopbackSite, Reply

from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.gelbooru import GelbooruClient
from lora_factory.sources.http import PoliteHttpClient
from lora_factory.sources.manifest_parts import ManifestParts, parts_dir
from lora_factory.sources.scrape import (
    CAUGHT_UP,
    MANIFEST_SCHEMA,
    scrape_character,
    walks_path,
)
from lora_factory.storage import BlobStore, read_table

TAG = "ash_(ember_knights)"
DANBOORU_KEY, GELBOORU_KEY = "danbooru-secret-key", "gelbooru-secret-key"


def http(**overrides) -> PoliteHttpClient:
    settings = dict(requests_per_second=500.0, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=2.0)
    return PoliteHttpClient(**{**settings, **overrides})


def two_sites():
    shared = make_post(50, TAG, "ember_knights")
    danbooru = FakeDanbooruSite([make_post(i, TAG, "ember_knights") for i in range(1, 7)] + [shared])
    gelbooru = FakeGelbooru([make_post(i, TAG, "ember_knights") for i in range(1001, 1004)]
                            + [make_post(5050, TAG, "ember_knights", data=shared.data)])
    return shared, danbooru, gelbooru


def scrape(tmp_path, danbooru_url, gelbooru_url, log=lambda line: None, **http_options):
    clients = {
        "danbooru": DanbooruClient("danbooru", danbooru_url, http(**http_options), "alice", DANBOORU_KEY, page_limit=3),
        "gelbooru": GelbooruClient("gelbooru", gelbooru_url, http(**http_options), "7", GELBOORU_KEY, page_limit=3),
    }
    return scrape_character("ash", {"danbooru": [TAG], "gelbooru": [TAG]}, clients, BlobStore(tmp_path / "blobs"),
                            tmp_path / "raw_scrape.parquet", log=log)


def file_hits(site: LoopbackSite) -> list[str]:
    return [r.path for r in site.requests if r.path.startswith("/files/")]


def blob_files(tmp_path) -> list:
    return [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]


def test_same_picture_on_two_sites_is_stored_once_with_both_posts_recorded(tmp_path):
    shared, danbooru, gelbooru = two_sites()
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(gelbooru.routes()) as g_site:
        result = scrape(tmp_path, d_site.base_url, g_site.base_url)
        gelbooru_files = file_hits(g_site)
    manifest = result.manifest
    both = manifest[manifest["md5"] == shared.md5]
    assert sorted(zip(both["site"], both["post_id"])) == [("danbooru", "50"), ("gelbooru", "5050")]
    assert both["sha256"].nunique() == 1 and both["error"].isna().all()
    assert f"/files/{shared.file_name}" not in gelbooru_files  # known by its md5: not downloaded twice
    assert len(manifest) == 11 and not manifest.duplicated(["site", "post_id", "candidate_tag"]).any()
    assert len(blob_files(tmp_path)) == manifest["sha256"].nunique() == 10
    assert result.counts.new_posts == 10 and result.counts.reused_posts == 1


def test_rerun_fetches_only_new_posts_and_stops_listing_where_the_last_run_began(tmp_path):
    _, danbooru, gelbooru = two_sites()
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(gelbooru.routes()) as g_site:
        first = scrape(tmp_path, d_site.base_url, g_site.base_url)
        first_rows = len(first.manifest)  # read before the next run replaces the file
        first_listings = len(d_site.hits("/posts.json"))
        newcomer = make_post(60, TAG, "ember_knights")
        danbooru.posts.insert(0, newcomer)
        danbooru.files[newcomer.file_name] = newcomer.data
        d_before, g_before = len(file_hits(d_site)), len(file_hits(g_site))
        second = scrape(tmp_path, d_site.base_url, g_site.base_url)
        downloads = file_hits(d_site)[d_before:] + file_hits(g_site)[g_before:]
        second_listings = len(d_site.hits("/posts.json")) - first_listings
    assert downloads == [f"/files/{newcomer.file_name}"] and second.counts.new_posts == 1
    assert first_listings == 4 and second_listings == 2  # the page with the newcomer, then one stored page
    assert set(second.per_tag["stop_reason"]) == {CAUGHT_UP}
    assert len(second.manifest) == first_rows + 1
    assert len(blob_files(tmp_path)) == second.manifest["sha256"].nunique()


def test_run_killed_mid_page_resumes_without_duplicates_or_half_files(tmp_path):
    _, danbooru, gelbooru = two_sites()
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(gelbooru.routes()) as g_site:
        fetches = {"n": 0}
        original_fetch = DanbooruClient.fetch

        def dying_fetch(self, post):
            fetches["n"] += 1
            if fetches["n"] == 5:  # the second post of the second page
                raise KeyboardInterrupt("killed")
            return original_fetch(self, post)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DanbooruClient, "fetch", dying_fetch)
            with pytest.raises(KeyboardInterrupt):
                scrape(tmp_path, d_site.base_url, g_site.base_url)
        partial = read_table(tmp_path / "raw_scrape.parquet")
        assert len(partial) == 3  # the page written before the kill
        assert not any(p.name.endswith(".tmp") or p.name.startswith(".") for p in blob_files(tmp_path))
        resumed = scrape(tmp_path, d_site.base_url, g_site.base_url)
    manifest = resumed.manifest
    assert len(manifest) == 11 and not manifest.duplicated(["site", "post_id", "candidate_tag"]).any()
    assert manifest["error"].isna().all() and manifest["sha256"].notna().all()
    assert resumed.counts.reused_posts == 3 + 1  # the first page, and the picture shared with gelbooru
    assert len(blob_files(tmp_path)) == manifest["sha256"].nunique() == 10


def test_credentials_never_reach_manifests_walk_state_or_logs(tmp_path, caplog):
    _, danbooru, gelbooru = two_sites()
    caplog.set_level(logging.DEBUG)
    lines: list[str] = []
    routes = gelbooru.routes()
    routes["/index.php"] = lambda r: Reply(503)  # listing fails: the error names the URL
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(routes) as g_site:
        result = scrape(tmp_path, d_site.base_url, g_site.base_url, log=lines.append, max_retries=1)
    (failure,) = result.site_errors
    assert failure.site == "gelbooru" and "user_id=***" in failure.message and "api_key=***" in failure.message
    stored = [
        read_table(tmp_path / "raw_scrape.parquet").astype(str).to_csv(),
        walks_path(tmp_path / "raw_scrape.parquet").read_text(),
        result.per_tag.astype(str).to_csv(),
        str(failure),
        "\n".join(lines),
        caplog.text,
    ]
    for text in stored:
        assert DANBOORU_KEY not in text and GELBOORU_KEY not in text


def test_run_killed_hard_leaves_page_parts_that_the_next_run_folds_in(tmp_path):
    """A kill that skips every cleanup (no final fold) loses no finished page."""
    _, danbooru, gelbooru = two_sites()
    manifest_path = tmp_path / "raw_scrape.parquet"
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(gelbooru.routes()) as g_site:
        fetches = {"n": 0}
        original_fetch = DanbooruClient.fetch

        def dying_fetch(self, post):
            fetches["n"] += 1
            if fetches["n"] == 5:
                raise KeyboardInterrupt("killed")
            return original_fetch(self, post)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DanbooruClient, "fetch", dying_fetch)
            patch.setattr(ManifestParts, "compact", lambda self: None)  # as if the process died at once
            with pytest.raises(KeyboardInterrupt):
                scrape(tmp_path, d_site.base_url, g_site.base_url)
        assert not manifest_path.exists() and len(list(parts_dir(manifest_path).glob("*.parquet"))) == 1
        first_page = file_hits(d_site)[:3]
        d_before = len(file_hits(d_site))
        resumed = scrape(tmp_path, d_site.base_url, g_site.base_url)
        assert not set(first_page) & set(file_hits(d_site)[d_before:])  # the folded page is not fetched again
    manifest = resumed.manifest
    assert not parts_dir(manifest_path).exists()
    assert len(manifest) == 11 and not manifest.duplicated(["site", "post_id", "candidate_tag"]).any()
    assert resumed.counts.reused_posts == 3 + 1
    assert manifest["sha256"].notna().all()


def test_result_refuses_to_read_a_manifest_a_later_run_replaced(tmp_path):
    _, danbooru, gelbooru = two_sites()
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(gelbooru.routes()) as g_site:
        first = scrape(tmp_path, d_site.base_url, g_site.base_url)
        scrape(tmp_path, d_site.base_url, g_site.base_url)
    with pytest.raises(RuntimeError, match="rewritten after this scrape"):
        _ = first.manifest


def test_folding_parts_keeps_the_latest_rows_of_each_key_and_is_repeatable(tmp_path):
    path = tmp_path / "m.parquet"
    parts = ManifestParts(path, MANIFEST_SCHEMA, ["site", "post_id", "candidate_tag"])
    row = {name: None for name in MANIFEST_SCHEMA.names}
    parts.append([{**row, "site": "a", "post_id": "1", "candidate_tag": "t", "error": "HTTP 503"},
                  {**row, "site": "a", "post_id": "2", "candidate_tag": "t", "sha256": "x"}])
    parts.compact()
    parts.append([{**row, "site": "a", "post_id": "1", "candidate_tag": "t", "sha256": "y"}])
    leftover = sorted(parts_dir(path).glob("*.parquet"))
    kept = leftover[0].read_bytes()
    parts.compact()
    folded = read_table(path).sort_values("post_id")
    assert folded[["post_id", "sha256"]].values.tolist() == [["1", "y"], ["2", "x"]]
    assert folded["error"].isna().all()
    parts_dir(path).mkdir()
    leftover[0].write_bytes(kept)  # killed after writing the manifest, before deleting the part
    parts.compact()
    pd.testing.assert_frame_equal(read_table(path).sort_values("post_id"), folded)


def test_damaged_and_missing_blobs_are_downloaded_again(tmp_path):
    _, danbooru, gelbooru = two_sites()
    with LoopbackSite(danbooru.routes()) as d_site, LoopbackSite(gelbooru.routes()) as g_site:
        first = scrape(tmp_path, d_site.base_url, g_site.base_url)
        rows = first.manifest.set_index(["site", "post_id"])
        blobs = BlobStore(tmp_path / "blobs")
        # The oldest posts: on the last page, below the pages a caught-up re-run would list.
        flipped, deleted = rows.loc[("danbooru", "1"), "sha256"], rows.loc[("gelbooru", "1001"), "sha256"]
        data = bytearray(blobs.path(flipped).read_bytes())
        data[len(data) // 2] ^= 0xFF
        blobs.path(flipped).write_bytes(bytes(data))
        blobs.path(deleted).unlink()
        d_before, g_before = len(file_hits(d_site)), len(file_hits(g_site))
        second = scrape(tmp_path, d_site.base_url, g_site.base_url)
        downloads = file_hits(d_site)[d_before:] + file_hits(g_site)[g_before:]
    by_id = {p.id: p for p in danbooru.posts + gelbooru.posts}
    assert sorted(downloads) == sorted(f"/files/{by_id[i].file_name}" for i in (1, 1001))
    assert (second.counts.repaired, second.counts.new_posts, second.counts.failed) == (2, 2, 0)
    assert second.per_site.set_index("site")["repaired"].to_dict() == {"danbooru": 1, "gelbooru": 1}
    manifest = second.manifest
    assert len(manifest) == 11 and manifest["error"].isna().all()
    assert set(manifest["sha256"]) == set(rows["sha256"])  # the same bytes again, under the same names
    assert all(blobs.verify(sha) for sha in manifest["sha256"])
    assert (tmp_path / "blobs" / "damaged" / flipped).is_file()  # set aside, not silently overwritten
