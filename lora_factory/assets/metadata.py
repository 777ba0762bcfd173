"""Helpers that turn core results into Dagster metadata the UI can show."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

_COLUMN_TYPES = {"i": "int", "u": "int", "f": "float", "b": "bool"}


def table_metadata(frame: pd.DataFrame, max_rows: int = 50) -> dg.TableMetadataValue:
    """A browsable table (first `max_rows` rows) with a schema."""
    shown = frame.head(max_rows)
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


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def counts_metadata(counts: dict[str, int]) -> dg.TableMetadataValue:
    frame = pd.DataFrame(
        sorted(counts.items(), key=lambda item: -item[1]), columns=["reason", "count"]
    )
    return table_metadata(frame, max_rows=100)
