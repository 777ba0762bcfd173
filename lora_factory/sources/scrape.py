"""Collect a character's posts from every site into content-addressed blobs + a manifest.

The manifest is a Parquet table with one row per (site, post_id, candidate_tag). Each page
of rows is written (atomically) as its own part and the parts are folded into the one
manifest file at the end of the run (or at the start of the next, after a kill), so a killed
run loses at most one page of rows and memory stays flat in the number of posts. A re-run
reads the manifest first and downloads only what it does not already hold intact: every
stored file is checked against its sha256, and a damaged or missing one is downloaded again.
The same picture found on two sites (or twice on one) is stored once: blobs are named by
content, and a file whose original md5 is already held is not downloaded again.

A re-run also lists less: once a walk over a (site, tag) has finished, the next run stops
at the first page whose posts are all stored, unless older failures still wait for a retry.

Sites fail independently: a site whose tag search, listing or downloads fail is recorded in
`ScrapeResult.site_errors` and the others go on; a scrape fails only when no site produced
a single post.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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
    "site", "candidate_tag", "posts", "new_posts", "repaired", "reused_posts", "downloaded_bytes", "failed",
    "hidden_skipped", "animated_skipped", "oversize_skipped", "pages", "stop_reason", "listing_error",
]
COUNT_COLUMNS = [
    "posts", "new_posts", "repaired", "reused_posts", "downloaded_bytes", "failed",
    "hidden_skipped", "animated_skipped", "oversize_skipped", "pages",
]
CAUGHT_UP = "caught up: a whole page was already stored"

# The phases of a site's scrape that fail as a whole (SiteFailure.phase).
TAG_SEARCH, LISTING, DOWNLOADS = "tag search", "listing", "downloads"


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
    repaired: int = 0  # of new_posts: stored before, but the stored file was damaged or missing
    reused_posts: int = 0  # already held (same site+post id, or same original md5 on any site)
    downloaded_bytes: int = 0
    failed: int = 0  # downloads that failed or were refused (see the manifest's error column)
    hidden_skipped: int = 0  # posts the site lists without a file
    animated_skipped: int = 0  # animations and videos skipped by the `animated` setting
    oversize_skipped: int = 0  # posts with no rendition under the pixel cap

    def add(self, other: ScrapeCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class SiteFailure:
    """One phase of one site that failed; the scrape went on without it."""

    site: str
    phase: str  # TAG_SEARCH, LISTING or DOWNLOADS
    message: str

    def __str__(self) -> str:
        return f"{self.site} ({self.phase}): {self.message}"


@dataclass
class ScrapeResult:
    manifest_path: Path
    counts: ScrapeCounts
    per_tag: pd.DataFrame  # PER_TAG_COLUMNS, one row per (site, candidate_tag)
    site_errors: list[SiteFailure] = field(default_factory=list)
    # (site, tag, post_count, category) found by `find_and_scrape`; empty from `scrape_character`
    candidates: pd.DataFrame = field(default_factory=lambda: candidates_frame({}))
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


@dataclass
class _Held:
    """What earlier runs stored, as far as dedup and resuming need it (not the rows themselves)."""

    posts_by_tag: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    by_post: dict[tuple[str, str], dict[str, HeldFile]] = field(default_factory=dict)
    by_md5: dict[str, HeldFile] = field(default_factory=dict)
    lost: set[tuple[str, str]] = field(default_factory=set)  # stored once, but the file is damaged or gone


def walks_path(manifest_path: Path) -> Path:
    """Where the per-(site, tag) walk states live, next to the manifest."""
    return manifest_path.with_name(manifest_path.stem + ".walks.json")


def candidates_path(manifest_path: Path) -> Path:
    """Where `find_and_scrape` writes the candidate tags table, next to the manifest."""
    return manifest_path.with_name(manifest_path.stem + ".candidates.parquet")


def find_and_scrape(
    character_key: str,
    names: Sequence[str],
    clients: dict[str, SiteClient],
    blobs: BlobStore,
    manifest_path: Path,
    franchise: str | None = None,
    site_tags: Mapping[str, str] | None = None,
    max_posts_per_tag: int = 200,
    log: Callable[[str], None] = print,
) -> ScrapeResult:
    """Search every site for the character's tags (`candidate_tags`), then scrape them all.

    `site_tags` forces a tag per site (the index's override). A site whose tag search
    fails is skipped and recorded in `site_errors`, like one whose listing or downloads
    fail in `scrape_character`. The candidates table is in the result and is written to
    `candidates_path(manifest_path)`. Raises RuntimeError, saying what happened on each
    site, when no site produced a post.
    """
    site_tags = site_tags or {}
    tags_by_site: dict[str, list[SiteTag]] = {}
    search_errors: list[SiteFailure] = []
    for site, client in clients.items():
        forced = [site_tags[site]] if site in site_tags else []
        try:
            tags_by_site[site] = candidate_tags(names, client, forced_tags=forced, franchise=franchise)
        except SiteError as exc:
            search_errors.append(SiteFailure(site, TAG_SEARCH, f"{exc.reason} [{exc.url}]"))
            log(f"{character_key}: skipping {search_errors[-1]}")
    candidates = candidates_frame(tags_by_site)
    log(f"{character_key}: candidate tags {candidates[['site', 'tag']].values.tolist()}")
    result = _scrape(
        character_key, {site: [tag.name for tag in tags] for site, tags in tags_by_site.items()},
        clients, blobs, Path(manifest_path), max_posts_per_tag, log,
    )
    result = replace(result, candidates=candidates, site_errors=search_errors + result.site_errors)
    _require_posts(character_key, clients, result)
    write_table(candidates, candidates_path(result.manifest_path))
    return result


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
    by the next run). A site that cannot be listed, or whose every download failed, is
    recorded in `site_errors` and the other sites go on. Raises RuntimeError, naming each
    site's error, when no site produced a post.
    """
    result = _scrape(character_key, candidate_tags_by_site, clients, blobs, Path(manifest_path),
                     max_posts_per_tag, log)
    _require_posts(character_key, candidate_tags_by_site, result)
    return result


def _scrape(
    character_key: str,
    candidate_tags_by_site: dict[str, list[str]],
    clients: dict[str, SiteClient],
    blobs: BlobStore,
    manifest_path: Path,
    max_posts_per_tag: int,
    log: Callable[[str], None],
) -> ScrapeResult:
    unknown = sorted(set(candidate_tags_by_site) - set(clients))
    if unknown:
        raise ValueError(f"{character_key}: no client configured for site(s) {unknown}; configured: {sorted(clients)}")
    parts = ManifestParts(manifest_path, MANIFEST_SCHEMA, KEY_COLUMNS)
    parts.compact()  # pages a killed run left behind
    held = _load_held(parts, blobs)
    if held.lost:
        log(f"{character_key}: {len(held.lost)} stored posts have a damaged or missing file: downloading them again")
    try:
        totals, per_tag, site_errors = _scrape_sites(
            character_key, candidate_tags_by_site, clients, blobs, parts, held, max_posts_per_tag, log,
        )
    finally:
        parts.compact()  # also after an interrupt, so the manifest holds every finished page
    if not manifest_path.is_file():
        write_table(pa.Table.from_pylist([], schema=MANIFEST_SCHEMA).to_pandas(), manifest_path, MANIFEST_SCHEMA)
    return ScrapeResult(
        manifest_path=manifest_path,
        manifest_stamp=_file_stamp(manifest_path),
        counts=totals,
        per_tag=pd.DataFrame(per_tag, columns=PER_TAG_COLUMNS),
        site_errors=site_errors,
    )


def _load_held(parts: ManifestParts, blobs: BlobStore) -> _Held:
    """What the manifest says is stored, each blob checked once against its sha256: a post
    counts as held only when every one of its files is intact."""
    held = _Held()
    intact: dict[str, bool] = {}
    for table in parts.iter_batches(HELD_COLUMNS):
        for row in table.to_pylist():
            post = (row["site"], row["post_id"])
            held.posts_by_tag.setdefault((row["site"], row["candidate_tag"]), set()).add(row["post_id"])
            sha = row["sha256"]
            if not sha:
                continue  # a failed download: retried as such, not a repair
            if sha not in intact:
                intact[sha] = blobs.verify(sha)  # a damaged blob is set aside
            if not intact[sha]:
                held.lost.add(post)
                continue
            file = HeldFile(sha, row["downloaded_at"], row["variant"])
            held.by_post.setdefault(post, {})[row["variant"]] = file
            if row["variant"] == ORIGINAL and row["md5"]:
                held.by_md5[row["md5"]] = file
    for post in held.lost:
        held.by_post.pop(post, None)  # one lost frame of an animation downloads the whole post again
    return held


def _require_posts(character_key: str, sites: Iterable[str], result: ScrapeResult) -> None:
    """Raise, saying what happened on each site, when no site produced a single post."""
    if result.counts.new_posts or result.counts.reused_posts:
        return
    lines = [str(failure) for failure in result.site_errors]
    failed = {failure.site for failure in result.site_errors}
    scraped = set(result.per_tag["site"])
    untagged = []
    for site in sites:
        if site in scraped - failed:
            lines.append(f"{site}: no downloadable post under its candidate tags")
        elif site not in failed:
            untagged.append(site)
            lines.append(f"{site}: no character tag for any of the names")
    hint = "\nAdd aliases to the index row, or force a tag with site_tags: {<site>: <tag>}." if untagged else ""
    lines = lines or ["no site was given"]
    raise RuntimeError(f"{character_key}: no site produced a post:\n" + "\n".join(f"- {line}" for line in lines) + hint)


def _scrape_sites(
    character_key: str,
    candidate_tags_by_site: dict[str, list[str]],
    clients: dict[str, SiteClient],
    blobs: BlobStore,
    parts: ManifestParts,
    held: _Held,
    max_posts_per_tag: int,
    log: Callable[[str], None],
) -> tuple[ScrapeCounts, list[dict[str, Any]], list[SiteFailure]]:
    walks_file = walks_path(parts.manifest_path)
    walks = _load_walks(walks_file)
    totals = ScrapeCounts()
    per_tag: list[dict[str, Any]] = []
    site_errors: list[SiteFailure] = []
    for site, tags in candidate_tags_by_site.items():
        client = clients[site]
        site_counts = ScrapeCounts()
        first_download_error = None
        for tag in dict.fromkeys(tags):  # de-duplicated, order kept
            walk_key = f"{site}\t{tag}"
            walk = _tag_walk(held.posts_by_tag.get((site, tag), set()), site, held.by_post, walks.get(walk_key),
                             max_posts_per_tag, getattr(client, "lists_newest_first", False))
            counts, stats = ScrapeCounts(), PagingStats()
            listing_error = None
            caught_up = False
            try:
                for page in client.iter_pages(tag, max_posts_per_tag, stats=stats):
                    page_rows = []
                    for post in page:
                        walk.failed.discard(post.post_id)  # retried now, whatever comes of it
                        page_rows.extend(_rows_for_post(post, tag, client, blobs, held, counts))
                    parts.append(page_rows)
                    if first_download_error is None:
                        first_download_error = next((row["error"] for row in page_rows if row["error"]), None)
                    if walk.may_stop_early and not walk.failed and all(p.post_id in walk.stored for p in page):
                        caught_up = True
                        stats.stop_reason = CAUGHT_UP
                        break
            except SiteError as exc:
                listing_error = str(exc)
                site_errors.append(SiteFailure(site, LISTING, f"tag {tag}: {exc.reason} [{exc.url}]"))
                log(f"{character_key}: listing {site} tag {tag} failed: {listing_error}")
            # Only a walk that ended properly lets the next run stop at its first stored page;
            # an interrupted one is walked again in full (downloading only what is missing).
            finished = listing_error is None and (caught_up or stats.exhausted or stats.stop_reason.startswith("reached"))
            _save_walk(parts, walks_file, walk_key, {"finished": finished, "max_posts": max_posts_per_tag})
            counts.hidden_skipped = stats.hidden_skipped
            counts.animated_skipped = stats.animated_skipped
            counts.oversize_skipped = stats.oversize_skipped
            site_counts.add(counts)
            per_tag.append(
                {"site": site, "candidate_tag": tag, **asdict(counts), "pages": stats.pages,
                 "stop_reason": stats.stop_reason, "listing_error": listing_error}
            )
            log(
                f"{character_key}: {site} {tag}: {counts.posts} posts ({counts.new_posts} new, of which "
                f"{counts.repaired} replace a damaged or missing file, {counts.reused_posts} reused, "
                f"{counts.failed} failed, {counts.hidden_skipped} hidden, {counts.animated_skipped} animated "
                f"skipped, {counts.oversize_skipped} over the pixel cap), {counts.downloaded_bytes} bytes "
                f"downloaded in {stats.pages} pages; {stats.stop_reason}"
            )
        if site_counts.failed and not (site_counts.new_posts or site_counts.reused_posts):
            site_errors.append(SiteFailure(
                site, DOWNLOADS, f"all {site_counts.failed} downloads failed; the first: {first_download_error}"))
            log(f"{character_key}: {site_errors[-1]}")
        totals.add(site_counts)
    return totals, per_tag, site_errors


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
    held: _Held,
    counts: ScrapeCounts,
) -> list[dict[str, Any]]:
    """The manifest rows for `post` (one, or one per animation frame kept), downloading its
    file only when no blob holds it yet."""
    counts.posts += 1
    row = _post_row(post, tag)
    key = (post.site, post.post_id)
    files = held.by_post.get(key)
    if files is None and post.variant == ORIGINAL and post.md5 and post.md5 in held.by_md5:
        the_same = held.by_md5[post.md5]  # the same original, found on another site or post
        files = {the_same.variant: the_same}
    if files is not None:
        counts.reused_posts += 1
        held.by_post[key] = files
        return [{**row, "sha256": h.sha256, "downloaded_at": h.downloaded_at, "variant": h.variant}
                for h in files.values()]
    try:
        fetched = client.fetch(post)
    except SiteError as exc:
        counts.failed += 1
        row["error"] = exc.reason
        return [row]
    now = datetime.now(timezone.utc)
    files = {variant: HeldFile(blobs.put(data), now, variant) for variant, data in fetched.stored_files()}
    held.by_post[key] = files
    if fetched.variant == ORIGINAL and post.md5:
        held.by_md5[post.md5] = files[ORIGINAL]
    counts.new_posts += 1
    if key in held.lost:
        held.lost.discard(key)
        counts.repaired += 1
    counts.downloaded_bytes += sum(len(data) for _, data in fetched.stored_files())
    return [{**row, "sha256": h.sha256, "downloaded_at": h.downloaded_at, "variant": h.variant}
            for h in files.values()]


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


def _save_walk(parts: ManifestParts, path: Path, walk_key: str, state: dict[str, Any]) -> None:
    """Record one walk's state; under the manifest's lock, so that a scrape running at the
    same time keeps the walks it recorded."""
    with parts.locked():
        walks = _load_walks(path)
        walks[walk_key] = state
        atomic_write_json(path, walks)


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
