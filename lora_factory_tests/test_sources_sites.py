"""Every site family's client against a loopback fake speaking that site's API shapes."""

from __future__ import annotations

import base64

import pytest
from site_fixtures import (
    FAMILIES,
    FakeAnimePictures,
    FakeE621,
    FakeGelbooru,
    FakePixiv,
    FakeSankaku,
    Family,
    FixturePost,
    make_post,
)
from sources_loopback import LoopbackSite, json_reply

from lora_factory.sources.base import (
    CHARACTER_CATEGORY,
    UNKNOWN_CATEGORY,
    MediaPolicy,
    PagingStats,
)
from lora_factory.sources.e621 import E621Client
from lora_factory.sources.gelbooru import GelbooruClient
from lora_factory.sources.http import PoliteHttpClient, SiteError
from lora_factory.sources.pixiv import PixivClient
from lora_factory.sources.sankaku import SankakuClient

TAG = "ash_(ember_knights)"


def http(**overrides) -> PoliteHttpClient:
    settings = dict(requests_per_second=500.0, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=2.0)
    return PoliteHttpClient(**{**settings, **overrides})


def catalogue() -> list[FixturePost]:
    posts = [make_post(i, TAG, "ember_knights") for i in range(101, 113)]
    posts.append(make_post(113, TAG, "ember_knights", hidden=True))
    posts.append(make_post(120, "someone_else", "pocket_tamers"))
    return posts


def listed_ids(family: Family, posts: list[FixturePost]) -> list[str]:
    return [family.post_id(p) for p in sorted(posts, key=lambda p: -p.id) if TAG in p.tags and not p.hidden]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_lists_every_post_once_and_downloads_it(family: Family):
    posts = catalogue()
    fake = family.fake(posts, TAG)
    with LoopbackSite(fake.routes()) as site:
        client = family.client(site.base_url, http(), MediaPolicy())
        stats = PagingStats()
        listed = [post for page in client.iter_pages(TAG, 100, stats=stats) for post in page]
        by_id = {family.post_id(p): p for p in posts}
        first = listed[0]
        data = client.download(first)
    assert [p.post_id for p in listed] == listed_ids(family, posts)
    assert stats.hidden_skipped == 1 and stats.pages >= 3 and stats.exhausted, stats
    source = by_id[first.post_id]
    assert data == source.data
    assert first.site == client.site and TAG in first.tags and first.variant == "original"
    assert (first.width, first.height) == (source.width, source.height)
    assert first.md5 in ("", source.md5) and first.rating in ("", "g", "s")
    if family.categorised:
        assert first.character_tags == [TAG] and first.copyright_tags == ["ember_knights"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_tag_search(family: Family):
    fake = family.fake(catalogue(), TAG)
    with LoopbackSite(fake.routes()) as site:
        client = family.client(site.base_url, http(), MediaPolicy())
        found = client.search_tags(TAG + "*", category=CHARACTER_CATEGORY)
    if not client.supports_tag_search:
        assert found == []
    elif family.name == "anime_pictures":  # exact names, with spaces
        assert [(t.name, t.category) for t in found] == [("ash (ember knights)", CHARACTER_CATEGORY)]
    elif family.name == "pixiv":  # autocomplete: names only
        assert [(t.name, t.post_count, t.category) for t in found] == [(TAG, 0, UNKNOWN_CATEGORY)]
    else:
        assert [(t.name, t.post_count, t.category) for t in found] == [(TAG, 13, CHARACTER_CATEGORY)]


def test_gelbooru_sends_its_credentials_as_query_parameters_and_needs_them():
    fake = FakeGelbooru(catalogue())
    with LoopbackSite(fake.routes()) as site:
        next(GelbooruClient("gelbooru", site.base_url, http(), "7", "g-key").iter_pages(TAG, 5))
        with pytest.raises(SiteError, match="HTTP 401") as raised:
            next(GelbooruClient("gelbooru", site.base_url, http()).iter_pages(TAG, 5))
    query = site.hits("/index.php")[0].query
    assert query["api_key"] == "g-key" and query["user_id"] == "7" and query["json"] == "1"
    assert "g-key" not in str(raised.value)


def test_gelbooru_single_post_object_and_missing_post_key_are_understood():
    one = [make_post(5, TAG)]
    routes = {"/index.php": lambda r: json_reply({"@attributes": {"limit": 5, "offset": 0, "count": 1},
                                                  "post": FakeGelbooru(one).render(one[0])})}
    with LoopbackSite(routes) as site:
        posts = list(GelbooruClient("gelbooru", site.base_url, http(), "7", "k").iter_posts(TAG, 5))
    assert [p.post_id for p in posts] == ["5"]
    empty = {"/index.php": lambda r: json_reply({"@attributes": {"limit": 5, "offset": 0, "count": 0}})}
    with LoopbackSite(empty) as site:
        assert list(GelbooruClient("gelbooru", site.base_url, http(), "7", "k").iter_posts(TAG, 5)) == []


def test_e621_sends_basic_auth_and_reads_the_empty_tags_quirk():
    fake = FakeE621(catalogue())
    with LoopbackSite(fake.routes()) as site:
        client = E621Client("e621", site.base_url, http(), "alice", "e-key")
        assert client.search_tags("nobody*") == []
        next(client.iter_pages(TAG, 5))
    header = site.hits("/posts.json")[0].headers["authorization"]
    assert base64.b64decode(header.removeprefix("Basic ")) == b"alice:e-key"


def test_sankaku_logs_in_once_and_sends_the_bearer_token():
    fake = FakeSankaku(catalogue())
    with LoopbackSite(fake.routes()) as site:
        client = SankakuClient("sankaku", site.base_url, http(), "alice", "hunter2", page_limit=5)
        assert len(list(client.iter_posts(TAG, 100))) == 12
        with pytest.raises(SiteError, match="HTTP 401"):
            next(SankakuClient("sankaku", site.base_url, http(), "alice", "wrong").iter_pages(TAG, 5))
    logins = [r for r in site.hits("/auth/token") if b"hunter2" in r.body]
    assert len(logins) == 1 and logins[0].method == "POST"
    assert all(r.headers["authorization"] == f"Bearer {FakeSankaku.TOKEN}" for r in site.hits("/v2/posts/keyset"))


def test_pixiv_exchanges_the_refresh_token_splits_pages_and_sends_the_referer():
    work = make_post(300, TAG, "ember_knights")
    extra = [make_post(301, TAG), make_post(302, TAG)]  # pages 2 and 3 of work 300
    fake = FakePixiv([work], pages_of={300: extra})
    with LoopbackSite(fake.routes()) as site:
        client = PixivClient("pixiv", site.base_url, http(), FakePixiv.REFRESH_TOKEN, auth_url=site.base_url + "/auth/token")
        posts = list(client.iter_posts(TAG, 10))
        files = [client.download(p) for p in posts]
        with pytest.raises(SiteError, match="HTTP 400"):
            next(PixivClient("pixiv", site.base_url, http(), "stale", auth_url=site.base_url + "/auth/token")
                 .iter_pages(TAG, 5))
    assert [p.post_id for p in posts] == ["300_p0", "300_p1", "300_p2"]
    assert files == [work.data, extra[0].data, extra[1].data]
    assert (posts[0].width, posts[1].width) == (work.width, None)  # only the first page's size is given
    token_request = site.hits("/auth/token")[0]
    assert b"grant_type=refresh_token" in token_request.body and "x-client-hash" in token_request.headers
    assert all(r.headers.get("referer") == "https://app-api.pixiv.net/" for r in site.requests if r.path.startswith("/files/"))


def test_anime_pictures_needs_its_session_cookie_for_originals():
    fake = FakeAnimePictures(catalogue())
    with LoopbackSite(fake.routes()) as site:
        from lora_factory.sources.anime_pictures import AnimePicturesClient

        good = AnimePicturesClient("anime_pictures", site.base_url, http(), FakeAnimePictures.TOKEN, page_limit=5)
        post = next(good.iter_posts(TAG, 1))
        assert good.download(post) == next(p for p in catalogue() if str(p.id) == post.post_id).data
        bad = AnimePicturesClient("anime_pictures", site.base_url, http(), "expired", page_limit=5)
        with pytest.raises(SiteError, match="HTTP 403"):
            bad.download(post)
    with pytest.raises(ValueError, match="api_key"):
        AnimePicturesClient("anime_pictures", "https://api.anime-pictures.net", http(), "")
