"""Where the factory keeps what it makes: one root folder, content-addressed blobs,
one Parquet table per asset and partition, and atomic writes everywhere.

A crash never leaves half a file (temp file + rename), a re-run finds what an earlier
run stored (same bytes -> same sha256 -> same path), and a blob whose bytes no longer
match its name is never used: it is moved aside and counts as missing, so the stage
that made it makes it again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
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


class StorageError(RuntimeError):
    """A stored file is missing, damaged or cannot be written; the message says which and what to do."""


class DiskFullError(StorageError):
    """The disk ran out of space while writing; nothing stored before was changed."""


class DamagedFileError(StorageError):
    """A stored file no longer matches the size and sha256 recorded when it was made."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def disk_full_error(path: Path, needed: int | None, error: OSError) -> DiskFullError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else path.anchor).free
    need = f"about {needed / 2**20:.1f} MiB needed, " if needed else ""
    return DiskFullError(
        f"no space left on the device writing {path} ({need}{free / 2**20:.1f} MiB free there): "
        "free some space (or move the factory's home), then re-run; nothing already stored was "
        f"changed ({error.strerror})"
    )


@contextmanager
def atomic_output(path: Path, size_hint: int | None = None) -> Iterator[Path]:
    """A temporary path in `path`'s folder that replaces `path` when the block succeeds.

    Readers see the old file or the whole new one. The new file gets the mode a plain
    `open` would give it (0644 under the usual umask; mkstemp's 0600 would hide releases
    from other users and web servers). A full disk raises `DiskFullError` naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(path, size_hint, error) from error
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(path, size_hint, error) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    with atomic_output(path, len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` to `target` atomically, streaming (LoRA files can be hundreds of MB)."""
    with atomic_output(target, Path(source).stat().st_size) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)


def read_json(path: Path) -> Any:
    """A JSON file the factory wrote; a damaged one names itself instead of a bare JSONDecodeError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{path} is damaged (not valid JSON: {error}); it will be rebuilt on the next run") from error


class BlobStore:
    """Content-addressed byte store: `put` returns the sha256 that names the blob.

    A blob whose bytes do not hash to its name (a flipped bit, a truncated copy) is moved
    to `damaged/` when it is found and treated as missing from then on.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        """The blob is present (cheap: its bytes are checked when it is read or verified)."""
        return self.path(sha256).is_file()

    def verify(self, sha256: str) -> bool:
        """True when the blob is present and its bytes hash to its name; a damaged one is set aside."""
        path = self.path(sha256)
        if not path.is_file():
            return False
        if sha256_file(path) == sha256:
            return True
        self._set_aside(path)
        return False

    def put(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        if not self.verify(sha):
            atomic_write_bytes(self.path(sha), data)
        return sha

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its name."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DamagedFileError(f"blob {path} is missing: re-run the asset that stored it") from None
        if sha256_bytes(data) != sha256:
            self._set_aside(path)
            raise DamagedFileError(
                f"blob {path} is damaged (its bytes no longer hash to its name); it was moved to "
                f"{self.root / 'damaged'}: re-run the asset that stored it"
            )
        return data

    def images(self, hashes: Iterable[str]) -> Iterator[Image.Image]:
        """Stored pictures (crops, by sha256) as RGB, read one at a time as they are used,
        so a long list of crops never sits in memory at once."""
        return (self.image(sha) for sha in hashes)

    def image(self, sha256: str) -> Image.Image:
        """One stored picture as RGB, checked against its sha256."""
        return Image.open(io.BytesIO(self.get(sha256))).convert("RGB")

    def image_sequence(self, hashes: Iterable[str]) -> StoredImages:
        """Stored pictures that are read only when indexed: a sampler that picks a few of
        many crops reads those few."""
        return StoredImages(self, list(hashes))

    def _set_aside(self, path: Path) -> None:
        damaged = self.root / "damaged"
        damaged.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, damaged / path.name)
        except FileNotFoundError:  # another process set it aside first
            pass


class StoredImages(Sequence[Image.Image]):
    """A list of stored pictures (by sha256), each read from the blob store when indexed."""

    def __init__(self, blobs: BlobStore, hashes: list[str]):
        self._blobs = blobs
        self._hashes = hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return StoredImages(self._blobs, self._hashes[index])
        return self._blobs.image(self._hashes[index])


def write_table(frame: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    """Write a DataFrame as Parquet atomically, checked against `schema` when given."""
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    with atomic_output(path, table.nbytes) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: materialize the upstream asset for this partition first"
        )
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise DamagedFileError(f"{path} is damaged ({error}); it will be rebuilt on the next run") from error


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


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed) for the block; other
    processes block until it is released, and the kernel releases it if the holder dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cached_sha256(path: Path, cache_file: Path) -> str:
    """sha256 of a big file that rarely changes (a base model), remembered in `cache_file`
    by path, size and modification time; a changed file is hashed again."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        cache = {}  # a damaged cache is only a cache: hash again
    if key not in cache:
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
        cache[key] = sha256_file(path)
        atomic_write_json(cache_file, cache)
    return cache[key]
