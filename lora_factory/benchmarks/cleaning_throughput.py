"""Cleaning benchmark: the data stage with models of the real architectures and sizes,
batched (this project) against one image per model call (a per-item action chain, the
way waifuc runs its actions), on the same pictures in one run.

The data stage is `clean_character` (decode, classifiers, dedup, person split, face
count, identity filter, 3-stage crops, aesthetic scores, identity vectors) followed by
tagging every crop, as `cleaned_crops` and `captions` do.

Models. No real weights can be downloaded, so every model is an ONNX file holding two
networks on the same input: the real architecture at its real size with random weights
(`reference_networks`: SwinV2-B tagger at 448, CAFormer-S36 identity at 384, YOLOv8m
person and YOLOv8s half-body/head/face detectors at 640, MobileNetV3-Large monochrome,
class and rating classifiers and a SwinV2-B aesthetic classifier at 384), which costs
what the real model costs, and the project's tiny model of that role, which decides. The
random network's output enters the model's output as 1e-30 x tanh(mean): too small to
change any float32 result, but ONNX Runtime must still compute it. So the pictures go
through the chain as the demo world's would (the same persons found, the same drops and
crops) at the real models' price; random detectors alone would find hundreds of boxes or
none, and the work would not be the chain's.

Both pipelines use the same sessions, thresholds and code. The batched chain reads posts
16 at a time and calls each model with the images per call its wrapper picks for the
device (`vision.models.DEFAULT_BATCH_SIZES`); the per-item chain wraps every model so
that each call gets one image and each post goes through the first pass before the next
one is read (pipeline batch size 1). The benchmark checks that both produce the same
crops and tags. It then times every architecture alone at 1, 2, 4 and 8 images per call
and prints the largest ratio any batch sizes could give on the machine: the models'
one-by-one time divided by their best batching gain, the rest unchanged.

Memory. Peak RSS of the data stage in a fresh process, for the throughput run's
pictures with the reference models, and for 1,000 and 10,000 pictures with the tiny
models (the real-size models would need hours on two cores for 10,000). The chain
streams, so its memory does not grow with the model size beyond the sessions and one
batch of activations, which the reference-model row shows.

Beside imgutils. Each wrapper's images per second next to deepghs' imgutils (the
models' authors' inference code, one call per picture, run in its own environment, see
`vision.reference`) on the same ONNX files and pictures: the bare real-size networks of
one model per kind of wrapper (SwinV2-B tagger, CAFormer-S36 identity, YOLOv8m person
detector, MobileNetV3 classifier), with the real models' input/output names.

    python -m lora_factory.benchmarks.cleaning_throughput [--images 48] [--memory-images 1000 10000]
        [--imgutils-images 8]

The reference ONNX files (~1 GB) are built once into --work (default
$LF_HOME/benchmarks/cleaning, or .lora_factory/ in the working directory).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from lora_factory.benchmarks.memory import peak_rss_mb
from lora_factory.cleaning.pipeline import CleaningConfig, clean_character
from lora_factory.demo.characters import DEMO_CHARACTERS
from lora_factory.demo.drawing import draw_ashtray, draw_post
from lora_factory.demo.tiny_models import (
    CLASSIFIER_LABELS,
    OPSET,
    TINY_MODELS,
    tiny_model_files,
    tiny_registry,
)
from lora_factory.storage import (
    BlobStore,
    atomic_write_bytes,
    atomic_write_json,
    read_table,
    write_table,
)
from lora_factory.vision.models import ROLES, VisionModels

RATIO_TARGET = 2.0
IMGUTILS_LABEL = "(dghs-imgutils 0.19.0)"
PEAK_RSS_TARGET_MB = 4096
# Bump when a reference network or the composition changes: the cached files are rebuilt.
REFERENCE_VERSION = "2"
NEGLIGIBLE = 1e-30  # weight of the reference network's output in the model's output
CHARACTER = "benchmark"


# ------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class ReferenceNetwork:
    architecture: str  # what it is, for the report
    build: Callable[[], Any]  # -> torch.nn.Module with random weights
    input_shape: tuple[int, ...]  # one image, in the tiny model's input layout


def reference_networks() -> dict[str, ReferenceNetwork]:
    """Role -> the real model's architecture at its real size (random weights)."""
    from lora_factory.benchmarks.reference_networks import (
        CAFormer,
        MobileNetV3,
        SwinV2,
        YoloV8,
    )

    def classes(role: str) -> int:
        return len(CLASSIFIER_LABELS[TINY_MODELS[role]])

    def mobilenet(role: str) -> ReferenceNetwork:
        return ReferenceNetwork("MobileNetV3-Large, 384 px", lambda: MobileNetV3(classes(role)), (3, 384, 384))

    detector_s = ReferenceNetwork("YOLOv8s, 640 px", lambda: YoloV8("s", 1), (3, 640, 640))
    return {
        "tagger": ReferenceNetwork("SwinV2-B (WD14 v3), 448 px", SwinV2, (448, 448, 3)),
        "identity": ReferenceNetwork("CAFormer-S36 (CCIP), 384 px", lambda: CAFormer(768), (3, 384, 384)),
        "person": ReferenceNetwork("YOLOv8m, 640 px", lambda: YoloV8("m", 1), (3, 640, 640)),
        "halfbody": detector_s,
        "head": detector_s,
        "face": detector_s,
        **{role: mobilenet(role) for role in ("monochrome", "classification", "rating")},
        # The real aesthetic model is a SwinV2 at 448; the tiny one it rides on takes
        # 384, so the window is 12 (384 / 4 / 12 = 8 windows a side, as 448 / 4 / 14).
        "aesthetic": ReferenceNetwork(
            "SwinV2-B, 384 px", lambda: SwinV2(384, classes("aesthetic"), window=12, tagger=False), (3, 384, 384)
        ),
    }


def export_network(network: ReferenceNetwork, seed: int = 0):
    """The network as an ONNX ModelProto (input "images", dynamic batch)."""
    import torch

    torch.manual_seed(seed)
    module = network.build().eval()
    example = torch.rand(2, *network.input_shape)  # batch 2: a batch of 1 would be baked in
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter logs that torchvision's ops are unavailable (none is used here).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), input_names=["images"], output_names=["scores"],
            dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, verbose=False,
        )
    return program.model_proto


def with_reference_compute(decider, network):
    """`decider`'s graph whose first output also depends, negligibly, on `network` run on
    the same input: output = decider output + NEGLIGIBLE x tanh(mean(network output))."""
    import onnx
    from onnx import helper, numpy_helper

    network = onnx.compose.add_prefix(network, "reference/")
    combined = onnx.ModelProto()
    combined.CopyFrom(decider)
    graph = combined.graph
    image_input, network_input = graph.input[0].name, network.graph.input[0].name
    output = graph.output[0].name
    decided = f"{output}/decided"
    for node in graph.node:
        node.output[:] = [decided if name == output else name for name in node.output]
        node.input[:] = [decided if name == output else name for name in node.input]
    for node in network.graph.node:
        node.input[:] = [image_input if name == network_input else name for name in node.input]
    graph.node.extend(network.graph.node)
    graph.initializer.extend(network.graph.initializer)
    graph.initializer.append(numpy_helper.from_array(np.array(NEGLIGIBLE, dtype=np.float32), "combine/weight"))
    graph.node.extend([
        helper.make_node("ReduceMean", [network.graph.output[0].name], ["combine/mean"], keepdims=0),
        helper.make_node("Tanh", ["combine/mean"], ["combine/bounded"]),
        helper.make_node("Mul", ["combine/bounded", "combine/weight"], ["combine/term"]),
        helper.make_node("Add", [decided, "combine/term"], [output]),
    ])
    combined.ir_version = max(decider.ir_version, network.ir_version)
    for opset in network.opset_import:
        if opset.domain not in {o.domain for o in combined.opset_import}:
            combined.opset_import.append(opset)
    combined.functions.extend(network.functions)
    onnx.checker.check_model(combined)
    return combined


def main_model_file(role: str) -> str:
    return "model_feat.onnx" if role == "identity" else "model.onnx"


def build_reference_models(target_dir: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Role -> a model folder the vision wrappers load: the tiny model's files with its
    main ONNX file replaced by the reference composition. Built once per version."""
    folders = {}
    for role, network in reference_networks().items():
        folder = Path(target_dir) / f"v{REFERENCE_VERSION}" / role
        marker = folder / ".complete"
        if not marker.is_file():
            started = time.perf_counter()
            files = tiny_model_files(TINY_MODELS[role])
            import onnx

            decider = onnx.load_from_string(files.pop(main_model_file(role)))
            combined = with_reference_compute(decider, export_network(network))
            for name, data in files.items():
                atomic_write_bytes(folder / name, data)
            atomic_write_bytes(folder / main_model_file(role), combined.SerializeToString())
            marker.write_text(network.architecture + "\n")
            log(f"  built {role}: {network.architecture} in {time.perf_counter() - started:.0f} s")
        folders[role] = folder
    return folders


# ---------------------------------------------- the bare networks, for imgutils beside us

# One model per kind of wrapper, as the real model's files: the random-weight network
# alone, with the real input/output names and side files, so that imgutils (which reads
# them by name) and the wrappers run the same real-size compute and decode its output.
PLAIN_ROLES = ("tagger", "identity", "person", "rating")
PLAIN_IO = {"tagger": ("input_1:0", "predictions_sigmoid"), "identity": ("input", "output"),
            "person": ("images", "output0"), "rating": ("input", "output")}  # fmt: skip
TAGGER_CLASSES = 10861  # the SwinV2 reference network's head, as wd-swinv2-tagger-v3


def _renamed(model, input_name: str, output_name: str):
    old_input, old_output = model.graph.input[0].name, model.graph.output[0].name
    for node in model.graph.node:
        node.input[:] = [input_name if name == old_input else name for name in node.input]
        node.output[:] = [output_name if name == old_output else name for name in node.output]
    model.graph.input[0].name, model.graph.output[0].name = input_name, output_name
    return model


def _tagger_tags_csv(count: int) -> bytes:
    """A selected_tags.csv for `count` outputs: 4 ratings, general tags, 1,000 characters."""
    rows = ["tag_id,name,category,count"]
    for index in range(count):
        if index < 4:
            name, category = ("general", "sensitive", "questionable", "explicit")[index], 9
        elif index < count - 1000:
            name, category = f"tag_{index}", 0
        else:
            name, category = f"character_{index}", 4
        rows.append(f"{index},{name},{category},{count - index}")
    return ("\n".join(rows) + "\n").encode("utf-8")


def _spread_class_scores(detector):
    """A random-weight YOLOv8 whose scores depend on the picture and spread over 0..1.

    With PyTorch's default initialisation the activations shrink at every one of the
    ~60 layers until only the biases are left: every anchor of a level gets the same
    score and box, and NMS would only test how ties are ordered. Variance-preserving
    (Kaiming) weights keep the picture in the output (8,037 distinct scores of 8,400
    measured); the last class convolutions are then rescaled, once on a random batch, to
    logits of mean 0 and deviation 2, as a trained head gives."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        features = []
        hooks = [head[-1].register_forward_hook(lambda _m, _i, out: features.append(out)) for head in detector.detect.cls]
        detector(torch.rand(2, 3, 640, 640))
        for hook in hooks:
            hook.remove()
        logits = torch.cat([f.flatten() for f in features])
        gain, mean = 2.0 / logits.std(), logits.mean()
        for head in detector.detect.cls:
            final = head[-1]
            final.weight.mul_(gain)
            final.bias.copy_((final.bias - mean) * gain)
    return detector


def build_plain_reference_models(target_dir: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Role -> a model folder holding the real architecture at its real size (random
    weights) as the real model's files, for `PLAIN_ROLES`. Built once per version."""
    from onnx import helper

    networks, folders = reference_networks(), {}
    for role in PLAIN_ROLES:
        folder = Path(target_dir) / f"plain-v{REFERENCE_VERSION}" / role
        marker = folder / ".complete"
        if not marker.is_file():
            started = time.perf_counter()
            network = networks[role]
            if role == "person":
                build = network.build
                network = ReferenceNetwork(network.architecture, lambda: _spread_class_scores(build()),
                                           network.input_shape)
            model = _renamed(export_network(network), *PLAIN_IO[role])
            files = tiny_model_files(TINY_MODELS[role])
            files.pop(main_model_file(role))
            if role == "tagger":
                files["selected_tags.csv"] = _tagger_tags_csv(TAGGER_CLASSES)
            if role == "person":
                helper.set_model_props(model, {"names": repr({0: "person"}), "imgsz": "[640, 640]",
                                               "task": "detect", "stride": "32"})  # fmt: skip
            for name, data in files.items():
                atomic_write_bytes(folder / name, data)
            atomic_write_bytes(folder / main_model_file(role), model.SerializeToString())
            marker.write_text(network.architecture + "\n")
            log(f"  built bare {role}: {network.architecture} in {time.perf_counter() - started:.0f} s")
        folders[role] = folder
    return folders


def plain_wrappers(folders: dict[str, Path]) -> dict[str, Any]:
    """The project's wrapper of each bare model, with the real model's defaults."""
    from lora_factory.vision.classifiers import ImageClassifier
    from lora_factory.vision.detection import YoloDetector
    from lora_factory.vision.identity import IdentityModel
    from lora_factory.vision.models import DEFAULT_CONF_THRESHOLDS, DEFAULT_IOU_THRESHOLDS
    from lora_factory.vision.tagger import WD14Tagger

    return {
        "tagger": WD14Tagger(folders["tagger"], providers="cpu"),
        "identity": IdentityModel(folders["identity"], providers="cpu"),
        "person": YoloDetector(folders["person"], conf_threshold=DEFAULT_CONF_THRESHOLDS["person"],
                               iou_threshold=DEFAULT_IOU_THRESHOLDS["person"], providers="cpu"),
        "rating": ImageClassifier(folders["rating"], providers="cpu"),
    }


def run_wrapper(role: str, model: Any, images: list[Image.Image]) -> Any:
    if role == "identity":
        return model.embed(images)
    if role == "person":
        return model.detect(images)
    return model.predict(images)


def imgutils_speed(work: Path, count: int, variant: int = 0,
                   folders: dict[str, Path] | None = None) -> dict[str, dict] | None:
    """Images per second of each wrapper and of imgutils on the same models and pictures
    (imgutils: one call per picture, in its own process). `folders`: role -> model folder
    for `PLAIN_ROLES`, by default the bare real-size networks."""
    from lora_factory.vision.reference import HubCache, Job, imgutils_unavailable, place_models, run_imgutils

    reason = imgutils_unavailable()
    if reason:
        print(f"imgutils beside the wrappers: skipped ({reason})")
        return None
    folders = folders or build_plain_reference_models(work / "reference-models")
    wrappers = plain_wrappers(folders)
    rng = random.Random(variant)
    pictures = [draw_post([(DEMO_CHARACTERS[0], 0)], (rng.randint(512, 1024), rng.randint(640, 1280)), rng).image
                for _ in range(count)]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        cache = HubCache(Path(scratch) / "hf")
        place_models(cache, folders)
        answers = run_imgutils(cache, [Job(role, pictures) for role in PLAIN_ROLES], Path(scratch) / "oracle")
    rows = {}
    for role, answer in zip(PLAIN_ROLES, answers, strict=True):
        run_wrapper(role, wrappers[role], pictures[:1])  # warm-up, as imgutils' first call
        started = time.perf_counter()
        run_wrapper(role, wrappers[role], pictures)
        ours = count / (time.perf_counter() - started)
        theirs = count / answer["seconds"]
        rows[role] = {"architecture": reference_networks()[role].architecture, "ours_images_per_s": ours,
                      "imgutils_images_per_s": theirs, "ratio": ours / theirs}
    print(f"\nwrappers beside imgutils {IMGUTILS_LABEL}: {count} pictures, the same ONNX files")
    print(f"{'model':<10}{'architecture':<30}{'ours img/s':>12}{'imgutils img/s':>16}{'ratio':>8}")
    for role, row in rows.items():
        print(f"{role:<10}{row['architecture']:<30}{row['ours_images_per_s']:>12.2f}"
              f"{row['imgutils_images_per_s']:>16.2f}{row['ratio']:>8.2f}")
    return rows


def load_models(kind: str, work: Path, log: Callable[[str], None] = print) -> VisionModels:
    registry = tiny_registry(work / "model-cache")
    if kind == "tiny":
        return VisionModels.load(registry, names=TINY_MODELS, providers="cpu")
    if kind == "reference":
        return VisionModels.load(registry, names=build_reference_models(work / "reference-models", log),
                                 providers="cpu")
    raise ValueError(f"models must be 'tiny' or 'reference', got {kind!r}")


# ----------------------------------------------------------------------- the pictures


def draw_posts(count: int, blobs: BlobStore, seed: int = 0) -> pd.DataFrame:
    """`count` posts of one character's tag, as a booru serves them: mostly solo pictures,
    some of another character, with company, in monochrome, or of no one."""
    rng = random.Random(seed)
    main, others = DEMO_CHARACTERS[0], DEMO_CHARACTERS[1:]
    rows = []
    for index in range(count):
        size = (rng.randint(512, 1024), rng.randint(640, 1280))
        roll = rng.random()
        if roll < 0.02:
            image = draw_ashtray(size, rng)
        else:
            figures = [main]
            if roll < 0.08:
                figures = [rng.choice(others)]
            elif roll < 0.16:
                figures.insert(rng.randint(0, 1), rng.choice(others))
                size = (rng.randint(900, 1400), rng.randint(640, 1024))
            background = rng.choice(["white_background", "white_background", "blue_background"])
            outfits = [(c, rng.randrange(len(c.outfits))) for c in figures]
            image = draw_post(outfits, size, rng, background).image
            if 0.16 <= roll < 0.20:
                image = image.convert("L")
        rows.append({"sha256": blobs.put(_jpeg(image, rng.randint(80, 95))), "site": "bench", "post_id": index})
    return pd.DataFrame(rows)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# -------------------------------------------------------------------- the two chains


@dataclass
class ModelUse:
    images: int = 0
    seconds: float = 0.0


@dataclass
class StageRun:
    seconds: float
    crops: pd.DataFrame
    tags: list[tuple[str, ...]]
    use: dict[str, ModelUse] = field(default_factory=dict)


class _Metered:
    """One vision model, timed per role; `one_at_a_time` feeds it one image per call."""

    def __init__(self, model: Any, use: ModelUse, one_at_a_time: bool):
        self._model, self._use, self._one_at_a_time = model, use, one_at_a_time

    def __getattr__(self, name: str) -> Any:  # threshold, difference, dim, ...
        return getattr(self._model, name)

    def _run(self, method: str, images: Iterable[Image.Image], join: Callable[[list], Any]) -> Any:
        call = getattr(self._model, method)
        started = time.perf_counter()
        if self._one_at_a_time:
            parts = [call([image], batch_size=1) for image in images]
            count, result = len(parts), join(parts)
        else:
            counter = _Counter(images)
            result = call(counter)
            count = counter.count
        self._use.images += count
        self._use.seconds += time.perf_counter() - started
        return result

    def detect(self, images):
        return self._run("detect", images, lambda parts: [found for part in parts for found in part])

    def predict(self, images):
        return self._run("predict", images, lambda parts: [found for part in parts for found in part])

    def embed(self, images):
        return self._run("embed", images, lambda parts: np.concatenate(parts) if parts
                         else np.zeros((0, self._model.dim), dtype=np.float32))


class _Counter:
    def __init__(self, items: Iterable):
        self._items, self.count = items, 0

    def __iter__(self):
        for item in self._items:
            self.count += 1
            yield item


def metered(models: VisionModels, one_at_a_time: bool) -> tuple[VisionModels, dict[str, ModelUse]]:
    use = {role: ModelUse() for role in ROLES}
    wrapped = {role: _Metered(getattr(models, role), use[role], one_at_a_time) for role in ROLES}
    return VisionModels(**wrapped), use


def run_data_stage(posts: pd.DataFrame, blobs: BlobStore, models: VisionModels, one_at_a_time: bool,
                   batch_size: int = 16, log: Callable[[str], None] = lambda _: None) -> StageRun:
    """Clean the posts and tag every crop; one_at_a_time: the per-item chain."""
    wrapped, use = metered(models, one_at_a_time)
    config = CleaningConfig(batch_size=1 if one_at_a_time else batch_size, log_every=500)
    started = time.perf_counter()
    result = clean_character(CHARACTER, posts, blobs, wrapped, config, log=log)
    predictions = wrapped.tagger.predict(blobs.images(result.crops["crop_sha256"]))
    seconds = time.perf_counter() - started
    tags = [tuple(sorted(p.general)) for p in predictions]
    return StageRun(seconds, result.crops, tags, use)


def warm_up(models: VisionModels, blobs: BlobStore, posts: pd.DataFrame) -> None:
    """First runs allocate the sessions' memory: done before anything is timed."""
    image = next(blobs.images(posts["sha256"][:1]))
    for role in ROLES:
        model = getattr(models, role)
        if hasattr(model, "detect"):
            model.detect([image])
        elif hasattr(model, "embed"):
            model.embed([image, image])
        else:
            model.predict([image, image])


# ------------------------------------------------------------------------ the report


SWEEP_BATCH_SIZES = (1, 2, 4, 8)


def _session_of(model: Any):
    return model.feature_session if hasattr(model, "feature_session") else model.session


def batch_sweep(models: VisionModels, sizes: Sequence[int] = SWEEP_BATCH_SIZES,
                images_per_size: int = 4) -> dict[str, dict[int, float]]:
    """Architecture -> batch size -> milliseconds per image of one session call on a
    random batch (the first call at each size untimed: it sizes the buffers)."""
    networks, sweep = reference_networks(), {}
    for role in ROLES:
        architecture = networks[role].architecture
        if architecture in sweep:
            continue
        session = _session_of(getattr(models, role))
        name = session.get_inputs()[0].name
        sweep[architecture] = {}
        for size in sizes:
            batch = np.random.default_rng(0).random((size, *networks[role].input_shape), dtype=np.float32)
            session.run(None, {name: batch})
            calls = max(1, images_per_size // size)
            started = time.perf_counter()
            for _ in range(calls):
                session.run(None, {name: batch})
            sweep[architecture][size] = 1000 * (time.perf_counter() - started) / (calls * size)
    return sweep


def batching_bound(peer: StageRun, sweep: dict[str, dict[int, float]]) -> tuple[float, float]:
    """(share of the one-by-one chain's time spent in models, the largest ratio any
    batch sizes could give): every model's one-by-one time divided by the best gain its
    architecture shows in the sweep; the time outside the models unchanged."""
    networks = reference_networks()
    model_seconds = sum(use.seconds for use in peer.use.values())
    best_seconds = peer.seconds - model_seconds
    for role, use in peer.use.items():
        per_size = sweep[networks[role].architecture]
        best_seconds += use.seconds * min(per_size.values()) / per_size[1]
    return model_seconds / peer.seconds, peer.seconds / best_seconds


def throughput(images: int, work: Path, seed: int) -> dict:
    print(f"models: real architectures and sizes, random weights (cached in {work / 'reference-models'})")
    models = load_models("reference", work)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        blobs = BlobStore(Path(scratch) / "blobs")
        posts = draw_posts(images, blobs, seed)
        warm_up(models, blobs, posts)
        print(f"data stage on {images} posts (one character's tag), 2 chains on the same pictures ...")
        peer = run_data_stage(posts, blobs, models, one_at_a_time=True)
        print(f"  one image per call: {peer.seconds:.1f} s")
        ours = run_data_stage(posts, blobs, models, one_at_a_time=False)
        print(f"  batched:            {ours.seconds:.1f} s")
    same = (list(ours.crops["crop_sha256"]) == list(peer.crops["crop_sha256"])) and ours.tags == peer.tags
    architectures = {role: network.architecture for role, network in reference_networks().items()}
    print()
    print(f"{'model':<15}{'architecture':<30}{'batch':>6}{'images':>8}{'batched ms/img':>16}"
          f"{'1-by-1 ms/img':>15}{'ratio':>7}")
    for role in ROLES:
        a, b = ours.use[role], peer.use[role]
        if not a.images:
            continue
        ms_a, ms_b = 1000 * a.seconds / a.images, 1000 * b.seconds / max(b.images, 1)
        print(f"{role:<15}{architectures[role]:<30}{getattr(models, role).batch_size:>6}{a.images:>8}"
              f"{ms_a:>16.1f}{ms_b:>15.1f}{ms_b / ms_a:>7.2f}")
    rate_ours, rate_peer = images / ours.seconds, images / peer.seconds
    ratio = rate_ours / rate_peer
    print()
    print(f"{'chain':<22}{'posts/s':>9}{'seconds':>9}{'crops':>7}")
    print(f"{'batched (ours)':<22}{rate_ours:>9.3f}{ours.seconds:>9.1f}{len(ours.crops):>7}")
    print(f"{'one image per call':<22}{rate_peer:>9.3f}{peer.seconds:>9.1f}{len(peer.crops):>7}")
    print(f"ratio batched / one-by-one: {ratio:.2f}x (target >= {RATIO_TARGET:.0f}x); "
          f"same crops and tags: {'yes' if same else 'NO'}")

    print("\nwhat batching can give on this machine: ms per image by images per call (random input)")
    sweep = batch_sweep(models)
    print(f"{'architecture':<30}" + "".join(f"{size:>8}" for size in SWEEP_BATCH_SIZES) + f"{'best/1':>9}")
    for architecture, per_size in sweep.items():
        gain = per_size[1] / min(per_size.values())
        print(f"{architecture:<30}" + "".join(f"{per_size[size]:>8.1f}" for size in SWEEP_BATCH_SIZES)
              + f"{gain:>8.2f}x")
    model_share, bound = batching_bound(peer, sweep)
    print(f"models are {model_share:.0%} of the one-by-one chain's time; with every model at its best "
          f"batch size the chain could be at most {bound:.2f}x faster here")
    return {"images": images, "ratio": ratio, "ours_seconds": ours.seconds, "peer_seconds": peer.seconds,
            "same": same, "crops": len(ours.crops), "batch_sweep_ms": sweep, "model_share": model_share,
            "batching_bound": bound}


def measure_memory(posts_path: Path, blobs_root: Path, models: str, work: Path) -> dict:
    """Run in a fresh process: the data stage alone, then its peak RSS."""
    before = peak_rss_mb()
    loaded = load_models(models, work)
    posts = read_table(posts_path)
    run = run_data_stage(posts, BlobStore(blobs_root), loaded, one_at_a_time=False,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    peak = peak_rss_mb()
    return {"posts": len(posts), "models": models, "seconds": run.seconds, "crops": len(run.crops),
            "peak_rss_mb": peak, "rss_before_models_mb": before}


def memory(counts: list[int], reference_images: int, work: Path, seed: int) -> list[dict]:
    runs = [(reference_images, "reference")] + [(count, "tiny") for count in counts]
    results = []
    for count, models in runs:
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            blobs_root = Path(scratch) / "blobs"
            write_table(draw_posts(count, BlobStore(blobs_root), seed), Path(scratch) / "posts.parquet")
            command = [sys.executable, "-m", "lora_factory.benchmarks.cleaning_throughput", "--measure-memory",
                       str(Path(scratch) / "posts.parquet"), str(blobs_root), models, "--work", str(work)]
            print(f"  {count} posts, {models} models: running in a fresh process ...", flush=True)
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print()
    print(f"{'posts':>7}  {'models':<10}{'seconds':>9}{'posts/s':>9}{'crops':>7}{'peak RSS MB':>13}")
    for r in results:
        print(f"{r['posts']:>7}  {r['models']:<10}{r['seconds']:>9.1f}{r['posts'] / r['seconds']:>9.2f}"
              f"{r['crops']:>7}{r['peak_rss_mb']:>13.0f}")
    tiny = [r for r in results if r["models"] == "tiny"]
    if len(tiny) >= 2:
        growth = tiny[-1]["peak_rss_mb"] - tiny[0]["peak_rss_mb"]
        estimate = results[0]["peak_rss_mb"] + max(growth, 0.0)
        print(f"growth from {tiny[0]['posts']} to {tiny[-1]['posts']} posts: {growth:+.0f} MB; "
              f"estimated peak with the real-size models at {tiny[-1]['posts']} posts: {estimate:.0f} MB "
              f"(target < {PEAK_RSS_TARGET_MB} MB)")
    return results


def default_work_dir() -> Path:
    home = Path(os.environ.get("LF_HOME", ".lora_factory"))
    return home / "benchmarks" / "cleaning"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="posts for the throughput comparison")
    parser.add_argument("--memory-images", type=int, nargs="*", default=[1000, 10000],
                        help="post counts for the memory runs with the tiny models (none: skip)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--imgutils-images", type=int, default=8,
                        help="pictures for the speed of each wrapper beside imgutils (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--measure-memory", nargs=3, metavar=("POSTS", "BLOBS", "MODELS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = (args.work or default_work_dir()).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.measure_memory:
        posts, blobs, models = args.measure_memory
        print(json.dumps(measure_memory(Path(posts), Path(blobs), models, work)))
        return
    report: dict[str, Any] = {"cores": len(os.sched_getaffinity(0))}
    print(f"cleaning benchmark on {report['cores']} CPU cores")
    if not args.skip_throughput:
        report["throughput"] = throughput(args.images, work, args.seed)
    if args.imgutils_images:
        report["imgutils"] = imgutils_speed(work, args.imgutils_images, args.seed)
    if args.memory_images:
        print("\npeak memory of the data stage (fresh process each):")
        report["memory"] = memory(args.memory_images, args.images, work, args.seed)
    atomic_write_json(work / "last_report.json", report)


if __name__ == "__main__":
    main()
