"""PoliteHttpClient against a scripted loopback site: faults, limits, rate and redaction."""

from __future__ import annotations

import logging
import pickle
import socket
import threading
import time
import traceback
from email.utils import formatdate

import pytest
from sources_loopback import LoopbackSite, Reply, json_reply, sequence

from lora_factory.sources.http import (
    DownloadRefused,
    PoliteHttpClient,
    SiteError,
    parse_retry_after,
    redact_url,
)

FAST = dict(requests_per_second=200.0, backoff_base_s=0.001, backoff_max_s=0.05, timeout_s=2.0)


def fast_client(**overrides) -> PoliteHttpClient:
    return PoliteHttpClient(**{**FAST, **overrides})


def test_get_json_sends_user_agent_and_decodes():
    with LoopbackSite({"/a.json": lambda r: json_reply({"ok": r.query.get("x")})}) as site:
        data = fast_client().get_json(f"{site.base_url}/a.json", {"x": "1"})
    assert data == {"ok": "1"}
    assert site.requests[0].headers["user-agent"].startswith("lora_factory/0.1")


def test_429_retry_after_is_honoured_and_capped_by_backoff_max():
    routes = {
        "/short.json": sequence(Reply(429, headers={"Retry-After": "0.25"}), json_reply([1])),
        "/long.json": sequence(Reply(429, headers={"Retry-After": "120"}), json_reply([2])),
    }
    with LoopbackSite(routes) as site:
        client = fast_client(backoff_max_s=0.4)
        assert client.get_json(f"{site.base_url}/short.json") == [1]
        started = time.monotonic()
        assert client.get_json(f"{site.base_url}/long.json") == [2]
        waited = time.monotonic() - started
    short, long_ = site.hits("/short.json"), site.hits("/long.json")
    assert len(short) == 2 and len(long_) == 2
    assert short[1].at - short[0].at >= 0.24  # Retry-After: 0.25 s honoured
    assert long_[1].at - long_[0].at >= 0.39  # Retry-After: 120 s capped at backoff_max_s
    assert waited < 5


def test_retry_after_accepts_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_5xx_storm_gives_up_after_bounded_retries():
    with LoopbackSite({"/down.json": lambda r: Reply(503, b"busy")}) as site:
        with pytest.raises(SiteError) as raised:
            fast_client(max_retries=3).get_json(f"{site.base_url}/down.json", site="testbooru")
    assert len(site.hits("/down.json")) == 4  # 1 try + 3 retries, no more
    error = raised.value
    assert error.site == "testbooru" and "HTTP 503" in error.reason and "4 attempts" in error.reason
    assert str(error).startswith("testbooru:")


def test_5xx_then_success_recovers():
    route = sequence(Reply(500), Reply(502), Reply(503), json_reply({"fine": True}))
    with LoopbackSite({"/flaky.json": route}) as site:
        assert fast_client(max_retries=5).get_json(f"{site.base_url}/flaky.json") == {"fine": True}
    assert len(site.hits("/flaky.json")) == 4


def test_client_errors_are_not_retried():
    with LoopbackSite({}) as site:
        with pytest.raises(SiteError, match="HTTP 404"):
            fast_client().get_json(f"{site.base_url}/missing.json")
    assert len(site.requests) == 1


def test_slow_answer_times_out_and_is_retried():
    late = Reply(body=b'"late"', headers={"Content-Type": "application/json"}, delay_s=1.5)
    route = sequence(late, json_reply("on time"))
    with LoopbackSite({"/slow.json": route}) as site:
        started = time.monotonic()
        assert fast_client(timeout_s=0.2).get_json(f"{site.base_url}/slow.json") == "on time"
        assert time.monotonic() - started < 1.2
    assert len(site.hits("/slow.json")) == 2


def test_truncated_download_is_retried_until_complete():
    full = bytes(range(256)) * 8
    route = sequence(Reply(body=full[:700], announced_length=len(full)), Reply(body=full))
    with LoopbackSite({"/img.png": route}) as site:
        assert fast_client().download(f"{site.base_url}/img.png") == full
    assert len(site.hits("/img.png")) == 2


def test_always_truncated_download_fails_cleanly():
    with LoopbackSite({"/img.png": lambda r: Reply(body=b"x" * 100, announced_length=400)}) as site:
        with pytest.raises(SiteError, match="gave up after 3 attempts.*(truncated|cut off)"):
            fast_client(max_retries=2).download(f"{site.base_url}/img.png")
    assert len(site.hits("/img.png")) == 3


def test_html_page_with_status_200_is_a_clear_error():
    page = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>challenge</body></html>"
    with LoopbackSite({"/posts.json": lambda r: Reply(body=page, headers={"Content-Type": "text/html"})}) as site:
        with pytest.raises(SiteError, match="HTML page titled 'Just a moment...'"):
            fast_client().get_json(f"{site.base_url}/posts.json")
    assert len(site.requests) == 1


def test_malformed_json_and_wrong_content_type_are_clear_errors():
    routes = {
        "/bad.json": lambda r: Reply(body=b'[{"id": 1,', headers={"Content-Type": "application/json"}),
        "/text.json": lambda r: Reply(body=b"[]", headers={"Content-Type": "text/plain"}),
    }
    with LoopbackSite(routes) as site:
        client = fast_client()
        with pytest.raises(SiteError, match="malformed JSON"):
            client.get_json(f"{site.base_url}/bad.json")
        with pytest.raises(SiteError, match="content type 'text/plain'"):
            client.get_json(f"{site.base_url}/text.json")


def test_redirect_to_another_host_is_refused_and_same_host_is_followed():
    with LoopbackSite({"/file.png": lambda r: Reply(body=b"foreign")}) as other:
        foreign = f"http://localhost:{other.port}/file.png"
        routes = {
            "/away.png": lambda r: Reply(302, headers={"Location": foreign}),
            "/old.png": lambda r: Reply(301, headers={"Location": "/new.png"}),
            "/new.png": lambda r: Reply(body=b"moved here"),
        }
        with LoopbackSite(routes) as site:
            for allowed in ({"127.0.0.1"}, None):
                with pytest.raises(DownloadRefused, match="refused redirect to http://localhost"):
                    fast_client(allowed_hosts=allowed).download(f"{site.base_url}/away.png")
            assert other.requests == []
            assert fast_client(allowed_hosts={"127.0.0.1"}).download(f"{site.base_url}/old.png") == b"moved here"
            # A listed host is followed, and credentials stay with the host they were meant for.
            client = fast_client(allowed_hosts={"127.0.0.1", "localhost"})
            assert client.download(f"{site.base_url}/away.png", auth=("me", "hunter2")) == b"foreign"
    assert "authorization" in site.hits("/away.png")[-1].headers
    assert "authorization" not in other.requests[0].headers


def test_first_host_outside_allowed_hosts_is_refused_without_a_request():
    with LoopbackSite({"/x": lambda r: Reply(body=b"x")}) as site:
        with pytest.raises(DownloadRefused, match="not in allowed_hosts"):
            fast_client(allowed_hosts={"cdn.example.org"}).download(f"{site.base_url}/x")
    assert site.requests == []


def test_oversize_download_is_refused_announced_or_streamed():
    routes = {
        "/announced.png": lambda r: Reply(body=b"x" * 5000),
        "/unannounced.png": lambda r: Reply(body=b"x" * 5000, announced_length=-1),
        "/fits.png": lambda r: Reply(body=b"x" * 1000),
    }
    with LoopbackSite(routes) as site:
        client = fast_client(max_download_bytes=1000)
        with pytest.raises(DownloadRefused, match="announces 5000 bytes"):
            client.download(f"{site.base_url}/announced.png")
        with pytest.raises(DownloadRefused, match="exceeds the limit of 1000 bytes"):
            client.download(f"{site.base_url}/unannounced.png")
        assert len(client.download(f"{site.base_url}/fits.png")) == 1000
    assert len(site.hits("/announced.png")) == 1 and len(site.hits("/unannounced.png")) == 1


def _gaps(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [b - a for a, b in zip(ordered, ordered[1:])]


def test_request_timeline_respects_the_rate_limit():
    with LoopbackSite({"/t.json": lambda r: json_reply([])}) as site:
        client = fast_client(requests_per_second=5.0)
        for _ in range(6):
            client.get_json(f"{site.base_url}/t.json")
    gaps = _gaps([r.at for r in site.requests])
    assert len(gaps) == 5
    assert min(gaps) >= 0.2 - 0.03, gaps
    assert sum(gaps) >= 5 * 0.2 - 0.03


def test_rate_limit_is_shared_by_clients_and_threads_and_the_tightest_wins():
    with LoopbackSite({"/t.json": lambda r: json_reply([])}) as site:
        slow, fast = fast_client(requests_per_second=10.0), fast_client(requests_per_second=500.0)
        for client in (slow, fast, slow, fast):
            client.get_json(f"{site.base_url}/t.json")
        sequential = [r.at for r in site.requests]

        def worker() -> None:
            for _ in range(3):
                fast.get_json(f"{site.base_url}/t.json")

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        threaded = [r.at for r in site.requests[4:]]
    assert min(_gaps(sequential)) >= 0.1 - 0.03
    assert len(threaded) == 9 and min(_gaps(threaded)) >= 0.1 - 0.03


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_secrets_never_reach_messages_tracebacks_or_logs(caplog):
    secrets = {"api_key": "s3cr3t-key-value", "login": "secret-login-name", "tags": "ash"}
    caplog.set_level(logging.DEBUG)
    with LoopbackSite({"/p.json": lambda r: Reply(503)}) as site:
        targets = [f"{site.base_url}/p.json", f"http://127.0.0.1:{_closed_port()}/p.json"]
        for url in targets:
            with pytest.raises(SiteError) as raised:
                fast_client(max_retries=2).get_json(url, secrets)
            rendered = str(raised.value) + "".join(traceback.format_exception(raised.value))
            assert "s3cr3t-key-value" not in rendered and "secret-login-name" not in rendered
            assert "api_key=***" in raised.value.url and "tags=ash" in raised.value.url
    assert caplog.records, "retries should have been logged"
    assert "s3cr3t-key-value" not in caplog.text and "secret-login-name" not in caplog.text


def test_redact_url_hides_credentials_only():
    url = "https://user:pw@site.example/posts.json?tags=ash&api_key=abc&login=me&access_token=t&page=b5"
    redacted = redact_url(url)
    assert "abc" not in redacted and "pw" not in redacted and "=me" not in redacted and "=t&" not in redacted
    assert "tags=ash" in redacted and "page=b5" in redacted and "site.example" in redacted


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="requests_per_second"):
        PoliteHttpClient(requests_per_second=0)
    with pytest.raises(ValueError, match="max_retries"):
        PoliteHttpClient(max_retries=-1)


def test_site_errors_survive_pickling_without_secrets():
    error = pickle.loads(pickle.dumps(DownloadRefused("testbooru", "http://h/x?api_key=s3cret", "too big")))
    assert type(error) is DownloadRefused and error.site == "testbooru" and error.reason == "too big"
    assert "s3cret" not in str(error)
