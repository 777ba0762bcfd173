"""The faults real sites have, injected into every site family's listing endpoint.

For each family: 429 with Retry-After, 5xx storms (recovered, and past the retries),
answers slower than the timeout, truncated bodies, HTML pages served with status 200,
malformed JSON, a server that ignores paging (a loop) and redirects to another host.
Asserted: no crash (a clear SiteError naming the site at worst), no duplicate, no lost
post, bounded retries, and a request timeline that keeps to the rate limit.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from site_fixtures import FAMILIES, Family, FixturePost, first_page, make_post
from sources_loopback import LoopbackSite, Reply, Route, SeenRequest

from lora_factory.sources.base import MediaPolicy, PagingStats
from lora_factory.sources.http import DownloadRefused, PoliteHttpClient, SiteError

TAG = "ash_(ember_knights)"
HTML = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>challenge</body></html>"


def http(**overrides) -> PoliteHttpClient:
    settings = dict(requests_per_second=500.0, backoff_base_s=0.001, backoff_max_s=0.05, timeout_s=2.0,
                    max_retries=4)
    return PoliteHttpClient(**{**settings, **overrides})


def catalogue() -> list[FixturePost]:
    return [make_post(i, TAG, "ember_knights") for i in range(201, 213)]


def expected_ids(family: Family) -> list[str]:
    return [family.post_id(p) for p in sorted(catalogue(), key=lambda p: -p.id)]


class FaultyListing:
    """Wraps the listing route: `faults` answer the first requests, then the real site does."""

    def __init__(self, real: Route, faults: list[Route]):
        self.real = real
        self.faults = faults
        self.count = itertools.count()
        self.lock = threading.Lock()

    def __call__(self, request: SeenRequest) -> Reply:
        with self.lock:
            number = next(self.count)
        return self.faults[number](request) if number < len(self.faults) else self.real(request)


def run(family: Family, faults: list[Route] | None = None, replace: Route | None = None, **http_options):
    """List TAG on the family's fake with the listing route faulted; returns (posts, stats, site)."""
    fake = family.fake(catalogue(), TAG)
    routes = fake.routes()
    real = routes[fake.listing_path] if fake.listing_path in routes else routes["/"]
    routes[fake.listing_path] = replace or FaultyListing(real, faults or [])
    with LoopbackSite(routes) as site:
        client = family.client(site.base_url, http(**http_options), MediaPolicy())
        stats = PagingStats()
        try:
            posts = [p.post_id for page in client.iter_pages(TAG, 100, stats=stats) for p in page]
        finally:
            listing_hits = site.hits(fake.listing_path)
    return posts, stats, listing_hits


def truncated(real: Route) -> Route:
    def route(request: SeenRequest) -> Reply:
        reply = real(request)
        return Reply(reply.status, reply.body[: len(reply.body) // 2], reply.headers, announced_length=len(reply.body))
    return route


families = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


@families
def test_429_with_retry_after_is_waited_out(family: Family):
    posts, stats, hits = run(family, [lambda r: Reply(429, b"slow down", {"Retry-After": "0.1"})], backoff_max_s=1.0)
    assert posts == expected_ids(family)
    assert len(hits) == stats.pages + 1 and hits[1].at - hits[0].at >= 0.09


@families
def test_server_error_storm_is_retried_then_recovers(family: Family):
    storm = [lambda r: Reply(500), lambda r: Reply(503, HTML, {"Content-Type": "text/html"}), lambda r: Reply(502)]
    posts, stats, hits = run(family, storm)
    assert posts == expected_ids(family) and len(hits) == stats.pages + 3


@families
def test_endless_storm_gives_up_after_bounded_retries_naming_the_site(family: Family):
    with pytest.raises(SiteError, match="gave up after 3 attempts; last error: HTTP 503") as raised:
        run(family, replace=lambda r: Reply(503), max_retries=2)
    assert raised.value.site == family.client("http://127.0.0.1:1", http(), MediaPolicy()).site


@families
def test_answer_slower_than_the_timeout_is_retried(family: Family):
    started = time.monotonic()
    posts, stats, hits = run(family, [lambda r: Reply(body=b"[]", delay_s=1.0)], timeout_s=0.25)
    assert posts == expected_ids(family) and len(hits) == stats.pages + 1
    assert time.monotonic() - started < 5


@families
def test_truncated_listing_is_retried(family: Family):
    fake = family.fake(catalogue(), TAG)
    real = fake.routes().get(fake.listing_path) or fake.routes()["/"]
    posts, stats, hits = run(family, [truncated(real), truncated(real)])
    assert posts == expected_ids(family) and len(hits) == stats.pages + 2


@families
def test_html_page_with_status_200_is_a_clear_error_not_retried(family: Family):
    with pytest.raises(SiteError, match="HTML page titled 'Just a moment...'"):
        run(family, replace=lambda r: Reply(body=HTML, headers={"Content-Type": "text/html; charset=utf-8"}))


@families
def test_malformed_json_is_a_clear_error(family: Family):
    with pytest.raises(SiteError, match="malformed JSON"):
        run(family, replace=lambda r: Reply(body=b'{"posts": [{"id": 1,', headers={"Content-Type": "application/json"}))


@families
def test_server_that_ignores_paging_is_a_loop_without_duplicates(family: Family):
    fake = family.fake(catalogue(), TAG)
    real = fake.routes().get(fake.listing_path) or fake.routes()["/"]
    posts, stats, hits = run(family, replace=lambda r: real(first_page(r, family)))
    assert posts == expected_ids(family)[: len(posts)] and len(posts) == len(set(posts)) > 0
    assert "pagination loop" in stats.stop_reason and len(hits) == 2


@families
def test_redirect_to_another_host_is_refused(family: Family):
    with LoopbackSite({"/": lambda r: Reply(body=b"[]", headers={"Content-Type": "application/json"})}) as other:
        with pytest.raises(DownloadRefused, match="refused redirect to http://localhost"):
            run(family, replace=lambda r: Reply(302, headers={"Location": f"http://localhost:{other.port}/posts"}))
    assert other.requests == []


@families
def test_request_timeline_keeps_to_the_rate_limit(family: Family):
    fake = family.fake(catalogue(), TAG)
    with LoopbackSite(fake.routes()) as site:
        client = family.client(site.base_url, http(requests_per_second=12.5), MediaPolicy())
        posts = [p for page in client.iter_pages(TAG, 8) for p in page]
        client.download(posts[0])
    arrivals = sorted(r.at for r in site.requests)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(posts) == 8 and len(gaps) >= 2
    # 80 ms apart at the client; the server sees arrival times with some scheduling jitter.
    assert min(gaps) >= 0.08 - 0.03, gaps
