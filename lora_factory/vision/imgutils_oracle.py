"""Run deepghs' imgutils, the models' authors' inference library, on pictures and report
what it answers: the reference the vision wrappers are compared with.

This file runs inside the separate environment that holds imgutils (it pins numpy < 2;
see `lora_factory.vision.reference`), as a script, and imports nothing from the project:

    <imgutils python> imgutils_oracle.py jobs.json results.json

jobs.json: {"jobs": [{"kind": ..., "images": [png paths], ...}, ...]}, kinds:
- "detect": {"function": "detect_person" | "detect_halfbody" | "detect_heads" | "detect_faces"}
  called with its defaults -> per image [[x0, y0, x1, y1], label, score] rows;
- "classify": {"module": "imgutils.validate.rating" ...} -> per image {label: score}
  from `classify_predict_score` with the module's default repository and model;
- "ccip": -> features [N, D], differences [N, N], same [N, N] with the defaults;
- "wd14": {"model_name": "SwinV2_v3"} -> per image the raw prediction and the
  rating/general/character dicts, plain and with MCut.
Each result also holds "seconds": the time of the calls after one untimed warm-up call.
The models are read from the Hugging Face cache the environment points at (HF_HUB_CACHE,
HF_HUB_OFFLINE=1): the caller places them there.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import numpy as np
from PIL import Image


def _timed(call, images):
    call(images[0])  # loads the model
    started = time.perf_counter()
    answers = [call(image) for image in images]
    return answers, time.perf_counter() - started


def _detect(job, images):
    function = getattr(importlib.import_module("imgutils.detect"), job["function"])
    answers, seconds = _timed(function, images)
    rows = [[[list(map(int, box)), label, float(score)] for box, label, score in found] for found in answers]
    return {"detections": rows, "seconds": seconds}


def _classify(job, images):
    from imgutils.generic import classify_predict_score

    module = importlib.import_module(job["module"])
    answers, seconds = _timed(
        lambda image: classify_predict_score(image, module._REPO_ID, module._DEFAULT_MODEL_NAME), images
    )
    return {"scores": [{k: float(v) for k, v in answer.items()} for answer in answers], "seconds": seconds,
            "repo_id": module._REPO_ID, "model_name": module._DEFAULT_MODEL_NAME}


def _ccip(job, images):
    from imgutils.metrics import ccip_batch_differences, ccip_batch_extract_features, ccip_batch_same

    features, seconds = _timed(lambda image: ccip_batch_extract_features([image])[0], images)
    features = np.stack(features)
    differences = ccip_batch_differences(list(features))
    same = ccip_batch_same(list(features))
    return {"features": features.tolist(), "differences": differences.tolist(), "same": same.tolist(),
            "seconds": seconds}


def _wd14(job, images):
    from imgutils.tagging import get_wd14_tags

    fmt = ("rating", "general", "character", "prediction")

    def tags(image, mcut):
        return get_wd14_tags(image, model_name=job["model_name"], general_mcut_enabled=mcut,
                             character_mcut_enabled=mcut, fmt=fmt)

    plain, seconds = _timed(lambda image: tags(image, False), images)
    with_mcut = [tags(image, True) for image in images]
    results = []
    for (rating, general, character, prediction), (_, general_mcut, character_mcut, _) in zip(plain, with_mcut):
        results.append({"prediction": prediction.tolist(), "rating": rating, "general": general,
                        "character": character, "general_mcut": general_mcut, "character_mcut": character_mcut})
    return {"tags": results, "seconds": seconds}


KINDS = {"detect": _detect, "classify": _classify, "ccip": _ccip, "wd14": _wd14}


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path, encoding="utf-8") as handle:
        jobs = json.load(handle)["jobs"]
    results = []
    for job in jobs:
        # Opened by imgutils' own `load_image` path: a PIL image read from the PNG file.
        images = [Image.open(path) for path in job["images"]]
        results.append(KINDS[job["kind"]](job, images))
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump({"results": results}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:3])
