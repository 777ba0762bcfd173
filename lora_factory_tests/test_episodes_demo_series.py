"""The demo series end to end: episodes -> keyframes -> figures -> identity clusters ->
binding, scored against the series' ground truth; bad files beside good ones."""


import numpy as np
import pytest
from conftest import tiny_models_on_one_core

from lora_factory.demo.episodes import (
    DEMO_FIGURE_CONFIG,
    LOOK_ALIKES,
    EpisodeTruth,
    SeriesConfig,
    generate_episode,
    generate_series,
    measure_series,
)
from lora_factory.episodes.decode import EpisodeReader
from lora_factory.episodes.figures import FIGURE_COLUMNS, FigureConfig, cut_crops, series_figures
from lora_factory.episodes.keyframes import KeyframeConfig

KEYFRAMES = KeyframeConfig(decoder_threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from tiny_models_on_one_core(tmp_path_factory)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    generate_series(folder, episodes=3, seed=0)
    return folder


def test_the_series_reaches_its_targets(series, models):
    measurement = measure_series(series, models, KEYFRAMES)
    print(measurement.report())
    assert measurement.appearances >= 20
    assert measurement.appearance_recall >= 0.9
    table = measurement.per_character.set_index("character")
    assert (table["figures"] >= 5).all(), table
    assert (table["purity"] >= 0.95).all(), table
    assert (table["recall"] >= 0.90).all(), table
    assert measurement.look_alikes_apart
    # Each character's reference pictures bind to its own cluster.
    assert (table["bound_cluster"] == table["cluster"]).all(), table
    assert len(set(table.loc[list(LOOK_ALIKES), "cluster"])) == 2


def test_figure_rows_hold_boxes_vectors_and_crops_that_can_be_cut_again(series, models):
    truth = EpisodeTruth.load(series / "ep01.json")
    config = FigureConfig(min_crop_side=DEMO_FIGURE_CONFIG.min_crop_side, keep_images=True)
    result = series_figures([series / "ep01.mkv"], models, KEYFRAMES, config)
    figures = result.table.figures
    assert list(figures.columns) == FIGURE_COLUMNS and len(figures) > 5
    assert result.table.vectors.shape == (len(figures), models.identity.dim)
    assert np.array_equal(np.stack(figures["identity"]), result.table.vectors)
    for row in figures.itertuples():
        x0, y0, x1, y1 = row.person_box
        assert 0 <= x0 < x1 <= truth.width and 0 <= y0 < y1 <= truth.height
        if row.head_box is not None:  # the squared head crop sits at the top of the figure
            assert row.head_box[1] <= y0 + (y1 - y0) * 0.3
    # Crops cut again from the video are the crops that were embedded.
    again = {(label, kind): image for label, kind, image in cut_crops(series / "ep01.mkv", figures.head(4))}
    for label in figures.index[:4]:
        assert np.array_equal(np.asarray(again[label, "full"]), np.asarray(result.table.images[label]))
    assert result.episodes.loc[0, "status"] == "ok"


def test_bad_files_are_reported_and_the_good_episodes_still_processed(series, tmp_path, models):
    good = series / "ep02.mkv"
    empty = tmp_path / "ep90_empty.mkv"
    empty.write_bytes(b"")
    junk = tmp_path / "ep91_junk.mkv"
    junk.write_bytes(b"<html>not found</html>" * 100)
    whole = good.read_bytes()
    truncated = tmp_path / "ep92_truncated.mkv"
    truncated.write_bytes(whole[: len(whole) // 2])
    result = series_figures([empty, junk, truncated, good], models, KEYFRAMES, DEMO_FIGURE_CONFIG)
    status = result.episodes.set_index("episode")
    assert status.loc["ep90_empty", ["status", "reason"]].tolist() == ["rejected", "empty"]
    assert status.loc["ep91_junk", ["status", "reason"]].tolist() == ["rejected", "not_media"]
    assert status.loc["ep92_truncated", "status"] == "damaged" and "truncated" in status.loc["ep92_truncated", "reason"]
    assert status.loc["ep02", "status"] == "ok" and status.loc["ep02", "figures"] > 0
    # The truncated copy's frames are near duplicates of ep02's: ep02 is seen after it
    # and still gives the figures of its second half.
    assert set(result.table.figures["episode"]) <= {"ep92_truncated", "ep02"}


def test_a_seed_always_gives_the_same_episode(tmp_path):
    config = SeriesConfig(shots=2, audio=False)
    first = generate_episode(tmp_path / "a", "ep01", seed=5, config=config)
    second = generate_episode(tmp_path / "b", "ep01", seed=5, config=config)
    assert (tmp_path / "a" / "ep01.json").read_bytes() == (tmp_path / "b" / "ep01.json").read_bytes()
    # Matroska writes a random segment id: the pictures are what must be equal.
    pictures = [[frame.grey_thumbnail(96, 54) for frame in EpisodeReader(video)] for video in (first, second)]
    assert len(pictures[0]) == len(pictures[1]) and all(np.array_equal(a, b) for a, b in zip(*pictures))
    other = generate_episode(tmp_path / "c", "ep01", seed=6, config=config)
    assert (tmp_path / "c" / "ep01.json").read_bytes() != (tmp_path / "a" / "ep01.json").read_bytes()
    assert other.stat().st_size > 0
