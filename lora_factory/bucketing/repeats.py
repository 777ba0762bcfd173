"""Repeats: how many times each image is seen per epoch, so every group weighs the same.

A scraped dataset is lopsided: 200 crops of the default outfit, 12 of the swimsuit; as
many head crops as full-body ones. Left alone, the LoRA learns the default outfit and
the face at the expense of the rest. The rule:

- a *unit* is one (outfit cluster, crop kind); every unit should contribute the same
  number of samples per epoch, times its kind's weight (head crops 0.5: every person
  already gives one, and too many close-ups make the LoRA draw faces too large);
- inside a unit, images of better quality tiers are seen more (the manual practice of
  4 / 8 / 16 repeats for low / medium / high quality -> multipliers 0.5 / 1 / 2). The
  tier comes from the aesthetic score (0 worst .. 1 masterpiece): below 0.25 (the
  expected label is under "normal") low, from 0.75 (over "great") high, else medium;
- repeats are scaled so the smallest is 1, rounded, and capped at `max_repeats`: a unit
  of 3 images repeated 60 times would be memorised, not learnt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

DEFAULT_KIND_WEIGHTS: dict[str, float] = {"full": 1.0, "upper": 1.0, "head": 0.5}
DEFAULT_TIER_MULTIPLIERS: dict[str, float] = {"high": 2.0, "medium": 1.0, "low": 0.5}
# The aesthetic classifier's labels, best first, mapped to quality tiers.
AESTHETIC_TIERS: dict[str, str] = {
    "masterpiece": "high",
    "best": "high",
    "great": "medium",
    "good": "medium",
    "normal": "medium",
    "low": "low",
    "worst": "low",
}
DEFAULT_MAX_REPEATS = 20
# Aesthetic-score cut points between the low / medium / high tiers (see the docstring).
DEFAULT_QUALITY_CUTS: tuple[float, float] = (0.25, 0.75)
REPEAT_RULE = (
    "Groups = (outfit cluster, crop kind, quality tier). Every (cluster, kind) unit gets "
    "the same samples per epoch times its kind's weight (head crops {head}); inside a "
    "unit, quality tiers (aesthetic score < {cut_low} low, >= {cut_high} high) are "
    "repeated in the ratio low:medium:high = {low}:{medium}:{high} (hand-made datasets: 4/8/16). "
    "Repeats are scaled so the least repeated group has 1, rounded, capped at {cap}."
)


@dataclass
class RepeatPlan:
    # group, cluster, kind, tier, images, repeats, samples (images x repeats), share
    groups: pd.DataFrame
    row_groups: pd.Series  # the group name of every input row (same index as the input)

    def row_repeats(self) -> pd.Series:
        """Repeats of every input row."""
        repeats = dict(zip(self.groups["group"], self.groups["repeats"], strict=True))
        return self.row_groups.map(repeats).astype(int)

    @property
    def samples_per_epoch(self) -> int:
        return int(self.groups["samples"].sum())

    def steps_per_epoch(self, batch_size: int, buckets: pd.Series | None = None) -> int:
        """Optimizer steps per epoch; with the rows' `buckets`, batches never mix buckets."""
        if buckets is None:
            return steps_per_epoch([self.samples_per_epoch], batch_size)
        samples = self.row_repeats().groupby(buckets.astype(str)).sum()
        return steps_per_epoch(samples.tolist(), batch_size)


def steps_per_epoch(samples_per_bucket: Iterable[int], batch_size: int) -> int:
    """Steps for one epoch when each bucket is batched on its own (last batch partial)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return sum(math.ceil(n / batch_size) for n in samples_per_bucket if n > 0)


def aesthetic_tier(label: object) -> str:
    return AESTHETIC_TIERS.get(str(label), "medium")


def quality_tier(score: float, cuts: tuple[float, float] = DEFAULT_QUALITY_CUTS) -> str:
    """low / medium / high from an aesthetic score in 0..1."""
    low, high = cuts
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"quality cuts must satisfy 0 <= low <= high <= 1, got {cuts}")
    if score < low:
        return "low"
    return "high" if score >= high else "medium"


def describe_rule(
    kind_weights: Mapping[str, float] = DEFAULT_KIND_WEIGHTS,
    tier_multipliers: Mapping[str, float] = DEFAULT_TIER_MULTIPLIERS,
    max_repeats: int = DEFAULT_MAX_REPEATS,
    quality_cuts: tuple[float, float] = DEFAULT_QUALITY_CUTS,
) -> str:
    """The repeat rule in words, with the numbers in force (for metadata and the card)."""
    return REPEAT_RULE.format(
        head=kind_weights.get("head", 1.0),
        cap=max_repeats,
        cut_low=quality_cuts[0],
        cut_high=quality_cuts[1],
        **{tier: tier_multipliers[tier] for tier in ("low", "medium", "high")},
    )


def _tiers(table: pd.DataFrame, cuts: tuple[float, float]) -> pd.Series:
    """Each row's quality tier: from `aesthetic_score`, else `aesthetic_label`, else medium."""
    tiers = pd.Series("medium", index=table.index, dtype=object)
    if "aesthetic_label" in table.columns:
        tiers = table["aesthetic_label"].map(aesthetic_tier).astype(object)
    if "aesthetic_score" in table.columns:
        scores = pd.to_numeric(table["aesthetic_score"], errors="coerce")
        known = scores.notna()
        tiers[known] = scores[known].map(lambda s: quality_tier(float(s), cuts))
    return tiers


def assign_repeats(
    table: pd.DataFrame,
    kind_weights: Mapping[str, float] = DEFAULT_KIND_WEIGHTS,
    tier_multipliers: Mapping[str, float] = DEFAULT_TIER_MULTIPLIERS,
    max_repeats: int = DEFAULT_MAX_REPEATS,
    quality_cuts: tuple[float, float] = DEFAULT_QUALITY_CUTS,
) -> RepeatPlan:
    """Repeats per (cluster, kind, quality tier) group of `table`'s rows.

    Uses the columns `kind` (full/upper/head), `cluster` (outfit cluster; all 0 when
    absent) and `aesthetic_score` or `aesthetic_label` (all "medium" tier when absent).
    """
    if "kind" not in table.columns:
        raise ValueError("table needs a 'kind' column (full/upper/head)")
    if max_repeats < 1:
        raise ValueError(f"max_repeats must be at least 1, got {max_repeats}")
    unknown = set(table["kind"].astype(str)) - set(kind_weights)
    if unknown:
        raise ValueError(f"no weight for crop kind(s) {sorted(unknown)}: add them to kind_weights")
    missing_tiers = set(AESTHETIC_TIERS.values()) - set(tier_multipliers)
    if missing_tiers:
        raise ValueError(f"tier_multipliers lacks tier(s) {sorted(missing_tiers)}")
    if min(kind_weights.values()) <= 0 or min(tier_multipliers.values()) <= 0:
        raise ValueError("kind weights and tier multipliers must be positive")
    frame = pd.DataFrame(
        {
            "cluster": table["cluster"].astype(int) if "cluster" in table.columns else 0,
            "kind": table["kind"].astype(str),
            "tier": _tiers(table, quality_cuts),
        },
        index=table.index,
    )
    frame["group"] = "c" + frame["cluster"].astype(str) + "_" + frame["kind"] + "_" + frame["tier"]
    columns = ["group", "cluster", "kind", "tier", "images", "repeats", "samples", "share"]
    if frame.empty:
        return RepeatPlan(pd.DataFrame(columns=columns), frame["group"])

    groups = frame.groupby(["group", "cluster", "kind", "tier"], as_index=False).size()
    groups = groups.rename(columns={"size": "images"})
    groups["multiplier"] = groups["tier"].map(lambda t: float(tier_multipliers[t]))
    groups["weight"] = groups["kind"].map(lambda k: float(kind_weights[k]))
    # Quality-weighted image count of each unit: the unit's samples are shared by it.
    groups["unit_mass"] = (groups["images"] * groups["multiplier"]).groupby(
        [groups["cluster"], groups["kind"]]
    ).transform("sum")
    # Raw repeats = scale * weight * multiplier / unit_mass; the scale makes the least
    # repeated group exactly 1.
    relative = groups["weight"] * groups["multiplier"] / groups["unit_mass"]
    repeats = (relative / relative.min()).round().clip(lower=1, upper=max_repeats).astype(int)
    groups["repeats"] = repeats
    groups["samples"] = groups["images"] * groups["repeats"]
    groups["share"] = groups["samples"] / groups["samples"].sum()
    groups = groups.sort_values(["cluster", "kind", "tier"], ignore_index=True)
    return RepeatPlan(groups[columns], frame["group"])
