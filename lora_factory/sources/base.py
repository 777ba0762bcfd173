"""What every site client shares: the post and tag records, the client interface, paging,
the choice of image variant, and the checks on every downloaded file.

A site family module (danbooru.py, gelbooru.py, ...) only says how to ask its site for one
page and how to read one entry of the answer into a `Listing`. Everything that must behave
the same on every site lives here: duplicate and loop detection while paging, skipping
hidden and animated posts, the variant rule, the pixel cap, md5 verification and
refusing what is not an image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Protocol, runtime_checkable
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from lora_factory.sources.http import DownloadRefused, PoliteHttpClient, SiteError

log = logging.getLogger(__name__)

# Tag categories, numbered as Danbooru numbers them; other sites' categories are mapped here.
GENERAL_CATEGORY = 0
ARTIST_CATEGORY = 1
COPYRIGHT_CATEGORY = 3
CHARACTER_CATEGORY = 4
META_CATEGORY = 5
UNKNOWN_CATEGORY = -1  # the site does not say (Pixiv, local sidecars)

# Ratings are normalised to Danbooru's letters: general, sensitive, questionable, explicit;
# "" when the site does not rate.
RATINGS = ("g", "s", "q", "e")

IMAGE, ANIMATED, VIDEO = "image", "animated", "video"
ORIGINAL = "original"  # the name of the variant that is the uploaded file itself
ANIMATED_POLICIES = ("skip", "first_frame", "frames")
# Formats a still frame of a video can come in (Danbooru's and e621's samples of a video).
STILL_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "avif"})
# The cleaning stage refuses more than this too; refusing here saves the download.
DEFAULT_MAX_PIXELS = 40_000_000
# Post ids end up in tables and logs, never in paths; still, only plain tokens are accepted.
_POST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class SiteTag:
    name: str
    post_count: int  # 0 when the site does not count
    category: int  # CHARACTER_CATEGORY, ..., UNKNOWN_CATEGORY


@dataclass(frozen=True)
class Variant:
    """One downloadable rendition of a post's image."""

    name: str  # "original", "sample", "720x720", "jpeg", "large", ...
    url: str
    width: int | None  # None when the site does not say
    height: int | None
    ext: str

    @property
    def pixels(self) -> int | None:
        return self.width * self.height if self.width is not None and self.height is not None else None


@dataclass
class Listing:
    """One post as a site lists it, before the media rules pick what to download."""

    post_id: str
    variants: list[Variant]  # renditions (thumbnails excluded); empty when the site hides the file
    md5: str = ""  # of the original file; "" when the site does not publish it
    width: int | None = None  # of the original
    height: int | None = None
    file_size: int | None = None  # of the original, in bytes
    rating: str = ""
    tags: list[str] = field(default_factory=list)
    character_tags: list[str] = field(default_factory=list)  # empty where the site does not categorise
    copyright_tags: list[str] = field(default_factory=list)
    general_tags: list[str] = field(default_factory=list)
    media: str = IMAGE  # IMAGE, ANIMATED or VIDEO


@dataclass
class SitePost:
    site: str
    post_id: str  # as the site writes it (numeric ids as decimal strings)
    md5: str  # of the original; "" when unknown
    file_url: str  # absolute URL of the chosen variant
    file_ext: str
    width: int | None  # of the original
    height: int | None
    file_size: int | None  # of the original, in bytes
    rating: str
    tags: list[str]
    character_tags: list[str]
    copyright_tags: list[str]
    general_tags: list[str]
    variant: str = ORIGINAL
    media: str = IMAGE


@dataclass
class PagingStats:
    """What paging one tag saw; filled in while iterating."""

    pages: int = 0
    posts: int = 0
    hidden_skipped: int = 0  # posts without a file: banned, deleted or hidden from this account
    animated_skipped: int = 0  # animated posts and videos, with `animated: skip` (or no still frame)
    oversize_skipped: int = 0  # no variant under the pixel cap
    repeated: int = 0  # posts the site sent again on a later page
    stop_reason: str = ""
    exhausted: bool = False  # the site has no further page for this tag
    next_cursor: str | None = None  # where the walk would go on


@dataclass(frozen=True)
class FetchedFile:
    data: bytes
    variant: str  # the post's variant, with "/first_frame" or "/frame_000" when an animation was cut
    later_frames: tuple[tuple[str, bytes], ...] = ()  # with `animated: frames`: (variant, PNG) after the first

    def stored_files(self) -> list[tuple[str, bytes]]:
        """Every (variant, bytes) this download stores: one file, or each frame kept."""
        return [(self.variant, self.data), *self.later_frames]


def choose_variant(variants: list[Variant], min_side: int | None, max_pixels: int) -> Variant | None:
    """The variant to download: the smallest whose sides both reach `min_side`, else the
    original, else the largest other one; never one over `max_pixels`; None when all are.

    Variants whose size the site does not give are never picked as "big enough", since
    nothing shows they are; the original with an unknown size is checked after download.
    """
    allowed = [v for v in variants if v.pixels is None or v.pixels <= max_pixels]
    if min_side:
        big_enough = [v for v in allowed if v.pixels is not None and min(v.width, v.height) >= min_side]
        if big_enough:
            return min(big_enough, key=lambda v: v.pixels)
    original = next((v for v in allowed if v.name == ORIGINAL), None)
    if original is not None:
        return original
    # The original is over the cap (or a video): the largest rendition that is not.
    return max((v for v in allowed if v.pixels is not None), key=lambda v: v.pixels, default=None)


@dataclass(frozen=True)
class MediaPolicy:
    """Which rendition to download and which files to refuse (the same on every site)."""

    min_side: int | None = None  # None: always the original
    animated: str = "skip"  # "skip", "first_frame", or "frames" (every `frame_step`th, up to `max_frames`)
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify_md5: bool = True  # check originals against the md5 the site publishes
    frame_step: int = 10
    max_frames: int = 8

    def __post_init__(self) -> None:
        if self.animated not in ANIMATED_POLICIES:
            raise ValueError(f"animated must be one of {ANIMATED_POLICIES}, got {self.animated!r}")
        if self.min_side is not None and self.min_side <= 0:
            raise ValueError(f"min_side must be > 0 or None, got {self.min_side}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        if self.frame_step < 1 or self.max_frames < 1:
            raise ValueError(f"frame_step and max_frames must be >= 1, got {self.frame_step} and {self.max_frames}")

    def pick(self, listing: Listing) -> tuple[Variant | None, str]:
        """(variant, "") or (None, why the post is skipped: hidden / animated / oversize)."""
        if not listing.variants:
            return None, "hidden"
        candidates = listing.variants
        if listing.media != IMAGE and self.animated == "skip":
            return None, "animated"
        if listing.media == VIDEO:
            # No video decoder here: a video's first frame is the still the site renders of it.
            candidates = [v for v in candidates if v.ext in STILL_EXTENSIONS]
            if not candidates:
                return None, "animated"
        variant = choose_variant(candidates, self.min_side, self.max_pixels)
        return (variant, "") if variant is not None else (None, "oversize")

    def check_file(self, data: bytes, post: SitePost, url: str) -> FetchedFile:
        """The downloaded bytes, verified: md5, an image at all, under the pixel cap (read
        from the header before decoding), an animation cut to its first frame or refused."""
        if self.verify_md5 and post.variant == ORIGINAL and post.md5:
            if hashlib.md5(data).hexdigest() != post.md5.lower():
                raise DownloadRefused(
                    post.site, url,
                    f"md5 mismatch: the downloaded bytes are not the file the site lists (md5 {post.md5})",
                )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:
            raise DownloadRefused(post.site, url, f"refused: more pixels than the cap of {self.max_pixels}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            head = data.lstrip()[:64].lower()
            what = "an HTML page" if head.startswith((b"<!doctype", b"<html")) else "not an image"
            raise DownloadRefused(post.site, url, f"refused: the file is {what} ({len(data)} bytes)") from None
        width, height = image.size
        if width * height > self.max_pixels:
            raise DownloadRefused(
                post.site, url, f"refused: {width}x{height} is over the pixel cap of {self.max_pixels}"
            )
        if getattr(image, "is_animated", False):
            if self.animated == "skip":
                raise DownloadRefused(post.site, url, "refused: an animated image (animated: skip)")
            if self.animated == "first_frame":
                return FetchedFile(_frame_png(image, 0, post.site, url), f"{post.variant}/first_frame")
            indexes = range(0, getattr(image, "n_frames", 1), self.frame_step)[: self.max_frames]
            frames = [(f"{post.variant}/frame_{n:03d}", _frame_png(image, n, post.site, url)) for n in indexes]
            (variant, first), *later = frames
            return FetchedFile(first, variant, tuple(later))
        return FetchedFile(data, post.variant)


def _frame_png(image: Image.Image, index: int, site: str, url: str) -> bytes:
    try:
        image.seek(index)
        frame = image.convert("RGBA")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DownloadRefused(site, url, f"refused: the animation's frame {index} cannot be decoded ({exc})") from None
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG")
    return buffer.getvalue()


@runtime_checkable
class SiteClient(Protocol):
    """What scraping needs from a site: tag search, paged listing, downloads."""

    site: str
    supports_tag_search: bool
    lists_newest_first: bool  # new uploads appear on the first page (lets re-runs stop early)

    def search_tags(
        self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20
    ) -> list[SiteTag]: ...

    def iter_pages(
        self, tag: str, max_posts: int, cursor: str | None = None, stats: PagingStats | None = None
    ) -> Iterator[list[SitePost]]: ...

    def fetch(self, post: SitePost) -> FetchedFile: ...

    def download(self, post: SitePost) -> bytes: ...


@dataclass
class RawPage:
    """One page of a site's answer, not yet read."""

    url: str  # for error messages (redacted on the way out)
    entries: list[Any]
    next_cursor: str | None  # None: the site says there is no further page


def check_http_url(site: str, name: str, url: str) -> None:
    """A clear error when a configured URL is not http(s) (a config mistake)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{site}: {name} must be an http(s) URL, got {url!r}")


class PagedSiteClient(ABC):
    """Paging, media rules and downloads for one site; a family implements `_fetch_page`
    and `_listings` (and `search_tags`)."""

    max_page_limit: ClassVar[int] = 100
    supports_tag_search: ClassVar[bool] = True
    # Sites paged by page number must be asked the same page size every time, or the
    # pages stop lining up; before-id and token paging may ask less on the last page.
    numbered_pages: ClassVar[bool] = False
    url_schemes: ClassVar[tuple[str, ...]] = ("http", "https")
    lists_newest_first: ClassVar[bool] = True

    def __init__(self, site: str, http: PoliteHttpClient | None, media: MediaPolicy | None = None,
                 page_limit: int = 100):
        if not site:
            raise ValueError("site must be a non-empty name, e.g. 'danbooru'")
        if not 1 <= page_limit <= self.max_page_limit:
            raise ValueError(f"{site}: page_limit must be in 1..{self.max_page_limit}, got {page_limit}")
        self.site = site
        self.http = http
        self.media = media if media is not None else MediaPolicy()
        self.page_limit = page_limit

    # -- what a family provides ---------------------------------------------------------

    @abstractmethod
    def search_tags(
        self, pattern: str, category: int | None = CHARACTER_CATEGORY, limit: int = 20
    ) -> list[SiteTag]:
        """Tags whose name matches `pattern` (`*` is a wildcard), most used first."""

    @abstractmethod
    def _fetch_page(self, tag: str, cursor: str | None, limit: int) -> RawPage:
        """One page of posts tagged `tag`, starting at `cursor` (None: the newest)."""

    @abstractmethod
    def _listings(self, entry: Any, url: str) -> list[Listing]:
        """The post(s) one entry of a page stands for, validated."""

    def _download_headers(self, post: SitePost) -> Mapping[str, str] | None:
        """Extra headers a download needs (a Referer, a token); none by default."""
        return None

    # -- shared behaviour ---------------------------------------------------------------

    def iter_posts(
        self, tag: str, max_posts: int, cursor: str | None = None, stats: PagingStats | None = None
    ) -> Iterator[SitePost]:
        """Up to `max_posts` downloadable posts tagged `tag`, newest first."""
        for page in self.iter_pages(tag, max_posts, cursor, stats):
            yield from page

    def iter_pages(
        self, tag: str, max_posts: int, cursor: str | None = None, stats: PagingStats | None = None
    ) -> Iterator[list[SitePost]]:
        """The same posts as `iter_posts`, one list per API page.

        Stops on an empty page, on the site's last page, at `max_posts`, or on a page
        that repeats only posts already seen (a looping server); every post is yielded
        once even when pages overlap.
        """
        if max_posts < 0:
            raise ValueError(f"max_posts must be >= 0, got {max_posts}")
        stats = stats if stats is not None else PagingStats()
        seen: set[str] = set()
        remaining = max_posts
        while remaining > 0:
            page = self._fetch_page(tag, cursor, self.page_limit if self.numbered_pages else min(self.page_limit, remaining))
            stats.pages += 1
            if not page.entries:
                stats.stop_reason, stats.exhausted = "empty page", True
                return
            posts: list[SitePost] = []
            new_ids = 0
            for entry in page.entries:
                for listing in self._listings(entry, page.url):
                    if listing.post_id in seen:
                        stats.repeated += 1
                        continue
                    seen.add(listing.post_id)
                    new_ids += 1
                    post = self._post_for(listing, stats, page.url)
                    if post is not None:
                        posts.append(post)
            if new_ids == 0:
                stats.stop_reason = "pagination loop: a page repeated only posts already seen"
                log.warning("%s: %s (tag %s)", self.site, stats.stop_reason, tag)
                return
            posts = posts[:remaining]
            remaining -= len(posts)
            stats.posts += len(posts)
            stats.next_cursor = page.next_cursor
            if posts:
                yield posts
            if page.next_cursor is None:
                stats.stop_reason, stats.exhausted = "last page", True
                return
            cursor = page.next_cursor
        stats.stop_reason = f"reached max_posts={max_posts}"

    def _post_for(self, listing: Listing, stats: PagingStats, url: str) -> SitePost | None:
        variant, skipped = self.media.pick(listing)
        if variant is None:
            counter = f"{skipped}_skipped"
            setattr(stats, counter, getattr(stats, counter) + 1)
            return None
        if urlsplit(variant.url).scheme not in self.url_schemes:
            raise SiteError(
                self.site, url, f"post {listing.post_id}: {variant.name} URL is not {'/'.join(self.url_schemes)}: "
                f"{variant.url!r:.80}"
            )
        return SitePost(
            site=self.site, post_id=listing.post_id, md5=listing.md5, file_url=variant.url,
            file_ext=variant.ext, width=listing.width, height=listing.height, file_size=listing.file_size,
            rating=listing.rating, tags=listing.tags, character_tags=listing.character_tags,
            copyright_tags=listing.copyright_tags, general_tags=listing.general_tags,
            variant=variant.name, media=listing.media,
        )

    def fetch(self, post: SitePost) -> FetchedFile:
        """The bytes of `post`'s chosen variant, checked by the media policy."""
        data = self.http.download(post.file_url, site=self.site, headers=self._download_headers(post))
        return self.media.check_file(data, post, post.file_url)

    def download(self, post: SitePost) -> bytes:
        return self.fetch(post).data

    # -- reading answers ----------------------------------------------------------------

    def _object(self, value: Any, what: str, url: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SiteError(self.site, url, f"{what} is not an object: {value!r:.60}")
        return value

    def _list(self, value: Any, what: str, url: str) -> list[Any]:
        if not isinstance(value, list):
            raise SiteError(self.site, url, f"{what} should be a list, got {type(value).__name__}: {str(value)[:120]}")
        return value

    def _field(self, row: Mapping[str, Any], name: str, kind: type, ref: str, url: str, optional: bool = False) -> Any:
        """`row[name]`, which must be a `kind` (None allowed when `optional`)."""
        value = row.get(name)
        if value is None and optional:
            return None
        if kind is float:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            # bool is an int subclass in Python, but never a valid count or id.
            valid = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not valid:
            state = "missing" if name not in row else f"a {type(value).__name__} ({value!r:.40})"
            raise SiteError(self.site, url, f"{ref}: field '{name}' should be {kind.__name__} but is {state}")
        return value

    def _id(self, row: Mapping[str, Any], name: str, ref: str, url: str) -> str:
        """A post id: an int, or a plain token string (Sankaku and Wallhaven use letters)."""
        value = row.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and _POST_ID.match(value):
            return value
        state = "missing" if name not in row else f"{value!r:.40}"
        raise SiteError(self.site, url, f"{ref}: field '{name}' should be a post id but is {state}")

    def _absolute(self, base_url: str, value: str, ref: str, url: str) -> str:
        absolute = urljoin(base_url, value)
        if urlsplit(absolute).scheme not in ("http", "https"):
            raise SiteError(self.site, url, f"{ref}: URL is not http(s): {value!r:.80}")
        return absolute


def extension_of(url_or_name: str) -> str:
    """The lower-case extension of a URL's path or a file name, without the dot ("" if none)."""
    path = urlsplit(url_or_name).path or url_or_name
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def glob_pattern_to_regex(pattern: str) -> re.Pattern[str]:
    """A booru tag pattern (`*` wildcard, case-insensitive) as a regex, for sites whose tag
    search does not filter by pattern itself."""
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.lower().split("*")) + "$")
