"""Scrape benchmark: per-host request rate and peak memory of parallel scraping.

Eight loopback fixture sites speak the Danbooru JSON API (each on its own port, so the
rate limiter treats them as eight hosts) and serve 250 posts each with small PNGs. One
thread per site runs `scrape_character` with a `PoliteHttpClient` at the configured rate;
every site records when each request arrived. The benchmark prints, per host, the
achieved rate ((requests - 1) / time from first to last request) against the configured
one, and the peak memory of the scraping process for a small, a full and a large run (each
in a fresh process, so one peak cannot hide the other).

Targets: achieved / configured >= 0.9 on every host and never above 1 (polite: the
busiest one-second window holds the rate, +1 when a late request meets an on-time one),
peak RSS under 500 MB, and about the same peak for 500, 2,000 and 8,000 posts. The yardstick
is the configured rate itself; an unthrottled probe first shows how fast the fixture
sites can answer, so a ratio near 1 is the limiter's doing, not the sites' limit.
tracemalloc (the "Python heap peak" column) slows allocation-heavy code, so a rate far
above the default can fall short on a small machine for that reason alone.

    python -m lora_factory.benchmarks.scrape_rate [--rate 20] [--posts 2000] [--small 500] [--large 8000]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import tempfile
import threading
import time
import tracemalloc
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from PIL import Image

from lora_factory.benchmarks.memory import peak_rss_mb

FIXTURE_TAG = "fixture_character"
IMAGE_SIDE = 96
RATE_TARGET = 0.9
PEAK_RSS_TARGET_MB = 500


@dataclass
class FixtureSite:
    """One Danbooru-API site on loopback with `post_count` posts under FIXTURE_TAG."""

    name: str
    post_count: int
    files: dict[str, bytes] = field(default_factory=dict)  # "<md5>.png" -> bytes
    posts: list[dict] = field(default_factory=list)  # newest (highest id) first
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each request
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        seed = zlib.crc32(self.name.encode())
        for post_id in range(self.post_count, 0, -1):
            data = _fixture_png(seed, post_id)
            md5 = hashlib.md5(data).hexdigest()
            self.files[f"{md5}.png"] = data
            self.posts.append({
                "id": post_id, "md5": md5, "file_ext": "png", "file_size": len(data),
                "image_width": IMAGE_SIDE, "image_height": IMAGE_SIDE, "rating": "g",
                "tag_string": f"{FIXTURE_TAG} fixture_series 1girl solo",
                "tag_string_character": FIXTURE_TAG, "tag_string_copyright": "fixture_series",
                "tag_string_general": "1girl solo", "tag_string_artist": "", "tag_string_meta": "",
            })
        if len(self.files) != self.post_count:
            raise ValueError(f"{self.name}: fixture pictures must be distinct, {len(self.files)} of {self.post_count} are")

    def start(self) -> str:
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with site.lock:
                    site.arrivals.append(time.monotonic())
                site.answer(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self.server is not None, "start() the site first"
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def take_arrivals(self) -> list[float]:
        with self.lock:
            taken, self.arrivals = self.arrivals, []
        return taken

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/posts.json":
            limit = min(int(query.get("limit", 20)), 200)
            page = query.get("page", "")
            below = int(page[1:]) if page.startswith("b") else self.post_count + 1
            chosen = [p for p in self.posts if p["id"] < below][:limit] if query.get("tags") == FIXTURE_TAG else []
            body = json.dumps([{**p, "file_url": f"{self.url}/data/{p['md5']}.png"} for p in chosen]).encode()
            _send(handler, 200, body, "application/json")
        elif parts.path.startswith("/data/") and parts.path[len("/data/"):] in self.files:
            _send(handler, 200, self.files[parts.path[len("/data/"):]], "image/png")
        else:
            _send(handler, 404, b'{"message": "not found"}', "application/json")


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _fixture_png(seed: int, post_id: int) -> bytes:
    """A small picture unique to (site, post): a site-coloured field, the post id in its corner
    (equal files would be stored once and not downloaded again, skewing the counts)."""
    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255))
    image.putpixel((0, 0), ((seed >> 24) & 255, (post_id >> 16) & 255, (post_id >> 8) & 255))
    image.putpixel((1, 0), (post_id & 255, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# -- the scraping process ----------------------------------------------------------------


def scrape_sites(site_urls: dict[str, str], posts_per_site: dict[str, int], rate: float, result_queue) -> None:
    """In a fresh process: scrape every site in its own thread, report time and memory."""
    from lora_factory.sources.danbooru import DanbooruClient
    from lora_factory.sources.http import PoliteHttpClient
    from lora_factory.sources.scrape import scrape_character
    from lora_factory.storage import BlobStore

    rss_after_imports = peak_rss_mb()
    tracemalloc.start()
    errors: list[str] = []
    scraped: dict[str, int] = {}

    with tempfile.TemporaryDirectory(prefix="scrape_rate_") as home:
        blobs = BlobStore(Path(home) / "blobs")

        def scrape_one(site: str, url: str) -> None:
            try:
                http = PoliteHttpClient(requests_per_second=rate, max_retries=2, timeout_s=10)
                client = DanbooruClient(site, url, http)
                result = scrape_character(
                    f"bench_{site}", {site: [FIXTURE_TAG]}, {site: client}, blobs,
                    Path(home) / f"{site}.parquet", max_posts_per_tag=posts_per_site[site], log=lambda _: None,
                )
                scraped[site] = result.counts.new_posts
            except Exception as exc:  # reported to the parent, which fails the run
                errors.append(f"{site}: {type(exc).__name__}: {exc}")

        started = time.monotonic()
        threads = [threading.Thread(target=scrape_one, args=item) for item in site_urls.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    result_queue.put({
        "elapsed_s": elapsed, "scraped": scraped, "errors": errors,
        "rss_after_imports_mb": rss_after_imports, "peak_rss_mb": peak_rss_mb(),
        "traced_peak_mb": traced_peak / 2**20,
    })


def run_in_fresh_process(site_urls: dict[str, str], posts_per_site: dict[str, int], rate: float) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=scrape_sites, args=(site_urls, posts_per_site, rate, queue))
    process.start()
    result = queue.get()
    process.join()
    if result["errors"]:
        raise RuntimeError("scraping failed:\n" + "\n".join(result["errors"]))
    return result


def split_posts(total: int, sites: list[str]) -> dict[str, int]:
    base, extra = divmod(total, len(sites))
    return {site: base + (n < extra) for n, site in enumerate(sites)}


def unthrottled_capacity(sites: list[FixtureSite], requests_per_site: int = 40) -> float:
    """Requests per second one host answers when nobody waits (plain requests, one thread per host)."""
    def hammer(site: FixtureSite, out: list[float]) -> None:
        with requests.Session() as session:
            names = list(site.files)[:requests_per_site]
            started = time.monotonic()
            for name in names:
                session.get(f"{site.url}/data/{name}", timeout=10).raise_for_status()
            out.append(len(names) / (time.monotonic() - started))

    rates: list[float] = []
    threads = [threading.Thread(target=hammer, args=(site, rates)) for site in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for site in sites:
        site.take_arrivals()
    return min(rates)


def host_rates(sites: list[FixtureSite], configured: float) -> list[dict]:
    rows = []
    for site in sites:
        arrivals = sorted(site.take_arrivals())
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
        achieved = (len(arrivals) - 1) / span if span > 0 else float("nan")
        # The busiest second: a polite client never bursts above the rate, whatever its average.
        window_end = 0
        busiest = 0
        for start, first in enumerate(arrivals):
            while window_end < len(arrivals) and arrivals[window_end] < first + 1.0:
                window_end += 1
            busiest = max(busiest, window_end - start)
        rows.append({
            "host": site.url.removeprefix("http://"), "requests": len(arrivals), "span_s": span,
            "achieved": achieved, "ratio": achieved / configured, "busiest_second": busiest,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--posts", type=int, default=2000, help="posts in the full run, over all sites")
    parser.add_argument("--small", type=int, default=500, help="posts in the small run (memory comparison)")
    parser.add_argument("--large", type=int, default=8000, help="posts in the large run (memory comparison)")
    parser.add_argument("--rate", type=float, default=20.0, help="configured requests per second per host")
    args = parser.parse_args(argv)
    if args.sites < 1 or args.posts < args.sites or not 0 < args.small <= args.posts <= args.large or args.rate <= 0:
        parser.error("need sites >= 1, posts >= sites, 0 < small <= posts <= large and rate > 0")

    names = [f"site{n}" for n in range(1, args.sites + 1)]
    full = split_posts(args.posts, names)
    largest = split_posts(args.large, names)
    sites = [FixtureSite(name, largest[name]) for name in names]
    urls = {site.name: site.start() for site in sites}
    try:
        capacity = unthrottled_capacity(sites)
        print(f"{args.sites} fixture sites, {args.posts} posts ({max(full.values())} per site), "
              f"configured {args.rate:g} req/s per host; unthrottled, each host answers "
              f">= {capacity:.0f} req/s with all {args.sites} busy\n")

        memory = []
        for total in sorted({args.small, args.posts, args.large}):
            result = run_in_fresh_process(urls, split_posts(total, names), args.rate)
            rates = host_rates(sites, args.rate)
            result["ratio_range"] = (min(r["ratio"] for r in rates), max(r["ratio"] for r in rates))
            memory.append((total, result))
            scraped = sum(result["scraped"].values())
            if scraped != total:
                raise RuntimeError(f"expected {total} new posts, scraped {scraped}")
            if total == args.posts:
                full_rates, full_result = rates, result

        print(f"Per-host request rate, full run ({args.posts} posts in {full_result['elapsed_s']:.1f} s):")
        print(f"{'host':<22}{'requests':>9}{'span s':>9}{'achieved/s':>12}{'configured/s':>14}{'ratio':>8}"
              f"{'busiest 1 s':>13}")
        for row in full_rates:
            print(f"{row['host']:<22}{row['requests']:>9}{row['span_s']:>9.2f}{row['achieved']:>12.2f}"
                  f"{args.rate:>14.2f}{row['ratio']:>8.3f}{row['busiest_second']:>13}")
        worst = min(row["ratio"] for row in full_rates)
        highest = max(row["ratio"] for row in full_rates)
        print(f"ratio min {worst:.3f}, max {highest:.3f} (target >= {RATE_TARGET}, never above 1)\n")

        print("Peak memory of the scraping process (fresh process per run):")
        print(f"{'posts':>7}{'elapsed s':>11}{'RSS after imports MB':>22}{'peak RSS MB':>13}{'Python heap peak MB':>21}"
              f"{'rate ratio min-max':>20}")
        for total, result in memory:
            low, high = result["ratio_range"]
            print(f"{total:>7}{result['elapsed_s']:>11.1f}{result['rss_after_imports_mb']:>22.1f}"
                  f"{result['peak_rss_mb']:>13.1f}{result['traced_peak_mb']:>21.1f}{f'{low:.3f}-{high:.3f}':>20}")
        (small_total, small), (big_total, big) = memory[0], memory[-1]
        per_post_kb = 1024 * (big["peak_rss_mb"] - small["peak_rss_mb"]) / max(big_total - small_total, 1)
        print(f"peak RSS {big['peak_rss_mb']:.1f} MB at {big_total} posts vs {small['peak_rss_mb']:.1f} MB at "
              f"{small_total} (x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}, {per_post_kb:.1f} KB per extra post; "
              f"target < {PEAK_RSS_TARGET_MB} MB, flat)")
        met = worst >= RATE_TARGET and highest <= 1.0 + 1e-3 and big["peak_rss_mb"] < PEAK_RSS_TARGET_MB
        print("targets met" if met else "TARGETS MISSED")
        return 0 if met else 1
    finally:
        for site in sites:
            site.stop()


if __name__ == "__main__":
    raise SystemExit(main())
