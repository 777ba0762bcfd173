"""One partition per character; keys are the index's slugs (never contain '/')."""

import dagster as dg

characters_partitions = dg.DynamicPartitionsDefinition(name="characters")
