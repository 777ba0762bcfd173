"""`python -m lora_factory.training JOB.json`: run one training job (see `job.py`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_factory.training.job import TrainingJob


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_factory.training", description=__doc__)
    parser.add_argument("job", type=Path, help="a JSON file written by TrainingJob.to_json()")
    args = parser.parse_args(argv)
    job = TrainingJob.from_json(args.job.read_text())
    checkpoints = job.run(log=lambda message: print(message, flush=True))
    print(json.dumps([{"step": c.step, "epoch": c.epoch, "path": str(c.path), "sha256": c.sha256} for c in checkpoints]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
