"""A client for sites that speak Danbooru's JSON API (Danbooru, Safebooru, the demo booru).

Only the two read endpoints the factory needs: tag search (`/tags.json`) to find a
character's candidate tags, and post listing (`/posts.json`) to collect its images. Every
post is validated field by field, so an API change fails loudly with the site and field
named instead of poisoning the dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urljoin, urlsplit

from lora_factory.sources.http import PoliteHttpClient, SiteError, url_with_params

log = logging.getLogger(__name__)

CHARACTER_CATEGORY = 4
# Danbooru caps `limit` at 200 posts per page.
MAX_PAGE_LIMIT = 200
# Danbooru's `large_file_url` is a sample resized to this width (when the original is wider).
DANBOORU_SAMPLE_WIDTH = 850


@dataclass(frozen=True)
class SiteTag:
    name: str
    post_count: int
    category: int


@dataclass
class SitePost:
    site: str
    post_id: int
    md5: str
    file_url: str  # absolute URL of the chosen variant
    file_ext: str
    width: int  # of the original
    height: int
    file_size: int  # of the original, in bytes
    rating: str
    tags: list[str]
    character_tags: list[str]
    copyright_tags: list[str]
    general_tags: list[str]
    variant: str = "original"  # "original" or "sample" (large_file_url)


@dataclass
class PagingStats:
    """What paging one tag saw; filled in while iterating."""

    pages: int = 0
    posts: int = 0
    hidden_skipped: int = 0  # posts without file_url: banned or hidden from this account
    repeated: int = 0  # posts the site sent again on a later page
    stop_reason: str = ""


@dataclass
class DanbooruClient:
    """Tag search and post listing on one Danbooru-API site.

    `min_side`: when set, download the smaller `large_file_url` sample instead of the
    original if the sample still has both sides >= min_side (saves bandwidth on huge
    originals); when None, always the original.
    """

    site: str
    base_url: str
    http: PoliteHttpClient
    login: str | None = None
    api_key: str | None = field(default=None, repr=False)
    page_limit: int = 100
    min_side: int | None = None

    def __post_init__(self) -> None:
        if not self.site:
            raise ValueError("site must be a non-empty name, e.g. 'danbooru'")
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"{self.site}: base_url must be an http(s) URL, got {self.base_url!r}")
        if bool(self.login) != bool(self.api_key):
            raise ValueError(f"{self.site}: give both login and api_key, or neither")
        if not 1 <= self.page_limit <= MAX_PAGE_LIMIT:
            raise ValueError(f"{self.site}: page_limit must be in 1..{MAX_PAGE_LIMIT}, got {self.page_limit}")
        self.base_url = self.base_url.rstrip("/") + "/"

    # -- tags ---------------------------------------------------------------------------

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        """Tags whose name matches `pattern` (`*` is a wildcard), most used first."""
        params: dict[str, Any] = {"search[name_matches]": pattern, "search[order]": "count", "limit": limit}
        if category is not None:
            params["search[category]"] = category
        url = url_with_params(urljoin(self.base_url, "tags.json"), params)
        rows = self._get_list(url)
        return [self._parse_tag(row, url) for row in rows]

    def _parse_tag(self, row: Any, url: str) -> SiteTag:
        if not isinstance(row, dict):
            raise SiteError(self.site, url, f"tag entry is not an object: {row!r:.60}")
        ref = f"tag {row.get('name')!r}"
        return SiteTag(
            name=self._field(row, "name", str, ref, url),
            post_count=self._field(row, "post_count", int, ref, url),
            category=self._field(row, "category", int, ref, url),
        )

    # -- posts --------------------------------------------------------------------------

    def iter_posts(
        self, tag: str, max_posts: int, before_id: int | None = None, stats: PagingStats | None = None
    ) -> Iterator[SitePost]:
        """Up to `max_posts` downloadable posts tagged `tag`, newest first."""
        for page in self.iter_pages(tag, max_posts, before_id, stats):
            yield from page

    def iter_pages(
        self, tag: str, max_posts: int, before_id: int | None = None, stats: PagingStats | None = None
    ) -> Iterator[list[SitePost]]:
        """The same posts as `iter_posts`, one list per API page.

        Pages are addressed as `page=b<lowest id seen>` rather than by number, so posts
        uploaded while we page do not shift the pages, and the walk always moves to older
        posts. It stops on an empty page or on a page with no new ids (a looping server).
        """
        if max_posts < 0:
            raise ValueError(f"max_posts must be >= 0, got {max_posts}")
        stats = stats if stats is not None else PagingStats()
        seen: set[int] = set()
        cursor = before_id
        remaining = max_posts
        while remaining > 0:
            params: dict[str, Any] = {"tags": tag, "limit": min(self.page_limit, remaining)}
            if cursor is not None:
                params["page"] = f"b{cursor}"
            url = url_with_params(urljoin(self.base_url, "posts.json"), params)
            rows = self._get_list(url)
            stats.pages += 1
            if not rows:
                stats.stop_reason = "empty page"
                return
            page: list[SitePost] = []
            new_ids = 0
            for row in rows:
                if not isinstance(row, dict):
                    raise SiteError(self.site, url, f"post entry is not an object: {row!r:.60}")
                post_id = self._field(row, "id", int, "post", url)
                if post_id in seen:
                    stats.repeated += 1
                    continue
                seen.add(post_id)
                new_ids += 1
                post = self._parse_post(row, post_id, url)
                if post is None:
                    stats.hidden_skipped += 1
                else:
                    page.append(post)
            if new_ids == 0:
                stats.stop_reason = "pagination loop: a page repeated only posts already seen"
                log.warning("%s: %s (tag %s)", self.site, stats.stop_reason, tag)
                return
            page = page[:remaining]
            remaining -= len(page)
            stats.posts += len(page)
            if page:
                yield page
            cursor = min(seen)
        stats.stop_reason = f"reached max_posts={max_posts}"

    def _parse_post(self, row: dict[str, Any], post_id: int, url: str) -> SitePost | None:
        """A validated post, or None when the site hides its file (banned or restricted)."""
        if not row.get("file_url"):
            return None
        ref = f"post {post_id}"
        file_url = self._field(row, "file_url", str, ref, url)
        width = self._field(row, "image_width", int, ref, url)
        height = self._field(row, "image_height", int, ref, url)
        variant = "original"
        large_file_url = row.get("large_file_url")
        if (
            self.min_side is not None
            and isinstance(large_file_url, str)
            and large_file_url
            and large_file_url != file_url
            and _sample_min_side(width, height) >= self.min_side
        ):
            file_url, variant = large_file_url, "sample"
        absolute_url = urljoin(self.base_url, file_url)
        if urlsplit(absolute_url).scheme not in ("http", "https"):
            raise SiteError(self.site, url, f"{ref}: field 'file_url' is not an http(s) URL: {file_url!r:.80}")
        return SitePost(
            site=self.site,
            post_id=post_id,
            md5=self._field(row, "md5", str, ref, url),
            file_url=absolute_url,
            file_ext=self._field(row, "file_ext", str, ref, url),
            width=width,
            height=height,
            file_size=self._field(row, "file_size", int, ref, url),
            rating=self._field(row, "rating", str, ref, url),
            tags=self._field(row, "tag_string", str, ref, url).split(),
            character_tags=self._field(row, "tag_string_character", str, ref, url).split(),
            copyright_tags=self._field(row, "tag_string_copyright", str, ref, url).split(),
            general_tags=self._field(row, "tag_string_general", str, ref, url).split(),
            variant=variant,
        )

    def download(self, post: SitePost) -> bytes:
        """The bytes of `post`'s chosen variant. No credentials: files live on public CDNs."""
        return self.http.download(post.file_url, site=self.site)

    # -- plumbing -----------------------------------------------------------------------

    def _get_list(self, url: str) -> list[Any]:
        auth = (self.login, self.api_key) if self.login and self.api_key else None
        data = self.http.get_json(url, site=self.site, auth=auth)
        if not isinstance(data, list):
            raise SiteError(self.site, url, f"expected a JSON list, got {type(data).__name__}: {str(data)[:120]}")
        return data

    def _field(self, row: dict[str, Any], name: str, kind: type, ref: str, url: str) -> Any:
        value = row.get(name)
        # bool is an int subclass in Python, but never a valid count or id.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            state = "missing" if name not in row else f"a {type(value).__name__} ({value!r:.40})"
            raise SiteError(self.site, url, f"{ref}: field '{name}' should be {kind.__name__} but is {state}")
        return value


def _sample_min_side(width: int, height: int) -> float:
    scale = min(1.0, DANBOORU_SAMPLE_WIDTH / width) if width > 0 else 1.0
    return min(width, height) * scale
