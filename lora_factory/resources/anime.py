from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg

from lora_factory.storage import FactoryStore

# What a folder of episodes may hold; anything else in it (subtitles, notes) is ignored.
VIDEO_SUFFIXES = (".mkv", ".mp4", ".webm", ".avi", ".mov", ".m4v", ".ts", ".m2ts", ".wmv", ".flv")


class AnimeSeries(dg.ConfigurableResource):
    """Local anime episodes by series (downloading them is up to the user): each series
    name maps to a folder (every video file in it) or a glob (`/data/anime/frieren/*.mkv`).
    Index rows name the series a character appears in (`anime_series: [frieren]`); each
    series is one partition of the `series_*` assets."""

    series: dict[str, str] = {}
    keyframe_mode: str = "auto"  # "auto", "all" (decode every frame) or "keyframes" (decoder keyframes only)

    def videos(self, name: str, store: FactoryStore) -> list[Path]:
        """The series' episode files, sorted by name (an episode is named by its file stem)."""
        if name not in self.series:
            raise ValueError(
                f"anime series {name!r} is not configured: add it to the `anime_series` resource "
                f"(series name -> folder or glob of its episodes); configured: {sorted(self.series) or 'none'}"
            )
        return _episode_files(self.series[name], name)


    def listing(self, name: str, store: FactoryStore) -> str:
        """What tells, without reading them, that a series' episode files changed: a hash
        of their names, sizes and modification times ("" when it has none yet)."""
        try:
            files = self.videos(name, store)
        except (ValueError, FileNotFoundError):
            return ""
        return _listing_hash(files)


def _listing_hash(files: list[Path]) -> str:
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _episode_files(where: str, name: str) -> list[Path]:
    path = Path(where).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
    else:
        files = [p for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or "."))) if p.is_file()]
    if not files:
        raise FileNotFoundError(
            f"anime series {name!r}: no episode files at {where!r} (a folder of {', '.join(VIDEO_SUFFIXES)} "
            "files, or a glob)"
        )
    stems = [p.stem for p in files]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        raise ValueError(f"anime series {name!r}: several files are named {clashes} (an episode is named by its stem)")
    return sorted(files, key=lambda p: p.name)
