import dagster as dg

from lora_factory.storage import DEFAULT_HOME, FactoryStore


class FactoryStorage(dg.ConfigurableResource):
    """The factory's root folder (blobs, tables, artefacts, models, embeddings)."""

    home: str = DEFAULT_HOME

    def store(self) -> FactoryStore:
        return FactoryStore(self.home)
