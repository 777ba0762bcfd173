from pathlib import Path

import dagster as dg

from lora_factory.index.character_index import (
    CharacterIndexError,
    CharacterRow,
    IndexSnapshot,
    file_signature,
    read_index,
)


class CharacterIndex(dg.ConfigurableResource):
    """The character index file (YAML), parsed once per process and version of the file."""

    index_path: str = ""
    # The folder absolute `reference_images` must be in; None: the index file's folder.
    reference_root: str | None = None

    def _path(self) -> str:
        if not self.index_path:
            raise CharacterIndexError(
                "no character index: set LF_INDEX_PATH (or `index_path` in the CharacterIndex "
                "resource) to your index YAML file"
            )
        return self.index_path

    def signature(self) -> tuple[int, int]:
        """The file's (size, modification time): a stat, no read."""
        return file_signature(self._path())

    def snapshot(self) -> IndexSnapshot:
        return read_index(self._path(), reference_root=self.reference_root)

    def rows(self) -> list[CharacterRow]:
        return list(self.snapshot().rows)

    def enabled_rows(self) -> list[CharacterRow]:
        return self.snapshot().enabled_rows()

    def row(self, key: str) -> CharacterRow:
        return self.snapshot().row(key)

    def reference_paths(self, row: CharacterRow) -> list[Path]:
        """The row's reference images as paths (relative ones are relative to the index file)."""
        folder = Path(self._path()).parent
        return [path if path.is_absolute() else folder / path for path in map(Path, row.reference_images)]
