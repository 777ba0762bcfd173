"""What the dataset is handed over as.

- A kohya training folder: `<root>/<repeats>_<name>/` with image + `.txt` pairs.
  sd-scripts reads the repeat count from the folder name and each image's caption from
  the file of the same stem. Files are written atomically and named by the image's
  content, so writing the same rows twice changes nothing, and a re-run with different
  rows leaves exactly the new set (stale pairs of this dataset's folders are removed).
  `kohya_dataset_config` writes the matching `--dataset_config` TOML (caption extension,
  bucket settings, keep_tokens), since sd-scripts' own default caption extension is
  `.caption`.
- The tag frequencies per folder, as sd-scripts records them in `ss_tag_frequency`.
- A dataset package like CyberHarem's: one zip of image + caption pairs and `meta.json`,
  byte-identical for identical input (fixed order and timestamps).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lora_factory.captioning.captions import tag_frequency
from lora_factory.storage import atomic_output, atomic_write_bytes, atomic_write_text, sha256_bytes

_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ExportRow:
    image: bytes | Path  # encoded image bytes, or a file to copy
    caption: str
    repeats: int
    stem: str | None = None  # file name without extension; default: image sha256 (16 hex)


def _image_bytes_and_extension(image: bytes | Path) -> tuple[bytes, str]:
    data = Path(image).read_bytes() if isinstance(image, Path) else bytes(image)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image_format = opened.format
    except UnidentifiedImageError as error:
        raise ValueError(f"export row image is not a readable image ({len(data)} bytes)") from error
    if image_format not in _EXTENSIONS:
        raise ValueError(f"image format {image_format} is not one kohya reads; convert it to PNG")
    return data, _EXTENSIONS[image_format]


def write_kohya_folder(root: Path, name: str, rows: Iterable[ExportRow]) -> Path:
    """Write `rows` under `root/<repeats>_<name>/`; returns `root` (kohya's train_data_dir)."""
    if not _NAME.match(name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '_', '-', '.'")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted: dict[Path, bytes] = {}
    for row in rows:
        if row.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {row.repeats}")
        if "\n" in row.caption.strip():
            raise ValueError("a caption must be one line: kohya reads only the first line")
        data, extension = _image_bytes_and_extension(row.image)
        stem = row.stem or sha256_bytes(data)[:16]
        if not _NAME.match(stem):
            raise ValueError(f"file stem {stem!r} must be letters, digits, '_', '-', '.'")
        folder = root / f"{row.repeats}_{name}"
        image_path = folder / f"{stem}{extension}"
        if image_path in wanted:
            raise ValueError(
                f"{image_path.name} appears twice in {folder.name}: the same image, or two "
                "images given the same stem"
            )
        wanted[image_path] = data
        wanted[folder / f"{stem}.txt"] = (row.caption.strip() + "\n").encode("utf-8")

    for path, data in wanted.items():
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
    _remove_stale(root, name, set(wanted))
    return root


def _remove_stale(root: Path, name: str, wanted: set[Path]) -> None:
    """Delete files (and emptied folders) of this dataset that the new rows do not hold."""
    if not root.is_dir():
        return
    pattern = re.compile(rf"^\d+_{re.escape(name)}$")
    for folder in root.iterdir():
        if folder.is_dir() and pattern.match(folder.name):
            for path in folder.iterdir():
                if path.is_file() and path not in wanted:
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def folder_tag_frequency(rows: Iterable[ExportRow], name: str) -> dict[str, dict[str, int]]:
    """`{"<repeats>_<name>": {tag: count}}`: the LoRA's `ss_tag_frequency` value."""
    by_folder: dict[str, list[str]] = {}
    for row in rows:
        by_folder.setdefault(f"{row.repeats}_{name}", []).append(row.caption.strip())
    return {folder: tag_frequency(captions) for folder, captions in sorted(by_folder.items())}


def kohya_dataset_config(
    path: Path,
    train_dir: Path,
    name: str,
    repeats: Iterable[int],
    bucket_settings: Mapping[str, Any],
    batch_size: int,
    keep_tokens: int = 1,
    shuffle_caption: bool = True,
) -> Path:
    """Write sd-scripts' `--dataset_config` TOML for the folders of `write_kohya_folder`.

    `bucket_settings` is `KohyaBuckets.settings()`: with the same settings sd-scripts
    puts every exported image (already at its bucket size) into that very bucket. A
    relative `train_dir` (relative to the config's folder) keeps the folder movable.
    """
    general = {
        "caption_extension": ".txt",
        "shuffle_caption": shuffle_caption,
        "keep_tokens": keep_tokens,
    }
    lines = ["[general]", *_toml_pairs(general), "", "[[datasets]]"]
    if not Path(train_dir).is_absolute():
        lines.insert(0, "# image_dir is relative to this file's folder: run sd-scripts from there\n")
    lines += _toml_pairs({**bucket_settings, "batch_size": batch_size})
    for count in sorted(set(repeats)):
        folder = Path(train_dir) / f"{count}_{name}"
        lines += ["", "  [[datasets.subsets]]"]
        lines += ["  " + pair for pair in _toml_pairs({"image_dir": str(folder), "num_repeats": count})]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _toml_pairs(values: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in values.items()]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


# Zip entries carry this timestamp, so the same files always make the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_dataset_package(path: Path, rows: Iterable[ExportRow], meta: Mapping[str, Any]) -> Path:
    """Write a zip of `<stem>.<ext>` + `<stem>.txt` pairs (sorted by stem) and
    `meta.json` to `path`, atomically; images are read one at a time.

    Every row needs a stem. Repeats are not part of a package (they are the trainer's
    choice); `meta` may record them.
    """
    path = Path(path)
    ordered = sorted(rows, key=lambda row: row.stem or "")
    for row in ordered:
        if not row.stem or not _NAME.match(row.stem):
            raise ValueError(f"package rows need a file stem of letters, digits, '_', '-', '.'; got {row.stem!r}")
        if "\n" in row.caption.strip():
            raise ValueError("a caption must be one line")
    stems = [row.stem for row in ordered]
    if len(set(stems)) != len(stems):
        raise ValueError("two package rows have the same stem")
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for row in ordered:
            data, extension = _image_bytes_and_extension(row.image)
            _add_entry(archive, f"{row.stem}{extension}", data)
            _add_entry(archive, f"{row.stem}.txt", (row.caption.strip() + "\n").encode("utf-8"))
        meta_text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        _add_entry(archive, "meta.json", meta_text.encode("utf-8"))
    return path


def _add_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    # Images are compressed already; text compresses well.
    info.compress_type = zipfile.ZIP_DEFLATED if name.endswith((".txt", ".json")) else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)
