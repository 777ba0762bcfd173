"""Collect a character's posts from every site into content-addressed blobs + a manifest.

The manifest is a Parquet table with one row per (site, post_id, candidate_tag). Each page
of rows is written (atomically) as its own part and the parts are folded into the one
manifest file at the end of the run (or at the start of the next, after a kill), so a killed
run loses at most one page of rows and memory stays flat in the number of posts. A re-run
reads the manifest first and downloads only what it does not already hold. The same
picture found on two sites (or twice on one) is stored once: blobs are named by content,
and a file whose original md5 is already held is not downloaded again.

A re-run also lists less: once a walk over a (site, tag) has finished, the next run stops
at the first page whose posts are all stored, unless older failures still wait for a retry.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa

from lora_factory.sources.base import (
    CHARACTER_CATEGORY,
    ORIGINAL,
    PagingStats,
    SiteClient,
    SitePost,
    SiteTag,
)
from lora_factory.sources.http import SiteError
from lora_factory.sources.manifest_parts import ManifestParts
from lora_factory.storage import BlobStore, atomic_write_json, read_table, write_table

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("post_id", pa.string()),  # as the site writes it: Sankaku and Wallhaven ids are not numbers
        ("candidate_tag", pa.string()),
        ("md5", pa.string()),  # of the original, as the site publishes it; "" when it does not
        ("sha256", pa.string()),  # of the stored bytes; null when the download failed
        ("file_url", pa.string()),
        ("file_ext", pa.string()),
        ("variant", pa.string()),  # "original", "sample", ...; "/first_frame" or "/frame_NNN" for a cut animation
        ("media", pa.string()),  # image, animated or video, as listed
        ("width", pa.int64()),  # of the original; null when the site does not say
        ("height", pa.int64()),
        ("file_size", pa.int64()),
        ("rating", pa.string()),  # g / s / q / e, or "" when the site does not rate
        ("tags", pa.string()),  # space-joined, as the site writes them
        ("character_tags", pa.string()),
        ("copyright_tags", pa.string()),
        ("general_tags", pa.string()),
        ("downloaded_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),  # null, or why the file is missing
    ]
)

KEY_COLUMNS = ["site", "post_id", "candidate_tag"]
HELD_COLUMNS = ["site", "post_id", "candidate_tag", "md5", "sha256", "downloaded_at", "variant"]

PER_TAG_COLUMNS = [
    "site", "candidate_tag", "posts", "new_posts", "reused_posts", "downloaded_bytes", "failed",
    "hidden_skipped", "animated_skipped", "oversize_skipped", "pages", "stop_reason", "listing_error",
]
COUNT_COLUMNS = [
    "posts", "new_posts", "reused_posts", "downloaded_bytes", "failed",
    "hidden_skipped", "animated_skipped", "oversize_skipped", "pages",
]
CAUGHT_UP = "caught up: a whole page was already stored"


@dataclass(frozen=True, slots=True)  # one per stored post: kept small
class HeldFile:
    """A file the blob store already holds, when it was downloaded, and which rendition."""

    sha256: str
    downloaded_at: datetime
    variant: str


@dataclass
class ScrapeCounts:
    posts: int = 0  # downloadable posts listed
    new_posts: int = 0  # downloaded in this run
    reused_posts: int = 0  # already held (same site+post id, or same original md5 on any site)
    downloaded_bytes: int = 0
    failed: int = 0  # downloads that failed or were refused (see the manifest's error column)
    hidden_skipped: int = 0  # posts the site lists without a file
    animated_skipped: int = 0  # animations and videos skipped by the `animated` setting
    oversize_skipped: int = 0  # posts with no rendition under the pixel cap

    def add(self, other: ScrapeCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class ScrapeResult:
    manifest_path: Path
    counts: ScrapeCounts
    per_tag: pd.DataFrame  # PER_TAG_COLUMNS, one row per (site, candidate_tag)
    listing_errors: list[str] = field(default_factory=list)
    manifest_stamp: tuple[int, int, int] | None = None  # the file this run wrote; see `manifest`

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """The whole manifest this run wrote, read on first use (scraping itself never holds it)."""
        if self.manifest_stamp is not None and _file_stamp(self.manifest_path) != self.manifest_stamp:
            raise RuntimeError(
                f"{self.manifest_path} was rewritten after this scrape; read `.manifest` before scraping "
                "the same path again"
            )
        return read_table(self.manifest_path)

    @property
    def per_site(self) -> pd.DataFrame:
        return self.per_tag.groupby("site", as_index=False)[COUNT_COLUMNS].sum()


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Changes whenever the file is replaced (atomic writes give a new inode)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@dataclass
class _TagWalk:
    """What earlier runs left for one (site, tag): which posts are stored, which failed,
    and whether their walk ended properly (so this one may stop where they began)."""

    stored: set[str]
    failed: set[str]
    may_stop_early: bool


def walks_path(manifest_path: Path) -> Path:
    """Where the per-(site, tag) walk states live, next to the manifest."""
    return manifest_path.with_name(manifest_path.stem + ".walks.json")


def scrape_character(
    character_key: str,
    candidate_tags_by_site: dict[str, list[str]],
    clients: dict[str, SiteClient],
    blobs: BlobStore,
    manifest_path: Path,
    max_posts_per_tag: int = 200,
    log: Callable[[str], None] = print,
) -> ScrapeResult:
    """Download up to `max_posts_per_tag` posts for every candidate tag on every site.

    A failed or refused download is kept as a manifest row with its reason (and retried
    by the next run); a site that cannot be listed is reported in `listing_errors` and
    the other sites go on. Raises RuntimeError when every listing failed before
    yielding a single post.
    """
    unknown = sorted(set(candidate_tags_by_site) - set(clients))
    if unknown:
        raise ValueError(f"{character_key}: no client configured for site(s) {unknown}; configured: {sorted(clients)}")
    manifest_path = Path(manifest_path)
    parts = ManifestParts(manifest_path, MANIFEST_SCHEMA, KEY_COLUMNS)
    parts.compact()  # pages a killed run left behind
    walks_file = walks_path(manifest_path)
    walks: dict[str, dict[str, Any]] = _load_walks(walks_file)
    # Only what dedup and resuming need stays in memory, not the rows themselves.
    posts_by_tag: dict[tuple[str, str], set[str]] = {}
    held_by_post: dict[tuple[str, str], dict[str, HeldFile]] = {}
    held_by_md5: dict[str, HeldFile] = {}
    for table in parts.iter_batches(HELD_COLUMNS):
        for row in table.to_pylist():
            posts_by_tag.setdefault((row["site"], row["candidate_tag"]), set()).add(row["post_id"])
            if row["sha256"] and blobs.has(row["sha256"]):
                held = HeldFile(row["sha256"], row["downloaded_at"], row["variant"])
                held_by_post.setdefault((row["site"], row["post_id"]), {})[row["variant"]] = held
                if row["variant"] == ORIGINAL and row["md5"]:
                    held_by_md5[row["md5"]] = held

    try:
        totals, per_tag, listing_errors = _scrape_tags(
            character_key, candidate_tags_by_site, clients, blobs, parts, walks, walks_file,
            posts_by_tag, held_by_post, held_by_md5, max_posts_per_tag, log,
        )
    finally:
        parts.compact()  # also after an interrupt, so the manifest holds every finished page
    if per_tag and len(listing_errors) == len(per_tag) and totals.posts == 0:
        raise RuntimeError(
            f"{character_key}: no site could be listed, nothing scraped:\n" + "\n".join(listing_errors)
        )
    if not manifest_path.is_file():
        write_table(pa.Table.from_pylist([], schema=MANIFEST_SCHEMA).to_pandas(), manifest_path, MANIFEST_SCHEMA)
    return ScrapeResult(
        manifest_path=manifest_path,
        manifest_stamp=_file_stamp(manifest_path),
        counts=totals,
        per_tag=pd.DataFrame(per_tag, columns=PER_TAG_COLUMNS),
        listing_errors=listing_errors,
    )


def _scrape_tags(
    character_key: str,
    candidate_tags_by_site: dict[str, list[str]],
    clients: dict[str, SiteClient],
    blobs: BlobStore,
    parts: ManifestParts,
    walks: dict[str, dict[str, Any]],
    walks_file: Path,
    posts_by_tag: dict[tuple[str, str], set[str]],
    held_by_post: dict[tuple[str, str], dict[str, HeldFile]],
    held_by_md5: dict[str, HeldFile],
    max_posts_per_tag: int,
    log: Callable[[str], None],
) -> tuple[ScrapeCounts, list[dict[str, Any]], list[str]]:
    totals = ScrapeCounts()
    per_tag: list[dict[str, Any]] = []
    listing_errors: list[str] = []
    for site, tags in candidate_tags_by_site.items():
        client = clients[site]
        for tag in dict.fromkeys(tags):  # de-duplicated, order kept
            walk_key = f"{site}\t{tag}"
            walk = _tag_walk(posts_by_tag.get((site, tag), set()), site, held_by_post, walks.get(walk_key),
                             max_posts_per_tag, getattr(client, "lists_newest_first", False))
            counts, stats = ScrapeCounts(), PagingStats()
            listing_error = None
            caught_up = False
            try:
                for page in client.iter_pages(tag, max_posts_per_tag, stats=stats):
                    page_rows = []
                    for post in page:
                        walk.failed.discard(post.post_id)  # retried now, whatever comes of it
                        page_rows.extend(_rows_for_post(post, tag, client, blobs, held_by_post, held_by_md5, counts))
                    parts.append(page_rows)
                    if walk.may_stop_early and not walk.failed and all(p.post_id in walk.stored for p in page):
                        caught_up = True
                        stats.stop_reason = CAUGHT_UP
                        break
            except SiteError as exc:
                listing_error = str(exc)
                listing_errors.append(listing_error)
                log(f"{character_key}: listing {site} tag {tag} failed: {listing_error}")
            # Only a walk that ended properly lets the next run stop at its first stored page;
            # an interrupted one is walked again in full (downloading only what is missing).
            finished = listing_error is None and (caught_up or stats.exhausted or stats.stop_reason.startswith("reached"))
            walks[walk_key] = {"finished": finished, "max_posts": max_posts_per_tag}
            atomic_write_json(walks_file, walks)
            counts.hidden_skipped = stats.hidden_skipped
            counts.animated_skipped = stats.animated_skipped
            counts.oversize_skipped = stats.oversize_skipped
            totals.add(counts)
            per_tag.append(
                {"site": site, "candidate_tag": tag, **asdict(counts), "pages": stats.pages,
                 "stop_reason": stats.stop_reason, "listing_error": listing_error}
            )
            log(
                f"{character_key}: {site} {tag}: {counts.posts} posts ({counts.new_posts} new, "
                f"{counts.reused_posts} reused, {counts.failed} failed, {counts.hidden_skipped} hidden, "
                f"{counts.animated_skipped} animated skipped, {counts.oversize_skipped} over the pixel cap), "
                f"{counts.downloaded_bytes} bytes downloaded in {stats.pages} pages; {stats.stop_reason}"
            )
    return totals, per_tag, listing_errors


def _tag_walk(
    post_ids: set[str],
    site: str,
    held_by_post: dict[tuple[str, str], dict[str, HeldFile]],
    previous: dict[str, Any] | None,
    max_posts: int,
    newest_first: bool,
) -> _TagWalk:
    stored, failed = set(), set()
    for post_id in post_ids:
        (stored if (site, post_id) in held_by_post else failed).add(post_id)
    # A walk that went less deep than this run may go does not cover the older posts.
    finished = bool(previous and previous.get("finished") and previous.get("max_posts", 0) >= max_posts)
    # Only where new uploads come first does a page of stored posts mean "nothing new below".
    return _TagWalk(stored, failed, may_stop_early=newest_first and finished and bool(stored))


def _rows_for_post(
    post: SitePost,
    tag: str,
    client: SiteClient,
    blobs: BlobStore,
    held_by_post: dict[tuple[str, str], dict[str, HeldFile]],
    held_by_md5: dict[str, HeldFile],
    counts: ScrapeCounts,
) -> list[dict[str, Any]]:
    """The manifest rows for `post` (one, or one per animation frame kept), downloading its
    file only when no blob holds it yet."""
    counts.posts += 1
    row = _post_row(post, tag)
    held = held_by_post.get((post.site, post.post_id))
    if held is None and post.variant == ORIGINAL and post.md5 and post.md5 in held_by_md5:
        the_same = held_by_md5[post.md5]  # the same original, found on another site or post
        held = {the_same.variant: the_same}
    if held is not None:
        counts.reused_posts += 1
        held_by_post[(post.site, post.post_id)] = held
        return [{**row, "sha256": h.sha256, "downloaded_at": h.downloaded_at, "variant": h.variant}
                for h in held.values()]
    try:
        fetched = client.fetch(post)
    except SiteError as exc:
        counts.failed += 1
        row["error"] = exc.reason
        return [row]
    now = datetime.now(timezone.utc)
    held = {variant: HeldFile(blobs.put(data), now, variant) for variant, data in fetched.stored_files()}
    held_by_post[(post.site, post.post_id)] = held
    if fetched.variant == ORIGINAL and post.md5:
        held_by_md5[post.md5] = held[ORIGINAL]
    counts.new_posts += 1
    counts.downloaded_bytes += sum(len(data) for _, data in fetched.stored_files())
    return [{**row, "sha256": h.sha256, "downloaded_at": h.downloaded_at, "variant": h.variant}
            for h in held.values()]


def _post_row(post: SitePost, tag: str) -> dict[str, Any]:
    return {
        "site": post.site, "post_id": post.post_id, "candidate_tag": tag, "md5": post.md5,
        "sha256": None, "file_url": post.file_url, "file_ext": post.file_ext, "variant": post.variant,
        "media": post.media, "width": post.width, "height": post.height, "file_size": post.file_size,
        "rating": post.rating, "tags": " ".join(post.tags), "character_tags": " ".join(post.character_tags),
        "copyright_tags": " ".join(post.copyright_tags), "general_tags": " ".join(post.general_tags),
        "downloaded_at": None, "error": None,
    }


def _load_walks(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        walks = json.loads(path.read_text())
    except ValueError:
        return {}  # unreadable: every tag is walked in full, which is always safe
    return walks if isinstance(walks, dict) else {}


# -- candidate tags ---------------------------------------------------------------------


def tag_search_pattern(name: str) -> str | None:
    """A character name in booru tag form, as a prefix pattern: "Ash Ketchum" -> "ash_ketchum*"."""
    text = unicodedata.normalize("NFKC", name).replace("*", " ").strip().lower()
    text = "_".join(text.split())
    return f"{text}*" if text else None


def candidate_tags(
    names: Sequence[str],
    client: SiteClient,
    forced_tags: Sequence[str] = (),
    franchise: str | None = None,
    limit_per_name: int = 20,
) -> list[SiteTag]:
    """Character tags on `client`'s site that may be this character, forced tags first.

    Each name is searched as a prefix ("Ash" -> "ash*"); with `franchise`, also as
    "ash*<franchise>*" so that a popular namesake cannot crowd the right tag out of the
    top `limit_per_name`. Forced tags (the index's per-site override) are always kept,
    with post_count 0 when the site does not know them.
    """
    found: dict[str, SiteTag] = {}
    for tag in forced_tags:
        exact = [t for t in client.search_tags(tag, category=None, limit=1) if t.name == tag]
        if not exact:
            logger.warning("%s: forced tag %r is unknown to the site", client.site, tag)
        found[tag] = exact[0] if exact else SiteTag(tag, 0, CHARACTER_CATEGORY)
    patterns: list[str] = []
    for name in names:
        pattern = tag_search_pattern(name)
        if pattern is None:
            continue
        patterns.append(pattern)
        if franchise:
            patterns.append(f"{pattern}{franchise.lower()}*")
    searched: list[SiteTag] = []
    for pattern in dict.fromkeys(patterns):
        searched.extend(client.search_tags(pattern, category=CHARACTER_CATEGORY, limit=limit_per_name))
    for tag in sorted(searched, key=lambda t: -t.post_count):
        found.setdefault(tag.name, tag)
    return list(found.values())


def candidates_frame(tags_by_site: dict[str, list[SiteTag]]) -> pd.DataFrame:
    """The (site, tag, post_count, category) table that matching takes as `candidates`."""
    records = [
        {"site": site, "tag": t.name, "post_count": t.post_count, "category": t.category}
        for site, tags in tags_by_site.items()
        for t in tags
    ]
    return pd.DataFrame(records, columns=["site", "tag", "post_count", "category"])
