"""Keyframe selection keeps a frame of every shot and skips near-identical frames, with
every skipped frame counted by reason."""

from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from lora_factory.cleaning.dedup import NearDuplicateIndex
from lora_factory.demo.episodes import EpisodeTruth, SeriesConfig, generate_episode
from lora_factory.episodes.keyframes import (
    SKIP_REASONS,
    EpisodeKeyframes,
    KeyframeConfig,
    choose_mode,
    keyframe_gaps,
)

CONFIG = KeyframeConfig(decoder_threads=1)


@pytest.fixture(scope="module")
def episode(tmp_path_factory) -> tuple[Path, EpisodeTruth]:
    folder = tmp_path_factory.mktemp("series")
    video = generate_episode(folder, "ep01", seed=3, config=SeriesConfig(shots=5))
    return video, EpisodeTruth.load(folder / "ep01.json")


def test_every_shot_with_figures_has_a_kept_frame_showing_them_whole(episode):
    video, truth = episode
    selection = EpisodeKeyframes(video, CONFIG)
    kept = list(selection)
    assert selection.mode == "all"  # 2 s between keyframes: too sparse for keyframes only
    assert selection.frames_decoded == len(truth.times)
    # Each skipped frame has a reason, and together they account for every frame.
    assert sum(selection.skipped.values()) + len(kept) == selection.frames_decoded
    assert set(selection.skipped) <= set(SKIP_REASONS)
    assert len(kept) < 0.15 * len(truth.times)
    for appearance in truth.appearances:
        whole = [k for k in kept if any(f[0] == appearance["id"] and f[-1] == 1.0 for f in truth.figures[k.index])]
        assert whole, f"no kept frame shows appearance {appearance} whole"
    for k in kept:
        assert k.image.size == (truth.width, truth.height)
        assert k.time == pytest.approx(truth.times[k.index], abs=1e-3)
    # Inside a shot kept frames are at least the minimum interval apart.
    starts = [shot["start_frame"] for shot in truth.shots]
    for before, after in pairwise(kept):
        same_shot = np.searchsorted(starts, before.index, "right") == np.searchsorted(starts, after.index, "right")
        if same_shot and after.trigger == "change":
            assert after.time - before.time >= CONFIG.min_interval_s - 1e-6


def test_a_series_shares_its_near_duplicate_index(episode):
    """The second airing of the same episode (an opening every episode repeats) adds nothing."""
    video, _ = episode
    duplicates = NearDuplicateIndex()
    first = EpisodeKeyframes(video, CONFIG, duplicates)
    kept_first = len(list(first))
    again = EpisodeKeyframes(video, CONFIG, duplicates)
    assert kept_first > 0 and list(again) == []
    assert again.skipped["near_duplicate"] == kept_first


def write_frames(path: Path, pictures: list[np.ndarray], keyframe_interval: int, scene_cuts: bool = True) -> Path:
    """H.264 with a keyframe every `keyframe_interval` frames (and at scene cuts, as x264
    does, unless `scene_cuts` is off)."""
    height, width = pictures[0].shape[:2]
    options = {"g": str(keyframe_interval), "preset": "ultrafast", **({} if scene_cuts else {"sc_threshold": "0"})}
    with av.open(str(path), mode="w", format="matroska") as output:
        stream = output.add_stream("libx264", rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for picture in pictures:
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def test_fades_are_skipped_as_blank_and_a_still_shot_is_kept_once(tmp_path):
    rng = np.random.default_rng(0)
    black = np.zeros((72, 128, 3), dtype=np.uint8)
    still = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
    video = write_frames(tmp_path / "fade.mkv", [black] * 12 + [still] * 36, keyframe_interval=250)
    selection = EpisodeKeyframes(video, CONFIG)
    kept = list(selection)
    assert [k.index for k in kept] == [12] and kept[0].trigger == "cut"
    assert selection.skipped["blank"] == 12
    assert selection.skipped["near_identical"] == 35


def test_auto_mode_decodes_keyframes_only_when_they_are_dense(tmp_path):
    rng = np.random.default_rng(1)
    # A new picture every 6 frames (a quarter second), so content changes often.
    pictures = [rng.integers(0, 256, (9, 16, 3), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
                for _ in range(8)]
    frames = [pictures[i // 6] for i in range(48)]
    dense = write_frames(tmp_path / "dense.mkv", frames, keyframe_interval=12)
    sparse = write_frames(tmp_path / "sparse.mkv", frames, keyframe_interval=250, scene_cuts=False)
    assert max(keyframe_gaps(dense)) <= 0.5 + 1e-6
    assert keyframe_gaps(sparse) == []  # one keyframe at the start
    assert choose_mode(dense, KeyframeConfig()) == "keyframes"
    assert choose_mode(sparse, KeyframeConfig()) == "all"
    assert choose_mode(dense, KeyframeConfig(mode="all")) == "all"
    fast = EpisodeKeyframes(dense, CONFIG)
    kept = list(fast)
    assert fast.mode == "keyframes" and fast.frames_decoded < 48
    assert all(k.index % 6 == 0 for k in kept)
    with pytest.raises(ValueError, match="mode must be one of"):
        KeyframeConfig(mode="every")
