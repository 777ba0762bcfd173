"""Captions for a character's crops: tagger output -> trigger word + the tags worth keeping.

The practice the factory follows (seeds 002 and 003, and CyberHarem's):
1. keep general tags above `general_threshold` (the tagger's scores are kept), fold
   synonyms, drop blacklisted and meta tags and tags implied by a more specific one;
2. core tags = feature tags (hair, eyes, ears, horns...; never breast size) present in
   at least `core_threshold` of the crops: what the character always looks like.
   `fold_species` (default on) counts species tags (`horse_girl`) as features,
   `fold_generic` (default off) counts `1girl`/`1boy`/`solo` as well;
3. the trigger word comes first (train with keep_tokens=1 so shuffling never moves it);
4. crops are clustered by outfit; each cluster gets its frequent outfit tags.

Styles decide what the trigger word absorbs:
- `fluid`: nothing is pruned; the trigger is added (the core tags follow it), so every
  feature stays promptable but the character needs them in the prompt;
- `semi-static` (default): the core tags are pruned: the trigger alone draws the
  character, everything else (outfits, rarer hairstyles, breast size) stays editable;
- `static`: the core tags and the dominant outfit (the biggest cluster's own garments,
  footwear excepted) are pruned from that outfit's crops: the trigger draws the
  character in that outfit; other outfits keep their words.

Outfit triggers (`outfit_triggers`, sub-concepts of the character): a cluster of at least
`outfit_trigger_min_images` pictures (8: the usual minimum for a concept) whose garments are its own
gets a trigger named after them (`navy_jacket_beige_skirt`), written after the
character's in its body crops; in the pruning styles its garments are folded into it.
Garments that several clusters share are never folded: neither trigger would own them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

from lora_factory.captioning.tags import (
    GENERIC_TAGS,
    OUTFIT_MODIFIERS,
    canonical_tag,
    clean_tags,
    escape_for_prompt,
    is_feature_tag,
    is_garment_tag,
    is_outfit_candidate,
    normalise_tag,
)

if TYPE_CHECKING:  # only `general` and `character` are read: any such object will do
    from lora_factory.vision.tagger import TagPrediction

CaptionStyle = Literal["semi-static", "fluid", "static"]
CAPTION_STYLES: tuple[str, ...] = ("semi-static", "fluid", "static")
# Outfit splits: a confirming tag's frequency differs by this much between the sides,
# significantly (Fisher's exact test at this family-wise level over every (cut tag,
# confirming tag) pair: a pose tag confirming another by chance is likely among many
# pairs; a garment of 10 of 30 crops has p ~ 1e-8), and each side holds at least this
# share of the crops (and 3): a smaller "outfit" could not be balanced without
# memorising it.
_MIN_SHIFT = 0.6
_FAMILY_P_VALUE = 0.05
_MIN_CLUSTER_SHARE = 0.1


@dataclass(frozen=True)
class CaptionConfig:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    core_threshold: float = 0.35  # share of crops a feature tag needs to become core
    style: CaptionStyle = "semi-static"
    remove_underscores: bool = True
    fold_generic: bool = False  # 1girl/1boy/solo are core candidates (pruned when frequent)
    fold_species: bool = True  # species tags (horse_girl) are core candidates
    extra_blacklist: tuple[str, ...] = ()  # e.g. the index row's banned tags
    max_clusters: int = 4
    cluster_tag_share: float = 0.5  # a tag describes a cluster when this share of it has it
    outfit_triggers: bool = False
    outfit_trigger_min_images: int = 8  # distinct pictures of the outfit (8: the usual minimum for a concept)
    outfit_trigger_max_tags: int = 4  # garments named in an outfit trigger

    def __post_init__(self) -> None:
        if self.style not in CAPTION_STYLES:
            raise ValueError(f"style must be one of {CAPTION_STYLES}, got {self.style!r}")
        for name in ("general_threshold", "character_threshold", "core_threshold", "cluster_tag_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("max_clusters", "outfit_trigger_min_images", "outfit_trigger_max_tags"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def is_core_candidate(self, tag: str) -> bool:
        if tag in GENERIC_TAGS:
            return self.fold_generic
        return is_feature_tag(tag, include_species=self.fold_species)


@dataclass
class CaptionResult:
    # crop_sha256, caption, outfit_trigger, tags (caption tags after the triggers),
    # tag_scores (JSON: every cleaned tag -> score, core tags included), tagger_tags
    # (JSON: the tagger's tags above the threshold before cleaning), characters (JSON),
    # cluster
    table: pd.DataFrame
    core_tags: list[str]
    # cluster, size (crops), images (distinct pictures of its body crops), tags (its
    # frequent outfit tags), folded_tags (pruned into a trigger), trigger (outfit
    # trigger, "" if none)
    clusters: pd.DataFrame
    # The character's trigger as every caption writes it: what prompts must use, verbatim.
    trigger_word: str
    tag_frequency: dict[str, int] = field(default_factory=dict)  # caption token -> count
    core_share: dict[str, float] = field(default_factory=dict)  # core tag -> share of crops


def caption_dataset(
    crops: pd.DataFrame,
    predictions: Sequence[TagPrediction],
    trigger_word: str,
    config: CaptionConfig = CaptionConfig(),
) -> CaptionResult:
    """Caption every crop (row i of `crops` is described by `predictions[i]`).

    `crops` needs `crop_sha256`; with `kind`, `source_sha256` and `person_index` head
    crops join the outfit cluster of their own person's body crop.
    """
    if len(crops) != len(predictions):
        raise ValueError(f"{len(crops)} crops but {len(predictions)} tagger predictions")
    if "crop_sha256" not in crops.columns:
        raise ValueError("crops needs a crop_sha256 column")
    if not trigger_word.strip():
        raise ValueError("trigger_word is empty: set the character's trigger word in the index")
    trigger = canonical_tag(trigger_word)
    written_trigger = escape_for_prompt(trigger, config.remove_underscores)

    scored = [_cleaned_scores(prediction, trigger, config) for prediction in predictions]
    core = core_tags([list(scores) for scores in scored], config.core_threshold, config.is_core_candidate)
    core_set = set(core)
    labels, clusters = outfit_clusters(crops, scored, core_set, config)
    clusters = fold_outfits(clusters, config)
    kinds = crops["kind"].astype(str).to_numpy() if "kind" in crops.columns else np.full(len(crops), "full")

    folded_by_cluster = dict(zip(clusters["cluster"], clusters["folded_tags"], strict=True))
    trigger_by_cluster = dict(zip(clusters["cluster"], clusters["trigger"], strict=True))
    captions, caption_tags, outfit_triggers = [], [], []
    for scores, cluster, kind in zip(scored, labels, kinds, strict=True):
        folded, cluster_trigger = folded_by_cluster[cluster], trigger_by_cluster[cluster]
        # An outfit trigger goes on body crops only (a head crop barely shows the
        # outfit) and takes the garments only where it is written; static's dominant
        # outfit (no trigger of its own) folds into the character's on all its crops.
        outfit_trigger = cluster_trigger if kind != "head" else ""
        if config.style == "fluid":
            pruned: set[str] = set()
        elif outfit_trigger or not cluster_trigger:
            pruned = core_set | set(folded)
        else:
            pruned = core_set
        kept = [tag for tag in scores if tag not in pruned]
        if config.style == "fluid":  # core tags right after the trigger, in core order
            kept = [t for t in core if t in scores] + [t for t in kept if t not in core_set]
        caption_tags.append(kept)
        outfit_triggers.append(outfit_trigger)
        words = [written_trigger]
        if outfit_trigger:  # one token sequence of its own: underscores kept
            words.append(escape_for_prompt(outfit_trigger, remove_underscores=False))
        words += [escape_for_prompt(t, config.remove_underscores) for t in kept]
        captions.append(", ".join(words))

    counts = Counter(tag for scores in scored for tag in scores)
    table = pd.DataFrame(
        {
            "crop_sha256": crops["crop_sha256"].astype(str).to_numpy(),
            "caption": captions,
            "outfit_trigger": outfit_triggers,
            "tags": caption_tags,
            "tag_scores": [json.dumps(s) for s in scored],
            "tagger_tags": [
                json.dumps({normalise_tag(t): round(float(v), 4) for t, v in p.general.items()
                            if v >= config.general_threshold})
                for p in predictions
            ],
            "characters": [
                json.dumps(
                    {canonical_tag(t): round(float(v), 4) for t, v in p.character.items()
                     if v >= config.character_threshold}
                )
                for p in predictions
            ],
            "cluster": labels,
        }
    )
    share = {tag: round(counts[tag] / len(scored), 4) for tag in core}
    return CaptionResult(table, core, clusters, written_trigger, tag_frequency(captions), share)


def _cleaned_scores(prediction: TagPrediction, trigger: str, config: CaptionConfig) -> dict[str, float]:
    """Cleaned general tags -> score, highest score first (the tagger's own order)."""
    scores: dict[str, float] = {}
    for tag, score in prediction.general.items():
        if score >= config.general_threshold:
            name = canonical_tag(tag)
            scores[name] = max(scores.get(name, 0.0), float(score))
    # Character tags never reach captions: this character's is the trigger word, any
    # other character's is tagger noise (or contamination the cleaning missed).
    banned = (*config.extra_blacklist, trigger, *prediction.character)
    ordered = sorted(scores, key=lambda t: (-scores[t], t))
    kept = clean_tags(ordered, extra_blacklist=banned)
    return {tag: round(scores[tag], 4) for tag in kept}


def core_tags(
    tag_lists: Sequence[Iterable[str]],
    threshold: float,
    is_candidate: Callable[[str], bool] = is_feature_tag,
) -> list[str]:
    """Candidate (by default: feature) tags present in at least `threshold` of the
    lists, most frequent first."""
    if not tag_lists:
        return []
    counts = Counter(tag for tags in tag_lists for tag in set(tags) if is_candidate(tag))
    needed = threshold * len(tag_lists)
    return sorted((t for t, n in counts.items() if n >= needed), key=lambda t: (-counts[t], t))


def fold_outfits(clusters: pd.DataFrame, config: CaptionConfig) -> pd.DataFrame:
    """`clusters` with `folded_tags` and `trigger` columns (see the module docstring).

    A cluster's own garments are its frequent garment tags (footwear excepted) that no
    other cluster lists. The static style folds cluster 0's (the biggest) into the
    character trigger; with outfit triggers, every other cluster of at least
    `outfit_trigger_min_images` pictures that has own garments gets a trigger.
    """
    garments = {
        int(row.cluster): [t for t in row.tags if is_garment_tag(t)] for row in clusters.itertuples()
    }
    owners = Counter(tag for tags in garments.values() for tag in set(tags))
    own = {cluster: [t for t in tags if owners[t] == 1] for cluster, tags in garments.items()}
    folded: dict[int, list[str]] = {cluster: [] for cluster in own}
    triggers: dict[int, str] = {cluster: "" for cluster in own}
    if config.style == "static" and own:
        folded[0] = own[0]
    # One outfit alone: its trigger would learn what the character's learns.
    if config.outfit_triggers and len(clusters) >= 2:
        for row in clusters.itertuples():
            cluster = int(row.cluster)
            if folded[cluster] or not own[cluster] or row.images < config.outfit_trigger_min_images:
                continue
            folded[cluster] = own[cluster]
            triggers[cluster] = outfit_trigger_name(own[cluster], config.outfit_trigger_max_tags)
    out = clusters.copy()
    out["folded_tags"] = [folded[int(c)] for c in out["cluster"]]
    out["trigger"] = [triggers[int(c)] for c in out["cluster"]]
    return out


def outfit_trigger_name(garments: Sequence[str], max_tags: int = 4) -> str:
    """An outfit trigger as hand-made LoRAs name them: the garments, most visible
    (frequent) first and cut or exposure modifiers last (`yellow_short_kimono_obi_sleeveless`)."""
    named = [t for t in garments if t not in OUTFIT_MODIFIERS][:max_tags]
    named += [t for t in garments if t in OUTFIT_MODIFIERS][: max(0, max_tags - len(named))]
    if not named:
        raise ValueError("an outfit trigger needs at least one garment tag")
    return "_".join(named)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Token counts as sd-scripts records them in `ss_tag_frequency`: every
    comma-separated token of every caption, lower-cased; most frequent first."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(token.strip().lower() for token in caption.split(",") if token.strip())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def outfit_clusters(
    crops: pd.DataFrame,
    scored: Sequence[dict[str, float]],
    core: set[str],
    config: CaptionConfig,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Cluster label per crop and a table of clusters with their frequent outfit tags.

    Body crops (full/upper) are described by their outfit candidate tags (not features,
    counts, framing or backgrounds) and split top-down: a group is cut in two along the
    presence of one tag only when another tag confirms the cut, i.e. is much more (or
    less) frequent on one side (by `_MIN_SHIFT`, and significant by Fisher's exact
    test). Garments pass that test, because they come and go with their outfit (cut
    along `green_dress` and `beige_skirt` disappears); a pose or expression tag or a
    garment the tagger missed now and then does not, because nothing else changes with
    it. The best-confirmed cut is taken until `max_clusters` groups or no cut is left;
    no randomness. Head crops show no outfit: they join their person's body crop.
    """
    count = len(scored)
    kinds = crops["kind"].astype(str).to_numpy() if "kind" in crops.columns else np.full(count, "full")
    body = np.flatnonzero(kinds != "head")
    tally = Counter(t for i in body for t in scored[i] if t not in core and is_outfit_candidate(t))
    vocabulary = sorted(t for t, n in tally.items() if n >= 2)
    presence = np.array([[tag in scored[i] for tag in vocabulary] for i in range(count)], dtype=bool)
    presence = presence.reshape(count, len(vocabulary))

    labels = np.zeros(count, dtype=np.int64)
    if len(body) >= 2 and vocabulary:
        labels[body] = _relabel_by_size(_split_by_confirmed_tags(presence[body], config.max_clusters))
    _assign_heads(crops, kinds, labels, presence, body)

    # Pictures, not crops, measure how many views of an outfit there are: the full and
    # upper crops of one picture show it from the same angle.
    pictures = (
        crops["source_sha256"].astype(str).to_numpy()
        if "source_sha256" in crops.columns
        else crops["crop_sha256"].astype(str).to_numpy()
    )
    rows = []
    for cluster in range(int(labels.max()) + 1 if count else 0):
        members = [i for i in np.flatnonzero(labels == cluster) if kinds[i] != "head"]
        seen = Counter(t for i in members for t in scored[i] if t not in core and is_outfit_candidate(t))
        needed = config.cluster_tag_share * max(1, len(members))
        frequent = sorted((t for t, n in seen.items() if n >= needed), key=lambda t: (-seen[t], t))
        rows.append(
            {
                "cluster": cluster,
                "size": int((labels == cluster).sum()),
                "images": len({pictures[i] for i in members}),
                "tags": frequent,
            }
        )
    return labels, pd.DataFrame(rows, columns=["cluster", "size", "images", "tags"])


def _split_by_confirmed_tags(presence: np.ndarray, max_clusters: int) -> np.ndarray:
    """Top-down splits of the rows of a [crops, tags] presence matrix (see outfit_clusters)."""
    count = len(presence)
    labels = np.zeros(count, dtype=np.int64)
    min_side = max(3, math.ceil(_MIN_CLUSTER_SHARE * count))
    while labels.max() + 1 < max_clusters:
        best = None  # (confirming tags, smaller side, -tag index), cluster, tag
        for cluster in range(labels.max() + 1):
            members = np.flatnonzero(labels == cluster)
            for tag in range(presence.shape[1]):
                has = presence[members, tag]
                if min(has.sum(), (~has).sum()) < min_side:
                    continue
                score = (_confirming_tags(presence[members], has, tag), min(has.sum(), (~has).sum()), -tag)
                if score[0] and (best is None or score > best[0]):
                    best = (score, cluster, tag)
        if best is None:
            break
        _, cluster, tag = best
        members = np.flatnonzero(labels == cluster)
        labels[members[presence[members, tag]]] = labels.max() + 1
    return labels


def _confirming_tags(group: np.ndarray, side: np.ndarray, split_tag: int) -> int:
    """How many other tags differ between the two sides of a cut, strongly and
    significantly (Fisher's exact test)."""
    inside, outside = group[side], group[~side]
    shift = np.abs(inside.mean(axis=0) - outside.mean(axis=0))
    confirming = 0
    for tag in np.flatnonzero(shift >= _MIN_SHIFT):
        if tag == split_tag:
            continue
        table = [[inside[:, tag].sum(), len(inside) - inside[:, tag].sum()],
                 [outside[:, tag].sum(), len(outside) - outside[:, tag].sum()]]
        # Bonferroni over every (cut tag, confirming tag) pair that could be tried.
        if fisher_exact(table).pvalue < _FAMILY_P_VALUE / group.shape[1] ** 2:
            confirming += 1
    return confirming


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster 0 is the biggest; equal sizes keep the order of first appearance."""
    present, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(present)), key=lambda j: (-sizes[j], first[j]))
    mapping = {int(present[j]): new for new, j in enumerate(order)}
    return np.array([mapping[int(label)] for label in labels], dtype=np.int64)


def _assign_heads(
    crops: pd.DataFrame, kinds: np.ndarray, labels: np.ndarray, presence: np.ndarray, body: np.ndarray
) -> None:
    """Head crops take their person's body-crop cluster, else the cluster whose body
    crops share most of their tags (a head crop may still show a hat), else 0."""
    person_cluster: dict[tuple, int] = {}
    if {"source_sha256", "person_index"} <= set(crops.columns):
        persons = list(zip(crops["source_sha256"], crops["person_index"], strict=True))
        for i in body:
            person_cluster.setdefault(persons[i], int(labels[i]))
    else:
        persons = [None] * len(kinds)
    clusters = np.unique(labels[body]) if len(body) else np.zeros(1, dtype=np.int64)
    for i in np.flatnonzero(kinds == "head"):
        shown = presence[i]
        if persons[i] in person_cluster:
            labels[i] = person_cluster[persons[i]]
        elif shown.any() and len(clusters) > 1:
            overlap = [presence[body[labels[body] == c]][:, shown].mean() for c in clusters]
            labels[i] = int(clusters[int(np.argmax(overlap))])
        else:
            labels[i] = 0
