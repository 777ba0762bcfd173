"""Stamps: what each asset partition was built from and what it wrote, so a re-run can
skip unchanged work without trusting files just because they exist.

An asset's *fingerprint* hashes its code version, its config and the output hashes of
the upstream partitions it read. A stamp records the fingerprint, the output hash (the
asset's Dagster data version, which marks downstream partitions stale in the UI) and the
size and sha256 of every file the partition wrote, by path relative to the factory's
home, plus the blobs its tables point to. Work is skipped only when the fingerprint is
the same and every recorded file and blob still has its recorded bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from lora_factory.storage import (
    BlobStore,
    DamagedFileError,
    FactoryStore,
    atomic_write_json,
    check_partition_key,
    read_json,
    sha256_file,
)


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class Stamp:
    fingerprint: str
    output_hash: str
    made_at: str
    summary: dict[str, Any]
    files: dict[str, FileRecord] = field(default_factory=dict)  # home-relative path -> record
    blobs: tuple[str, ...] = ()  # sha256 of every blob the outputs point to
    run_id: str = ""  # the Dagster run that built it

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Stamp:
        return cls(
            fingerprint=value["fingerprint"],
            output_hash=value["output_hash"],
            made_at=value["made_at"],
            summary=value["summary"],
            files={path: FileRecord(**record) for path, record in value.get("files", {}).items()},
            blobs=tuple(value.get("blobs", ())),
            run_id=value.get("run_id", ""),
        )


def fingerprint(*parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def frame_hash(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    """Order-independent content hash of a table (only `columns`, when given)."""
    selected = frame if columns is None else frame[columns]
    if selected.empty:
        return fingerprint("empty", list(selected.columns))
    row_hashes = pd.util.hash_pandas_object(
        selected.astype(str), index=False
    ).sort_values()
    return hashlib.sha256(row_hashes.to_numpy().tobytes()).hexdigest()[:24]


def record_files(root: Path, paths: list[Path]) -> dict[str, FileRecord]:
    """Size and sha256 of each file, keyed by its path relative to `root` (the home)."""
    return {
        path.relative_to(root).as_posix(): FileRecord(path.stat().st_size, sha256_file(path))
        for path in sorted(paths)
    }


def check_file(root: Path, relative: str, record: FileRecord) -> str | None:
    """None when the file has its recorded bytes; otherwise what is wrong with it."""
    path = root / relative
    if not path.is_file():
        return f"{relative}: missing"
    size = path.stat().st_size
    if size != record.size:
        return f"{relative}: {size} bytes, {record.size} were written"
    if sha256_file(path) != record.sha256:
        return f"{relative}: bytes changed since it was written (sha256 differs)"
    return None


def damaged_outputs(root: Path, blobs: BlobStore, stamp: Stamp) -> list[str]:
    """What no longer matches the stamp: missing or changed files, missing or damaged blobs."""
    problems = [p for rel, rec in stamp.files.items() if (p := check_file(root, rel, rec))]
    bad_blobs = [sha for sha in stamp.blobs if not blobs.verify(sha)]
    if bad_blobs:
        problems.append(f"{len(bad_blobs)} stored images missing or damaged (e.g. blobs/{bad_blobs[0][:2]}/{bad_blobs[0]})")
    return problems


class StampBook:
    def __init__(self, store: FactoryStore):
        self.root = store.root / "stamps"

    def path(self, asset: str, partition: str) -> Path:
        check_partition_key(partition)
        return self.root / asset / f"{partition}.json"

    def read(self, asset: str, partition: str) -> Stamp | None:
        """The stamp, None when there is none; a damaged stamp raises `DamagedFileError` naming it."""
        path = self.path(asset, partition)
        if not path.is_file():
            return None
        value = read_json(path)
        try:
            return Stamp.from_json(value)
        except (KeyError, TypeError) as error:
            raise DamagedFileError(f"{path} is damaged (not a stamp: {error!r})") from error

    def write(
        self,
        asset: str,
        partition: str,
        fingerprint_: str,
        output_hash: str,
        summary: dict,
        files: dict[str, FileRecord],
        blobs: tuple[str, ...] = (),
        run_id: str = "",
    ) -> Stamp:
        stamp = Stamp(
            fingerprint=fingerprint_,
            output_hash=output_hash,
            made_at=datetime.now(UTC).isoformat(timespec="seconds"),
            summary=summary,
            files=files,
            blobs=tuple(sorted(set(blobs))),
            run_id=run_id,
        )
        atomic_write_json(self.path(asset, partition), asdict(stamp))
        return stamp
