"""Sites that speak Danbooru's JSON API: Danbooru, Safebooru (donmai), ATFBooru, the demo booru.

Endpoints: `/tags.json` (tag search) and `/posts.json` (listing), paged by `page=b<id>`
(posts older than an id), so uploads during a walk do not shift the pages. Credentials
(login + API key) travel as HTTP basic auth, never in the URL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from lora_factory.sources.base import (
    ANIMATED,
    CHARACTER_CATEGORY,
    IMAGE,
    ORIGINAL,
    VIDEO,
    Listing,
    MediaPolicy,
    PagedSiteClient,
    PagingStats,
    RawPage,
    SitePost,
    SiteTag,
    Variant,
    check_http_url,
)
from lora_factory.sources.http import PoliteHttpClient, SiteError, url_with_params

__all__ = ["CHARACTER_CATEGORY", "DanbooruApiClient", "DanbooruClient", "PagingStats", "SitePost", "SiteTag"]

# -- site facts ---------------------------------------------------------------------------
MAX_PAGE_LIMIT = 200  # Danbooru caps `limit` at 200 posts per page
# Without `media_asset` (older Danbooru forks), `large_file_url` is a sample this wide.
SAMPLE_WIDTH = 850
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "zip", "swf"})  # zip: ugoira frames
ANIMATED_TAGS = frozenset({"animated", "animated_gif", "animated_png"})


class DanbooruApiClient(PagedSiteClient):
    """What every Danbooru-API site shares: credentials, tag search and `page=b<id>` paging.
    A site's own answer shapes come from `_tag_rows`, `_post_rows` and `_listings`."""

    def __init__(
        self,
        site: str,
        base_url: str,
        http: PoliteHttpClient,
        login: str | None = None,
        api_key: str | None = None,
        media: MediaPolicy | None = None,
        page_limit: int = 100,
    ):
        super().__init__(site, http, media, page_limit)
        check_http_url(site, "base_url", base_url)
        if bool(login) != bool(api_key):
            raise ValueError(f"{site}: give both login and api_key, or neither")
        self.base_url = base_url.rstrip("/") + "/"
        self._auth = (login, api_key) if login and api_key else None

    # -- tags ---------------------------------------------------------------------------

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        params: dict[str, Any] = {"search[name_matches]": pattern, "search[order]": "count", "limit": limit}
        if category is not None:
            params["search[category]"] = category
        url = url_with_params(urljoin(self.base_url, "tags.json"), params)
        tags = []
        for row in self._tag_rows(url):
            row = self._object(row, "tag entry", url)
            ref = f"tag {row.get('name')!r}"
            tags.append(SiteTag(
                name=self._field(row, "name", str, ref, url),
                post_count=self._field(row, "post_count", int, ref, url),
                category=self._field(row, "category", int, ref, url),
            ))
        return tags

    def _tag_rows(self, url: str) -> list[Any]:
        return self._get_list(url)

    # -- posts --------------------------------------------------------------------------

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        params: dict[str, Any] = {"tags": tag, "limit": limit}
        if cursor is not None:
            params["page"] = cursor
        url = url_with_params(urljoin(self.base_url, "posts.json"), params)
        rows, may_go_on = self._post_rows(url, limit)
        ids = [row["id"] for row in rows if isinstance(row, dict) and isinstance(row.get("id"), int)]
        return RawPage(url, rows, f"b{min(ids)}" if ids and may_go_on else None)

    def _post_rows(self, url: str, limit: int) -> tuple[list[Any], bool]:
        """(the page's post entries, whether a further page may exist)."""
        # Danbooru never says "last page": the walk ends on an empty page.
        return self._get_list(url), True

    def _get_list(self, url: str) -> list[Any]:
        data = self.http.get_json(url, site=self.site, auth=self._auth)
        if not isinstance(data, list):
            raise SiteError(self.site, url, f"expected a JSON list, got {type(data).__name__}: {str(data)[:120]}")
        return data


class DanbooruClient(DanbooruApiClient):
    """Tag search and post listing on one Danbooru-API site."""

    max_page_limit = MAX_PAGE_LIMIT

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        if not row.get("file_url"):
            return [Listing(post_id, variants=[])]  # banned, or hidden from this account
        ext = self._field(row, "file_ext", str, ref, url)
        width = self._field(row, "image_width", int, ref, url)
        height = self._field(row, "image_height", int, ref, url)
        tags = self._field(row, "tag_string", str, ref, url).split()
        original = Variant(ORIGINAL, self._absolute(self.base_url, self._field(row, "file_url", str, ref, url), ref, url),
                           width, height, ext)
        return [Listing(
            post_id=post_id,
            variants=[original, *self._smaller_variants(row, original, ref, url)],
            md5=self._field(row, "md5", str, ref, url),
            width=width,
            height=height,
            file_size=self._field(row, "file_size", int, ref, url),
            rating=self._field(row, "rating", str, ref, url),
            tags=tags,
            character_tags=self._field(row, "tag_string_character", str, ref, url).split(),
            copyright_tags=self._field(row, "tag_string_copyright", str, ref, url).split(),
            general_tags=self._field(row, "tag_string_general", str, ref, url).split(),
            media=VIDEO if ext in VIDEO_EXTENSIONS else ANIMATED if ANIMATED_TAGS & set(tags) else IMAGE,
        )]

    def _smaller_variants(self, row: dict[str, Any], original: Variant, ref: str, url: str) -> list[Variant]:
        """Danbooru lists every rendition in `media_asset.variants`; older forks only give
        `large_file_url`, a sample SAMPLE_WIDTH wide."""
        asset = row.get("media_asset")
        if isinstance(asset, dict) and asset.get("variants") is not None:
            variants = []
            for item in self._list(asset["variants"], f"{ref}: media_asset.variants", url):
                item = self._object(item, f"{ref}: media_asset variant", url)
                kind = self._field(item, "type", str, ref, url)
                if kind == ORIGINAL:
                    continue
                variants.append(Variant(
                    kind,
                    self._absolute(self.base_url, self._field(item, "url", str, f"{ref} variant {kind}", url), ref, url),
                    self._field(item, "width", int, f"{ref} variant {kind}", url),
                    self._field(item, "height", int, f"{ref} variant {kind}", url),
                    self._field(item, "file_ext", str, f"{ref} variant {kind}", url),
                ))
            return variants
        large = row.get("large_file_url")
        if not isinstance(large, str) or not large or urljoin(self.base_url, large) == original.url:
            return []
        scale = min(1.0, SAMPLE_WIDTH / original.width) if original.width > 0 else 1.0
        return [Variant("sample", self._absolute(self.base_url, large, ref, url),
                        round(original.width * scale), round(original.height * scale), large.rsplit(".", 1)[-1].lower())]
