"""evaluation.prompts: the fixed preview prompt set."""

from __future__ import annotations

import pytest

from lora_factory.evaluation.prompts import (
    STANDARD_NEGATIVE_PROMPT,
    preview_prompts,
    tag_to_prompt_text,
)

CORE = ["red_hair", "yellow_eyes", "horns"]
CLUSTERS = [["navy_jacket", "beige_skirt", "red_hair"], ["green_dress"]]


def test_prompts_are_deterministic_and_seeded_per_prompt():
    first = preview_prompts("ash_ember_knights", CORE, CLUSTERS)
    second = preview_prompts("ash_ember_knights", CORE, CLUSTERS)
    assert first == second
    names = [prompt.name for prompt in first]
    assert len(set(names)) == len(names)
    assert len({prompt.seed for prompt in first}) == len(first)
    assert preview_prompts("ash_ember_knights", CORE, CLUSTERS, base_seed=7)[0].seed != first[0].seed


def test_more_seeds_per_prompt_keep_the_first_seeds_and_add_new_ones():
    one = preview_prompts("ash_ember_knights", CORE, CLUSTERS)
    three = preview_prompts("ash_ember_knights", CORE, CLUSTERS, seeds_per_prompt=3)
    assert len(three) == 3 * len(one)
    assert three[: len(one)] == one  # the same previews as with one seed, first
    assert [p.name for p in three[len(one) : 2 * len(one)]] == [f"{p.name}_seed2" for p in one]
    assert [p.repeat for p in three] == [1] * len(one) + [2] * len(one) + [3] * len(one)
    assert len({p.seed for p in three}) == len(three)
    by_name = {p.name: p for p in three}
    assert by_name["portrait_seed3"].prompt == by_name["portrait"].prompt
    assert by_name["portrait_seed3"].expected_tags == by_name["portrait"].expected_tags
    with pytest.raises(ValueError, match="seeds_per_prompt must be >= 1"):
        preview_prompts("ash_ember_knights", CORE, CLUSTERS, seeds_per_prompt=0)


def test_one_prompt_per_outfit_cluster_plus_the_generic_set():
    prompts = {prompt.name: prompt for prompt in preview_prompts("ash_ember_knights", CORE, CLUSTERS)}
    assert prompts["outfit_cluster_0"].expected_tags == ["1girl", "solo", "navy_jacket", "beige_skirt"]
    assert prompts["outfit_cluster_1"].expected_tags == ["1girl", "solo", "green_dress"]
    for name in ("portrait", "full_body", "outfit_maid", "pose_sitting", "expression_smile"):
        assert name in prompts
    # Core tags are the trigger word's job: neither prompted nor expected by default.
    for prompt in prompts.values():
        assert prompt.prompt.startswith("masterpiece, best quality, ash_ember_knights, 1girl, solo")
        assert "red hair" not in prompt.prompt
        assert prompt.negative_prompt == STANDARD_NEGATIVE_PROMPT
        assert prompt.expected_tags and "red_hair" not in prompt.expected_tags
    assert prompts["outfit_cluster_0"].prompt.endswith("navy jacket, beige skirt")


def test_a_character_without_a_gender_is_written_solo_once():
    # The index's gender "other" has no gender tag: its prompts carry "solo" alone, once,
    # so prompt following does not count it twice.
    for prompt in preview_prompts("kaede sa", [], [["orange_shirt"]], gender_tag="solo"):
        assert prompt.expected_tags.count("solo") == 1 and prompt.prompt.count("solo") == 1


def test_core_tags_can_follow_the_trigger():
    prompt = preview_prompts("ash_ember_knights", CORE, CLUSTERS, include_core_tags=True)[0]
    assert prompt.prompt.startswith("masterpiece, best quality, ash_ember_knights, red hair, yellow eyes, horns, 1girl")


def test_adding_a_cluster_moves_no_other_seed():
    one = {p.name: p.seed for p in preview_prompts("t", CORE, CLUSTERS[:1])}
    two = {p.name: p.seed for p in preview_prompts("t", CORE, CLUSTERS)}
    assert all(two[name] == seed for name, seed in one.items())


def test_male_characters_get_a_suit_instead_of_a_maid_outfit():
    names = {p.name for p in preview_prompts("ash_pocket_tamers", [], [["blue_shirt"]], gender_tag="1boy")}
    assert "outfit_suit" in names and "outfit_maid" not in names


def test_tag_text_follows_a1111_conventions():
    assert tag_to_prompt_text("white_shirt") == "white shirt"
    assert tag_to_prompt_text("^_^") == "^_^"
    assert tag_to_prompt_text("ash_(ember_knights)") == "ash \\(ember knights\\)"


def test_empty_trigger_is_refused():
    with pytest.raises(ValueError, match="trigger word"):
        preview_prompts("  ", CORE, CLUSTERS)
