"""Pick the frames of an episode worth running the detectors on.

An episode at 24 fps is ~34,000 frames, most of them near copies of their neighbours
(anime holds drawings for 2-3 frames and whole shots for seconds). The selection streams
the frames once and keeps a frame when it shows something new:

1. Every decoded frame becomes a tiny grey thumbnail (64x36 by default), scaled by FFmpeg
   from the decoded picture, so frames that are skipped are never converted to RGB.
2. A frame whose thumbnail is nearly flat is a fade or a blank card: skipped (`blank`).
3. A big change from the previous frame (mean absolute difference >= `cut_threshold`)
   is a scene cut: the first frame of every shot is a candidate.
4. Inside a shot, a frame is a candidate only when it differs from the last covered
   frame (the last kept one, or the last near duplicate of a kept one) by at least
   `change_threshold` (motion, a pan, someone walking in; else `near_identical`) and
   comes at least `min_interval_s` after it (else `too_soon`). Comparing with the last
   covered frame rather than the previous one lets slow motion add up until it matters.
5. Candidates go through the project's perceptual hash (`cleaning.dedup`): a frame
   within `phash_max_distance` bits of any frame kept before is a `near_duplicate`
   (a shot cut back to, a flashback). Pass one `NearDuplicateIndex` to every episode of
   a series to drop the opening and ending that each episode repeats.

Decoder keyframes: with `mode="keyframes"` only keyframes are decoded
(`skip_frame = "NONKEY"`), which is several times faster, and encoders put a keyframe at
every scene cut; but a long GOP (x264's default is 250 frames) misses what happens
inside a shot. `mode="auto"` therefore reads the packet flags of the episode's first
minute (no decoding) and decodes keyframes only when they come at least every
`max_keyframe_gap_s`; otherwise every frame is decoded and steps 1-5 decide.

Memory: the previous and the last covered thumbnails, and one hash per kept frame.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
from PIL import Image

from lora_factory.cleaning.dedup import DEFAULT_MAX_DISTANCE, NearDuplicateIndex, perceptual_hash
from lora_factory.episodes.decode import EpisodeFrame, EpisodeReader

MODES = ("auto", "all", "keyframes")
SKIP_REASONS = ("blank", "near_identical", "too_soon", "near_duplicate")


@dataclass(frozen=True)
class KeyframeConfig:
    mode: str = "auto"
    thumbnail_size: tuple[int, int] = (64, 36)
    # Mean absolute grey difference (0..255) between consecutive thumbnails: hard cuts
    # between the demo's look-alike backdrops measure 14-43 (real cuts usually more),
    # figures walking inside a shot at most 8.
    cut_threshold: float = 12.0
    # ... between a frame and the last kept one: a figure walking a tenth of the frame
    # or a pan of a few percent gives 4-10; encoder noise on a held drawing stays < 1.
    change_threshold: float = 4.0
    min_interval_s: float = 0.5
    blank_std: float = 2.0  # grey standard deviation of a fade or a plain card
    phash_max_distance: int = DEFAULT_MAX_DISTANCE
    max_keyframe_gap_s: float = 1.0  # "auto": decode keyframes only when they are this dense
    probe_seconds: float = 60.0  # "auto": how much of the episode's packets to look at
    decoder_threads: int = 0  # 0: FFmpeg chooses

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.cut_threshold <= self.change_threshold:
            raise ValueError("cut_threshold must be above change_threshold")


@dataclass(frozen=True)
class KeptFrame:
    index: int  # the frame's number in the episode (see EpisodeFrame.index)
    time: float  # seconds
    image: Image.Image  # RGB, full size
    trigger: str  # "cut" (first frame of a shot) or "change"


def keyframe_gaps(path: Path | str, seconds: float = 60.0) -> list[float]:
    """Seconds between consecutive keyframes in the first `seconds` of the episode,
    read from packet flags without decoding."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times: list[float] = []
        for packet in container.demux(stream):
            if packet.pts is None or not packet.size:
                continue
            time = float(packet.pts * stream.time_base)
            if time > seconds:
                break
            if packet.is_keyframe:
                times.append(time)
    times.sort()
    return [b - a for a, b in pairwise(times)]


def choose_mode(path: Path | str, config: KeyframeConfig) -> str:
    """`config.mode`, with "auto" resolved to "keyframes" or "all" (see the module docstring)."""
    if config.mode != "auto":
        return config.mode
    gaps = keyframe_gaps(path, config.probe_seconds)
    if gaps and statistics.median(gaps) <= config.max_keyframe_gap_s:
        return "keyframes"
    return "all"


class KeyframeSelector:
    """Steps 2-5 of the module docstring over any stream of `EpisodeFrame`s."""

    def __init__(self, config: KeyframeConfig = KeyframeConfig(), duplicates: NearDuplicateIndex | None = None):
        self.config = config
        self.duplicates = duplicates if duplicates is not None else NearDuplicateIndex(config.phash_max_distance)
        self.skipped: Counter[str] = Counter()
        self.frames_seen = 0
        self.kept = 0

    def select(self, frames: Iterable[EpisodeFrame], key_prefix: str = "") -> Iterator[KeptFrame]:
        config = self.config
        previous: np.ndarray | None = None
        # The last frame whose content is covered: kept, or a near duplicate of a kept one.
        covered: np.ndarray | None = None
        covered_time = float("-inf")
        for frame in frames:
            self.frames_seen += 1
            thumbnail = frame.grey_thumbnail(*config.thumbnail_size).astype(np.int16)
            cut = previous is None or float(np.abs(thumbnail - previous).mean()) >= config.cut_threshold
            previous = thumbnail
            if float(thumbnail.std()) < config.blank_std:
                self.skipped["blank"] += 1
                continue
            if not cut and covered is not None:
                if float(np.abs(thumbnail - covered).mean()) < config.change_threshold:
                    self.skipped["near_identical"] += 1
                    continue
                if frame.time - covered_time < config.min_interval_s:
                    self.skipped["too_soon"] += 1
                    continue
            image = frame.image()
            verdict = self.duplicates.add(f"{key_prefix}{frame.index}", perceptual_hash(image))
            covered, covered_time = thumbnail, frame.time
            if not verdict.kept:
                self.skipped["near_duplicate"] += 1
                continue
            self.kept += 1
            yield KeptFrame(frame.index, frame.time, image, "cut" if cut else "change")


class EpisodeKeyframes:
    """The kept frames of one episode file; after iterating, `skipped`, `damage` and the
    counts tell what happened. Creating it probes the file (`EpisodeRejected`)."""

    def __init__(self, path: Path | str, config: KeyframeConfig = KeyframeConfig(),
                 duplicates: NearDuplicateIndex | None = None):
        self.path = Path(path)
        self.config = config
        self.reader = EpisodeReader(self.path, decoder_threads=config.decoder_threads)
        self.mode = choose_mode(self.path, config)
        self.reader.keyframes_only = self.mode == "keyframes"
        self.selector = KeyframeSelector(config, duplicates)

    def __iter__(self) -> Iterator[KeptFrame]:
        yield from self.selector.select(self.reader, key_prefix=f"{self.path.name}#")

    @property
    def info(self):
        return self.reader.info

    @property
    def damage(self):
        return self.reader.damage

    @property
    def frames_decoded(self) -> int:
        return self.reader.frames_decoded

    @property
    def skipped(self) -> Counter[str]:
        return self.selector.skipped

    def summary(self) -> dict[str, object]:
        """Counts for tables and logs."""
        return {
            "mode": self.mode,
            "frames_decoded": self.frames_decoded,
            "frames_kept": self.selector.kept,
            **{f"skipped_{reason}": self.skipped.get(reason, 0) for reason in SKIP_REASONS},
            "damage": "; ".join(f"{d.reason}: {d.detail}" for d in self.damage),
        }
