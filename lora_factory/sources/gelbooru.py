"""The Gelbooru API family: Gelbooru itself, and the Gelbooru 0.2 sites (Safebooru.org,
Rule34, TBIB, Xbooru, HypnoHub).

Both answer `index.php?page=dapi&s=post&q=index&json=1`, but differently:
- Gelbooru wraps posts as `{"@attributes": {...}, "post": [...]}` (no "post" key when
  nothing matched, an object instead of a list for a single post), gives `file_url` /
  `sample_url`, and needs `api_key` + `user_id` (query parameters).
- 0.2 sites answer a bare list (or an empty body when nothing matched); most give only
  `directory` + `image`, from which the file lives at `/images/<directory>/<image>` and a
  sample at `/samples/<directory>/sample_<stem>.jpg`. Their tag API answers XML only.
Paging is keyset: `id:<N` added to the tags (deep `pid` pages are refused by Gelbooru).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any

from lora_factory.sources.base import (
    ANIMATED,
    CHARACTER_CATEGORY,
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
    glob_pattern_to_regex,
)
from lora_factory.sources.http import PoliteHttpClient, SiteError, url_with_params

# -- site facts ---------------------------------------------------------------------------
MAX_PAGE_LIMIT = 100  # "There is a hard limit of 100 posts per request"
DAPI_PATH = "index.php"
RATINGS = {"general": "g", "sensitive": "s", "safe": "s", "questionable": "q", "explicit": "e",
           "g": "g", "s": "s", "q": "q", "e": "e"}
VIDEO_EXTENSIONS = frozenset({"mp4", "webm"})
ANIMATED_TAGS = frozenset({"animated", "animated_gif", "animated_png"})
# Tag types on Gelbooru and 0.2 sites (the same numbers as Danbooru's categories).
TAG_TYPES = {0: 0, 1: 1, 3: 3, 4: CHARACTER_CATEGORY, 5: 5}
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_FILE_NAME = re.compile(r"^[\w.-]{1,200}$")


class _GelbooruFamily(PagedSiteClient):
    max_page_limit = MAX_PAGE_LIMIT

    def __init__(
        self,
        site: str,
        base_url: str,
        http: PoliteHttpClient,
        user_id: str | None = None,
        api_key: str | None = None,
        media: MediaPolicy | None = None,
        page_limit: int = 100,
        file_base_url: str | None = None,
    ):
        super().__init__(site, http, media, page_limit)
        for name, url in (("base_url", base_url), ("file_base_url", file_base_url or base_url)):
            check_http_url(site, name, url)
        if bool(user_id) != bool(api_key):
            raise ValueError(f"{site}: give both user_id and api_key, or neither")
        self.base_url = base_url.rstrip("/") + "/"
        self.file_base_url = (file_base_url or base_url).rstrip("/") + "/"
        self._credentials = {"user_id": user_id, "api_key": api_key} if user_id and api_key else {}

    def _dapi(self, resource: str, **params: Any) -> dict[str, Any]:
        return {"page": "dapi", "s": resource, "q": "index", **params, **self._credentials}

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        query = f"{tag} id:<{cursor}" if cursor else tag
        url = url_with_params(self.base_url + DAPI_PATH, self._dapi("post", json=1, tags=query, limit=limit, pid=0))
        entries = self._posts(url)
        ids = [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), int)]
        last = len(entries) < limit or not ids
        return RawPage(url, entries, None if last else str(min(ids)))

    @abstractmethod
    def _posts(self, url: str) -> list[Any]:
        """The post entries of one listing answer."""

    def _listing(self, row: dict[str, Any], url: str, original_url: str, sample_url: str | None) -> Listing:
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        width = self._field(row, "width", int, ref, url)
        height = self._field(row, "height", int, ref, url)
        tags = self._field(row, "tags", str, ref, url).split()
        ext = extension_of(original_url)
        variants = [Variant(ORIGINAL, original_url, width, height, ext)]
        if sample_url:
            variants.append(Variant("sample", sample_url, self._field(row, "sample_width", int, ref, url),
                                    self._field(row, "sample_height", int, ref, url), extension_of(sample_url)))
        md5 = row.get("md5") or row.get("hash") or ""
        rating = self._field(row, "rating", str, ref, url)
        return Listing(
            post_id=post_id,
            variants=variants,
            md5=md5 if isinstance(md5, str) and _MD5.match(md5) else "",
            width=width,
            height=height,
            rating=RATINGS.get(rating, ""),
            tags=tags,
            media=VIDEO if ext in VIDEO_EXTENSIONS else ANIMATED if ANIMATED_TAGS & set(tags) else IMAGE,
        )


class GelbooruClient(_GelbooruFamily):
    """gelbooru.com (Gelbooru 0.2.5): JSON everywhere, with the `@attributes` wrapper."""

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        url = self.base_url + DAPI_PATH
        # The tag API cannot filter by type: ask for more and filter here.
        params = self._dapi("tag", json=1, name_pattern=pattern.replace("*", "%"), orderby="count",
                            order="DESC", limit=min(100, limit * 5 if category is not None else limit))
        data = self.http.get_json(url, params, site=self.site)
        rows = self._wrapped(data, "tag", url)
        return _tags(self, rows, url, pattern, category, limit)

    def _posts(self, url: str) -> list[Any]:
        return self._wrapped(self.http.get_json(url, site=self.site), "post", url)

    def _wrapped(self, data: Any, key: str, url: str) -> list[Any]:
        data = self._object(data, "answer", url)
        if "@attributes" not in data:
            raise SiteError(self.site, url, f"answer has no '@attributes' (keys: {sorted(data)[:8]})")
        rows = data.get(key, [])
        return [rows] if isinstance(rows, dict) else self._list(rows, f"field '{key}'", url)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        file_url = self._field(row, "file_url", str, ref, url, optional=True)
        if not file_url:
            return [Listing(post_id, variants=[])]
        sample = self._field(row, "sample_url", str, ref, url, optional=True)
        sample = sample if sample and row.get("sample") not in (0, "0", False) else None
        return [self._listing(row, url, self._absolute(self.base_url, file_url, ref, url),
                              self._absolute(self.base_url, sample, ref, url) if sample else None)]


class GelbooruV02Client(_GelbooruFamily):
    """Gelbooru 0.2 sites: bare JSON lists of posts, XML tags, file paths from directory + image."""

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        url = self.base_url + DAPI_PATH
        params = self._dapi("tag", name_pattern=pattern.replace("*", "%"), orderby="count", order="DESC",
                            limit=min(100, limit * 5 if category is not None else limit))
        root = self.http.get_xml(url, params, site=self.site)
        if root.tag != "tags":
            raise SiteError(self.site, url, f"expected a <tags> document, got <{root.tag}>")
        rows = []
        for element in root.findall("tag"):
            row: dict[str, Any] = dict(element.attrib)
            for name in ("count", "type"):
                try:
                    row[name] = int(row[name])
                except (KeyError, ValueError):
                    raise SiteError(self.site, url, f"tag {row.get('name')!r}: attribute '{name}' should be an "
                                                    f"integer but is {row.get(name)!r}") from None
            rows.append(row)
        return _tags(self, rows, url, pattern, category, limit)

    def _posts(self, url: str) -> list[Any]:
        # Rule34 and Xbooru answer "nothing found" with an empty body.
        data = self.http.get_json(url, site=self.site, empty=[])
        return self._list(data, "answer", url)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        file_url = self._field(row, "file_url", str, ref, url, optional=True)
        image = self._field(row, "image", str, ref, url, optional=True)
        if not file_url and not image:
            return [Listing(post_id, variants=[])]
        if file_url:
            original = self._absolute(self.file_base_url, file_url, ref, url)
        else:
            original = self._absolute(self.file_base_url, f"images/{self._directory(row, ref, url)}/{self._name(image, ref, url)}", ref, url)
        sample_url = self._field(row, "sample_url", str, ref, url, optional=True)
        if sample_url and sample_url != file_url:
            sample = self._absolute(self.file_base_url, sample_url, ref, url)
        elif row.get("sample") in (True, 1, "1", "true") and image:
            stem = self._name(image, ref, url).rsplit(".", 1)[0]
            sample = self._absolute(self.file_base_url, f"samples/{self._directory(row, ref, url)}/sample_{stem}.jpg", ref, url)
        else:
            sample = None
        return [self._listing(row, url, original, sample)]

    def _directory(self, row: dict[str, Any], ref: str, url: str) -> str:
        directory = row.get("directory")
        if isinstance(directory, int) and not isinstance(directory, bool):
            return str(directory)
        if isinstance(directory, str) and re.fullmatch(r"[\w/-]{1,64}", directory) and ".." not in directory:
            return directory
        raise SiteError(self.site, url, f"{ref}: field 'directory' should be a folder name but is {directory!r:.40}")

    def _name(self, image: str, ref: str, url: str) -> str:
        if not _FILE_NAME.match(image):
            raise SiteError(self.site, url, f"{ref}: field 'image' should be a file name but is {image!r:.60}")
        return image


def _tags(
    client: PagedSiteClient, rows: list[Any], url: str, pattern: str, category: int | None, limit: int
) -> list[SiteTag]:
    """Gelbooru-family tag rows (name, count, type) as SiteTags, filtered and most used first.

    Filtered here again because not every 0.2 site honours `name_pattern`."""
    wanted = glob_pattern_to_regex(pattern)
    tags = []
    for row in rows:
        row = client._object(row, "tag entry", url)
        ref = f"tag {row.get('name')!r}"
        tag_type = client._field(row, "type", int, ref, url)
        tags.append(SiteTag(
            name=client._field(row, "name", str, ref, url),
            post_count=client._field(row, "count", int, ref, url),
            category=TAG_TYPES.get(tag_type, UNKNOWN_CATEGORY),
        ))
    tags = [t for t in tags if wanted.match(t.name.lower()) and (category is None or t.category == category)]
    tags.sort(key=lambda t: -t.post_count)
    return tags[:limit]
