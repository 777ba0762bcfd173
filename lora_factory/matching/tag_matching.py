"""Decide which candidate tag on each site really is the character.

A wrong match poisons a whole dataset and a missed one starves it, and names collide
across franchises (many characters are called Ash). So every candidate is judged on
evidence, written down in a human-readable sentence:

- name similarity: the tag without its `_(qualifier)` suffixes against every index name;
- franchise share: the share of the candidate's scraped posts whose copyright tags
  include the character's franchise (a `_(franchise)` suffix on the tag counts too);
- post count: a little extra trust for well-used tags.

Outcomes (thresholds below): *trusted* needs a close name and post evidence from the
franchise; *likely* a close name and some franchise evidence (e.g. only the suffix);
*rejected* when the posts mostly belong to another franchise (a namesake), the suffix
names something else without post evidence, the name is far off, or the index bans the
tag; everything else is *uncertain* and never chosen. Forced tags always win.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Sequence

import pandas as pd

TRUSTED, LIKELY, UNCERTAIN, REJECTED = "trusted", "likely", "uncertain", "rejected"

# Trusted: a close name, at least this many scraped posts, most of them from the franchise.
TRUSTED_MIN_CONFIDENCE = 0.80
TRUSTED_MIN_NAME_SIMILARITY = 0.85
TRUSTED_MIN_FRANCHISE_SHARE = 0.80
TRUSTED_MIN_POSTS = 3
# Likely: a close name and enough franchise evidence (a matching suffix alone reaches it).
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

TABLE_COLUMNS = [
    "site", "tag", "post_count", "name_similarity", "franchise_share", "confidence", "outcome", "evidence",
]
_OUTCOME_RANK = {TRUSTED: 0, LIKELY: 1, UNCERTAIN: 2, REJECTED: 3}
_TRAILING_QUALIFIER = re.compile(r"_?\(([^()]*)\)$")


@dataclass
class MatchResult:
    table: pd.DataFrame  # TABLE_COLUMNS, one row per (site, candidate tag), best first per site
    chosen: dict[str, str]  # site -> tag; sites with no trusted/likely candidate are absent


@dataclass
class _Assessment:
    name_similarity: float
    franchise_share: float | None
    confidence: float
    outcome: str
    evidence: str


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
    """Whether a copyright tag (or a qualifier) names `franchise`, ignoring case, separators and qualifiers."""
    if not franchise:
        return False
    tag_forms = {normalise_name(tag), normalise_name(split_tag(tag)[0])}
    franchise_forms = {normalise_name(franchise), normalise_name(split_tag(franchise)[0])}
    return bool((tag_forms & franchise_forms) - {""})


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
) -> MatchResult:
    """Judge every candidate tag and choose at most one per site.

    `candidates`: columns site, tag, post_count. `posts`: the scrape manifest (columns
    site, post_id, candidate_tag, copyright_tags at least). `forced_tags`: site -> tag
    from the index, always chosen. `banned_tags`: never chosen, on any site.
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

    records = []
    for (site, tag), post_count in post_counts.items():
        assessment = _assess(tag, post_count, copyrights.get((site, tag), []), all_names, franchise)
        if forced.get(site) == tag:
            assessment.outcome, assessment.confidence = TRUSTED, 1.0
            assessment.evidence = f"forced by index; {assessment.evidence}"
        elif tag in banned:
            assessment.outcome, assessment.confidence = REJECTED, 0.0
            assessment.evidence = f"banned by index; {assessment.evidence}"
        records.append({"site": site, "tag": tag, "post_count": post_count, **vars(assessment)})

    table = pd.DataFrame(records, columns=TABLE_COLUMNS)
    if not table.empty:
        table["_rank"] = table["outcome"].map(_OUTCOME_RANK)
        table = table.sort_values(
            ["site", "_rank", "confidence", "post_count", "tag"], ascending=[True, True, False, False, True]
        ).drop(columns="_rank").reset_index(drop=True)
    chosen: dict[str, str] = {}
    for row in table.itertuples(index=False):
        if row.site not in chosen and row.outcome in (TRUSTED, LIKELY):
            chosen[row.site] = row.tag
    chosen.update(forced)
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


def _assess(
    tag: str, post_count: int, copyrights: list[list[str]], names: list[str], franchise: str
) -> _Assessment:
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
    popularity = min(1.0, math.log10(1 + max(post_count, 0)) / math.log10(POPULARITY_SATURATION_POSTS))
    confidence = round(similarity * franchise_evidence * (0.9 + 0.1 * popularity), 4)

    rejection = None
    if other is not None and other_share >= NAMESAKE_MIN_OTHER_SHARE and (share or 0.0) < NAMESAKE_MIN_OTHER_SHARE:
        rejection = f"a namesake from {other}, not {franchise or 'the index franchise'}"
    elif suffix_names_franchise is False and (share or 0.0) < NAMESAKE_MIN_OTHER_SHARE:
        rejection = f"suffix ({', '.join(qualifiers)}) is not the franchise {franchise or '(none in index)'}"
    elif similarity < REJECT_BELOW_NAME_SIMILARITY:
        rejection = "name matches no index name"

    if rejection:
        outcome = REJECTED
        clauses.insert(0, rejection)
    elif (
        confidence >= TRUSTED_MIN_CONFIDENCE
        and similarity >= TRUSTED_MIN_NAME_SIMILARITY
        and share is not None
        and share >= TRUSTED_MIN_FRANCHISE_SHARE
        and len(copyrights) >= TRUSTED_MIN_POSTS
    ):
        outcome = TRUSTED
    elif confidence >= LIKELY_MIN_CONFIDENCE and similarity >= LIKELY_MIN_NAME_SIMILARITY:
        outcome = LIKELY
    else:
        outcome = UNCERTAIN
    return _Assessment(
        name_similarity=round(similarity, 4),
        franchise_share=None if share is None else round(share, 4),
        confidence=confidence,
        outcome=outcome,
        evidence="; ".join(clauses),
    )
