"""The character index: which characters the factory makes LoRAs for.

One YAML file (a list of rows under `characters:`) is the source of truth. Each row
becomes one Dagster partition; its content hash goes into the run key, so an edited row
re-runs and an unchanged one does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")
GENDERS = ("female", "male", "other")

DEMO_INDEX_PATH = Path(__file__).with_name("demo_characters.yaml")


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
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _row_from_mapping(raw: object, position: int, source: str) -> CharacterRow:
    where = f"{source}, row {position}"
    if not isinstance(raw, dict):
        raise CharacterIndexError(f"{where}: expected a mapping with at least key, display_name, franchise")
    unknown = set(raw) - set(CharacterRow.__dataclass_fields__)
    if unknown:
        raise CharacterIndexError(f"{where}: unknown field(s) {sorted(unknown)}")
    for required in ("key", "display_name", "franchise"):
        if not isinstance(raw.get(required), str) or not raw[required].strip():
            raise CharacterIndexError(f"{where}: '{required}' is required and must be a non-empty string")
    key = raw["key"]
    if not KEY_PATTERN.match(key):
        raise CharacterIndexError(
            f"{where}: key {key!r} must be a lowercase slug (letters, digits, '_'), "
            "e.g. 'surtr_arknights'"
        )
    gender = raw.get("gender", "female")
    if gender not in GENDERS:
        raise CharacterIndexError(f"{where} ({key}): gender must be one of {GENDERS}, got {gender!r}")
    site_tags = raw.get("site_tags") or {}
    if not isinstance(site_tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in site_tags.items()
    ):
        raise CharacterIndexError(f"{where} ({key}): site_tags must map site name -> tag")

    def string_list(name: str) -> tuple[str, ...]:
        value = raw.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CharacterIndexError(f"{where} ({key}): {name} must be a list of strings")
        return tuple(value)

    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise CharacterIndexError(f"{where} ({key}): enabled must be true or false")
    return CharacterRow(
        key=key,
        display_name=raw["display_name"].strip(),
        franchise=raw["franchise"].strip(),
        names=string_list("names"),
        gender=gender,
        trigger_word=str(raw.get("trigger_word") or ""),
        site_tags=dict(site_tags),
        banned_tags=string_list("banned_tags"),
        reference_images=string_list("reference_images"),
        enabled=enabled,
    )


def parse_index(text: str, source: str = "<index>") -> list[CharacterRow]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CharacterIndexError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("characters"), list):
        raise CharacterIndexError(f"{source}: expected a top-level 'characters:' list")
    rows = [_row_from_mapping(raw, i + 1, source) for i, raw in enumerate(document["characters"])]
    seen: set[str] = set()
    for row in rows:
        if row.key in seen:
            raise CharacterIndexError(f"{source}: key {row.key!r} appears twice; keys must be unique")
        seen.add(row.key)
    return rows


def load_index(path: Path | str) -> list[CharacterRow]:
    path = Path(path)
    if not path.is_file():
        raise CharacterIndexError(
            f"character index {path} not found: set `index_path` in the CharacterIndex "
            "resource, or LF_INDEX_PATH, to your YAML file"
        )
    return parse_index(path.read_text(encoding="utf-8"), source=str(path))


def index_hash(rows: list[CharacterRow]) -> str:
    """Hash of the whole index (the sensor's cursor)."""
    joined = "\n".join(f"{row.key}:{row.content_hash()}" for row in rows)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def find_row(rows: list[CharacterRow], key: str) -> CharacterRow:
    for row in rows:
        if row.key == key:
            return row
    raise CharacterIndexError(
        f"character {key!r} is not in the index (it has {len(rows)} rows); "
        "add it, or remove the partition"
    )
