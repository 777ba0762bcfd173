"""The README's preview strip from a demo home: per character (its trigger word and chosen
step), three previews of the base model alone and the same three prompts and seeds with
the LoRA at its chosen step.

    python -m lora_factory.demo.previews_strip --home .lora_factory --out strip.webp
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from lora_factory.assets.dataset import CaptionsFiles
from lora_factory.assets.evaluation import RecscoreFiles
from lora_factory.evaluation.selection import BASELINE_STEP, choose_step
from lora_factory.reporting import image_grid_png
from lora_factory.storage import FactoryStore

# prompt -> column title
STRIP_PROMPTS = {"outfit_cluster_0": "outfit", "portrait": "portrait", "outfit_school_uniform": "uniform"}
STRIP_CELL = 160


def previews_strip(store: FactoryStore, keys: list[str]) -> Image.Image:
    rows, labels = [], []
    for key in keys:
        scores = RecscoreFiles(store, key)
        step = choose_step(scores.table())
        prompts = list(STRIP_PROMPTS)
        rows.append(scores.preview_images(BASELINE_STEP, prompts) + scores.preview_images(step, prompts))
        labels.append(f"{CaptionsFiles(store, key).summary().trigger_word}, step {step}")
    columns = [f"base: {title}" for title in STRIP_PROMPTS.values()]
    columns += [f"LoRA: {title}" for title in STRIP_PROMPTS.values()]
    # Full size: this picture is a file, not event-log metadata with a byte budget.
    return Image.open(io.BytesIO(image_grid_png(rows, labels, columns, thumb=STRIP_CELL, max_bytes=1 << 26)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=".lora_factory")
    parser.add_argument("--out", default=str(Path(__file__).with_name("previews_strip.webp")))
    parser.add_argument("keys", nargs="*", help="characters (default: every one the home has scored)")
    args = parser.parse_args(argv)
    store = FactoryStore(Path(args.home))
    keys = args.keys or sorted(p.stem for p in (store.root / "tables" / "recscore_table").glob("*.parquet"))
    previews_strip(store, keys).save(args.out, quality=85)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
