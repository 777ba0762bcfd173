"""Identity vectors of every crop of every character, in one LanceDB table.

One table for the whole catalogue is what makes cross-character questions cheap: the
same fan art posted under two character tags, or a crop of character A that slipped
into character B's dataset, shows up as a near-identical vector filed under another
character. Queries are batched (one LanceDB call for many vectors): one-at-a-time
brute-force queries cost ~0.4 s each at 100k rows.

Several processes (one per character being cleaned) write the table at once: writers
take an advisory lock on a file in the store folder, and each character's rows are
replaced in one LanceDB commit, so readers never see them half replaced.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lancedb
import numpy as np
import pandas as pd
import pyarrow as pa

from lora_factory.provenance import frame_hash

TABLE_NAME = "crop_identity"
LOCK_NAME = "crop_identity.lock"
_DIGEST_COLUMNS = ["crop_sha256", "kind"]
DEFAULT_DIMENSION = 768
# Cosine distance between identity vectors of the same crop re-encoded is ~0; crops of
# the same drawing at other sizes stay well under 0.02.
DEFAULT_DUPLICATE_DISTANCE = 0.02
_QUERY_CHUNK = 256  # vectors per LanceDB call


@dataclass(frozen=True)
class Match:
    crop_sha256: str
    character: str
    kind: str
    distance: float  # cosine distance: 0 = same direction


def _schema(dimension: int) -> pa.Schema:
    return pa.schema(
        [
            ("crop_sha256", pa.string()),
            ("character", pa.string()),
            ("kind", pa.string()),
            ("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def _quoted(value: str) -> str:
    """A SQL string literal (LanceDB filters are SQL expressions)."""
    return "'" + value.replace("'", "''") + "'"


class EmbeddingStore:
    """The `crop_identity` table: crop_sha256, character, kind, vector (float32).

    `created` is True when opening found no table and made an empty one: a new folder,
    or one that was deleted, and then every vector stored there before is gone.
    """

    def __init__(self, path: Path, dimension: int = DEFAULT_DIMENSION):
        self.path = Path(path)
        self.dimension = dimension
        self.path.mkdir(parents=True, exist_ok=True)
        # Every read and merge starts from the latest commit of any process: a handle
        # opened at the start of a long run must see what other runs stored meanwhile,
        # and a merge planned on an older version re-inserts crops another run just added.
        self._db = lancedb.connect(self.path, read_consistency_interval=timedelta(0))
        with self._write_lock():  # or two processes opening a new folder both create it
            self.created = TABLE_NAME not in self._db.list_tables().tables
            if self.created:
                self._table = self._db.create_table(TABLE_NAME, schema=_schema(dimension))
            else:
                self._table = self._db.open_table(TABLE_NAME)
        stored = self._table.schema.field("vector").type.list_size
        if stored != dimension:
            raise ValueError(
                f"{self.path}/{TABLE_NAME} holds {stored}-d vectors, not {dimension}-d: "
                "use the identity model that filled it, or a new embeddings folder"
            )

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Serialise writers of this store folder, across processes and threads.

        LanceDB retries a commit that conflicts with another, but two merges that both
        insert the same new crops do not conflict: both commit and every row is doubled.
        flock belongs to the open file, so each call opens its own; closing releases it.
        """
        with open(self.path / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def count(self, character: str | None = None) -> int:
        if character is None:
            return self._table.count_rows()
        return self._table.count_rows(f"character = {_quoted(character)}")

    def replace_character(self, character: str, rows: pd.DataFrame) -> int:
        """Make `rows` (crop_sha256, kind, vector) the character's only rows; returns count.

        Re-running a character replaces what an earlier run stored, so the table never
        holds crops that a later cleaning dropped. The replacement is one commit: a
        reader sees the old rows or the new ones, and concurrent replacements of the same
        character leave the rows of one of them.
        """
        missing = {"crop_sha256", "kind", "vector"} - set(rows.columns)
        if missing:
            raise ValueError(f"rows need columns crop_sha256, kind, vector; missing {sorted(missing)}")
        crops = rows["crop_sha256"].astype(str)
        if crops.duplicated().any():
            raise ValueError(f"rows repeat crops: {sorted(set(crops[crops.duplicated()]))[:5]}")
        vectors = self._vectors(list(rows["vector"]))
        new = pa.table(
            {
                "crop_sha256": pa.array(crops.tolist(), pa.string()),
                "character": pa.array([character] * len(rows), pa.string()),
                "kind": pa.array(rows["kind"].astype(str).tolist(), pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), self.dimension),
            },
            schema=_schema(self.dimension),
        )
        own = f"character = {_quoted(character)}"
        with self._write_lock():
            if self._stored(character, ["crop_sha256"])["crop_sha256"].duplicated().any():
                # Copies left by writers that raced without this lock: a merge updates
                # every copy of a crop, so they go first (two commits, only this once).
                self._table.delete(own)
            (
                self._table.merge_insert(["character", "crop_sha256"])
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(own)
                .execute(new)
            )
        return len(rows)

    def character_digest(self, character: str) -> str:
        """Order-independent hash of the character's stored (crop_sha256, kind) rows.

        Equal to `provenance.frame_hash(crops, ["crop_sha256", "kind"])` of the crops
        whose vectors were stored, so a caller can check that the store still holds
        exactly those vectors, once each (a deleted folder or a lost write shows up).
        """
        return frame_hash(self._stored(character, _DIGEST_COLUMNS), _DIGEST_COLUMNS)

    def vectors_of(self, character: str) -> pd.DataFrame:
        """The character's rows: crop_sha256, kind, vector (np.ndarray per row)."""
        frame = self._stored(character, ["crop_sha256", "kind", "vector"])
        return frame.sort_values("crop_sha256", ignore_index=True)

    def _stored(self, character: str, columns: list[str]) -> pd.DataFrame:
        return (
            self._table.search()
            .where(f"character = {_quoted(character)}")
            .select(columns)
            .limit(None)
            .to_pandas()
        )

    def search(
        self, vectors: np.ndarray | Sequence[Sequence[float]], k: int = 5, where: str | None = None
    ) -> list[list[Match]]:
        """The `k` nearest stored crops (cosine distance) of each query vector, batched."""
        queries = self._vectors(vectors)
        results: list[list[Match]] = [[] for _ in range(len(queries))]
        if len(queries) == 0 or self.count() == 0:
            return results
        for start in range(0, len(queries), _QUERY_CHUNK):
            chunk = queries[start : start + _QUERY_CHUNK]
            query = self._table.search(chunk if len(chunk) > 1 else chunk[0]).distance_type("cosine")
            if where:
                query = query.where(where, prefilter=True)
            frame = query.limit(k).to_pandas().rename(columns={"_distance": "distance"})
            if "query_index" not in frame.columns:
                frame["query_index"] = 0
            for row in frame.sort_values(["query_index", "distance"]).itertuples():
                results[start + int(row.query_index)].append(
                    Match(row.crop_sha256, row.character, row.kind, float(row.distance))
                )
        return results

    def cross_character_duplicates(
        self, character: str, threshold: float = DEFAULT_DUPLICATE_DISTANCE, k: int = 3
    ) -> pd.DataFrame:
        """Crops of `character` that are near-identical (cosine distance <= threshold)
        to a crop filed under another character, one row per such pair."""
        own = self.vectors_of(character)
        matches = self.search(
            np.stack(own["vector"].tolist()) if len(own) else np.zeros((0, self.dimension)),
            k=k,
            where=f"character != {_quoted(character)}",
        )
        rows = [
            {
                "crop_sha256": crop,
                "kind": kind,
                "other_character": match.character,
                "other_crop_sha256": match.crop_sha256,
                "distance": match.distance,
            }
            for crop, kind, found in zip(own["crop_sha256"], own["kind"], matches, strict=True)
            for match in found
            if match.distance <= threshold
        ]
        return pd.DataFrame(
            rows,
            columns=["crop_sha256", "kind", "other_character", "other_crop_sha256", "distance"],
        )

    def _vectors(self, vectors: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        array = np.asarray(
            np.stack([np.asarray(v) for v in vectors]) if len(vectors) else np.zeros((0, self.dimension)),
            dtype=np.float32,
        )
        if array.ndim != 2 or array.shape[1] != self.dimension:
            raise ValueError(f"expected vectors of shape [N, {self.dimension}], got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("vectors contain NaN or infinity: check the identity model's output")
        return array
