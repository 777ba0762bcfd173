"""A real HTTP server on 127.0.0.1 whose answers the tests script, faults included.

Used by the test_sources_* tests: the code under test speaks real HTTP; only the site
on the other end is scripted. Every request is recorded with its arrival time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (8, 8), fmt: str = "PNG", frames: int = 1) -> bytes:
    """A small real image, different for every seed (noise, so PNG size grows with `size`)."""
    rng = random.Random(seed)
    pictures = [
        Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
        for _ in range(frames)
    ]
    buffer = io.BytesIO()
    if frames > 1:
        pictures[0].save(buffer, format=fmt, save_all=True, append_images=pictures[1:], duration=50, loop=0)
    else:
        pictures[0].save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait before answering (to provoke client timeouts)
    # Content-Length to announce: None -> the real length; -1 -> no header (body ends at close).
    announced_length: int | None = None


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status=status, body=json.dumps(value).encode(), headers={"Content-Type": "application/json"})


@dataclass
class SeenRequest:
    at: float  # time.monotonic() on arrival
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    method: str = "GET"
    body: bytes = b""


Route = Callable[[SeenRequest], Reply]


class LoopbackSite:
    """`routes` maps a path (exact, or a prefix ending in "/") to a function that answers it."""

    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                seen = SeenRequest(
                    at=time.monotonic(),
                    path=parts.path,
                    query={k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
                    headers={k.lower(): v for k, v in self.headers.items()},
                    method=self.command,
                    body=self.rfile.read(length) if length else b"",
                )
                with site._lock:
                    site.requests.append(seen)
                reply = site._route(seen)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if reply.announced_length != -1:
                        length = len(reply.body) if reply.announced_length is None else reply.announced_length
                        self.send_header("Content-Length", str(length))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (a timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def _route(self, seen: SeenRequest) -> Reply:
        route = self.routes.get(seen.path)
        if route is None:
            prefixes = [p for p in self.routes if p.endswith("/") and seen.path.startswith(p)]
            if prefixes:
                route = self.routes[max(prefixes, key=len)]
        return route(seen) if route else Reply(status=404, body=b"not found")

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self, path: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> LoopbackSite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def sequence(*replies: Reply) -> Route:
    """Answer with each reply in turn, then keep repeating the last one."""
    remaining = list(replies)
    lock = threading.Lock()

    def route(_: SeenRequest) -> Reply:
        with lock:
            return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return route



class FakeDanbooru:
    """Danbooru's read API over an in-memory catalogue: b<id> paging, name_matches, /data/ files."""

    def __init__(self, tags: list[dict] | None = None):
        self.posts: list[dict] = []
        self.tags = tags or []
        self.files: dict[str, bytes] = {}

    def add_post(self, post_id: int, tag: str, copyright: str = "", data: bytes | None = None, **fields: Any) -> dict:
        """A posts.json entry in Danbooru's shape, its file served under /data/<md5>.png."""
        data = data if data is not None else image_bytes(post_id)
        md5 = hashlib.md5(data).hexdigest()
        post = {
            "id": post_id, "md5": md5, "file_ext": "png", "file_url": f"/data/{md5}.png",
            "large_file_url": f"/data/sample_{md5}.jpg", "image_width": 800, "image_height": 1000,
            "file_size": len(data), "rating": "g", "tag_string": " ".join(["1girl", tag, copyright, "solo"]).replace("  ", " "),
            "tag_string_character": tag, "tag_string_copyright": copyright, "tag_string_general": "1girl solo",
        }
        post.update(fields)
        self.posts.append(post)
        self.posts.sort(key=lambda p: -p["id"])
        self.files[f"{md5}.png"] = data
        return post

    def routes(self) -> dict[str, Route]:
        return {"/posts.json": self.list_posts, "/tags.json": self.search_tags, "/data/": self.serve_file}

    def list_posts(self, request: SeenRequest) -> Reply:
        tag = request.query.get("tags", "")
        limit = int(request.query.get("limit", "20"))
        page = request.query.get("page", "")
        matching = [p for p in self.posts if tag in str(p.get("tag_string", "")).split()]
        if page.startswith("b"):
            matching = [p for p in matching if p["id"] < int(page[1:])]
        return json_reply(matching[:limit])

    def search_tags(self, request: SeenRequest) -> Reply:
        pattern = request.query.get("search[name_matches]", "")
        category = request.query.get("search[category]")
        found = [
            t for t in self.tags
            if fnmatch.fnmatchcase(t["name"], pattern) and (category is None or str(t["category"]) == category)
        ]
        found.sort(key=lambda t: -t["post_count"])
        return json_reply(found[: int(request.query.get("limit", "20"))])

    def serve_file(self, request: SeenRequest) -> Reply:
        name = request.path.rsplit("/", 1)[-1]
        if name not in self.files:
            return Reply(404, b"no such file")
        return Reply(body=self.files[name], headers={"Content-Type": "image/png"})
