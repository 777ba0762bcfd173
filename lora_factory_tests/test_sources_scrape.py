"""scrape_character and candidate_tags against a loopback Danbooru-API site."""

from __future__ import annotations

import pandas as pd
import pytest
from sources_loopback import FakeDanbooru, LoopbackSite, Reply, SeenRequest, image_bytes

from lora_factory.sources.danbooru import DanbooruClient, SiteTag
from lora_factory.sources.http import PoliteHttpClient
from lora_factory.sources.scrape import (
    CAUGHT_UP,
    MANIFEST_SCHEMA,
    candidate_tags,
    candidates_frame,
    scrape_character,
    tag_search_pattern,
)
from lora_factory.storage import BlobStore, read_table

EK, PT = "ash_(ember_knights)", "ash_(pocket_tamers)"


def http(**overrides) -> PoliteHttpClient:
    settings = dict(requests_per_second=200.0, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=2.0)
    return PoliteHttpClient(**{**settings, **overrides})


def ash_booru() -> FakeDanbooru:
    booru = FakeDanbooru()
    for post_id in range(1, 8):
        booru.add_post(post_id, EK, "ember_knights")
    for post_id in range(20, 25):
        booru.add_post(post_id, PT, "pocket_tamers")
    # The same picture uploaded twice, and one post tagged with both Ashes (a crossover).
    booru.add_post(8, EK, "ember_knights", data=image_bytes(800))
    booru.add_post(9, EK, "ember_knights", data=image_bytes(800))  # the same picture reposted
    crossover = booru.add_post(30, EK, "ember_knights pocket_tamers", data=image_bytes(3000))
    crossover["tag_string"] += f" {PT}"
    booru.add_post(10, EK, "ember_knights", data=image_bytes(1000, size=(40, 40)))  # over the download cap
    booru.add_post(11, EK, "ember_knights", file_url=None)  # hidden
    return booru


def run(site: LoopbackSite, tmp_path, **overrides):
    client = DanbooruClient("testbooru", site.base_url, http(max_download_bytes=3000), page_limit=4)
    arguments = dict(
        character_key="ash_ember_knights",
        candidate_tags_by_site={"testbooru": [EK, PT, EK]},
        clients={"testbooru": client},
        blobs=BlobStore(tmp_path / "blobs"),
        manifest_path=tmp_path / "raw_scrape.parquet",
        log=lambda line: None,
    )
    return scrape_character(**{**arguments, **overrides})


def data_hits(site: LoopbackSite) -> list[SeenRequest]:
    return [r for r in site.requests if r.path.startswith("/data/")]


def test_scrape_downloads_once_records_failures_and_rescrapes_nothing(tmp_path):
    booru = ash_booru()
    oversize_file = next(p["file_url"] for p in booru.posts if p["id"] == 10)
    with LoopbackSite(booru.routes()) as site:
        first = run(site, tmp_path)
        manifest = first.manifest  # read before the next run replaces the file
        first_downloads = len(data_hits(site))
        second = run(site, tmp_path)
        again = [r.path for r in data_hits(site)][first_downloads:]
    assert again == [oversize_file]  # only the refused file is tried again

    assert list(manifest.columns) == MANIFEST_SCHEMA.names
    assert not manifest.duplicated(["site", "post_id", "candidate_tag"]).any()
    # Under EK: posts 1-7, the repost pair, the crossover, the oversize one; under PT: 5 + crossover.
    assert len(manifest) == 11 + 6
    ek = manifest[manifest["candidate_tag"] == EK]
    assert sorted(ek["post_id"].astype(int)) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 30]
    failed = manifest[manifest["error"].notna()]
    assert list(failed["post_id"]) == ["10"] and failed["sha256"].isna().all()
    assert "refused" in failed["error"].iloc[0]
    reposts = manifest[manifest["post_id"].isin(["8", "9"])]
    assert reposts["sha256"].nunique() == 1  # same bytes, one blob

    counts = first.counts
    assert (counts.posts, counts.new_posts, counts.failed, counts.hidden_skipped) == (17, 14, 1, 1)
    # Reused: the repost (same md5 as one already downloaded) and the crossover listed again under PT.
    assert counts.reused_posts == 2
    store = BlobStore(tmp_path / "blobs")
    distinct = manifest["sha256"].dropna().unique()
    assert len(distinct) == 14 and len([b for b in store.root.rglob("*") if b.is_file()]) == 14
    assert counts.downloaded_bytes == sum(len(store.get(sha)) for sha in distinct)
    per_tag = first.per_tag.set_index("candidate_tag")
    assert list(per_tag.index) == [EK, PT]  # the repeated candidate tag is scraped once
    assert per_tag.loc[EK, "posts"] == 11 and per_tag.loc[PT, "posts"] == 6
    assert first.per_site.loc[0, "posts"] == 17

    # Second run: the refused file is tried again, nothing else is downloaded, and each walk
    # stops at its first page of stored posts (once the failed post was retried).
    assert second.counts.new_posts == 0 and second.counts.failed == 1
    assert second.counts.reused_posts == second.counts.posts - 1 and second.counts.downloaded_bytes == 0
    assert set(second.per_tag["stop_reason"]) == {CAUGHT_UP}
    assert second.per_tag["pages"].sum() < first.per_tag["pages"].sum()
    key = ["site", "post_id", "candidate_tag"]
    pd.testing.assert_frame_equal(  # downloaded_at kept too; rows written again may move
        second.manifest.sort_values(key, ignore_index=True), manifest.sort_values(key, ignore_index=True)
    )
    assert read_table(tmp_path / "raw_scrape.parquet").shape == manifest.shape


def test_interrupted_scrape_resumes_from_the_last_written_page(tmp_path):
    booru = FakeDanbooru()
    for post_id in range(1, 11):
        booru.add_post(post_id, EK, "ember_knights")
    broken = {"on": True}

    def listing(request: SeenRequest) -> Reply:
        if broken["on"] and request.query.get("page"):
            return Reply(503)  # the site dies after the first page
        return booru.list_posts(request)

    with LoopbackSite({**booru.routes(), "/posts.json": listing}) as site:
        flaky = DanbooruClient("testbooru", site.base_url, http(max_retries=1), page_limit=4)
        partial = run(site, tmp_path, candidate_tags_by_site={"testbooru": [EK]}, clients={"testbooru": flaky})
        assert len(partial.manifest) == 4
        assert [(e.site, e.phase) for e in partial.site_errors] == [("testbooru", "listing")]
        assert "HTTP 503" in partial.per_tag.loc[0, "listing_error"]
        assert len(read_table(tmp_path / "raw_scrape.parquet")) == 4  # written after the page
        first_files = {r.path for r in data_hits(site)}

        broken["on"] = False
        resumed = run(site, tmp_path, candidate_tags_by_site={"testbooru": [EK]})
        second_files = [r.path for r in data_hits(site)][len(first_files):]
    assert resumed.counts.reused_posts == 4 and resumed.counts.new_posts == 6
    assert len(second_files) == 6 and not first_files & set(second_files)
    assert len(resumed.manifest) == 10 and resumed.site_errors == []


def test_scrape_fails_loudly_when_no_site_can_be_listed(tmp_path):
    with LoopbackSite({"/posts.json": lambda r: Reply(500)}) as site:
        client = DanbooruClient("testbooru", site.base_url, http(max_retries=1))
        with pytest.raises(RuntimeError, match=r"(?s)no site produced a post:\n- testbooru \(listing\).*HTTP 500"):
            run(site, tmp_path, clients={"testbooru": client})


def test_md5_mismatch_is_recorded_not_stored(tmp_path):
    booru = ash_booru()
    booru.posts[0]["md5"] = "0" * 32  # post 30 now claims another file than it serves
    with LoopbackSite(booru.routes()) as site:
        result = run(site, tmp_path, candidate_tags_by_site={"testbooru": [EK]})
    row = result.manifest.set_index("post_id").loc["30"]
    assert "md5 mismatch" in row["error"] and pd.isna(row["sha256"])


def test_unknown_site_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no client configured for site"):
        scrape_character("k", {"gelbooru": ["ash"]}, {}, BlobStore(tmp_path), tmp_path / "m.parquet")


def test_tag_search_pattern_normalises_names():
    assert tag_search_pattern("Ash") == "ash*"
    assert tag_search_pattern("  Ash  Ketchum ") == "ash_ketchum*"
    assert tag_search_pattern("Ｌｕｍｉ") == "lumi*"
    assert tag_search_pattern("  ") is None


def test_candidate_tags_searches_every_name_and_keeps_forced_tags():
    booru = FakeDanbooru(tags=[
        {"id": 1, "name": "ash_(pocket_tamers)", "post_count": 30, "category": 4},
        {"id": 2, "name": EK, "post_count": 34, "category": 4},
        {"id": 3, "name": "ashley_(ember_knights)", "post_count": 3, "category": 4},
        {"id": 4, "name": "ash_(artist)", "post_count": 80, "category": 1},
        {"id": 5, "name": "emberknight_ash", "post_count": 2, "category": 4},
    ])
    with LoopbackSite(booru.routes()) as site:
        client = DanbooruClient("testbooru", site.base_url, http())
        tags = candidate_tags(["Ash", "ASH", "Emberknight Ash"], client, forced_tags=["ash_(artist)", "not_on_site"],
                              franchise="ember_knights")
    assert [t.name for t in tags] == [
        "ash_(artist)", "not_on_site", EK, "ash_(pocket_tamers)", "ashley_(ember_knights)", "emberknight_ash",
    ]
    assert tags[0] == SiteTag("ash_(artist)", 80, 1) and tags[1] == SiteTag("not_on_site", 0, 4)
    patterns = [r.query["search[name_matches]"] for r in site.hits("/tags.json")]
    assert patterns == ["ash_(artist)", "not_on_site", "ash*", "ash*ember_knights*", "emberknight_ash*",
                        "emberknight_ash*ember_knights*"]
    frame = candidates_frame({"testbooru": tags})
    assert list(frame.columns) == ["site", "tag", "post_count", "category"] and len(frame) == 6
