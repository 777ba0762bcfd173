"""Episode decoding: keyframe selection against decoding every frame, and flat memory.

Makes a long synthetic episode cheaply (`demo.episodes.still_shots_episode`: a still
picture of demo figures per shot, a cut every few seconds, H.264) and a short one, then:

1. Throughput on the short episode, side by side: every frame decoded to RGB (what a
   naive reader does), keyframe selection decoding every frame (`mode="all"`: grey
   thumbnails, RGB only for kept frames) and selection on decoder keyframes only
   (`mode="keyframes"`). Frames per second, episode seconds per second and the ratio.
2. Peak RSS of a fresh process that streams keyframe selection over the short and the
   long episode: memory must not grow with the length.

    python -m lora_factory.benchmarks.episode_decoding [--minutes 24] [--size 1920x1080]
        [--short-minutes 3] [--fps 24] [--shot-seconds 4] [--threads 1] [--folder DIR]

Defaults are a 24-minute 1080p episode; making it takes several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lora_factory.benchmarks.memory import peak_rss_mb
from lora_factory.demo.episodes import still_shots_episode
from lora_factory.episodes.decode import EpisodeReader
from lora_factory.episodes.keyframes import EpisodeKeyframes, KeyframeConfig


def decode_every_frame(video: Path, threads: int) -> dict[str, float]:
    started = time.perf_counter()
    reader = EpisodeReader(video, decoder_threads=threads)
    last = 0.0
    for frame in reader:
        frame.image()
        last = frame.time
    return {"frames_decoded": reader.frames_decoded, "kept": reader.frames_decoded,
            "seconds": time.perf_counter() - started, "episode_s": last}


def select(video: Path, mode: str, threads: int) -> dict[str, float]:
    started = time.perf_counter()
    selection = EpisodeKeyframes(video, KeyframeConfig(mode=mode, decoder_threads=threads))
    kept = sum(1 for _ in selection)
    return {"frames_decoded": selection.frames_decoded, "kept": kept,
            "seconds": time.perf_counter() - started, "episode_s": selection.info.duration_s or 0.0}


def memory_child(video: Path, threads: int) -> None:
    """Run in a fresh process: stream the selection, print the result and peak RSS as JSON."""
    baseline = peak_rss_mb()
    result = select(video, "all", threads)
    print(json.dumps({**result, "rss_before_mb": baseline, "peak_rss_mb": peak_rss_mb()}))


def measure_memory(video: Path, threads: int) -> dict[str, float]:
    command = [sys.executable, "-m", "lora_factory.benchmarks.episode_decoding",
               "--memory-child", str(video), "--threads", str(threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def make_episode(path: Path, minutes: float, size: tuple[int, int], fps: int, shot_seconds: float) -> Path:
    if path.is_file():
        print(f"using {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        return path
    started = time.perf_counter()
    still_shots_episode(path, minutes, size, fps, shot_seconds)
    print(f"made {path.name}: {minutes:g} min at {size[0]}x{size[1]}, {fps} fps, "
          f"{path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - started:.0f} s")
    return path


def run(folder: Path, minutes: float, short_minutes: float, size: tuple[int, int], fps: int,
        shot_seconds: float, threads: int) -> None:
    tag = f"{size[0]}x{size[1]}"
    short = make_episode(folder / f"short_{short_minutes:g}min_{tag}.mkv", short_minutes, size, fps, shot_seconds)
    long = make_episode(folder / f"long_{minutes:g}min_{tag}.mkv", minutes, size, fps, shot_seconds)

    print(f"\nthroughput on the {short_minutes:g}-minute episode ({tag}, decoder threads {threads}):")
    runs = {
        "every frame decoded to RGB": decode_every_frame(short, threads),
        "selection, every frame decoded": select(short, "all", threads),
        "selection, decoder keyframes only": select(short, "keyframes", threads),
    }
    base = runs["every frame decoded to RGB"]
    print(f"{'':36}{'decoded':>9}{'kept':>7}{'wall s':>9}{'frames/s':>10}{'x realtime':>12}{'speed-up':>10}")
    for name, result in runs.items():
        speed = result["episode_s"] / result["seconds"]
        print(f"{name:36}{result['frames_decoded']:>9}{result['kept']:>7}{result['seconds']:>9.1f}"
              f"{result['frames_decoded'] / result['seconds']:>10.0f}{speed:>12.1f}"
              f"{base['seconds'] / result['seconds']:>10.2f}")

    print("\npeak RSS of a fresh process streaming the selection (every frame decoded):")
    memory = {f"{short_minutes:g} min": measure_memory(short, threads), f"{minutes:g} min": measure_memory(long, threads)}
    for name, result in memory.items():
        print(f"{name:>10}: {result['frames_decoded']:>7} frames, {result['kept']:>5} kept, "
              f"peak RSS {result['peak_rss_mb']:.0f} MiB (after imports {result['rss_before_mb']:.0f} MiB), "
              f"{result['seconds']:.0f} s")
    small, large = memory.values()
    print(f"length x{minutes / short_minutes:.1f} -> peak RSS x{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=24.0, help="length of the long episode")
    parser.add_argument("--short-minutes", type=float, default=3.0, help="length of the short episode")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--shot-seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="decoder threads (0: FFmpeg chooses)")
    parser.add_argument("--folder", type=Path, help="keep the episodes here (reused when present)")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.threads)
        return 0
    width, height = (int(side) for side in args.size.lower().split("x"))
    if args.short_minutes >= args.minutes:
        parser.error("--short-minutes must be less than --minutes")
    if args.folder:
        args.folder.mkdir(parents=True, exist_ok=True)
        run(args.folder, args.minutes, args.short_minutes, (width, height), args.fps, args.shot_seconds, args.threads)
    else:
        with tempfile.TemporaryDirectory(prefix="episode-decoding-") as folder:
            run(Path(folder), args.minutes, args.short_minutes, (width, height), args.fps, args.shot_seconds,
                args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
