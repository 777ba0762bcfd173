"""DanbooruClient against a loopback site speaking Danbooru's JSON API."""

from __future__ import annotations

import pytest
from sources_loopback import FakeDanbooru, LoopbackSite, SeenRequest, json_reply

from lora_factory.sources.base import MediaPolicy
from lora_factory.sources.danbooru import DanbooruClient, PagingStats, SiteTag
from lora_factory.sources.http import PoliteHttpClient, SiteError

TAG = "ash_(ember_knights)"


def http() -> PoliteHttpClient:
    return PoliteHttpClient(requests_per_second=200.0, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=2.0)


def catalogue(n: int, start_id: int = 100) -> FakeDanbooru:
    booru = FakeDanbooru()
    for post_id in range(start_id, start_id + n):
        booru.add_post(post_id, TAG, "ember_knights")
    booru.add_post(5000, "someone_else", "pocket_tamers")
    return booru


def test_iter_posts_pages_by_lowest_id_without_duplicates():
    booru = catalogue(23)
    with LoopbackSite(booru.routes()) as site:
        client = DanbooruClient("testbooru", site.base_url, http(), page_limit=10)
        stats = PagingStats()
        posts = list(client.iter_posts(TAG, max_posts=100, stats=stats))
    ids = [p.post_id for p in posts]
    assert ids == [str(i) for i in range(122, 99, -1)]
    pages = [r.query.get("page") for r in site.hits("/posts.json")]
    assert pages == [None, "b113", "b103", "b100"]  # the last page is empty: stop
    assert stats.pages == 4 and stats.posts == 23 and stats.stop_reason == "empty page"
    first = posts[0]
    assert first.site == "testbooru" and first.copyright_tags == ["ember_knights"] and TAG in first.tags
    assert first.file_url == f"{site.base_url}/data/{first.md5}.png"  # relative URL resolved
    assert first.variant == "original" and first.width == 800 and first.rating == "g"


def test_iter_posts_honours_max_posts_and_before_id():
    booru = catalogue(30)
    with LoopbackSite(booru.routes()) as site:
        client = DanbooruClient("testbooru", site.base_url, http(), page_limit=10)
        assert len(list(client.iter_posts(TAG, max_posts=15))) == 15
        older = [p.post_id for p in client.iter_posts(TAG, max_posts=100, cursor="b105")]
    assert older == ["104", "103", "102", "101", "100"]
    assert [r.query["limit"] for r in site.hits("/posts.json")][:2] == ["10", "5"]


def test_pagination_loop_stops_without_duplicates():
    booru = catalogue(10)

    def ignores_page_param(request: SeenRequest) -> object:
        return json_reply(booru.posts[1:6])  # the same page, whatever was asked

    with LoopbackSite({"/posts.json": ignores_page_param}) as site:
        stats = PagingStats()
        posts = list(DanbooruClient("loopy", site.base_url, http(), page_limit=5).iter_posts(TAG, 100, stats=stats))
    assert len(posts) == len({p.post_id for p in posts}) == 5
    assert len(site.hits("/posts.json")) == 2
    assert "pagination loop" in stats.stop_reason and stats.repeated == 5


def test_overlapping_pages_yield_each_post_once():
    booru = catalogue(12)

    def overlapping(request: SeenRequest) -> object:
        # Re-sends the 2 posts above the cursor, as a site does when posts are deleted mid-walk.
        page = request.query.get("page", "")
        cursor = int(page[1:]) + 3 if page else 10**9
        return json_reply([p for p in booru.posts if p["id"] < cursor and TAG in p["tag_string"]][:5])

    with LoopbackSite({"/posts.json": overlapping}) as site:
        posts = list(DanbooruClient("overlap", site.base_url, http(), page_limit=5).iter_posts(TAG, 100))
    ids = [int(p.post_id) for p in posts]
    assert sorted(ids, reverse=True) == ids and len(ids) == len(set(ids)) == 12


def test_hidden_posts_are_skipped_and_counted():
    booru = catalogue(4)
    booru.add_post(104, TAG, "ember_knights", file_url=None, md5=None)
    del booru.add_post(105, TAG, "ember_knights")["file_url"]
    with LoopbackSite(booru.routes()) as site:
        stats = PagingStats()
        posts = list(DanbooruClient("testbooru", site.base_url, http()).iter_posts(TAG, 100, stats=stats))
    assert [p.post_id for p in posts] == ["103", "102", "101", "100"]
    assert stats.hidden_skipped == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_width", "800", "field 'image_width' should be int but is a str"),
        ("md5", None, "field 'md5' should be str but is a NoneType"),
        ("tag_string_copyright", ..., "field 'tag_string_copyright' should be str but is missing"),
        ("file_size", True, "field 'file_size' should be int but is a bool"),
    ],
)
def test_malformed_post_is_a_clear_error_naming_site_and_field(field, value, message):
    booru = catalogue(2)
    if value is ...:
        del booru.posts[1][field]
    else:
        booru.posts[1][field] = value
    with LoopbackSite(booru.routes()) as site:
        with pytest.raises(SiteError, match=message) as raised:
            list(DanbooruClient("testbooru", site.base_url, http()).iter_posts(TAG, 10))
    assert raised.value.site == "testbooru" and f"post {booru.posts[1]['id']}" in raised.value.reason


def test_non_list_answer_is_a_clear_error():
    with LoopbackSite({"/posts.json": lambda r: json_reply({"success": False, "message": "x"})}) as site:
        with pytest.raises(SiteError, match="expected a JSON list, got dict"):
            list(DanbooruClient("testbooru", site.base_url, http()).iter_posts(TAG, 10))


def test_search_tags_sends_danbooru_params_and_parses_tags():
    booru = FakeDanbooru(tags=[
        {"id": 1, "name": "ash_(pocket_tamers)", "post_count": 30, "category": 4},
        {"id": 2, "name": "ash_(ember_knights)", "post_count": 34, "category": 4},
        {"id": 3, "name": "ash_tree", "post_count": 99, "category": 0},
    ])
    with LoopbackSite(booru.routes()) as site:
        client = DanbooruClient("testbooru", site.base_url, http())
        tags = client.search_tags("ash*")
        everything = client.search_tags("ash*", category=None, limit=2)
    assert tags == [SiteTag("ash_(ember_knights)", 34, 4), SiteTag("ash_(pocket_tamers)", 30, 4)]
    assert [t.name for t in everything] == ["ash_tree", "ash_(ember_knights)"]
    query = site.hits("/tags.json")[0].query
    assert query == {"search[name_matches]": "ash*", "search[order]": "count", "limit": "20", "search[category]": "4"}


def test_search_tags_rejects_wrong_typed_fields():
    bad = [{"id": 1, "name": "ash", "post_count": "many", "category": 4}]
    with LoopbackSite({"/tags.json": lambda r: json_reply(bad)}) as site:
        with pytest.raises(SiteError, match="tag 'ash': field 'post_count' should be int"):
            DanbooruClient("testbooru", site.base_url, http()).search_tags("ash*")


def test_credentials_travel_as_basic_auth_not_in_the_url():
    booru = catalogue(1)
    with LoopbackSite(booru.routes()) as site:
        client = DanbooruClient("testbooru", site.base_url, http(), login="alice", api_key="k3y")
        post = next(client.iter_posts(TAG, 1))
        client.download(post)
    listing, file = site.hits("/posts.json")[0], site.requests[-1]
    assert listing.headers["authorization"].startswith("Basic ") and "api_key" not in listing.query
    assert "authorization" not in file.headers
    assert "k3y" not in repr(client)


def test_sample_variant_is_chosen_only_when_it_is_big_enough():
    booru = FakeDanbooru()
    booru.add_post(1, TAG, image_width=4000, image_height=3000)  # sample 850x637
    booru.add_post(2, TAG, image_width=1700, image_height=800)  # sample 850x400: too small
    with LoopbackSite(booru.routes()) as site:
        variants = {
            min_side: {p.post_id: p.variant for p in
                       DanbooruClient("t", site.base_url, http(), media=MediaPolicy(min_side=min_side)).iter_posts(TAG, 10)}
            for min_side in (None, 512)
        }
    assert variants[None] == {"1": "original", "2": "original"}
    assert variants[512] == {"1": "sample", "2": "original"}


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="both login and api_key"):
        DanbooruClient("t", "http://127.0.0.1:1", http(), login="alice")
    with pytest.raises(ValueError, match="page_limit"):
        DanbooruClient("t", "http://127.0.0.1:1", http(), page_limit=500)
    with pytest.raises(ValueError, match="http"):
        DanbooruClient("t", "ftp://example.org", http())
