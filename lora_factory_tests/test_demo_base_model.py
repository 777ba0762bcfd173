"""The demo world's population generator and the demo base model's build (at tiny step counts)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from lora_factory.demo.base_model_build import (
    BUILD_MARKER,
    IMAGE_SIZE,
    TINY_BUILD,
    WORLD_COLOURS,
    _bpe,
    build_demo_base_model,
    measure_autoencoder,
    nearest_world_colours,
    caption_of,
    population_by_shape,
    save_samples,
    region_loss_weights,
    tag_ends,
    tag_index,
    training_caption_tags,
    word_merges,
    world_words,
    write_world_tokenizer,
)
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.palette import BACKGROUNDS, EYE_COLOURS, GARMENT_COLOURS, HAIR_COLOURS
from lora_factory.demo.world_population import (
    FACTORY_BUCKETS,
    FRAMINGS,
    RESERVED_IDENTITIES,
    generate_population,
    population_figure,
)
from lora_factory.training.base_model import encode_prompt, load_base_model, native_resolution, tokenize_captions

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def population():
    return list(generate_population(seed=0, count=120))


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return build_demo_base_model(tmp_path_factory.mktemp("models") / "demo-base", TINY_BUILD, log=lambda _: None)


# ----------------------------------------------------------------------------- population
def test_population_is_deterministic_per_seed_and_index():
    first, again = population_figure(7, 3), population_figure(7, 3)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.tags == again.tags
    # A figure does not depend on the ones before it: figure 3 drawn alone is figure 3 of a run.
    assert list(generate_population(7, 1, start=3))[0].image.tobytes() == first.image.tobytes()
    assert population_figure(8, 3).image.tobytes() != first.image.tobytes()


def test_population_never_draws_a_named_character(population):
    index_identities = {(c.hair, c.eyes, frozenset(c.features)) for c in DEMO_CHARACTERS}
    assert index_identities <= RESERVED_IDENTITIES
    looks = {(f.character.hair, f.character.eyes, frozenset(f.character.features)) for f in population}
    assert not looks & RESERVED_IDENTITIES
    assert len(looks) > 40  # a varied population, not a handful of looks


def test_population_covers_the_world(population):
    assert {f.framing for f in population} == set(FRAMINGS)
    assert {f.background for f in population} == set(BACKGROUNDS)
    assert {f.character.hair for f in population} == set(HAIR_COLOURS)
    assert {f.character.eyes for f in population} == set(EYE_COLOURS)
    garments = {garment for f in population for garment in f.character.outfits[0]}
    assert garments == set(GARMENT_COLOURS)
    assert Counter(f.character.hair_length for f in population).keys() == {"long", "short"}
    assert any("horns" in f.tags for f in population)
    assert any("horns" not in f.tags for f in population)


def test_stage_5_figures_have_the_shapes_of_the_factorys_training_pictures():
    by_shape = population_by_shape(5, 40)
    assert sum(len(tags) for _, tags in by_shape.values()) == 40
    assert set(by_shape) <= set(FACTORY_BUCKETS.resolutions) and len(by_shape) >= 3
    for (width, height), (pixels, tags) in by_shape.items():
        assert pixels.shape == (len(tags), 3, height, width) and pixels.dtype == torch.uint8
    # Every other figure is the square picture of the earlier stages.
    assert len(by_shape[(IMAGE_SIZE, IMAGE_SIZE)][1]) >= 20
    for index in range(1, 40, 2):
        square, cut = population_figure(5, index), population_figure(5, index, buckets=FACTORY_BUCKETS)
        assert cut.tags == square.tags and cut.character == square.character
        assert cut.image.size == FACTORY_BUCKETS.select(*cut.image.size).bucket  # already its bucket's size
        colours = {tuple(pixel) for pixel in np.array(cut.image).reshape(-1, 3).tolist()}
        assert HAIR_COLOURS[cut.character.hair] in colours  # cut around the figure, not beside it
        if cut.framing == "full_body":
            assert cut.image.height >= 2 * cut.image.width  # a standing figure, whole


def test_captions_are_booru_tags_that_describe_the_picture(population):
    for figure in population:
        character, tags = figure.character, figure.tags
        assert figure.image.size == (IMAGE_SIZE, IMAGE_SIZE) and figure.image.mode == "RGB"
        assert all(tag == tag.strip().lower() and " " not in tag for tag in tags)
        assert len(set(tags)) == len(tags)
        assert figure.caption == ", ".join(tag.replace("_", " ") for tag in tags)
        assert "solo" in tags
        wears_trousers = character.outfits[0][-1].endswith("pants")
        assert ("1boy" in tags) == wears_trousers and ("1girl" in tags) == (not wears_trousers)
        assert [tag for tag in tags if tag in FRAMINGS] == [figure.framing]
        assert {character.hair, character.eyes, f"{character.hair_length}_hair", figure.background} <= set(tags)
        assert set(character.features) <= set(tags)
        top, *bottom = character.outfits[0]
        assert top in tags
        # A portrait shows the shoulders, not the skirt or trousers.
        assert all((garment in tags) == (figure.framing != "portrait") for garment in bottom)
        # The picture holds the colours its caption names (hair is never too small to show).
        pixels = np.array(figure.image).reshape(-1, 3)
        for tag in (character.hair, top, figure.background):
            assert (pixels == WORLD_COLOURS[tag]).all(axis=1).any(), (tag, figure.caption)


def test_training_captions_keep_only_the_figures_tags():
    import random

    tags = population_figure(0, 0).tags
    rng = random.Random(0)
    captions = [caption_of(training_caption_tags(tags, rng)) for _ in range(400)]
    assert 0 < sum(caption == "" for caption in captions) < 60  # ~5% empty, for guidance
    described = [c for c in captions if c and "lowres" not in c]
    words = {tag.replace("_", " ") for tag in tags} | {"masterpiece", "best quality"}
    assert all(set(c.split(", ")) <= words for c in described)
    assert len({c for c in described}) > 300  # shuffled and thinned, rarely twice the same


def test_region_weights_put_the_eyes_first(population):
    figure = next(f for f in population if f.framing == "portrait" and "horns" not in f.tags)
    pixels = torch.from_numpy(np.array(figure.image)).permute(2, 0, 1)[None]
    weights = region_loss_weights(pixels, [figure.tags])[0, 0]
    assert weights.shape == (IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    assert weights.mean().item() == pytest.approx(1.0)
    # Read each latent pixel's 8x8 patch of the picture: the eyes' patches weigh most.
    patches = pixels[0].float().unfold(1, 8, 8).unfold(2, 8, 8)  # [3, 16, 16, 8, 8]

    def covers(tag):
        rgb = torch.tensor(WORLD_COLOURS[tag], dtype=torch.float32)[:, None, None, None, None]
        return ((patches - rgb).abs().sum(dim=0) < 10).flatten(2).any(dim=2)

    eyes, hair = covers(figure.character.eyes), covers(figure.character.hair)
    assert eyes.any() and hair.any()
    background = ~covers(figure.character.eyes) & ~hair
    assert weights[eyes].min() > weights[hair & ~eyes].max() > weights[background].max()


def test_tag_ends_name_each_tag_at_its_last_token(tmp_path):
    from transformers import CLIPTokenizer

    write_world_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    captions = [["1girl", "red_hair", "masterpiece"], None, [], ["blue_eyes"]]
    classes = tag_index([("1girl", "red_hair", "blue_eyes")])
    token_ids = tokenize_captions(tokenizer, [caption_of(tags) for tags in captions])
    rows, positions, labels = tag_ends(token_ids, captions, tokenizer, classes)
    # The negative prompt and the empty caption name nothing; `1girl` ends at `girl`.
    assert rows.tolist() == [0, 0, 0, 3]
    names = {index: tag for tag, index in classes.items()}
    read = [(tokenizer.convert_ids_to_tokens(int(token_ids[r, p])), names[int(label)])
            for r, p, label in zip(rows, positions, labels, strict=True)]  # fmt: skip
    assert read == [("girl</w>", "1girl"), ("hair</w>", "red_hair"), ("masterpiece</w>", "masterpiece"),
                    ("eyes</w>", "blue_eyes")]  # fmt: skip


# ----------------------------------------------------------------------------- tokenizer
def test_every_world_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    words = world_words()
    assert {"hair", "eyes", "horns", "ribbon", "navy", "jacket", "portrait", "upper", "girl"} <= set(words)
    vocab = write_world_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and vocab[word + "</w>"] == ids[0], word
    # Tokens stay words inside a caption: `red hair` is two tokens, `1girl` is `1` + `girl`.
    assert tokenizer.convert_ids_to_tokens(tokenizer("1girl, red hair", add_special_tokens=False).input_ids) == [
        "1</w>", "girl</w>", ",</w>", "red</w>", "hair</w>",
    ]  # fmt: skip


def test_word_merges_agree_with_the_bpe_they_are_made_for():
    merges = word_merges(["hair", "horns", "ha", "shirt", "short"])
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    for word in ("hair", "horns", "ha", "shirt", "short"):
        assert _bpe(word, ranks) == [word + "</w>"]
    assert _bpe("hairs", ranks) != ["hairs</w>"]  # words outside the list stay split


def test_population_captions_fit_in_the_context(tmp_path, population):
    from transformers import CLIPTokenizer

    write_world_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    longest = max(len(tokenizer(f.caption).input_ids) for f in population)
    assert longest <= 50  # BOS + tags + EOS, with room for a trigger word and more tags


# ----------------------------------------------------------------------------- build
def test_tiny_build_is_an_sd15_pipeline(tiny_build):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert native_resolution(tiny_build) == IMAGE_SIZE
    base = load_base_model(tiny_build, device="cpu")
    assert isinstance(base.unet, UNet2DConditionModel)
    assert isinstance(base.vae, AutoencoderKL)
    assert isinstance(base.text_encoder, CLIPTextModel)
    assert base.vae.config.latent_channels == 4 and len(base.vae.config.block_out_channels) == 4  # x8
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    assert base.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert (base.noise_scheduler.config.beta_start, base.noise_scheduler.config.beta_end) == (0.00085, 0.012)
    assert base.noise_scheduler.config.prediction_type == "epsilon"
    index = json.loads((tiny_build / "model_index.json").read_text())
    assert index["scheduler"][1] == PNDMScheduler.__name__
    assert json.loads((tiny_build / BUILD_MARKER).read_text())["steps"]["unet_steps"] == TINY_BUILD.unet_steps
    # The scaling factor is measured, not SD1.5's 0.18215.
    assert base.vae.config.scaling_factor != 0.18215
    # Demo tags are single tokens in the saved tokenizer too.
    ids = tokenize_captions(base.tokenizer, ["red hair, horns, navy jacket"])[0].tolist()
    assert ids[:7] == [ids[0], *base.tokenizer.convert_tokens_to_ids(
        ["red</w>", "hair</w>", ",</w>", "horns</w>", ",</w>", "navy</w>"]
    )]  # fmt: skip
    assert encode_prompt(base, ["red hair"]).shape == (1, 77, base.text_encoder.config.hidden_size)
    weights = sum((tiny_build / name).stat().st_size for name in WEIGHT_FILES)
    assert weights < 15 * 2**20


def test_build_is_reproducible_and_refuses_existing_folders(tiny_build, tmp_path):
    threads = torch.get_num_threads()
    again = build_demo_base_model(tmp_path / "again", TINY_BUILD, log=lambda _: None)
    # The build pins one thread and gives the caller's setting back (it changes float rounding).
    assert torch.get_num_threads() == threads
    for name in WEIGHT_FILES:
        digest = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (tiny_build, again)]
        assert digest[0] == digest[1], name
    with pytest.raises(FileExistsError):
        build_demo_base_model(again, TINY_BUILD, log=lambda _: None)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left


def test_a_build_resumed_after_stage_3_4_or_5_gives_the_same_bytes(tiny_build, tmp_path):
    quiet = lambda _: None  # noqa: E731
    all_stages = ["vae", "decoder", "unet", "refine", "shapes", "colour"]
    assert json.loads((tiny_build / BUILD_MARKER).read_text())["stages"] == all_stages
    stage3 = build_demo_base_model(tmp_path / "stage3", replace(TINY_BUILD, refine_steps=0), log=quiet)
    stage4 = build_demo_base_model(tmp_path / "stage4", replace(TINY_BUILD, shapes_steps=0), log=quiet)
    stage5 = build_demo_base_model(tmp_path / "stage5", replace(TINY_BUILD, colour_steps=0), log=quiet)
    earlier_builds = (stage3, stage4, stage5)
    for count, earlier in enumerate(earlier_builds, start=3):
        assert json.loads((earlier / BUILD_MARKER).read_text())["stages"] == all_stages[:count]
    for earlier in earlier_builds:
        resumed = build_demo_base_model(tmp_path / f"from_{earlier.name}", TINY_BUILD, log=quiet, resume_from=earlier)
        assert json.loads((resumed / BUILD_MARKER).read_text())["stages"] == all_stages
        for name in (*WEIGHT_FILES, "unet/config.json", "vae/config.json", "text_encoder/config.json"):
            digest = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (tiny_build, resumed)]
            assert digest[0] == digest[1], (earlier.name, name)
    # Stages 4 to 6 change the diffusion models, not the autoencoder.
    for earlier in earlier_builds:
        changed = {name for name in WEIGHT_FILES if (earlier / name).read_bytes() != (tiny_build / name).read_bytes()}
        assert changed == {WEIGHT_FILES[0], WEIGHT_FILES[2]}, earlier.name
    # A model that is not an earlier stage of this recipe's build is refused, with the reason.
    with pytest.raises(ValueError, match="not stages 1-3, 1-4 or 1-5"):
        build_demo_base_model(tmp_path / "twice", TINY_BUILD, log=quiet, resume_from=tiny_build)
    with pytest.raises(ValueError, match="seed 0, not 1"):
        build_demo_base_model(tmp_path / "seed", TINY_BUILD, seed=1, log=quiet, resume_from=stage3)
    with pytest.raises(ValueError, match="its stage 'refine' ran"):
        build_demo_base_model(tmp_path / "steps", replace(TINY_BUILD, refine_steps=4), log=quiet, resume_from=stage4)
    with pytest.raises(ValueError, match="its stage 'shapes' ran"):
        build_demo_base_model(tmp_path / "shapes", replace(TINY_BUILD, shapes_lr=1e-3), log=quiet, resume_from=stage5)
    with pytest.raises(FileNotFoundError, match="not a demo base model build"):
        build_demo_base_model(tmp_path / "none", TINY_BUILD, log=quiet, resume_from=tmp_path)


def test_a_lora_trains_and_renders_on_the_build(tiny_build, tmp_path, population):
    from lora_factory.evaluation.previews import PreviewRenderer
    from lora_factory.evaluation.prompts import PreviewPrompt
    from lora_factory.training.config import TrainingConfig
    from lora_factory.training.dataset import TrainingExample
    from lora_factory.training.kohya_format import read_kohya_lora
    from lora_factory.training.train import train_lora

    examples = []
    for index, figure in enumerate(population[:4]):
        path = tmp_path / f"{index}.png"
        figure.image.save(path)
        examples.append(TrainingExample(path, f"demo_char, {figure.caption}", (IMAGE_SIZE, IMAGE_SIZE)))
    config = TrainingConfig(
        rank=4, alpha=2, max_train_steps=2, save_every_n_steps=2, batch_size=2, resolution=IMAGE_SIZE
    )
    checkpoints = train_lora(
        tiny_build, examples, tmp_path / "lora", config, output_name="demo_char", trigger_word="demo_char",
        tag_frequency={"red_hair": 1}, dataset_dirs={"1_demo_char": {"n_repeats": 1, "img_count": 4}},
        log=lambda _: None, device="cpu",
    )  # fmt: skip
    tensors, _ = read_kohya_lora(checkpoints[-1].path)
    assert any(key.startswith("lora_unet_") and "attn" in key for key in tensors)
    assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in tensors)
    renderer = PreviewRenderer(tiny_build, steps=2, guidance=4.0, device="cpu", batch_size=1)
    (image,) = renderer.render(checkpoints[-1].path, [PreviewPrompt("p", "demo_char, red hair", "", 1)])
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_measurements_read_colours_back(tiny_build):
    figure = population_figure(0, 1)
    nearest = nearest_world_colours(torch.from_numpy(np.array(figure.image)).permute(2, 0, 1).float())
    names = list(WORLD_COLOURS)
    counts = Counter(names[i] for i in nearest.flatten().tolist())
    assert counts[figure.character.hair] > 0 and counts[figure.background] > 0
    report = measure_autoencoder(tiny_build, count=2)
    assert report["figures"] == 2 and len(report["mean_abs_error_rgb"]) == 3
    assert all(0 <= value <= 255 for value in report["mean_abs_error_rgb"])


def test_sample_grids_show_captions_framings_and_the_factorys_bucket_shapes(tiny_build, tmp_path):
    from PIL import Image

    paths = save_samples(tiny_build, tmp_path, steps=2)
    sizes = {path.name: Image.open(path).size for path in paths}
    assert sizes == {
        "heldout_captions.png": (8 * IMAGE_SIZE, 4 * IMAGE_SIZE),
        "framings.png": (8 * IMAGE_SIZE, len(FRAMINGS) * IMAGE_SIZE),
        "shape_64x192.png": (8 * 64, 192),
        "shape_96x160.png": (8 * 96, 160),
    }
