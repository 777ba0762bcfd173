"""A folder of images with tag sidecar files, scraped like a site.

`<name>.png` is tagged by `<name>.txt` / `<name>.png.txt` (tags separated by commas,
kohya-style "long hair, blue eyes", or by whitespace, booru-style) or by `<name>.json` /
`<name>.png.json` (`{"tags": [...] or {tag: score}, "character_tags": [...],
"copyright_tags": [...], "rating": "g"}`, waifuc's meta files included). An image without
a sidecar has no tags and is never listed. The post id is the path inside the folder.
Nothing outside the folder is read: symbolic links leading out of it are ignored.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from lora_factory.sources.base import (
    CHARACTER_CATEGORY,
    COPYRIGHT_CATEGORY,
    ORIGINAL,
    RATINGS,
    UNKNOWN_CATEGORY,
    FetchedFile,
    Listing,
    MediaPolicy,
    PagedSiteClient,
    RawPage,
    SitePost,
    SiteTag,
    Variant,
    glob_pattern_to_regex,
)
from lora_factory.sources.http import DownloadRefused, SiteError

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "gif", "bmp", "avif"})
DEFAULT_MAX_FILE_BYTES = 50 * 2**20


@dataclass(frozen=True)
class _LocalImage:
    relative: str  # posix path inside the folder: the post id
    tags: tuple[str, ...]
    character_tags: tuple[str, ...]
    copyright_tags: tuple[str, ...]
    rating: str


class LocalFolderClient(PagedSiteClient):
    url_schemes = ("file",)
    lists_newest_first = False  # listed by path: a new file can land on any page

    def __init__(self, site: str, folder: str | Path, media: MediaPolicy | None = None, page_limit: int = 100,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        super().__init__(site, None, media, page_limit)
        self.root = Path(folder).expanduser().resolve()
        if not self.root.is_dir():
            raise ValueError(f"{site}: folder {str(folder)!r} does not exist or is not a folder")
        self.max_file_bytes = max_file_bytes
        self._walk: tuple[str, list[_LocalImage]] | None = None  # (tag, images) of the walk under way

    # -- the folder's catalogue ---------------------------------------------------------

    def _catalogue(self) -> list[_LocalImage]:
        images = []
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root)
            if any(part.startswith(".") for part in relative.parts) or path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                continue
            if not self._inside(path) or not path.is_file():
                continue  # a link leading out of the folder, or not a file
            image = self._read_sidecar(path, relative.as_posix())
            if image is not None:
                images.append(image)
        return images

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def _read_sidecar(self, path: Path, relative: str) -> _LocalImage | None:
        stem = path.with_suffix("")
        for sidecar in (path.with_name(path.name + ".json"), stem.with_suffix(".json")):
            if sidecar.is_file() and self._inside(sidecar):
                return self._json_sidecar(sidecar, relative)
        for sidecar in (path.with_name(path.name + ".txt"), stem.with_suffix(".txt")):
            if sidecar.is_file() and self._inside(sidecar):
                text = sidecar.read_text(encoding="utf-8", errors="replace")
                return _LocalImage(relative, tuple(_split_tags(text)), (), (), "")
        return None

    def _json_sidecar(self, sidecar: Path, relative: str) -> _LocalImage:
        where = str(sidecar.relative_to(self.root))
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SiteError(self.site, where, f"sidecar is not valid JSON: {exc}") from None
        meta = self._object(meta, "sidecar", where)
        tags = meta.get("tags", [])
        if isinstance(tags, dict):  # waifuc / tagger output: {tag: score}
            tags = list(tags)
        names = {}
        for key, value in (("tags", tags), ("character_tags", meta.get("character_tags", [])),
                           ("copyright_tags", meta.get("copyright_tags", []))):
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise SiteError(self.site, where, f"sidecar field '{key}' should be a list of tag names")
            names[key] = tuple(t.strip().replace(" ", "_") for t in value if t.strip())
        rating = meta.get("rating", "")
        return _LocalImage(relative, tuple(dict.fromkeys(names["tags"] + names["character_tags"] + names["copyright_tags"])),
                           names["character_tags"], names["copyright_tags"], rating if rating in RATINGS else "")

    # -- the client interface -----------------------------------------------------------

    def search_tags(self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20) -> list[SiteTag]:
        """Sidecar tags matching `pattern`. Tags of unknown category pass any category filter."""
        wanted = glob_pattern_to_regex(pattern)
        counts: dict[str, int] = {}
        categories: dict[str, int] = {}
        for image in self._catalogue():
            for tag in image.tags:
                if wanted.match(tag.lower()):
                    counts[tag] = counts.get(tag, 0) + 1
                    categories[tag] = (CHARACTER_CATEGORY if tag in image.character_tags else
                                       COPYRIGHT_CATEGORY if tag in image.copyright_tags else
                                       categories.get(tag, UNKNOWN_CATEGORY))
        tags = [SiteTag(name, count, categories[name]) for name, count in counts.items()
                if category is None or categories[name] in (category, UNKNOWN_CATEGORY)]
        return sorted(tags, key=lambda t: (-t.post_count, t.name))[:limit]

    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        start = int(cursor) if cursor else 0
        if cursor is None or self._walk is None or self._walk[0] != tag:
            self._walk = (tag, [image for image in self._catalogue() if tag in image.tags])
        tagged = self._walk[1]
        entries = tagged[start:start + limit]
        end = start + len(entries)
        return RawPage(self.root.as_uri(), entries, str(end) if end < len(tagged) else None)

    def _listings(self, entry: Any, url: str) -> list[Listing]:
        image: _LocalImage = entry
        path = self.root / image.relative
        width = height = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as opened:  # the header only
                    width, height = opened.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            pass  # refused with a reason when fetched
        return [Listing(
            post_id=image.relative,
            variants=[Variant(ORIGINAL, path.as_uri(), width, height, path.suffix.lower().lstrip("."))],
            width=width,
            height=height,
            file_size=path.stat().st_size,
            rating=image.rating,
            tags=list(image.tags),
            character_tags=list(image.character_tags),
            copyright_tags=list(image.copyright_tags),
        )]

    def fetch(self, post: SitePost) -> FetchedFile:
        path = Path(unquote(urlsplit(post.file_url).path))
        if not self._inside(path):
            raise DownloadRefused(self.site, post.post_id, "refused: the file is outside the folder")
        size = path.stat().st_size
        if size > self.max_file_bytes:
            raise DownloadRefused(self.site, post.post_id,
                                  f"refused: {size} bytes, over the limit of {self.max_file_bytes} bytes")
        with path.open("rb") as handle:
            data = handle.read(self.max_file_bytes + 1)
        return self.media.check_file(data, post, post.post_id)


def _split_tags(text: str) -> list[str]:
    """Comma-separated captions ("long hair, blue eyes") or whitespace-separated booru tags."""
    parts = text.split(",") if "," in text else text.split()
    return list(dict.fromkeys(p.strip().replace(" ", "_") for p in parts if p.strip()))
