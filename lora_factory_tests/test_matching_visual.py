"""Visual consistency evidence: injected identity vectors, then real demo pictures."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from lora_factory.demo.booru import DemoBooru
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post_image
from lora_factory.demo.tiny_models import build_tiny_model
from lora_factory.matching.tag_matching import match_character
from lora_factory.matching.visual import (
    VisualCheck,
    dominant_reference,
    embed_reference_images,
    manifest_sampler,
    solo_sample,
    visual_consistency,
)
from lora_factory.storage import BlobStore
from lora_factory.vision.identity import IdentityModel

DIM = 16


class CosineIdentity:
    threshold = 0.1785

    def difference(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return np.clip((1.0 - a @ b.T) / 2.0, 0.0, 1.0)


def look(character: int) -> np.ndarray:
    return np.eye(DIM)[character]


def pictures(*groups: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(character, count) groups -> noisy identity vectors."""
    rng = np.random.default_rng(seed)
    return np.array([look(c) + rng.normal(scale=0.08, size=DIM) for c, n in groups for _ in range(n)])


class Samples:
    """A `VisualCheck.sample` over fixed vectors that records what was asked for."""

    def __init__(self, by_candidate: dict[tuple[str, str], np.ndarray]):
        self.by_candidate = by_candidate
        self.asked: list[tuple[str, str]] = []

    def __call__(self, site: str, tag: str) -> np.ndarray:
        self.asked.append((site, tag))
        return self.by_candidate.get((site, tag), np.zeros((0, DIM)))


def candidates(*rows: tuple[str, str, int]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["site", "tag", "post_count"])


def posts(*groups: tuple[str, str, int, str]) -> pd.DataFrame:
    rows = [{"site": site, "post_id": 1000 * i + n, "candidate_tag": tag, "copyright_tags": copyrights}
            for i, (site, tag, count, copyrights) in enumerate(groups) for n in range(count)]
    return pd.DataFrame(rows, columns=["site", "post_id", "candidate_tag", "copyright_tags"])


def row(result, site: str, tag: str) -> pd.Series:
    table = result.table
    return table[(table["site"] == site) & (table["tag"] == tag)].iloc[0]


def test_visual_consistency_is_the_share_of_pictures_that_show_the_reference():
    identity, reference = CosineIdentity(), pictures((0, 8), seed=1)
    assert visual_consistency(pictures((0, 10)), reference, identity) == 1.0
    assert visual_consistency(pictures((1, 10)), reference, identity) == 0.0
    assert visual_consistency(pictures((0, 6), (1, 4)), reference, identity) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="needs sampled and reference pictures"):
        visual_consistency(pictures(), reference, identity)


def test_dominant_reference_is_the_majority_look():
    identity = CosineIdentity()
    pool = pictures((0, 12), (1, 5))
    anchor = dominant_reference(pool, identity)
    assert len(anchor) >= 10
    assert visual_consistency(anchor, pictures((0, 4), seed=2), identity) == 1.0
    assert len(dominant_reference(pictures((0, 2)), identity)) == 0  # too few to cluster


# Two sites: `booru` tags copyrights, `jp` tags none and writes names in Japanese.
ASH = ("booru", "ash_(ember_knights)")
TWIN = ("booru", "ash")  # a same-franchise tag whose pictures show another character
JP = ("jp", "アッシュ")
JP_OTHER = ("jp", "アッシュ(ポケモン)")  # suffix names another franchise


def ash_match(samples: Samples, reference: np.ndarray | None = None, **kwargs):
    return match_character(
        "ash_ember_knights", "Ash", ["アッシュ"], "ember_knights",
        candidates((*ASH, 40), (*TWIN, 30), (*JP, 12), (*JP_OTHER, 9)),
        posts((*ASH, 20, "ember_knights"), (*TWIN, 20, "ember_knights"), (*JP, 12, ""), (*JP_OTHER, 9, "")),
        visual=VisualCheck(CosineIdentity(), samples, reference), **kwargs,
    )


def test_pictures_reject_a_namesake_that_names_and_copyrights_cannot_tell_apart():
    samples = Samples({ASH: pictures((0, 16)), TWIN: pictures((1, 15), (0, 1)), JP: pictures((0, 12)),
                       JP_OTHER: pictures((2, 9))})
    text_only = match_character(
        "ash_ember_knights", "Ash", ["アッシュ"], "ember_knights",
        candidates((*ASH, 40), (*TWIN, 30)), posts((*ASH, 20, "ember_knights"), (*TWIN, 20, "ember_knights")),
    )
    assert row(text_only, *TWIN)["outcome"] == "trusted"  # names and copyrights are fooled

    result = ash_match(samples, reference=pictures((0, 4), seed=5))
    twin = row(result, *TWIN)
    assert twin["outcome"] == "rejected" and twin["confidence"] == 0.0
    assert twin["evidence"].startswith("its sampled pictures show another character")
    assert "1/16 sampled solo pictures match the 4 reference images" in twin["evidence"]
    assert row(result, *ASH)["outcome"] == "trusted" and row(result, *ASH)["visual_samples"] == 16
    # A site with no copyright tags: the pictures lift the bare Japanese name to likely,
    # and overrule nothing for the suffix that names another franchise.
    assert row(result, *JP)["outcome"] == "likely"
    assert row(result, *JP_OTHER)["outcome"] == "rejected"
    assert result.chosen == {"booru": ASH[1], "jp": JP[1]}


def test_without_reference_images_the_dominant_look_across_sites_is_the_reference():
    samples = Samples({ASH: pictures((0, 16)), TWIN: pictures((1, 6)), JP: pictures((0, 12), seed=3)})
    result = ash_match(samples)
    assert result.chosen == {"booru": ASH[1], "jp": JP[1]}
    assert row(result, *TWIN)["outcome"] == "rejected"
    assert "the dominant look (" in row(result, *JP)["evidence"]
    assert "booru:ash_(ember_knights)" in row(result, *JP)["evidence"]
    assert row(result, *JP_OTHER)["outcome"] == "rejected"  # no pictures to overrule its suffix


def test_mixed_pictures_leave_a_candidate_uncertain():
    samples = Samples({ASH: pictures((0, 16)), JP: pictures((0, 6), (1, 6))})
    result = ash_match(samples, reference=pictures((0, 4), seed=5))
    jp = row(result, *JP)
    assert jp["outcome"] == "uncertain" and jp["visual_consistency"] == pytest.approx(0.5)
    assert jp["evidence"].startswith("mixed")
    assert "jp" not in result.chosen


def test_pictures_overrule_a_suffix_in_another_script():
    jp_konosuba = ("jp", "アクア(このすば)")
    result = match_character(
        "aqua", "Aqua", ["アクア"], "kono_subarashii_sekai_ni_shukufuku_wo!",
        candidates(("booru", "aqua_(konosuba)", 50), (*jp_konosuba, 10)),
        posts(("booru", "aqua_(konosuba)", 10, "kono_subarashii_sekai_ni_shukufuku_wo!"), (*jp_konosuba, 10, "")),
        visual=VisualCheck(CosineIdentity(), Samples({("booru", "aqua_(konosuba)"): pictures((3, 10)),
                                                      jp_konosuba: pictures((3, 10), seed=4)})),
    )
    assert row(result, *jp_konosuba)["outcome"] == "likely"
    assert "is not the franchise" not in row(result, *jp_konosuba)["evidence"]


def test_too_few_pictures_or_no_reference_leave_the_text_verdict():
    few = ash_match(Samples({ASH: pictures((0, 16)), JP: pictures((0, 2))}))
    assert row(few, *JP)["outcome"] == "uncertain" and pd.isna(row(few, *JP)["visual_consistency"])
    assert "only 2 solo pictures to sample" in row(few, *JP)["evidence"]

    # No trusted candidate anywhere and no reference images: nothing to compare with.
    blind = match_character(
        "k", "Ash", [], "ember_knights", candidates(("jp", "ash", 12)), posts(("jp", "ash", 12, "")),
        visual=VisualCheck(CosineIdentity(), Samples({("jp", "ash"): pictures((0, 12))})),
    )
    assert blind.chosen == {} and "visual: no reference" in row(blind, "jp", "ash")["evidence"]


def test_overrides_win_over_pictures_and_banned_or_namesake_tags_are_not_embedded():
    samples = Samples({ASH: pictures((0, 16)), TWIN: pictures((1, 16)), JP: pictures((0, 12))})
    result = ash_match(samples, reference=pictures((0, 4), seed=5), forced_tags={"booru": "ash"},
                       banned_tags=[JP[1]])
    forced = row(result, *TWIN)
    assert forced["outcome"] == "trusted" and forced["evidence"].startswith("forced by index")
    assert forced["visual_consistency"] == 0.0  # the evidence is still shown
    assert result.chosen == {"booru": "ash"}
    assert JP not in samples.asked

    bad = Samples({ASH: np.zeros(16)})
    with pytest.raises(ValueError, match=r"must be \[n, dim\] vectors"):
        ash_match(bad)


def test_solo_sample_spreads_over_solo_pictures_with_files():
    manifest = pd.DataFrame({
        "site": "booru", "candidate_tag": "ash", "post_id": range(40),
        "sha256": [f"{n:064x}" if n != 3 else None for n in range(40)],
        "general_tags": ["1girl solo" if n % 4 else "2girls" for n in range(40)],
    })
    picks = solo_sample(manifest, "booru", "ash", size=5)
    assert picks == solo_sample(manifest, "booru", "ash", size=5)
    ids = [int(sha, 16) for sha in picks]
    assert len(ids) == 5 and all(n % 4 and n != 3 for n in ids)
    assert ids[0] < 5 and ids[-1] > 35  # spread, not the first five
    assert solo_sample(manifest, "booru", "other") == []
    with pytest.raises(ValueError, match="lacks column"):
        solo_sample(manifest.drop(columns="general_tags"), "booru", "ash")


# -- real pictures: the demo booru drawn, the tiny identity model embedding them ------


def test_demo_pictures_and_the_tiny_identity_model_reject_a_namesake(tmp_path):
    ash = replace(DEMO_CHARACTERS[0], posts=20)
    # Another "Ash" of the same franchise, under a bare tag: text evidence trusts it.
    namesake = replace(DEMO_CHARACTERS[1], key="ash_namesake", franchise="ember_knights", booru_tag="ash", posts=20)
    booru = DemoBooru(seed=3, characters=[ash, namesake], unrelated_characters=[])
    blobs = BlobStore(tmp_path / "blobs")
    rows = []
    for post in booru.posts:
        if "md5" not in post:
            continue  # hidden from anonymous users
        data = booru.file(f"{post['md5']}.{post['file_ext']}")[0]
        rows.append({"site": "demo", "post_id": post["id"], "candidate_tag": post["tag_string_character"],
                     "copyright_tags": post["tag_string_copyright"], "general_tags": post["tag_string_general"],
                     "sha256": blobs.put(data)})
    manifest = pd.DataFrame(rows)
    identity = IdentityModel(build_tiny_model("tiny-identity", tmp_path / "identity"), providers="cpu")
    reference_paths = []
    for n in range(3):
        path = tmp_path / f"reference_{n}.png"
        draw_post_image([(ash, n % len(ash.outfits))], (512, 640), random.Random(n)).save(path)
        reference_paths.append(path)
    reference = embed_reference_images(reference_paths, identity.embed, "ash_ember_knights")

    result = match_character(
        "ash_ember_knights", "Ash", ["アッシュ"], "ember_knights",
        candidates(("demo", "ash_(ember_knights)", 20), ("demo", "ash", 20)), manifest,
        visual=VisualCheck(identity, manifest_sampler(manifest, blobs.get, identity.embed), reference),
    )
    right, wrong = row(result, "demo", "ash_(ember_knights)"), row(result, "demo", "ash")
    print("\n" + result.table[["tag", "visual_consistency", "visual_samples", "outcome"]].to_string())
    assert result.chosen == {"demo": "ash_(ember_knights)"}
    assert right["outcome"] == "trusted" and right["visual_consistency"] >= 0.6 and right["visual_samples"] >= 8
    assert wrong["outcome"] == "rejected" and wrong["visual_consistency"] < 0.3

    with pytest.raises(FileNotFoundError, match="reference image .* not found"):
        embed_reference_images([tmp_path / "missing.png"], identity.embed, "ash_ember_knights")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"<html>not a picture</html>")
    with pytest.raises(ValueError, match="not a usable picture"):
        embed_reference_images([broken], identity.embed, "ash_ember_knights")
    assert embed_reference_images([], identity.embed, "ash_ember_knights") is None
