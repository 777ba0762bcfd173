"""find_and_scrape over several loopback sites where some fail: each site's tag search,
listing and downloads fail on their own, are recorded, and the other sites go on."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from site_fixtures import FakeDanbooruSite, FakeGelbooru, make_post
from sources_loopback import LoopbackSite, Reply, SeenRequest

from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.gelbooru import GelbooruClient
from lora_factory.sources.http import PoliteHttpClient
from lora_factory.sources.scrape import (
    DOWNLOADS,
    LISTING,
    TAG_SEARCH,
    candidates_path,
    find_and_scrape,
)
from lora_factory.storage import BlobStore, read_table

TAG = "ash_(ember_knights)"
HTML = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>challenge</body></html>"


def http() -> PoliteHttpClient:
    return PoliteHttpClient(requests_per_second=500.0, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=2.0,
                            max_retries=1)


def danbooru_fake(first_id: int) -> FakeDanbooruSite:
    return FakeDanbooruSite([make_post(i, TAG, "ember_knights") for i in range(first_id, first_id + 4)])


def html_page(_: SeenRequest) -> Reply:
    return Reply(body=HTML, headers={"Content-Type": "text/html; charset=utf-8"})


def malformed_json(_: SeenRequest) -> Reply:
    return Reply(body=b'[{"id": 1, "name": "ash_', headers={"Content-Type": "application/json"})


def gelbooru_answering_html_to_tag_search() -> dict:
    fake = FakeGelbooru([make_post(i, TAG, "ember_knights") for i in range(1001, 1004)])
    real = fake.routes()

    def dapi(request: SeenRequest) -> Reply:
        return html_page(request) if request.query.get("s") == "tag" else real["/index.php"](request)

    return {**real, "/index.php": dapi}


def sites() -> dict[str, dict]:
    """Routes of one healthy site, three whose tag search breaks, one whose listing and one whose files do."""
    return {
        "danbooru": danbooru_fake(1).routes(),
        "gelbooru": gelbooru_answering_html_to_tag_search(),
        "mirror_500": {**danbooru_fake(100).routes(), "/tags.json": lambda r: Reply(500)},
        "mirror_json": {**danbooru_fake(200).routes(), "/tags.json": malformed_json},
        "mirror_listing": {**danbooru_fake(300).routes(), "/posts.json": lambda r: Reply(503)},
        "mirror_files": {**danbooru_fake(400).routes(), "/files/": lambda r: Reply(404, b"gone")},
    }


def clients(servers: dict[str, LoopbackSite]) -> dict:
    made = {}
    for name, server in servers.items():
        if name == "gelbooru":
            made[name] = GelbooruClient(name, server.base_url, http(), "7", "key", page_limit=3)
        else:
            made[name] = DanbooruClient(name, server.base_url, http(), page_limit=3)
    return made


def scrape(tmp_path, routes: dict[str, dict], **overrides):
    with ExitStack() as stack:
        servers = {name: stack.enter_context(LoopbackSite(r)) for name, r in routes.items()}
        arguments = dict(character_key="ash", names=["Ash"], clients=clients(servers),
                         blobs=BlobStore(tmp_path / "blobs"), manifest_path=tmp_path / "raw_scrape.parquet",
                         franchise="ember_knights", log=lambda line: None)
        return find_and_scrape(**{**arguments, **overrides})


def test_failing_sites_are_skipped_and_recorded_while_the_others_are_scraped(tmp_path):
    result = scrape(tmp_path, sites())
    assert [(e.site, e.phase) for e in result.site_errors] == [
        ("gelbooru", TAG_SEARCH), ("mirror_500", TAG_SEARCH), ("mirror_json", TAG_SEARCH),
        ("mirror_listing", LISTING), ("mirror_files", DOWNLOADS),
    ]
    messages = {e.site: e.message for e in result.site_errors}
    assert "HTML page titled 'Just a moment...'" in messages["gelbooru"] and "api_key=***" in messages["gelbooru"]
    assert "HTTP 500" in messages["mirror_500"] and "malformed JSON" in messages["mirror_json"]
    assert f"tag {TAG}" in messages["mirror_listing"] and "HTTP 503" in messages["mirror_listing"]
    assert messages["mirror_files"].startswith("all 4 downloads failed; the first: HTTP 404")

    manifest = result.manifest
    stored = manifest[manifest["sha256"].notna()]
    assert sorted(stored["site"].unique()) == ["danbooru"] and len(stored) == 4
    assert (manifest.loc[manifest["site"] == "mirror_files", "error"].str.contains("HTTP 404")).all()
    assert result.counts.new_posts == 4 and result.counts.failed == 4

    candidates = result.candidates
    assert sorted(candidates["site"]) == ["danbooru", "mirror_files", "mirror_listing"]
    assert set(candidates["tag"]) == {TAG}
    assert read_table(candidates_path(tmp_path / "raw_scrape.parquet")).equals(candidates)
    assert sorted(result.per_tag["site"]) == ["danbooru", "mirror_files", "mirror_listing"]


def test_forced_tags_are_searched_per_site(tmp_path):
    result = scrape(tmp_path, {"danbooru": danbooru_fake(1).routes()}, names=["Nobody"],
                    site_tags={"danbooru": TAG, "elsewhere": "x"})
    assert result.candidates[["site", "tag"]].values.tolist() == [["danbooru", TAG]]
    assert result.counts.new_posts == 4 and result.site_errors == []


def test_scrape_fails_naming_every_site_only_when_no_site_produced_a_post(tmp_path):
    routes = sites()
    del routes["danbooru"]
    with pytest.raises(RuntimeError) as raised:
        scrape(tmp_path, routes)
    message = str(raised.value)
    assert message.startswith("ash: no site produced a post:\n")
    for line in ["- gelbooru (tag search): expected JSON but got an HTML page",
                 "- mirror_500 (tag search): gave up after 2 attempts",
                 "- mirror_json (tag search): malformed JSON",
                 f"- mirror_listing (listing): tag {TAG}: ",
                 "- mirror_files (downloads): all 4 downloads failed"]:
        assert line in message
    assert not candidates_path(tmp_path / "raw_scrape.parquet").exists()


def test_no_tag_on_any_site_says_how_to_fix_the_index(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)- danbooru: no character tag for any of the names.*site_tags"):
        scrape(tmp_path, {"danbooru": danbooru_fake(1).routes()}, names=["Nobody"])
