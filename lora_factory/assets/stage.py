"""The bookkeeping every per-character asset shares: skip-if-unchanged and metadata."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from PIL import Image

from lora_factory.provenance import Stamp, StampBook, fingerprint
from lora_factory.resources import FactoryStorage


class Stage:
    """One asset partition being materialized.

    `reused` is the previous stamp when the code version, config and upstream outputs
    are all unchanged and the previous outputs still exist; the asset then skips its
    work and describes what is stored. A non-`reusable` stage (scraping: the sites may
    have new posts) always runs and relies on its own incremental logic.
    """

    def __init__(
        self,
        context: dg.AssetExecutionContext,
        storage: FactoryStorage,
        config: dg.Config | None = None,
        upstream: tuple[str, ...] = (),
        extra: dict[str, Any] | None = None,
        reusable: bool = True,
    ):
        self.context = context
        self.asset = context.asset_key.to_user_string()
        self.key = context.partition_key
        self.store = storage.store()
        self.stamps = StampBook(self.store)
        self.upstream_hashes = {
            name: self.stamps.require(name, self.key).output_hash for name in upstream
        }
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        self.fingerprint = fingerprint(
            self.asset,
            code_version,
            config.model_dump() if config is not None else None,
            self.upstream_hashes,
            extra or {},
        )
        previous = self.stamps.read(self.asset, self.key)
        unchanged = (
            reusable and previous is not None and previous.fingerprint == self.fingerprint
        )
        self.reused: Stamp | None = previous if unchanged else None
        self.stamp = self.reused

    def needs_build(self, *outputs: Path) -> bool:
        """True unless the inputs are unchanged and every output is still on disk."""
        if self.reused is not None and all(Path(p).exists() for p in outputs):
            self.context.log.info(
                f"{self.asset}[{self.key}]: inputs unchanged since {self.reused.made_at} "
                "(same code version, config and upstream data): reusing the stored result"
            )
            return False
        self.reused = self.stamp = None
        return True

    def images(self, hashes: Iterable[str]) -> Iterator[Image.Image]:
        """Stored images (crops, by sha256) as RGB, read one at a time as they are used."""
        return self.store.blobs.images(hashes)

    def upstream(self, name: str) -> Stamp:
        return self.stamps.require(name, self.key)

    def finish(self, output_hash: str, summary: dict[str, Any]) -> Stamp:
        self.stamp = self.stamps.write(self.asset, self.key, self.fingerprint, output_hash, summary)
        return self.stamp

    def result(
        self,
        metadata: dict[str, Any],
        check_results: list[dg.AssetCheckResult] | None = None,
    ) -> dg.MaterializeResult:
        if self.stamp is None:
            raise RuntimeError(f"{self.asset}[{self.key}] finished without writing its stamp")
        return dg.MaterializeResult(
            metadata={
                **metadata,
                "reused": self.reused is not None,
                "fingerprint": self.fingerprint,
                "built_at": self.stamp.made_at,
            },
            data_version=dg.DataVersion(self.stamp.output_hash),
            check_results=check_results,
        )
