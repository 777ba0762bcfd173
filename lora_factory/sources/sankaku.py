"""Sankaku Channel (the sankakuapi.com API behind sankaku.app).

Listing is keyset-paged: `/v2/posts/keyset?tags=<tag>&limit=<n>&next=<token>` answers
`{"meta": {"next": <token or null>, "prev": ...}, "data": [...]}`. Post ids are letter
strings. A post gives `file_url` (null when the file is held back from this account),
`sample_url`, `file_type` as a MIME type, and its tags either as `tags` objects with a
`type` (4 character, 3 copyright) or as plain `tag_names`. Logging in is a POST of
login + password to `/auth/token`, which answers a bearer `access_token`. Files come
from signed, expiring URLs on *.sankakucomplex.com, so they are fetched page by page.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from lora_factory.sources.base import (
    ANIMATED,
    ARTIST_CATEGORY,
    CHARACTER_CATEGORY,
    COPYRIGHT_CATEGORY,
    GENERAL_CATEGORY,
    IMAGE,
    META_CATEGORY,
    ORIGINAL,
    UNKNOWN_CATEGORY,
    VIDEO,
    Listing,
    MediaPolicy,
    PagedSiteClient,
    RawPage,
    SiteTag,
    Variant,
    check_http_url,
    extension_of,
    glob_pattern_to_regex,
)
from lora_factory.sources.http import PoliteHttpClient, SiteError, url_with_params

# -- site facts ---------------------------------------------------------------------------
MAX_PAGE_LIMIT = 100
API_ACCEPT = "application/vnd.sankaku.api+json;v=2"
RATINGS = {"g": "g", "s": "s", "q": "q", "e": "e"}
# Sankaku tag types: 0 general, 1 artist, 2 studio, 3 copyright, 4 character, 5 genre, 8 medium, 9 meta.
TAG_TYPES = {0: GENERAL_CATEGORY, 1: ARTIST_CATEGORY, 3: COPYRIGHT_CATEGORY, 4: CHARACTER_CATEGORY,
             9: META_CATEGORY}
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
              "video/mp4": "mp4", "video/webm": "webm", "application/x-shockwave-flash": "swf"}


class SankakuClient(PagedSiteClient):
    max_page_limit = MAX_PAGE_LIMIT

    def __init__(self, site: str, base_url: str, http: PoliteHttpClient, login: str | None = None,
                 password: str | None = None, media: MediaPolicy | None = None, page_limit: int = 100):
        super().__init__(site, http, media, page_limit)
        check_http_url(site, "base_url", base_url)
        if bool(login) != bool(password):
            raise ValueError(f"{site}: give both login and password, or neither")
        self.base_url = base_url.rstrip("/") + "/"
        self._login = (login, password) if login and password else None
        self._token: str | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": API_ACCEPT}
        if self._login and self._token is None:
            url = urljoin(self.base_url, "auth/token")
            answer = self._object(self.http.post_form(
                url, json_body={"login": self._login[0], "password": self._login[1]}, site=self.site), "login answer", url)
            if answer.get("success") is not True:
                raise SiteError(self.site, url, "login refused: check the login and password")
            self._token = self._field(answer, "access_token", str, "login answer", url)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        params: dict[str, Any] = {"lang": "en", "name": pattern.split("*", 1)[0], "limit": min(100, limit * 5),
                                  "page": 1}
        if category is not None:
            params["types[]"] = category
        url = url_with_params(urljoin(self.base_url, "tags"), params)
        data = self.http.get_json(url, site=self.site, headers=self._headers())
        rows = data.get("data") if isinstance(data, dict) else data
        wanted = glob_pattern_to_regex(pattern)
        tags = []
        for row in self._list(rows, "answer", url):
            row = self._object(row, "tag entry", url)
            tag = self._tag(row, url)
            if wanted.match(tag.name.lower()) and (category is None or tag.category == category):
                tags.append(tag)
        return sorted(tags, key=lambda t: -t.post_count)[:limit]

    def _tag(self, row: dict[str, Any], url: str) -> SiteTag:
        name_field = "name" if isinstance(row.get("name"), str) else "name_en"
        ref = f"tag {row.get(name_field)!r}"
        count_field = "post_count" if "post_count" in row else "count"
        return SiteTag(
            name=self._field(row, name_field, str, ref, url),
            post_count=self._field(row, count_field, int, ref, url, optional=True) or 0,
            category=TAG_TYPES.get(self._field(row, "type", int, ref, url), UNKNOWN_CATEGORY),
        )

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        params: dict[str, Any] = {"lang": "en", "tags": tag, "limit": limit}
        if cursor:
            params["next"] = cursor
        url = url_with_params(urljoin(self.base_url, "v2/posts/keyset"), params)
        data = self._object(self.http.get_json(url, site=self.site, headers=self._headers()), "answer", url)
        meta = self._object(data.get("meta"), "field 'meta'", url)
        next_token = self._field(meta, "next", str, "meta", url, optional=True)
        return RawPage(url, self._list(data.get("data"), "field 'data'", url), next_token or None)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        file_url = self._field(row, "file_url", str, ref, url, optional=True)
        if not file_url:
            return [Listing(post_id, variants=[])]  # held back: log in, or not active
        file_type = self._field(row, "file_type", str, ref, url)
        original = self._absolute(self.base_url, file_url, ref, url)
        ext = EXTENSIONS.get(file_type) or extension_of(original)
        width = self._field(row, "width", int, ref, url)
        height = self._field(row, "height", int, ref, url)
        variants = [Variant(ORIGINAL, original, width, height, ext)]
        sample_url = self._field(row, "sample_url", str, ref, url, optional=True)
        if sample_url and sample_url != file_url:
            sample = self._absolute(self.base_url, sample_url, ref, url)
            variants.append(Variant("sample", sample, self._field(row, "sample_width", int, ref, url),
                                    self._field(row, "sample_height", int, ref, url), extension_of(sample)))
        tags, by_category = self._post_tags(row, ref, url)
        rating = self._field(row, "rating", str, ref, url)
        return [Listing(
            post_id=post_id,
            variants=variants,
            md5=self._field(row, "md5", str, ref, url, optional=True) or "",
            width=width,
            height=height,
            file_size=self._field(row, "file_size", int, ref, url, optional=True),
            rating=RATINGS.get(rating, ""),
            tags=tags,
            character_tags=by_category.get(CHARACTER_CATEGORY, []),
            copyright_tags=by_category.get(COPYRIGHT_CATEGORY, []),
            general_tags=by_category.get(GENERAL_CATEGORY, []),
            media=VIDEO if file_type.startswith("video/") or ext == "swf"
            else ANIMATED if "animated" in tags else IMAGE,
        )]

    def _post_tags(self, row: dict[str, Any], ref: str, url: str) -> tuple[list[str], dict[int, list[str]]]:
        """All tag names (underscored, as on boorus) and those of known categories."""
        by_category: dict[int, list[str]] = {}
        if isinstance(row.get("tags"), list):
            names = []
            for item in row["tags"]:
                tag = self._tag(self._object(item, f"{ref} tag", url), url)
                name = tag.name.replace(" ", "_")
                names.append(name)
                by_category.setdefault(tag.category, []).append(name)
            return names, by_category
        names = [n.replace(" ", "_") for n in self._list(row.get("tag_names"), f"{ref}: field 'tag_names'", url)
                 if isinstance(n, str)]
        return names, by_category
