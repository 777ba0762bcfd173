"""The whole factory as Dagster runs it: one demo character, end to end, on a temp instance."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import dagster as dg
from dagster._serdes import serialize_value
import pytest
from PIL import Image
from safetensors import safe_open

from lora_factory.assets.anime import anime_posts, series_clusters, series_figures
from lora_factory.assets.cleaning import cleaned_crops
from lora_factory.assets.dataset import buckets, captions
from lora_factory.assets.evaluation import EvaluationSettings, chosen_model, preview_settings, recscore_table
from lora_factory.assets.index import character_index
from lora_factory.assets.scraping import matched_tags, raw_scrape
from lora_factory.assets.training import lora_checkpoints
from lora_factory.demo.deployment import TINY_BASE_MODEL, DemoVisionModels, TinyBaseModel, demo_resources
from lora_factory.resources import FactoryStorage, ImageSites, SiteConfig
from lora_factory.storage import read_table

CHARACTER = "ash_ember_knights"
ASSETS = [
    character_index,
    raw_scrape,
    matched_tags,
    anime_posts,
    cleaned_crops,
    captions,
    buckets,
    lora_checkpoints,
    recscore_table,
    chosen_model,
]
CHAIN = [asset.key.to_user_string() for asset in ASSETS[1:]]
# The anime series' assets are upstream of anime_posts (their own partitions): a character
# whose row names no series does not read them.
ASSETS += [series_figures, series_clusters]


def run_chain(
    instance, home: Path, partition: str = CHARACTER, selection=CHAIN, run_config=None, **resource_overrides
):
    resources = {"storage": FactoryStorage(home=str(home)), **demo_resources(base_model=TINY_BASE_MODEL), **resource_overrides}
    return dg.materialize(
        ASSETS,
        partition_key=partition,
        instance=instance,
        resources=resources,
        selection=selection,
        run_config=run_config,
        raise_on_error=False,
    )


def metadata_by_asset(result) -> dict[str, dict]:
    return {
        event.asset_key.to_user_string(): {
            key: value.value
            for key, value in event.event_specific_data.materialization.metadata.items()
        }
        for event in result.get_asset_materialization_events()
    }


def failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected a failed step"
    error = failures[0].step_failure_data.error
    return "\n".join(filter(None, [error.message, *(c.message for c in [error.cause] if c)]))


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    home = tmp_path_factory.mktemp("factory")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("characters", [CHARACTER, "not_in_the_index"])
        first = run_chain(instance, home)
        second = run_chain(instance, home)
        yield instance, home, first, second


def test_full_chain_builds_a_release(factory):
    _, home, first, _ = factory
    assert first.success, failure_message(first)
    metadata = metadata_by_asset(first)
    assert set(metadata) == set(CHAIN)

    crops = metadata["cleaned_crops"]
    assert crops["dagster/row_count"] >= 10
    drops = {row.data["reason"]: row.data["count"] for row in crops["drops_by_reason"].records}
    # The demo booru's faults are caught by the stage meant for them.
    assert drops.get("identity_outlier", 0) >= 1  # wrong-character posts, other people
    assert drops.get("monochrome", 0) >= 1
    assert drops.get("near_duplicate", 0) >= 1
    assert "data:image/webp;base64," in crops["contact_sheet"]

    matched = read_table(home / "tables" / "matched_tags" / f"{CHARACTER}.parquet")
    outcomes = dict(zip(matched["tag"], matched["outcome"]))
    assert outcomes["ash_(ember_knights)"] == "trusted"
    assert outcomes["ash_(pocket_tamers)"] == "rejected"  # the namesake

    captions = read_table(home / "tables" / "captions" / f"{CHARACTER}.parquet")
    assert all(caption.startswith("ash ek, ") for caption in captions["caption"])
    core = metadata["captions"]["core_tags"]
    assert "red_hair" in core and "yellow_eyes" in core
    assert not any("red hair" in caption for caption in captions["caption"])

    checkpoints = read_table(home / "tables" / "lora_checkpoints" / f"{CHARACTER}.parquet")
    assert len(checkpoints) >= 2
    with safe_open(home / checkpoints["path"].iloc[-1], framework="pt") as lora:
        keys = list(lora.keys())
        assert lora.metadata()["ss_network_module"] == "networks.lora"
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)

    chosen = metadata["chosen_model"]
    assert chosen["chosen_step"] in set(checkpoints["step"])
    release = home / "releases" / CHARACTER
    for name in ("README.md", f"{CHARACTER}.safetensors", "previews.png", "metrics.png", "meta.json"):
        assert (release / name).is_file(), name
    meta = json.loads((release / "meta.json").read_text())
    assert meta["step"] == chosen["chosen_step"] and meta["synthetic_demo"] is True
    # The UI shows the previews around the best step and the model card with its pictures
    # inline; the release's README.md keeps relative links.
    assert metadata["recscore_table"]["best_step"] == chosen["chosen_step"]
    scores = read_table(home / "tables" / "recscore_table" / f"{CHARACTER}.parquet")  # the baseline row too
    best_row = scores[scores["step"] == chosen["chosen_step"]]
    assert metadata["recscore_table"]["best_score"] == pytest.approx(best_row["score"].iloc[0], abs=1e-3)
    assert metadata["recscore_table"]["previews"].count("data:image/webp;base64,") == 1
    card = metadata["chosen_model"]["model_card"]
    assert card.count("data:image/webp;base64,") == 2 and "(previews.png)" not in card
    assert "(previews.png)" in (release / "README.md").read_text()
    assert chosen["trigger_word"] == "ash ek" and "`ash ek`" in card
    # How the previews were rendered: in the UI, the card and meta.json (the tiny model's 8 steps).
    rendering = preview_settings(EvaluationSettings(), TinyBaseModel())
    assert metadata["recscore_table"]["preview_rendering"] == rendering.describe()
    assert rendering.describe().startswith("DPM++ 2M, 8 steps, guidance 7,") and rendering.describe() in card
    assert meta["provenance"]["preview_settings"] == dataclasses.asdict(rendering)


def test_second_run_reuses_everything(factory):
    _, _, _, second = factory
    assert second.success, failure_message(second)
    metadata = metadata_by_asset(second)
    assert metadata["raw_scrape"]["new_posts"] == 0
    assert all(metadata[name]["reused"] for name in CHAIN[1:])
    # A reused materialization names the run that built it instead of storing its tables
    # and pictures again: a few KB per asset in the event log.
    _, _, first, _ = factory
    assert all(first.run_id in metadata[name]["reused_from"] for name in CHAIN[1:])
    built, reused = event_sizes(first), event_sizes(second)
    print("materialization event bytes, built -> reused:", {n: (built[n], reused[n]) for n in CHAIN})
    assert all(reused[name] < 5_000 for name in CHAIN[1:]), reused


def test_more_previews_per_prompt_score_every_seed_and_show_one_column_per_prompt(factory):
    instance, home, _, _ = factory
    folder = home / "artefacts" / "recscore_table" / CHARACTER
    first_step = sorted(folder.glob("step_*"))[1]  # step_000000 is the base model
    one_seed = sorted(path.name for path in first_step.iterdir())
    with Image.open(folder / "previews_grid.png") as grid:
        one_seed_grid = grid.size
    config = {"ops": {"recscore_table": {"config": {"previews_per_prompt": 2}}}}
    result = run_chain(instance, home, selection=[recscore_table], run_config=config)
    assert result.success, failure_message(result)
    assert not metadata_by_asset(result)["recscore_table"]["reused"]  # the setting changed
    two_seeds = sorted(path.name for path in first_step.iterdir())
    assert two_seeds == sorted(one_seed + [name.replace(".png", "_seed2.png") for name in one_seed])
    with Image.open(folder / "previews_grid.png") as grid:
        assert grid.size == one_seed_grid  # the grid keeps one column per prompt
    # Back to one seed: the second seeds' files go with the build that made them.
    result = run_chain(instance, home, selection=[recscore_table])
    assert result.success, failure_message(result)
    assert sorted(path.name for path in first_step.iterdir()) == one_seed


def test_a_changed_deployment_default_re_renders_the_previews(factory, monkeypatch):
    # A base model deployment's preview defaults are code, not run config: a run that
    # leaves them undecided must still notice when they change, and the release must say
    # what the previews were rendered with.
    instance, home, _, _ = factory
    card = home / "releases" / CHARACTER / "README.md"
    monkeypatch.setattr(TinyBaseModel, "defaults", dataclasses.replace(TinyBaseModel.defaults, guidance=5.0))
    try:
        result = run_chain(instance, home, selection=[recscore_table, chosen_model])
        assert result.success, failure_message(result)
        metadata = metadata_by_asset(result)
        assert not metadata["recscore_table"]["reused"] and not metadata["chosen_model"]["reused"]
        assert ", guidance 5," in metadata["recscore_table"]["preview_rendering"]
        assert ", guidance 5," in card.read_text()
    finally:
        monkeypatch.undo()
        result = run_chain(instance, home, selection=[recscore_table, chosen_model])
    assert result.success, failure_message(result)
    metadata = metadata_by_asset(result)
    assert not metadata["recscore_table"]["reused"] and not metadata["chosen_model"]["reused"]
    assert ", guidance 7," in card.read_text()


def test_a_changed_training_default_retrains_the_lora(factory, monkeypatch):
    # The deployment's training defaults are code too: a LoRA trained before one changed
    # was not trained with it, so it is trained again.
    instance, home, _, _ = factory

    def last_checkpoint_metadata() -> dict[str, str]:
        checkpoints = read_table(home / "tables" / "lora_checkpoints" / f"{CHARACTER}.parquet")
        with safe_open(home / checkpoints["path"].iloc[-1], framework="pt") as lora:
            return lora.metadata()

    monkeypatch.setattr(
        TinyBaseModel, "defaults", dataclasses.replace(TinyBaseModel.defaults, caption_tag_dropout=0.25)
    )
    try:
        result = run_chain(instance, home, selection=[lora_checkpoints])
        assert result.success, failure_message(result)
        assert not metadata_by_asset(result)["lora_checkpoints"]["reused"]
        assert last_checkpoint_metadata()["ss_caption_tag_dropout_rate"] == "0.25"
    finally:
        monkeypatch.undo()
        result = run_chain(instance, home, selection=[lora_checkpoints])
    assert result.success, failure_message(result)
    assert not metadata_by_asset(result)["lora_checkpoints"]["reused"]
    assert last_checkpoint_metadata()["ss_caption_tag_dropout_rate"] == "0.0"


def test_the_release_describes_the_previews_recscore_table_rendered(factory):
    # chosen_model has no settings of its own: the step rule, the prompts and the settings
    # come from what recscore_table scored and rendered, so the card cannot describe
    # previews that were never made or a rule that did not rank them.
    instance, home, _, _ = factory
    config = {"ops": {"recscore_table": {"config": {"sampling_steps": 6, "beta": 1.0}}}}
    try:
        result = run_chain(instance, home, selection=[recscore_table, chosen_model], run_config=config)
        assert result.success, failure_message(result)
        meta = json.loads((home / "releases" / CHARACTER / "meta.json").read_text())
        assert meta["provenance"]["preview_settings"]["sampling_steps"] == 6
        assert meta["selection"]["beta"] == 1.0
        assert "DPM++ 2M, 6 steps," in (home / "releases" / CHARACTER / "README.md").read_text()
    finally:
        result = run_chain(instance, home, selection=[recscore_table, chosen_model])
    assert result.success, failure_message(result)
    assert "DPM++ 2M, 8 steps," in (home / "releases" / CHARACTER / "README.md").read_text()


def event_sizes(result) -> dict[str, int]:
    return {
        event.asset_key.to_user_string(): len(serialize_value(event.event_specific_data.materialization))
        for event in result.get_asset_materialization_events()
    }


def test_missing_model_fails_with_the_fetch_command(factory, tmp_path):
    instance, home, _, _ = factory
    result = run_chain(
        instance, home, vision_models=DemoVisionModels(person="person_detect_v1.1_m")
    )
    assert not result.success
    message = failure_message(result)
    assert "anime_person_detection" in message and "download" in message


def test_site_down_fails_naming_the_site(factory, tmp_path):
    instance, _, _, _ = factory
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sites = ImageSites(
        sites=[SiteConfig(name="danbooru", base_url=f"http://127.0.0.1:{port}")], max_retries=1
    )
    result = run_chain(instance, tmp_path / "home", image_sites=sites)
    assert not result.success
    message = failure_message(result)
    assert "danbooru" in message and f"127.0.0.1:{port}" in message


def test_character_missing_from_the_index_fails_with_the_fix(factory, tmp_path):
    instance, _, _, _ = factory
    result = run_chain(instance, tmp_path / "home", partition="not_in_the_index")
    assert not result.success
    assert "not in the index" in failure_message(result)


def test_the_readme_preview_strip_is_drawn_from_a_home(factory, tmp_path):
    from lora_factory.demo.previews_strip import STRIP_CELL, STRIP_PROMPTS, main

    _, home, first, _ = factory
    assert first.success, failure_message(first)
    out = tmp_path / "strip.webp"
    main(["--home", str(home), "--out", str(out)])
    with Image.open(out) as strip:
        assert strip.width >= 2 * len(STRIP_PROMPTS) * STRIP_CELL and strip.height >= STRIP_CELL
