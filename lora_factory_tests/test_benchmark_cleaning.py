"""The cleaning benchmark's parts: the reference architectures are the published ones,
the composed models decide exactly as the tiny ones while computing the big network,
and both chains do the same work (the timed run is the script's job)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from lora_factory.benchmarks.cleaning_throughput import (
    NEGLIGIBLE,
    SWEEP_BATCH_SIZES,
    ModelUse,
    ReferenceNetwork,
    StageRun,
    PLAIN_ROLES,
    _renamed,
    _tagger_tags_csv,
    batch_sweep,
    batching_bound,
    draw_posts,
    export_network,
    imgutils_speed,
    load_models,
    main_model_file,
    reference_networks,
    run_data_stage,
    with_reference_compute,
)
from lora_factory.benchmarks.reference_networks import (
    CAFormer,
    MobileNetV3,
    SwinV2,
    YoloV8,
)
from lora_factory.demo.tiny_models import TINY_MODELS, build_tiny_model, tiny_model_files
from lora_factory.storage import BlobStore


def _parameters(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize(
    ("build", "published"),
    [
        # timm swinv2_base_window8_256 / caformer_s36 with 1000 classes; ultralytics'
        # fused yolov8s / yolov8m (80 classes) less the 16 fixed DFL weights (a buffer here).
        (lambda: SwinV2(classes=1000), 87_918_816),
        (lambda: CAFormer(1000), 39_297_102),
        (lambda: YoloV8("s", 80), 11_156_544 - 16),
        (lambda: YoloV8("m", 80), 25_886_080 - 16),
    ],
)
def test_reference_networks_have_the_published_sizes(build, published):
    assert _parameters(build) == published


def test_mobilenet_v3_large_size_with_batchnorm_folded():
    # torchvision's mobilenet_v3_large has 5,483,032 parameters, 2 per BatchNorm channel;
    # folded into the convolutions they become 1 bias per channel.
    assert 5_460_000 < _parameters(lambda: MobileNetV3(1000)) < 5_483_032


def test_reference_outputs_have_the_real_models_shapes():
    torch.manual_seed(0)
    with torch.no_grad():
        detections = YoloV8("s", 1).eval()(torch.rand(2, 3, 640, 640))
        features = CAFormer(768).eval()(torch.rand(1, 3, 384, 384))
        tags = SwinV2().eval()(torch.rand(1, 448, 448, 3) * 255)
    assert detections.shape == (2, 5, 8400) and torch.isfinite(detections).all()
    assert features.shape == (1, 768)
    assert tags.shape == (1, 10861) and ((tags > 0) & (tags < 1)).all()


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=8)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_composed_model_decides_as_the_tiny_model_and_computes_the_network():
    files = tiny_model_files(TINY_MODELS["monochrome"])
    decider = onnx.load_from_string(files[main_model_file("monochrome")])
    network = export_network(ReferenceNetwork("small", _Small, (3, 384, 384)))
    combined = with_reference_compute(decider, network)
    images = np.random.default_rng(0).random((3, 3, 384, 384), dtype=np.float32)

    def run(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]

    assert np.array_equal(run(combined), run(decider))
    # With weight 1 instead of NEGLIGIBLE the network's output shows: it is wired in.
    weight = next(i for i in combined.graph.initializer if i.name == "combine/weight")
    assert numpy_helper.to_array(weight) == np.float32(NEGLIGIBLE)
    weight.CopyFrom(numpy_helper.from_array(np.array(1.0, dtype=np.float32), "combine/weight"))
    session = ort.InferenceSession(network.SerializeToString(), providers=["CPUExecutionProvider"])
    term = np.tanh(session.run(None, {session.get_inputs()[0].name: images})[0].mean())
    np.testing.assert_allclose(run(combined), run(decider) + term, rtol=1e-5, atol=1e-6)


def test_every_role_has_a_reference_network():
    assert set(reference_networks()) == set(TINY_MODELS)


def test_batched_and_one_by_one_chains_do_the_same_work(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    posts = draw_posts(10, blobs, seed=3)
    assert posts["sha256"].nunique() == 10
    models = load_models("tiny", tmp_path)
    batched = run_data_stage(posts, blobs, models, one_at_a_time=False, batch_size=4)
    single = run_data_stage(posts, blobs, models, one_at_a_time=True)
    assert len(batched.crops) > 0
    assert list(batched.crops["crop_sha256"]) == list(single.crops["crop_sha256"])
    assert batched.tags == single.tags
    for role in ("monochrome", "classification", "person", "tagger"):
        assert batched.use[role].images == single.use[role].images > 0
    assert batched.use["tagger"].images == len(batched.crops)
    assert batched.use["rating"].images == 0  # no rating filter configured


def test_batch_sweep_times_every_architecture_at_every_size(tmp_path):
    sweep = batch_sweep(load_models("tiny", tmp_path), images_per_size=2)
    assert set(sweep) == {network.architecture for network in reference_networks().values()}
    assert all(sorted(per_size) == list(SWEEP_BATCH_SIZES) for per_size in sweep.values())
    assert all(ms > 0 for per_size in sweep.values() for ms in per_size.values())


def test_batching_bound_divides_each_models_time_by_its_best_gain():
    networks = reference_networks()
    use = {role: ModelUse() for role in networks}
    use["tagger"] = ModelUse(images=10, seconds=6.0)  # a 2x gain at batch 4: 3 s
    use["person"] = ModelUse(images=10, seconds=2.0)  # batching only slower: 2 s
    peer = StageRun(seconds=10.0, crops=None, tags=[], use=use)  # 2 s outside the models
    sweep = {network.architecture: {1: 100.0, 2: 100.0, 4: 100.0, 8: 100.0} for network in networks.values()}
    sweep[networks["tagger"].architecture] = {1: 100.0, 2: 80.0, 4: 50.0, 8: 60.0}
    sweep[networks["person"].architecture] = {1: 100.0, 2: 110.0, 4: 120.0, 8: 130.0}
    share, bound = batching_bound(peer, sweep)
    assert share == pytest.approx(0.8)
    assert bound == pytest.approx(10.0 / (2.0 + 3.0 + 2.0))


def test_bare_networks_get_the_real_models_names_and_tag_list():
    network = _renamed(export_network(ReferenceNetwork("small", _Small, (3, 384, 384))), "input", "output")
    session = ort.InferenceSession(network.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    rows = _tagger_tags_csv(1010).decode().splitlines()
    assert rows[0] == "tag_id,name,category,count" and len(rows) == 1011
    categories = [int(row.split(",")[2]) for row in rows[1:]]
    assert categories[:4] == [9] * 4 and categories.count(4) == 1000 and categories.count(0) == 6


def test_speed_beside_imgutils_reports_both_rates(tmp_path):
    from lora_factory.vision.reference import imgutils_unavailable

    reason = imgutils_unavailable()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    folders = {role: build_tiny_model(TINY_MODELS[role], tmp_path / role) for role in PLAIN_ROLES}
    rows = imgutils_speed(tmp_path, 2, folders=folders)
    assert set(rows) == set(PLAIN_ROLES)
    for row in rows.values():
        assert row["ours_images_per_s"] > 0 and row["imgutils_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["imgutils_images_per_s"])
