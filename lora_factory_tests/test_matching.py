"""Tag matching: namesakes across franchises, suffix-less tags, forced and banned tags."""

from __future__ import annotations

import pandas as pd
import pytest

from lora_factory.matching.tag_matching import (
    TABLE_COLUMNS,
    is_franchise,
    match_character,
    name_similarity,
    split_tag,
    surviving_posts,
)

EK, PT = "ash_(ember_knights)", "ash_(pocket_tamers)"


def manifest(*groups: tuple[str, str, int, str]) -> pd.DataFrame:
    """(site, candidate_tag, posts, copyright_tags) groups -> manifest rows with distinct files."""
    rows = []
    for site, tag, count, copyrights in groups:
        for n in range(count):
            post_id = len(rows) + 1
            rows.append({"site": site, "post_id": post_id, "candidate_tag": tag, "copyright_tags": copyrights,
                         "sha256": f"{post_id:064x}"})
    return pd.DataFrame(rows, columns=["site", "post_id", "candidate_tag", "copyright_tags", "sha256"])


def candidates(*rows: tuple[str, str, int]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["site", "tag", "post_count"])


ASH_CANDIDATES = candidates(("booru", EK, 34), ("booru", PT, 30), ("booru", "ashley_(ember_knights)", 3))
ASH_POSTS = manifest(
    ("booru", EK, 32, "ember_knights"),
    ("booru", EK, 2, "pocket_tamers"),  # about 5% of booru character tags are wrong
    ("booru", PT, 30, "pocket_tamers"),
    ("booru", "ashley_(ember_knights)", 3, "ember_knights"),
)


def outcome(result, tag: str) -> pd.Series:
    return result.table.set_index("tag").loc[tag]


def test_colliding_ash_is_matched_to_its_own_franchise_both_ways():
    ember = match_character("ash_ember_knights", "Ash", ["Ash", "アッシュ"], "ember_knights", ASH_CANDIDATES, ASH_POSTS)
    tamer = match_character("ash_pocket_tamers", "Ash", ["Ash"], "pocket_tamers", ASH_CANDIDATES, ASH_POSTS)

    assert list(ember.table.columns) == TABLE_COLUMNS
    assert ember.chosen == {"booru": EK} and tamer.chosen == {"booru": PT}
    right, namesake = outcome(ember, EK), outcome(ember, PT)
    assert right["outcome"] == "trusted" and right["confidence"] > 0.8
    assert right["franchise_share"] == pytest.approx(32 / 34, abs=1e-4) and right["name_similarity"] == 1.0
    assert namesake["outcome"] == "rejected" and namesake["confidence"] == 0.0
    assert "namesake from pocket_tamers" in namesake["evidence"]
    # A same-franchise character with a similar name is not taken for Ash.
    assert outcome(ember, "ashley_(ember_knights)")["outcome"] in ("uncertain", "rejected")
    assert outcome(tamer, EK)["outcome"] == "rejected"


def test_a_namesake_alone_is_never_matched():
    only_namesake = ASH_CANDIDATES[ASH_CANDIDATES["tag"] == PT]
    result = match_character("ash_ember_knights", "Ash", ["Ash"], "ember_knights", only_namesake, ASH_POSTS)
    assert result.chosen == {}
    assert outcome(result, PT)["outcome"] == "rejected"


def test_namesake_is_rejected_by_its_suffix_even_without_posts():
    result = match_character(
        "ash_ember_knights", "Ash", ["Ash"], "ember_knights", candidates(("booru", PT, 30)), manifest()
    )
    assert result.chosen == {}
    assert "suffix (pocket_tamers) is not the franchise" in outcome(result, PT)["evidence"]


def test_suffix_less_tag_is_trusted_on_post_evidence_only():
    posts = manifest(("booru", "lumi", 20, "starlight_academy"), ("booru", "lumina", 8, "other_show"))
    cands = candidates(("booru", "lumi", 32), ("booru", "lumina", 8))
    result = match_character("lumi_starlight_academy", "Lumi", ["Lumi"], "starlight_academy", cands, posts)
    assert result.chosen == {"booru": "lumi"}
    assert outcome(result, "lumi")["outcome"] == "trusted"
    assert outcome(result, "lumina")["outcome"] == "rejected"
    # Without scraped posts a bare name proves nothing: uncertain, not chosen.
    blind = match_character("lumi_starlight_academy", "Lumi", ["Lumi"], "starlight_academy", cands, manifest())
    assert blind.chosen == {} and outcome(blind, "lumi")["outcome"] == "uncertain"


def test_matching_suffix_without_posts_is_likely_and_chosen():
    result = match_character(
        "kaede_starlight_academy", "Kaede", ["Kaede"], "starlight_academy",
        candidates(("other", "kaede_(starlight_academy)", 12)), manifest(),
    )
    assert result.chosen == {"other": "kaede_(starlight_academy)"}
    row = outcome(result, "kaede_(starlight_academy)")
    assert row["outcome"] == "likely" and pd.isna(row["franchise_share"])


def test_each_site_gets_its_own_choice():
    posts = pd.concat([ASH_POSTS, manifest(("mirror", "ash", 6, "ember_knights"))], ignore_index=True)
    posts["post_id"] = range(len(posts))
    cands = pd.concat([ASH_CANDIDATES, candidates(("mirror", "ash", 6))], ignore_index=True)
    result = match_character("ash_ember_knights", "Ash", ["Ash"], "ember_knights", cands, posts)
    assert result.chosen == {"booru": EK, "mirror": "ash"}


def test_forced_tag_wins_and_banned_tag_is_rejected():
    forced = match_character(
        "ash_ember_knights", "Ash", ["Ash"], "ember_knights", ASH_CANDIDATES, ASH_POSTS,
        forced_tags={"booru": "ashley_(ember_knights)", "elsewhere": "ash_ek"},
    )
    assert forced.chosen == {"booru": "ashley_(ember_knights)", "elsewhere": "ash_ek"}
    # The table marks the chosen rows (and lists them first per site), forced or not.
    marked = forced.table[forced.table["chosen"]]
    assert dict(zip(marked["site"], marked["tag"])) == forced.chosen
    assert forced.table.groupby("site")["chosen"].first().all()
    row = outcome(forced, "ashley_(ember_knights)")
    assert row["outcome"] == "trusted" and row["confidence"] == 1.0 and row["evidence"].startswith("forced by index")
    assert outcome(forced, "ash_ek")["post_count"] == 0  # forced without a search hit: still listed

    banned = match_character(
        "ash_ember_knights", "Ash", ["Ash"], "ember_knights", ASH_CANDIDATES, ASH_POSTS, banned_tags=[EK],
    )
    assert banned.chosen == {}
    assert outcome(banned, EK)["outcome"] == "rejected" and "banned by index" in outcome(banned, EK)["evidence"]

    with pytest.raises(ValueError, match="both forced .* and banned"):
        match_character("k", "Ash", [], "ember_knights", ASH_CANDIDATES, ASH_POSTS,
                        forced_tags={"booru": EK}, banned_tags=[EK])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="candidates table lacks column"):
        match_character("k", "Ash", [], "x", pd.DataFrame({"tag": []}), ASH_POSTS)
    with pytest.raises(ValueError, match="no usable name"):
        match_character("k", " ", ["__"], "x", ASH_CANDIDATES, ASH_POSTS)


def test_surviving_posts_keeps_chosen_tags_with_files_once_each():
    posts = manifest(("booru", EK, 3, "ember_knights"), ("booru", PT, 2, "pocket_tamers"),
                     ("mirror", "ash", 2, "ember_knights"))
    posts.loc[posts["site"] == "mirror", "sha256"] = posts.loc[0, "sha256"]  # mirror holds the same file
    posts.loc[1, "sha256"] = None  # a failed download
    kept = surviving_posts(posts, {"booru": EK, "mirror": "ash"})
    assert list(kept["post_id"]) == [1, 3]
    assert kept["sha256"].is_unique


def test_tag_helpers():
    assert split_tag("surtr_(colorful_wonderland)_(arknights)") == ("surtr", ["colorful_wonderland", "arknights"])
    assert split_tag("lumi") == ("lumi", [])
    assert split_tag("(o)_(o)") == ("(o)", ["o"])
    assert name_similarity("ash_ketchum_(pocket_tamers)", ["Ketchum Ash"])[0] == 1.0
    assert name_similarity("ash_(pocket_tamers)", ["Ash Ketchum"])[0] >= 0.85  # given name only
    assert name_similarity("kal'tsit", ["Kal'tsit"])[0] == 1.0
    assert name_similarity("ashley", ["Ash"])[0] < 0.8


def test_franchise_forms_sites_use():
    assert is_franchise("fate/grand_order", "fate_(series)")  # a sub-series
    assert is_franchise("fate", "fate_(series)")
    assert is_franchise("fire_emblem_heroes", "fire_emblem") and is_franchise("honkai_star", "honkai:_star_rail")
    assert is_franchise("sao", "sword_art_online") and is_franchise("Honkai_Star_Rail", "honkai:_star_rail")
    assert not is_franchise("pocket_tamers", "ember_knights")
    assert not is_franchise("k-on!", "k")  # too short to start a sub-series
    # One word of a title, or a coined short name, proves nothing: post evidence must.
    assert not is_franchise("sword", "sword_art_online") and not is_franchise("re:zero", "re:zero_kara_hajimeru")
    assert not is_franchise("konosuba", "kono_subarashii_sekai_ni_shukufuku_wo!")
    assert not is_franchise("ember_knights", "")
