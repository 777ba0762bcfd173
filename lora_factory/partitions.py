"""Partitions: one per character (keys are the index's slugs, never containing '/'), and one
per anime series (the `anime_series` resource's names)."""

import dagster as dg

characters_partitions = dg.DynamicPartitionsDefinition(name="characters")
series_partitions = dg.DynamicPartitionsDefinition(name="series")
