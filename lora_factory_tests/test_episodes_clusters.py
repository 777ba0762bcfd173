"""Identity clusters of figures: one per character (whatever the outfit), look-alikes
apart, stray figures left as noise; binding to references, with clear errors."""

import random

import numpy as np
import pytest
from conftest import tiny_models_on_one_core

from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post
from lora_factory.demo.episodes import KAEDE, MIDORI, reference_vectors
from lora_factory.episodes.clusters import (
    NOISE,
    BindingError,
    ClusterConfig,
    IdentityClusters,
    bind_cluster,
    cluster_identities,
    cluster_sheet,
)

ASH = DEMO_CHARACTERS[0]  # two outfits
CAST = (ASH, DEMO_CHARACTERS[2], KAEDE, MIDORI)
SIDE_CHARACTER = DEMO_CHARACTERS[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from tiny_models_on_one_core(tmp_path_factory)


@pytest.fixture(scope="module")
def figures(models):
    """8 solo figures of each of CAST (Ash in both outfits), plus 2 of a side character
    (too few to make a cluster: they are noise)."""
    rng = random.Random(7)
    pictures, owners = [], []
    for character in CAST:
        for number in range(8):
            post = draw_post([(character, number % len(character.outfits))], (200, 300), rng)
            pictures.append(post.image.crop(post.figures[0].box))
            owners.append(character.key)
    for _ in range(2):
        post = draw_post([(SIDE_CHARACTER, 0)], (200, 300), rng)
        pictures.append(post.image.crop(post.figures[0].box))
        owners.append(SIDE_CHARACTER.key)
    vectors = np.asarray(models.identity.embed(pictures), dtype=np.float32)
    return pictures, np.asarray(owners), vectors


def test_one_cluster_per_character_and_strays_are_noise(models, figures):
    pictures, owners, vectors = figures
    clusters = cluster_identities(vectors, models.identity)
    assert len(clusters.table) == len(CAST)
    for character in CAST:
        labels = set(clusters.labels[owners == character.key])
        assert len(labels) == 1 and NOISE not in labels, (character.key, labels)
    assert set(clusters.labels[owners == SIDE_CHARACTER.key]) == {NOISE}
    assert clusters.labels[owners == KAEDE.key][0] != clusters.labels[owners == MIDORI.key][0]
    assert (clusters.table["size"] == 8).all() and (clusters.table["purity"] == 1.0).all()
    for row in clusters.table.itertuples():
        assert clusters.labels[row.medoid] == row.cluster
    sheet = cluster_sheet(clusters, int(clusters.table["cluster"][0]), pictures, columns=4)
    assert sheet.size == (4 * 96, 2 * 96 + 14)


def test_large_series_cluster_a_sample_and_assign_the_rest(models, figures):
    _, owners, vectors = figures
    exact = cluster_identities(vectors, models.identity)
    # 30 of 34 figures: every character keeps at least 4 in the sample.
    sampled = cluster_identities(vectors, models.identity, ClusterConfig(max_exact=30, min_cluster_size=4))
    assert len(sampled.table) == len(exact.table)
    for character in CAST:
        mine = owners == character.key
        # The same partition, whatever the numbering.
        assert len(set(sampled.labels[mine])) == 1 and NOISE not in sampled.labels[mine]
    assert len({sampled.labels[owners == c.key][0] for c in CAST}) == len(CAST)
    assert set(sampled.labels[owners == SIDE_CHARACTER.key]) == {NOISE}


def test_binding_picks_the_character_s_cluster_and_refuses_none_or_two(models, figures):
    _, owners, vectors = figures
    clusters = cluster_identities(vectors, models.identity)
    for character in CAST:
        binding = bind_cluster(reference_vectors(character, models), clusters)
        assert binding.cluster == clusters.labels[owners == character.key][0]
        assert binding.agreement == 1.0 and binding.evidence["matches"].sum() == 1
    # The side character is seen too rarely to have a cluster.
    with pytest.raises(BindingError, match="no identity cluster matches") as missing:
        bind_cluster(reference_vectors(SIDE_CHARACTER, models), clusters)
    assert not missing.value.evidence["matches"].any()
    # Ash split in two clusters (two outfits kept apart): both match, so neither is chosen.
    labels = clusters.labels.copy()
    ash = np.flatnonzero(owners == ASH.key)
    labels[ash[1::2]] = labels.max() + 1
    split = IdentityClusters.from_labels(labels, vectors, clusters.difference, clusters.threshold)
    with pytest.raises(BindingError, match="2 identity clusters match"):
        bind_cluster(reference_vectors(ASH, models), split)


def test_a_character_split_by_outfit_is_merged_back_but_look_alikes_are_not(models, figures):
    _, owners, vectors = figures
    # With small density settings HDBSCAN gives each of Ash's outfits its own cluster.
    split = cluster_identities(vectors, models.identity, ClusterConfig(min_cluster_size=3, min_samples=2, merge_share=0))
    assert len(set(split.labels[owners == ASH.key])) == 2
    merged = cluster_identities(vectors, models.identity, ClusterConfig(min_cluster_size=3, min_samples=2))
    assert len(set(merged.labels[owners == ASH.key])) == 1
    assert merged.labels[owners == KAEDE.key][0] != merged.labels[owners == MIDORI.key][0]
    assert len(merged.table) == len(CAST)
