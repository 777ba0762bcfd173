"""The choice of rendition, animated posts and videos, and the checks on every downloaded file."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image
from site_fixtures import FakeDanbooruSite, FakeZerochan, make_post
from sources_loopback import LoopbackSite, Reply, image_bytes

from lora_factory.sources.base import MediaPolicy, PagingStats, Variant, choose_variant
from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.http import DownloadRefused, PoliteHttpClient
from lora_factory.sources.scrape import scrape_character
from lora_factory.sources.zerochan import ZerochanClient
from lora_factory.storage import BlobStore

TAG = "ash_(ember_knights)"


def http(**overrides) -> PoliteHttpClient:
    settings = dict(requests_per_second=500.0, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=2.0, max_retries=1)
    return PoliteHttpClient(**{**settings, **overrides})


def v(name: str, width: int | None, height: int | None) -> Variant:
    return Variant(name, f"https://site.example/{name}", width, height, "jpg")


def test_choose_variant_takes_the_smallest_big_enough_else_the_original():
    variants = [v("original", 4000, 3000), v("sample", 1200, 900), v("720x720", 720, 540), v("180x180", 180, 135)]
    assert choose_variant(variants, 800, 10**9).name == "sample"
    assert choose_variant(variants, 500, 10**9).name == "720x720"
    assert choose_variant(variants, 1000, 10**9).name == "original"  # only the original reaches 1000
    assert choose_variant(variants, 5000, 10**9).name == "original"  # none does: the original
    assert choose_variant(variants, None, 10**9).name == "original"
    # The pixel cap rules the original out: the largest rendition under it.
    assert choose_variant(variants, 5000, 2_000_000).name == "sample"
    assert choose_variant([v("original", 4000, 3000)], None, 2_000_000) is None
    # A rendition of unknown size is never taken as big enough; an original of unknown size is kept.
    assert choose_variant([v("original", None, None), v("large", None, None)], 800, 10**9).name == "original"


def test_policy_rejects_bad_settings():
    with pytest.raises(ValueError, match="animated"):
        MediaPolicy(animated="gif")
    with pytest.raises(ValueError, match="min_side"):
        MediaPolicy(min_side=0)


def listing(posts, media: MediaPolicy, **http_options):
    fake = FakeDanbooruSite(posts)
    with LoopbackSite(fake.routes()) as site:
        client = DanbooruClient("danbooru", site.base_url, http(**http_options), media=media)
        stats = PagingStats()
        listed = list(client.iter_posts(TAG, 50, stats=stats))
        results = {}
        for post in listed:
            try:
                results[post.post_id] = client.fetch(post)
            except DownloadRefused as exc:
                results[post.post_id] = exc
    return listed, stats, results


def test_sample_is_downloaded_when_big_enough_and_the_original_otherwise():
    posts = [make_post(1, TAG, size=(64, 48), sample_size=(40, 30)), make_post(2, TAG, size=(64, 48), sample_size=(20, 15))]
    listed, _, results = listing(posts, MediaPolicy(min_side=24))
    chosen = {p.post_id: (p.variant, p.file_ext) for p in listed}
    assert chosen == {"1": ("sample", "jpg"), "2": ("original", "png")}
    assert results["1"].data == posts[0].sample and results["1"].variant == "sample"
    assert results["2"].data == posts[1].data


def test_animated_posts_are_skipped_or_cut_to_their_first_frame():
    gif = image_bytes(7, (12, 10), fmt="GIF", frames=3)
    posts = [make_post(1, TAG, data=gif, ext="gif", animated=True), make_post(2, TAG)]
    _, stats, results = listing(posts, MediaPolicy(animated="skip"))
    assert set(results) == {"2"} and stats.animated_skipped == 1
    _, stats, results = listing(posts, MediaPolicy(animated="first_frame"))
    fetched = results["1"]
    frame = Image.open(io.BytesIO(fetched.data))
    assert fetched.variant == "original/first_frame" and frame.format == "PNG" and frame.size == (12, 10)
    assert not getattr(frame, "is_animated", False)
    assert frame.convert("RGB").tobytes() == Image.open(io.BytesIO(gif)).convert("RGB").tobytes()


def test_an_animation_the_listing_did_not_flag_is_caught_in_the_file():
    gif = image_bytes(8, (12, 10), fmt="GIF", frames=2)
    fake = FakeZerochan([make_post(1, TAG, data=gif, ext="gif")], TAG)
    with LoopbackSite(fake.routes()) as site:
        post = next(ZerochanClient("zerochan", site.base_url, http()).iter_posts(TAG, 1))
        with pytest.raises(DownloadRefused, match="animated image"):
            ZerochanClient("zerochan", site.base_url, http()).fetch(post)
        cut = ZerochanClient("zerochan", site.base_url, http(), MediaPolicy(animated="first_frame")).fetch(post)
    assert cut.variant == "original/first_frame"


def test_videos_use_the_sites_still_frame_or_are_skipped():
    with_still = make_post(1, TAG, video=True, sample_size=(32, 18))
    without_still = make_post(2, TAG, video=True)
    listed, stats, results = listing([with_still, without_still], MediaPolicy(animated="first_frame"))
    assert [(p.post_id, p.variant, p.media) for p in listed] == [("1", "sample", "video")]
    assert results["1"].data == with_still.sample and stats.animated_skipped == 1
    _, stats, results = listing([with_still, without_still], MediaPolicy(animated="skip"))
    assert results == {} and stats.animated_skipped == 2


def test_pixel_cap_prefers_a_smaller_rendition_and_skips_posts_without_one():
    huge_with_sample = make_post(1, TAG, size=(80, 80), sample_size=(20, 20))
    huge = make_post(2, TAG, size=(80, 80))
    listed, stats, results = listing([huge_with_sample, huge], MediaPolicy(max_pixels=1000))
    assert [(p.post_id, p.variant) for p in listed] == [("1", "sample")] and stats.oversize_skipped == 1
    assert results["1"].data == huge_with_sample.sample


def test_pixel_cap_is_read_from_the_file_header_when_the_site_understates_it():
    liar = make_post(1, TAG, size=(80, 80))
    liar.width, liar.height = 8, 8  # the listing claims a small picture
    _, _, results = listing([liar], MediaPolicy(max_pixels=1000))
    assert isinstance(results["1"], DownloadRefused) and "80x80 is over the pixel cap of 1000" in str(results["1"])


def test_files_that_are_not_what_the_site_lists_are_refused():
    html_post, corrupt, good = make_post(1, TAG), make_post(2, TAG), make_post(3, TAG)
    fake = FakeDanbooruSite([html_post, corrupt, good])
    routes = fake.routes()
    serve = routes["/files/"]

    def files(request):
        if html_post.md5 in request.path:
            return Reply(body=b"<!DOCTYPE html><html><title>Error</title></html>", headers={"Content-Type": "image/png"})
        if corrupt.md5 in request.path:
            return Reply(body=image_bytes(99), headers={"Content-Type": "image/png"})  # another picture
        return serve(request)

    routes["/files/"] = files
    with LoopbackSite(routes) as site:
        client = DanbooruClient("danbooru", site.base_url, http())
        outcome = {}
        for post in client.iter_posts(TAG, 10):
            try:
                outcome[post.post_id] = client.download(post)
            except DownloadRefused as exc:
                outcome[post.post_id] = str(exc)
        # Without md5 verification (a rendition, not the original) an HTML page is still refused.
        unverified = DanbooruClient("danbooru", site.base_url, http(), media=MediaPolicy(verify_md5=False))
        html_listed = next(p for p in unverified.iter_posts(TAG, 10) if p.post_id == "1")
        with pytest.raises(DownloadRefused, match="the file is an HTML page"):
            unverified.download(html_listed)
    assert "md5 mismatch" in outcome["1"] and "md5 mismatch" in outcome["2"] and outcome["3"] == good.data


def test_file_redirect_off_site_and_oversize_files_are_refused():
    away, big, good = make_post(1, TAG), make_post(2, TAG, size=(60, 60)), make_post(3, TAG)
    fake = FakeDanbooruSite([away, big, good])
    routes = fake.routes()
    serve = routes["/files/"]
    with LoopbackSite({"/": lambda r: Reply(body=away.data)}) as other:
        routes["/files/"] = lambda r: (Reply(302, headers={"Location": f"http://localhost:{other.port}/x.png"})
                                       if away.md5 in r.path else serve(r))
        with LoopbackSite(routes) as site:
            client = DanbooruClient("danbooru", site.base_url, http(max_download_bytes=4000))
            outcome = {}
            for post in client.iter_posts(TAG, 10):
                try:
                    outcome[post.post_id] = client.download(post)
                except DownloadRefused as exc:
                    outcome[post.post_id] = str(exc)
    assert "refused redirect" in outcome["1"] and other.requests == []
    assert "over the limit of 4000 bytes" in outcome["2"] and outcome["3"] == good.data


def animated_gif(colours: list[tuple[int, int, int]], size=(12, 10)) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def test_animated_posts_expand_to_every_nth_frame_each_stored_and_recorded(tmp_path):
    colours = [(40 * n, 255 - 30 * n, 90) for n in range(7)]
    gif = animated_gif(colours)
    posts = [make_post(1, TAG, data=gif, ext="gif", animated=True), make_post(2, TAG)]
    fake = FakeDanbooruSite(posts)
    policy = MediaPolicy(animated="frames", frame_step=3, max_frames=2)  # frames 0 and 3 of 0..6
    blobs = BlobStore(tmp_path / "blobs")
    with LoopbackSite(fake.routes()) as site:
        client = DanbooruClient("danbooru", site.base_url, http(), media=policy)
        first = scrape_character("ash", {"danbooru": [TAG]}, {"danbooru": client}, blobs,
                                 tmp_path / "raw_scrape.parquet", log=lambda line: None)
        manifest = first.manifest
        downloads = [r.path for r in site.requests if r.path != "/posts.json"]
        second = scrape_character("ash", {"danbooru": [TAG]}, {"danbooru": client}, blobs,
                                  tmp_path / "raw_scrape.parquet", log=lambda line: None)
        assert [r.path for r in site.requests if r.path != "/posts.json"] == downloads  # nothing fetched again
    assert len(downloads) == 2
    frames = manifest[manifest["post_id"] == "1"].sort_values("variant")
    assert list(frames["variant"]) == ["original/frame_000", "original/frame_003"]
    for sha, colour in zip(frames["sha256"], [colours[0], colours[3]]):
        picture = Image.open(io.BytesIO(blobs.get(sha)))
        assert picture.format == "PNG" and not getattr(picture, "is_animated", False)
        assert picture.convert("RGB").getpixel((5, 5)) == pytest.approx(colour, abs=8)  # GIF palette rounding
    assert first.counts.new_posts == 2 and first.counts.posts == 2 and len(manifest) == 3
    assert second.counts.new_posts == 0 and second.counts.reused_posts == 2
    key = ["site", "post_id", "candidate_tag", "variant"]
    pd.testing.assert_frame_equal(second.manifest.sort_values(key, ignore_index=True),
                                  manifest.sort_values(key, ignore_index=True))


def test_frames_policy_rejects_bad_settings():
    with pytest.raises(ValueError, match="frame_step"):
        MediaPolicy(animated="frames", frame_step=0)
