"""Polite HTTP for image sites.

Image sites ban scrapers that hammer them, and their APIs fail in ordinary ways (429,
5xx storms, timeouts, cut-off bodies, HTML error pages served with status 200). This
client spaces requests per host, retries what is worth retrying with exponential backoff
and jitter, refuses what must never be accepted (oversized bodies, redirects to foreign
hosts) and reports every failure as one `SiteError` that names the site, the URL and the
reason, with credentials redacted.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
import time
import weakref
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = "lora_factory/0.1 (+character LoRA factory)"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024

# Query parameters and basic-auth parts that carry credentials; their values never reach
# an exception message or a log line.
SECRET_PARAM_NAMES = frozenset(
    {"api_key", "apikey", "key", "login", "user_id", "password", "passwd", "pass",
     "token", "access_token", "refresh_token", "secret", "auth", "session"}
)
_SECRET_IN_TEXT = re.compile(
    r"(?i)\b(" + "|".join(sorted(SECRET_PARAM_NAMES, key=len, reverse=True)) + r")=([^&\s'\"<>]*)"
)
_USERINFO_IN_TEXT = re.compile(r"//[^/@\s'\"]+@")
_HTML_TITLE = re.compile(rb"(?is)<title[^>]*>(.*?)</title>")

T = TypeVar("T")


class SiteError(RuntimeError):
    """A request to an image site failed for good (after retries, or not worth retrying)."""

    def __init__(self, site: str, url: str, reason: str):
        self.site = site
        self.url = redact_url(url)
        self.reason = redact_text(reason)
        super().__init__(f"{site}: {self.reason} [{self.url}]")

    def __reduce__(self):  # picklable across process boundaries, like any exception
        return (type(self), (self.site, self.url, self.reason))


class DownloadRefused(SiteError):
    """The client refused a response on purpose (too big, redirect to a foreign host)."""


class _RetryableFailure(Exception):
    """One attempt failed in a way that a later attempt may not (429, 5xx, timeout, cut-off body)."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAM_NAMES or lowered.endswith(("_token", "_key", "password", "secret"))


def redact_url(url: str) -> str:
    """`url` with credential values in the query and user:password in the host replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urlencode(
        [(name, "***" if _is_secret_name(name) else value)
         for name, value in parse_qsl(parts.query, keep_blank_values=True)],
        safe="*[]",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text (for instance a transport library's message) with credentials replaced by ***."""
    return _USERINFO_IN_TEXT.sub("//***@", _SECRET_IN_TEXT.sub(r"\1=***", text))


class _RedactingFilter(logging.Filter):
    """Redacts credentials from log records; urllib3 logs every request URL at DEBUG level."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = ()
        return True


for _logger_name in ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry"):
    logging.getLogger(_logger_name).addFilter(_RedactingFilter())


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable


def url_with_params(url: str, params: Mapping[str, Any] | None) -> str:
    """`url` with `params` appended to its query (booleans and numbers as Danbooru expects them)."""
    if not params:
        return url
    return requests.Request("GET", url, params=dict(params)).prepare().url or url


def _host_key(url: str) -> str:
    """Rate limits apply per host:port, so two servers on one machine are two hosts."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def _hostname(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def host_allowed(host: str, allowed: set[str]) -> bool:
    """`host` is in `allowed`, where an entry ".example.org" stands for example.org and its subdomains."""
    host = host.lower()
    return any(
        host == entry or (entry.startswith(".") and (host == entry[1:] or host.endswith(entry)))
        for entry in allowed
    )


class _HostRateLimiter:
    """Hands out request slots for one host; the slowest rate of the live clients wins.

    Slots are reserved under the lock and slept for outside it, so concurrent threads
    queue in order instead of all firing when a slot frees up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_slot = 0.0
        # A client that has been garbage-collected no longer constrains the host.
        self._interval_by_client: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()

    def wait_turn(self, client: object, min_interval_s: float) -> None:
        with self._lock:
            self._interval_by_client[client] = min_interval_s
            interval = max(self._interval_by_client.values())
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + interval
        if slot > now:
            time.sleep(slot - now)


_LIMITERS: dict[str, _HostRateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def _limiter_for(host_key: str) -> _HostRateLimiter:
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(host_key)
        if limiter is None:
            limiter = _LIMITERS[host_key] = _HostRateLimiter()
        return limiter


_NO_VALUE = object()


@dataclass(frozen=True)
class _Request:
    """What to send: the same for every attempt and every redirect hop."""

    url: str
    auth: tuple[str, str] | None
    headers: Mapping[str, str] | None
    accept: str
    identity: bool = False  # ask for an unencoded body (downloads: truncation stays detectable)
    method: str = "GET"
    form: Mapping[str, str] | None = None
    json_body: Any = None


class PoliteHttpClient:
    """GET JSON and download files from image sites, politely and defensively.

    Every instance in the process shares one rate limiter per host (the tightest rate of
    the live clients wins), so several assets or threads scraping one site together still
    respect its limit. A response is retried on 429, 408, 5xx, transport errors, timeouts
    and cut-off bodies, at most `max_retries` times; everything else fails at once.
    """

    def __init__(
        self,
        user_agent: str = DEFAULT_USER_AGENT,
        requests_per_second: float = 1.0,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        timeout_s: float = 30.0,
        max_download_bytes: int = 50 * 2**20,
        allowed_hosts: set[str] | None = None,
    ):
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be > 0, got {requests_per_second}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_base_s < 0 or backoff_max_s < 0:
            raise ValueError("backoff_base_s and backoff_max_s must be >= 0")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_download_bytes <= 0:
            raise ValueError(f"max_download_bytes must be > 0, got {max_download_bytes}")
        self.user_agent = user_agent
        self.requests_per_second = requests_per_second
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.max_download_bytes = max_download_bytes
        # None: any host for the first request, redirects only to that same host.
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        # requests.Session is not documented as thread-safe: one per thread.
        self._sessions = threading.local()

    # -- public API -------------------------------------------------------------------

    def get_json(
        self,
        url: str,
        params: Mapping[str, Any] | None = None,
        *,
        site: str | None = None,
        auth: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        empty: Any = _NO_VALUE,
    ) -> Any:
        """GET `url` with `params` and return the decoded JSON body.

        `headers` (for instance a bearer token) go, like `auth`, only to the host of `url`.
        `empty`: what an empty body means, for the sites that answer "nothing found" with
        zero bytes; without it an empty body is an error.
        Raises SiteError for a non-JSON answer (an HTML page served with 200, a wrong
        content type, malformed JSON) or when the retries are used up.
        """
        full_url = url_with_params(url, params)
        label = site or _hostname(full_url)

        def attempt() -> Any:
            body, content_type = self._fetch(_Request(full_url, auth, headers, "application/json"), label)
            if empty is not _NO_VALUE and not body.strip():
                return empty
            return _decode_json(body, content_type, label, full_url)

        return self._with_retries(full_url, label, attempt)

    def get_xml(
        self, url: str, params: Mapping[str, Any] | None = None, *, site: str | None = None
    ) -> ElementTree.Element:
        """GET `url` and return the root element of its XML body.

        Documents that declare a DTD or entities are refused: nothing an image site
        answers needs them, and entity expansion is how XML bodies blow up in memory.
        """
        full_url = url_with_params(url, params)
        label = site or _hostname(full_url)

        def attempt() -> ElementTree.Element:
            body, content_type = self._fetch(_Request(full_url, None, None, "application/xml, text/xml"), label)
            return _decode_xml(body, content_type, label, full_url)

        return self._with_retries(full_url, label, attempt)

    def post_form(
        self,
        url: str,
        form: Mapping[str, str] | None = None,
        *,
        json_body: Any = None,
        site: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """POST a form (or `json_body`) to `url` and return the decoded JSON answer.

        Used for token exchanges. The body carries secrets, so it is never logged, and a
        redirect is refused rather than followed (a POST must not be replayed elsewhere).
        """
        label = site or _hostname(url)
        request = _Request(url, None, headers, "application/json", method="POST", form=form, json_body=json_body)

        def attempt() -> Any:
            body, content_type = self._fetch(request, label)
            return _decode_json(body, content_type, label, url)

        return self._with_retries(url, label, attempt)

    def download(
        self,
        url: str,
        *,
        site: str | None = None,
        auth: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """The body of `url`, at most `max_download_bytes` long, verified complete.

        Raises DownloadRefused for a body over the cap (announced or streamed) or a
        redirect to a host outside `allowed_hosts`; SiteError when the retries are used up.
        """
        label = site or _hostname(url)
        request = _Request(url, auth, headers, "*/*", identity=True)
        return self._with_retries(url, label, lambda: self._fetch(request, label)[0])

    # -- retries ------------------------------------------------------------------------

    def _with_retries(self, url: str, label: str, attempt: Callable[[], T]) -> T:
        attempts = self.max_retries + 1
        last_reason = ""
        for number in range(attempts):
            try:
                return attempt()
            except _RetryableFailure as failure:
                last_reason = failure.reason
                if number + 1 == attempts:
                    break
                delay = self._retry_delay(number, failure.retry_after_s)
                log.warning(
                    "%s: %s on %s; retry %d/%d in %.2fs",
                    label, failure.reason, redact_url(url), number + 1, self.max_retries, delay,
                )
                time.sleep(delay)
        raise SiteError(label, url, f"gave up after {attempts} attempts; last error: {last_reason}")

    def _retry_delay(self, failed_attempts: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.backoff_max_s)
        backoff = min(self.backoff_max_s, self.backoff_base_s * 2**failed_attempts)
        # Jitter spreads out clients that failed together so they do not retry in lockstep.
        return backoff * random.uniform(0.5, 1.0)

    # -- one attempt --------------------------------------------------------------------

    def _fetch(self, request: _Request, label: str) -> tuple[bytes, str]:
        """Follow redirects by hand (to vet every hop), then read the body of the final answer."""
        origin_host = _hostname(request.url)
        self._check_first_host(request.url, label)
        current = request.url
        for _ in range(MAX_REDIRECTS + 1):
            # Credentials go only to the host they were meant for.
            same_host = _hostname(current) == origin_host
            response = self._send(request, current, label, same_host)
            with response:
                if response.status_code in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise SiteError(label, current, f"HTTP {response.status_code} redirect without a Location header")
                    if request.method != "GET":
                        raise SiteError(label, current, f"HTTP {response.status_code} redirect answering a {request.method}")
                    target = urljoin(current, location)
                    self._check_redirect(target, origin_host, label, current)
                    current = target
                    continue
                _raise_for_status(response, label, current)
                body = self._read_body(response, label, current)
                return body, response.headers.get("Content-Type", "")
        raise SiteError(label, request.url, f"more than {MAX_REDIRECTS} redirects")

    def _check_first_host(self, url: str, label: str) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise SiteError(label, url, f"unsupported URL scheme {scheme!r}: only http and https are fetched")
        host = _hostname(url)
        if self.allowed_hosts is not None and not host_allowed(host, self.allowed_hosts):
            raise DownloadRefused(
                label, url, f"host {host!r} is not in allowed_hosts {sorted(self.allowed_hosts)}"
            )

    def _check_redirect(self, target: str, origin_host: str, label: str, url: str) -> None:
        host = _hostname(target)
        scheme = urlsplit(target).scheme
        allowed = self.allowed_hosts if self.allowed_hosts is not None else {origin_host}
        if scheme not in ("http", "https") or not host_allowed(host, allowed):
            raise DownloadRefused(
                label, url, f"refused redirect to {redact_url(target)} (allowed hosts: {sorted(allowed)})"
            )

    def _session(self) -> requests.Session:
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            self._sessions.session = session
        return session

    def _send(self, request: _Request, url: str, label: str, same_host: bool) -> requests.Response:
        _limiter_for(_host_key(url)).wait_turn(self, 1.0 / self.requests_per_second)
        headers = {"Accept": request.accept}
        if same_host and request.headers:
            headers.update(request.headers)
        if request.identity:
            # Content-Length then counts the bytes we receive, so truncation is detectable.
            headers["Accept-Encoding"] = "identity"
        try:
            return self._session().request(
                request.method, url, headers=headers, auth=request.auth if same_host else None,
                data=request.form, json=request.json_body,
                timeout=self.timeout_s, allow_redirects=False, stream=True,
            )
        except requests.Timeout:
            raise _RetryableFailure(f"no answer within {self.timeout_s:g}s") from None
        except requests.ConnectionError as exc:
            raise _RetryableFailure(f"connection failed ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            raise SiteError(label, url, f"request failed: {type(exc).__name__}: {exc}") from None

    def _read_body(self, response: requests.Response, label: str, url: str) -> bytes:
        cap = self.max_download_bytes
        declared = _content_length(response)
        if declared is not None and declared > cap:
            raise DownloadRefused(
                label, url, f"refused: the server announces {declared} bytes, over the limit of {cap} bytes"
            )
        chunks: list[bytes] = []
        received = 0
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                received += len(chunk)
                if received > cap:
                    raise DownloadRefused(label, url, f"refused: the body exceeds the limit of {cap} bytes")
                chunks.append(chunk)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as exc:
            raise _RetryableFailure(f"body cut off after {received} bytes ({type(exc).__name__})") from None
        encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if declared is not None and not encoded and received != declared:
            raise _RetryableFailure(f"truncated body: {received} of {declared} announced bytes")
        return b"".join(chunks)


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _raise_for_status(response: requests.Response, label: str, url: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (408, 429) or status >= 500:
        raise _RetryableFailure(f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
    hint = {
        401: ": check the site's login and API key",
        403: ": access denied (credentials, a ban, or a bot challenge)",
        404: ": not found",
    }.get(status, "")
    raise SiteError(label, url, f"HTTP {status} {response.reason or ''}".rstrip() + hint)


def _decode_json(body: bytes, content_type: str, label: str, url: str) -> Any:
    media_type = content_type.split(";", 1)[0].strip().lower()
    head = body.lstrip()[:64].lower()
    if "html" in media_type or head.startswith((b"<!doctype", b"<html")):
        match = _HTML_TITLE.search(body[:4096])
        title = f" titled {match.group(1).decode('utf-8', 'replace').strip()[:80]!r}" if match else ""
        raise SiteError(
            label, url,
            f"expected JSON but got an HTML page{title}: the site may be down, behind a bot "
            "challenge, or the base URL is wrong",
        )
    if media_type and media_type not in ("application/json", "text/json") and not media_type.endswith("+json"):
        raise SiteError(label, url, f"expected JSON but got content type {media_type!r}")
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise SiteError(label, url, f"malformed JSON ({len(body)} bytes): {exc}") from None


def _decode_xml(body: bytes, content_type: str, label: str, url: str) -> ElementTree.Element:
    head = body.lstrip()[:64].lower()
    if "html" in content_type.lower() or head.startswith((b"<!doctype html", b"<html")):
        raise SiteError(label, url, "expected XML but got an HTML page: the site may be down or behind a bot challenge")
    if b"<!doctype" in body[:4096].lower() or b"<!entity" in body.lower():
        raise SiteError(label, url, "refused XML with a DTD or entity declarations")
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise SiteError(label, url, f"malformed XML ({len(body)} bytes): {exc}") from None
