"""The character index refuses what would fail, or do harm, later in the pipeline."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from lora_factory.index import character_index
from lora_factory.index.character_index import (
    CharacterIndexError,
    load_index,
    parse_index,
)

SURTR = {"key": "surtr_arknights", "display_name": "Surtr", "franchise": "arknights"}


def index_text(*rows: dict) -> str:
    return yaml.safe_dump({"characters": list(rows)}, allow_unicode=True)


def refused(text: str, **options) -> str:
    with pytest.raises(CharacterIndexError) as error:
        parse_index(text, **options)
    return str(error.value)


def test_a_valid_row_keeps_its_values():
    row = parse_index(index_text(dict(
        SURTR, names=["スルト"], gender="female", trigger_word=" surtr_ak ",
        site_tags={"danbooru": "surtr_(arknights)"}, banned_tags=["surtr_(alter)_(arknights)"], enabled=False,
    )))[0]
    assert row.trigger_word == "surtr_ak" and row.trigger == "surtr_ak"
    assert row.names == ("スルト",) and row.site_tags == {"danbooru": "surtr_(arknights)"}
    assert row.enabled is False
    # Empty optional fields mean "none".
    empty = parse_index(index_text(dict(SURTR, names=None, trigger_word=None, site_tags=None)))[0]
    assert empty.names == () and empty.trigger == "surtr_arknights" and empty.site_tags == {}


def test_keys_are_bounded_so_that_file_names_stay_short():
    longest = "a" * character_index.MAX_KEY_LENGTH
    assert parse_index(index_text(SURTR, dict(SURTR, key=longest)))[1].key == longest
    message = refused(index_text(SURTR, dict(SURTR, key="a" * 230)))
    assert "row 2" in message and f"at most {character_index.MAX_KEY_LENGTH} characters" in message
    assert "230" in message


def test_a_key_with_a_trailing_newline_is_not_a_slug():
    message = refused(index_text(dict(SURTR, key="surtr_arknights\n")))
    assert "row 1: key 'surtr_arknights\\n' must be a lowercase slug" in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("trigger_word", [1, 2], "trigger_word must be a string, got a list"),
        ("trigger_word", 0, "trigger_word must be a string, got an int"),
        ("trigger_word", "surtr, arknights", "trigger_word must not contain a comma"),
        ("trigger_word", "surtr\narknights", "trigger_word must be one line without control characters"),
        ("trigger_word", "surtr\tak", "trigger_word must be one line without control characters"),
        ("display_name", 2077, "display_name must be a string, got an int (2077); quote it"),
        ("display_name", False, "display_name must be a string, got a bool (False); quote it"),
        ("display_name", "  ", "display_name must not be empty"),
        ("franchise", "arknights\n", "franchise must be one line without control characters"),
        ("names", "Surtr", "names must be a list of strings, got a str"),
        ("names", ["Surtr", ""], "names[2] must not be empty"),
        ("names", [1], "names[1] must be a string, got an int"),
        ("names", "", "names must be a list of strings, got a str"),
        ("banned_tags", [None], "banned_tags[1] must be a string, got None"),
        ("reference_images", [["a.png"]], "reference_images[1] must be a string, got a list"),
        ("site_tags", ["danbooru"], "site_tags must map site name -> tag, got a list"),
        ("site_tags", {"danbooru": 5}, "site_tags['danbooru'] must be a string, got an int"),
        ("site_tags", {"danbooru": ""}, "site_tags['danbooru'] must not be empty"),
        ("enabled", "yes", "enabled must be true or false, got 'yes'"),
        ("enabled", 1, "enabled must be true or false, got 1"),
        ("gender", "f", "gender must be one of ('female', 'male', 'other'), got 'f'"),
    ],
)
def test_every_field_is_typed(field, value, expected):
    message = refused(index_text(SURTR, dict(SURTR, key="yae_miko", **{field: value})))
    assert "row 2 (yae_miko)" in message
    assert expected in message


def test_missing_fields_and_wrong_rows_name_the_row():
    assert "row 1: key is required" in refused(index_text({"display_name": "Surtr", "franchise": "arknights"}))
    assert "row 1: key must be a string, got an int" in refused(index_text(dict(SURTR, key=12)))
    no_franchise = {"key": "surtr_arknights", "display_name": "Surtr"}
    assert "row 1 (surtr_arknights): franchise is required" in refused(index_text(no_franchise))
    assert "row 2: expected a mapping" in refused(index_text(SURTR, "surtr"))
    message = refused(index_text(SURTR, dict(SURTR, display_name="Surtr (alt)")))
    assert "rows 1 and 2 both have key 'surtr_arknights'" in message


def test_a_duplicated_characters_key_is_refused_not_merged():
    text = index_text(SURTR) + index_text(dict(SURTR, key="yae_miko"))
    message = refused(text, source="index.yaml")
    assert "index.yaml, line 5: duplicate key 'characters' (first at line 1)" in message


def test_a_duplicated_field_in_a_row_is_refused():
    text = (
        "characters:\n"
        "  - key: surtr_arknights\n    key: yae_miko\n    display_name: Surtr\n    franchise: arknights\n"
    )
    message = refused(text)
    assert "line 3: duplicate key 'key' (first at line 2)" in message


def test_merge_keys_may_still_be_overridden():
    text = (
        "defaults: &defaults {franchise: arknights, gender: female}\n"
        "characters:\n"
        "  - <<: *defaults\n    key: surtr_arknights\n    display_name: Surtr\n    gender: other\n"
    )
    assert parse_index(text)[0].gender == "other"


def test_the_fast_c_loader_is_used_when_available():
    if yaml.__with_libyaml__:
        assert issubclass(character_index._IndexLoader, yaml.CSafeLoader)
    else:
        assert issubclass(character_index._IndexLoader, yaml.SafeLoader)


def test_without_libyaml_the_python_loader_refuses_duplicates_too(monkeypatch):
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    # A separate copy of the module, so the one every other test uses stays as it is.
    spec = importlib.util.spec_from_file_location("character_index_without_libyaml", character_index.__file__)
    fallback = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fallback)
    spec.loader.exec_module(fallback)
    assert fallback._IndexLoader.__mro__[1] is yaml.SafeLoader
    with pytest.raises(fallback.CharacterIndexError, match="line 5: duplicate key 'characters'"):
        fallback.parse_index(index_text(SURTR) + index_text(dict(SURTR, key="yae_miko")))


@pytest.fixture()
def index_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "index"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "surtr.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("secret", encoding="utf-8")
    return folder


def write_index(folder: Path, *references: str) -> Path:
    path = folder / "characters.yaml"
    path.write_text(index_text(dict(SURTR, reference_images=list(references))), encoding="utf-8")
    return path


def test_reference_images_inside_the_index_folder_are_kept_as_given(index_folder):
    absolute = str(index_folder / "refs" / "surtr.png")
    path = write_index(index_folder, "refs/surtr.png", "refs/../refs/surtr.png", absolute)
    assert load_index(path)[0].reference_images == ("refs/surtr.png", "refs/../refs/surtr.png", absolute)


@pytest.mark.parametrize(
    "reference", ["/etc/passwd", "../secret.txt", "refs/../../secret.txt", "../../../../../etc/passwd"]
)
def test_reference_images_outside_the_index_folder_are_refused(index_folder, reference):
    with pytest.raises(CharacterIndexError) as error:
        load_index(write_index(index_folder, "refs/surtr.png", reference))
    message = str(error.value)
    assert "row 1 (surtr_arknights): reference_images[2]" in message and repr(reference) in message


def test_a_symlink_out_of_the_index_folder_is_refused(index_folder):
    (index_folder / "refs" / "escape.png").symlink_to(index_folder.parent / "secret.txt")
    with pytest.raises(CharacterIndexError, match=re.escape("'refs/escape.png' resolves to")):
        load_index(write_index(index_folder, "refs/escape.png"))


def test_absolute_reference_images_may_come_from_the_configured_root(index_folder, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    inside = str(library / "surtr.png")
    path = write_index(index_folder, inside, "refs/surtr.png")
    assert load_index(path, reference_root=library)[0].reference_images == (inside, "refs/surtr.png")
    with pytest.raises(CharacterIndexError, match="outside the reference root"):
        load_index(path)
    # The root widens absolute paths only: relative ones stay in the index folder.
    with pytest.raises(CharacterIndexError, match="outside the index's folder"):
        load_index(write_index(index_folder, "../library/surtr.png"), reference_root=library)


def test_parse_index_confines_reference_images_to_the_given_folder(index_folder):
    text = index_text(dict(SURTR, reference_images=["../secret.txt"]))
    assert "outside the index's folder" in refused(text, index_dir=index_folder)
    # Read from the folder above, the same file is inside.
    text = index_text(dict(SURTR, reference_images=["secret.txt"]))
    assert parse_index(text, index_dir=index_folder.parent)[0].reference_images == ("secret.txt",)
