"""What the factory knows about booru tags, as data plus a few general rules.

- implications: a specific tag makes a generic one redundant (`white_shirt` -> `shirt`,
  `holding_cup` -> `holding`, `white_background` -> `simple_background`). A caption that
  says both spends tokens twice and teaches the generic word nothing.
- blacklist: meta tags about the file or the post, never about the picture's content.
- synonyms: tags taggers confuse or sites spell two ways, folded into one.
- feature tags: what the character always looks like (hair, eyes, ears, horns, skin...);
  these are the candidates for "core" tags that the trigger word absorbs. Breast size is
  never a feature: it is not identity, and pruning it would bake it into the trigger.
  Species tags (`horse_girl`) are features unless the caption options say otherwise.
- garments: clothing and worn accessories, what an outfit trigger may absorb; footwear
  never is (shoes in an outfit trigger push every picture to full body).

Tags are handled in booru form (`white_shirt`, `manhattan_cafe_(umamusume)`);
`escape_for_prompt` produces the prompt form (`manhattan cafe \\(umamusume\\)`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

COLOURS: frozenset[str] = frozenset(
    """white black grey gray red blue green yellow pink purple orange brown silver blonde
    aqua navy beige gold golden violet lavender cyan teal maroon light_blue dark_blue
    light_brown dark_brown light_green dark_green light_purple dark_red light_pink
    pale multicolored two-tone gradient rainbow""".split()
)

# Tags about the file, the upload or text drawn over the picture.
BLACKLIST: frozenset[str] = frozenset(
    """highres absurdres lowres incredibly_absurdres huge_filesize commentary
    commentary_request english_commentary translated translation_request
    partially_translated check_translation bad_id bad_pixiv_id bad_twitter_id
    md5_mismatch official_art scan watermark signature artist_name dated
    twitter_username web_address patreon_username character_name copyright_name
    jpeg_artifacts image_sample variant_set third-party_edit revision""".split()
)

# Count/solo tags: every crop of a character LoRA is one person, so they may fold into
# the trigger like features (the caption option `fold_generic`).
GENERIC_TAGS: frozenset[str] = frozenset({"1girl", "1boy", "1other", "solo"})

SYNONYMS: dict[str, str] = {
    "circlet": "tiara",
    "gray_hair": "grey_hair",
    "gray_eyes": "grey_eyes",
    "gray_background": "grey_background",
    "hair_band": "hairband",
    "hair_clip": "hairclip",
}

# Implications the general rules below do not derive.
EXPLICIT_IMPLICATIONS: dict[str, tuple[str, ...]] = {
    "gradient_background": ("simple_background",),
    "twin_braids": ("braid",),
    "double_bun": ("hair_bun",),
    "serafuku": ("school_uniform",),
}

# `<prefix>_<anything>` -> generic tag.
PREFIX_IMPLICATIONS: dict[str, str] = {
    "holding_": "holding",
    "frilled_": "frills",
    "striped_": "striped",
    "plaid_": "plaid",
    "polka_dot_": "polka_dot",
    "see-through_": "see-through",
}

ANIMALS: frozenset[str] = frozenset(
    """cat dog fox wolf horse rabbit mouse tiger lion bear cow sheep goat deer raccoon
    squirrel monkey bat bird dragon demon snake shark fish lizard bull pig""".split()
)

# A specific tag implies its last words (`disposable_cup` -> `cup`) unless a word
# before them makes the meaning positional or negative: `no_shoes`, `on_back`,
# `looking_back`, `hand_in_pocket`, `pants_under_skirt` say nothing of the kind.
_SUFFIX_STOP_WORDS: frozenset[str] = frozenset(
    """no without on in at behind under over from to of by into onto through between
    against looking hand hands arm arms""".split()
)

# Words that make a tag a feature of the character's body/hair.
_FEATURE_WORDS: frozenset[str] = frozenset(
    """hair eyes ears ear horns horn bangs braid braids ahoge sidelocks twintails ponytail
    bun buns drills pupils eyelashes eyebrows skin skinned tail wings halo fang fangs
    freckles mole heterochromia hairband hairclip hairpin""".split()
)
_FEATURE_TAGS: frozenset[str] = frozenset(
    """tsurime tareme elf dark_elf kemonomimi_mode bald afro dreadlocks updo side_up
    one_side_up two_side_up hime_cut bob_cut mohawk topknot beard mustache facial_mark
    whisker_markings scar_on_face""".split()
)
# Actions, expressions and states: they mention hair or eyes but are not the character.
_NOT_FEATURE_WORDS: frozenset[str] = frozenset(
    """holding hand hands playing adjusting touching grabbing pulling covering covered
    closed wiping rubbing licking biting wet floating blowing flowing tying brushing
    drying cutting tucking hug hugging rolling crazy empty sparkling fake tight wagging
    mouth""".split()
)
# Never a feature, whatever else the tag says (breast size included, by design).
_NEVER_FEATURE_WORDS: frozenset[str] = frozenset(
    """breasts breast chest pubic armpit nipples areolae crotch ass butt""".split()
)
_SPECIES = re.compile(r"^(?P<animal>[a-z]+)_(girl|boy)$")

# Never fold shoes into the outfits: an outfit trigger that carries the
# shoes makes the model frame every picture full body to show them.
_FOOTWEAR_WORDS: frozenset[str] = frozenset(
    """shoes shoe boots boot footwear heels sandals sneakers loafers slippers geta zouri
    pumps uwabaki""".split()
)
_FOOTWEAR_TAGS: frozenset[str] = frozenset({"mary_janes", "high_heels", "barefoot"})
# Words naming a piece of clothing or an accessory worn with it: only these fold into an
# outfit (a smile or a cup is frequent in a cluster without being part of the outfit).
_GARMENT_WORDS: frozenset[str] = frozenset(
    """shirt blouse skirt dress jacket coat hat cap beret hood hoodie sweater cardigan vest
    necktie tie bowtie ascot choker collar sleeves uniform serafuku kimono yukata hakama
    haori obi sash apron cape capelet cloak scarf shawl gloves mittens pantyhose
    thighhighs kneehighs socks legwear leggings garter garters shorts pants trousers
    jeans overalls suspenders belt buckle buttons zipper pocket ribbon bow brooch
    necklace pendant earrings jewelry bracelet wristband armband armlet veil tiara crown
    headwear headdress headpiece helmet mask goggles glasses eyewear armor pauldrons
    gauntlets bikini swimsuit leotard bodysuit camisole top bra corset bustier tunic
    robe gown jersey epaulettes neckerchief sailor tabard harness cutout lingerie""".split()
)
# Cut and exposure words: written last in an outfit trigger (the usual advice), as
# they modify the outfit rather than name a piece of it.
OUTFIT_MODIFIERS: frozenset[str] = frozenset(
    """sleeveless strapless halterneck highleg detached_sleeves off-shoulder_dress
    bare_shoulders backless_outfit midriff navel_cutout cleavage_cutout clothing_cutout
    short_sleeves long_sleeves puffy_sleeves wide_sleeves""".split()
)

# Tags about the framing, the gaze or the scene rather than what the character wears:
# crops of one picture differ in framing (full_body / upper_body / portrait), so
# letting these into outfit clustering would split clusters by crop kind.
_NOT_OUTFIT_TAGS: frozenset[str] = frozenset(
    """full_body upper_body lower_body cowboy_shot portrait close-up out_of_frame
    head_out_of_frame feet_out_of_frame solo_focus standing sitting looking_at_viewer
    looking_away looking_to_the_side looking_back looking_up looking_down outdoors indoors
    no_humans""".split()
)
_NOT_OUTFIT_WORDS: frozenset[str] = frozenset({"background", "cropped"})

# Kaomoji keep their underscores: `^_^` is a tag, `^ ^` is not.
_KAOMOJI: frozenset[str] = frozenset(
    """^_^ >_< o_o 0_0 |_| ._. u_u x_x =_= +_+ >_o @_@ ;_; t_t -_- ^_^;""".split()
)
_UNESCAPED_BRACKET = re.compile(r"(?<!\\)([()])")


def normalise_tag(tag: str) -> str:
    """Booru form: lower case, underscores between words, no prompt escapes."""
    cleaned = tag.strip().lower().replace("\\(", "(").replace("\\)", ")")
    if cleaned in _KAOMOJI or cleaned.replace(" ", "_") in _KAOMOJI:
        return cleaned.replace(" ", "_")
    return re.sub(r"\s+", "_", cleaned)


def canonical_tag(tag: str) -> str:
    """The normalised tag with synonyms folded."""
    tag = normalise_tag(tag)
    return SYNONYMS.get(tag, tag)


def _words(tag: str) -> list[str]:
    return tag.split("_")


@lru_cache(maxsize=65536)
def implied_by(tag: str) -> frozenset[str]:
    """Every more generic tag that `tag` implies (transitively)."""
    direct: set[str] = set(EXPLICIT_IMPLICATIONS.get(tag, ()))
    words = _words(tag)
    for start in range(1, len(words)):
        if _SUFFIX_STOP_WORDS.intersection(words[:start]):
            break
        direct.add("_".join(words[start:]))
    for prefix, generic in PREFIX_IMPLICATIONS.items():
        if tag.startswith(prefix) and tag != generic:
            direct.add(generic)
    if len(words) >= 2 and words[-1] == "background" and "_".join(words[:-1]) in COLOURS:
        direct.add("simple_background")
    if len(words) == 2 and words[1] == "ears" and words[0] in ANIMALS:
        direct.add("animal_ears")
    direct.discard(tag)
    closure = set(direct)
    for generic in direct:
        closure |= implied_by(generic)
    return frozenset(closure)


def drop_implied(tags: Sequence[str]) -> list[str]:
    """`tags` in their order, without those implied by another tag of the list."""
    present = list(dict.fromkeys(tags))
    implied: set[str] = set()
    for tag in present:
        implied |= implied_by(tag)
    return [tag for tag in present if tag not in implied]


def is_blacklisted(tag: str) -> bool:
    return tag in BLACKLIST


def is_species_tag(tag: str) -> bool:
    """`horse_girl`, `fox_boy`...: the character's species, said as a person count."""
    species = _SPECIES.match(normalise_tag(tag))
    return species is not None and species.group("animal") in ANIMALS


def is_feature_tag(tag: str, include_species: bool = True) -> bool:
    """Whether `tag` describes the character's body or hair (a core-tag candidate).

    Species tags (`horse_girl`) count unless `include_species` is False: whether the
    trigger word absorbs them is a caption option (`CaptionConfig.fold_species`).
    """
    tag = normalise_tag(tag)
    words = set(re.split(r"[_\-]", tag))
    if words & _NEVER_FEATURE_WORDS or words & _NOT_FEATURE_WORDS:
        return False
    if tag in _FEATURE_TAGS or words & _FEATURE_WORDS:
        return True
    return include_species and is_species_tag(tag)


def is_outfit_candidate(tag: str) -> bool:
    """Whether `tag` may describe an outfit: not a feature, count, framing or scene tag."""
    tag = normalise_tag(tag)
    if tag in GENERIC_TAGS or tag in _NOT_OUTFIT_TAGS or is_feature_tag(tag):
        return False
    return not set(tag.split("_")) & _NOT_OUTFIT_WORDS


def is_footwear_tag(tag: str) -> bool:
    tag = normalise_tag(tag)
    return tag in _FOOTWEAR_TAGS or bool(set(re.split(r"[_\-]", tag)) & _FOOTWEAR_WORDS)


def is_garment_tag(tag: str) -> bool:
    """Whether `tag` names clothing or an accessory worn with it (not footwear): what an
    outfit trigger, or the static style's character trigger, may absorb."""
    tag = normalise_tag(tag)
    if not is_outfit_candidate(tag) or is_footwear_tag(tag):
        return False
    return tag in OUTFIT_MODIFIERS or bool(set(re.split(r"[_\-]", tag)) & _GARMENT_WORDS)


def escape_for_prompt(tag: str, remove_underscores: bool = True) -> str:
    """Prompt form of a tag: `manhattan_cafe_(umamusume)` -> `manhattan cafe \\(umamusume\\)`.

    Brackets are escaped because the UIs read `(...)` as attention weighting; an
    already escaped bracket is left alone, so escaping twice changes nothing.
    """
    text = tag.strip()
    if remove_underscores and normalise_tag(text) not in _KAOMOJI:
        text = text.replace("_", " ")
    return _UNESCAPED_BRACKET.sub(r"\\\1", text)


def clean_tags(tags: Iterable[str], extra_blacklist: Iterable[str] = ()) -> list[str]:
    """Canonical, de-duplicated, blacklist-free tags with implied ones dropped, in order."""
    banned = set(BLACKLIST) | {canonical_tag(t) for t in extra_blacklist}
    canonical = [canonical_tag(tag) for tag in tags]
    return drop_implied([tag for tag in canonical if tag and tag not in banned])
