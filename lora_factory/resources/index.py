import dagster as dg

from lora_factory.index.character_index import (
    DEMO_INDEX_PATH,
    CharacterRow,
    find_row,
    load_index,
)


class CharacterIndex(dg.ConfigurableResource):
    """The character index file (YAML). Defaults to the demo characters shipped in the repo."""

    index_path: str = str(DEMO_INDEX_PATH)
    # The folder absolute `reference_images` must be in; None: the index file's folder.
    reference_root: str | None = None

    def rows(self) -> list[CharacterRow]:
        return load_index(self.index_path, reference_root=self.reference_root)

    def enabled_rows(self) -> list[CharacterRow]:
        return [row for row in self.rows() if row.enabled]

    def row(self, key: str) -> CharacterRow:
        return find_row(self.rows(), key)
