"""RecScore: how much each checkpoint's previews look like the character, and how well
they follow their prompts.

- fidelity: the share of (preview, dataset image) pairs that the identity model (CCIP)
  calls the same character, divided by the same share within the dataset itself
  (diagonal excluded). The dataset's own share is the best a generator could hope for:
  a character drawn in many styles is recognised less often even between true images,
  and a LoRA should not be punished for that. Clipped to [0, 1].
- prompt following: the tagger's mean confidence on the tags each prompt asks for
  (among the tags the tagger knows).
- artefact (optional): the mean probability that the corruption classifier gives to
  "corrupted" over the previews; it gates steps in `selection.choose_step`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image

from lora_factory.evaluation.prompts import PreviewPrompt
from lora_factory.evaluation.selection import BASELINE_STEP, DEFAULT_BETA, fbeta_score

RECSCORE_COLUMNS = ["step", "path", "fidelity", "prompt_following", "artefact", "score"]
CORRUPTED_LABEL = "corrupted"


class IdentityLike(Protocol):
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...
    def difference(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...
    def same_character(self, difference: np.ndarray) -> np.ndarray: ...


class TagPredictionLike(Protocol):
    general: Mapping[str, float]
    character: Mapping[str, float]
    scores: np.ndarray


class TaggerLike(Protocol):
    def predict(self, images: Sequence[Image.Image]) -> Sequence[TagPredictionLike]: ...


class ClassifierLike(Protocol):
    def predict(self, images: Sequence[Image.Image]) -> Sequence[Mapping[str, float]]: ...


class RendererLike(Protocol):
    def render(self, lora_path: Path | None, prompts: Sequence[PreviewPrompt]) -> list[Image.Image]: ...


def dataset_upper_bound(dataset_feats: np.ndarray, identity: IdentityLike) -> float:
    """Share of distinct dataset image pairs that the identity model calls the same character."""
    feats = _as_feature_matrix(dataset_feats, "dataset_feats")
    count = feats.shape[0]
    if count < 2:
        raise ValueError(
            f"fidelity needs at least 2 dataset images to measure the dataset's own agreement, got {count}"
        )
    same = np.asarray(identity.same_character(identity.difference(feats, feats)), dtype=bool)
    if same.shape != (count, count):
        raise ValueError(f"identity.difference gave shape {same.shape} for {count} x {count} features")
    off_diagonal = ~np.eye(count, dtype=bool)
    return float(same[off_diagonal].mean())


def fidelity(
    preview_feats: np.ndarray,
    dataset_feats: np.ndarray,
    identity: IdentityLike,
    upper_bound: float | None = None,
) -> float:
    """Share of (preview, dataset image) pairs called the same character, normalised by
    the dataset's own share (`dataset_upper_bound`, computed here when not given), in [0, 1]."""
    previews = _as_feature_matrix(preview_feats, "preview_feats")
    dataset = _as_feature_matrix(dataset_feats, "dataset_feats")
    if previews.shape[0] == 0:
        raise ValueError("fidelity needs at least one preview feature vector")
    if upper_bound is None:
        upper_bound = dataset_upper_bound(dataset, identity)
    if upper_bound <= 0.0:
        raise ValueError(
            "the identity model never calls two dataset images the same character, so fidelity "
            "cannot be normalised: the dataset is not one character (check the identity filter)"
        )
    same = np.asarray(identity.same_character(identity.difference(previews, dataset)), dtype=bool)
    if same.shape != (previews.shape[0], dataset.shape[0]):
        raise ValueError(
            f"identity.difference gave shape {same.shape} for {previews.shape[0]} previews x "
            f"{dataset.shape[0]} dataset images"
        )
    return float(np.clip(same.mean() / upper_bound, 0.0, 1.0))


def prompt_following(
    predictions: Sequence[TagPredictionLike],
    prompts: Sequence[PreviewPrompt],
    tag_names: Sequence[str] | None = None,
) -> float:
    """Mean over prompts of the tagger's mean confidence on that prompt's expected tags.

    With `tag_names` (the tagger's vocabulary, in the order of each prediction's `scores`),
    confidences are the raw scores, below the tagger's threshold too, and expected tags
    the tagger does not know are left out: a tag it cannot see says nothing about the
    checkpoint. Without it, a tag missing from the prediction's general/character tags
    counts as 0. Prompts left with no expected tag are left out of the mean.
    """
    if len(predictions) != len(prompts):
        raise ValueError(f"got {len(predictions)} tagger predictions for {len(prompts)} prompts")
    vocabulary = {name: index for index, name in enumerate(tag_names)} if tag_names is not None else None
    per_prompt = []
    for prediction, prompt in zip(predictions, prompts):
        if vocabulary is None:
            confidences = [_confidence(prediction, tag) for tag in prompt.expected_tags]
        else:
            scores = np.asarray(prediction.scores)
            confidences = [float(scores[vocabulary[tag]]) for tag in prompt.expected_tags if tag in vocabulary]
        if confidences:
            per_prompt.append(float(np.mean(confidences)))
    if not per_prompt:
        raise ValueError(
            "prompt_following: no prompt expects a tag the tagger knows; build prompts with "
            "preview_prompts() and check the tagger's selected_tags.csv"
        )
    return float(np.mean(per_prompt))


def artefact_score(predictions: Sequence[Mapping[str, float]], label: str = CORRUPTED_LABEL) -> float:
    """Mean probability of `label` (the corruption classifier's "corrupted" class) over images."""
    if not predictions:
        raise ValueError("artefact_score needs at least one classifier prediction")
    if label not in predictions[0]:
        raise ValueError(
            f"the artefact classifier has no {label!r} class (it has {sorted(predictions[0])}); "
            "configure the AI-corruption classifier, or pass its label"
        )
    return float(np.mean([prediction[label] for prediction in predictions]))


def score_checkpoints(
    checkpoints: Sequence[tuple[int, Path]],
    renderer: RendererLike,
    prompts: Sequence[PreviewPrompt],
    dataset: np.ndarray | Iterable[Image.Image],
    identity: IdentityLike,
    tagger: TaggerLike,
    log: logging.Logger | Any | None = None,
    *,
    artefact_classifier: ClassifierLike | None = None,
    beta: float = DEFAULT_BETA,
    max_dataset_images: int = 256,
    sample_seed: int = 0,
    baseline: bool = False,
) -> tuple[pd.DataFrame, dict[int, list[Image.Image]]]:
    """Render `prompts` at every checkpoint and score the previews.

    With `baseline`, the base model without the LoRA is scored too, as step
    `BASELINE_STEP` (0) with an empty path: what the LoRA adds is the distance to it.

    `dataset` is either the dataset's identity features ([N, D] array; the crops'
    stored embeddings spare embedding them again) or its images.
    At most `max_dataset_images` of them (a fixed random sample) are compared with the
    previews, which keeps the pairwise comparison bounded on large datasets.

    Returns the RecScore table (columns `RECSCORE_COLUMNS`, one row per checkpoint, sorted
    by step; artefact is NaN without a classifier; score is F_beta of fidelity and prompt
    following) and the previews of each step, in prompt order.
    """
    log = log or logging.getLogger(__name__)
    if not checkpoints:
        raise ValueError("score_checkpoints needs at least one (step, path) checkpoint")
    if not prompts:
        raise ValueError("score_checkpoints needs at least one preview prompt")
    steps = [int(step) for step, _ in checkpoints]
    if len(set(steps)) != len(steps):
        raise ValueError(f"checkpoint steps must be unique, got {sorted(steps)}")

    # WD14 taggers expose their vocabulary; stand-ins without one are judged on their dicts.
    tag_names = getattr(tagger, "tag_names", None)
    dataset_feats = _dataset_features(dataset, identity, max_dataset_images, sample_seed)
    upper_bound = dataset_upper_bound(dataset_feats, identity)
    log.info(f"RecScore: {dataset_feats.shape[0]} dataset images agree with each other at {upper_bound:.3f}")

    rows: list[dict[str, Any]] = []
    previews: dict[int, list[Image.Image]] = {}
    if BASELINE_STEP in steps:
        raise ValueError(f"checkpoint step {BASELINE_STEP} is reserved for the base model's baseline row")
    runs: list[tuple[int, Path | None]] = [(BASELINE_STEP, None)] if baseline else []
    runs += [(int(step), Path(path)) for step, path in sorted(checkpoints, key=lambda item: int(item[0]))]
    for step, path in runs:
        images = renderer.render(path, prompts)
        if len(images) != len(prompts):
            raise RuntimeError(f"the renderer gave {len(images)} images for {len(prompts)} prompts")
        fid = fidelity(identity.embed(images), dataset_feats, identity, upper_bound)
        following = prompt_following(tagger.predict(images), prompts, tag_names)
        artefact = (
            artefact_score(artefact_classifier.predict(images)) if artefact_classifier is not None else np.nan
        )
        score = fbeta_score(fid, following, beta)
        rows.append(
            {
                "step": int(step),
                "path": str(path) if path is not None else "",
                "fidelity": fid,
                "prompt_following": following,
                "artefact": artefact,
                "score": score,
            }
        )
        previews[int(step)] = images
        name = "base model (no LoRA)" if path is None else f"step {step}"
        log.info(
            f"RecScore {name}: fidelity {fid:.3f}, prompt following {following:.3f}, "
            f"artefact {artefact:.3f}, F{beta:g} {score:.3f}"
        )
    table = pd.DataFrame(rows, columns=RECSCORE_COLUMNS).astype(
        {"step": "int64", "path": "string", "fidelity": "float64", "prompt_following": "float64",
         "artefact": "float64", "score": "float64"}
    )
    return table, previews


def _dataset_features(
    dataset: np.ndarray | Iterable[Image.Image], identity: IdentityLike, max_images: int, seed: int
) -> np.ndarray:
    if max_images < 2:
        raise ValueError(f"max_dataset_images must be at least 2, got {max_images}")
    if not isinstance(dataset, np.ndarray) and not isinstance(dataset, Sequence):
        dataset = list(dataset)  # a generator of images: sampling needs indexing
    count = len(dataset)
    # Sorted indices keep the sample in dataset order, so a re-run embeds the same images.
    chosen = (
        np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))
        if count > max_images
        else np.arange(count)
    )
    if isinstance(dataset, np.ndarray):
        return _as_feature_matrix(dataset, "dataset features")[chosen]
    return _as_feature_matrix(identity.embed([dataset[int(i)] for i in chosen]), "dataset features")


def _as_feature_matrix(feats: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(feats, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array of identity features, got shape {array.shape}")
    return array


def _confidence(prediction: TagPredictionLike, tag: str) -> float:
    """The tagger's confidence in `tag`, as a general or a character tag; 0 when not reported."""
    for scores in (getattr(prediction, "general", None), getattr(prediction, "character", None)):
        if isinstance(scores, Mapping) and tag in scores:
            return float(scores[tag])
    return 0.0
