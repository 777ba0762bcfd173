"""A kohya-style training folder: `<root>/<repeats>_<name>/` with image + `.txt` pairs.

sd-scripts reads the repeat count from the folder name, and each image's caption from
the `.txt` file of the same stem. Files are written atomically and named by the image's
content, so writing the same rows twice changes nothing, and a re-run with different
rows leaves exactly the new set (stale pairs of this dataset's folders are removed).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lora_factory.storage import atomic_write_bytes, sha256_bytes

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
