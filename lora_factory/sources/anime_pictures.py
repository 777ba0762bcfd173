"""Anime-Pictures (its own JSON API, api.anime-pictures.net/api/v3).

`/api/v3/posts?page=<n>&posts_per_page=<n>&search_tag=<tag>&order_by=date&lang=en` answers
`{"posts": [...], "posts_count", "page_number", "max_pages", ...}`, pages numbered from 0;
list entries carry id, md5, ext (with its dot), width, height, size and `erotics`, but no
tags: those, and the `file_url` download name, come from `/api/v3/posts/<id>`, one
request per post. Originals are served by `/pictures/get_image/<file_url>` to logged-in
users only (the `anime_pictures_jwt` session token, sent as that cookie). Tags use spaces
("hatsune miku"); `/api/v3/tags?tag=<name>` matches a name exactly, so tag search here
looks up the exact name of a pattern like "hatsune_miku*".
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import quote, urljoin

from lora_factory.sources.base import (
    ARTIST_CATEGORY,
    CHARACTER_CATEGORY,
    COPYRIGHT_CATEGORY,
    GENERAL_CATEGORY,
    ORIGINAL,
    UNKNOWN_CATEGORY,
    Listing,
    MediaPolicy,
    PagedSiteClient,
    RawPage,
    SitePost,
    SiteTag,
    Variant,
    check_http_url,
)
from lora_factory.sources.http import PoliteHttpClient, url_with_params

# -- site facts ---------------------------------------------------------------------------
MAX_PAGE_LIMIT = 100  # posts_per_page above 100 falls back to 60
RATINGS = {0: "g", 1: "s", 2: "q", 3: "e"}  # `erotics`: none, light, moderate, hard
# Tag `type` numbers: 1 character, 2 reference, 3 product, 4 author, 5 game, 6 other copyright, 7 object.
TAG_TYPES = {0: GENERAL_CATEGORY, 1: CHARACTER_CATEGORY, 3: COPYRIGHT_CATEGORY, 4: ARTIST_CATEGORY,
             5: COPYRIGHT_CATEGORY, 6: COPYRIGHT_CATEGORY, 7: GENERAL_CATEGORY}
SESSION_COOKIE = "anime_pictures_jwt"


class AnimePicturesClient(PagedSiteClient):
    max_page_limit = MAX_PAGE_LIMIT
    numbered_pages = True

    def __init__(self, site: str, base_url: str, http: PoliteHttpClient, api_key: str,
                 media: MediaPolicy | None = None, page_limit: int = 80):
        super().__init__(site, http, media, page_limit)
        check_http_url(site, "base_url", base_url)
        if not api_key:
            raise ValueError(f"{site}: api_key (the {SESSION_COOKIE} session token) is needed to download originals")
        self.base_url = base_url.rstrip("/") + "/"
        self._session_headers = {"Cookie": f"{SESSION_COOKIE}={api_key}"}

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        name = pattern.rstrip("*").replace("_", " ").strip()
        if not name or "*" in name:
            return []  # only exact names can be looked up
        url = url_with_params(urljoin(self.base_url, "api/v3/tags"), {"tag": name, "lang": "en"})
        data = self._object(self.http.get_json(url, site=self.site), "answer", url)
        tags = []
        for row in self._list(data.get("tags"), "field 'tags'", url):
            row = self._object(row, "tag entry", url)
            tags.append(self._tag(row, url))
        return [t for t in tags if category is None or t.category == category][:limit]

    def _tag(self, row: dict[str, Any], url: str) -> SiteTag:
        ref = f"tag {row.get('tag')!r}"
        return SiteTag(
            name=self._field(row, "tag", str, ref, url),
            post_count=self._field(row, "num_pub", int, ref, url),
            category=TAG_TYPES.get(self._field(row, "type", int, ref, url), UNKNOWN_CATEGORY),
        )

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        page = int(cursor) if cursor else 0
        params = {"page": page, "posts_per_page": limit, "search_tag": tag.replace("_", " "),
                  "order_by": "date", "ldate": 0, "lang": "en"}
        url = url_with_params(urljoin(self.base_url, "api/v3/posts"), params)
        data = self._object(self.http.get_json(url, site=self.site), "answer", url)
        posts = self._list(data.get("posts"), "field 'posts'", url)
        max_pages = self._field(data, "max_pages", int, "answer", url)
        return RawPage(url, posts, str(page + 1) if page < max_pages and posts else None)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        detail_url = url_with_params(urljoin(self.base_url, f"api/v3/posts/{post_id}"), {"lang": "en"})
        detail = self._object(self.http.get_json(detail_url, site=self.site), f"{ref} detail", detail_url)
        file_name = self._field(detail, "file_url", str, ref, detail_url, optional=True)
        if not file_name:
            return [Listing(post_id, variants=[])]
        tags = [self._tag(self._object(self._object(item, f"{ref} tag", detail_url).get("tag"), f"{ref} tag", detail_url),
                          detail_url)
                for item in self._list(detail.get("tags", []), f"{ref}: field 'tags'", detail_url)]
        width = self._field(row, "width", int, ref, url)
        height = self._field(row, "height", int, ref, url)
        ext = self._field(row, "ext", str, ref, url).lstrip(".").lower()
        original = urljoin(self.base_url, "pictures/get_image/" + quote(file_name, safe=""))

        def named(category: int) -> list[str]:
            return [t.name.replace(" ", "_") for t in tags if t.category == category]

        erotics = self._field(row, "erotics", int, ref, url, optional=True)
        return [Listing(
            post_id=post_id,
            variants=[Variant(ORIGINAL, original, width, height, ext)],
            md5=self._field(row, "md5", str, ref, url),
            width=width,
            height=height,
            file_size=self._field(row, "size", int, ref, url, optional=True),
            rating=RATINGS.get(erotics, ""),
            tags=[t.name.replace(" ", "_") for t in tags],
            character_tags=named(CHARACTER_CATEGORY),
            copyright_tags=named(COPYRIGHT_CATEGORY),
            general_tags=named(GENERAL_CATEGORY),
        )]

    def _download_headers(self, post: SitePost) -> Mapping[str, str] | None:
        return self._session_headers  # the http client sends it to the API host only
