"""A Parquet manifest written a page at a time, with memory flat in its length.

Each page of rows goes to its own part file next to the manifest (`<stem>.parts/`), written
atomically, so a killed run loses at most the page in flight. `compact` folds the parts into
the single manifest file that readers use, streaming one part (or one row group of the old
manifest) at a time; a key written again later replaces all earlier rows of that key. Folding
the same parts twice gives the same table, so a kill between writing the manifest and deleting
the parts is harmless: the next run folds them again.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lora_factory.storage import write_table

Key = tuple[str, ...]


def parts_dir(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.stem + ".parts")


class ManifestParts:
    """Appends pages of rows as parts of the manifest at `manifest_path` (rows keyed by `key_columns`)."""

    def __init__(self, manifest_path: Path, schema: pa.Schema, key_columns: list[str]):
        self.manifest_path = Path(manifest_path)
        self.schema = schema
        self.key_columns = key_columns
        self.folder = parts_dir(self.manifest_path)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.stem) for p in self.folder.glob("*.parquet") if p.stem.isdigit()]
        path = self.folder / f"{max(numbers, default=0) + 1:08d}.parquet"
        write_table(pa.Table.from_pylist(rows, schema=self.schema).to_pandas(), path, self.schema)

    def _parts(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("*.parquet") if p.stem.isdigit())

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
        parts = self._parts()
        if not parts:
            return
        sources = self._sources()
        latest: dict[Key, int] = {}  # which source last wrote each key
        for number, path in enumerate(sources):
            for table in self._batches(path, self.key_columns):
                for key in self._keys(table):
                    latest[key] = number
        fd, tmp = tempfile.mkstemp(dir=self.manifest_path.parent, prefix=f".{self.manifest_path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                for number, path in enumerate(sources):
                    for table in self._batches(path):
                        keep = [latest[key] == number for key in self._keys(table)]
                        writer.write_table(table.filter(pa.array(keep, pa.bool_())))
            os.replace(tmp, self.manifest_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for path in parts:
            path.unlink()
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
