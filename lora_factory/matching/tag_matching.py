"""Decide which candidate tag on each site really is the character.

A wrong match poisons a whole dataset and a missed one starves it, and names collide
across franchises (many characters are called Ash). So every candidate is judged on
evidence, written down in a human-readable sentence:

- name similarity: the tag without its `_(qualifier)` suffixes against every index name;
- franchise share: the share of the candidate's scraped posts whose copyright tags
  include the character's franchise (a `_(franchise)` suffix on the tag counts too);
- post count: a little extra trust for well-used tags;
- visual consistency (when a `VisualCheck` is given, see `matching.visual`): the share
  of a sample of the candidate's solo pictures that the identity model says show the
  character (its reference images, or the dominant look across sites).

Outcomes (thresholds below): *trusted* needs a close name and post evidence from the
franchise; *likely* a close name and some franchise or visual evidence (e.g. only the
suffix, or pictures that show the character on a site that tags no copyrights);
*rejected* when the posts mostly belong to another franchise (a namesake), the suffix
names something else without post or visual evidence, the name is far off, the sampled
pictures show someone else, or the index bans the tag; everything else (a mixed sample
included) is *uncertain* and never chosen. Forced tags always win; rejected candidates
score 0. A name that collides with another franchise's character is therefore never
matched silently: it is rejected, or left uncertain with the reason written down.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Sequence

import numpy as np
import pandas as pd

from lora_factory.matching.visual import (
    VISUAL_CONSISTENT,
    VISUAL_MIN_REFERENCE,
    VISUAL_MIN_SAMPLES,
    VISUAL_REJECT_BELOW,
    VisualCheck,
    VisualReference,
    dominant_reference,
    visual_consistency,
)

TRUSTED, LIKELY, UNCERTAIN, REJECTED = "trusted", "likely", "uncertain", "rejected"

# Trusted: a close name, at least this many scraped posts, most of them from the franchise.
TRUSTED_MIN_CONFIDENCE = 0.80
TRUSTED_MIN_NAME_SIMILARITY = 0.85
TRUSTED_MIN_FRANCHISE_SHARE = 0.80
TRUSTED_MIN_POSTS = 3
# Likely: a close name and enough franchise or visual evidence (a matching suffix alone reaches it).
LIKELY_MIN_CONFIDENCE = 0.55
LIKELY_MIN_NAME_SIMILARITY = 0.80
# Rejected outright below this name similarity ("ashley" vs "ash" is 0.67: uncertain).
REJECT_BELOW_NAME_SIMILARITY = 0.50
# A namesake: another copyright is on at least this share of the posts and the franchise is not.
NAMESAKE_MIN_OTHER_SHARE = 0.50
# Franchise evidence that a `_(franchise)` suffix gives on its own.
SUFFIX_FRANCHISE_EVIDENCE = 0.80
# One name's tokens all inside the other's ("ash" in "ash ketchum"): booru tags often
# keep only the given name.
TOKEN_SUBSET_SIMILARITY = 0.85
# Post counts at which popularity stops adding trust.
POPULARITY_SATURATION_POSTS = 1000
# A franchise this short never counts as the start of a sub-series ("k" is not "k-on!").
MIN_FRANCHISE_PREFIX_CHARS = 4

TABLE_COLUMNS = [
    "site", "tag", "post_count", "name_similarity", "franchise_share", "visual_consistency",
    "visual_samples", "confidence", "outcome", "chosen", "evidence",
]
_OUTCOME_RANK = {TRUSTED: 0, LIKELY: 1, UNCERTAIN: 2, REJECTED: 3}
_TRAILING_QUALIFIER = re.compile(r"_?\(([^()]*)\)$")


@dataclass
class MatchResult:
    table: pd.DataFrame  # TABLE_COLUMNS, one row per (site, candidate tag), the chosen one first per site
    chosen: dict[str, str]  # site -> tag; sites with no trusted/likely candidate are absent


@dataclass
class _Evidence:
    """What is known about one candidate; `_decide` turns it into an outcome."""

    name_similarity: float
    franchise_share: float | None  # None: no scraped posts
    franchise_evidence: float  # the share, or the suffix's evidence when higher
    scraped_posts: int
    popularity: float  # 0..1
    namesake: str | None  # why the posts say it is another franchise's character
    suffix_mismatch: str | None  # why the suffix says so (visual evidence can overrule it)
    clauses: list[str] = field(default_factory=list)
    visual_consistency: float | None = None
    visual_samples: int = 0


def normalise_name(text: str) -> str:
    """Lower-case words: "Kal'tsit" -> "kaltsit", "ash_ketchum" -> "ash ketchum"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[_\-./·・]+", " ", text)
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


def split_tag(tag: str) -> tuple[str, list[str]]:
    """A tag's base and its trailing qualifiers: "surtr_(summer)_(arknights)" -> ("surtr", ["summer", "arknights"])."""
    base, qualifiers = tag, []
    while (match := _TRAILING_QUALIFIER.search(base)) and match.start() > 0:
        qualifiers.insert(0, match.group(1))
        base = base[: match.start()]
    return base, qualifiers


def is_franchise(tag: str, franchise: str) -> bool:
    """Whether a copyright tag (or a qualifier) names `franchise`.

    Ignores case, separators and qualifiers, and accepts the forms sites use for one
    franchise: a sub-series ("fate/grand_order" for "fate_(series)", "fire_emblem_heroes"
    for "fire_emblem"), a shortening by two or more whole words, and initials ("sao" for
    "sword_art_online"). A one-word shortening of the franchise does not count ("sword"
    is not "sword_art_online"; "re:zero" needs post evidence).
    """
    if not franchise:
        return False
    tag_forms = {normalise_name(tag), normalise_name(split_tag(tag)[0])} - {""}
    franchise_forms = {normalise_name(franchise), normalise_name(split_tag(franchise)[0])} - {""}
    return any(_same_franchise(t.split(), f.split()) for t in tag_forms for f in franchise_forms)


def _same_franchise(tag: list[str], franchise: list[str]) -> bool:
    if tag == franchise:
        return True
    if len(franchise) < len(tag):  # a sub-series: the franchise's words, then more
        return len(" ".join(franchise)) >= MIN_FRANCHISE_PREFIX_CHARS and tag[: len(franchise)] == franchise
    if len(tag) >= 2:  # a shortening by whole words
        return franchise[: len(tag)] == tag
    return len(franchise) >= 2 and tag[0] == "".join(word[0] for word in franchise)


def name_similarity(tag: str, names: Sequence[str]) -> tuple[float, str]:
    """The best similarity (0..1) of the tag's base to any of `names`, and that name."""
    base = normalise_name(split_tag(tag)[0])
    best, best_name = 0.0, ""
    for name in names:
        candidate = normalise_name(name)
        if not candidate or not base:
            continue
        score = max(
            SequenceMatcher(None, base, candidate).ratio(),
            # Family-name-first and given-name-first orders are the same name.
            SequenceMatcher(None, " ".join(sorted(base.split())), " ".join(sorted(candidate.split()))).ratio(),
        )
        shorter, longer = sorted((set(base.split()), set(candidate.split())), key=len)
        if shorter <= longer:
            score = max(score, TOKEN_SUBSET_SIMILARITY)
        if score > best:
            best, best_name = score, name
    return best, best_name


def match_character(
    key: str,
    display_name: str,
    names: Sequence[str],
    franchise: str,
    candidates: pd.DataFrame,
    posts: pd.DataFrame,
    forced_tags: dict[str, str] | None = None,
    banned_tags: Sequence[str] = (),
    visual: VisualCheck | None = None,
) -> MatchResult:
    """Judge every candidate tag and choose at most one per site.

    `candidates`: columns site, tag, post_count. `posts`: the scrape manifest (columns
    site, post_id, candidate_tag, copyright_tags at least). `forced_tags`: site -> tag
    from the index, always chosen. `banned_tags`: never chosen, on any site.
    `visual`: adds visual consistency to the evidence (see `matching.visual`).
    """
    forced = dict(forced_tags or {})
    banned = set(banned_tags)
    _require_columns(candidates, {"site", "tag", "post_count"}, "candidates", key)
    _require_columns(posts, {"site", "post_id", "candidate_tag", "copyright_tags"}, "posts", key)
    both = sorted({tag for tag in forced.values() if tag in banned})
    if both:
        raise ValueError(f"{key}: tag(s) {both} are both forced (site_tags) and banned in the index; keep one")
    all_names = list(dict.fromkeys(n for n in [display_name, *names] if normalise_name(n)))
    if not all_names:
        raise ValueError(f"{key}: the character has no usable name to match tags against")

    copyrights = _copyrights_by_candidate(posts)
    post_counts = {(str(r.site), str(r.tag)): int(r.post_count) for r in candidates.itertuples(index=False)}
    for site, tag in forced.items():
        # A forced tag may not have come out of the tag search; count its scraped posts instead.
        post_counts.setdefault((site, tag), len(copyrights.get((site, tag), [])))

    evidence = {
        candidate: _text_evidence(candidate[1], count, copyrights.get(candidate, []), all_names, franchise)
        for candidate, count in post_counts.items()
    }
    if visual is not None:
        _add_visual_evidence(key, evidence, visual, forced, banned)

    records = []
    for (site, tag), post_count in post_counts.items():
        found = evidence[(site, tag)]
        outcome, confidence, verdict = _decide(found)
        if forced.get(site) == tag:
            outcome, confidence, verdict = TRUSTED, 1.0, "forced by index"
        elif tag in banned:
            outcome, confidence, verdict = REJECTED, 0.0, "banned by index"
        records.append({
            "site": site, "tag": tag, "post_count": post_count,
            "name_similarity": round(found.name_similarity, 4),
            "franchise_share": None if found.franchise_share is None else round(found.franchise_share, 4),
            "visual_consistency": None if found.visual_consistency is None else round(found.visual_consistency, 4),
            "visual_samples": found.visual_samples,
            "confidence": confidence, "outcome": outcome, "chosen": False,
            "evidence": "; ".join(filter(None, [verdict, *found.clauses])),
        })

    table = pd.DataFrame(records, columns=TABLE_COLUMNS)
    if not table.empty:
        table["_forced"] = [forced.get(site) == tag for site, tag in zip(table["site"], table["tag"])]
        table["_rank"] = table["outcome"].map(_OUTCOME_RANK)
        table = table.sort_values(
            ["site", "_forced", "_rank", "confidence", "post_count", "tag"],
            ascending=[True, False, True, False, False, True],
        ).drop(columns=["_forced", "_rank"]).reset_index(drop=True)
    chosen: dict[str, str] = {}
    for row in table.itertuples(index=False):
        if row.site not in chosen and row.outcome in (TRUSTED, LIKELY):
            chosen[row.site] = row.tag
    if not table.empty:
        table["chosen"] = [chosen.get(site) == tag for site, tag in zip(table["site"], table["tag"])]
    return MatchResult(table=table, chosen=chosen)


def surviving_posts(manifest: pd.DataFrame, chosen: dict[str, str]) -> pd.DataFrame:
    """Manifest rows scraped for each site's chosen tag that hold a file, one row per distinct file."""
    _require_columns(manifest, {"site", "candidate_tag", "sha256"}, "manifest", "surviving_posts")
    picked = pd.Series(False, index=manifest.index)
    for site, tag in chosen.items():
        picked |= (manifest["site"] == site) & (manifest["candidate_tag"] == tag)
    kept = manifest[picked & manifest["sha256"].notna()]
    return kept.drop_duplicates(subset="sha256", keep="first").reset_index(drop=True)


def _require_columns(frame: pd.DataFrame, needed: set[str], what: str, key: str) -> None:
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise ValueError(f"{key}: {what} table lacks column(s) {missing}; it has {list(frame.columns)}")


def _copyrights_by_candidate(posts: pd.DataFrame) -> dict[tuple[str, str], list[list[str]]]:
    """(site, candidate tag) -> the copyright tags of each distinct post listed under it."""
    unique = posts.drop_duplicates(subset=["site", "post_id", "candidate_tag"])
    grouped: dict[tuple[str, str], list[list[str]]] = {}
    for row in unique.itertuples(index=False):
        text = row.copyright_tags if isinstance(row.copyright_tags, str) else ""
        grouped.setdefault((str(row.site), str(row.candidate_tag)), []).append(text.split())
    return grouped


def _text_evidence(
    tag: str, post_count: int, copyrights: list[list[str]], names: list[str], franchise: str
) -> _Evidence:
    similarity, best_name = name_similarity(tag, names)
    base, qualifiers = split_tag(tag)
    suffix_names_franchise = any(is_franchise(q, franchise) for q in qualifiers) if qualifiers else None

    clauses = [f"name '{base}' vs '{best_name or names[0]}': {similarity:.0%}"]
    share: float | None = None
    other, other_share = None, 0.0
    if copyrights:
        in_franchise = sum(any(is_franchise(c, franchise) for c in post) for post in copyrights)
        share = in_franchise / len(copyrights)
        others = Counter(c for post in copyrights for c in set(post) if not is_franchise(c, franchise))
        if others:
            other, other_count = others.most_common(1)[0]
            other_share = other_count / len(copyrights)
        clauses.append(f"{in_franchise}/{len(copyrights)} scraped posts carry {franchise or 'no franchise'}")
        if other is not None:
            clauses.append(f"most common other copyright {other} ({other_share:.0%})")
    else:
        clauses.append("no scraped posts")
    if suffix_names_franchise:
        clauses.append(f"suffix names {franchise}")
    clauses.append(f"{post_count} posts on the site")

    franchise_evidence = share or 0.0
    if suffix_names_franchise:
        franchise_evidence = max(franchise_evidence, SUFFIX_FRANCHISE_EVIDENCE)
    namesake = suffix_mismatch = None
    if other is not None and other_share >= NAMESAKE_MIN_OTHER_SHARE and (share or 0.0) < NAMESAKE_MIN_OTHER_SHARE:
        namesake = f"a namesake from {other}, not {franchise or 'the index franchise'}"
    elif suffix_names_franchise is False and (share or 0.0) < NAMESAKE_MIN_OTHER_SHARE:
        suffix_mismatch = f"suffix ({', '.join(qualifiers)}) is not the franchise {franchise or '(none in index)'}"
    return _Evidence(
        name_similarity=similarity,
        franchise_share=share,
        franchise_evidence=franchise_evidence,
        scraped_posts=len(copyrights),
        popularity=min(1.0, math.log10(1 + max(post_count, 0)) / math.log10(POPULARITY_SATURATION_POSTS)),
        namesake=namesake,
        suffix_mismatch=suffix_mismatch,
        clauses=clauses,
    )


def _add_visual_evidence(
    key: str,
    evidence: dict[tuple[str, str], _Evidence],
    visual: VisualCheck,
    forced: dict[str, str],
    banned: set[str],
) -> None:
    """Embed samples of the candidates still in play and score them against the character's look."""
    samples: dict[tuple[str, str], np.ndarray] = {}
    for (site, tag), found in evidence.items():
        is_forced = forced.get(site) == tag
        text_rejected = found.namesake or found.name_similarity < REJECT_BELOW_NAME_SIMILARITY
        if is_forced or not (tag in banned or text_rejected):
            vectors = np.asarray(visual.sample(site, tag))
            if vectors.ndim != 2:
                raise ValueError(f"{key}: visual sample of {site}:{tag} must be [n, dim] vectors, got {vectors.shape}")
            samples[(site, tag)] = vectors
    reference = _visual_reference(evidence, samples, visual, forced)
    for candidate, vectors in samples.items():
        found = evidence[candidate]
        if reference is None:
            found.clauses.append("visual: no reference (no reference images, no trusted candidate to compare with)")
        elif len(vectors) < VISUAL_MIN_SAMPLES:
            found.clauses.append(f"visual: only {len(vectors)} solo pictures to sample, not judged")
        else:
            consistency = visual_consistency(vectors, reference.vectors, visual.identity)
            found.visual_consistency, found.visual_samples = consistency, len(vectors)
            matching = round(consistency * len(vectors))
            found.clauses.append(
                f"visual: {matching}/{len(vectors)} sampled solo pictures match {reference.description}"
            )


def _visual_reference(
    evidence: dict[tuple[str, str], _Evidence],
    samples: dict[tuple[str, str], np.ndarray],
    visual: VisualCheck,
    forced: dict[str, str],
) -> VisualReference | None:
    """The index's reference images, else the dominant cluster of the trusted and forced candidates' pictures."""
    if visual.reference is not None and len(visual.reference):
        return VisualReference(np.asarray(visual.reference), f"the {len(visual.reference)} reference images")
    pooled = [
        (candidate, vectors) for candidate, vectors in samples.items()
        if len(vectors) and (forced.get(candidate[0]) == candidate[1] or _decide(evidence[candidate])[0] == TRUSTED)
    ]
    if not pooled:
        return None
    anchor = dominant_reference(np.concatenate([vectors for _, vectors in pooled]), visual.identity)
    if len(anchor) < VISUAL_MIN_REFERENCE:
        return None
    sources = ", ".join(f"{site}:{tag}" for (site, tag), _ in pooled)
    return VisualReference(anchor, f"the dominant look ({len(anchor)} pictures) of {sources}")


def _decide(found: _Evidence) -> tuple[str, float, str | None]:
    """Outcome, confidence and (for a rejection or a mixed sample) the reason first in the evidence."""
    visual = found.visual_consistency
    content = found.franchise_evidence
    if visual is not None:
        # Consistent pictures are independent evidence (combined like two witnesses);
        # doubtful ones scale the text evidence down.
        content = 1 - (1 - content) * (1 - visual) if visual >= VISUAL_CONSISTENT else content * visual
    confidence = round(found.name_similarity * content * (0.9 + 0.1 * found.popularity), 4)

    if found.namesake:
        return REJECTED, 0.0, found.namesake
    if visual is not None and visual < VISUAL_REJECT_BELOW:
        return REJECTED, 0.0, "its sampled pictures show another character"
    if found.suffix_mismatch and (visual is None or visual < VISUAL_CONSISTENT):
        return REJECTED, 0.0, found.suffix_mismatch
    if found.name_similarity < REJECT_BELOW_NAME_SIMILARITY:
        return REJECTED, 0.0, "name matches no index name"
    if visual is not None and visual < VISUAL_CONSISTENT:
        return UNCERTAIN, confidence, "mixed: many sampled pictures show another character"
    if (
        confidence >= TRUSTED_MIN_CONFIDENCE
        and found.name_similarity >= TRUSTED_MIN_NAME_SIMILARITY
        and found.franchise_share is not None
        and found.franchise_share >= TRUSTED_MIN_FRANCHISE_SHARE
        and found.scraped_posts >= TRUSTED_MIN_POSTS
    ):
        return TRUSTED, confidence, None
    if confidence >= LIKELY_MIN_CONFIDENCE and found.name_similarity >= LIKELY_MIN_NAME_SIMILARITY:
        return LIKELY, confidence, None
    return UNCERTAIN, confidence, None
