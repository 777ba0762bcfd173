"""A Parquet manifest written a page at a time, with memory flat in its length.

Each page of rows goes to its own part file next to the manifest (`<stem>.parts/`), written
atomically, so a killed run loses at most the page in flight. `compact` folds the parts into
the single manifest file that readers use, streaming one part (or one row group of the old
manifest) at a time; a key written again later replaces all earlier rows of that key. Folding
the same parts twice gives the same table, so a kill between writing the manifest and deleting
the parts is harmless: the next run folds them again.

Two processes may scrape the same character at once. Part names never collide (a stamp that
orders them, then the pid and a random suffix), and an advisory lock on `<stem>.lock` makes
appending a part and folding the parts exclusive, so a fold sees every part written before it
and no part is deleted that it did not fold.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lora_factory.storage import atomic_output, write_table

Key = tuple[str, ...]

# "<stamp>-<pid>-<random>", or the plain number older versions used (they fold first).
PART_NAME = re.compile(r"(\d+)(-\d+-[0-9a-f]+)?")


def parts_dir(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.stem + ".parts")


def lock_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.stem + ".lock")


def _stamp(part: Path) -> int:
    return int(part.stem.split("-")[0])


class ManifestParts:
    """Appends pages of rows as parts of the manifest at `manifest_path` (rows keyed by `key_columns`)."""

    def __init__(self, manifest_path: Path, schema: pa.Schema, key_columns: list[str]):
        self.manifest_path = Path(manifest_path)
        self.schema = schema
        self.key_columns = key_columns
        self.folder = parts_dir(self.manifest_path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive against every other holder of this manifest's lock, in any process."""
        path = lock_path(self.manifest_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:  # closing the file releases the lock, even on a crash
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        frame = pa.Table.from_pylist(rows, schema=self.schema).to_pandas()
        with self.locked():
            # Later than every part present, even when the clock did not tick or went back.
            stamp = max(time.time_ns(), max(map(_stamp, self._parts()), default=0) + 1)
            path = self.folder / f"{stamp:020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
            write_table(frame, path, self.schema)

    def _parts(self) -> list[Path]:
        """The parts in the order they were written."""
        if not self.folder.is_dir():
            return []
        parts = [p for p in self.folder.glob("*.parquet") if PART_NAME.fullmatch(p.stem)]
        return sorted(parts, key=lambda p: (_stamp(p), p.name))

    def _sources(self) -> list[Path]:
        return ([self.manifest_path] if self.manifest_path.is_file() else []) + self._parts()

    def _batches(self, path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            yield conform(file.read_row_group(group), self.schema, path, columns)

    def _keys(self, table: pa.Table) -> list[Key]:
        return list(zip(*(table.column(name).to_pylist() for name in self.key_columns)))

    def compact(self) -> None:
        """Fold every part into the manifest file, then delete the parts."""
        with self.locked():
            self._compact()

    def _compact(self) -> None:
        parts = self._parts()
        if not parts:
            return
        sources = self._sources()
        latest: dict[Key, int] = {}  # which source last wrote each key
        for number, path in enumerate(sources):
            for table in self._batches(path, self.key_columns):
                for key in self._keys(table):
                    latest[key] = number
        with atomic_output(self.manifest_path) as tmp, pq.ParquetWriter(tmp, self.schema) as writer:
            for number, path in enumerate(sources):
                for table in self._batches(path):
                    keep = [latest[key] == number for key in self._keys(table)]
                    writer.write_table(table.filter(pa.array(keep, pa.bool_())))
        for path in parts:
            path.unlink()
        with suppress(OSError):  # not empty: a temp file a killed writer left behind
            self.folder.rmdir()

    def iter_batches(self, columns: list[str]) -> Iterator[pa.Table]:
        """The manifest's `columns`, one row group at a time (call `compact` first)."""
        if self.manifest_path.is_file():
            yield from self._batches(self.manifest_path, columns)


def conform(table: pa.Table, schema: pa.Schema, path: Path, columns: list[str] | None = None) -> pa.Table:
    """`table` in the current schema (older manifests had numeric post ids and no media column)."""
    if "post_id" in table.column_names and not pa.types.is_string(table.schema.field("post_id").type):
        table = table.set_column(table.column_names.index("post_id"), "post_id", pc.cast(table["post_id"], pa.string()))
    if "media" in schema.names and "media" not in table.column_names:
        table = table.append_column("media", pa.array(["image"] * len(table), pa.string()))
    wanted = columns or schema.names
    try:
        return table.select(wanted).cast(pa.schema([schema.field(name) for name in wanted]))
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a scrape manifest with the current schema ({exc}); move it away to rescrape") from exc
