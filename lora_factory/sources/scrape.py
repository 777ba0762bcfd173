"""Collect a character's posts from every site into content-addressed blobs + a manifest.

The manifest is a Parquet table with one row per (site, post_id, candidate_tag). It is
rewritten (atomically) after every page, so a killed run loses at most one page of rows,
and a re-run reads it first and downloads only what it does not already hold.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa

from lora_factory.sources.danbooru import CHARACTER_CATEGORY, DanbooruClient, PagingStats, SitePost, SiteTag
from lora_factory.sources.http import SiteError
from lora_factory.storage import BlobStore, read_table, write_table

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("post_id", pa.int64()),
        ("candidate_tag", pa.string()),
        ("md5", pa.string()),
        ("sha256", pa.string()),  # of the downloaded bytes; null when the download failed
        ("file_url", pa.string()),
        ("file_ext", pa.string()),
        ("variant", pa.string()),  # "original" or "sample"
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("file_size", pa.int64()),
        ("rating", pa.string()),
        ("tags", pa.string()),  # space-joined, as the site writes them
        ("character_tags", pa.string()),
        ("copyright_tags", pa.string()),
        ("general_tags", pa.string()),
        ("downloaded_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),  # null, or why the file is missing
    ]
)

PER_TAG_COLUMNS = [
    "site", "candidate_tag", "posts", "new_posts", "reused_posts", "downloaded_bytes", "failed",
    "hidden_skipped", "pages", "stop_reason", "listing_error",
]


@dataclass(frozen=True)
class HeldFile:
    """A file the blob store already holds, and when it was downloaded."""

    sha256: str
    downloaded_at: datetime


@dataclass
class ScrapeCounts:
    posts: int = 0  # downloadable posts listed
    new_posts: int = 0  # downloaded in this run
    reused_posts: int = 0  # already held (same site+post id, or same original md5)
    downloaded_bytes: int = 0
    failed: int = 0  # downloads that failed or were refused (see the manifest's error column)
    hidden_skipped: int = 0  # posts the site lists without a file

    def add(self, other: ScrapeCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class ScrapeResult:
    manifest: pd.DataFrame
    counts: ScrapeCounts
    per_tag: pd.DataFrame  # PER_TAG_COLUMNS, one row per (site, candidate_tag)
    listing_errors: list[str] = field(default_factory=list)

    @property
    def per_site(self) -> pd.DataFrame:
        numeric = ["posts", "new_posts", "reused_posts", "downloaded_bytes", "failed", "hidden_skipped", "pages"]
        return self.per_tag.groupby("site", as_index=False)[numeric].sum()


def scrape_character(
    character_key: str,
    candidate_tags_by_site: dict[str, list[str]],
    clients: dict[str, DanbooruClient],
    blobs: BlobStore,
    manifest_path: Path,
    max_posts_per_tag: int = 200,
    log: Callable[[str], None] = print,
    verify_md5: bool = True,
) -> ScrapeResult:
    """Download up to `max_posts_per_tag` posts for every candidate tag on every site.

    A failed or refused download is kept as a manifest row with its reason (and retried
    by the next run); a site that cannot be listed is reported in `listing_errors` and
    the other sites go on. Raises RuntimeError when every listing failed before
    yielding a single post.
    `verify_md5`: check original files against the md5 the site publishes.
    """
    unknown = sorted(set(candidate_tags_by_site) - set(clients))
    if unknown:
        raise ValueError(f"{character_key}: no client configured for site(s) {unknown}; configured: {sorted(clients)}")
    manifest_path = Path(manifest_path)
    rows = _load_manifest_rows(manifest_path)
    held_by_post: dict[tuple[str, int], HeldFile] = {}
    held_by_md5: dict[str, HeldFile] = {}
    for row in rows.values():
        if row["sha256"] and blobs.has(row["sha256"]):
            held = HeldFile(row["sha256"], row["downloaded_at"])
            held_by_post[(row["site"], row["post_id"])] = held
            if row["variant"] == "original":
                held_by_md5[row["md5"]] = held

    totals = ScrapeCounts()
    per_tag: list[dict[str, Any]] = []
    listing_errors: list[str] = []
    for site, tags in candidate_tags_by_site.items():
        client = clients[site]
        for tag in dict.fromkeys(tags):  # de-duplicated, order kept
            counts, stats = ScrapeCounts(), PagingStats()
            listing_error = None
            try:
                for page in client.iter_pages(tag, max_posts_per_tag, stats=stats):
                    for post in page:
                        row = _row_for_post(post, tag, client, blobs, held_by_post, held_by_md5, counts, verify_md5)
                        rows[(site, post.post_id, tag)] = row
                    write_table(_manifest_frame(rows), manifest_path, MANIFEST_SCHEMA)
            except SiteError as exc:
                listing_error = str(exc)
                listing_errors.append(listing_error)
                log(f"{character_key}: listing {site} tag {tag} failed: {listing_error}")
            counts.hidden_skipped = stats.hidden_skipped
            totals.add(counts)
            per_tag.append(
                {"site": site, "candidate_tag": tag, **asdict(counts), "pages": stats.pages,
                 "stop_reason": stats.stop_reason, "listing_error": listing_error}
            )
            log(
                f"{character_key}: {site} {tag}: {counts.posts} posts ({counts.new_posts} new, "
                f"{counts.reused_posts} reused, {counts.failed} failed, {counts.hidden_skipped} hidden), "
                f"{counts.downloaded_bytes} bytes downloaded"
            )
    if per_tag and len(listing_errors) == len(per_tag) and totals.posts == 0:
        raise RuntimeError(
            f"{character_key}: no site could be listed, nothing scraped:\n" + "\n".join(listing_errors)
        )
    manifest = _manifest_frame(rows)
    write_table(manifest, manifest_path, MANIFEST_SCHEMA)
    return ScrapeResult(
        manifest=manifest,
        counts=totals,
        per_tag=pd.DataFrame(per_tag, columns=PER_TAG_COLUMNS),
        listing_errors=listing_errors,
    )


def _row_for_post(
    post: SitePost,
    tag: str,
    client: DanbooruClient,
    blobs: BlobStore,
    held_by_post: dict[tuple[str, int], HeldFile],
    held_by_md5: dict[str, HeldFile],
    counts: ScrapeCounts,
    verify_md5: bool,
) -> dict[str, Any]:
    """The manifest row for `post`, downloading its file only when no blob holds it yet."""
    counts.posts += 1
    row = _post_row(post, tag)
    held = held_by_post.get((post.site, post.post_id))
    if held is None and post.variant == "original":
        held = held_by_md5.get(post.md5)
    if held is not None:
        counts.reused_posts += 1
        row.update(sha256=held.sha256, downloaded_at=held.downloaded_at)
        return row
    try:
        data = client.download(post)
    except SiteError as exc:
        counts.failed += 1
        row["error"] = exc.reason
        return row
    if verify_md5 and post.variant == "original" and hashlib.md5(data).hexdigest() != post.md5:
        counts.failed += 1
        row["error"] = f"md5 mismatch: the downloaded bytes are not the file the site lists (md5 {post.md5})"
        return row
    held = HeldFile(blobs.put(data), datetime.now(timezone.utc))
    held_by_post[(post.site, post.post_id)] = held
    if post.variant == "original":
        held_by_md5[post.md5] = held
    counts.new_posts += 1
    counts.downloaded_bytes += len(data)
    row.update(sha256=held.sha256, downloaded_at=held.downloaded_at)
    return row


def _post_row(post: SitePost, tag: str) -> dict[str, Any]:
    return {
        "site": post.site, "post_id": post.post_id, "candidate_tag": tag, "md5": post.md5,
        "sha256": None, "file_url": post.file_url, "file_ext": post.file_ext, "variant": post.variant,
        "width": post.width, "height": post.height, "file_size": post.file_size, "rating": post.rating,
        "tags": " ".join(post.tags), "character_tags": " ".join(post.character_tags),
        "copyright_tags": " ".join(post.copyright_tags), "general_tags": " ".join(post.general_tags),
        "downloaded_at": None, "error": None,
    }


def _load_manifest_rows(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        table = pa.Table.from_pandas(read_table(path), schema=MANIFEST_SCHEMA, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
        raise ValueError(
            f"{path} is not a scrape manifest with the current schema ({exc}); move it away to rescrape"
        ) from exc
    return {(row["site"], row["post_id"], row["candidate_tag"]): row for row in table.to_pylist()}


def _manifest_frame(rows: dict[tuple[str, int, str], dict[str, Any]]) -> pd.DataFrame:
    return pa.Table.from_pylist(list(rows.values()), schema=MANIFEST_SCHEMA).to_pandas()


# -- candidate tags ---------------------------------------------------------------------


def tag_search_pattern(name: str) -> str | None:
    """A character name in booru tag form, as a prefix pattern: "Ash Ketchum" -> "ash_ketchum*"."""
    text = unicodedata.normalize("NFKC", name).replace("*", " ").strip().lower()
    text = "_".join(text.split())
    return f"{text}*" if text else None


def candidate_tags(
    names: Sequence[str],
    client: DanbooruClient,
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
