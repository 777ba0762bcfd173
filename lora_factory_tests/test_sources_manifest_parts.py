"""ManifestParts under concurrent writers: real processes append and compact the same
manifest at once (directly, and as two scrapes of one character), and no row may be lost."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from site_fixtures import FakeDanbooruSite, make_post
from sources_loopback import LoopbackSite, SeenRequest

from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.http import PoliteHttpClient
from lora_factory.sources.manifest_parts import ManifestParts, parts_dir
from lora_factory.sources.scrape import KEY_COLUMNS, MANIFEST_SCHEMA, scrape_character, walks_path
from lora_factory.storage import BlobStore, read_table

EMPTY_ROW = {name: None for name in MANIFEST_SCHEMA.names}


def row(post_id: str, sha256: str | None = None) -> dict:
    return {**EMPTY_ROW, "site": "a", "post_id": post_id, "candidate_tag": "t", "sha256": sha256}


def append_pages(manifest_path: str, writer: int, pages: int, rows_per_page: int, compact_every: int,
                 start) -> None:
    """One scraping process: pages of rows only it writes, folding now and then like a run's start and end."""
    parts = ManifestParts(Path(manifest_path), MANIFEST_SCHEMA, KEY_COLUMNS)
    start.wait()
    for page in range(pages):
        parts.append([row(f"{writer}-{page}-{n}") for n in range(rows_per_page)])
        if compact_every and page % compact_every == compact_every - 1:
            parts.compact()


def test_concurrent_writers_and_compactions_lose_no_row(tmp_path):
    path = tmp_path / "m.parquet"
    writers, pages, rows_per_page = 4, 25, 4
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(writers)
    processes = [
        context.Process(target=append_pages, args=(str(path), w, pages, rows_per_page, 5 if w % 2 else 0, start))
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * writers
    ManifestParts(path, MANIFEST_SCHEMA, KEY_COLUMNS).compact()
    folded = read_table(path)
    expected = {f"{w}-{p}-{n}" for w in range(writers) for p in range(pages) for n in range(rows_per_page)}
    assert len(folded) == len(expected) and set(folded["post_id"]) == expected
    assert not parts_dir(path).exists()


def test_a_key_written_later_wins_even_within_the_same_clock_tick(tmp_path):
    path = tmp_path / "m.parquet"
    parts = ManifestParts(path, MANIFEST_SCHEMA, KEY_COLUMNS)
    for version in range(40):  # faster than the clock may tick between two appends
        parts.append([row("1", f"v{version}")])
    assert len(list(parts_dir(path).glob("*.parquet"))) == 40
    parts.compact()
    assert read_table(path)[["post_id", "sha256"]].values.tolist() == [["1", "v39"]]


def test_parts_left_by_an_older_version_fold_before_new_ones(tmp_path):
    path = tmp_path / "m.parquet"
    parts = ManifestParts(path, MANIFEST_SCHEMA, KEY_COLUMNS)
    parts.append([row("1", "new")])
    old = ManifestParts(tmp_path / "old.parquet", MANIFEST_SCHEMA, KEY_COLUMNS)
    old.append([row("1", "old"), row("2", "old")])
    (old_part,) = parts_dir(old.manifest_path).glob("*.parquet")
    old_part.rename(parts_dir(path) / "00000001.parquet")  # numbered parts, as a killed run used to leave
    parts.compact()
    assert sorted(read_table(path)[["post_id", "sha256"]].values.tolist()) == [["1", "new"], ["2", "old"]]


def scrape_one_tag(base_url: str, tag: str, home: str, start) -> None:
    client = DanbooruClient("danbooru", base_url, PoliteHttpClient(requests_per_second=500.0), page_limit=2)
    start.wait()
    scrape_character("ash", {"danbooru": [tag]}, {"danbooru": client}, BlobStore(Path(home) / "blobs"),
                     Path(home) / "raw_scrape.parquet", log=lambda line: None)


def test_two_scrapes_of_one_character_at_once_keep_every_row_and_walk(tmp_path):
    tags = ["ash_(ember_knights)", "ash_(pocket_tamers)"]
    fake = FakeDanbooruSite([make_post(i, tags[i % 2], size=(16, 16)) for i in range(1, 25)])
    routes = fake.routes()

    def slow_listing(request: SeenRequest):  # pages of the two scrapes interleave
        reply = fake.list_posts(request)
        reply.delay_s = 0.05
        return reply

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    with LoopbackSite({**routes, "/posts.json": slow_listing}) as site:
        processes = [context.Process(target=scrape_one_tag, args=(site.base_url, tag, str(tmp_path), start))
                     for tag in tags]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    manifest = read_table(tmp_path / "raw_scrape.parquet")
    assert sorted(manifest["post_id"].astype(int)) == list(range(1, 25))
    assert manifest.groupby("candidate_tag").size().to_dict() == {tag: 12 for tag in tags}
    assert manifest["sha256"].notna().all() and not parts_dir(tmp_path / "raw_scrape.parquet").exists()
    walks = json.loads(walks_path(tmp_path / "raw_scrape.parquet").read_text())
    assert sorted(walks) == [f"danbooru\t{tag}" for tag in tags]
