"""cleaned_crops as Dagster runs it: its blocking checks and the cross-character report.

Only raw_scrape -> matched_tags -> cleaned_crops of one demo character are materialized.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest

from lora_factory.assets.anime import anime_posts, series_clusters, series_figures
from lora_factory.assets.cleaning import cleaned_crops
from lora_factory.assets.index import character_index
from lora_factory.assets.scraping import matched_tags, raw_scrape
from lora_factory.cleaning.embeddings import EmbeddingStore
from lora_factory.demo.deployment import TINY_BASE_MODEL, demo_resources
from lora_factory.resources import FactoryStorage
from lora_factory.storage import FactoryStore, read_table

CHARACTER = "ash_ember_knights"
IMPOSTOR = "someone_else"  # files ash's crops under another name in the shared store
ASSETS = [character_index, raw_scrape, matched_tags, anime_posts, cleaned_crops, series_figures, series_clusters]
SELECTION = ["raw_scrape", "matched_tags", "anime_posts", "cleaned_crops"]


def clean(instance, home, **settings):
    return dg.materialize(
        ASSETS,
        partition_key=CHARACTER,
        instance=instance,
        resources={"storage": FactoryStorage(home=str(home)), **demo_resources(base_model=TINY_BASE_MODEL)},
        selection=SELECTION,
        run_config={"ops": {"cleaned_crops": {"config": settings}}} if settings else None,
        raise_on_error=False,
    )


def checks_of(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def crops_metadata(result) -> dict:
    (event,) = [
        e for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "cleaned_crops"
    ]
    return {key: value.value for key, value in event.event_specific_data.materialization.metadata.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("factory")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("characters", [CHARACTER])
        default = clean(instance, home)
        # Another character whose crops are exactly ash's: every ash crop is now shared.
        store = EmbeddingStore(FactoryStore(home).lancedb_dir)
        own = store.vectors_of(CHARACTER)
        store.replace_character(IMPOSTOR, own.assign(crop_sha256=[f"copy_{s}" for s in own["crop_sha256"]]))
        strict = clean(instance, home, min_identity_purity=1.01)
        yield home, default, strict


def test_default_settings_pass_both_blocking_checks(runs):
    home, default, _ = runs
    assert default.success
    checks = checks_of(default)
    assert set(checks) == {"enough_crops", "identity_purity"}
    assert all(check.passed for check in checks.values())
    # Each result belongs to the character (the UI's Checks tab shows its partition).
    assert {check.partition for check in checks.values()} == {CHARACTER}
    purity = checks["identity_purity"].metadata["purity"].value
    assert 0.5 <= purity <= 1.0
    assert checks["identity_purity"].metadata["minimum"].value == 0.5
    metadata = crops_metadata(default)
    assert metadata["identity_purity"] == purity
    assert metadata["cross_character_duplicates"] == 0  # alone in the store
    assert len(read_table(FactoryStore(home).table_path("cleaned_crops", CHARACTER))) >= 10


def test_purity_below_the_minimum_fails_the_blocking_check(runs):
    _, default, strict = runs
    check = checks_of(strict)["identity_purity"]
    assert not check.passed
    assert check.metadata["minimum"].value == 1.01
    # Same data, same chain: the purity measured is the one the default run measured.
    assert check.metadata["purity"].value == checks_of(default)["identity_purity"].metadata["purity"].value
    assert checks_of(strict)["enough_crops"].passed


def test_crops_shared_with_another_character_are_reported(runs):
    home, _, strict = runs
    metadata = crops_metadata(strict)
    crops = read_table(FactoryStore(home).table_path("cleaned_crops", CHARACTER))
    assert metadata["cross_character_duplicates"] == crops["crop_sha256"].nunique()
    pairs = [row.data for row in metadata["cross_character_pairs"].records]
    assert 0 < len(pairs) <= 20
    # Hashes are shown short (10 characters: a prefix that still finds the row).
    for pair in pairs:
        assert pair["other_character"] == IMPOSTOR
        assert pair["other_crop_sha256"].startswith("copy_") and len(pair["other_crop_sha256"]) == 10
        assert pair["crop_sha256"] in {sha[:10] for sha in crops["crop_sha256"]}
    assert np.isclose(min(pair["distance"] for pair in pairs), 0.0, atol=1e-4)
