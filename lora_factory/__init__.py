"""lora_factory: character LoRAs at scale, as Dagster assets."""
