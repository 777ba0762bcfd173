"""The tiny models really see the demo world: tags, identity, boxes and classes on
figures drawn by the demo booru's drawing code (JPEG re-encoded, cropped as cleaning does)."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from lora_factory.benchmarks.identity_tolerance import DEGRADATIONS, tolerance_table
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_ashtray, draw_post
from lora_factory.demo.palette import TAG_COLOURS
from lora_factory.demo.tiny_models import TINY_MODELS, tiny_registry
from lora_factory.vision.detection import iou
from lora_factory.vision.models import ROLES, VisionModels
from lora_factory.vision.registry import DEFAULT_MODELS

ASH, ASH_BOY, LUMI, KAEDE = DEMO_CHARACTERS


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return tiny_registry(tmp_path_factory.mktemp("models"), hf_cache_dir=tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def models(registry) -> VisionModels:
    return VisionModels.load(registry, names=TINY_MODELS)


def jpeg(image: Image.Image, quality: int = 80) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def head_crop(image: Image.Image, head_box) -> Image.Image:
    """The cleaning step's head crop: the head box squared and enlarged 1.5x."""
    x0, y0, x1, y1 = head_box
    side = max(x1 - x0, y1 - y0) * 1.5
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return image.crop((max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
                       min(image.width, round(cx + side / 2)), min(image.height, round(cy + side / 2))))  # fmt: skip


def framings(character, outfit: int, size, seed: int) -> dict[str, Image.Image]:
    post = draw_post([(character, outfit)], size, random.Random(seed))
    figure = post.figures[0]
    return {
        "picture": jpeg(post.image),
        "half body": jpeg(post.image.crop(figure.half_body_box)),
        "head": jpeg(head_crop(post.image, figure.head_box)),
    }


def test_defaults_cover_every_role_and_real_names_are_registered(models, registry):
    assert all(getattr(models, role) is not None for role in ROLES)
    assert set(DEFAULT_MODELS) == set(TINY_MODELS) == set(ROLES)
    assert all(registry.spec(name).repo_id for name in DEFAULT_MODELS.values())


@pytest.mark.parametrize("character", DEMO_CHARACTERS, ids=lambda c: c.key)
def test_tagger_reads_hair_eyes_features_and_garments(models, character):
    for outfit_index, outfit in enumerate(character.outfits):
        images = framings(character, outfit_index, (700, 600), seed=outfit_index)
        predictions = dict(zip(images, models.tagger.predict(list(images.values())), strict=True))
        for framing, prediction in predictions.items():
            visible = {character.hair, character.eyes, *character.features, outfit[0], f"{character.hair_length}_hair"}
            if framing != "head":
                visible |= set(outfit) | {garment.rsplit("_", 1)[-1] for garment in outfit}
            missing = visible - set(prediction.general)
            assert not missing, (framing, missing, prediction.general)
            # No colour of another character or outfit is seen anywhere.
            seen = {t for t in prediction.general if t in TAG_COLOURS}
            assert seen <= {character.hair, character.eyes, *character.features, *outfit}, (framing, seen)
            assert prediction.rating["general"] > 0.9
        picture = predictions["picture"]
        assert character.booru_tag in picture.character
        assert {"solo", "1girl" if character.gender == "female" else "1boy"} <= set(picture.general)


FRAMING_TAGS = {"picture": "full_body", "half body": "upper_body", "head": "portrait"}


@pytest.mark.parametrize("character", DEMO_CHARACTERS, ids=lambda c: c.key)
def test_tagger_reads_the_framing_as_the_real_tagger_writes_it(models, character):
    # Captions then name the framing, as the base model's captions and the preview prompts do.
    for seed, size in enumerate([(700, 600), (768, 512), (512, 768)]):
        images = framings(character, seed % len(character.outfits), size, seed=seed)
        for framing, prediction in zip(images, models.tagger.predict(list(images.values())), strict=True):
            said = set(prediction.general) & set(FRAMING_TAGS.values())
            assert said == {FRAMING_TAGS[framing]}, (framing, size, prediction.general)


def test_tagger_counts_people_and_sees_greyscale(models):
    post = draw_post([(ASH, 0), (LUMI, 0), (KAEDE, 0)], (768, 600), random.Random(3))
    crowd, grey = models.tagger.predict([jpeg(post.image), jpeg(post.image.convert("L"))])
    assert "solo" not in crowd.general and "1girl" not in crowd.general
    assert {ASH.booru_tag, LUMI.booru_tag, KAEDE.booru_tag} <= set(crowd.character)
    assert {"monochrome", "greyscale"} <= set(grey.general)
    assert not set(grey.general) & set(TAG_COLOURS) and not grey.character
    assert "full_body" in crowd.general  # the tallest figure's framing
    assert crowd.scores.shape == (len(models.tagger.tag_names),)


def test_identity_matches_framings_and_outfits_and_separates_characters(models):
    crops, owners = [], []
    for character in DEMO_CHARACTERS:
        for outfit_index in range(len(character.outfits)):
            size = [(700, 600), (768, 512)][outfit_index % 2]  # wide pictures: small figures
            crops += framings(character, outfit_index, size, seed=outfit_index).values()
            owners += [character.key] * 3
    features = models.identity.embed(crops)
    assert features.shape == (len(crops), 768) and features.dtype == np.float32
    same = models.identity.same_character(models.identity.difference(features, features))
    expected = np.array(owners)[:, None] == np.array(owners)[None, :]
    np.testing.assert_array_equal(same, expected)


def test_identity_difference_of_two_batches(models):
    a, b = framings(LUMI, 0, (700, 600), 0), framings(KAEDE, 0, (700, 600), 0)
    fa, fb = models.identity.embed(list(a.values())), models.identity.embed(list(b.values())[:2])
    difference = models.identity.difference(fa, fb)
    assert difference.shape == (3, 2) and np.all(difference > models.identity.threshold)
    assert models.identity.difference(fa, fa[:0]).shape == (3, 0)
    with pytest.raises(ValueError, match="768"):
        models.identity.difference(fa[:, :10], fb)


@pytest.mark.parametrize("figures,size", [([(ASH, 0), (ASH_BOY, 0)], (700, 560)),
                                          ([(LUMI, 1), (KAEDE, 0), (ASH, 1)], (768, 600))])  # fmt: skip
def test_detectors_find_every_figure_its_half_body_head_and_face(models, figures, size):
    post = draw_post(figures, size, random.Random(len(figures)))
    image = jpeg(post.image)
    detectors = (models.person, models.halfbody, models.head, models.face)
    persons, halves, heads, faces = (detector.detect([image])[0] for detector in detectors)
    assert len(persons) == len(halves) == len(heads) == len(faces) == len(figures)
    for truth in post.figures:
        person = max(persons, key=lambda d: iou(d.box, truth.box))
        assert iou(person.box, truth.box) >= 0.6 and person.label == "person"
        assert max(iou(d.box, truth.half_body_box) for d in halves) >= 0.6
        head = max(heads, key=lambda d: iou(d.box, truth.head_box))
        assert iou(head.box, truth.head_box) >= 0.6
        face = next(f for f in faces if inside(f.box, head.box))
        assert inside(head.box, person.box) and inside(face.box, person.box)
        assert face.width < head.width and face.height < head.height


def inside(inner, outer, slack: float = 2.0) -> bool:
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack
            and inner[2] <= outer[2] + slack and inner[3] <= outer[3] + slack)  # fmt: skip


def test_detectors_find_heads_in_crops_and_nobody_in_a_still_life(models):
    crops = framings(KAEDE, 0, (700, 600), 0)
    head_in_head_crop = models.head.detect([crops["head"]])[0]
    assert len(head_in_head_crop) == 1 and len(models.face.detect([crops["head"]])[0]) == 1
    assert head_in_head_crop[0].width > 0.5 * crops["head"].width
    still_life = draw_ashtray((600, 600), random.Random(0))
    assert all(not d.detect([still_life])[0] for d in (models.person, models.head, models.face))
    assert models.person.detect([]) == []


def test_classifiers_flag_monochrome_and_call_demo_pictures_safe_illustrations(models):
    post = draw_post([(LUMI, 0)], (600, 700), random.Random(5))
    colour, grey = jpeg(post.image), jpeg(post.image.convert("L"))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    mono = models.monochrome.predict([colour, grey])
    assert mono[0]["normal"] > 0.9 and mono[1]["monochrome"] > 0.9
    kinds = models.classification.predict([colour, noise])
    assert max(kinds[0], key=kinds[0].get) == "illustration" and max(kinds[1], key=kinds[1].get) == "3d"
    assert models.rating.predict([colour])[0]["safe"] > 0.9
    clean, noisy = models.aesthetic.predict([post.image, noise])
    for scores in (clean, noisy):
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    order = list(clean)  # best first
    assert order.index(max(clean, key=clean.get)) < order.index(max(noisy, key=noisy.get))


def test_cpu_batches_are_small_for_the_transformers_and_can_be_fixed_per_role(registry):
    cpu = VisionModels.load(registry, names=TINY_MODELS, providers="cpu")
    # SwinV2 tagger and aesthetic, CAFormer identity: one image per call on a CPU.
    assert cpu.tagger.batch_size == cpu.aesthetic.batch_size == cpu.identity.batch_size == 1
    assert {getattr(cpu, role).batch_size for role in ("person", "face", "monochrome", "rating")} == {4}
    fixed = VisionModels.load(
        registry, names=TINY_MODELS, providers="cpu", batch_sizes={"tagger": 3, "aesthetic": 2}
    )
    assert (fixed.tagger.batch_size, fixed.aesthetic.batch_size, fixed.person.batch_size) == (3, 2, 4)
    with pytest.raises(ValueError, match="unknown vision roles"):
        VisionModels.load(registry, names=TINY_MODELS, batch_sizes={"tager": 2})
    with pytest.raises(ValueError, match="at least 1"):
        VisionModels.load(registry, names=TINY_MODELS, providers="cpu", batch_sizes={"tagger": 0})


def test_gpu_batches_are_large_where_cuda_runs(registry):
    gpu = VisionModels.load(registry, names=TINY_MODELS, providers="auto")
    if gpu.tagger.session.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("no usable CUDA provider on this machine")
    assert gpu.tagger.batch_size == 16 and gpu.identity.batch_size == 32 and gpu.person.batch_size == 16


def test_results_do_not_depend_on_the_batch_size(models):
    rng = random.Random(7)
    images = [jpeg(draw_post([(character, 0)], (420, 560), rng).image) for character in DEMO_CHARACTERS]
    one, three = models.tagger.predict(images, batch_size=1), models.tagger.predict(images, batch_size=3)
    np.testing.assert_allclose([p.scores for p in one], [p.scores for p in three], atol=1e-5)
    np.testing.assert_allclose(models.identity.embed(images, batch_size=1), models.identity.embed(images, 3), atol=1e-5)
    found = [models.person.detect(images, batch_size=size) for size in (1, 3)]
    assert [[d.label for d in image] for image in found[0]] == [[d.label for d in image] for image in found[1]]
    np.testing.assert_allclose([d.box for image in found[0] for d in image],
                               [d.box for image in found[1] for d in image], atol=1e-3)
    quality = [models.aesthetic.predict(images, batch_size=size) for size in (1, 3)]
    np.testing.assert_allclose([list(p.values()) for p in quality[0]], [list(p.values()) for p in quality[1]],
                               atol=1e-5)


def test_the_dagster_resource_passes_batch_sizes_from_run_config(tmp_path):
    from lora_factory.demo.deployment import DemoVisionModels
    from lora_factory.storage import FactoryStore

    store = FactoryStore(tmp_path)
    loaded = DemoVisionModels(batch_sizes={"tagger": 5}).load(store)
    assert loaded.tagger.batch_size == 5 and loaded.person.batch_size in (4, 16)
    with pytest.raises(ValueError, match="unknown vision roles"):
        DemoVisionModels(batch_sizes={"tager": 5}).load(store)


def test_identity_recognises_imperfect_renderings_and_still_separates_characters(models):
    """Generated previews are blurred, re-encoded and a little off-colour; the identity
    model still knows who they show (as real CCIP does), and never mistakes another
    demo character for them."""
    degradations = {name: DEGRADATIONS[name] for name in
                    ("gaussian blur r=2", "JPEG q=15", "colour shift +20 (all channels)", "colour cast (+25 R, -25 B)")}  # fmt: skip
    table = tolerance_table({"soft": models.identity}, degradations, crops_per_character=6)["soft"]
    assert (table[list(degradations)] >= 0.9).all(), table
    assert table["other demo characters (floor: 0)"] == 0.0
    assert table["random demo-world figures (chance)"] < 0.15
