"""Stamps: what each asset partition was built from, so a re-run can skip unchanged work.

An asset's *fingerprint* hashes its code version, its config and the output hashes of
the upstream partitions it read. When a stored stamp has the same fingerprint and its
outputs are still on disk, the work is skipped and the stored outputs are reused. The
output hash then becomes the asset's Dagster data version, which is what marks
downstream partitions stale in the UI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from lora_factory.storage import FactoryStore, atomic_write_json, check_partition_key


@dataclass(frozen=True)
class Stamp:
    fingerprint: str
    output_hash: str
    made_at: str
    summary: dict[str, Any]


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


class StampBook:
    def __init__(self, store: FactoryStore):
        self.root = store.root / "stamps"

    def _path(self, asset: str, partition: str) -> Path:
        check_partition_key(partition)
        return self.root / asset / f"{partition}.json"

    def read(self, asset: str, partition: str) -> Stamp | None:
        path = self._path(asset, partition)
        if not path.is_file():
            return None
        return Stamp(**json.loads(path.read_text(encoding="utf-8")))

    def require(self, asset: str, partition: str) -> Stamp:
        stamp = self.read(asset, partition)
        if stamp is None:
            raise FileNotFoundError(
                f"upstream asset {asset!r} has not been materialized for partition "
                f"{partition!r}: materialize it first (or the whole chain for this character)"
            )
        return stamp

    def write(
        self, asset: str, partition: str, fingerprint_: str, output_hash: str, summary: dict
    ) -> Stamp:
        stamp = Stamp(
            fingerprint=fingerprint_,
            output_hash=output_hash,
            made_at=datetime.now(UTC).isoformat(timespec="seconds"),
            summary=summary,
        )
        atomic_write_json(self._path(asset, partition), asdict(stamp))
        return stamp
