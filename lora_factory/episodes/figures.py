"""Every figure in an episode's kept frames: detected, checked and cut as cleaning does.

Per batch of kept frames (see `keyframes`), in cleaning's order for web pictures:
monochrome and class filters on the whole frame (an episode's frames are the
classifier's `bangumi` class, or `illustration` for clean flat art such as the demo's;
comic and 3D frames, e.g. CG inserts or manga-style stills, are dropped) -> person
detection -> minimum person size -> exactly one face per person -> half-body and head
detection on the person crop -> 3-stage crops (`cleaning.crops.three_stage_crops`) ->
minimum crop size -> an identity vector of the person crop (the full crop, as cleaning
embeds persons). Every dropped frame or person leaves one row in `drops` with its
reason, so nothing disappears without a count.

The crops themselves are not stored here: each row holds the episode, the frame's time
and index and the crop boxes, so `cut_crops` can cut them again from the video, and
`keep_images=True` keeps the person crops in memory (small series, contact sheets).
Near-duplicate figures (the same standing figure in several kept frames of a shot) are
kept: they give the identity clustering its density. Each row carries the person crop's
perceptual hash so the dataset step can drop them as cleaning drops duplicate persons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import pandas as pd
from PIL import Image

from lora_factory.cleaning.crops import Crop, clip_box, squared_head_box, three_stage_crops
from lora_factory.cleaning.dedup import NearDuplicateIndex, perceptual_hash
from lora_factory.cleaning.pipeline import shifted_box, top_label  # shared with cleaning's chain
from lora_factory.episodes.decode import EpisodeRejected
from lora_factory.episodes.keyframes import EpisodeKeyframes, KeptFrame, KeyframeConfig

if TYPE_CHECKING:  # ONNX Runtime is slow to import: only the type is needed
    from lora_factory.vision.models import VisionModels

FIGURE_COLUMNS = [
    "episode", "frame_index", "time", "person_index", "person_box", "person_score",
    "upper_box", "head_box", "anime_class", "monochrome_score", "person_phash", "identity",
]
DROP_COLUMNS = ["episode", "frame_index", "time", "person_index", "stage", "reason", "detail"]
FRAME_LEVEL = -1  # person_index of a drop that concerns the whole frame
CONTEXT_ENLARGE = 1.15


@dataclass(frozen=True)
class FigureConfig:
    """The thresholds of the chain; defaults are cleaning's (`CleaningConfig`)."""

    monochrome_threshold: float = 0.5
    keep_classes: tuple[str, ...] = ("bangumi", "illustration")
    # Shorter side of a person box and of every crop. Cleaning's 64 px suits 720p and
    # 1080p episodes; the demo series' 384x216 frames need about half.
    min_crop_side: int = 64
    require_one_face: bool = True
    batch_frames: int = 8
    keep_images: bool = False
    # Keep each figure's surroundings too: its box squared and enlarged CONTEXT_ENLARGE
    # times, inside the frame. That is what the factory passes on as the figure's
    # picture (a post, as a booru would have it): cleaning cuts its crops from it again.
    keep_context: bool = False

    def __post_init__(self) -> None:
        if self.batch_frames < 1 or self.min_crop_side < 1:
            raise ValueError("batch_frames and min_crop_side must be at least 1")
        if not self.keep_classes:
            raise ValueError("keep_classes is empty: every frame would be dropped")


@dataclass
class FigureTable:
    """The figures of one or more episodes: `figures` (FIGURE_COLUMNS), `drops`
    (DROP_COLUMNS), the identity vectors as a matrix (row i = figures row i) and, with
    `keep_images`, the person crops in the same order."""

    figures: pd.DataFrame
    drops: pd.DataFrame
    vectors: np.ndarray
    images: list[Image.Image] = field(default_factory=list)
    contexts: list[Image.Image] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def concat(cls, tables: Sequence[FigureTable]) -> FigureTable:
        """The figures of several episodes in one table (a series)."""
        tables = list(tables)
        if not tables:
            return _empty_table()
        counts: Counter[str] = Counter()
        for table in tables:
            counts.update(table.counts)
        return cls(
            figures=pd.concat([t.figures for t in tables], ignore_index=True),
            drops=pd.concat([t.drops for t in tables], ignore_index=True),
            vectors=np.concatenate([t.vectors for t in tables]),
            images=[image for t in tables for image in t.images],
            contexts=[image for t in tables for image in t.contexts],
            counts=dict(counts),
        )


def _empty_table() -> FigureTable:
    return FigureTable(pd.DataFrame(columns=FIGURE_COLUMNS), pd.DataFrame(columns=DROP_COLUMNS),
                       np.zeros((0, 0), dtype=np.float32))


def _batches(frames: Iterable[KeptFrame], size: int) -> Iterator[list[KeptFrame]]:
    batch: list[KeptFrame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Person:
    frame: KeptFrame
    index: int
    box: tuple[int, int, int, int]
    score: float
    crop: Image.Image
    anime_class: str
    monochrome: float


class _Collector:
    def __init__(self, episode: str) -> None:
        self.episode = episode
        self.rows: list[dict] = []
        self.drops: list[dict] = []
        self.vectors: list[np.ndarray] = []
        self.images: list[Image.Image] = []
        self.contexts: list[Image.Image] = []
        self.counts: Counter[str] = Counter()

    def drop(self, frame: KeptFrame, stage: str, reason: str, detail: str, person: int = FRAME_LEVEL) -> None:
        self.drops.append({"episode": self.episode, "frame_index": frame.index, "time": frame.time,
                           "person_index": person, "stage": stage, "reason": reason, "detail": detail})
        self.counts[reason] += 1


def episode_figures(
    episode: str,
    frames: Iterable[KeptFrame],
    models: VisionModels,
    config: FigureConfig = FigureConfig(),
) -> FigureTable:
    """Detect, check, crop and embed every figure in `frames` (the kept frames of one
    episode named `episode`)."""
    out = _Collector(episode)
    for batch in _batches(frames, config.batch_frames):
        out.counts["frames"] += len(batch)
        persons = _persons(_classified(batch, models, config, out), models, config, out)
        if persons:
            _crop_and_embed(persons, models, config, out)
    dimension = out.vectors[0].shape[0] if out.vectors else 0
    figures = pd.DataFrame(out.rows, columns=FIGURE_COLUMNS)
    out.counts["figures"] = len(figures)
    return FigureTable(
        figures=figures,
        drops=pd.DataFrame(out.drops, columns=DROP_COLUMNS),
        vectors=np.stack(out.vectors) if out.vectors else np.zeros((0, dimension), dtype=np.float32),
        images=out.images,
        contexts=out.contexts,
        counts=dict(out.counts),
    )


def _classified(batch: list[KeptFrame], models: VisionModels, config: FigureConfig,
                out: _Collector) -> list[tuple[KeptFrame, str, float]]:
    """The frames that pass the monochrome and class filters, with their class."""
    images = [frame.image for frame in batch]
    kept = []
    for frame, mono, classes in zip(batch, models.monochrome.predict(images),
                                    models.classification.predict(images), strict=True):
        monochrome = float(mono.get("monochrome", 0.0))
        label, probability = top_label(classes)
        if monochrome >= config.monochrome_threshold:
            out.drop(frame, "filter", "monochrome", f"p={monochrome:.2f}")
        elif label not in config.keep_classes:
            out.drop(frame, "filter", f"class_{label}", f"p={probability:.2f}")
        else:
            kept.append((frame, label, monochrome))
    return kept


def _persons(frames: list[tuple[KeptFrame, str, float]], models: VisionModels, config: FigureConfig,
             out: _Collector) -> list[_Person]:
    """Person boxes -> minimum size -> exactly one face."""
    if not frames:
        return []
    candidates: list[_Person] = []
    detections = models.person.detect([frame.image for frame, _, _ in frames])
    for (frame, label, monochrome), found in zip(frames, detections, strict=True):
        if not found:
            out.drop(frame, "person", "no_person", "the person detector found nobody")
        for index, detection in enumerate(found):
            box = clip_box(detection.box, frame.image.size)
            side = min(box[2] - box[0], box[3] - box[1])
            if side < config.min_crop_side:
                out.drop(frame, "person", "person_too_small", f"{side} px < {config.min_crop_side}", index)
                continue
            candidates.append(_Person(frame, index, box, detection.score, frame.image.crop(box), label, monochrome))
    if not config.require_one_face or not candidates:
        return candidates
    kept = []
    for person, faces in zip(candidates, models.face.detect([p.crop for p in candidates]), strict=True):
        if len(faces) == 1:
            kept.append(person)
        else:
            reason = "no_face" if not faces else "multiple_faces"
            out.drop(person.frame, "person", reason, f"{len(faces)} faces", person.index)
    return kept


def _crop_and_embed(persons: list[_Person], models: VisionModels, config: FigureConfig, out: _Collector) -> None:
    crops = [p.crop for p in persons]
    survivors: list[tuple[_Person, dict[str, Crop]]] = []
    for person, halfbody, head in zip(persons, models.halfbody.detect(crops), models.head.detect(crops), strict=True):
        cut = three_stage_crops(person.frame.image.size, person.box,
                                [shifted_box(d.box, person.box) for d in halfbody],
                                [shifted_box(d.box, person.box) for d in head])
        big = {crop.kind: crop for crop in cut if min(crop.width, crop.height) >= config.min_crop_side}
        out.counts["crop_too_small"] += len(cut) - len(big)
        if "full" not in big:
            out.drop(person.frame, "crop", "no_crops", f"every crop is below {config.min_crop_side} px", person.index)
            continue
        survivors.append((person, big))
    if not survivors:
        return
    vectors = np.asarray(models.identity.embed([p.crop for p, _ in survivors]), dtype=np.float32)
    for (person, crops_by_kind), vector in zip(survivors, vectors, strict=True):
        out.rows.append({
            "episode": out.episode,
            "frame_index": person.frame.index,
            "time": person.frame.time,
            "person_index": person.index,
            "person_box": person.box,
            "person_score": person.score,
            "upper_box": crops_by_kind["upper"].box if "upper" in crops_by_kind else None,
            "head_box": crops_by_kind["head"].box if "head" in crops_by_kind else None,
            "anime_class": person.anime_class,
            "monochrome_score": person.monochrome,
            "person_phash": perceptual_hash(person.crop),
            "identity": vector,
        })  # fmt: skip
        out.vectors.append(vector)
        if config.keep_images:
            out.images.append(person.crop)
        if config.keep_context:
            frame = person.frame.image
            out.contexts.append(frame.crop(squared_head_box(person.box, frame.size, CONTEXT_ENLARGE)))


def frames_at(video: Path | str, times: Iterable[float]) -> Iterator[tuple[float, Image.Image]]:
    """The RGB frames shown at `times` (seconds), in time order: a seek to the keyframe
    before each time, then decoding up to it. Times are matched within half a frame."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        rate = float(stream.average_rate or stream.guessed_rate or 24)
        for target in sorted(set(times)):
            container.seek(start + int(target / stream.time_base), stream=stream, backward=True)
            best = None
            for frame in container.decode(stream):
                time = float((frame.pts - start) * stream.time_base)
                if time > target + 0.5 / rate:
                    break
                best = frame
            if best is None:
                raise ValueError(f"no frame at {target:.3f} s in {Path(video).name}")
            yield target, best.to_image()


def cut_crops(video: Path | str, figures: pd.DataFrame, kinds: Sequence[str] = ("full", "upper", "head")
              ) -> Iterator[tuple[int, str, Image.Image]]:
    """(row label, crop kind, picture) for every crop of `figures` rows of one episode,
    cut again from `video`."""
    columns = {"full": "person_box", "upper": "upper_box", "head": "head_box"}
    by_time = figures.groupby("time")
    for time, image in frames_at(video, by_time.groups):
        for label, row in by_time.get_group(time).iterrows():
            for kind in kinds:
                box = row[columns[kind]]
                if box is not None:
                    yield label, kind, image.crop(tuple(box))


EPISODE_COLUMNS = ["episode", "status", "reason", "detail", "mode", "frames_decoded", "frames_kept", "figures"]


@dataclass
class SeriesFigures:
    """The figures of every usable episode of a series, and one row per episode file
    (EPISODE_COLUMNS): status "ok", "damaged" (frames before the damage were used) or
    "rejected" (nothing usable; `reason` is one of decode.REJECT_REASONS)."""

    table: FigureTable
    episodes: pd.DataFrame


def episode_result(video: Path | str, models: VisionModels, keyframe_config: KeyframeConfig = KeyframeConfig(),
                   figure_config: FigureConfig = FigureConfig(),
                   duplicates: NearDuplicateIndex | None = None) -> tuple[dict, FigureTable | None]:
    """Keyframes and figures of one episode file (named by its stem): its EPISODE_COLUMNS
    row, and its figures (None when the file was rejected)."""
    video = Path(video)
    row = dict.fromkeys(EPISODE_COLUMNS, "")
    row["episode"] = video.stem
    try:
        kept = EpisodeKeyframes(video, keyframe_config, duplicates)
        table = episode_figures(video.stem, kept, models, figure_config)
    except EpisodeRejected as rejected:
        return {**row, "status": "rejected", "reason": rejected.reason, "detail": rejected.detail,
                "frames_decoded": 0, "frames_kept": 0, "figures": 0}, None
    summary = kept.summary()
    damage = kept.damage
    return {**row, "status": "damaged" if damage else "ok",
            "reason": ", ".join(d.reason for d in damage), "detail": summary["damage"],
            "mode": kept.mode, "frames_decoded": kept.frames_decoded,
            "frames_kept": summary["frames_kept"], "figures": len(table.figures)}, table


def series_figures(videos: Sequence[Path | str], models: VisionModels,
                   keyframe_config: KeyframeConfig = KeyframeConfig(),
                   figure_config: FigureConfig = FigureConfig()) -> SeriesFigures:
    """Keyframes and figures of every episode file in `videos` (named by file stem).

    One bad file never stops the others. Episodes share one near-duplicate index, so the
    opening and ending that every episode repeats are kept once."""
    duplicates = NearDuplicateIndex(keyframe_config.phash_max_distance)
    tables, rows = [], []
    for video in videos:
        row, table = episode_result(video, models, keyframe_config, figure_config, duplicates)
        rows.append(row)
        if table is not None:
            tables.append(table)
    return SeriesFigures(FigureTable.concat(tables), pd.DataFrame(rows, columns=EPISODE_COLUMNS))
