"""The Moebooru family: Konachan, Yande.re.

`/post.json?api_version=2&include_tags=1` answers `{"posts": [...], "tags": {name: type}}`,
so every post's character and copyright tags are known without a request per tag. Pages
are numbered from 1 (Moebooru has no before-id paging). A post offers its original
(`file_url`), a full-size JPEG (`jpeg_url`, for PNG originals) and a sample (`sample_url`).
Tag search is `/tag.json?name=<pattern>&order=count&type=4`. Reading needs no account.
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
)
from lora_factory.sources.http import PoliteHttpClient, SiteError, url_with_params

# -- site facts ---------------------------------------------------------------------------
MAX_PAGE_LIMIT = 100
RATINGS = {"s": "s", "q": "q", "e": "e"}  # safe, questionable, explicit
TAG_TYPE_NAMES = {"general": GENERAL_CATEGORY, "artist": ARTIST_CATEGORY, "copyright": COPYRIGHT_CATEGORY,
                  "character": CHARACTER_CATEGORY}
VIDEO_EXTENSIONS = frozenset({"mp4", "webm"})
ANIMATED_TAGS = frozenset({"animated", "animated_gif", "animated_png"})
# (url field, width field, height field, variant name), the original first.
RENDITIONS = (
    ("file_url", "width", "height", ORIGINAL),
    ("jpeg_url", "jpeg_width", "jpeg_height", "jpeg"),
    ("sample_url", "sample_width", "sample_height", "sample"),
)


class MoebooruClient(PagedSiteClient):
    max_page_limit = MAX_PAGE_LIMIT
    numbered_pages = True

    def __init__(self, site: str, base_url: str, http: PoliteHttpClient, media: MediaPolicy | None = None,
                 page_limit: int = 100):
        super().__init__(site, http, media, page_limit)
        check_http_url(site, "base_url", base_url)
        self.base_url = base_url.rstrip("/") + "/"
        self._tag_types: dict[str, str] = {}

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        params: dict[str, Any] = {"name": pattern, "order": "count", "limit": limit}
        if category is not None:
            params["type"] = category
        url = url_with_params(urljoin(self.base_url, "tag.json"), params)
        rows = self._list(self.http.get_json(url, site=self.site), "answer", url)
        tags = []
        for row in rows:
            row = self._object(row, "tag entry", url)
            ref = f"tag {row.get('name')!r}"
            tags.append(SiteTag(
                name=self._field(row, "name", str, ref, url),
                post_count=self._field(row, "count", int, ref, url),
                category=self._field(row, "type", int, ref, url),
            ))
        return tags

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        page = int(cursor) if cursor else 1
        params = {"api_version": 2, "include_tags": 1, "tags": tag, "limit": limit, "page": page}
        url = url_with_params(urljoin(self.base_url, "post.json"), params)
        data = self._object(self.http.get_json(url, site=self.site), "answer", url)
        posts = self._list(data.get("posts"), "field 'posts'", url)
        tag_types = self._object(data.get("tags", {}), "field 'tags'", url)
        self._tag_types.update({k: v for k, v in tag_types.items() if isinstance(v, str)})
        return RawPage(url, posts, str(page + 1) if len(posts) >= limit else None)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        if not row.get("file_url"):
            return [Listing(post_id, variants=[])]  # deleted, or held back from this account
        variants = []
        for url_field, width_field, height_field, name in RENDITIONS:
            file_url = self._field(row, url_field, str, ref, url, optional=name != ORIGINAL)
            if not file_url:
                continue
            absolute = self._absolute(self.base_url, file_url, ref, url)
            if any(absolute == v.url for v in variants):
                continue
            ext = self._field(row, "file_ext", str, ref, url) if name == ORIGINAL else extension_of(absolute)
            variants.append(Variant(name, absolute, self._field(row, width_field, int, ref, url),
                                    self._field(row, height_field, int, ref, url), ext))
        tags = self._field(row, "tags", str, ref, url).split()
        by_category: dict[int, list[str]] = {}
        for tag in tags:
            category = TAG_TYPE_NAMES.get(self._tag_types.get(tag, ""), UNKNOWN_CATEGORY)
            by_category.setdefault(category, []).append(tag)
        ext = variants[0].ext
        rating = self._field(row, "rating", str, ref, url)
        if rating not in RATINGS:
            raise SiteError(self.site, url, f"{ref}: field 'rating' should be one of {sorted(RATINGS)}, got {rating!r}")
        return [Listing(
            post_id=post_id,
            variants=variants,
            md5=self._field(row, "md5", str, ref, url),
            width=variants[0].width,
            height=variants[0].height,
            file_size=self._field(row, "file_size", int, ref, url, optional=True),
            rating=RATINGS[rating],
            tags=tags,
            character_tags=by_category.get(CHARACTER_CATEGORY, []),
            copyright_tags=by_category.get(COPYRIGHT_CATEGORY, []),
            general_tags=by_category.get(GENERAL_CATEGORY, []),
            media=VIDEO if ext in VIDEO_EXTENSIONS else ANIMATED if ANIMATED_TAGS & set(tags) else IMAGE,
        )]
