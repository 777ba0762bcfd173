"""Loopback fakes of every site family, answering in each site's own response shapes.

Each fake serves one catalogue of `FixturePost`s (real small images) the way its site's
public API documentation describes: Gelbooru's `@attributes` wrapper and 0.2 sites' bare
lists and XML tags, Moebooru's `api_version=2` tag map, e621's `posts` wrapper, Zerochan's
`items` and per-entry JSON, Anime-Pictures' v3 envelope, Sankaku's keyset `meta.next`,
Pixiv's OAuth token and `next_url`, Wallhaven's `data` + `meta`. The tests run the real
clients against them over HTTP, faults included (see test_sources_faults.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, quote_plus, unquote, unquote_plus, urlencode

from PIL import Image
from sources_loopback import Reply, Route, SeenRequest, image_bytes, json_reply

from lora_factory.sources.anime_pictures import AnimePicturesClient
from lora_factory.sources.base import MediaPolicy, PagedSiteClient
from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.e621 import E621Client
from lora_factory.sources.gelbooru import GelbooruClient, GelbooruV02Client
from lora_factory.sources.http import PoliteHttpClient
from lora_factory.sources.moebooru import MoebooruClient
from lora_factory.sources.pixiv import PixivClient
from lora_factory.sources.sankaku import SankakuClient
from lora_factory.sources.wallhaven import WallhavenClient
from lora_factory.sources.zerochan import ZerochanClient

CHARACTER, COPYRIGHT, GENERAL = 4, 3, 0


@dataclass
class FixturePost:
    id: int
    character: str
    copyright: str
    data: bytes
    width: int
    height: int
    ext: str = "png"
    general: tuple[str, ...] = ("1girl", "solo")
    rating: str = "g"
    hidden: bool = False  # listed without a file (deleted, or held back from anonymous users)
    animated: bool = False  # tagged "animated"
    video: bool = False  # an mp4 whose sample is a still frame
    sample: bytes | None = None  # a smaller JPEG rendition
    sample_size: tuple[int, int] = (0, 0)

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    @property
    def tags(self) -> list[str]:
        meta = ["animated"] if self.animated else []
        return [t for t in (*self.general, self.character, self.copyright, *meta) if t]

    @property
    def file_name(self) -> str:
        return f"{self.md5}.{self.ext}"

    @property
    def sample_name(self) -> str:
        return f"sample_{self.md5}.jpg"


def make_post(post_id: int, character: str, copyright: str = "", size: tuple[int, int] = (8, 8),
              data: bytes | None = None, sample_size: tuple[int, int] | None = None, **fields: Any) -> FixturePost:
    data = data if data is not None else image_bytes(post_id, size)
    width, height = Image.open(io.BytesIO(data)).size
    sample = image_bytes(post_id + 10_000, sample_size, fmt="JPEG") if sample_size else None
    return FixturePost(post_id, character, copyright, data, width, height, sample=sample,
                       sample_size=sample_size or (0, 0), **fields)


class FakeSite:
    """A catalogue and its files; subclasses render the site family's API."""

    listing_path = "/"

    def __init__(self, posts: list[FixturePost]):
        self.posts = sorted(posts, key=lambda p: -p.id)
        self.files: dict[str, bytes] = {}
        for post in posts:
            if not post.hidden:
                self.files[post.file_name] = post.data
                if post.sample is not None:
                    self.files[post.sample_name] = post.sample

    def matching(self, tag: str) -> list[FixturePost]:
        return [p for p in self.posts if tag in p.tags]

    def tag_rows(self) -> list[tuple[str, int, int]]:
        """(name, post count, category) of every tag in the catalogue."""
        counts: dict[tuple[str, int], int] = {}
        for post in self.posts:
            for name, category in ((post.character, CHARACTER), (post.copyright, COPYRIGHT),
                                   *((g, GENERAL) for g in post.general)):
                if name:
                    counts[(name, category)] = counts.get((name, category), 0) + 1
        return sorted(((n, c, cat) for (n, cat), c in counts.items()), key=lambda r: -r[1])

    def file_url(self, post: FixturePost) -> str:
        return f"/files/{post.file_name}"

    def sample_url(self, post: FixturePost) -> str | None:
        return f"/files/{post.sample_name}" if post.sample is not None else None

    def serve_file(self, request: SeenRequest) -> Reply:
        name = request.path.rsplit("/", 1)[-1]
        if name not in self.files:
            return Reply(404, b"no such file")
        kind = "image/jpeg" if name.endswith(".jpg") else f"image/{name.rsplit('.', 1)[-1]}"
        return Reply(body=self.files[name], headers={"Content-Type": kind})

    def routes(self) -> dict[str, Route]:
        raise NotImplementedError


def _glob(pattern: str, name: str) -> bool:
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, name) is not None


def _keyset(query: str) -> tuple[str, int | None]:
    """Gelbooru-style "tag id:<N" -> (tag, N)."""
    match = re.search(r"\s*id:<(\d+)", query)
    if match is None:
        return query.strip(), None
    return (query[:match.start()] + query[match.end():]).strip(), int(match.group(1))


class FakeDanbooruSite(FakeSite):
    """Danbooru: `/posts.json` paged by `b<id>`, renditions in `media_asset.variants`."""

    listing_path = "/posts.json"

    def routes(self) -> dict[str, Route]:
        return {"/posts.json": self.list_posts, "/tags.json": self.search_tags, "/files/": self.serve_file}

    def list_posts(self, request: SeenRequest) -> Reply:
        q = request.query
        page, limit = q.get("page", ""), int(q.get("limit", "20"))
        posts = self.matching(q.get("tags", ""))
        if page.startswith("b"):
            posts = [p for p in posts if p.id < int(page[1:])]
        return json_reply([self.render(p) for p in posts[:limit]])

    def search_tags(self, request: SeenRequest) -> Reply:
        q = request.query
        rows = [r for r in self.tag_rows() if _glob(q.get("search[name_matches]", "*"), r[0])
                and ("search[category]" not in q or str(r[2]) == q["search[category]"])]
        return json_reply([{"id": i, "name": n, "post_count": c, "category": t, "is_deprecated": False}
                           for i, (n, c, t) in enumerate(rows[: int(q.get("limit", "20"))], 1)])

    def render(self, post: FixturePost) -> dict[str, Any]:
        ext = "mp4" if post.video else post.ext
        variants = [{"type": "original", "url": self.file_url(post), "width": post.width, "height": post.height,
                     "file_ext": ext}]
        if post.sample is not None:
            variants.insert(0, {"type": "sample", "url": self.sample_url(post), "width": post.sample_size[0],
                                "height": post.sample_size[1], "file_ext": "jpg"})
        row = {
            "id": post.id, "created_at": "2024-06-01T10:00:00.000-04:00", "score": 3, "md5": post.md5,
            "file_ext": ext, "file_size": len(post.data), "image_width": post.width, "image_height": post.height,
            "rating": post.rating, "tag_string": " ".join(post.tags),
            "tag_string_general": " ".join(post.general), "tag_string_character": post.character,
            "tag_string_copyright": post.copyright, "tag_string_artist": "",
            "tag_string_meta": "animated" if post.animated else "", "file_url": self.file_url(post),
            "large_file_url": self.sample_url(post) or self.file_url(post), "is_banned": False,
            "media_asset": {"id": post.id, "md5": post.md5, "file_ext": ext, "image_width": post.width,
                            "image_height": post.height, "variants": variants},
        }
        if post.hidden:
            for key in ("md5", "file_url", "large_file_url"):
                row.pop(key)
            row["media_asset"].pop("variants")
        return row


class FakeGelbooru(FakeSite):
    """gelbooru.com: `{"@attributes": ..., "post": [...]}`, api_key + user_id required."""

    listing_path = "/index.php"

    def routes(self) -> dict[str, Route]:
        return {"/index.php": self.dapi, "/files/": self.serve_file}

    def dapi(self, request: SeenRequest) -> Reply:
        q = request.query
        if not (q.get("api_key") and q.get("user_id")):
            return Reply(401, b"")
        if q.get("s") == "tag":
            pattern = q.get("name_pattern", "%").replace("%", "*")
            rows = [r for r in self.tag_rows() if _glob(pattern, r[0])][: int(q.get("limit", "100"))]
            return json_reply({"@attributes": {"limit": 100, "offset": 0, "count": len(rows)},
                               "tag": [{"id": i, "name": n, "count": c, "type": t, "ambiguous": 0}
                                       for i, (n, c, t) in enumerate(rows, 1)]})
        tag, before = _keyset(q.get("tags", ""))
        posts = [p for p in self.matching(tag) if before is None or p.id < before][: int(q.get("limit", "100"))]
        body: dict[str, Any] = {"@attributes": {"limit": int(q.get("limit", "100")), "offset": 0,
                                                "count": len(self.matching(tag))}}
        if posts:
            body["post"] = [self.render(p) for p in posts]
        return json_reply(body)

    def render(self, post: FixturePost) -> dict[str, Any]:
        sample = self.sample_url(post)
        return {
            "id": post.id, "created_at": "Sat Jun 01 10:00:00 -0500 2024", "score": 3, "width": post.width,
            "height": post.height, "md5": post.md5, "directory": post.md5[:2], "image": post.file_name,
            "rating": {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}[post.rating],
            "source": "", "change": 1717254000, "owner": "uploader", "creator_id": 7, "parent_id": 0,
            "sample": int(sample is not None), "preview_height": 150, "preview_width": 150,
            "tags": " ".join(post.tags), "title": "", "has_notes": "false", "has_comments": "false",
            "file_url": "" if post.hidden else self.file_url(post),
            "preview_url": f"/thumbnails/{post.md5[:2]}/thumbnail_{post.md5}.jpg",
            "sample_url": sample or "", "sample_height": post.sample_size[1], "sample_width": post.sample_size[0],
            "status": "active", "post_locked": 0, "has_children": "false",
        }


class FakeGelbooruV02(FakeSite):
    """A Gelbooru 0.2 site: a bare JSON list (an empty body for no results), XML tags,
    files at /images/<directory>/<image> and samples at /samples/<directory>/sample_<stem>.jpg."""

    listing_path = "/index.php"

    def routes(self) -> dict[str, Route]:
        return {"/index.php": self.dapi, "/images/": self.serve_file, "/samples/": self.serve_sample}

    def serve_sample(self, request: SeenRequest) -> Reply:
        stem = request.path.rsplit("/", 1)[-1].removeprefix("sample_").removesuffix(".jpg")
        post = next((p for p in self.posts if p.md5 == stem and p.sample is not None), None)
        return Reply(body=post.sample, headers={"Content-Type": "image/jpeg"}) if post else Reply(404, b"")

    def dapi(self, request: SeenRequest) -> Reply:
        q = request.query
        if q.get("s") == "tag":
            pattern = q.get("name_pattern", "%").replace("%", "*")
            rows = [r for r in self.tag_rows() if _glob(pattern, r[0])][: int(q.get("limit", "100"))]
            xml = "".join(f'<tag type="{t}" count="{c}" name="{n}" ambiguous="false" id="{i}"/>'
                          for i, (n, c, t) in enumerate(rows, 1))
            return Reply(body=f'<?xml version="1.0" encoding="UTF-8"?><tags type="array">{xml}</tags>'.encode(),
                         headers={"Content-Type": "text/xml; charset=utf-8"})
        tag, before = _keyset(q.get("tags", ""))
        posts = [p for p in self.matching(tag) if before is None or p.id < before][: int(q.get("limit", "100"))]
        if not posts:
            return Reply(body=b"", headers={"Content-Type": "application/json"})
        return json_reply([self.render(p) for p in posts])

    def render(self, post: FixturePost) -> dict[str, Any]:
        return {
            "directory": 4905, "hash": post.md5, "height": post.height, "id": post.id,
            "image": "" if post.hidden else post.file_name, "change": 1789760741, "owner": "danbooru",
            "parent_id": 0, "rating": {"g": "safe", "s": "safe", "q": "questionable", "e": "explicit"}[post.rating],
            "sample": post.sample is not None, "sample_height": post.sample_size[1],
            "sample_width": post.sample_size[0], "score": 0, "tags": " ".join(post.tags), "width": post.width,
        }

    def file_url(self, post: FixturePost) -> str:
        return f"/images/4905/{post.file_name}"


class FakeMoebooru(FakeSite):
    """Konachan / Yande.re: `post.json?api_version=2&include_tags=1`, pages from 1."""

    listing_path = "/post.json"
    TYPE_NAMES = {CHARACTER: "character", COPYRIGHT: "copyright", GENERAL: "general"}

    def routes(self) -> dict[str, Route]:
        return {"/post.json": self.list_posts, "/tag.json": self.search_tags, "/files/": self.serve_file}

    def list_posts(self, request: SeenRequest) -> Reply:
        q = request.query
        limit, page = int(q.get("limit", "16")), int(q.get("page", "1"))
        posts = self.matching(q.get("tags", ""))[(page - 1) * limit: page * limit]
        if q.get("api_version") != "2":
            return json_reply([self.render(p) for p in posts])
        types = {n: self.TYPE_NAMES[t] for n, _, t in self.tag_rows()}
        names = {t for p in posts for t in p.tags}
        return json_reply({"posts": [self.render(p) for p in posts], "pools": [], "pool_posts": [],
                           "tags": {n: types.get(n, "general") for n in sorted(names)}})

    def search_tags(self, request: SeenRequest) -> Reply:
        q = request.query
        rows = [r for r in self.tag_rows() if _glob(q.get("name", "*"), r[0])
                and ("type" not in q or str(r[2]) == q["type"])]
        return json_reply([{"id": i, "name": n, "count": c, "type": t, "ambiguous": False}
                           for i, (n, c, t) in enumerate(rows[: int(q.get("limit", "50"))], 1)])

    def render(self, post: FixturePost) -> dict[str, Any]:
        sample = self.sample_url(post) or self.file_url(post)
        size = post.sample_size if post.sample is not None else (post.width, post.height)
        row = {
            "id": post.id, "tags": " ".join(post.tags), "created_at": 1717254000, "creator_id": 7,
            "author": "uploader", "change": 1, "source": "", "score": 3, "md5": post.md5,
            "file_size": len(post.data), "file_ext": post.ext, "file_url": self.file_url(post),
            "is_shown_in_index": True, "preview_url": f"/files/preview_{post.md5}.jpg", "preview_width": 150,
            "preview_height": 150, "actual_preview_width": 300, "actual_preview_height": 300,
            "sample_url": sample, "sample_width": size[0], "sample_height": size[1],
            "sample_file_size": 0, "jpeg_url": self.file_url(post), "jpeg_width": post.width,
            "jpeg_height": post.height, "jpeg_file_size": 0, "rating": {"g": "s", "s": "s"}.get(post.rating, post.rating),
            "has_children": False, "parent_id": None, "status": "active", "width": post.width,
            "height": post.height, "is_held": False, "frames_pending_string": "", "frames_pending": [],
            "frames_string": "", "frames": [],
        }
        if post.hidden:
            row["status"] = "deleted"
            for key in ("file_url", "jpeg_url", "sample_url", "md5"):
                row.pop(key)
        return row


class FakeE621(FakeSite):
    """e621 / e926: `{"posts": [...]}`, `page=b<id>`, tags.json answering `{"tags": []}` when empty."""

    listing_path = "/posts.json"

    def routes(self) -> dict[str, Route]:
        return {"/posts.json": self.list_posts, "/tags.json": self.search_tags, "/files/": self.serve_file}

    def list_posts(self, request: SeenRequest) -> Reply:
        q = request.query
        page, limit = q.get("page", ""), int(q.get("limit", "75"))
        posts = self.matching(q.get("tags", ""))
        if page.startswith("b"):
            posts = [p for p in posts if p.id < int(page[1:])]
        return json_reply({"posts": [self.render(p) for p in posts[:limit]]})

    def search_tags(self, request: SeenRequest) -> Reply:
        q = request.query
        rows = [r for r in self.tag_rows() if _glob(q.get("search[name_matches]", "*"), r[0])
                and ("search[category]" not in q or str(r[2]) == q["search[category]"])]
        if not rows:
            return json_reply({"tags": []})
        return json_reply([{"id": i, "name": n, "post_count": c, "related_tags": "", "category": t,
                            "is_locked": False, "created_at": "2020-01-01T00:00:00.000-05:00"}
                           for i, (n, c, t) in enumerate(rows, 1)])

    def render(self, post: FixturePost) -> dict[str, Any]:
        sample = self.sample_url(post)
        return {
            "id": post.id, "created_at": "2024-06-01T10:00:00.000-04:00",
            "file": {"width": post.width, "height": post.height, "ext": "webm" if post.video else post.ext,
                     "size": len(post.data), "md5": post.md5, "url": None if post.hidden else self.file_url(post)},
            "preview": {"width": 150, "height": 150, "url": None},
            "sample": {"has": sample is not None, "width": post.sample_size[0], "height": post.sample_size[1],
                       "url": sample, "alternates": {}},
            "score": {"up": 3, "down": 0, "total": 3},
            "tags": {"general": list(post.general), "artist": [], "copyright": [post.copyright] if post.copyright else [],
                     "character": [post.character] if post.character else [], "species": [], "invalid": [],
                     "meta": ["animated"] if post.animated else [], "lore": [], "contributor": []},
            "locked_tags": [], "change_seq": 1, "flags": {"pending": False, "flagged": False, "deleted": post.hidden},
            "rating": {"g": "s"}.get(post.rating, post.rating), "fav_count": 1, "sources": [], "pools": [],
            "relationships": {"parent_id": None, "has_children": False, "children": []},
            "approver_id": None, "uploader_id": 1, "description": "", "comment_count": 0,
            "is_favorited": False, "has_notes": False, "duration": None,
        }


class FakeZerochan(FakeSite):
    """Zerochan: `/<Tag+Name>?json` -> `{"items": [...]}`, `/<id>?json` -> the entry with its URLs."""

    @property
    def listing_path(self) -> str:  # type: ignore[override]
        return self._listing_path

    def __init__(self, posts: list[FixturePost], tag: str = ""):
        super().__init__(posts)
        self._listing_path = "/" + quote_plus(tag, safe="")

    def routes(self) -> dict[str, Route]:
        return {"/": self.page, "/files/": self.serve_file}

    def page(self, request: SeenRequest) -> Reply:
        if "json" not in request.query:
            return Reply(body=b"<html><title>Zerochan</title></html>", headers={"Content-Type": "text/html"})
        name = unquote_plus(request.path[1:])
        if name.isdigit():
            post = next((p for p in self.posts if p.id == int(name)), None)
            if post is None:
                return Reply(404, b"")
            return json_reply({"id": post.id, "small": f"/files/s_{post.id}.jpg", "medium": f"/files/m_{post.id}.jpg",
                               "large": f"/files/l_{post.id}.jpg",
                               "full": "" if post.hidden else self.file_url(post), "width": post.width,
                               "height": post.height, "size": len(post.data), "hash": post.md5, "source": "",
                               "primary": post.character, "tags": post.tags})
        limit, page = int(request.query.get("l", "48")), int(request.query.get("p", "1"))
        posts = self.matching(name)[(page - 1) * limit: page * limit]
        if not posts and page == 1:
            return Reply(404, b"")
        return json_reply({"items": [{"id": p.id, "width": p.width, "height": p.height, "md5": p.md5,
                                      "thumbnail": f"/files/t_{p.id}.jpg", "source": "", "tag": p.character,
                                      "tags": p.tags} for p in posts]})


class FakeAnimePictures(FakeSite):
    """Anime-Pictures v3: list envelope with max_pages, per-post detail with tags and the
    download name, originals behind the session cookie."""

    listing_path = "/api/v3/posts"
    TOKEN = "session-token"
    TYPES = {CHARACTER: 1, COPYRIGHT: 3, GENERAL: 0}

    def routes(self) -> dict[str, Route]:
        return {"/api/v3/posts": self.list_posts, "/api/v3/posts/": self.detail, "/api/v3/tags": self.tags,
                "/pictures/get_image/": self.get_image}

    def list_posts(self, request: SeenRequest) -> Reply:
        q = request.query
        if "page" not in q:
            return json_reply({"errormsg": "Missing or invalid `page` parameter", "success": False}, status=400)
        page, per_page = int(q["page"]), int(q.get("posts_per_page", "80"))
        posts = self.matching(q.get("search_tag", "").replace(" ", "_"))
        chunk = posts[page * per_page:(page + 1) * per_page]
        return json_reply({"posts_per_page": per_page, "response_posts_count": len(chunk), "page_number": page,
                           "posts": [{"id": p.id, "md5": p.md5, "md5_pixels": p.md5, "width": p.width,
                                      "height": p.height, "pubtime": "2024-06-01T10:00:00", "datetime": "",
                                      "score": 0.0, "score_number": 3, "size": len(p.data), "download_count": 1,
                                      "erotics": {"g": 0, "s": 1, "q": 2, "e": 3}[p.rating], "color": [1, 2, 3],
                                      "ext": "." + p.ext, "status": 1, "spoiler": False, "have_alpha": False,
                                      "tags_count": len(p.tags)} for p in chunk],
                           "posts_count": len(posts), "max_pages": max(0, (len(posts) - 1) // per_page)})

    def detail(self, request: SeenRequest) -> Reply:
        post = next((p for p in self.posts if str(p.id) == request.path.rsplit("/", 1)[-1]), None)
        if post is None:
            return json_reply({"errormsg": "Post not found", "success": False}, status=410)
        kinds = {post.character: CHARACTER, post.copyright: COPYRIGHT}
        return json_reply({
            "post": {"id": post.id, "md5": post.md5, "width": post.width, "height": post.height,
                     "small_preview": f"https://opreviews.example/{post.md5}_sp.avif",
                     "medium_preview": f"https://opreviews.example/{post.md5}_cp.avif",
                     "big_preview": f"https://opreviews.example/{post.md5}_bp.avif"},
            "tags": [{"tag": {"id": i, "tag": t.replace("_", " "), "tag_ru": None, "tag_jp": None, "num": 9,
                              "num_pub": 9, "type": self.TYPES[kinds.get(t, GENERAL)]},
                      "relation": {"addtime": "2024-06-01"}} for i, t in enumerate(post.tags, 1)],
            "file_url": "" if post.hidden else f"{post.id}-{post.width}x{post.height}-{post.character}.{post.ext}",
            "star_it": False, "favorites_users": [], "tied": [],
        })

    def tags(self, request: SeenRequest) -> Reply:
        wanted = request.query.get("tag", "").replace(" ", "_")
        rows = [r for r in self.tag_rows() if r[0] == wanted]
        return json_reply({"tags": [{"id": 1, "tag": n.replace("_", " "), "tag_ru": None, "tag_jp": None,
                                     "num": c, "num_pub": c, "type": self.TYPES[t]} for n, c, t in rows],
                           "count": len(rows), "offset": 0, "limit": 20, "success": True})

    def get_image(self, request: SeenRequest) -> Reply:
        if f"anime_pictures_jwt={self.TOKEN}" not in request.headers.get("cookie", ""):
            return Reply(403, b"")
        post_id = unquote(request.path.rsplit("/", 1)[-1]).split("-", 1)[0]
        post = next(p for p in self.posts if str(p.id) == post_id)
        return Reply(body=post.data, headers={"Content-Type": f"image/{post.ext}"})


class FakeSankaku(FakeSite):
    """Sankaku: `/auth/token` login, `/v2/posts/keyset` with `meta.next` tokens, letter ids."""

    listing_path = "/v2/posts/keyset"
    TOKEN = "bearer-token"

    def routes(self) -> dict[str, Route]:
        return {"/auth/token": self.token, "/v2/posts/keyset": self.list_posts, "/tags": self.tags,
                "/files/": self.serve_file}

    @staticmethod
    def letter_id(post: FixturePost) -> str:
        return "Jw" + hashlib.md5(str(post.id).encode()).hexdigest()[:9]

    def token(self, request: SeenRequest) -> Reply:
        credentials = json.loads(request.body or b"{}")
        if credentials != {"login": "alice", "password": "hunter2"}:
            return json_reply({"success": False, "code": "snackbar__error--invalid-credentials"}, status=401)
        return json_reply({"success": True, "token_type": "Bearer", "access_token": self.TOKEN,
                           "refresh_token": "refresh", "current_user": {"id": 1, "name": "alice"}})

    def list_posts(self, request: SeenRequest) -> Reply:
        q = request.query
        if request.headers.get("authorization") not in (None, f"Bearer {self.TOKEN}"):
            return json_reply({"success": False, "code": "invalid-token"}, status=401)
        posts = self.matching(q.get("tags", ""))
        start = int(q["next"].removeprefix("cursor-")) if q.get("next") else 0
        limit = int(q.get("limit", "40"))
        chunk = posts[start:start + limit]
        following = f"cursor-{start + limit}" if start + limit < len(posts) else None
        return json_reply({"meta": {"next": following, "prev": None}, "data": [self.render(p) for p in chunk]})

    def tags(self, request: SeenRequest) -> Reply:
        prefix = request.query.get("name", "")
        rows = [r for r in self.tag_rows() if r[0].startswith(prefix)
                and ("types[]" not in request.query or str(r[2]) == request.query["types[]"])]
        return json_reply([{"id": i, "name": n, "name_en": n, "name_ja": None, "type": t, "count": c,
                            "post_count": c, "pool_count": 0, "rating": None} for i, (n, c, t) in enumerate(rows, 1)])

    def render(self, post: FixturePost) -> dict[str, Any]:
        kinds = {post.character: CHARACTER, post.copyright: COPYRIGHT}
        return {
            "id": self.letter_id(post), "rating": {"g": "s"}.get(post.rating, post.rating), "status": "active",
            "author": {"id": 1, "name": "uploader"}, "sample_url": self.sample_url(post),
            "sample_width": post.sample_size[0], "sample_height": post.sample_size[1], "preview_url": None,
            "file_url": None if post.hidden else self.file_url(post), "width": post.width, "height": post.height,
            "file_size": len(post.data), "file_type": "video/mp4" if post.video else f"image/{post.ext}",
            "created_at": {"json_class": "Time", "s": 1717254000, "n": 0}, "has_children": False,
            "md5": post.md5, "fav_count": 1, "total_score": 3, "vote_count": 1, "is_premium": False,
            "tags": [{"id": i, "name_en": t, "name_ja": None, "type": kinds.get(t, GENERAL), "count": 9,
                      "post_count": 9, "name": t} for i, t in enumerate(post.tags, 1)],
            "video_duration": 3.0 if post.video else None,
        }


class FakePixiv(FakeSite):
    """Pixiv's app API: refresh-token OAuth, search with `next_url`, files that need the Referer."""

    listing_path = "/v1/search/illust"
    REFRESH_TOKEN = "refresh-token"
    ACCESS_TOKEN = "access-token"
    PAGE = 30

    def __init__(self, posts: list[FixturePost], pages_of: dict[int, list[FixturePost]] | None = None):
        super().__init__(posts)
        self.pages_of = pages_of or {}  # work id -> its further pages
        for extra in self.pages_of.values():
            for page in extra:
                self.files[page.file_name] = page.data

    def routes(self) -> dict[str, Route]:
        return {"/auth/token": self.token, "/v1/search/illust": self.search, "/v2/search/autocomplete": self.complete,
                "/files/": self.serve_image}

    def token(self, request: SeenRequest) -> Reply:
        form = {k: v[-1] for k, v in parse_qs(request.body.decode()).items()}
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != self.REFRESH_TOKEN:
            return json_reply({"has_error": True, "errors": {"system": {"message": "invalid_grant"}}}, status=400)
        token = {"access_token": self.ACCESS_TOKEN, "expires_in": 3600, "token_type": "bearer", "scope": "",
                 "refresh_token": self.REFRESH_TOKEN, "user": {"id": "1", "name": "alice"}}
        return json_reply({**token, "response": token})

    def authorised(self, request: SeenRequest) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.ACCESS_TOKEN}"

    def search(self, request: SeenRequest) -> Reply:
        if not self.authorised(request):
            return json_reply({"error": {"message": "Error occurred at the OAuth process."}}, status=400)
        q = request.query
        offset = int(q.get("offset", "0"))
        posts = self.matching(q.get("word", ""))
        chunk = posts[offset:offset + self.PAGE]
        following = None
        if offset + self.PAGE < len(posts):
            following = "https://app-api.pixiv.net/v1/search/illust?" + urlencode(
                {"word": q.get("word", ""), "search_target": "exact_match_for_tags", "sort": "date_desc",
                 "filter": "for_ios", "offset": offset + self.PAGE})
        return json_reply({"illusts": [self.render(p) for p in chunk], "next_url": following,
                           "search_span_limit": 31536000})

    def complete(self, request: SeenRequest) -> Reply:
        if not self.authorised(request):
            return Reply(400, b"{}", headers={"Content-Type": "application/json"})
        word = request.query.get("word", "").replace(" ", "_")
        names = [n for n, _, _ in self.tag_rows() if n.startswith(word)]
        return json_reply({"tags": [{"name": n, "translated_name": None} for n in names]})

    def serve_image(self, request: SeenRequest) -> Reply:
        if request.headers.get("referer") != "https://app-api.pixiv.net/":
            return Reply(403, b"<html><title>403 Forbidden</title></html>", headers={"Content-Type": "text/html"})
        return self.serve_file(request)

    def render(self, post: FixturePost) -> dict[str, Any]:
        extra = self.pages_of.get(post.id, [])
        urls = {"square_medium": f"/files/sq_{post.id}.jpg", "medium": f"/files/m_{post.id}.jpg",
                "large": f"/files/l_{post.id}.jpg"}
        work = {
            "id": post.id, "title": "work", "type": "ugoira" if post.video else "illust", "image_urls": urls,
            "caption": "", "restrict": 0, "user": {"id": 7, "name": "artist", "account": "artist"},
            "tags": [{"name": t, "translated_name": None} for t in post.tags], "tools": [],
            "create_date": "2024-06-01T10:00:00+09:00", "page_count": 1 + len(extra), "width": post.width,
            "height": post.height, "sanity_level": 2, "x_restrict": 0 if post.rating in ("g", "s") else 1,
            "series": None, "meta_single_page": {}, "meta_pages": [], "total_view": 10, "total_bookmarks": 1,
            "is_bookmarked": False, "visible": not post.hidden, "is_muted": False, "illust_ai_type": 1,
        }
        if extra:
            work["meta_pages"] = [{"image_urls": {**urls, "original": self.file_url(page)}} for page in [post, *extra]]
        elif not post.hidden:
            work["meta_single_page"] = {"original_image_url": self.file_url(post)}
        return work


class FakeWallhaven(FakeSite):
    """Wallhaven: `/api/v1/search` with `meta.last_page`, `/api/v1/w/<id>` with tags."""

    listing_path = "/api/v1/search"
    PAGE = 24

    def routes(self) -> dict[str, Route]:
        return {"/api/v1/search": self.search, "/api/v1/w/": self.wallpaper, "/files/": self.serve_file}

    @staticmethod
    def short_id(post: FixturePost) -> str:
        return format(post.id, "x").rjust(6, "k")

    def search(self, request: SeenRequest) -> Reply:
        q = request.query
        page = int(q.get("page", "1"))
        posts = self.matching(q.get("q", ""))
        chunk = posts[(page - 1) * self.PAGE: page * self.PAGE]
        return json_reply({"data": [self.render(p) for p in chunk],
                           "meta": {"current_page": page, "last_page": max(1, -(-len(posts) // self.PAGE)),
                                    "per_page": self.PAGE, "total": len(posts), "query": q.get("q"), "seed": None}})

    def wallpaper(self, request: SeenRequest) -> Reply:
        post = next((p for p in self.posts if self.short_id(p) == request.path.rsplit("/", 1)[-1]), None)
        if post is None:
            return json_reply({"error": "Nothing here"}, status=404)
        categories = {post.character: "Characters", post.copyright: "Anime & Manga"}
        return json_reply({"data": {**self.render(post), "tags": [
            {"id": i, "name": t, "alias": "", "category_id": 1, "category": categories.get(t, "People"),
             "purity": "sfw", "created_at": "2020-01-01 00:00:00"} for i, t in enumerate(post.tags, 1)]}})

    def render(self, post: FixturePost) -> dict[str, Any]:
        return {
            "id": self.short_id(post), "url": f"https://wallhaven.cc/w/{self.short_id(post)}",
            "short_url": "", "views": 10, "favorites": 1, "source": "", "purity": "sfw", "category": "anime",
            "dimension_x": post.width, "dimension_y": post.height, "resolution": f"{post.width}x{post.height}",
            "ratio": "1", "file_size": len(post.data), "file_type": f"image/{post.ext}",
            "created_at": "2024-06-01 10:00:00", "colors": [], "path": None if post.hidden else self.file_url(post),
            "thumbs": {"large": "", "original": "", "small": ""},
        }


@dataclass(frozen=True)
class Family:
    """How the tests drive one site family: its fake, its client, and its paging cursor."""

    name: str
    fake: Callable[[list[FixturePost], str], FakeSite]
    client: Callable[[str, PoliteHttpClient, MediaPolicy], PagedSiteClient]  # (base_url, http, media)
    cursor_params: tuple[str, ...]  # query parameters that move to a later page
    categorised: bool  # whether listings say which tags are characters / copyrights
    post_id: Callable[[FixturePost], str] = lambda p: str(p.id)
    first_page_query: tuple[tuple[str, str], ...] = ()  # what asks for the first page, where it must be said


PAGE = 5  # posts per page in the family tests (sites with a fixed page size are faked at this size)


def _pixiv(posts: list[FixturePost], tag: str) -> FakePixiv:
    fake = FakePixiv(posts)
    fake.PAGE = PAGE
    return fake


def _wallhaven(posts: list[FixturePost], tag: str) -> FakeWallhaven:
    fake = FakeWallhaven(posts)
    fake.PAGE = PAGE
    return fake


FAMILIES = [
    Family("danbooru", lambda posts, tag: FakeDanbooruSite(posts),
           lambda base, http, media: DanbooruClient("danbooru", base, http, "alice", "d-key", media, PAGE),
           ("page",), True),
    Family("gelbooru", lambda posts, tag: FakeGelbooru(posts),
           lambda base, http, media: GelbooruClient("gelbooru", base, http, "7", "g-key", media, PAGE),
           ("id:<",), False),
    Family("gelbooru_v02", lambda posts, tag: FakeGelbooruV02(posts),
           lambda base, http, media: GelbooruV02Client("safebooru", base, http, media=media, page_limit=PAGE),
           ("id:<",), False),
    Family("moebooru", lambda posts, tag: FakeMoebooru(posts),
           lambda base, http, media: MoebooruClient("yandere", base, http, media, PAGE), ("page",), True),
    Family("e621", lambda posts, tag: FakeE621(posts),
           lambda base, http, media: E621Client("e621", base, http, "alice", "e-key", media, PAGE), ("page",), True),
    Family("zerochan", lambda posts, tag: FakeZerochan(posts, tag),
           lambda base, http, media: ZerochanClient("zerochan", base, http, media, PAGE), ("p",), False),
    Family("anime_pictures", lambda posts, tag: FakeAnimePictures(posts),
           lambda base, http, media: AnimePicturesClient("anime_pictures", base, http, FakeAnimePictures.TOKEN,
                                                         media, PAGE), ("page",), True,
           first_page_query=(("page", "0"),)),
    Family("sankaku", lambda posts, tag: FakeSankaku(posts),
           lambda base, http, media: SankakuClient("sankaku", base, http, "alice", "hunter2", media, PAGE),
           ("next",), True, FakeSankaku.letter_id),
    Family("pixiv", _pixiv,
           lambda base, http, media: PixivClient("pixiv", base, http, FakePixiv.REFRESH_TOKEN, media,
                                                 auth_url=base + "/auth/token"), ("offset",), False),
    Family("wallhaven", _wallhaven,
           lambda base, http, media: WallhavenClient("wallhaven", base, http, "w-key", media),
           ("page",), True, FakeWallhaven.short_id),
]


def first_page(request: SeenRequest, family: Family) -> SeenRequest:
    """`request` with its paging cursor removed: what a server that ignores paging sees."""
    query = {k: v for k, v in request.query.items() if k not in family.cursor_params}
    query.update(family.first_page_query)
    if "id:<" in family.cursor_params and "tags" in query:
        query["tags"] = _keyset(query["tags"])[0]
    return SeenRequest(request.at, request.path, query, request.headers, request.method, request.body)
