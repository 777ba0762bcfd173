"""A training run described in a JSON file, so that it can run in its own process.

`python -m lora_factory.training JOB.json` trains what the file describes and prints its
progress; killed at any point and started again with the same file, it resumes from its
last saved state (see `train.py`). A separate process also hands every byte of GPU memory
back to the system when it ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_factory.training.config import TrainingConfig
from lora_factory.training.dataset import TrainingExample


@dataclass(frozen=True)
class TrainingJob:
    base_source: str
    examples: list[TrainingExample]
    output_dir: str
    config: TrainingConfig
    output_name: str
    trigger_word: str
    tag_frequency: dict = field(default_factory=dict)
    dataset_dirs: dict = field(default_factory=dict)
    base_config: str | None = None
    latent_cache_dir: str | None = None
    device: str | None = None
    gpu_lock_dir: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["examples"] = [
            {
                "image_path": str(example.image_path),
                "caption": example.caption,
                "bucket": list(example.bucket),
                "repeats": example.repeats,
            }
            for example in self.examples
        ]
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingJob:
        data = json.loads(text)
        try:
            data["examples"] = [
                TrainingExample(
                    image_path=Path(item["image_path"]),
                    caption=item["caption"],
                    bucket=tuple(item["bucket"]),
                    repeats=item.get("repeats", 1),
                )
                for item in data["examples"]
            ]
            data["config"] = TrainingConfig(**data.get("config", {}))
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a valid training job file: {error}") from error

    def run(self, log: Callable[[str], None] = print):
        from lora_factory.training.train import train_lora

        return train_lora(
            self.base_source,
            self.examples,
            Path(self.output_dir),
            self.config,
            self.output_name,
            self.trigger_word,
            self.tag_frequency,
            self.dataset_dirs,
            log,
            base_config=self.base_config,
            latent_cache_dir=Path(self.latent_cache_dir) if self.latent_cache_dir else None,
            device=self.device,
            gpu_lock_dir=Path(self.gpu_lock_dir) if self.gpu_lock_dir else None,
        )
