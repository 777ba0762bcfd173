"""The character index at scale: sensor ticks and row look-ups over a large index.

    python -m lora_factory.benchmarks.index_scale [--rows 10000]

Writes an index of N generated rows, then evaluates the real `character_index_sensor`
against a real (ephemeral) Dagster instance: the first tick (every row new), a tick with
the file unchanged, one with the file touched (same bytes), one with one row changed,
and prints each beside what the same tick cost before (every tick and every asset parsed
the whole file with PyYAML's pure-Python loader; that parse alone is timed here, so the
old figures are lower bounds). Also: one row look-up as an asset does it, and the peak
memory of the process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml


def write_index(path: Path, rows: int, changed: int | None = None) -> None:
    lines = ["characters:"]
    for n in range(rows):
        franchise = f"franchise_{n % 97}"
        aliases = f"Alias {n}b" if n == changed else f"Alias {n}"
        lines += [
            f"  - key: character_{n:05d}_{franchise}",
            f"    display_name: Character {n}",
            f"    franchise: {franchise}",
            f"    names: [\"{aliases}\", \"キャラ{n}\"]",
            "    gender: female",
            f"    site_tags: {{danbooru: character_{n}_({franchise})}}",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args(argv)

    import dagster as dg

    from lora_factory.benchmarks.memory import peak_rss_mb
    from lora_factory.resources import AnimeSeries, CharacterIndex, FactoryStorage
    from lora_factory.sensors import character_index_sensor

    with tempfile.TemporaryDirectory() as folder, dg.DagsterInstance.ephemeral() as instance:
        path = Path(folder) / "index.yaml"
        write_index(path, args.rows)
        resource = CharacterIndex(index_path=str(path))
        cursor = None

        def tick():
            nonlocal cursor
            context = dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                resources={
                    "character_index": resource,
                    "anime_series": AnimeSeries(),
                    "storage": FactoryStorage(home=str(Path(folder) / "home")),
                },
            )
            result = character_index_sensor(context)
            if isinstance(result, dg.SensorResult):
                for request in result.dynamic_partitions_requests or []:
                    instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
                cursor = result.cursor or cursor
                return len(result.run_requests or [])
            return 0

        old_parse, _ = timed(lambda: yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
        figures = []
        seconds, runs = timed(tick)
        figures.append(("first tick, every row new", seconds, old_parse, f"{runs} runs requested"))
        seconds, runs = timed(tick)
        figures.append(("next tick, queue fed in batches", seconds, old_parse, f"{runs} runs requested"))
        while tick():  # the rest of the batches
            pass
        seconds, _ = timed(tick)
        figures.append(("tick, file unchanged", seconds, old_parse, "one stat"))
        os.utime(path)
        seconds, _ = timed(tick)
        figures.append(("tick, file touched (same bytes)", seconds, old_parse, "read + sha256"))
        write_index(path, args.rows, changed=args.rows // 2)
        seconds, runs = timed(tick)
        figures.append(("tick, one row changed", seconds, old_parse, f"{runs} runs requested"))
        key = f"character_{args.rows // 3:05d}_franchise_{(args.rows // 3) % 97}"
        seconds, _ = timed(lambda: resource.row(key))
        figures.append(("one row looked up by an asset", seconds, old_parse, "cached snapshot"))

        print(f"index of {args.rows} rows ({path.stat().st_size / 2**20:.1f} MiB)")
        print(f"{'':34s} {'now s':>9s} {'before s':>9s} {'ratio':>8s}")
        for label, now, before, note in figures:
            print(f"{label:34s} {now:9.3f} {before:9.3f} {now / before:8.4f}  {note}")
        print(f"peak memory of this process: {peak_rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
