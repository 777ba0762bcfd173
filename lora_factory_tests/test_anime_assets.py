"""Anime episodes as a source, as Dagster runs it: a series' figures and identity clusters,
then a demo character bound to its cluster, whose figures are cleaned with its web posts."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from lora_factory.demo.deployment import DEMO_SERIES, TINY_BASE_MODEL, demo_resources
from lora_factory.demo.episodes import KAEDE, MIDORI, EpisodeTruth, SeriesConfig, generate_episode, match_figures
from lora_factory.resources import AnimeSeries, FactoryStorage
from lora_factory.storage import read_table
from test_factory_chain import ASSETS, metadata_by_asset

SERIES = DEMO_SERIES  # the demo index binds Kaede to it; here made of small episodes
CHARACTER = KAEDE.key
# Small frames keep the test quick: crops of half cleaning's 64 px.
RUN_CONFIG = {"ops": {"series_figures": {"config": {"min_crop_side": 32}}}}
EPISODE = SeriesConfig(shots=8)


def materialize(instance, home: Path, folder: Path, partition: str, selection: list[str], run_config=None):
    resources = {
        "storage": FactoryStorage(home=str(home)),
        **demo_resources(base_model=TINY_BASE_MODEL),
        "anime_series": AnimeSeries(series={SERIES: str(folder)}),
    }
    return dg.materialize(
        ASSETS, partition_key=partition, instance=instance, resources=resources,
        selection=selection, run_config=run_config, raise_on_error=False,
    )  # fmt: skip


def log_messages(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Two demo episodes and four bad files, built into a home; then Kaede bound to it."""
    folder = tmp_path_factory.mktemp("episodes")
    for number in (1, 2):
        generate_episode(folder, f"ep0{number}", seed=number, config=EPISODE)
    (folder / "ep90_empty.mkv").write_bytes(b"")
    (folder / "ep91_junk.mp4").write_bytes(b"<html>not found</html>" * 100)
    whole = (folder / "ep02.mkv").read_bytes()
    (folder / "ep92_truncated.mkv").write_bytes(whole[: len(whole) // 2])
    shutil.copyfile(folder / "ep02.json", folder / "ep92_truncated.json")  # its frames are ep02's
    (folder / "notes.txt").write_text("not an episode")
    home = tmp_path_factory.mktemp("home")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("series", [SERIES])
        instance.add_dynamic_partitions("characters", [CHARACTER])
        built = materialize(instance, home, folder, SERIES, ["series_figures", "series_clusters"], RUN_CONFIG)
        bound = materialize(instance, home, folder, CHARACTER, ["raw_scrape", "matched_tags", "anime_posts"])
        yield instance, home, folder, built, bound


def test_every_episode_file_is_processed_or_quarantined_with_its_reason(series):
    _, home, _, built, _ = series
    assert built.success
    episodes = read_table(home / "tables" / "series_figures" / f"{SERIES}.episodes.parquet").set_index("episode")
    assert sorted(episodes.index) == ["ep01", "ep02", "ep90_empty", "ep91_junk", "ep92_truncated"]  # not notes.txt
    assert episodes.loc["ep90_empty", ["status", "reason"]].tolist() == ["rejected", "empty"]
    assert episodes.loc["ep91_junk", ["status", "reason"]].tolist() == ["rejected", "not_media"]
    assert episodes.loc["ep92_truncated", "status"] == "damaged" and "truncated" in episodes.loc["ep92_truncated", "reason"]
    assert (episodes.loc[["ep01", "ep02"], "status"] == "ok").all()
    metadata = metadata_by_asset(built)["series_figures"]
    assert metadata["quarantined_episodes"] == 2 and metadata["damaged_episodes"] == 1
    assert metadata["frames_kept"] < metadata["frames_decoded"] / 5  # near-identical frames skipped


def characters_of(figures: pd.DataFrame, folder: Path) -> pd.Series:
    """The ground-truth character each detected figure shows (None: no drawn figure there)."""
    return pd.concat(
        [match_figures(figures[figures["episode"] == e], EpisodeTruth.load(folder / f"{e}.json"))["character"]
         for e in sorted(set(figures["episode"]))]
    ).reindex(figures.index)  # fmt: skip


def test_figures_cluster_by_identity_and_look_alikes_stay_apart(series):
    _, home, folder, built, _ = series
    figures = read_table(home / "tables" / "series_figures" / f"{SERIES}.parquet")
    labels = read_table(home / "tables" / "series_clusters" / f"{SERIES}.labels.parquet")["cluster"]
    owners = pd.DataFrame({"character": characters_of(figures, folder), "cluster": labels.to_numpy()})
    assert owners["character"].notna().mean() >= 0.95  # figures are where the truth drew them
    clustered = owners[owners["cluster"] >= 0]
    purity = clustered.groupby("cluster")["character"].agg(lambda c: c.value_counts(normalize=True).iloc[0])
    assert (purity >= 0.95).all(), purity
    kaede = set(clustered.loc[clustered["character"] == KAEDE.key, "cluster"])
    midori = set(clustered.loc[clustered["character"] == MIDORI.key, "cluster"])
    assert kaede and midori and not kaede & midori  # the look-alikes differ only in eye colour
    assert metadata_by_asset(built)["series_clusters"]["dagster/row_count"] == clustered["cluster"].nunique()


def test_the_character_is_bound_to_its_own_cluster_with_the_evidence(series):
    _, home, folder, _, bound = series
    assert bound.success
    posts = read_table(home / "tables" / "anime_posts" / f"{CHARACTER}.posts.parquet")
    assert len(posts) and set(posts["site"]) == {f"anime:{SERIES}"}
    figures = read_table(home / "tables" / "series_figures" / f"{SERIES}.parquet")
    shown = characters_of(figures[figures["context_sha256"].isin(posts["sha256"])], folder)
    assert (shown == KAEDE.key).mean() >= 0.95, shown.value_counts()
    evidence = metadata_by_asset(bound)["anime_posts"]["binding_evidence"]
    assert evidence.count("| yes |") == 1  # exactly one cluster matched her web posts' look


def test_a_new_episode_is_the_only_one_processed(series, tmp_path):
    instance, home, folder, _, _ = series
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    generate_episode(grown, "ep03", seed=3, config=EPISODE)
    again = materialize(instance, home, grown, SERIES, ["series_figures"], RUN_CONFIG)
    assert again.success
    messages = log_messages(instance, again)
    processed = [m for m in messages if "selecting keyframes" in m]
    assert len(processed) == 1 and "ep03.mkv" in processed[0], processed
    assert sum("unchanged, reusing its figures" in m for m in messages) == 5
    episodes = read_table(home / "tables" / "series_figures" / f"{SERIES}.episodes.parquet")
    assert "ep03" in set(episodes["episode"])
