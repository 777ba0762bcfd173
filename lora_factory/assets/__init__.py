"""The Dagster assets: thin functions over the core modules."""
