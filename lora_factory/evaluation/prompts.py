"""The fixed prompt set that every checkpoint of a character is rendered with.

One prompt per outfit cluster (does the LoRA reproduce what the character wears?), plus
framing, outfit-change, pose and expression prompts (does it still follow prompts, or has
it over-fitted to the dataset?). Seeds are fixed per prompt name, so the same prompt gives
the same noise at every checkpoint and in every run, and only the LoRA differs. Each prompt
can be rendered with several seeds (`seeds_per_prompt`): with one picture per prompt, one
preview more or less recognised moves a checkpoint's fidelity by a tenth.

Tags are kept in booru form (`white_shirt`) in `expected_tags`, which is what the tagger
answers in; prompts write them the way AUTOMATIC1111 users do (`white shirt`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

QUALITY_TAGS = ("masterpiece", "best_quality")
# What previews are rendered with (diffusers' DPMSolverMultistepScheduler): the sampler
# AUTOMATIC1111 users preview with, good images in few steps.
PREVIEW_SAMPLER = "DPM++ 2M"
# The NAI-era standard negative prompt that anime SD1.5 models are used with.
STANDARD_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
    "username, blurry"
)
MALE_GENDER_TAGS = frozenset({"1boy", "male_focus"})

FRAMING_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("portrait", ("portrait", "looking_at_viewer")),
    ("full_body", ("full_body", "standing", "simple_background")),
)
# Clothes the character does not wear in the dataset: a LoRA that has over-fitted keeps
# drawing the dataset outfit instead (CyberHarem renders miko / maid / suit / yukata).
OUTFIT_CHANGE_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("outfit_school_uniform", ("school_uniform", "upper_body")),
    ("outfit_yukata", ("yukata", "upper_body")),
)
FEMALE_OUTFIT_CHANGE = ("outfit_maid", ("maid", "apron", "upper_body"))
MALE_OUTFIT_CHANGE = ("outfit_suit", ("suit", "necktie", "upper_body"))
POSE_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pose_sitting", ("sitting", "indoors")),
    ("pose_arms_up", ("arms_up", "outdoors")),
)
EXPRESSION_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expression_smile", ("smile", "open_mouth", "upper_body")),
    ("expression_angry", ("angry", "upper_body")),
)


@dataclass(frozen=True)
class PreviewPrompt:
    name: str
    prompt: str
    negative_prompt: str
    seed: int
    # Booru tags the prompt asks for: the tagger should find them in the rendered image.
    expected_tags: list[str] = field(default_factory=list)
    repeat: int = 1  # the k-th seed of this prompt (name `<prompt>_seed<k>` from the second on)


def preview_prompts(
    trigger_word: str,
    core_tags: list[str],
    outfit_clusters: list[list[str]],
    gender_tag: str = "1girl",
    base_seed: int = 42,
    include_core_tags: bool = False,
    negative_prompt: str = STANDARD_NEGATIVE_PROMPT,
    seeds_per_prompt: int = 1,
) -> list[PreviewPrompt]:
    """The preview prompt set for one character.

    Core tags are folded into the trigger word by captioning, so by default prompts carry
    the trigger alone: a preview then shows what the LoRA has learnt rather than what the
    base model draws from the words `red hair`. `include_core_tags=True` writes them after
    the trigger, as the model card suggests users may. Core tags are removed from the
    outfit clusters for the same reason. A cluster that is empty once core tags are gone
    still gets a prompt (the dataset's outfit with no words for it).

    With `seeds_per_prompt` = n, every prompt comes n times with seeds of its own: the
    first seeds of all prompts first (the same prompts and seeds as with n = 1), then the
    second seeds, and so on.
    """
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    trigger_word = trigger_word.strip()
    if not trigger_word:
        raise ValueError("preview_prompts needs a non-empty trigger word (the index row's trigger_word)")
    gender_tag = gender_tag.strip()
    if not gender_tag:
        raise ValueError("preview_prompts needs a gender tag such as '1girl' or '1boy'")
    core = _unique(core_tags)
    core_set = set(core)
    # The trigger goes in verbatim: it must match the training captions character for character.
    lead_text = [
        *(tag_to_prompt_text(tag) for tag in QUALITY_TAGS),
        trigger_word,
        *(tag_to_prompt_text(tag) for tag in core if include_core_tags),
    ]
    subject = _unique([gender_tag, "solo"])  # "solo" as the gender tag (no gender) comes once

    specs: list[tuple[str, list[str]]] = []
    for index, cluster in enumerate(outfit_clusters):
        outfit = [tag for tag in _unique(cluster) if tag not in core_set]
        specs.append((f"outfit_cluster_{index}", [*subject, *outfit]))
    outfit_changes = [
        *OUTFIT_CHANGE_PROMPTS,
        MALE_OUTFIT_CHANGE if gender_tag in MALE_GENDER_TAGS else FEMALE_OUTFIT_CHANGE,
    ]
    for name, tags in (*FRAMING_PROMPTS, *outfit_changes, *POSE_PROMPTS, *EXPRESSION_PROMPTS):
        specs.append((name, [*subject, *tags]))

    return [
        PreviewPrompt(
            name=repeat_name(name, repeat),
            prompt=", ".join([*lead_text, *(tag_to_prompt_text(tag) for tag in content)]),
            negative_prompt=negative_prompt,
            seed=prompt_seed(repeat_name(name, repeat), base_seed),
            expected_tags=content,
            repeat=repeat,
        )
        for repeat in range(1, seeds_per_prompt + 1)
        for name, content in specs
    ]


def repeat_name(name: str, repeat: int) -> str:
    """`portrait`, then `portrait_seed2`, `portrait_seed3`, ..."""
    return name if repeat == 1 else f"{name}_seed{repeat}"


def prompt_seed(name: str, base_seed: int) -> int:
    """A seed fixed by the prompt's name, so adding an outfit cluster moves no other seed."""
    return (base_seed + zlib.crc32(name.encode("utf-8"))) % (2**31)


def tag_to_prompt_text(tag: str) -> str:
    """`white_shirt` -> `white shirt`; `ash_(ember_knights)` -> `ash \\(ember knights\\)`.

    Underscores become spaces except in emoticons (`^_^`, `o_o`), and parentheses are
    escaped because AUTOMATIC1111 and ComfyUI read `(...)` as attention weighting.
    """
    text = tag.strip()
    if len(text) > 3:
        text = text.replace("_", " ")
    return text.replace("(", "\\(").replace(")", "\\)")


def _unique(tags: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for tag in tags:
        tag = tag.strip()
        if tag:
            seen.setdefault(tag, None)
    return list(seen)
