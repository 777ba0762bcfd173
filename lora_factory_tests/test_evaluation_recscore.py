"""evaluation.recscore: fidelity normalisation, prompt following, artefacts, the per-step table.

Most tests use small stand-ins with the interface of the identity model, tagger,
classifier and renderer; the last one runs the tiny identity and tagger ONNX models on
demo-world drawings.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_post_image
from lora_factory.demo.tiny_models import build_tiny_model
from lora_factory.evaluation.prompts import PreviewPrompt, preview_prompts
from lora_factory.evaluation.recscore import (
    RECSCORE_COLUMNS,
    artefact_score,
    dataset_upper_bound,
    fidelity,
    prompt_following,
    score_checkpoints,
)
from lora_factory.evaluation.selection import BASELINE_STEP, choose_step, fbeta_score
from lora_factory.storage import BlobStore, DamagedFileError
from lora_factory.vision.identity import IdentityModel
from lora_factory.vision.tagger import WD14Tagger


class CosineIdentity:
    """Identity stand-in: features are unit vectors (mean colour for images); the same
    character when the cosine distance is below the threshold."""

    threshold = 0.05

    def __init__(self):
        self.embedded: list[int] = []

    def embed(self, images):
        self.embedded.append(len(images))
        colours = np.array([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) for image in images])
        return colours / np.linalg.norm(colours, axis=1, keepdims=True)

    def difference(self, a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1.0 - a @ b.T

    def same_character(self, difference):
        return np.asarray(difference) < self.threshold


@dataclass
class Prediction:
    general: dict[str, float]
    character: dict[str, float] = field(default_factory=dict)


def one_hot(index: int, count: int, dim: int = 4) -> np.ndarray:
    vectors = np.zeros((count, dim), dtype=np.float32)
    vectors[:, index] = 1.0
    return vectors


def prompt(name: str, tags: list[str]) -> PreviewPrompt:
    return PreviewPrompt(name=name, prompt=", ".join(tags), negative_prompt="", seed=1, expected_tags=tags)


def test_identical_previews_score_one_and_disjoint_previews_zero():
    identity = CosineIdentity()
    dataset = one_hot(0, 5)
    assert dataset_upper_bound(dataset, identity) == 1.0
    assert fidelity(one_hot(0, 3), dataset, identity) == 1.0
    assert fidelity(one_hot(1, 3), dataset, identity) == 0.0


def test_fidelity_is_normalised_by_the_datasets_own_agreement():
    identity = CosineIdentity()
    # A dataset that is half character A and half character B agrees with itself on
    # 24 of its 56 ordered distinct pairs (within A: 4x3, within B: 4x3).
    dataset = np.concatenate([one_hot(0, 4), one_hot(1, 4)])
    assert dataset_upper_bound(dataset, identity) == pytest.approx(24 / 56)
    # One preview of A (4 matches) and one of an unrelated C: 4 of 16 pairs match.
    previews = np.concatenate([one_hot(0, 1), one_hot(2, 1)])
    assert fidelity(previews, dataset, identity) == pytest.approx((4 / 16) / (24 / 56))
    # All previews of A: 0.5 raw share, above the dataset's own 3/7, clipped to 1.
    assert fidelity(one_hot(0, 2), dataset, identity) == 1.0


def test_fidelity_refuses_datasets_it_cannot_normalise():
    identity = CosineIdentity()
    with pytest.raises(ValueError, match="at least 2 dataset images"):
        fidelity(one_hot(0, 1), one_hot(0, 1), identity)
    with pytest.raises(ValueError, match="not one character"):
        fidelity(one_hot(0, 1), np.eye(4, dtype=np.float32), identity)
    with pytest.raises(ValueError, match="2-D"):
        fidelity(np.zeros(4), one_hot(0, 3), identity)


def test_prompt_following_is_the_mean_confidence_on_expected_tags():
    prompts = [prompt("a", ["1girl", "smile"]), prompt("b", ["maid"]), prompt("none", [])]
    predictions = [
        Prediction({"1girl": 0.9, "smile": 0.5, "solo": 1.0}),
        Prediction({"1girl": 0.8}),  # maid missing: confidence 0
        Prediction({}),
    ]
    assert prompt_following(predictions, prompts) == pytest.approx((0.7 + 0.0) / 2)
    with pytest.raises(ValueError, match="2 tagger predictions for 3 prompts"):
        prompt_following(predictions[:2], prompts)


def test_artefact_score_averages_the_corrupted_probability():
    assert artefact_score([{"corrupted": 0.2, "normal": 0.8}, {"corrupted": 0.6, "normal": 0.4}]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no 'corrupted' class"):
        artefact_score([{"illustration": 1.0}])


RED = (200, 30, 30)
GREEN = (30, 200, 30)


class StepRenderer:
    """Renderer stand-in: every other preview goes from green to the dataset's red as the
    step grows (red at step 300); the others are always blue."""

    def __init__(self):
        self.calls: list[Path] = []

    def render(self, lora_path, prompts):
        self.calls.append(lora_path)
        step = int(Path(lora_path).stem.split("_")[-1]) if lora_path is not None else 0  # no LoRA
        redness = min(step / 300, 1.0)
        colour = tuple(int(round(r * redness + g * (1 - redness))) for r, g in zip(RED, GREEN))
        return [Image.new("RGB", (8, 8), colour if i % 2 == 0 else (30, 30, 200)) for i, _ in enumerate(prompts)]


class FixedTagger:
    def predict(self, images):
        return [Prediction({"1girl": 0.9, "solo": 0.5}) for _ in images]


class FixedClassifier:
    def predict(self, images):
        return [{"corrupted": 0.25, "normal": 0.75} for _ in images]


def test_score_checkpoints_builds_the_recscore_table(tmp_path):
    prompts = [prompt("a", ["1girl", "solo"]), prompt("b", ["1girl", "maid"])]
    checkpoints = [(300, tmp_path / "lora_300.safetensors"), (100, tmp_path / "lora_100.safetensors")]
    renderer, identity = StepRenderer(), CosineIdentity()
    dataset_images = [Image.new("RGB", (8, 8), RED)] * 10

    table, previews = score_checkpoints(
        checkpoints, renderer, prompts, dataset_images, identity, FixedTagger(),
        artefact_classifier=FixedClassifier(), max_dataset_images=4,
    )

    assert list(table.columns) == RECSCORE_COLUMNS
    assert list(table["step"]) == [100, 300]
    assert renderer.calls == [tmp_path / "lora_100.safetensors", tmp_path / "lora_300.safetensors"]
    assert identity.embedded[0] == 4  # the dataset, sampled down to max_dataset_images
    # Step 300: the red previews (one of two) match every dataset image; step 100 none.
    assert table["fidelity"].tolist() == pytest.approx([0.0, 0.5])
    assert table["prompt_following"].tolist() == pytest.approx([(0.7 + 0.45) / 2] * 2)
    assert table["artefact"].tolist() == pytest.approx([0.25, 0.25])
    expected = [fbeta_score(f, p) for f, p in zip(table["fidelity"], table["prompt_following"])]
    assert table["score"].tolist() == pytest.approx(expected)
    assert sorted(previews) == [100, 300] and len(previews[300]) == 2


def test_a_sample_of_stored_crops_reads_only_the_sample(tmp_path):
    # Crops in the blob store are read when the sampler picks them: with the blobs of all
    # but the sampled crops gone, scoring works; with a sampled one gone, it names it.
    blobs = BlobStore(tmp_path / "blobs")
    hashes = [blobs.put(_png(Image.new("RGB", (8, 8), (200, 30, 30 + i)))) for i in range(12)]
    identity = RecordingIdentity()
    checkpoints = [(300, tmp_path / "lora_300.safetensors")]
    score_checkpoints(checkpoints, StepRenderer(), [prompt("a", ["1girl"])], blobs.image_sequence(hashes),
                      identity, FixedTagger(), max_dataset_images=3)  # fmt: skip
    sampled = {colour[2] - 30 for colour in identity.dataset_colours}
    assert len(sampled) == 3
    for index in set(range(12)) - sampled:
        blobs.path(hashes[index]).unlink()
    table, _ = score_checkpoints(checkpoints, StepRenderer(), [prompt("a", ["1girl"])], blobs.image_sequence(hashes),
                                 CosineIdentity(), FixedTagger(), max_dataset_images=3)  # fmt: skip
    assert table["fidelity"].iloc[0] == pytest.approx(1.0)
    blobs.path(hashes[min(sampled)]).unlink()
    with pytest.raises(DamagedFileError, match="missing"):
        score_checkpoints(checkpoints, StepRenderer(), [prompt("a", ["1girl"])], blobs.image_sequence(hashes),
                          CosineIdentity(), FixedTagger(), max_dataset_images=3)  # fmt: skip


class RecordingIdentity(CosineIdentity):
    """Remembers the colours of the first images it embeds (the dataset sample)."""

    def embed(self, images):
        if not self.embedded:
            self.dataset_colours = [image.getpixel((0, 0)) for image in images]
        return super().embed(images)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_score_checkpoints_accepts_features_and_leaves_artefact_empty_without_a_classifier(tmp_path):
    identity = CosineIdentity()
    red_feature = identity.embed([Image.new("RGB", (2, 2), RED)])
    table, _ = score_checkpoints(
        [(300, tmp_path / "lora_300.safetensors")], StepRenderer(), [prompt("a", ["1girl"])],
        np.repeat(red_feature, 3, axis=0), identity, FixedTagger(),
    )
    assert table["fidelity"].tolist() == [1.0]
    assert table["artefact"].isna().all()


def test_baseline_row_scores_the_base_model_without_a_lora(tmp_path):
    dataset_images = [Image.new("RGB", (8, 8), RED)] * 4
    renderer = StepRenderer()
    table, previews = score_checkpoints(
        [(300, tmp_path / "lora_300.safetensors")], renderer, [prompt("a", ["1girl"]), prompt("b", ["1girl"])],
        dataset_images, CosineIdentity(), FixedTagger(), baseline=True,
    )
    assert renderer.calls == [None, tmp_path / "lora_300.safetensors"]  # the base model first
    assert list(table["step"]) == [BASELINE_STEP, 300] and table["path"].iloc[0] == ""
    # Without the LoRA the previews stay green: nothing like the red character.
    assert table["fidelity"].tolist() == pytest.approx([0.0, 0.5])
    assert sorted(previews) == [BASELINE_STEP, 300]
    with pytest.raises(ValueError, match="reserved for the base model"):
        score_checkpoints(
            [(BASELINE_STEP, tmp_path / "lora_0.safetensors")], renderer, [prompt("a", ["1girl"])],
            dataset_images, CosineIdentity(), FixedTagger(), baseline=True,
        )


def test_score_checkpoints_refuses_duplicate_steps(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        score_checkpoints(
            [(1, tmp_path / "a_1"), (1, tmp_path / "b_1")], StepRenderer(), [prompt("a", ["x"])],
            one_hot(0, 3), CosineIdentity(), FixedTagger(),
        )


class DemoDrawingRenderer:
    """Renderer stand-in drawing demo-world pictures: at step 100 the wrong character,
    at 200 the right one always in her first outfit, at 300 in the outfit each prompt asks for."""

    def __init__(self):
        characters = {character.key: character for character in DEMO_CHARACTERS}
        self.ash, self.kaede = characters["ash_ember_knights"], characters["kaede_starlight_academy"]

    def render(self, lora_path, prompts):
        step = int(Path(lora_path).stem.split("-")[-1])
        rng = random.Random(step)
        images = []
        for preview in prompts:
            if step == 100:
                figure = (self.kaede, 0)
            else:
                figure = (self.ash, 1 if step == 300 and "green dress" in preview.prompt else 0)
            images.append(draw_post_image([figure], (96, 128), rng))
        return images


def test_recscore_with_the_tiny_identity_and_tagger_models(tmp_path):
    identity = IdentityModel(build_tiny_model("tiny-identity", tmp_path / "identity"))
    tagger = WD14Tagger(build_tiny_model("tiny-tagger", tmp_path / "tagger"))
    renderer = DemoDrawingRenderer()
    rng = random.Random(0)
    dataset = (draw_post_image([(renderer.ash, index % 2)], (96, 128), rng) for index in range(8))
    prompts = preview_prompts("ash_ember_knights", ["red_hair", "yellow_eyes", "horns"],
                              [["navy_jacket", "beige_skirt"], ["green_dress"]])
    checkpoints = [(step, tmp_path / f"lora-{step:06d}.safetensors") for step in (100, 200, 300)]

    table, previews = score_checkpoints(checkpoints, renderer, prompts, dataset, identity, tagger)

    fidelity_by_step = dict(zip(table["step"], table["fidelity"]))
    following_by_step = dict(zip(table["step"], table["prompt_following"]))
    assert fidelity_by_step[100] == 0.0
    assert fidelity_by_step[200] == fidelity_by_step[300] == 1.0
    assert following_by_step[300] > following_by_step[200]  # the green dress prompt is obeyed
    assert choose_step(table) == 300
    assert len(previews[300]) == len(prompts)
