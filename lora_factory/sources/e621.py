"""e621 and e926 (its safe mirror).

`/posts.json` wraps posts as `{"posts": [...]}`; a post carries `file` (url, md5, size,
width, height, ext), `sample` (`has`, url, width, height) and tags grouped by category.
`file.url` is null for deleted posts and for posts hidden from anonymous users by the
site's global blacklist. Paging is `page=b<id>`. `/tags.json` answers a list, but
`{"tags": []}` when nothing matches. Login + API key travel as HTTP basic auth; the site
asks for a User-Agent naming the project and the user.
"""

from __future__ import annotations

from typing import Any

from lora_factory.sources.base import (
    ANIMATED,
    IMAGE,
    ORIGINAL,
    VIDEO,
    Listing,
    Variant,
    extension_of,
)
from lora_factory.sources.danbooru import DanbooruApiClient
from lora_factory.sources.http import SiteError

# -- site facts ---------------------------------------------------------------------------
MAX_PAGE_LIMIT = 320
RATINGS = {"s": "s", "q": "q", "e": "e"}
VIDEO_EXTENSIONS = frozenset({"webm", "mp4", "swf"})
TAG_GROUPS = ("general", "artist", "copyright", "character", "species", "meta", "lore", "invalid", "contributor")


class E621Client(DanbooruApiClient):
    max_page_limit = MAX_PAGE_LIMIT

    def _tag_rows(self, url: str) -> list[Any]:
        data = self.http.get_json(url, site=self.site, auth=self._auth)
        if isinstance(data, dict) and data.get("tags") == []:
            return []  # e621's way of saying "no tag matches"
        return self._list(data, "answer", url)  # e621's character category is 4 too

    def _post_rows(self, url: str, limit: int) -> tuple[list[Any], bool]:
        data = self._object(self.http.get_json(url, site=self.site, auth=self._auth), "answer", url)
        if "posts" not in data:
            raise SiteError(self.site, url, f"answer has no 'posts' (keys: {sorted(data)[:8]})")
        posts = self._list(data["posts"], "field 'posts'", url)
        return posts, len(posts) >= limit

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        row = self._object(entry, "post entry", url)
        post_id = self._id(row, "id", "post", url)
        ref = f"post {post_id}"
        file = self._object(row.get("file"), f"{ref}: field 'file'", url)
        file_url = self._field(file, "url", str, f"{ref} file", url, optional=True)
        if not file_url:
            return [Listing(post_id, variants=[])]
        ext = self._field(file, "ext", str, f"{ref} file", url)
        original = Variant(ORIGINAL, self._absolute(self.base_url, file_url, ref, url),
                           self._field(file, "width", int, f"{ref} file", url),
                           self._field(file, "height", int, f"{ref} file", url), ext)
        variants = [original]
        sample = row.get("sample")
        if isinstance(sample, dict) and sample.get("has") and sample.get("url") and sample["url"] != file_url:
            sample_url = self._absolute(self.base_url, self._field(sample, "url", str, f"{ref} sample", url), ref, url)
            variants.append(Variant("sample", sample_url, self._field(sample, "width", int, f"{ref} sample", url),
                                    self._field(sample, "height", int, f"{ref} sample", url), extension_of(sample_url)))
        groups = self._object(row.get("tags"), f"{ref}: field 'tags'", url)
        tags_by_group = {name: self._list(groups.get(name, []), f"{ref}: tags.{name}", url) for name in TAG_GROUPS}
        rating = self._field(row, "rating", str, ref, url)
        return [Listing(
            post_id=post_id,
            variants=variants,
            md5=self._field(file, "md5", str, f"{ref} file", url),
            width=original.width,
            height=original.height,
            file_size=self._field(file, "size", int, f"{ref} file", url),
            rating=RATINGS.get(rating, ""),
            tags=[t for name in TAG_GROUPS for t in tags_by_group[name]],
            character_tags=tags_by_group["character"],
            copyright_tags=tags_by_group["copyright"],
            general_tags=tags_by_group["general"],
            media=VIDEO if ext in VIDEO_EXTENSIONS else ANIMATED if "animated" in tags_by_group["meta"] else IMAGE,
        )]
