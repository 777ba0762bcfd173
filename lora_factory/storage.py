"""Where the factory keeps what it makes: one root folder, content-addressed blobs,
one Parquet table per asset and partition, and atomic writes everywhere.

A crash never leaves half a file (temp file + rename), and a re-run finds what an
earlier run stored (same bytes -> same sha256 -> same path).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

DEFAULT_HOME = ".lora_factory"


def factory_home() -> Path:
    """The factory's root: `LF_HOME`, or `./.lora_factory`."""
    return Path(os.environ.get("LF_HOME", DEFAULT_HOME)).resolve()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


class BlobStore:
    """Content-addressed byte store: `put` returns the sha256 that names the blob."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        target = self.path(sha)
        if not target.is_file():
            atomic_write_bytes(target, data)
        return sha

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def images(self, hashes: Iterable[str]) -> Iterator[Image.Image]:
        """Stored pictures (crops, by sha256) as RGB, read one at a time as they are used,
        so a long list of crops never sits in memory at once."""
        return (Image.open(io.BytesIO(self.get(sha))).convert("RGB") for sha in hashes)


def write_table(frame: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    """Write a DataFrame as Parquet atomically, checked against `schema` when given."""
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: materialize the upstream asset for this partition first"
        )
    return pq.read_table(path).to_pandas()


class FactoryStore:
    """The layout of the factory's root folder.

    - `blobs/`        every downloaded image and every crop, by sha256
    - `tables/<asset>/<partition>.parquet`   one table per asset per partition
    - `artefacts/<asset>/<partition>/`        files an asset makes (datasets, LoRAs, previews)
    - `models/`       models the factory builds or caches (tiny demo models)
    - `lancedb/`      identity embeddings of every crop, all characters in one table
    """

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root is not None else factory_home()
        self.blobs = BlobStore(self.root / "blobs")

    def table_path(self, asset: str, partition: str, name: str | None = None) -> Path:
        check_partition_key(partition)
        stem = partition if name is None else f"{partition}.{name}"
        return self.root / "tables" / asset / f"{stem}.parquet"

    def artefact_dir(self, asset: str, partition: str) -> Path:
        check_partition_key(partition)
        path = self.root / "artefacts" / asset / partition
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def lancedb_dir(self) -> Path:
        return self.root / "lancedb"


def check_partition_key(key: str) -> str:
    """Partition keys become folder names: refuse anything that could escape them."""
    if not key or "/" in key or "\\" in key or key in {".", ".."} or key.startswith("."):
        raise ValueError(f"invalid character key {key!r}: use a slug like 'surtr_arknights'")
    return key
