import dagster as dg

from lora_factory.index.character_index import (
    CharacterIndexError,
    CharacterRow,
    find_row,
    load_index,
)


class CharacterIndex(dg.ConfigurableResource):
    """The character index file (YAML)."""

    index_path: str = ""
    # The folder absolute `reference_images` must be in; None: the index file's folder.
    reference_root: str | None = None

    def rows(self) -> list[CharacterRow]:
        if not self.index_path:
            raise CharacterIndexError(
                "no character index: set LF_INDEX_PATH (or `index_path` in the CharacterIndex "
                "resource) to your index YAML file"
            )
        return load_index(self.index_path, reference_root=self.reference_root)

    def enabled_rows(self) -> list[CharacterRow]:
        return [row for row in self.rows() if row.enabled]

    def row(self, key: str) -> CharacterRow:
        return find_row(self.rows(), key)
