"""The demo booru: a local image board that speaks the Danbooru JSON API.

`DemoBooru` builds a deterministic catalogue of posts of the demo characters, with the
faults that real boards have, spread across characters: exact duplicates, near
duplicates (JPEG re-encodes, resized copies), posts tagged with a character but showing
another one (about 5%), multi-person pictures, monochrome and tiny pictures, transparent
PNGs whose hidden pixels are black, one truncated file and one post hidden from
anonymous users (no md5 / URLs in its JSON, as Danbooru does for restricted posts).
`DemoBooru.truth` says what each post really shows, so tests can measure filters.

`DemoBooruServer` serves it on loopback:
- `GET /posts.json?tags=a b&page=<n | b<id> | a<id>>&limit=<n>`: newest first; tags are
  ANDed, `-tag` excludes, `rating:g,s` filters, `order:`/`status:` metatags are ignored.
- `GET /tags.json?search[name_matches]=ash*&search[category]=4&search[order]=count&limit=<n>`
- `GET /data/<md5>.<ext>` (the original) and `GET /data/preview/<md5>.jpg` (a thumbnail).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from lora_factory.demo.characters import DEMO_CHARACTERS, DemoCharacter
from lora_factory.demo.drawing import DrawnFigure, draw_ashtray, draw_post

# A character from a franchise the index does not hold, whose tag starts like "ash", so
# that a tag search for a name returns realistic wrong candidates.
ASHLEY = DemoCharacter(
    key="ashley_other_franchise",
    display_name="Ashley",
    franchise="other_franchise",
    booru_tag="ashley_(other_franchise)",
    gender="female",
    hair="pink_hair",
    eyes="red_eyes",
    features=(),
    outfits=(("blue_shirt", "purple_skirt"),),
    hair_length="long",
    posts=5,
)
UNRELATED_CHARACTERS: tuple[DemoCharacter, ...] = (ASHLEY,)
# A general tag whose name also starts like "ash"; its posts show no humans.
ASHTRAY_TAG = "ashtray"
ASHTRAY_POSTS = 3

# Danbooru tag categories.
GENERAL, ARTIST, COPYRIGHT, CHARACTER, META = 0, 1, 3, 4, 5

POSTS_DEFAULT_LIMIT, POSTS_MAX_LIMIT = 20, 200
TAGS_DEFAULT_LIMIT, TAGS_MAX_LIMIT = 20, 1000
MAX_NUMBERED_PAGE = 1000  # Danbooru refuses deeper numbered pages: use page=b<id>
FIRST_POST_ID = 1000
CATALOGUE_START = datetime(2021, 1, 1, tzinfo=timezone.utc)
CATALOGUE_SPAN = timedelta(days=3 * 365)
ARTISTS = ("hanabi_box", "mori_kumo", "pixel_pond", "suzume_ink", "tetra_lamp", "yuzu_fox")
RATING_WEIGHTS = {"g": 65, "s": 22, "q": 9, "e": 4}
RATING_NAMES = {"general": "g", "sensitive": "s", "safe": "s", "questionable": "q", "explicit": "e"}
IGNORED_METATAGS = ("order", "status")
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg"}
PREVIEW_SIZE = 180

# What a post really is. "normal" posts are solo pictures of the tagged character.
NORMAL = "normal"
WRONG_CHARACTER = "wrong_character"
MULTI_PERSON = "multi_person"
MONOCHROME = "monochrome"
SMALL = "small"
TRANSPARENT = "transparent"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE_JPEG = "near_duplicate_jpeg"
NEAR_DUPLICATE_RESIZED = "near_duplicate_resized"
CORRUPT = "corrupt"
HIDDEN = "hidden"
NO_HUMANS = "no_humans"
DERIVED_KINDS = (EXACT_DUPLICATE, NEAR_DUPLICATE_JPEG, NEAR_DUPLICATE_RESIZED)
SMALL_SIZES = ((96, 128), (128, 96), (120, 160))


def _fault_quotas(character_posts: int, position: int) -> dict[str, int]:
    """How many faulty posts of each kind the `position`-th character gets.

    Wrong-character posts are ~5% of the tag, as measured on real boards; the other
    counts are small and vary by position so that characters are not identical.
    """
    return {
        WRONG_CHARACTER: max(1, round(0.05 * character_posts)),
        MULTI_PERSON: 2,
        MONOCHROME: 1 + position % 2,
        SMALL: 1,
        TRANSPARENT: 1 - position % 2,
        EXACT_DUPLICATE: 1,
        NEAR_DUPLICATE_JPEG: 1,
        NEAR_DUPLICATE_RESIZED: 1,
    }


MIN_NORMAL_POSTS = 6  # normal posts left after faults: the sources of the duplicates


@dataclass(frozen=True)
class PostTruth:
    """What a post really shows; never served."""

    post_id: int
    tagged_character: str | None  # key of the character whose tag the post carries
    kind: str
    figures: tuple[DrawnFigure, ...]  # in the served picture's pixel coordinates
    duplicate_of: int | None = None  # the post a duplicate / near duplicate was made from

    @property
    def characters(self) -> tuple[str, ...]:
        """Keys of the characters drawn, left to right."""
        return tuple(figure.character_key for figure in self.figures)

    @property
    def shows_tagged_character(self) -> bool:
        return self.tagged_character in self.characters


class BooruRequestError(Exception):
    """A request the board refuses; `status` is the HTTP status Danbooru would answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _PostPlan:
    owner: DemoCharacter | None  # None: a picture without humans
    kind: str
    upload_time: float
    source: _PostPlan | None = None
    post_id: int = 0


@dataclass
class _Picture:
    """A drawn picture and what the post made of it says about it."""

    image: Image.Image
    figures: tuple[DrawnFigure, ...]
    general_tags: list[str]
    meta_tags: list[str] = field(default_factory=list)


def _encode(image: Image.Image, ext: str, jpeg_quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    if ext == "jpg":
        image.save(buffer, "JPEG", quality=jpeg_quality)
    else:
        # Low compression effort: the catalogue is encoded at start-up, and flat colours
        # compress well anyway.
        image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _garment_noun(garment: str) -> str:
    return garment.rsplit("_", 1)[-1]


def _figure_tags(character: DemoCharacter, outfit: tuple[str, ...], in_colour: bool) -> list[str]:
    """General tags that describe one drawn figure (colourless ones for greyscale)."""
    tags = [f"{character.hair_length}_hair", *character.features]
    tags += [_garment_noun(garment) for garment in outfit]
    if in_colour:
        tags += [character.hair, character.eyes, *outfit]
    return tags


def _people_tags(characters: Sequence[DemoCharacter]) -> list[str]:
    counts = Counter("girl" if c.gender == "female" else "boy" for c in characters)
    tags = ["solo"] if len(characters) == 1 else []
    for noun, count in counts.items():
        tags.append(f"{count}{noun}" if count == 1 else f"{count}{noun}s")
        if count > 1:
            tags.append(f"multiple_{noun}s")
    return tags


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Danbooru's name_matches: `*` is the only wildcard, matching is case-insensitive."""
    return re.compile(".*".join(re.escape(part) for part in pattern.lower().split("*")))


class DemoBooru:
    """The synthetic post catalogue, built deterministically from `seed` at init."""

    def __init__(
        self,
        seed: int = 0,
        characters: Sequence[DemoCharacter] = DEMO_CHARACTERS,
        unrelated_characters: Sequence[DemoCharacter] = UNRELATED_CHARACTERS,
    ) -> None:
        self.seed = seed
        self.characters = tuple(characters)
        self.unrelated_characters = tuple(unrelated_characters)
        self._check_characters()
        self._rng = random.Random(seed)
        self.posts: list[dict] = []  # ascending id; Danbooru JSON without the URL fields
        self.truth: dict[int, PostTruth] = {}
        self._files: dict[str, tuple[bytes, str]] = {}  # "<md5>.<ext>" -> (bytes, type)
        self._previews: dict[str, bytes] = {}
        self._build(self._plan())
        self._posts_by_id = {post["id"]: post for post in self.posts}
        self._post_ids_by_tag: dict[str, set[int]] = {}
        for post in self.posts:
            for tag in post["tag_string"].split():
                self._post_ids_by_tag.setdefault(tag, set()).add(post["id"])
        self.tags = self._tag_catalogue()

    # ----------------------------------------------------------------- building
    def _check_characters(self) -> None:
        everyone = self.characters + self.unrelated_characters
        for attribute in ("key", "booru_tag"):
            values = [getattr(c, attribute) for c in everyone]
            repeated = sorted(v for v, n in Counter(values).items() if n > 1)
            if repeated:
                raise ValueError(
                    f"demo characters must have distinct {attribute}s; repeated: {repeated}"
                )
        if len(self.characters) < 2:
            raise ValueError(
                "the demo booru needs at least two characters: wrong-character posts of one "
                "show another, and the corrupt and hidden posts go to two different ones"
            )

    def _plan(self) -> list[_PostPlan]:
        rng = self._rng
        plans: list[_PostPlan] = []
        # One corrupt file and one hidden post in the whole catalogue, on two characters.
        corrupt_owner, hidden_owner = rng.sample(range(len(self.characters)), 2)
        for position, character in enumerate(self.characters):
            quotas = _fault_quotas(character.posts, position)
            quotas[CORRUPT] = int(position == corrupt_owner)
            quotas[HIDDEN] = int(position == hidden_owner)
            normal_count = character.posts - sum(quotas.values())
            if normal_count < MIN_NORMAL_POSTS:
                raise ValueError(
                    f"{character.key} has posts={character.posts}: the demo booru needs at least "
                    f"{character.posts - normal_count + MIN_NORMAL_POSTS} to spread its faults"
                )
            normal = [_PostPlan(character, NORMAL, rng.random()) for _ in range(normal_count)]
            plans += normal
            sources = iter(rng.sample(normal, len(DERIVED_KINDS)))
            for kind, count in quotas.items():
                for _ in range(count):
                    if kind in DERIVED_KINDS:
                        source = next(sources)
                        # A copy is uploaded after the post it copies.
                        delay = (1 - source.upload_time) * rng.uniform(0.05, 1)
                        upload_time = source.upload_time + delay
                        plans.append(_PostPlan(character, kind, upload_time, source))
                    else:
                        plans.append(_PostPlan(character, kind, rng.random()))
        for character in self.unrelated_characters:
            plans += [_PostPlan(character, NORMAL, rng.random()) for _ in range(character.posts)]
        plans += [_PostPlan(None, NO_HUMANS, rng.random()) for _ in range(ASHTRAY_POSTS)]
        plans.sort(key=lambda plan: plan.upload_time)
        post_id = FIRST_POST_ID
        for plan in plans:
            post_id += rng.randint(1, 40)  # gaps: deleted posts and other uploads
            plan.post_id = post_id
        return plans

    def _others(self, character: DemoCharacter) -> list[DemoCharacter]:
        return [c for c in self.characters + self.unrelated_characters if c.key != character.key]

    def _solo_size(self) -> tuple[int, int]:
        return self._rng.randint(512, 768), self._rng.randint(512, 768)

    def _draw(
        self, figures: list[DemoCharacter], size: tuple[int, int], in_colour: bool = True
    ) -> _Picture:
        rng = self._rng
        background = rng.choices(["white_background", "blue_background"], weights=[4, 1])[0]
        outfits = [(c, rng.randrange(len(c.outfits))) for c in figures]
        drawn = draw_post(outfits, size, rng, background)
        general = _people_tags(figures) + ["standing", "full_body", "looking_at_viewer"]
        for character, figure in zip(figures, drawn.figures, strict=True):
            general += _figure_tags(character, figure.outfit, in_colour)
        if in_colour:
            general += [background, "simple_background"]
        return _Picture(drawn.image, drawn.figures, general)

    def _picture(self, plan: _PostPlan) -> _Picture:
        rng, owner = self._rng, plan.owner
        if plan.kind == NO_HUMANS:
            return _Picture(
                draw_ashtray(self._solo_size(), rng),
                (),
                [ASHTRAY_TAG, "no_humans", "still_life", "white_background", "simple_background"],
            )
        assert owner is not None
        if plan.kind == WRONG_CHARACTER:
            pool = [c for c in self.characters if c.key != owner.key] or self._others(owner)
            return self._draw([rng.choice(pool)], self._solo_size())
        if plan.kind == MULTI_PERSON:
            others = self._others(owner)
            figures = rng.sample(others, rng.randint(1, min(2, len(others))))
            figures.insert(rng.randint(0, len(figures)), owner)
            return self._draw(figures, (rng.randint(640, 768), rng.randint(512, 640)))
        if plan.kind == MONOCHROME:
            picture = self._draw([owner], self._solo_size(), in_colour=False)
            picture.image = picture.image.convert("L")
            picture.general_tags += ["monochrome", "greyscale"]
            return picture
        if plan.kind == SMALL:
            picture = self._draw([owner], rng.choice(SMALL_SIZES))
            picture.meta_tags.append("lowres")
            return picture
        if plan.kind == TRANSPARENT:
            picture = self._draw([owner], self._solo_size())
            picture.image = _with_transparent_background(picture.image)
            picture.general_tags = [
                t for t in picture.general_tags if not t.endswith("_background")
            ] + ["transparent_background"]
            return picture
        return self._draw([owner], self._solo_size())

    def _build(self, plans: list[_PostPlan]) -> None:
        # Pictures that a later duplicate copies, kept until the catalogue is built.
        pictures: dict[int, _Picture] = {}
        posts_by_plan: dict[int, dict] = {}
        copied = {id(plan.source) for plan in plans if plan.source is not None}
        for plan in plans:
            if plan.source is not None:
                source = id(plan.source)
                post, figures = self._derived_post(plan, posts_by_plan[source], pictures[source])
            else:
                picture = self._picture(plan)
                if id(plan) in copied:
                    pictures[id(plan)] = picture
                post, figures = self._original_post(plan, picture)
            posts_by_plan[id(plan)] = post
            self.posts.append(post)
            self.truth[plan.post_id] = PostTruth(
                post_id=plan.post_id,
                tagged_character=plan.owner.key if plan.owner else None,
                kind=plan.kind,
                figures=figures,
                duplicate_of=plan.source.post_id if plan.source else None,
            )

    def _original_post(
        self, plan: _PostPlan, picture: _Picture
    ) -> tuple[dict, tuple[DrawnFigure, ...]]:
        rng = self._rng
        ext = "png" if picture.image.mode == "RGBA" else rng.choice(["png", "jpg"])
        data = _encode(picture.image, ext, jpeg_quality=rng.randint(88, 95))
        artist = rng.choice(ARTISTS)
        meta = list(picture.meta_tags)
        if rng.random() < 0.2:
            meta.append("commentary_request")
        size = picture.image.size
        post = self._post_json(plan, data, ext, size, picture.general_tags, artist, meta)
        return post, picture.figures

    def _derived_post(
        self, plan: _PostPlan, source_post: dict, source_picture: _Picture
    ) -> tuple[dict, tuple[DrawnFigure, ...]]:
        rng = self._rng
        artist = source_post["tag_string_artist"]
        general = source_post["tag_string_general"].split()
        meta = source_post["tag_string_meta"].split()
        figures = source_picture.figures
        if plan.kind == EXACT_DUPLICATE:
            ext = source_post["file_ext"]
            data = self._files[f"{source_post['md5']}.{ext}"][0]
            size = source_picture.image.size
        elif plan.kind == NEAR_DUPLICATE_JPEG:
            ext, size = "jpg", source_picture.image.size
            data = _encode(source_picture.image, ext, jpeg_quality=rng.randint(65, 80))
        else:  # NEAR_DUPLICATE_RESIZED
            scale = rng.uniform(0.6, 0.85)
            width, height = source_picture.image.size
            size = (round(width * scale), round(height * scale))
            resized = source_picture.image.resize(size, Image.Resampling.LANCZOS)
            ext = source_post["file_ext"]
            data = _encode(resized, ext)
            figures = tuple(f.scaled(size[0] / width, size[1] / height) for f in figures)
        return self._post_json(plan, data, ext, size, general, artist, meta), figures

    def _post_json(
        self,
        plan: _PostPlan,
        data: bytes,
        ext: str,
        size: tuple[int, int],
        general_tags: list[str],
        artist: str,
        meta_tags: list[str],
    ) -> dict:
        rng = self._rng
        md5 = hashlib.md5(data).hexdigest()
        file_size = len(data)
        if plan.kind == CORRUPT:
            # A download cut short: the board's md5 and size are of the whole file.
            data = data[: len(data) * 11 // 20]
        owner = plan.owner
        character_tags = [owner.booru_tag] if owner else []
        copyright_tags = [owner.franchise] if owner else []
        general = sorted(set(general_tags))
        meta = sorted(set(meta_tags))
        created_at = CATALOGUE_START + CATALOGUE_SPAN * plan.upload_time
        score = rng.randint(0, 120)
        post = {
            "id": plan.post_id,
            "created_at": created_at.isoformat(timespec="milliseconds"),
            "score": score,
            "fav_count": score + rng.randint(0, 30),
            "md5": md5,
            "file_ext": ext,
            "file_size": file_size,
            "image_width": size[0],
            "image_height": size[1],
            "rating": rng.choices(list(RATING_WEIGHTS), weights=list(RATING_WEIGHTS.values()))[0],
            "tag_string": " ".join(
                sorted({*general, *character_tags, *copyright_tags, artist, *meta})
            ),
            "tag_string_general": " ".join(general),
            "tag_string_character": " ".join(character_tags),
            "tag_string_copyright": " ".join(copyright_tags),
            "tag_string_artist": artist,
            "tag_string_meta": " ".join(meta),
            "tag_count_general": len(general),
            "tag_count_character": len(character_tags),
            "tag_count_copyright": len(copyright_tags),
            "tag_count_artist": 1,
            "tag_count_meta": len(meta),
            "parent_id": None,
            "has_large": False,
            "is_banned": False,
            "is_deleted": False,
        }
        if plan.kind == HIDDEN:  # restricted: anonymous users see neither md5 nor file
            del post["md5"]
            post["is_banned"] = True
        else:
            self._files.setdefault(f"{md5}.{ext}", (data, CONTENT_TYPES[ext]))
        return post

    def _tag_catalogue(self) -> list[dict]:
        categories = {
            "tag_string_general": GENERAL,
            "tag_string_artist": ARTIST,
            "tag_string_copyright": COPYRIGHT,
            "tag_string_character": CHARACTER,
            "tag_string_meta": META,
        }
        category_of: dict[str, int] = {}
        for post in self.posts:
            for field_name, category in categories.items():
                for tag in post[field_name].split():
                    category_of[tag] = category
        created_at = CATALOGUE_START.isoformat(timespec="milliseconds")
        return [
            {
                "id": tag_id,
                "name": name,
                "post_count": len(self._post_ids_by_tag[name]),
                "category": category_of[name],
                "created_at": created_at,
                "updated_at": created_at,
                "is_deprecated": False,
            }
            for tag_id, name in enumerate(sorted(category_of), start=1)
        ]

    # ----------------------------------------------------------------- queries
    def posts_for_tag(self, tag: str) -> list[dict]:
        """Every post carrying `tag`, newest first."""
        ids = sorted(self._post_ids_by_tag.get(tag, ()), reverse=True)
        return [self._posts_by_id[i] for i in ids]

    def search_posts(
        self, tags: str = "", page: str | int = 1, limit: int | str = POSTS_DEFAULT_LIMIT
    ) -> list[dict]:
        """One page of the posts matching a Danbooru tag query, newest first."""
        limit = _parse_limit(limit, POSTS_MAX_LIMIT)
        matching = sorted(self._matching_post_ids(tags), reverse=True)
        page = str(page).strip()
        bad_page = BooruRequestError(422, f"page {page!r} must be a number, b<id> or a<id>")
        if page[:1] in ("a", "b"):
            try:
                bound = int(page[1:])
            except ValueError:
                raise bad_page from None
            if page[0] == "b":
                chosen = [i for i in matching if i < bound][:limit]
            else:
                chosen = [i for i in matching if i > bound][-limit:]
        else:
            try:
                number = int(page)
            except ValueError:
                raise bad_page from None
            if number < 1:
                raise BooruRequestError(422, f"page must be at least 1, got {number}")
            if number > MAX_NUMBERED_PAGE:
                raise BooruRequestError(
                    410,
                    f"You cannot go beyond page {MAX_NUMBERED_PAGE}. "
                    "Narrow your search or use page=b<id>.",
                )
            chosen = matching[(number - 1) * limit : number * limit]
        return [self._posts_by_id[i] for i in chosen]

    def _matching_post_ids(self, query: str) -> set[int]:
        selected = set(self._posts_by_id)
        for token in query.lower().split():
            prefix, _, value = token.partition(":")
            if value and prefix in IGNORED_METATAGS:
                continue
            if value and prefix in ("rating", "-rating"):
                ratings = {RATING_NAMES.get(v, v[:1]) for v in value.split(",")}
                keep = {i for i in selected if self._posts_by_id[i]["rating"] in ratings}
                selected = selected - keep if prefix.startswith("-") else keep
            elif token.startswith("-"):
                selected -= self._post_ids_by_tag.get(token[1:], set())
            else:
                selected &= self._post_ids_by_tag.get(token, set())
        return selected

    def search_tags(
        self,
        name_matches: str | None = None,
        category: str | int | None = None,
        order: str | None = None,
        limit: int | str = TAGS_DEFAULT_LIMIT,
        page: int | str = 1,
        name: str | None = None,
    ) -> list[dict]:
        """Tags filtered like Danbooru's `/tags.json` search parameters."""
        limit = _parse_limit(limit, TAGS_MAX_LIMIT)
        found = list(self.tags)
        if name_matches:
            pattern = _glob_regex(name_matches)
            found = [t for t in found if pattern.fullmatch(t["name"])]
        if name:
            names = {n.strip().lower() for n in name.split(",")}
            found = [t for t in found if t["name"] in names]
        if category not in (None, ""):
            try:
                categories = {int(c) for c in str(category).split(",")}
            except ValueError:
                raise BooruRequestError(
                    422, f"search[category] {category!r} must be numbers like 4 or 3,4"
                ) from None
            found = [t for t in found if t["category"] in categories]
        orders = {
            None: lambda t: -t["id"],
            "": lambda t: -t["id"],
            "date": lambda t: -t["id"],
            "count": lambda t: (-t["post_count"], -t["id"]),
            "name": lambda t: t["name"],
        }
        if order not in orders:
            raise BooruRequestError(
                422, f"search[order] {order!r} must be one of count, name, date"
            )
        found.sort(key=orders[order])
        try:
            number = int(page)
        except ValueError:
            raise BooruRequestError(422, f"page {page!r} must be a number") from None
        if number < 1:
            raise BooruRequestError(422, f"page must be at least 1, got {number}")
        return found[(number - 1) * limit : number * limit]

    # ----------------------------------------------------------------- files
    def file(self, name: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of `<md5>.<ext>`, or None when the board has no such file."""
        return self._files.get(name)

    def preview(self, md5: str) -> bytes | None:
        """A JPEG thumbnail of the post file with this md5, or None (unknown or undecodable)."""
        if md5 not in self._previews:
            original = next(
                (data for name, (data, _) in self._files.items() if name.startswith(f"{md5}.")), None
            )
            if original is None:
                return None
            try:
                image = Image.open(io.BytesIO(original))
                image.load()
            except (OSError, SyntaxError):
                return None
            image = _on_white(image)
            image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
            self._previews[md5] = _encode(image, "jpg", jpeg_quality=85)
        return self._previews[md5]

    def post_json(self, post: dict, base_url: str) -> dict:
        """The post as the API serves it: with absolute file URLs (absent for hidden posts)."""
        served = dict(post)
        if "md5" in post:
            file_url = f"{base_url}/data/{post['md5']}.{post['file_ext']}"
            served["file_url"] = file_url
            served["large_file_url"] = file_url
            served["preview_file_url"] = f"{base_url}/data/preview/{post['md5']}.jpg"
        return served


def _parse_limit(limit: int | str, maximum: int) -> int:
    try:
        value = int(limit)
    except (TypeError, ValueError):
        raise BooruRequestError(422, f"limit {limit!r} must be a whole number") from None
    return max(1, min(value, maximum))  # Danbooru clamps rather than refuses


def _with_transparent_background(image: Image.Image) -> Image.Image:
    """RGBA copy whose background is transparent black, as many real PNGs store it.

    Converting it to RGB without compositing on white gives a black background: the
    trap the cleaning step must avoid.
    """
    rgb = np.asarray(image.convert("RGB"))
    figure = (rgb != rgb[0, 0]).any(axis=-1)  # the corner is always background
    rgba = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)
    rgba[figure, :3] = rgb[figure]
    rgba[figure, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------- server
@dataclass
class _InjectedFault:
    path_prefix: str
    status: int
    remaining: int
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections close instead of holding a thread forever
    server: _DemoHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        self.server.demo._handle(self)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet: tests read `DemoBooruServer.requests` instead


class _DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    demo: DemoBooruServer

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is normal
            super().handle_error(request, client_address)


class DemoBooruServer:
    """Serves a `DemoBooru` over HTTP on loopback from a daemon thread.

    `requests` logs (monotonic time, path with query) of every request, so tests can
    check a client's politeness; `inject_fault` makes the next requests fail.
    """

    def __init__(self, booru: DemoBooru, host: str = "127.0.0.1", port: int = 0) -> None:
        self.booru = booru
        self.host = host
        self.port = port
        self.requests: list[tuple[float, str]] = []
        self._faults: list[_InjectedFault] = []
        self._lock = threading.Lock()
        self._http: _DemoHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the demo booru server is not running: call start() first")
        return f"http://{self.host}:{self._http.server_address[1]}"

    def start(self) -> str:
        if self._http is not None:
            raise RuntimeError(f"the demo booru server is already running at {self.url}")
        self._http = _DemoHTTPServer((self.host, self.port), _Handler)
        self._http.demo = self
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="demo-booru", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._http = self._thread = None

    def __enter__(self) -> DemoBooruServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def inject_fault(
        self, path_prefix: str, status: int, count: int = 1, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next `count` requests whose path starts with `path_prefix` with
        `status` (and `headers`, e.g. {"Retry-After": "1"}) instead of serving them."""
        with self._lock:
            self._faults.append(_InjectedFault(path_prefix, status, count, dict(headers or {})))

    def _take_fault(self, path: str) -> _InjectedFault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and path.startswith(fault.path_prefix):
                    fault.remaining -= 1
                    return fault
        return None

    def _handle(self, handler: _Handler) -> None:
        with self._lock:
            self.requests.append((time.monotonic(), handler.path))
        parts = urlsplit(handler.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        fault = self._take_fault(path)
        if fault is not None:
            body = {"success": False, "message": "injected fault"}
            self._send_json(handler, fault.status, body, fault.headers)
            return
        try:
            if path == "/posts.json":
                posts = self.booru.search_posts(
                    query.get("tags", ""),
                    query.get("page", "1"),
                    query.get("limit", POSTS_DEFAULT_LIMIT),
                )
                self._send_json(handler, 200, [self.booru.post_json(p, self.url) for p in posts])
            elif path == "/tags.json":
                tags = self.booru.search_tags(
                    name_matches=query.get("search[name_matches]"),
                    category=query.get("search[category]"),
                    order=query.get("search[order]"),
                    limit=query.get("limit", TAGS_DEFAULT_LIMIT),
                    page=query.get("page", "1"),
                    name=query.get("search[name]"),
                )
                self._send_json(handler, 200, tags)
            elif path.startswith("/data/preview/") and path.endswith(".jpg"):
                md5 = path.removeprefix("/data/preview/").removesuffix(".jpg")
                preview = self.booru.preview(md5)
                self._send_file(handler, preview, "image/jpeg")
            elif path.startswith("/data/"):
                found = self.booru.file(path.removeprefix("/data/"))
                self._send_file(handler, *(found or (None, "")))
            else:
                self._not_found(handler)
        except BooruRequestError as error:
            self._send_json(handler, error.status, {"success": False, "message": error.message})

    def _send_file(self, handler: _Handler, data: bytes | None, content_type: str) -> None:
        if data is None:
            self._not_found(handler)
            return
        self._send(handler, 200, data, content_type)

    def _not_found(self, handler: _Handler) -> None:
        body = {
            "success": False,
            "error": "ActiveRecord::RecordNotFound",
            "message": "That record was not found.",
        }
        self._send_json(handler, 404, body)

    def _send_json(
        self,
        handler: _Handler,
        status: int,
        value: object,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps(value).encode("utf-8")
        self._send(handler, status, body, "application/json; charset=utf-8", headers)

    @staticmethod
    def _send(
        handler: _Handler,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
