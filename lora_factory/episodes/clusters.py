"""Group a series' figures by identity, and bind a group to an index character.

Clustering: HDBSCAN (scikit-learn) on the identity model's own pairwise differences
(`IdentityModel.difference`, CCIP's metrics model), given as a precomputed matrix. It is
density based: a character seen in many frames forms a dense group, and figures that
are seen once or are half out of frame stay noise (label -1) instead of being forced into
a character. Two choices tie it to the identity model:
- clusters whose medoids differ by at most half the model's same-character threshold
  are merged: HDBSCAN may split one character into its outfits (the identity model
  puts them close but not on top of each other), while look-alikes that the model puts
  beyond its threshold stay apart. HDBSCAN's own `cluster_selection_epsilon` would do
  the same inside the tree, but scikit-learn 1.9 fails with it under NumPy 2
  (scikit-learn issue #33219), hence the merge afterwards.
- purity is estimated without labels: the share of members within the threshold of
  the cluster's medoid (the member with the least total difference to the others).

Scale: the matrix is N x N (a 24-episode series with ~100 figures an episode is
~2,400 figures, 46 MB in float64). Above `max_exact` figures a fixed-seed sample of that
size is clustered exactly, and every other figure joins the cluster of the nearest medoid
when within the threshold, else stays noise; the differences are computed in blocks, so
memory stays at max_exact^2 plus one block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from sklearn.cluster import HDBSCAN

if TYPE_CHECKING:
    from lora_factory.vision.identity import IdentityModel

NOISE = -1
CLUSTER_COLUMNS = ["cluster", "size", "medoid", "purity", "median_difference"]
BLOCK = 1024  # rows of differences computed at once


@dataclass(frozen=True)
class ClusterConfig:
    min_cluster_size: int = 5
    min_samples: int = 3
    # Clusters whose medoids are closer than this share of the identity threshold are
    # one character (see above).
    merge_share: float = 0.5
    max_exact: int = 4000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_cluster_size < 2 or self.min_samples < 1:
            raise ValueError("min_cluster_size must be >= 2 and min_samples >= 1")


@dataclass
class IdentityClusters:
    """Cluster labels of every figure (NOISE for none) and one row per cluster
    (CLUSTER_COLUMNS; `medoid` is a figure's row number), with what `bind_cluster` needs."""

    labels: np.ndarray
    table: pd.DataFrame
    vectors: np.ndarray
    difference: Callable[[np.ndarray, np.ndarray], np.ndarray]
    threshold: float

    @classmethod
    def from_labels(cls, labels: np.ndarray, vectors: np.ndarray,
                    difference: Callable[[np.ndarray, np.ndarray], np.ndarray], threshold: float) -> IdentityClusters:
        """Clusters given by their labels (from `cluster_identities`, or edited by hand)."""
        labels = np.asarray(labels, dtype=np.int64)
        return cls(labels, _describe(vectors, labels, difference, threshold), vectors, difference, threshold)

    def members(self, cluster: int) -> np.ndarray:
        return np.flatnonzero(self.labels == cluster)


def pairwise_differences(vectors: np.ndarray, difference: Callable[[np.ndarray, np.ndarray], np.ndarray],
                         others: np.ndarray | None = None) -> np.ndarray:
    """[N, M] differences in blocks of rows (the metrics model holds a block at once)."""
    others = vectors if others is None else others
    rows = [np.asarray(difference(vectors[start:start + BLOCK], others), dtype=np.float64)
            for start in range(0, len(vectors), BLOCK)]
    return np.concatenate(rows) if rows else np.zeros((0, len(others)))


def cluster_identities(vectors: np.ndarray, identity: IdentityModel,
                       config: ClusterConfig = ClusterConfig()) -> IdentityClusters:
    """Cluster identity vectors [N, D] of a series' figures (see the module docstring)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    threshold = float(identity.threshold)
    labels = np.full(len(vectors), NOISE, dtype=np.int64)
    if len(vectors) >= config.min_cluster_size:
        exact = np.arange(len(vectors))
        if len(vectors) > config.max_exact:
            rng = np.random.default_rng(config.seed)
            exact = np.sort(rng.choice(len(vectors), config.max_exact, replace=False))
        distances = pairwise_differences(vectors[exact], identity.difference)
        # The metrics model is symmetric up to float rounding; HDBSCAN wants it exactly.
        distances = np.maximum((distances + distances.T) / 2, 0.0)
        np.fill_diagonal(distances, 0.0)
        model = HDBSCAN(min_cluster_size=config.min_cluster_size, min_samples=config.min_samples,
                        metric="precomputed", copy=True)
        labels[exact] = _merge_close(model.fit_predict(distances), distances, config.merge_share * threshold)
        if len(exact) < len(vectors):
            _assign_rest(vectors, labels, exact, identity.difference, threshold)
    return IdentityClusters.from_labels(labels, vectors, identity.difference, threshold)


def _merge_close(labels: np.ndarray, distances: np.ndarray, limit: float) -> np.ndarray:
    """Relabel so that clusters whose medoids are within `limit` share the smaller label."""
    clusters = sorted(set(labels.tolist()) - {NOISE})
    medoids = []
    for cluster in clusters:
        members = np.flatnonzero(labels == cluster)
        medoids.append(members[distances[np.ix_(members, members)].sum(axis=1).argmin()])
    target = {cluster: cluster for cluster in clusters}

    def root(cluster: int) -> int:
        while target[cluster] != cluster:
            cluster = target[cluster]
        return cluster

    for i, a in enumerate(clusters):
        for b in clusters[i + 1:]:
            if distances[medoids[i], medoids[clusters.index(b)]] <= limit:
                low, high = sorted((root(a), root(b)))
                target[high] = low
    merged = np.array([root(label) if label != NOISE else NOISE for label in labels.tolist()], dtype=np.int64)
    # Consecutive labels again: 0, 1, 2, ...
    renumber = {old: new for new, old in enumerate(sorted(set(merged.tolist()) - {NOISE}))}
    return np.array([renumber.get(label, NOISE) for label in merged.tolist()], dtype=np.int64)


def _assign_rest(vectors: np.ndarray, labels: np.ndarray, exact: np.ndarray,
                 difference: Callable, threshold: float) -> None:
    """Figures outside the sample join the nearest medoid's cluster within the threshold."""
    sample_labels = labels[exact]
    clusters = sorted(set(sample_labels) - {NOISE})
    if not clusters:
        return
    medoids = []
    for cluster in clusters:
        members = exact[sample_labels == cluster]
        medoids.append(vectors[members[_medoid(vectors[members], difference)[0]]])
    medoids = np.stack(medoids)
    rest = np.setdiff1d(np.arange(len(vectors)), exact)
    to_medoids = pairwise_differences(vectors[rest], difference, medoids)
    nearest = to_medoids.argmin(axis=1)
    close = to_medoids[np.arange(len(rest)), nearest] <= threshold
    labels[rest] = np.where(close, np.asarray(clusters)[nearest], NOISE)


def _medoid(members: np.ndarray, difference: Callable) -> tuple[int, np.ndarray]:
    """Position of the medoid among `members` and its differences to all of them."""
    distances = pairwise_differences(members, difference)
    best = int(distances.sum(axis=1).argmin())
    return best, distances[best]


def _describe(vectors: np.ndarray, labels: np.ndarray, difference: Callable, threshold: float) -> pd.DataFrame:
    rows = []
    for cluster in sorted(set(labels.tolist()) - {NOISE}):
        members = np.flatnonzero(labels == cluster)
        # At scale the medoid is searched among a sample of the members.
        candidates = members if len(members) <= BLOCK else members[:: -(-len(members) // BLOCK)]
        position, _ = _medoid(vectors[candidates], difference)
        medoid = int(candidates[position])
        to_medoid = pairwise_differences(vectors[members], difference, vectors[[medoid]])[:, 0]
        rows.append({"cluster": cluster, "size": len(members), "medoid": medoid,
                     "purity": float(np.mean(to_medoid <= threshold)),
                     "median_difference": float(np.median(to_medoid))})
    table = pd.DataFrame(rows, columns=CLUSTER_COLUMNS)
    return table.sort_values("size", ascending=False, ignore_index=True)


def contact_sheet(images: Sequence[Image.Image], columns: int = 8, cell: int = 96,
                  title: str | None = None) -> Image.Image:
    """A grid of pictures, each fitted into a `cell` square on white, with an optional
    title line on top."""
    if not images:
        raise ValueError("a contact sheet needs at least one picture")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    header = 14 if title else 0
    sheet = Image.new("RGB", (columns * cell, rows * cell + header), (255, 255, 255))
    for position, image in enumerate(images):
        thumbnail = image.convert("RGB")
        thumbnail.thumbnail((cell - 2, cell - 2))
        x = (position % columns) * cell + (cell - thumbnail.width) // 2
        y = header + (position // columns) * cell + (cell - thumbnail.height) // 2
        sheet.paste(thumbnail, (x, y))
    if title:
        ImageDraw.Draw(sheet).text((2, 1), title, fill=(0, 0, 0))
    return sheet


def cluster_sheet(clusters: IdentityClusters, cluster: int, images: Sequence[Image.Image],
                  limit: int = 32, columns: int = 8) -> Image.Image:
    """The contact sheet of one cluster: its medoid first, then the members nearest to it
    (`images` holds one picture per figure, in the order of the vectors)."""
    row = clusters.table.set_index("cluster").loc[cluster]
    members = clusters.members(cluster)
    medoid = int(row["medoid"])
    order = pairwise_differences(clusters.vectors[members], clusters.difference,
                                 clusters.vectors[[medoid]])[:, 0].argsort(kind="stable")
    chosen = members[order][:limit]
    title = f"cluster {cluster}: {int(row['size'])} figures, purity {row['purity']:.2f}"
    return contact_sheet([images[i] for i in chosen], columns=columns, title=title)


class BindingError(ValueError):
    """No cluster, or more than one, matches a character's reference pictures."""

    def __init__(self, message: str, evidence: pd.DataFrame):
        super().__init__(message)
        self.evidence = evidence


EVIDENCE_COLUMNS = ["cluster", "size", "agreement", "median_difference", "matches"]


@dataclass(frozen=True)
class Binding:
    cluster: int
    agreement: float  # share of (reference, member) pairs the identity model calls the same
    evidence: pd.DataFrame  # EVIDENCE_COLUMNS, one row per cluster, best first


def bind_cluster(reference_vectors: np.ndarray, clusters: IdentityClusters, min_agreement: float = 0.5,
                 sample: int = 64, seed: int = 0) -> Binding:
    """The one cluster whose members the identity model calls the same character as the
    references (identity vectors of the index's reference pictures or of the character's
    web crops): agreement = share of (reference, member) pairs within the threshold, over
    up to `sample` members per cluster. Exactly one cluster must reach `min_agreement`;
    none or several raise `BindingError` with the evidence table."""
    references = np.asarray(reference_vectors, dtype=np.float32)
    if references.ndim != 2 or not len(references):
        raise ValueError(f"reference_vectors must be a non-empty [count, dim] array, got {references.shape}")
    rng = np.random.default_rng(seed)
    rows = []
    for cluster in clusters.table["cluster"]:
        members = clusters.members(cluster)
        if len(members) > sample:
            members = np.sort(rng.choice(members, sample, replace=False))
        differences = pairwise_differences(references, clusters.difference, clusters.vectors[members])
        agreement = float(np.mean(differences <= clusters.threshold))
        rows.append({"cluster": int(cluster), "size": int((clusters.labels == cluster).sum()),
                     "agreement": agreement, "median_difference": float(np.median(differences)),
                     "matches": agreement >= min_agreement})
    evidence = pd.DataFrame(rows, columns=EVIDENCE_COLUMNS).sort_values(
        ["agreement", "size"], ascending=False, ignore_index=True)
    matching = evidence[evidence["matches"]]
    if matching.empty:
        best = "no clusters at all" if evidence.empty else (
            f"the closest, cluster {evidence.iloc[0]['cluster']}, agrees {evidence.iloc[0]['agreement']:.0%}")
        raise BindingError(f"no identity cluster matches the references (need {min_agreement:.0%}; {best})", evidence)
    if len(matching) > 1:
        listed = ", ".join(f"{r.cluster} ({r.agreement:.0%})" for r in matching.itertuples())
        raise BindingError(f"{len(matching)} identity clusters match the references: {listed}; "
                           "give more reference pictures or raise min_agreement", evidence)
    chosen = matching.iloc[0]
    return Binding(int(chosen["cluster"]), float(chosen["agreement"]), evidence)
