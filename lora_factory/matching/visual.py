"""Visual consistency: do a candidate tag's pictures show the character?

Names and copyright tags can agree while the pictures do not (a namesake tagged with the
same copyright, a tag the site merged by mistake), and a site that tags no copyrights
gives no franchise evidence at all. The identity model settles both: a sample of the
candidate's solo pictures is compared with the character's look, which is

- the index row's `reference_images` when it has some (the user's ground truth), or
- the dominant identity cluster of the pictures of the candidates that the text
  evidence already trusts (and the forced ones), pooled across every site.

A sampled picture *shows the character* when the identity model calls it the same
character as at least `VISUAL_MIN_AGREEMENT` of the reference pictures (the identity
filter's vote, so a few noisy pairs decide nothing); the candidate's *visual
consistency* is the share of its sampled pictures that do. A right tag scores near 1
(about 5% of a booru tag's posts show someone else), a namesake near 0.

A pooled reference includes the trusted candidates' own pictures, so a trusted tag is
partly compared with itself; that is deliberate: with a single site, its consistency
is the tag's purity, and a trusted tag from one site whose pictures disagree with the
dominant look of the others still falls out of the cluster and scores low.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from lora_factory.cleaning.decode import Quarantined, decode_image
from lora_factory.cleaning.identity_filter import (
    DEFAULT_MIN_AGREEMENT,
    agreement_with_anchor,
    dominant_identity_cluster,
)

# Solo pictures embedded per candidate: enough for a stable share, cheap on a CPU.
VISUAL_SAMPLE_SIZE = 16
# Fewer sampled pictures than this (or reference pictures) give no visual verdict.
VISUAL_MIN_SAMPLES = 3
VISUAL_MIN_REFERENCE = 3
# A picture shows the character when it is "same" with this share of the reference.
VISUAL_MIN_AGREEMENT = DEFAULT_MIN_AGREEMENT
# Consistency at or above this supports the candidate (and may lift it to "likely");
# below VISUAL_REJECT_BELOW the pictures show someone else and the tag is rejected;
# in between the tag is mixed and never chosen automatically.
VISUAL_CONSISTENT = 0.6
VISUAL_REJECT_BELOW = 0.3
# Decoded pictures are capped to this area before embedding (the model takes 384x384).
_EMBED_MAX_AREA = 1024 * 1024


class IdentityComparer(Protocol):
    """What visual evidence needs of an identity model (`vision.identity.IdentityModel` fits)."""

    threshold: float

    def difference(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


@dataclass
class VisualCheck:
    """The inputs of visual evidence for one character.

    `sample(site, tag)`: identity vectors [n, dim] of up to VISUAL_SAMPLE_SIZE solo
    pictures of that candidate (called only for candidates the text evidence does not
    already reject). `reference`: vectors of the index's reference images, or None to
    use the dominant cluster across sites.
    """

    identity: IdentityComparer
    sample: Callable[[str, str], np.ndarray]
    reference: np.ndarray | None = None


@dataclass(frozen=True)
class VisualReference:
    vectors: np.ndarray  # [k, dim]
    description: str  # for the evidence sentence


def visual_consistency(sample: np.ndarray, reference: np.ndarray, identity: IdentityComparer) -> float:
    """Share (0..1) of the sampled pictures that show the reference character."""
    sample, reference = np.asarray(sample), np.asarray(reference)
    if not len(sample) or not len(reference):
        raise ValueError(
            f"visual consistency needs sampled and reference pictures, got {len(sample)} and {len(reference)}"
        )
    agreement = agreement_with_anchor(identity.difference(sample, reference), identity.threshold)
    return float((agreement >= VISUAL_MIN_AGREEMENT).mean())


def dominant_reference(vectors: np.ndarray, identity: IdentityComparer) -> np.ndarray:
    """The majority core of the dominant identity cluster among `vectors` [n, dim] (may be empty)."""
    vectors = np.asarray(vectors)
    if len(vectors) < VISUAL_MIN_REFERENCE:
        return vectors[:0]
    cluster = dominant_identity_cluster(identity.difference(vectors, vectors), identity.threshold)
    return vectors[cluster.anchor]


def solo_sample(manifest: pd.DataFrame, site: str, tag: str, size: int = VISUAL_SAMPLE_SIZE) -> list[str]:
    """sha256 of up to `size` downloaded solo pictures of (site, tag), spread over its posts.

    Solo posts only: a multi-person picture says nothing about which one the tag means.
    The picks are spread evenly over the posts by id (not the newest only), and the same
    manifest always gives the same picks.
    """
    needed = {"site", "candidate_tag", "post_id", "sha256", "general_tags"}
    missing = sorted(needed - set(manifest.columns))
    if missing:
        raise ValueError(f"the scrape manifest lacks column(s) {missing} needed to sample solo pictures")
    rows = manifest[
        (manifest["site"] == site)
        & (manifest["candidate_tag"] == tag)
        & manifest["sha256"].notna()
        & manifest["general_tags"].fillna("").str.split().apply(lambda tags: "solo" in tags)
    ]
    hashes = list(dict.fromkeys(rows.sort_values("post_id")["sha256"]))
    if len(hashes) <= size:
        return hashes
    picks = np.linspace(0, len(hashes) - 1, size).round().astype(int)
    return [hashes[i] for i in picks]


def manifest_sampler(
    manifest: pd.DataFrame,
    read_blob: Callable[[str], bytes],
    embed: Callable[[Sequence], np.ndarray],
    size: int = VISUAL_SAMPLE_SIZE,
) -> Callable[[str, str], np.ndarray]:
    """`VisualCheck.sample` over a scrape manifest: decode each pick, embed the batch.

    Undecodable files (truncated downloads, HTML pages) are skipped; cleaning
    quarantines them later with a reason.
    """
    if size < VISUAL_MIN_SAMPLES:
        raise ValueError(f"the visual sample size must be at least {VISUAL_MIN_SAMPLES} pictures, got {size}")

    def sample(site: str, tag: str) -> np.ndarray:
        images = []
        for sha in solo_sample(manifest, site, tag, size):
            decoded = decode_image(read_blob(sha), max_area=_EMBED_MAX_AREA)
            if not isinstance(decoded, Quarantined):
                images.append(decoded.image)
        return np.asarray(embed(images)) if images else np.zeros((0, 0), dtype=np.float32)

    return sample


def embed_reference_images(
    paths: Sequence[Path], embed: Callable[[Sequence], np.ndarray], character_key: str
) -> np.ndarray | None:
    """Identity vectors of the index's reference images; None when the row has none."""
    if not paths:
        return None
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{character_key}: reference image {path} not found; fix the path in the index row's "
                "reference_images (relative paths are relative to the index file)"
            )
        decoded = decode_image(Path(path).read_bytes(), max_area=_EMBED_MAX_AREA)
        if isinstance(decoded, Quarantined):
            raise ValueError(f"{character_key}: reference image {path} is not a usable picture ({decoded})")
        images.append(decoded.image)
    return np.asarray(embed(images))
