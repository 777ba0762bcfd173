import numpy as np
import pytest

from lora_factory.cleaning.identity_filter import (
    DEFAULT_MIN_AGREEMENT,
    agreement_with_anchor,
    dominant_identity_cluster,
)

THRESHOLD = 0.5


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def identity_differences(embeddings: np.ndarray, rng: np.random.Generator, flip: float) -> np.ndarray:
    """1 - cosine similarity, with `flip` of the pairs' verdicts made wrong (model noise)."""
    diff = 1.0 - unit(embeddings) @ unit(embeddings).T
    noise = np.triu(rng.random(diff.shape) < flip, 1)
    noise = noise | noise.T
    flipped = np.where(diff < THRESHOLD, THRESHOLD + 0.2, THRESHOLD - 0.2)
    return np.where(noise, flipped, diff)


def planted_dataset(seed: int, true_count: int = 190, outlier_count: int = 10, flip: float = 0.1):
    """A character tag's pictures: `true_count` of the character, outliers from others:
    half of them one other character (a consistent mistag), half unrelated characters.
    True pictures vary in how typical they are, so some agree with only part of the rest
    (about 80% of true pairs read as "same" before the random flips)."""
    rng = np.random.default_rng(seed)
    dimension = 64
    character = unit(rng.normal(size=dimension))
    frequent_impostor = unit(rng.normal(size=dimension))
    spread = rng.uniform(0.05, 0.14, size=(true_count, 1))
    true = character + spread * rng.normal(size=(true_count, dimension))
    grouped = frequent_impostor + 0.08 * rng.normal(size=(outlier_count // 2, dimension))
    random_others = unit(rng.normal(size=(outlier_count - outlier_count // 2, dimension)))
    embeddings = np.concatenate([true, grouped, random_others])
    is_true = np.arange(len(embeddings)) < true_count
    order = rng.permutation(len(embeddings))
    return identity_differences(embeddings[order], rng, flip), is_true[order]


@pytest.mark.parametrize("seed", range(5))
def test_planted_outliers_are_removed_and_true_pictures_kept(seed):
    diff, is_true = planted_dataset(seed)
    result = dominant_identity_cluster(diff, THRESHOLD)
    outliers_removed = (~result.keep[~is_true]).mean()
    true_kept = result.keep[is_true].mean()
    assert outliers_removed >= 0.95
    assert true_kept >= 0.95
    assert result.purity == pytest.approx(result.keep.mean())
    assert result.cluster_sizes[0] == result.keep.sum()
    assert (result.labels[result.keep] == 0).all() and (result.labels[~result.keep] > 0).all()
    assert sum(result.cluster_sizes) == len(diff)


def test_the_consistent_impostor_is_reported_as_the_second_cluster():
    diff, is_true = planted_dataset(0, flip=0.0)
    result = dominant_identity_cluster(diff, THRESHOLD)
    assert result.cluster_sizes[0] >= 0.95 * 190
    # The five pictures of the one other character are the biggest rejected group.
    assert result.cluster_sizes[1] == 5
    assert not (result.labels[is_true] == 1).any()


def test_a_picture_resembling_two_characters_does_not_merge_them():
    rng = np.random.default_rng(7)
    dimension = 32
    a, b = unit(rng.normal(size=dimension)), unit(rng.normal(size=dimension))
    embeddings = np.concatenate(
        [
            a + 0.05 * rng.normal(size=(30, dimension)),
            b + 0.05 * rng.normal(size=(20, dimension)),
            np.stack([unit(a) + unit(b)] * 3),  # ambiguous pictures "same" as both
        ]
    )
    diff = 1.0 - unit(embeddings) @ unit(embeddings).T
    bridge = slice(50, 53)
    diff[bridge, :] = np.minimum(diff[bridge, :], THRESHOLD - 0.1)
    diff[:, bridge] = np.minimum(diff[:, bridge], THRESHOLD - 0.1)
    result = dominant_identity_cluster(diff, THRESHOLD)
    assert result.keep[:30].all()
    assert not result.keep[30:50].any()


def test_small_and_degenerate_inputs():
    empty = dominant_identity_cluster(np.zeros((0, 0)), THRESHOLD)
    assert empty.keep.tolist() == [] and empty.purity == 1.0
    single = dominant_identity_cluster(np.zeros((1, 1)), THRESHOLD)
    assert single.keep.tolist() == [True]
    strangers = dominant_identity_cluster(np.ones((3, 3)) - np.eye(3), THRESHOLD)
    assert not strangers.keep.any() and strangers.purity == 0.0
    assert strangers.cluster_sizes == [0, 1, 1, 1]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="square"):
        dominant_identity_cluster(np.zeros((2, 3)), THRESHOLD)
    with pytest.raises(ValueError, match="min_agreement"):
        dominant_identity_cluster(np.zeros((2, 2)), THRESHOLD, min_agreement=0)


def test_large_sets_vote_against_a_sample_anchor():
    diff, is_true = planted_dataset(3)
    sample = np.arange(0, len(diff), 4)
    on_sample = dominant_identity_cluster(diff[np.ix_(sample, sample)], THRESHOLD)
    assert on_sample.anchor.sum() > 0 and not (on_sample.anchor & ~on_sample.keep).any()
    agreement = agreement_with_anchor(diff[:, sample[on_sample.anchor]], THRESHOLD)
    keep = agreement >= DEFAULT_MIN_AGREEMENT
    assert keep[is_true].mean() >= 0.95 and (~keep[~is_true]).mean() >= 0.95
    assert agreement_with_anchor(np.zeros((3, 0)), THRESHOLD).tolist() == [0.0, 0.0, 0.0]
