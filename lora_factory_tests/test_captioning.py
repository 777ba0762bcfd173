import json
import random
from dataclasses import dataclass, field

import pandas as pd
import pytest

from lora_factory.captioning.captions import (
    CaptionConfig,
    caption_dataset,
    core_tags,
    outfit_trigger_name,
    tag_frequency,
)
from lora_factory.captioning.tags import (
    canonical_tag,
    drop_implied,
    escape_for_prompt,
    is_feature_tag,
    is_garment_tag,
    normalise_tag,
)

# A real WD14 output (Manhattan Cafe) at threshold 0.4, in the tagger's order.
TAGGER_OUTPUT = (
    "1girl, manhattan cafe \\(umamusume\\), solo, horse ears, animal ears, long hair, "
    "yellow shirt, black hair, cup, hair between eyes, skirt, shirt, ahoge, looking at viewer, "
    "holding, yellow eyes, frilled shirt collar, white background, holding cup, disposable cup, "
    "horse girl, bangs, simple background, long sleeves, closed mouth, frills, "
    "multicolored hair, green skirt, very long hair"
)
BEFORE = (
    "manhattan cafe \\(umamusume\\), yellow shirt, cup, skirt, shirt, looking at viewer, holding, "
    "frilled shirt collar, white background, holding cup, disposable cup, simple background, "
    "long sleeves, closed mouth, frills, green skirt"
)
AFTER = (
    "manhattan cafe \\(umamusume\\), yellow shirt, looking at viewer, frilled shirt collar, "
    "white background, holding cup, disposable cup, long sleeves, closed mouth, green skirt"
)
FEATURES = {
    "horse_ears", "animal_ears", "long_hair", "black_hair", "hair_between_eyes", "ahoge",
    "yellow_eyes", "horse_girl", "bangs", "multicolored_hair", "very_long_hair",
}


@dataclass
class Prediction:
    general: dict[str, float]
    character: dict[str, float] = field(default_factory=dict)


def split(caption: str) -> list[str]:
    return [normalise_tag(tag) for tag in caption.split(", ")]


def manhattan_cafe_prediction() -> Prediction:
    tags = split(TAGGER_OUTPUT)
    character = "manhattan_cafe_(umamusume)"
    # Scores falling in the tagger's order, all above the 0.35 threshold.
    general = {tag: round(0.99 - i * 0.02, 2) for i, tag in enumerate(tags) if tag != character}
    return Prediction(general, {character: 0.97})


def test_duplicate_removal_turns_before_into_after():
    cleaned = drop_implied(split(BEFORE))
    assert ", ".join(escape_for_prompt(tag) for tag in cleaned) == AFTER


def test_feature_tags_of_the_seed():
    tags = split(TAGGER_OUTPUT)
    assert {tag for tag in tags if is_feature_tag(tag)} == FEATURES
    without_features = [tag for tag in tags if not is_feature_tag(tag)]
    assert without_features[1] == "manhattan_cafe_(umamusume)"
    assert [t for t in without_features if t not in ("1girl", "solo")] == split(BEFORE)


def test_seed_caption_end_to_end():
    crops = pd.DataFrame({"crop_sha256": [f"{i:064x}" for i in range(4)]})
    result = caption_dataset(
        crops,
        [manhattan_cafe_prediction() for _ in range(4)],
        trigger_word="manhattan_cafe_(umamusume)",
        config=CaptionConfig(fold_generic=True),
    )
    assert result.table["caption"].tolist() == [AFTER] * 4
    # Prompts take the trigger from here: exactly how every caption starts.
    assert result.trigger_word == "manhattan cafe \\(umamusume\\)" and AFTER.startswith(result.trigger_word + ",")
    # long_hair and animal_ears are implied by very_long_hair and horse_ears; 1girl and
    # solo fold into the trigger with fold_generic.
    assert set(result.core_tags) == FEATURES - {"long_hair", "animal_ears"} | {"1girl", "solo"}
    assert result.core_share["ahoge"] == 1.0
    assert result.table["tags"][0][0] == "yellow_shirt"
    assert result.tag_frequency["manhattan cafe \\(umamusume\\)"] == 4
    assert result.clusters["size"].tolist() == [4]


def test_generic_tags_stay_unless_folded():
    crops = pd.DataFrame({"crop_sha256": ["a" * 64]})
    result = caption_dataset(crops, [manhattan_cafe_prediction()], "lf_cafe")
    assert result.table["caption"][0].startswith("lf cafe, 1girl, solo, yellow shirt")


def seed_caption(**options) -> str:
    crops = pd.DataFrame({"crop_sha256": ["a" * 64]})
    config = CaptionConfig(**options)
    return caption_dataset(crops, [manhattan_cafe_prediction()], "manhattan_cafe_(umamusume)", config).table[
        "caption"
    ][0]


def test_seed_feature_step_prunes_every_hair_eye_ear_bangs_and_ahoge_tag():
    caption = seed_caption()
    tags = caption.split(", ")
    assert tags[0] == "manhattan cafe \\(umamusume\\)"  # the character tag stays first
    pruned = [t for t in split(TAGGER_OUTPUT) if any(w in t for w in ("hair", "eyes", "ears", "bangs", "ahoge"))]
    assert len(pruned) == 10
    assert not set(map(normalise_tag, tags)) & set(pruned)
    # Species and count tags: a documented option each.
    assert "horse girl" not in tags and tags[1:3] == ["1girl", "solo"]
    assert "horse girl" in seed_caption(fold_species=False).split(", ")
    assert seed_caption(fold_generic=True) == AFTER
    # Fluid prunes nothing: the features follow the trigger.
    fluid = seed_caption(style="fluid").split(", ")
    assert fluid[0] == tags[0] and set(map(normalise_tag, fluid)) >= set(pruned) - {"long_hair", "animal_ears"}


def test_tagger_scores_are_kept():
    crops = pd.DataFrame({"crop_sha256": ["a" * 64]})
    result = caption_dataset(crops, [manhattan_cafe_prediction()], "manhattan_cafe_(umamusume)")
    scores = json.loads(result.table["tag_scores"][0])
    raw = json.loads(result.table["tagger_tags"][0])
    assert scores["ahoge"] == raw["ahoge"] == 0.75  # pruned from the caption, score kept
    assert "shirt" in raw and "shirt" not in scores  # implied by yellow_shirt


def styled(style: str) -> pd.Series:
    crops = pd.DataFrame({"crop_sha256": [f"{i:064x}" for i in range(10)]})
    predictions = [
        Prediction({"red_hair": 0.9, "yellow_eyes": 0.8, "ponytail": 0.7 if i == 0 else 0.1, "skirt": 0.6})
        for i in range(10)
    ]
    return caption_dataset(crops, predictions, "ash", CaptionConfig(style=style)).table["caption"]


def test_caption_styles():
    # ponytail is a feature seen in 10% of the crops: not core.
    assert styled("semi-static")[0] == "ash, ponytail, skirt"
    # Static also folds the dominant outfit (the skirt every crop wears) into the trigger;
    # a feature seen in 10% of the crops stays a prompt word.
    assert styled("static")[0] == "ash, ponytail"
    assert styled("static")[1] == "ash"
    assert styled("fluid")[0] == "ash, red hair, yellow eyes, ponytail, skirt"
    assert styled("fluid")[1] == "ash, red hair, yellow eyes, skirt"


def test_thresholds_blacklist_synonyms_and_other_characters():
    crops = pd.DataFrame({"crop_sha256": ["b" * 64]})
    prediction = Prediction(
        {"circlet": 0.9, "tiara": 0.5, "highres": 0.99, "smile": 0.34, "hat": 0.36, "banned_thing": 0.9},
        {"someone_else_(game)": 0.9},
    )
    result = caption_dataset(crops, [prediction], "ash", CaptionConfig(extra_blacklist=("banned thing",)))
    assert result.table["caption"][0] == "ash, tiara, hat"
    assert result.table["characters"][0] == '{"someone_else_(game)": 0.9}'


def test_outfit_clusters_and_heads_follow_their_person():
    outfit_a = {"navy_jacket": 0.9, "beige_skirt": 0.85, "red_hair": 0.9}
    outfit_b = {"green_dress": 0.9, "red_hair": 0.9}
    rows, predictions = [], []
    for i in range(12):
        outfit = outfit_a if i < 8 else outfit_b
        for kind in ("full", "head"):
            rows.append({"crop_sha256": f"{kind}{i:062d}", "kind": kind, "source_sha256": f"s{i}", "person_index": 0})
            predictions.append(Prediction(dict(outfit) if kind == "full" else {"red_hair": 0.9}))
    result = caption_dataset(pd.DataFrame(rows), predictions, "ash")
    table = result.table.assign(kind=[r["kind"] for r in rows], person=[r["source_sha256"] for r in rows])
    assert result.clusters["size"].tolist() == [16, 8]
    assert result.clusters["tags"][0] == ["beige_skirt", "navy_jacket"]
    assert result.clusters["tags"][1] == ["green_dress"]
    for _, person in table.groupby("person"):
        assert person["cluster"].nunique() == 1
    assert result.core_tags == ["red_hair"]


def test_clustering_is_deterministic_and_one_outfit_is_one_cluster():
    crops = pd.DataFrame({"crop_sha256": [f"{i:064x}" for i in range(6)], "kind": "full"})
    predictions = [Prediction({"navy_jacket": 0.9, "smile": 0.5 + 0.05 * i}) for i in range(6)]
    first = caption_dataset(crops, predictions, "ash")
    second = caption_dataset(crops, predictions, "ash")
    assert first.table["cluster"].tolist() == second.table["cluster"].tolist() == [0] * 6


def test_escape_for_prompt():
    assert escape_for_prompt("manhattan_cafe_(umamusume)") == "manhattan cafe \\(umamusume\\)"
    assert escape_for_prompt("manhattan cafe \\(umamusume\\)") == "manhattan cafe \\(umamusume\\)"
    assert escape_for_prompt("long_hair", remove_underscores=False) == "long_hair"
    assert escape_for_prompt("^_^") == "^_^"
    assert canonical_tag("Manhattan Cafe \\(Umamusume\\)") == "manhattan_cafe_(umamusume)"


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("large_breasts", False),
        ("flat_chest", False),
        ("hair_over_breasts", False),
        ("closed_eyes", False),
        ("half-closed_eyes", False),
        ("holding_hair", False),
        ("skin_tight", False),
        ("hair_ribbon", True),
        ("horns", True),
        ("dark-skinned_female", True),
        ("twin_braids", True),
        ("fox_girl", True),
        ("magical_girl", False),
        ("heterochromia", True),
        ("blue_shirt", False),
    ],
)
def test_feature_rules(tag, expected):
    assert is_feature_tag(tag) is expected


@pytest.mark.parametrize(
    ("tags", "kept"),
    [
        (["no_shoes", "shoes"], ["no_shoes", "shoes"]),
        (["looking_back", "back"], ["looking_back", "back"]),
        (["light_blue_shirt", "blue_shirt", "shirt"], ["light_blue_shirt"]),
        (["blue_background", "simple_background"], ["blue_background"]),
        (["cat_ears", "animal_ears"], ["cat_ears"]),
        (["circlet", "tiara"], ["circlet", "tiara"]),  # synonyms fold in clean_tags, not here
    ],
)
def test_implications(tags, kept):
    assert drop_implied(tags) == kept


def test_core_tags_and_frequencies():
    assert core_tags([["red_hair", "skirt"], ["red_hair"], ["blue_eyes"]], 0.5) == ["red_hair"]
    assert core_tags([], 0.35) == []
    assert tag_frequency(["ash, red hair", "ash, skirt"]) == {"ash": 2, "red hair": 1, "skirt": 1}
    assert tag_frequency(["Ash, ash, "]) == {"ash": 2}  # as sd-scripts counts: every token, lower case


def test_bad_input_is_refused():
    crops = pd.DataFrame({"crop_sha256": ["a" * 64]})
    with pytest.raises(ValueError, match="predictions"):
        caption_dataset(crops, [], "ash")
    with pytest.raises(ValueError, match="trigger_word"):
        caption_dataset(crops, [Prediction({})], "  ")
    with pytest.raises(ValueError, match="style"):
        CaptionConfig(style="loose")


@pytest.mark.parametrize("outfits", [1, 3])
def test_pose_and_expression_tags_do_not_split_outfits(outfits):
    rng = random.Random(outfits)
    noise = ["smile", "open_mouth", "standing", "arms_up", "blush", "sitting", "from_side", "v"]
    garments = [("navy_jacket", "beige_skirt"), ("green_dress", "sash"), ("blue_shirt", "black_pants")]
    predictions = []
    for i in range(30):
        general = {garment: 0.8 for garment in garments[i % outfits]}
        general.update({tag: 0.6 for tag in noise if rng.random() < 0.35})
        predictions.append(Prediction(general))
    crops = pd.DataFrame({"crop_sha256": [f"{i:064x}" for i in range(30)], "kind": "full"})
    result = caption_dataset(crops, predictions, "ash")
    assert result.clusters["size"].tolist() == [30 // outfits] * outfits
    for cluster, group in result.table.groupby("cluster"):
        assert len({i % outfits for i in group.index}) == 1


def test_backgrounds_and_framing_do_not_split_an_outfit():
    crops = pd.DataFrame({"crop_sha256": [f"{i:064x}" for i in range(8)], "kind": ["full", "upper"] * 4})
    predictions = [
        Prediction({
            "navy_jacket": 0.9,
            "full_body" if i % 2 == 0 else "upper_body": 0.8,
            "white_background" if i < 4 else "blue_background": 0.9,
        })
        for i in range(8)
    ]
    result = caption_dataset(crops, predictions, "ash")
    assert result.clusters["size"].tolist() == [8]
    assert result.clusters["tags"][0] == ["navy_jacket"]


def test_a_garment_the_tagger_misses_sometimes_is_not_an_outfit():
    rng = random.Random(5)
    predictions, outfit = [], []
    for i in range(40):
        garments = ("navy_jacket", "beige_skirt") if i % 2 else ("green_dress",)
        general = {g: 0.8 for g in garments if rng.random() > 0.1}  # 10% missed
        general.update({t: 0.6 for t in ("smile", "blush", "v", "arms_up") if rng.random() < 0.3})
        predictions.append(Prediction(general))
        outfit.append(i % 2)
    crops = pd.DataFrame({"crop_sha256": [f"{i:064x}" for i in range(40)], "kind": "full"})
    result = caption_dataset(crops, predictions, "ash")
    assert len(result.clusters) == 2
    table = pd.crosstab(result.table["cluster"], outfit)
    assert (table.max(axis=1) / table.sum(axis=1)).min() >= 0.85


def two_outfit_dataset(pictures_a: int, pictures_b: int, extra_a=(), extra_b=()):
    """Full + head crops per picture; outfit A (navy jacket, beige skirt), outfit B
    (green dress, sash); both wear a ribbon and boots."""
    rows, predictions = [], []
    for i in range(pictures_a + pictures_b):
        wearing_a = i < pictures_a
        garments = ("navy_jacket", "beige_skirt", *extra_a) if wearing_a else ("green_dress", "sash", *extra_b)
        for kind in ("full", "head"):
            rows.append({"crop_sha256": f"{kind}{i:062d}", "kind": kind, "source_sha256": f"s{i}", "person_index": 0})
            general = {"red_hair": 0.9, "smile": 0.6}
            if kind == "full":
                general.update({g: 0.8 for g in (*garments, "ribbon", "black_boots")})
            predictions.append(Prediction(general))
    return pd.DataFrame(rows), predictions


def test_static_folds_the_dominant_outfit_only_into_its_own_crops():
    crops, predictions = two_outfit_dataset(10, 6)
    result = caption_dataset(crops, predictions, "ash", CaptionConfig(style="static"))
    clusters = result.clusters.set_index("cluster")
    assert clusters.at[0, "tags"] == ["beige_skirt", "black_boots", "navy_jacket", "ribbon", "smile"]
    # Shared (ribbon), footwear (boots) and non-garment (smile) tags are never folded.
    assert clusters.at[0, "folded_tags"] == ["beige_skirt", "navy_jacket"]
    assert clusters.at[1, "folded_tags"] == [] and clusters.at[0, "trigger"] == ""
    captions = result.table.set_index("crop_sha256")["caption"]
    assert captions[f"full{0:062d}"] == "ash, black boots, ribbon, smile"
    assert captions[f"full{12:062d}"] == "ash, black boots, green dress, ribbon, sash, smile"
    semi = caption_dataset(crops, predictions, "ash").table.set_index("crop_sha256")["caption"]
    assert semi[f"full{0:062d}"] == "ash, beige skirt, black boots, navy jacket, ribbon, smile"


def test_outfit_triggers_for_outfits_of_eight_pictures_or_more():
    crops, predictions = two_outfit_dataset(10, 7, extra_a=("sleeveless",))
    config = CaptionConfig(outfit_triggers=True)
    result = caption_dataset(crops, predictions, "ash", config)
    clusters = result.clusters.set_index("cluster")
    assert clusters["images"].tolist() == [10, 7] and clusters["size"].tolist() == [20, 14]
    # Garments by frequency then name; cut modifiers last.
    assert clusters.at[0, "trigger"] == "beige_skirt_navy_jacket_sleeveless"
    assert clusters.at[1, "trigger"] == ""  # 7 pictures: below the minimum of 8
    captions = result.table.set_index("crop_sha256")["caption"]
    assert captions[f"full{0:062d}"] == "ash, beige_skirt_navy_jacket_sleeveless, black boots, ribbon, smile"
    assert captions[f"head{0:062d}"] == "ash, smile"  # no outfit trigger on head crops
    assert captions[f"full{12:062d}"] == "ash, black boots, green dress, ribbon, sash, smile"
    assert result.table.set_index("crop_sha256")["outfit_trigger"][f"full{0:062d}"] != ""
    # Fluid writes the trigger and prunes nothing.
    fluid = caption_dataset(crops, predictions, "ash", CaptionConfig(style="fluid", outfit_triggers=True))
    assert fluid.table["caption"][0].startswith("ash, beige_skirt_navy_jacket_sleeveless, red hair, ")
    assert "navy jacket" in fluid.table["caption"][0]
    # The threshold is a setting, and a single outfit never gets a trigger of its own.
    lower = caption_dataset(crops, predictions, "ash", CaptionConfig(outfit_triggers=True, outfit_trigger_min_images=7))
    assert lower.clusters["trigger"].tolist() == ["beige_skirt_navy_jacket_sleeveless", "green_dress_sash"]
    alone, alone_predictions = two_outfit_dataset(12, 0)
    single = caption_dataset(alone, alone_predictions, "ash", config)
    assert single.clusters["trigger"].tolist() == [""]


def test_outfit_trigger_names():
    assert outfit_trigger_name(["yellow_short_kimono", "sleeveless", "obi"]) == "yellow_short_kimono_obi_sleeveless"
    assert outfit_trigger_name(["a_shirt", "b_skirt", "c_hat"], max_tags=2) == "a_shirt_b_skirt"
    with pytest.raises(ValueError, match="garment"):
        outfit_trigger_name([])


@pytest.mark.parametrize(
    ("tag", "garment"),
    [("navy_jacket", True), ("black_boots", False), ("high_heels", False), ("smile", False),
     ("hair_ribbon", False), ("sleeveless", True), ("holding_cup", False), ("tiara", True)],
)
def test_garment_rules(tag, garment):
    assert is_garment_tag(tag) is garment
