"""Wallhaven (wallhaven.cc/api/v1).

`/api/v1/search?q=<query>&categories=010&purity=...&sorting=date_added&page=<n>` answers
`{"data": [...], "meta": {"current_page", "last_page", ...}}`, 24 wallpapers a page; ids
are short letter strings, `path` is the full file and `dimension_x` / `dimension_y` its
size. Search results carry no tags: `/api/v1/w/<id>` does (with categories such as
"Characters"), one request per wallpaper. `q` is a keyword search; `id:<tag id>` finds
one tag exactly. An API key (`apikey`) is only needed for NSFW purity. There is no tag
search API: give the query in the index (`site_tags`). The API allows 45 requests a minute.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from lora_factory.sources.base import (
    CHARACTER_CATEGORY,
    ORIGINAL,
    Listing,
    MediaPolicy,
    PagedSiteClient,
    RawPage,
    SiteTag,
    Variant,
    check_http_url,
    extension_of,
)
from lora_factory.sources.http import PoliteHttpClient, url_with_params

# -- site facts ---------------------------------------------------------------------------
PAGE_SIZE = 24  # fixed by the API (an account setting can raise it to 64)
MAX_PAGE_SIZE = 64
ANIME_ONLY = "010"  # categories: general / anime / people
PURITY_WITHOUT_KEY = "110"  # sfw + sketchy; nsfw needs an API key
PURITY_WITH_KEY = "111"
RATINGS = {"sfw": "g", "sketchy": "q", "nsfw": "e"}
CHARACTER_TAG_CATEGORIES = frozenset({"Characters"})
COPYRIGHT_TAG_CATEGORIES = frozenset({"Anime & Manga", "Visual Novels", "Video Games"})


class WallhavenClient(PagedSiteClient):
    max_page_limit = MAX_PAGE_SIZE
    numbered_pages = True
    supports_tag_search = False

    def __init__(self, site: str, base_url: str, http: PoliteHttpClient, api_key: str | None = None,
                 media: MediaPolicy | None = None, page_limit: int = PAGE_SIZE):
        super().__init__(site, http, media, page_limit)
        check_http_url(site, "base_url", base_url)
        self.base_url = base_url.rstrip("/") + "/"
        self._key = {"apikey": api_key} if api_key else {}

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        return []  # Wallhaven has no tag search API

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        page = int(cursor) if cursor else 1
        params = {"q": tag, "categories": ANIME_ONLY, "purity": PURITY_WITH_KEY if self._key else PURITY_WITHOUT_KEY,
                  "sorting": "date_added", "order": "desc", "page": page, **self._key}
        url = url_with_params(urljoin(self.base_url, "api/v1/search"), params)
        data = self._object(self.http.get_json(url, site=self.site), "answer", url)
        meta = self._object(data.get("meta"), "field 'meta'", url)
        last_page = self._field(meta, "last_page", int, "meta", url)
        return RawPage(url, self._list(data.get("data"), "field 'data'", url),
                       str(page + 1) if page < last_page else None)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "wallpaper entry", url)
        post_id = self._id(row, "id", "wallpaper", url)
        ref = f"wallpaper {post_id}"
        path = self._field(row, "path", str, ref, url, optional=True)
        if not path:
            return [Listing(post_id, variants=[])]
        original = self._absolute(self.base_url, path, ref, url)
        width = self._field(row, "dimension_x", int, ref, url)
        height = self._field(row, "dimension_y", int, ref, url)
        detail_url = url_with_params(urljoin(self.base_url, f"api/v1/w/{post_id}"), self._key)
        detail = self._object(self._object(self.http.get_json(detail_url, site=self.site), "answer", detail_url)
                              .get("data"), f"{ref}: field 'data'", detail_url)
        tags: list[tuple[str, str]] = []
        for item in self._list(detail.get("tags", []), f"{ref}: field 'tags'", detail_url):
            item = self._object(item, f"{ref} tag", detail_url)
            name = self._field(item, "name", str, f"{ref} tag", detail_url).replace(" ", "_")
            tags.append((name, item.get("category") if isinstance(item.get("category"), str) else ""))
        return [Listing(
            post_id=post_id,
            variants=[Variant(ORIGINAL, original, width, height, extension_of(original))],
            width=width,
            height=height,
            file_size=self._field(row, "file_size", int, ref, url, optional=True),
            rating=RATINGS.get(row.get("purity"), ""),
            tags=[name for name, _ in tags],
            character_tags=[name for name, category in tags if category in CHARACTER_TAG_CATEGORIES],
            copyright_tags=[name for name, category in tags if category in COPYRIGHT_TAG_CATEGORIES],
        )]
