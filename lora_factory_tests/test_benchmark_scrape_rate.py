"""The scrape benchmark's fixture sites and arithmetic (the timed run is the script's job)."""

from __future__ import annotations

import pytest

from lora_factory.benchmarks.scrape_rate import (
    FIXTURE_TAG,
    FixtureSite,
    host_rates,
    split_posts,
)
from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.http import PoliteHttpClient
from lora_factory.sources.scrape import scrape_character
from lora_factory.storage import BlobStore


def test_fixture_site_is_scraped_whole_by_the_real_client(tmp_path):
    site = FixtureSite("site1", post_count=30)
    url = site.start()
    try:
        client = DanbooruClient("site1", url, PoliteHttpClient(requests_per_second=500, max_retries=0))
        result = scrape_character("bench", {"site1": [FIXTURE_TAG]}, {"site1": client}, BlobStore(tmp_path / "blobs"),
                                  tmp_path / "manifest.parquet", max_posts_per_tag=30, log=lambda _: None)
    finally:
        site.stop()
    assert result.counts.new_posts == 30 and result.manifest["sha256"].nunique() == 30
    rates = host_rates([site], configured=500)
    assert rates[0]["requests"] == 30 + 1  # one listing page of 30, then 30 files


def test_rate_arithmetic():
    site = FixtureSite("site2", post_count=1)
    site.start()
    site.stop()
    site.arrivals = [10.0, 10.5, 11.0, 11.5, 11.6]
    (row,) = host_rates([site], configured=4.0)
    assert row["achieved"] == pytest.approx(4 / 1.6) and row["ratio"] == pytest.approx(4 / 1.6 / 4)
    assert row["busiest_second"] == 3  # 11.0, 11.5, 11.6
    assert site.arrivals == []  # taken
    assert split_posts(500, [f"s{n}" for n in range(8)]) == {f"s{n}": 63 if n < 4 else 62 for n in range(8)}
