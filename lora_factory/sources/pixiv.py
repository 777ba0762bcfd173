"""Pixiv, through the mobile app API (app-api.pixiv.net), logged in with a refresh token.

A refresh token (obtained once through Pixiv's OAuth login in a browser) is exchanged at
`oauth.secure.pixiv.net/auth/token` for a bearer access token valid `expires_in` seconds.
`/v1/search/illust?word=<tag>&search_target=exact_match_for_tags&sort=date_desc` answers
`{"illusts": [...], "next_url": ...}`, 30 works a page, paged by `offset` (read from
`next_url`, whose host is never followed). A work of several pages becomes one post per
page (`<id>_p<n>`); an ugoira (animation) lists its first frame as a JPEG. Files on
i.pximg.net are only served with the app's Referer. Tags are not categorised, and tag
search (`/v2/search/autocomplete`) gives names without post counts.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Any, Mapping
from urllib.parse import parse_qs, urljoin, urlsplit

from lora_factory.sources.base import (
    CHARACTER_CATEGORY,
    IMAGE,
    ORIGINAL,
    UNKNOWN_CATEGORY,
    VIDEO,
    Listing,
    MediaPolicy,
    PagedSiteClient,
    RawPage,
    SitePost,
    SiteTag,
    Variant,
    check_http_url,
    extension_of,
)
from lora_factory.sources.http import PoliteHttpClient, SiteError, url_with_params

# -- site facts ---------------------------------------------------------------------------
PAGE_SIZE = 30  # the search API's fixed page size
AUTH_URL = "https://oauth.secure.pixiv.net/auth/token"
# The mobile app's public OAuth client (the API serves no other client).
CLIENT_ID = "MOBrBDS8blbauoSck0ZfDbtuzpyT"
CLIENT_SECRET = "lsACyCD94FhDUtGTXi3QzcFE2uU1hqtDaKeqrdwj"
HASH_SECRET = "28c1fdd170a5204386cb1313c7077b34f83e4aaf4aa829ce78c231e05b0bae2c"
APP_HEADERS = {"App-OS": "ios", "App-OS-Version": "16.7.2", "App-Version": "7.19.1",
               "User-Agent": "PixivIOSApp/7.19.1 (iOS 16.7.2; iPhone12,8)"}
IMAGE_REFERER = "https://app-api.pixiv.net/"
RATINGS = {0: "g", 1: "e", 2: "e"}  # x_restrict: all ages, R-18, R-18G
# Master renditions fit inside these boxes: (variant, box width, box height).
RENDITION_BOXES = (("large", 600, 1200), ("medium", 540, 540))
TOKEN_MARGIN_S = 60.0  # refresh this long before the access token expires


class PixivClient(PagedSiteClient):
    max_page_limit = PAGE_SIZE

    def __init__(self, site: str, base_url: str, http: PoliteHttpClient, refresh_token: str,
                 media: MediaPolicy | None = None, auth_url: str = AUTH_URL, page_limit: int = PAGE_SIZE):
        super().__init__(site, http, media, page_limit)
        for name, url in (("base_url", base_url), ("auth_url", auth_url)):
            check_http_url(site, name, url)
        if not refresh_token:
            raise ValueError(f"{site}: a refresh_token is needed to use the Pixiv API")
        self.base_url = base_url.rstrip("/") + "/"
        self.auth_url = auth_url
        self._refresh_token = refresh_token
        self._access_token: str | None = None
        self._expires_at = 0.0

    def _api_headers(self) -> dict[str, str]:
        if self._access_token is None or time.monotonic() >= self._expires_at:
            self._log_in()
        return {**APP_HEADERS, "Authorization": f"Bearer {self._access_token}"}

    def _log_in(self) -> None:
        client_time = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        headers = {**APP_HEADERS, "X-Client-Time": client_time,
                   "X-Client-Hash": hashlib.md5((client_time + HASH_SECRET).encode()).hexdigest()}
        form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "grant_type": "refresh_token",
                "refresh_token": self._refresh_token, "get_secure_url": "1", "include_policy": "true"}
        answer = self._object(self.http.post_form(self.auth_url, form, site=self.site, headers=headers),
                              "token answer", self.auth_url)
        token = answer.get("response", answer)
        token = self._object(token, "token answer", self.auth_url)
        self._access_token = self._field(token, "access_token", str, "token answer", self.auth_url)
        expires_in = self._field(token, "expires_in", int, "token answer", self.auth_url)
        self._expires_at = time.monotonic() + max(0.0, expires_in - TOKEN_MARGIN_S)

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        word = pattern.split("*", 1)[0].replace("_", " ").strip()
        if not word:
            return []
        url = url_with_params(urljoin(self.base_url, "v2/search/autocomplete"),
                              {"word": word, "merge_plain_keyword_results": "true"})
        data = self._object(self.http.get_json(url, site=self.site, headers=self._api_headers()), "answer", url)
        tags = []
        for row in self._list(data.get("tags"), "field 'tags'", url)[:limit]:
            row = self._object(row, "tag entry", url)
            tags.append(SiteTag(self._field(row, "name", str, "tag", url), 0, UNKNOWN_CATEGORY))
        return tags

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        params: dict[str, Any] = {"word": tag, "search_target": "exact_match_for_tags", "sort": "date_desc",
                                  "filter": "for_ios"}
        if cursor:
            params["offset"] = cursor
        url = url_with_params(urljoin(self.base_url, "v1/search/illust"), params)
        data = self._object(self.http.get_json(url, site=self.site, headers=self._api_headers()), "answer", url)
        illusts = self._list(data.get("illusts"), "field 'illusts'", url)
        next_url = self._field(data, "next_url", str, "answer", url, optional=True)
        next_offset = parse_qs(urlsplit(next_url).query).get("offset", [None])[0] if next_url else None
        if next_offset is not None and not next_offset.isdigit():
            raise SiteError(self.site, url, f"next_url has an offset that is not a number: {next_offset!r:.20}")
        return RawPage(url, illusts, next_offset)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        work = self._object(entry, "illust entry", url)
        work_id = self._id(work, "id", "illust", url)
        ref = f"illust {work_id}"
        kind = self._field(work, "type", str, ref, url)
        page_count = self._field(work, "page_count", int, ref, url)
        width = self._field(work, "width", int, ref, url)
        height = self._field(work, "height", int, ref, url)
        names = [self._field(self._object(t, f"{ref} tag", url), "name", str, f"{ref} tag", url)
                 for t in self._list(work.get("tags", []), f"{ref}: field 'tags'", url)]
        common = dict(rating=RATINGS.get(work.get("x_restrict"), ""), tags=[n.replace(" ", "_") for n in names],
                      media=VIDEO if kind == "ugoira" else IMAGE)
        if work.get("visible") is False:
            return [Listing(work_id, variants=[])]
        if page_count <= 1:
            single = self._object(work.get("meta_single_page"), f"{ref}: field 'meta_single_page'", url)
            original = self._field(single, "original_image_url", str, ref, url, optional=True)
            if not original:
                return [Listing(work_id, variants=[])]
            urls = self._object(work.get("image_urls"), f"{ref}: field 'image_urls'", url)
            return [Listing(work_id, self._variants(original, urls, width, height, ref, url),
                            width=width, height=height, **common)]
        listings = []
        for number, page in enumerate(self._list(work.get("meta_pages"), f"{ref}: field 'meta_pages'", url)):
            urls = self._object(self._object(page, f"{ref} page", url).get("image_urls"),
                                f"{ref} page {number}: field 'image_urls'", url)
            original = self._field(urls, "original", str, f"{ref} page {number}", url)
            # Only the first page's size is given.
            size = (width, height) if number == 0 else (None, None)
            listings.append(Listing(f"{work_id}_p{number}", self._variants(original, urls, *size, ref, url),
                                    width=size[0], height=size[1], **common))
        return listings

    def _variants(self, original: str, urls: dict[str, Any], width: int | None, height: int | None,
                  ref: str, url: str) -> list[Variant]:
        original_url = self._absolute(self.base_url, original, ref, url)
        variants = [Variant(ORIGINAL, original_url, width, height, extension_of(original_url))]
        for name, box_width, box_height in RENDITION_BOXES:
            rendition = urls.get(name)
            if not isinstance(rendition, str) or not rendition:
                continue
            size = _fit(width, height, box_width, box_height)
            absolute = self._absolute(self.base_url, rendition, ref, url)
            variants.append(Variant(name, absolute, size[0], size[1], extension_of(absolute)))
        return variants

    def _download_headers(self, post: SitePost) -> Mapping[str, str] | None:
        return {"Referer": IMAGE_REFERER}  # i.pximg.net answers 403 without it


def _fit(width: int | None, height: int | None, box_width: int, box_height: int) -> tuple[int | None, int | None]:
    """The size of a width x height picture scaled down (never up) to fit the box."""
    if width is None or height is None or width <= 0 or height <= 0:
        return None, None
    scale = min(1.0, box_width / width, box_height / height)
    return round(width * scale), round(height * scale)
