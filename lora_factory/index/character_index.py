"""The character index: which characters the factory makes LoRAs for.

One YAML file (a list of rows under `characters:`) is the source of truth. Each row
becomes one Dagster partition; its content hash goes into the run key, so an edited row
re-runs and an unchanged one does not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9_]*")
# Keys become partition keys, folder names and file names (`<key>-000024.safetensors`,
# `<key>_dataset.zip`): 64 characters leaves those names far below the 255-byte limit
# of common filesystems, with room for every suffix, and readable in the Dagster UI.
MAX_KEY_LENGTH = 64
GENDERS = ("female", "male", "other")
# Every field is a single line; C0/C1 controls and Unicode line breaks would split a
# caption, a log line or a file name.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class CharacterIndexError(ValueError):
    """The index file or one of its rows is invalid; the message says where and how to fix."""


@dataclass(frozen=True)
class CharacterRow:
    key: str
    display_name: str
    franchise: str
    names: tuple[str, ...] = ()
    gender: str = "female"
    trigger_word: str = ""
    site_tags: dict[str, str] = field(default_factory=dict)
    banned_tags: tuple[str, ...] = ()
    reference_images: tuple[str, ...] = ()
    # Anime series (names of the `anime_series` resource) the character appears in: the
    # identity cluster of their episodes that is this character adds its figures.
    anime_series: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def all_names(self) -> tuple[str, ...]:
        """Display name first, then every other name, without repeats."""
        return tuple(dict.fromkeys((self.display_name, *self.names)))

    @property
    def trigger(self) -> str:
        return self.trigger_word or self.key

    def content_hash(self) -> str:
        """Stable hash of everything that defines the row (not of its formatting)."""
        return self._content_hash

    @functools.cached_property
    def _content_hash(self) -> str:  # a sensor tick asks for every row's hash twice
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _IndexLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe loader (libyaml's parser when installed) that refuses duplicate mapping keys.

    PyYAML keeps the last of two equal keys: a second `characters:` would silently drop
    every row of the first, and the sensor would then delete their partitions. Mappings
    are constructed in Python even with the C parser, so this check runs with both.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_nodes: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue  # `<<: *defaults` keys may be overridden, as YAML intends
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = first_nodes.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if first is not key_node:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def _kind(value: object) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _text(value: object, name: str, where: str) -> str:
    """A non-empty, single-line string, stripped of surrounding spaces."""
    if not isinstance(value, str):
        hint = (
            "; quote it (YAML reads unquoted numbers and yes/no/on/off as numbers and booleans)"
            if isinstance(value, (int, float))
            else ""
        )
        raise CharacterIndexError(f"{where}: {name} must be a string, got {_kind(value)} ({value!r}){hint}")
    if CONTROL_CHARACTERS.search(value):
        raise CharacterIndexError(
            f"{where}: {name} must be one line without control characters, got {value!r}; "
            "remove the line breaks and tabs"
        )
    if not value.strip():
        raise CharacterIndexError(f"{where}: {name} must not be empty; remove it or give it a value")
    return value.strip()


def _text_list(raw: dict, name: str, where: str) -> tuple[str, ...]:
    """A list of non-empty strings, each kept as written; a missing or null field is ()."""
    value = raw.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        hint = f"; write {name}: [{value!r}] for a single one" if isinstance(value, str) and value else ""
        raise CharacterIndexError(
            f"{where}: {name} must be a list of strings, got {_kind(value)} ({value!r}){hint}"
        )
    for number, item in enumerate(value, start=1):
        _text(item, f"{name}[{number}]", where)
    return tuple(value)


def _site_tags(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CharacterIndexError(
            f"{where}: site_tags must map site name -> tag, got {_kind(value)} ({value!r}); "
            "e.g. site_tags: {danbooru: surtr_(arknights)}"
        )
    for site, tag in value.items():
        _text(site, "a site_tags site name", where)
        _text(tag, f"site_tags[{site!r}]", where)
    return dict(value)


def _trigger_word(value: object, where: str) -> str:
    """Empty means the key; otherwise the first tag of every caption, so one tag."""
    if value is None or value == "":
        return ""
    trigger = _text(value, "trigger_word", where)
    if "," in trigger:
        raise CharacterIndexError(
            f"{where}: trigger_word must not contain a comma, got {trigger!r}: captions are "
            "comma-separated tags and the trigger word must stay one tag"
        )
    return trigger


def _confined_reference(
    reference: str, name: str, where: str, index_dir: Path, reference_root: Path
) -> None:
    """Refuse a reference image outside the folders the index may read from.

    A relative path must stay inside the index's folder once `..` and symlinks are
    resolved; an absolute one must be inside the reference root.
    """
    path = Path(reference)
    if path.is_absolute():
        allowed, what = reference_root, "the reference root"
    else:
        allowed, what = index_dir, "the index's folder"
    try:
        resolved = (index_dir / path).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise CharacterIndexError(f"{where}: {name} {reference!r} cannot be resolved ({error})") from error
    if not resolved.is_relative_to(allowed):
        raise CharacterIndexError(
            f"{where}: {name} {reference!r} resolves to {resolved}, outside {what} {allowed}; "
            "keep reference images in the index's folder (paths relative to the index file) "
            "or, for absolute paths, under the configured reference_root"
        )


def _anime_series(raw: dict, where: str) -> tuple[str, ...]:
    series = _text_list(raw, "anime_series", where)
    for name in series:
        if not KEY_PATTERN.fullmatch(name) or len(name) > MAX_KEY_LENGTH:
            raise CharacterIndexError(
                f"{where}: anime_series {name!r} must be a lowercase slug (letters, digits, '_') of at "
                f"most {MAX_KEY_LENGTH} characters, as the series' name in the anime_series resource"
            )
    return tuple(dict.fromkeys(series))


def _row_from_mapping(
    raw: object, position: int, source: str, index_dir: Path, reference_root: Path
) -> CharacterRow:
    where = f"{source}, row {position}"
    if not isinstance(raw, dict):
        raise CharacterIndexError(
            f"{where}: expected a mapping with at least key, display_name, franchise, got {raw!r}"
        )
    if "key" not in raw:
        raise CharacterIndexError(f"{where}: key is required, e.g. key: surtr_arknights")
    key = raw["key"]
    if not isinstance(key, str):
        raise CharacterIndexError(f"{where}: key must be a string, got {_kind(key)} ({key!r})")
    if not KEY_PATTERN.fullmatch(key):
        raise CharacterIndexError(
            f"{where}: key {key!r} must be a lowercase slug (letters, digits, '_'), "
            "e.g. 'surtr_arknights'"
        )
    if len(key) > MAX_KEY_LENGTH:
        raise CharacterIndexError(
            f"{where}: key {key[:24]!r}... has {len(key)} characters, keys must have at most "
            f"{MAX_KEY_LENGTH} characters (they name folders and files); shorten it"
        )
    where = f"{where} ({key})"
    unknown = set(raw) - set(CharacterRow.__dataclass_fields__)
    if unknown:
        raise CharacterIndexError(
            f"{where}: unknown field(s) {sorted(map(str, unknown))}; "
            f"the fields are {list(CharacterRow.__dataclass_fields__)}"
        )
    for required in ("display_name", "franchise"):
        if required not in raw:
            raise CharacterIndexError(f"{where}: {required} is required")
    gender = raw.get("gender", "female")
    if gender not in GENDERS:
        raise CharacterIndexError(f"{where}: gender must be one of {GENDERS}, got {gender!r}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise CharacterIndexError(f"{where}: enabled must be true or false, got {enabled!r}")
    reference_images = _text_list(raw, "reference_images", where)
    for number, reference in enumerate(reference_images, start=1):
        _confined_reference(reference, f"reference_images[{number}]", where, index_dir, reference_root)
    return CharacterRow(
        key=key,
        display_name=_text(raw["display_name"], "display_name", where),
        franchise=_text(raw["franchise"], "franchise", where),
        names=_text_list(raw, "names", where),
        gender=gender,
        trigger_word=_trigger_word(raw.get("trigger_word"), where),
        site_tags=_site_tags(raw.get("site_tags"), where),
        banned_tags=_text_list(raw, "banned_tags", where),
        reference_images=reference_images,
        anime_series=_anime_series(raw, where),
        enabled=enabled,
    )


def parse_index(
    text: str,
    source: str = "<index>",
    index_dir: Path | str | None = None,
    reference_root: Path | str | None = None,
) -> list[CharacterRow]:
    """The rows of an index's YAML text, validated; reference_images are kept as written.

    index_dir is the folder relative reference_images are read from (the index file's
    folder; the current folder by default); reference_root is the folder absolute ones
    must be in (index_dir by default).
    """
    try:
        document = yaml.load(text, Loader=_IndexLoader)
    except _DuplicateKey as duplicate:
        raise CharacterIndexError(
            f"{source}, line {duplicate.line}: duplicate key {duplicate.key!r} (first at line "
            f"{duplicate.first_line}); YAML would keep only the last one and silently drop the "
            "other: merge the two or remove one"
        ) from duplicate
    except yaml.YAMLError as error:
        raise CharacterIndexError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("characters"), list):
        raise CharacterIndexError(f"{source}: expected a top-level 'characters:' list")
    index_dir = Path(index_dir or Path.cwd()).resolve()
    reference_root = Path(reference_root).resolve() if reference_root else index_dir
    rows = [
        _row_from_mapping(raw, i + 1, source, index_dir, reference_root)
        for i, raw in enumerate(document["characters"])
    ]
    first_position: dict[str, int] = {}
    for position, row in enumerate(rows, start=1):
        if row.key in first_position:
            raise CharacterIndexError(
                f"{source}: rows {first_position[row.key]} and {position} both have key "
                f"{row.key!r}; keys must be unique (the key names the partition): rename one"
            )
        first_position[row.key] = position
    return rows


def load_index(path: Path | str, reference_root: Path | str | None = None) -> list[CharacterRow]:
    """The index file's rows; see parse_index (relative reference_images are read from its folder)."""
    return list(read_index(path, reference_root).rows)


def file_signature(path: Path | str) -> tuple[int, int]:
    """(size, modification time in ns): what tells, without reading it, that a file changed."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class IndexSnapshot:
    """One version of the index file, parsed: its rows, looked up by key."""

    signature: tuple[int, int]
    sha256: str
    rows: tuple[CharacterRow, ...]
    by_key: dict[str, CharacterRow] = field(repr=False, compare=False)

    def row(self, key: str) -> CharacterRow:
        try:
            return self.by_key[key]
        except KeyError:
            raise CharacterIndexError(
                f"character {key!r} is not in the index (it has {len(self.rows)} rows); "
                "add it, or remove the partition"
            ) from None

    def enabled_rows(self) -> list[CharacterRow]:
        return [row for row in self.rows if row.enabled]


# One parsed snapshot per index file and reference root in this process: parsing 10,000
# rows costs about a second, and every asset of a run and every sensor tick needs rows.
_snapshots: dict[tuple[str, str], IndexSnapshot] = {}
_snapshots_lock = threading.Lock()


def read_index(path: Path | str, reference_root: Path | str | None = None) -> IndexSnapshot:
    """The index at `path`, parsed once per process for each version of the file: an
    unchanged size and modification time cost one stat; changed ones with the same bytes
    cost one read and one hash; only new bytes are parsed again."""
    path = Path(path)
    if not path.is_file():
        raise CharacterIndexError(
            f"character index {path} not found: set `index_path` in the CharacterIndex "
            "resource, or LF_INDEX_PATH, to your YAML file"
        )
    cache_key = (str(path.resolve()), str(reference_root))
    signature = file_signature(path)
    with _snapshots_lock:
        cached = _snapshots.get(cache_key)
        if cached is not None and cached.signature == signature:
            return cached
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        if cached is not None and cached.sha256 == sha256:
            snapshot = replace(cached, signature=signature)
        else:
            rows = tuple(
                parse_index(
                    data.decode("utf-8"), source=str(path), index_dir=path.parent, reference_root=reference_root
                )
            )
            snapshot = IndexSnapshot(signature, sha256, rows, {row.key: row for row in rows})
        _snapshots[cache_key] = snapshot
        return snapshot


def index_hash(rows: list[CharacterRow]) -> str:
    """Hash of the whole index (the sensor's cursor)."""
    joined = "\n".join(f"{row.key}:{row.content_hash()}" for row in rows)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]
