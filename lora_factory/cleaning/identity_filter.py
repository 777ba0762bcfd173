"""Keep the pictures that show the character most of the dataset shows.

About 5% of the posts under a booru character tag show someone else (mistagged posts,
the character in the background of another's picture, fan characters). The identity
model says for each pair of pictures whether they show the same character
(difference < threshold), with some noise in both directions, so no single pair can be
trusted; a vote can.

The rule (medoid-anchored vote):
1. `same[i, j]` = difference below the threshold (the matrix is symmetrised first).
2. The first anchor is the picture with the most "same" partners together with those
   partners.
3. The anchor is refined to its majority core: the pictures "same" with at least half
   of the anchor (themselves not counted) become the next anchor, until it stops
   changing. Pictures the first anchor missed join; a second character that came in
   through an ambiguous medoid falls out, as it agrees with less than half.
4. A picture is kept when it is "same" with at least `min_agreement` of the final
   anchor: a lower bar than the core's, so atypical true pictures stay.

Unlike connected components, this does not chain: one ambiguous picture that resembles
two characters cannot merge them, because a picture needs the majority of the anchor,
not a single link. Rejected pictures are grouped by connected components only to report
what else the tag contains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

# True pictures agree with most of the anchor (the model's same-character recall, 80-90%
# on varied fan art); impostors only with its false-positive rate (a few %). 0.4 sits far
# from both and still keeps the hard true pictures (odd styles, partial views).
DEFAULT_MIN_AGREEMENT = 0.4
_CORE_AGREEMENT = 0.5  # the anchor is the set of pictures agreeing with its majority
_MAX_ROUNDS = 20


@dataclass(frozen=True)
class ClusterResult:
    keep: np.ndarray  # bool [N]: in the dominant cluster
    anchor: np.ndarray  # bool [N]: the dominant cluster's majority core (the voters)
    labels: np.ndarray  # int [N]: 0 = dominant cluster, 1.. = other groups by size
    cluster_sizes: list[int]  # size of cluster 0, 1, ... (0 is the kept one)
    agreement: np.ndarray  # float [N]: share of the dominant cluster each item agrees with
    purity: float  # kept / total (1.0 for an empty or single-item set)


def dominant_identity_cluster(
    diff_matrix: np.ndarray,
    threshold: float,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> ClusterResult:
    """Find the dominant character among N pictures from their [N, N] identity differences."""
    diff = np.asarray(diff_matrix, dtype=np.float64)
    if diff.ndim != 2 or diff.shape[0] != diff.shape[1]:
        raise ValueError(f"diff_matrix must be square [N, N], got shape {diff.shape}")
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement}")
    count = diff.shape[0]
    if count <= 1:
        keep = np.ones(count, dtype=bool)
        return ClusterResult(keep, keep.copy(), np.zeros(count, dtype=np.int64),
                             [count] if count else [], keep.astype(np.float64), 1.0)

    same = (diff + diff.T) / 2.0 < threshold
    np.fill_diagonal(same, False)
    partners = same.sum(axis=1)
    if partners.max() == 0:
        # Not one pair is the same character: there is no dominant character to keep.
        keep = np.zeros(count, dtype=bool)
        return _result(same, keep, keep.copy(), np.zeros(count))

    # Ties on partner count go to the picture that is closest to everyone on average.
    medoid = int(np.lexsort((diff.mean(axis=1), -partners))[0])
    anchor = same[medoid].copy()
    anchor[medoid] = True
    for _ in range(_MAX_ROUNDS):
        core = _agreement(same, anchor) >= _CORE_AGREEMENT
        if not core.any() or np.array_equal(core, anchor):
            break
        anchor = core
    agreement = _agreement(same, anchor)
    return _result(same, agreement >= min_agreement, anchor, agreement)


def _agreement(same: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """For each item, the share of the anchor (not counting itself) it is 'same' with."""
    votes = same[:, anchor].sum(axis=1).astype(np.float64)
    voters = anchor.sum() - anchor.astype(np.int64)  # an anchor member does not vote for itself
    return np.divide(votes, voters, out=np.zeros_like(votes), where=voters > 0)


def agreement_with_anchor(diff_to_anchor: np.ndarray, threshold: float) -> np.ndarray:
    """Share of the anchor each item is "same" with, from [N, A] differences.

    For sets too large for one [N, N] matrix: cluster a sample, then let every item
    vote against the sample's anchor.
    """
    diff = np.asarray(diff_to_anchor, dtype=np.float64)
    if diff.ndim != 2:
        raise ValueError(f"diff_to_anchor must be [N, A], got shape {diff.shape}")
    if diff.shape[1] == 0:
        return np.zeros(diff.shape[0])
    return (diff < threshold).mean(axis=1)


def _result(same: np.ndarray, keep: np.ndarray, anchor: np.ndarray, agreement: np.ndarray) -> ClusterResult:
    count = len(keep)
    labels = np.zeros(count, dtype=np.int64)
    sizes = [int(keep.sum())]
    rejected = np.flatnonzero(~keep)
    if len(rejected):
        sub = csr_matrix(same[np.ix_(rejected, rejected)])
        _, component = connected_components(sub, directed=False)
        groups, group_sizes = np.unique(component, return_counts=True)
        # Bigger groups first; equal sizes in order of first appearance.
        order = sorted(range(len(groups)), key=lambda g: (-group_sizes[g], groups[g]))
        for label, g in enumerate(order, start=1):
            labels[rejected[component == groups[g]]] = label
            sizes.append(int(group_sizes[g]))
    return ClusterResult(keep, anchor, labels, sizes, agreement, float(keep.sum()) / count)
