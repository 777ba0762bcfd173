import os
import shutil
from pathlib import Path

import dagster as dg

from lora_factory.storage import DEFAULT_HOME, DiskFullError, FactoryStore


class FactoryStorage(dg.ConfigurableResource):
    """The factory's root folder (blobs, tables, artefacts, models, embeddings)."""

    home: str = DEFAULT_HOME
    # A stage refuses to start with less free space than this on the home's disk or on
    # DAGSTER_HOME's: a disk that fills mid-run would otherwise surface as SQLite's
    # "disk I/O error" from Dagster's event log instead of a message naming the disk.
    min_free_mb: int = 256

    def store(self) -> FactoryStore:
        return FactoryStore(self.home)

    def check_free_space(self) -> None:
        folders = {"the factory's home": Path(self.home).resolve()}
        if os.environ.get("DAGSTER_HOME"):
            folders["DAGSTER_HOME"] = Path(os.environ["DAGSTER_HOME"]).resolve()
        for label, folder in folders.items():
            existing = next(p for p in (folder, *folder.parents) if p.exists())
            free = shutil.disk_usage(existing).free
            if free < self.min_free_mb * 2**20:
                raise DiskFullError(
                    f"only {free / 2**20:.0f} MiB free on the disk of {label} ({folder}); a stage "
                    f"needs at least {self.min_free_mb} MiB (FactoryStorage.min_free_mb): free some "
                    "space, then re-run"
                )
