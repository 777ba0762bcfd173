from lora_factory.sensors.character_index_sensor import character_index_sensor

__all__ = ["character_index_sensor"]
