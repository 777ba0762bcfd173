"""What every per-character asset shares: who owns which files, verified reuse, one run
per character at a time, and errors with a headline.

- `AssetFiles`: the files one asset partition owns. The owning asset writes through its
  paths; every other asset reads through the owner's subclass (its typed reader), whose
  reads are checked against the size and sha256 the owner recorded.
- `Stage`: one asset partition being materialized. It reuses the stored result only when
  the code version, config and upstream data are unchanged AND every recorded file and
  blob still has its bytes; otherwise it rebuilds and says what it repaired.
- `character_asset`: `dg.asset` for the `characters` partitions, turning any error into a
  `dg.Failure` whose description is the actionable message (the UI's headline).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import pandas as pd
from dagster._core.launcher import WorkerStatus
from PIL import Image

from lora_factory.engines import step_tags
from lora_factory.partitions import characters_partitions
from lora_factory.provenance import (
    Stamp,
    StampBook,
    check_file,
    damaged_outputs,
    fingerprint,
    record_files,
)
from lora_factory.resources import FactoryStorage
from lora_factory.run_health import check_run_worker
from lora_factory.storage import (
    DamagedFileError,
    FactoryStore,
    StorageError,
    atomic_write_text,
    file_lock,
    read_table,
)


class UpstreamError(StorageError):
    """An upstream partition is missing or its files no longer match what it recorded."""


class PartitionBusyError(RuntimeError):
    """Another live run is building the same character."""


class AssetFiles:
    """The files one asset keeps for one character.

    Owned: `tables/<asset>/<key>.parquet`, `tables/<asset>/<key>.<name>.parquet`, everything
    under `artefacts/<asset>/<key>/` (names starting with '.' are private working state,
    such as a training resume point) and the subclass's `extra_roots`.
    """

    asset: ClassVar[str]
    extra_roots: ClassVar[tuple[str, ...]] = ()  # home-relative folders, "{key}" filled in

    def __init__(self, store: FactoryStore, key: str):
        self.store = store
        self.key = key
        self._stamp: Stamp | None = None

    # --- where the owner writes ---
    def table_path(self, name: str | None = None) -> Path:
        return self.store.table_path(self.asset, self.key, name)

    @property
    def folder(self) -> Path:
        return self.store.artefact_dir(self.asset, self.key)

    def written_files(self) -> list[Path]:
        tables = self.store.root / "tables" / self.asset
        files = [p for p in tables.glob(f"{self.key}.parquet") if p.is_file()]
        files += [p for p in tables.glob(f"{self.key}.*.parquet") if p.is_file()]
        for root in (self.folder, *(self.store.root / r.format(key=self.key) for r in self.extra_roots)):
            files += _visible_files(root)
        return files

    def relative(self, path: Path) -> str:
        """`path` relative to the factory's home: what tables and metadata show."""
        return Path(path).relative_to(self.store.root).as_posix()

    # --- what every reader gets, checked against the owner's stamp ---
    @property
    def stamp(self) -> Stamp:
        if self._stamp is None:
            stamp = StampBook(self.store).read(self.asset, self.key)
            if stamp is None:
                raise UpstreamError(
                    f"{self.asset} has not been materialized for {self.key!r}: materialize it first "
                    "(or the whole chain for this character)"
                )
            self._stamp = stamp
        return self._stamp

    @property
    def data_version(self) -> str:
        return self.stamp.output_hash

    def verified(self, path: Path) -> Path:
        """`path`, after checking that it still holds the bytes the owner recorded."""
        relative = self.relative(path)
        record = self.stamp.files.get(relative)
        problem = f"{relative}: not among the files it recorded" if record is None else check_file(
            self.store.root, relative, record
        )
        if problem:
            raise UpstreamError(
                f"{self.asset}[{self.key}] is damaged ({problem}): re-materialize {self.asset} "
                "for this character (a run of the whole chain repairs it)"
            )
        return Path(path)

    def read_table(self, name: str | None = None) -> pd.DataFrame:
        return read_table(self.verified(self.table_path(name)))


def _visible_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _visible_files(entry)
        elif entry.is_file():
            yield entry


def claim_partition(
    store: FactoryStore, key: str, run_id: str, run_is_live: Callable[[str], bool], kind: str = "characters"
) -> None:
    """Make `run_id` the one run building partition `key` of `kind` (the partitions'
    name), or fail at once if another live run is.

    The owner is a run id in `locks/<kind>/<key>.run`; the check-and-write holds an
    advisory lock, so two runs starting together cannot both win. A run that finished or
    died (marked failed by run monitoring) no longer owns the partition.
    """
    folder = store.root / "locks" / kind
    owner_file = folder / f"{key}.run"
    with file_lock(folder / f"{key}.lock"):
        owner = owner_file.read_text().strip() if owner_file.is_file() else ""
        if owner == run_id:
            return
        if owner and run_is_live(owner):
            raise PartitionBusyError(
                f"{key} is already being built by run {owner}: wait for it to finish (or cancel it "
                "in the UI), then run again"
            )
        atomic_write_text(owner_file, run_id)


def _instance_run_is_live(instance: dg.DagsterInstance) -> Callable[[str], bool]:
    """A run is live while the instance has it in progress and its worker (when it ran on
    this host) has not died; a dead one is failed later by run monitoring."""

    def live(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is not None and not run.is_finished and check_run_worker(run).status != WorkerStatus.FAILED

    return live


class Stage:
    """One asset partition being materialized.

    `reused` is the previous stamp when the code version, config and upstream outputs
    are all unchanged and every output the previous build recorded still has its bytes;
    the asset then skips its work and describes what is stored. `repaired` lists what was
    found missing or damaged (the asset then rebuilds). A non-`reusable` stage (scraping:
    the sites may have new posts) always runs and relies on its own incremental logic.
    """

    def __init__(
        self,
        context: dg.AssetExecutionContext,
        storage: FactoryStorage,
        files: type[AssetFiles],
        config: dg.Config | None = None,
        reads: tuple[type[AssetFiles], ...] = (),
        extra: dict[str, Any] | None = None,
        reusable: bool = True,
    ):
        self.context = context
        self.key = context.partition_key
        self.store = storage.store()
        storage.check_free_space()
        self.files = files(self.store, self.key)
        self.asset = self.files.asset
        declared = {key.to_user_string() for key in context.assets_def.asset_deps[context.asset_key]}
        undeclared = [cls.asset for cls in reads if cls.asset not in declared]
        if undeclared:  # lineage in the UI must be the real data flow
            raise RuntimeError(f"{self.asset} reads {undeclared} without declaring them as deps")
        self.inputs = {cls: cls(self.store, self.key) for cls in reads}
        self.upstream_hashes = {reader.asset: reader.data_version for reader in self.inputs.values()}
        claim_partition(
            self.store,
            self.key,
            context.run.run_id,
            _instance_run_is_live(context.instance),
            context.assets_def.partitions_def.name,
        )
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        self.fingerprint = fingerprint(
            self.asset,
            code_version,
            config.model_dump() if config is not None else None,
            self.upstream_hashes,
            extra or {},
        )
        self.reused: Stamp | None = None
        self.repaired: list[str] = []
        previous = self._previous_stamp()
        if reusable and previous is not None and previous.fingerprint == self.fingerprint:
            self.repaired = damaged_outputs(self.store.root, self.store.blobs, previous)
            if self.repaired:
                context.log.warning(
                    f"{self.asset}[{self.key}]: stored result is damaged, rebuilding it: "
                    + "; ".join(self.repaired)
                )
            else:
                self.reused = previous
        self.stamp = self.reused

    def _previous_stamp(self) -> Stamp | None:
        try:
            return StampBook(self.store).read(self.asset, self.key)
        except DamagedFileError as error:
            self.context.log.warning(f"{error}: rebuilding")
            self.repaired.append(str(error))
            return None

    def distrust(self, problem: str) -> None:
        """Rebuild after all: an output the stamp cannot check (rows in a database) is wrong."""
        if self.reused is not None:
            self.context.log.warning(f"{self.asset}[{self.key}]: {problem}: rebuilding")
            self.repaired.append(problem)
            self.reused = self.stamp = None

    def read(self, files: type[AssetFiles]) -> Any:
        """The typed reader of an upstream asset this stage declared in `reads`."""
        return self.inputs[files]

    def needs_build(self) -> bool:
        """True unless the inputs are unchanged and every stored output is intact."""
        if self.reused is not None:
            self.context.log.info(
                f"{self.asset}[{self.key}]: inputs unchanged since {self.reused.made_at} "
                "(same code version, config and upstream data; every stored file verified): "
                "reusing the stored result"
            )
            return False
        return True

    def images(self, hashes: Iterable[str]) -> Iterator[Image.Image]:
        """Stored images (crops, by sha256) as RGB, read one at a time as they are used."""
        return self.store.blobs.images(hashes)

    def finish(self, output_hash: str, summary: dict[str, Any], blobs: Iterable[str] = ()) -> Stamp:
        """Record the build: fingerprint, output hash and every file the asset now holds."""
        self.stamp = StampBook(self.store).write(
            self.asset,
            self.key,
            self.fingerprint,
            output_hash,
            summary,
            record_files(self.store.root, self.files.written_files()),
            tuple(blobs),
            run_id=self.context.run.run_id,
        )
        return self.stamp

    def result(
        self,
        metadata: dict[str, Any],
        check_results: list[dg.AssetCheckResult] | None = None,
        pictures: dict[str, Callable[[], str]] | None = None,
    ) -> dg.MaterializeResult:
        """The materialization. `pictures` (name -> markdown maker) are drawn only for a
        build: a reused result's pictures are on the materialization that built it."""
        if self.stamp is None:
            raise RuntimeError(f"{self.asset}[{self.key}] finished without writing its stamp")
        if self.reused is None:
            metadata = {**metadata, **{name: dg.MetadataValue.md(draw()) for name, draw in (pictures or {}).items()}}
        else:
            # The same tables and pictures are on the materialization that built it: name
            # that one instead of storing them again (the event log grows by a few KB).
            metadata = {name: value for name, value in metadata.items() if not _bulky(value)}
            metadata["reused_from"] = dg.MetadataValue.md(
                f"unchanged since run [{self.stamp.run_id[:8]}](/runs/{self.stamp.run_id}) at "
                f"{self.stamp.made_at}: its tables and pictures are on that materialization"
            )
        return dg.MaterializeResult(
            metadata={
                **metadata,
                "reused": self.reused is not None,
                "repaired": dg.MetadataValue.md("\n".join(f"- {p}" for p in self.repaired) or "nothing"),
                "fingerprint": self.fingerprint,
                "built_at": self.stamp.made_at,
            },
            data_version=dg.DataVersion(self.stamp.output_hash),
            check_results=check_results,
        )


def _bulky(value: Any) -> bool:
    """Tables, pictures and long texts (a model card): what a reused materialization does
    not store again."""
    if isinstance(value, dg.TableMetadataValue):
        return True
    return isinstance(value, dg.MarkdownMetadataValue) and (
        "data:image/" in value.md_str or len(value.md_str) > 1_000
    )


def headline(error: BaseException) -> str:
    """The message a user acts on: the factory's own errors say what to do; others get their type."""
    message = str(error).strip()
    if isinstance(error, (RuntimeError, ValueError, OSError)) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def character_check(name: str, asset: str, **spec_kwargs: Any) -> dg.AssetCheckSpec:
    """An asset check of a per-character asset whose results belong to the character.

    With the asset's partitions on the spec, Dagster records each evaluation against the
    partition of the run (the Checks tab shows it, and its history is per character);
    without them every character's results would land on one unpartitioned check.
    Dagster marks partitioned check specs as a preview feature: that notice is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name=name, asset=asset, partitions_def=characters_partitions, **spec_kwargs)


def character_asset(gpu: bool = False, **asset_kwargs: Any) -> Callable:
    """`dg.asset` partitioned by character, whose errors reach the UI as their own message.

    A `gpu` step holds a slot of the `gpu` pool while it runs and goes to the GPU workers
    (celery queue `gpu`, a GPU pod on Kubernetes); the others to the CPU ones.
    """
    return partitioned_asset(characters_partitions, gpu, **asset_kwargs)


def partitioned_asset(partitions_def: dg.DynamicPartitionsDefinition, gpu: bool = False, **asset_kwargs: Any) -> Callable:
    """`character_asset` for other partitions (anime series)."""

    def decorate(fn: Callable) -> dg.AssetsDefinition:
        @functools.wraps(fn)
        def materialize(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except dg.Failure:
                raise
            except Exception as error:
                raise dg.Failure(description=headline(error)) from error

        placement = {"pool": "gpu"} if gpu else {}
        return dg.asset(
            partitions_def=partitions_def, op_tags=step_tags(gpu), **placement, **asset_kwargs
        )(materialize)

    return decorate

