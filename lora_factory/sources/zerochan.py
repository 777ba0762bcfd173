"""Zerochan.

Any list page answers JSON when `json` is in its query: `/<Tag+Name>?json&p=<page>&l=<n>&s=id`
gives `{"items": [{id, width, height, md5, thumbnail, source, tag, tags}]}` with no paging
metadata (a short page is the last). The full-size file's URL is only in an entry's own
JSON, `/<id>?json` (`full`, `large`, `medium`, `small`, `hash`, `primary`, `tags`), so each
listed entry costs one more request. Tags are display names ("Hakurei Reimu") without
categories, and there is no tag search: give the tag in the index (`site_tags`).
The API page asks for a User-Agent naming the project and the Zerochan username, and
60 requests a minute at most.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus, urljoin

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
MAX_PAGE_LIMIT = 250  # `l` is 1..250


class ZerochanClient(PagedSiteClient):
    max_page_limit = MAX_PAGE_LIMIT
    numbered_pages = True
    supports_tag_search = False

    def __init__(self, site: str, base_url: str, http: PoliteHttpClient, media: MediaPolicy | None = None,
                 page_limit: int = 100):
        super().__init__(site, http, media, page_limit)
        check_http_url(site, "base_url", base_url)
        self.base_url = base_url.rstrip("/") + "/"

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        return []  # Zerochan has no tag search API

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        page = int(cursor) if cursor else 1
        url = url_with_params(urljoin(self.base_url, quote_plus(tag, safe="")),
                              {"json": "", "p": page, "l": limit, "s": "id"})
        data = self._object(self.http.get_json(url, site=self.site), "answer", url)
        items = self._list(data.get("items", []), "field 'items'", url)
        return RawPage(url, items, str(page + 1) if len(items) >= limit else None)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        item = self._object(entry, "entry", url)
        post_id = self._id(item, "id", "entry", url)
        ref = f"entry {post_id}"
        tags = [t for t in self._list(item.get("tags", []), f"{ref}: field 'tags'", url) if isinstance(t, str)]
        detail_url = url_with_params(urljoin(self.base_url, post_id), {"json": ""})
        detail = self._object(self.http.get_json(detail_url, site=self.site), f"{ref} detail", detail_url)
        full = self._field(detail, "full", str, ref, detail_url, optional=True)
        if not full:
            return [Listing(post_id, variants=[])]
        full_url = self._absolute(self.base_url, full, ref, detail_url)
        width = self._field(detail, "width", int, ref, detail_url)
        height = self._field(detail, "height", int, ref, detail_url)
        md5 = item.get("md5") or detail.get("hash") or ""
        ext = extension_of(full_url)
        return [Listing(
            post_id=post_id,
            variants=[Variant(ORIGINAL, full_url, width, height, ext)],
            md5=md5 if isinstance(md5, str) else "",
            width=width,
            height=height,
            file_size=self._field(detail, "size", int, ref, detail_url, optional=True),
            # The tags column is space-separated: display names get underscores there.
            tags=[t.replace(" ", "_") for t in tags],
        )]
