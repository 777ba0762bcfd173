"""A synthetic anime series: the demo world's characters animated into short episodes.

Each episode is a run of shots separated by hard cuts. A shot has a scenery background,
a static or panning camera and up to three characters, each standing in its own lane,
walking in from the frame's edge or walking out of it (so figures are cut by the frame
edge on the way), with a two-pose walk cycle. The cast is the demo characters plus
Midori, Kaede's look-alike: same hair, outfit and build, only her eyes differ.

Figures are drawn by the demo booru's own drawing code, which is what the tiny vision
models recognise. Scenery uses only the two demo background colours, because the tiny
detectors take every other colour for a figure. Everything random comes from the seed,
so a seed always gives the same episodes and the same ground truth.

Encoding: H.264 (libx264) in Matroska with a silent AAC track, as fansub releases are.
Chroma is kept at full resolution (4:4:4): the demo figures' eyes are 3-5 px wide at
these sizes and 4:2:0 subsampling washes their colour into the skin, which the tiny face
detector (it looks for eye colour) then misses; at real episode sizes eyes are many
pixels wide. Builds without libx264 fall back to MPEG-4 Part 2 (4:2:0, fewer faces).

Ground truth (`<episode>.json`, see `EpisodeTruth`): per frame, the time and every
visible figure's appearance id, full and head boxes clipped to the frame, and the share
of the figure inside the frame.

`measure_series` runs the episode chain (keyframes, figures, identity clusters, binding)
over a generated series and scores it against that truth; `print_series_measurements`
does it all in a temporary folder and prints the report.
"""

from __future__ import annotations

import fractions
import json
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import av
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from lora_factory.cleaning.crops import iou
from lora_factory.demo.characters import DEMO_CHARACTERS, DemoCharacter
from lora_factory.demo.drawing import (
    Box,
    DrawnFigure,
    FigurePlacement,
    draw_figure,
    draw_post,
    figure_shapes,
    width_ratio,
)
from lora_factory.demo.palette import BACKGROUNDS
from lora_factory.demo.poses import random_pose
from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
from lora_factory.episodes.clusters import NOISE, BindingError, ClusterConfig, bind_cluster, cluster_identities
from lora_factory.episodes.figures import FigureConfig, series_figures
from lora_factory.episodes.keyframes import KeyframeConfig
from lora_factory.storage import atomic_output, atomic_write_json
from lora_factory.vision.models import VisionModels

KAEDE = next(c for c in DEMO_CHARACTERS if c.key == "kaede_starlight_academy")
# Kaede in every way but her eyes.
MIDORI = replace(KAEDE, key="midori_starlight_academy", display_name="Midori",
                 booru_tag="midori_(starlight_academy)", eyes="red_eyes", posts=0)
SERIES_CHARACTERS: tuple[DemoCharacter, ...] = (*DEMO_CHARACTERS, MIDORI)
LOOK_ALIKES = (KAEDE.key, MIDORI.key)

SAMPLE_RATE = 16000  # the silent audio track's
# The series' 384x216 frames are a fifth of 1080p: crops need half cleaning's 64 px.
DEMO_FIGURE_CONFIG = FigureConfig(min_crop_side=32)


@dataclass(frozen=True)
class SeriesConfig:
    """How each episode of the demo series looks; defaults keep an episode ~1 s to make."""

    size: tuple[int, int] = (384, 216)
    fps: int = 24
    shots: int = 6
    shot_seconds: tuple[float, float] = (1.5, 2.5)
    max_cast: int = 3
    # Figures are this share of the frame's height tall (the tiny face detector needs
    # faces of about 20 px).
    figure_height: tuple[float, float] = (0.72, 0.92)
    pan_share: float = 0.5  # shots with a panning camera
    walk_share: float = 0.35  # figures that walk in or out rather than stand
    empty_shot_share: float = 0.1  # shots of scenery only
    crf: int = 18
    keyframe_interval: int = 48  # frames; x264 also puts a keyframe at every cut
    audio: bool = True

    def __post_init__(self) -> None:
        width, height = self.size
        if width % 2 or height % 2 or min(width, height) < 64:
            raise ValueError(f"episode size must be even and at least 64 px, got {self.size}")
        if not 1 <= self.max_cast <= 3:
            raise ValueError("max_cast must be 1..3: lanes are a third of a frame wide")


@dataclass
class _Actor:
    """One appearance: a character in one shot, with its sprites and path."""

    appearance: int
    character: DemoCharacter
    sprites: list[tuple[Image.Image, DrawnFigure]]  # walk-cycle poses, boxes relative to the sprite
    top: int
    path: list[float]  # world x of the sprite's left edge at every frame of the shot
    motion: str


@dataclass
class _Shot:
    start_frame: int
    frames: int
    background: str
    scenery: Image.Image  # the world, wider than the frame when the camera pans
    camera: list[int]  # frame's left edge in the world, per frame
    actors: list[_Actor] = field(default_factory=list)


@dataclass(frozen=True)
class EpisodeTruth:
    """Ground truth of one generated episode (the JSON file's content)."""

    episode: str
    video: str
    fps: int
    width: int
    height: int
    characters: dict[str, str]  # character key -> eye colour (tells look-alikes apart)
    shots: list[dict]  # start_frame, frames, background, camera ("static" | "pan")
    appearances: list[dict]  # id, character, shot, motion, first_frame, last_frame
    times: list[float]  # presentation time of every frame
    # Per frame: [appearance, x0, y0, x1, y1, hx0, hy0, hx1, hy1, visible share] per figure.
    figures: list[list[list[float]]]

    @classmethod
    def load(cls, path: Path | str) -> EpisodeTruth:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def character_of(self, appearance: int) -> str:
        return self.appearances[appearance]["character"]


def _sprite(character: DemoCharacter, outfit: tuple[str, ...], height: int,
            rng: random.Random) -> tuple[Image.Image, DrawnFigure]:
    """One figure drawn on its own transparent canvas, with boxes relative to it."""
    shapes = figure_shapes(character, outfit, random_pose(rng))
    width = max(1, round(height * width_ratio(shapes)))
    canvas = Image.new("RGBA", (width + 1, height + 1), (0, 0, 0, 0))
    drawn = draw_figure(canvas, character, outfit, shapes, FigurePlacement(0, 0, height, width))
    return canvas, drawn


def _scenery(size: tuple[int, int], base: str, rng: random.Random) -> Image.Image:
    """A backdrop in the two background colours: a ground band and some windows."""
    other = next(name for name in BACKGROUNDS if name != base)
    image = Image.new("RGB", size, BACKGROUNDS[base])
    draw = ImageDraw.Draw(image)
    width, height = size
    ground = round(height * rng.uniform(0.7, 0.85))
    draw.rectangle((0, ground, width, height), fill=BACKGROUNDS[other])
    for _ in range(rng.randint(2, 2 + width // 120)):
        w, h = rng.randint(width // 20, width // 8), rng.randint(height // 8, height // 3)
        x, y = rng.randint(0, width - w), rng.randint(0, max(0, ground - h - 4))
        draw.rectangle((x, y, x + w, y + h), fill=BACKGROUNDS[other])
    return image


def _plan_shot(start_frame: int, first_appearance: int, config: SeriesConfig, rng: random.Random) -> _Shot:
    width, height = config.size
    frames = round(rng.uniform(*config.shot_seconds) * config.fps)
    pans = rng.random() < config.pan_share
    world_width = round(width * rng.uniform(1.3, 1.6)) if pans else width
    background = rng.choice(sorted(BACKGROUNDS))
    if pans:
        start, end = (0, world_width - width) if rng.random() < 0.5 else (world_width - width, 0)
        camera = [round(start + (end - start) * i / max(1, frames - 1)) for i in range(frames)]
    else:
        camera = [0] * frames
    shot = _Shot(start_frame, frames, background, _scenery((world_width, height), background, rng), camera)
    if rng.random() < config.empty_shot_share:
        return shot
    cast = rng.sample(SERIES_CHARACTERS, rng.randint(1, config.max_cast))
    lane_width = world_width / len(cast)
    for lane, character in enumerate(cast):
        outfit = character.outfits[rng.randrange(len(character.outfits))]
        figure_height = round(rng.uniform(*config.figure_height) * height)
        sprites = [_sprite(character, outfit, figure_height, rng) for _ in range(2)]
        sprite_width = max(sprite.width for sprite, _ in sprites)
        # Lanes keep figures apart: a lane is a third of the world at least.
        slack = max(0.0, lane_width - sprite_width - 4)
        home = lane * lane_width + 2 + rng.uniform(0, slack)
        top = rng.randint(0, max(0, height - figure_height - 1))
        motion = "stand"
        edge_lane = lane in (0, len(cast) - 1)
        if edge_lane and rng.random() < config.walk_share:
            motion = rng.choice(("walk_in", "walk_out"))
        path = _walk_path(motion, home, sprite_width, lane == 0, camera, width)
        shot.actors.append(_Actor(first_appearance + len(shot.actors), character, sprites, top, path, motion))
    return shot


def _walk_path(motion: str, home: float, sprite_width: int, from_left: bool,
               camera: Sequence[int], frame_width: int) -> list[float]:
    """World x of a figure per frame: standing at `home`, or walking between `home` and
    just outside the frame edge on its side during 40% of the shot."""
    frames = len(camera)
    if motion == "stand":
        return [home] * frames
    walk = max(2, round(frames * 0.4))
    if motion == "walk_in":
        outside = camera[0] - sprite_width if from_left else camera[0] + frame_width
        return [outside + (home - outside) * min(1.0, i / walk) for i in range(frames)]
    outside = camera[-1] - sprite_width if from_left else camera[-1] + frame_width
    leave = frames - walk
    return [home + (outside - home) * max(0.0, (i - leave) / (walk - 1)) for i in range(frames)]


def _episode_plan(config: SeriesConfig, rng: random.Random) -> list[_Shot]:
    shots, frame, appearances = [], 0, 0
    for _ in range(config.shots):
        shot = _plan_shot(frame, appearances, config, rng)
        shots.append(shot)
        frame += shot.frames
        appearances += len(shot.actors)
    return shots


def _clip(box: Box, offset_x: int, offset_y: int, size: tuple[int, int]) -> Box:
    x0, y0, x1, y1 = box
    return (max(0, x0 + offset_x), max(0, y0 + offset_y), min(size[0], x1 + offset_x), min(size[1], y1 + offset_y))


def _render(shot: _Shot, config: SeriesConfig) -> Iterator[tuple[Image.Image, list[list[float]]]]:
    """Every frame of a shot and the figures visible in it."""
    width, height = config.size
    step = max(1, config.fps // 4)  # four walk-cycle poses a second
    for i in range(shot.frames):
        frame = shot.scenery.crop((shot.camera[i], 0, shot.camera[i] + width, height))
        figures = []
        for actor in shot.actors:
            moving = actor.motion != "stand" and (i == 0 or actor.path[i] != actor.path[i - 1])
            sprite, drawn = actor.sprites[(i // step) % 2 if moving else 0]
            left = round(actor.path[i]) - shot.camera[i]
            frame.paste(sprite, (left, actor.top), sprite)
            box = _clip(drawn.box, left, actor.top, config.size)
            if box[2] <= box[0] or box[3] <= box[1]:  # entirely outside the frame
                continue
            visible = (box[2] - box[0]) * (box[3] - box[1])
            whole = (drawn.box[2] - drawn.box[0]) * (drawn.box[3] - drawn.box[1])
            head = _clip(drawn.head_box, left, actor.top, config.size)
            figures.append([actor.appearance, *box, *head, round(visible / whole, 3)])
        yield frame, figures


def _encoder(config: SeriesConfig) -> tuple[str, str, dict[str, str]]:
    if "libx264" in av.codecs_available:
        options = {"crf": str(config.crf), "preset": "veryfast", "g": str(config.keyframe_interval)}
        return "libx264", "yuv444p", options
    return "mpeg4", "yuv420p", {"qscale": "2", "g": str(config.keyframe_interval)}


def _write_video(path: Path, frames: Iterator[Image.Image], config: SeriesConfig) -> None:
    codec, pixel_format, options = _encoder(config)
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="matroska") as output:
        video = output.add_stream(codec, rate=config.fps, options=options)
        video.width, video.height = config.size
        video.pix_fmt = pixel_format
        audio = output.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if config.audio else None
        count = 0
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_image(image)):
                output.mux(packet)
            count += 1
        for packet in video.encode():
            output.mux(packet)
        if audio is not None:
            _silence(output, audio, count / config.fps)


def _silence(output: av.container.OutputContainer, audio: av.stream.Stream, seconds: float) -> None:
    samples = 1024
    for start in range(0, round(seconds * SAMPLE_RATE), samples):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, start
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        for packet in audio.encode(frame):
            output.mux(packet)
    for packet in audio.encode():
        output.mux(packet)


def generate_episode(folder: Path | str, name: str, seed: int, config: SeriesConfig = SeriesConfig()) -> Path:
    """Write `<name>.mkv` and its ground truth `<name>.json` into `folder`; returns the video."""
    folder = Path(folder)
    rng = random.Random(f"demo-episode:{seed}")
    shots = _episode_plan(config, rng)
    truth_frames: list[list[list[float]]] = []

    def frames() -> Iterator[Image.Image]:
        for shot in shots:
            for image, figures in _render(shot, config):
                truth_frames.append(figures)
                yield image

    video = folder / f"{name}.mkv"
    _write_video(video, frames(), config)
    appearances = []
    for shot_index, shot in enumerate(shots):
        for actor in shot.actors:
            seen = [i for i, figures in enumerate(truth_frames) if any(f[0] == actor.appearance for f in figures)]
            appearances.append({
                "id": actor.appearance, "character": actor.character.key, "shot": shot_index,
                "motion": actor.motion, "first_frame": min(seen, default=None), "last_frame": max(seen, default=None),
            })  # fmt: skip
    truth = EpisodeTruth(
        episode=name,
        video=video.name,
        fps=config.fps,
        width=config.size[0],
        height=config.size[1],
        characters={c.key: c.eyes for c in SERIES_CHARACTERS},
        shots=[{"start_frame": s.start_frame, "frames": s.frames, "background": s.background,
                "camera": "pan" if s.camera[0] != s.camera[-1] else "static"} for s in shots],
        appearances=appearances,
        times=[round(i / config.fps, 6) for i in range(len(truth_frames))],
        figures=truth_frames,
    )
    atomic_write_json(folder / f"{name}.json", truth.__dict__)
    return video


def generate_series(folder: Path | str, episodes: int = 3, seed: int = 0,
                    config: SeriesConfig = SeriesConfig()) -> list[Path]:
    """`episodes` episodes named ep01, ep02, ... (videos and truth files) in `folder`."""
    return [generate_episode(folder, f"ep{number:02d}", seed * 1000 + number, config)
            for number in range(1, episodes + 1)]


# The series the demo factory trains from: frames big enough that cleaning's 64 px crops
# survive, and enough shots that every character appears in several episodes.
FACTORY_SERIES_CONFIG = SeriesConfig(size=(768, 432), shots=8)
FACTORY_SERIES_EPISODES = 4


def demo_factory_series(folder: Path | str) -> list[Path]:
    """The demo factory's series (FACTORY_SERIES_CONFIG, seed 0), made once into `folder`
    (atomically: a crash never leaves half a series); returns its episode files."""
    folder = Path(folder)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            generate_series(staging, FACTORY_SERIES_EPISODES, seed=0, config=FACTORY_SERIES_CONFIG)
            try:
                staging.replace(folder)
            except OSError:
                if not folder.is_dir():  # not another process's finished series: a real error
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(folder.glob("*.mkv"))


def still_shots_episode(path: Path | str, minutes: float = 24.0, size: tuple[int, int] = (1920, 1080),
                        fps: int = 24, shot_seconds: float = 4.0, seed: int = 0) -> Path:
    """A long episode that is cheap to make: every shot is one still picture of demo
    figures, cut every `shot_seconds` (for memory and throughput measurements)."""
    path = Path(path)
    rng = random.Random(f"still-shots:{seed}")
    total = round(minutes * 60 * fps)
    per_shot = max(1, round(shot_seconds * fps))
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="matroska") as output:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        # ultrafast turns scene-cut detection off; real encodes put a keyframe at every cut.
        options = {"preset": "ultrafast", "crf": "23", "sc_threshold": "40"} if codec == "libx264" else {"qscale": "4"}
        video = output.add_stream(codec, rate=fps, options=options)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        for start in range(0, total, per_shot):
            cast = rng.sample(SERIES_CHARACTERS, rng.randint(1, 3))
            picture = draw_post([(c, 0) for c in cast], size, rng, rng.choice(sorted(BACKGROUNDS))).image
            still = av.VideoFrame.from_image(picture).reformat(format="yuv420p")
            for index in range(start, min(total, start + per_shot)):
                still.pts = index
                for packet in video.encode(still):
                    output.mux(packet)
        for packet in video.encode():
            output.mux(packet)
    return path


# ------------------------------------------------------------------ measurements
MATCH_IOU = 0.5  # a detected figure is a ground-truth figure when their boxes overlap this much


def match_figures(figures: pd.DataFrame, truth: EpisodeTruth) -> pd.DataFrame:
    """For each detected figure of one episode: the ground-truth appearance and character
    it shows (None when it matches no drawn figure), by box overlap in the frame shown
    at its time."""
    times = np.asarray(truth.times)
    appearance, character, overlap = [], [], []
    for row in figures.itertuples():
        frame = int(np.abs(times - row.time).argmin())
        best, best_iou = None, 0.0
        for drawn in truth.figures[frame]:
            score = iou(row.person_box, drawn[1:5])
            if score > best_iou:
                best, best_iou = int(drawn[0]), score
        matched = best_iou >= MATCH_IOU
        appearance.append(best if matched else None)
        character.append(truth.character_of(best) if matched else None)
        overlap.append(best_iou)
    return pd.DataFrame({"appearance": appearance, "character": character, "iou": overlap}, index=figures.index)


@dataclass
class SeriesMeasurement:
    appearances: int  # ground-truth appearances in the series
    appearances_reached: int  # ... with at least one figure that reached a crop
    per_character: pd.DataFrame  # character, figures, cluster, recall, purity, bound_cluster
    clusters: pd.DataFrame  # cluster table with the majority character and its share
    look_alikes_apart: bool
    episode_summaries: pd.DataFrame  # keyframe and figure counts per episode
    figure_drops: dict[str, int]

    @property
    def appearance_recall(self) -> float:
        return self.appearances_reached / max(1, self.appearances)

    def report(self) -> str:
        lines = [
            f"appearances reaching a crop: {self.appearances_reached}/{self.appearances} ({self.appearance_recall:.3f})",
            f"look-alikes {' / '.join(LOOK_ALIKES)} in different clusters: {self.look_alikes_apart}",
            f"figure drops by reason: {self.figure_drops}",
            "", "per episode:", self.episode_summaries.to_string(index=False),
            "", "per character:", self.per_character.to_string(index=False),
            "", "clusters:", self.clusters.to_string(index=False),
        ]
        return "\n".join(lines)


def reference_vectors(character: DemoCharacter, models: VisionModels, count: int = 4, seed: int = 0) -> np.ndarray:
    """Identity vectors of solo pictures of `character` drawn afresh (its 'reference images')."""
    rng = random.Random(f"references:{character.key}:{seed}")
    pictures = [draw_post([(character, i % len(character.outfits))], (240, 320), rng).image for i in range(count)]
    return np.asarray(models.identity.embed(pictures), dtype=np.float32)


def measure_series(folder: Path | str, models: VisionModels,
                   keyframe_config: KeyframeConfig = KeyframeConfig(),
                   figure_config: FigureConfig = DEMO_FIGURE_CONFIG,
                   cluster_config: ClusterConfig = ClusterConfig()) -> SeriesMeasurement:
    """Run keyframes -> figures -> clusters -> binding over every episode in `folder`
    (made by `generate_series`) and score the result against the ground truth."""
    truths = {t.episode: t for t in map(EpisodeTruth.load, sorted(Path(folder).glob("*.json")))}
    result = series_figures([Path(folder) / t.video for t in truths.values()], models, keyframe_config, figure_config)
    figures = result.table.figures
    matched = [match_figures(rows, truths[episode]) for episode, rows in figures.groupby("episode")]
    truth_of = pd.concat(matched).reindex(figures.index) if matched else pd.DataFrame(
        {"appearance": [], "character": [], "iou": []})
    appearances = sum(a["first_frame"] is not None for t in truths.values() for a in t.appearances)
    reached = {(episode, appearance) for episode, appearance in zip(figures["episode"], truth_of["appearance"])
               if pd.notna(appearance)}

    clusters = cluster_identities(result.table.vectors, models.identity, cluster_config)
    labels = pd.Series(clusters.labels, index=figures.index)
    cluster_rows = []
    for row in clusters.table.itertuples():
        members = truth_of["character"][labels == row.cluster]
        counts = members.value_counts()  # figures matching no drawn figure count as impure
        cluster_rows.append({"cluster": row.cluster, "size": row.size, "purity_estimate": round(row.purity, 3),
                             "majority": counts.index[0] if len(counts) else None,
                             "purity": round(float(counts.iloc[0] / len(members)), 3) if len(counts) else 0.0})
    cluster_table = pd.DataFrame(cluster_rows, columns=["cluster", "size", "purity_estimate", "majority", "purity"])
    purity_of = cluster_table.set_index("cluster")["purity"]

    per_character = []
    for character in SERIES_CHARACTERS:
        mine = labels[truth_of["character"] == character.key]
        clustered = mine[mine != NOISE]
        # A character's cluster is the one holding most of its figures.
        best = int(clustered.value_counts().index[0]) if len(clustered) else NOISE
        try:
            bound: int | str = bind_cluster(reference_vectors(character, models), clusters).cluster
        except BindingError as error:
            bound = f"error: {error}"
        per_character.append({"character": character.key, "figures": len(mine), "cluster": best,
                              "recall": round(float((mine == best).mean()), 3) if len(mine) else 0.0,
                              "purity": float(purity_of.get(best, 0.0)), "bound_cluster": bound})
    per_character = pd.DataFrame(per_character)
    chosen = per_character.set_index("character")["cluster"]
    first, second = (chosen[key] for key in LOOK_ALIKES)
    return SeriesMeasurement(
        appearances=appearances,
        appearances_reached=len(reached),
        per_character=per_character,
        clusters=cluster_table,
        look_alikes_apart=bool(first != second and NOISE not in (first, second)),
        episode_summaries=result.episodes,
        figure_drops={k: v for k, v in sorted(result.table.counts.items()) if k not in ("frames", "figures")},
    )


def print_series_measurements(episodes: int = 3, seed: int = 0, config: SeriesConfig = SeriesConfig()) -> SeriesMeasurement:
    """Generate a demo series in a temporary folder, measure it with the tiny models and
    print the report (appearance recall, cluster purity and recall per character)."""
    with tempfile.TemporaryDirectory(prefix="demo-series-") as scratch:
        folder = Path(scratch)
        generate_series(folder / "series", episodes, seed, config)
        registry = tiny_registry(folder / "models", hf_cache_dir=folder / "hf")
        models = VisionModels.load(registry, names=TINY_MODELS)
        measurement = measure_series(folder / "series", models)
    print(measurement.report())
    return measurement
