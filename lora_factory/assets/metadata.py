"""Helpers that turn core results into Dagster metadata the UI can show.

Dagster's metadata panel squeezes a wide table into its column instead of scrolling it,
and cuts off whatever does not fit. So a table shown there is made narrow and short:

- the columns a reader looks for first (`first`), then the others, with hashes and paths
  last;
- hashes (sha256, md5, fingerprints, and 32-64 digit hex strings inside text) cut to
  `SHORT_HASH` characters: enough to recognise one, and to find it in the full table;
- paths reduced to their file names; tag lists joined with commas; floats to 4
  significant digits;
- text longer than `MAX_CELL_CHARS` cut with an ellipsis (long text such as tag-matching
  evidence belongs in an entry of its own: see `text_entry`);
- at most `max_rows` rows; `table_entries` adds `<name>_table_path`, the home-relative
  path of the full Parquet table, when the table is longer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath

import dagster as dg
import numpy as np
import pandas as pd

SHORT_HASH = 10
MAX_CELL_CHARS = 120
DEFAULT_MAX_ROWS = 20
_COLUMN_TYPES = {"i": "int", "u": "int", "f": "float", "b": "bool"}
_HEX_RUN = re.compile(r"\b[0-9a-f]{32,64}\b")


def is_hash_column(name: str) -> bool:
    name = name.lower()
    return name in {"sha256", "md5", "hash", "fingerprint"} or name.endswith(
        ("_sha256", "_md5", "_hash", "_fingerprint")
    )


def is_path_column(name: str) -> bool:
    name = name.lower()
    return name in {"path", "file"} or name.endswith(("_path", "_file"))


def short_hash(value: str) -> str:
    """`value` cut to SHORT_HASH characters (a prefix, so it still finds the row)."""
    return value[:SHORT_HASH]


def display_frame(frame: pd.DataFrame, first: Sequence[str] = ()) -> pd.DataFrame:
    """`frame` as the metadata panel shows it: useful columns first, hashes short, paths
    as file names, hashes and paths last."""
    missing = [name for name in first if name not in frame.columns]
    if missing:
        raise ValueError(f"display_frame: no column(s) {missing}; the table has {list(frame.columns)}")
    rest = [str(c) for c in frame.columns if c not in first]
    trailing = [c for c in rest if is_hash_column(c) or is_path_column(c)]
    order = [*first, *(c for c in rest if c not in trailing), *trailing]
    shown = frame[order].copy()
    for column in shown.columns:
        values = shown[column]
        if is_hash_column(column):
            shown[column] = values.map(lambda v: short_hash(v) if isinstance(v, str) else v)
        elif is_path_column(column):
            shown[column] = values.map(lambda v: PurePosixPath(v).name if isinstance(v, str) and v else v)
    return shown


def table_metadata(
    frame: pd.DataFrame,
    max_rows: int = DEFAULT_MAX_ROWS,
    first: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
) -> dg.TableMetadataValue:
    """A browsable table (the first `max_rows` rows, made narrow: see the module) with a
    schema; `rename` gives columns shorter headers (after hashes and paths are found by
    their names)."""
    shown = display_frame(frame.head(max_rows), first).rename(columns=dict(rename or {}))
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(name=str(name), type=_COLUMN_TYPES.get(dtype.kind, "string"))
            for name, dtype in shown.dtypes.items()
        ]
    )
    records = [
        dg.TableRecord({str(k): _plain(v) for k, v in row.items()})
        for row in shown.to_dict(orient="records")
    ]
    return dg.MetadataValue.table(records=records, schema=schema)


def table_entries(
    name: str,
    frame: pd.DataFrame,
    full_table: str | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    first: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
) -> dict[str, dg.MetadataValue]:
    """`name`: a sample of `frame` as a table; `<name>_table_path`: `full_table` (the
    home-relative path of the whole Parquet table) when the sample leaves rows out."""
    entries: dict[str, dg.MetadataValue] = {
        name: table_metadata(frame, max_rows=max_rows, first=first, rename=rename)
    }
    if full_table is not None and len(frame) > max_rows:
        entries[f"{name}_table_path"] = dg.MetadataValue.path(full_table)
    return entries


def text_entry(lines: Iterable[str], empty: str = "none") -> dg.MarkdownMetadataValue:
    """Long text (one bullet per line): its own entry, which the panel wraps in full."""
    items = [f"- {' '.join(str(line).split())}" for line in lines]
    return dg.MetadataValue.md("\n".join(items) or empty)


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        value = ", ".join(f"{k}: {v}" for k, v in value.items())
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return _rounded(value)
    text = _HEX_RUN.sub(lambda match: short_hash(match.group(0)), str(value))
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def rounded(value: float) -> float:
    """A metric for the UI: 4 significant digits."""
    return _rounded(float(value))


def _rounded(value: float) -> float:
    """4 significant digits (0.49806117 -> 0.4981), whole numbers left whole."""
    if math.isinf(value) or value == 0 or abs(value) >= 1_000:
        return round(value, 1) if not math.isinf(value) else value
    return float(f"{value:.4g}")


def counts_metadata(counts: dict[str, int]) -> dg.TableMetadataValue:
    frame = pd.DataFrame(
        sorted(counts.items(), key=lambda item: -item[1]), columns=["reason", "count"]
    )
    return table_metadata(frame, max_rows=100)
