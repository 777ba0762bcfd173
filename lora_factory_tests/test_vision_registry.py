"""The model registry, the tiny models' signatures, and ONNX Runtime sessions."""

import hashlib
import json

import numpy as np
import onnx
import pytest

from lora_factory.demo.tiny_models import TINY_MODEL_NAMES, build_tiny_models, tiny_registry
from lora_factory.vision import runtime
from lora_factory.vision.registry import (
    BUILTIN_SPECS,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistry,
    ModelSpec,
)


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def test_tiny_models_build_deterministically_and_small(tiny, tmp_path):
    again = build_tiny_models(tmp_path / "again")
    assert set(tiny) == set(TINY_MODEL_NAMES)
    for name, folder in tiny.items():
        assert digests(folder) == digests(again[name]), name
        assert all(p.stat().st_size < 2_000_000 for p in folder.iterdir()), name


def signature(path):
    model = onnx.load(path)

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value):
        return value.type.tensor_type.elem_type

    return (
        [(i.name, shape(i), dtype(i)) for i in model.graph.input],
        [(o.name, shape(o), dtype(o)) for o in model.graph.output],
        {p.key: p.value for p in model.metadata_props},
    )


FLOAT = onnx.TensorProto.FLOAT


def test_tiny_models_have_the_real_models_signatures(tiny):
    inputs, outputs, _ = signature(tiny["tiny-tagger"] / "model.onnx")
    tags = (tiny["tiny-tagger"] / "selected_tags.csv").read_text().splitlines()
    assert tags[0] == "tag_id,name,category,count"
    assert inputs == [("input", ["batch", 448, 448, 3], FLOAT)]
    assert outputs == [("output", ["batch", len(tags) - 1], FLOAT)]
    assert [line.split(",")[1:3] for line in tags[1:5]] == [
        ["general", "9"], ["sensitive", "9"], ["questionable", "9"], ["explicit", "9"]]  # fmt: skip

    assert signature(tiny["tiny-identity"] / "model_feat.onnx")[:2] == (
        [("input", ["batch", 3, 384, 384], FLOAT)], [("output", ["batch", 768], FLOAT)])  # fmt: skip
    assert signature(tiny["tiny-identity"] / "model_metrics.onnx")[:2] == (
        [("input", ["batch", 768], FLOAT)], [("output", ["batch", "batch"], FLOAT)])  # fmt: skip
    assert 0 < json.loads((tiny["tiny-identity"] / "metrics.json").read_text())["threshold"] < 1

    for name, label in [("tiny-person", "person"), ("tiny-halfbody", "halfbody"), ("tiny-head", "head"),
                        ("tiny-face", "face")]:  # fmt: skip
        inputs, outputs, metadata = signature(tiny[name] / "model.onnx")
        assert inputs == [("images", ["batch", 3, 640, 640], FLOAT)]
        assert outputs == [("output0", ["batch", 5, 8400], FLOAT)]
        assert metadata["names"] == f"{{0: '{label}'}}" and metadata["task"] == "detect"
        assert metadata["imgsz"] == "[640, 640]" and metadata["stride"] == "32"

    for name, count in [("tiny-monochrome", 2), ("tiny-classification", 4), ("tiny-rating", 3),
                        ("tiny-aesthetic", 7)]:  # fmt: skip
        assert signature(tiny[name] / "model.onnx")[:2] == (
            [("input", ["batch", 3, 384, 384], FLOAT)], [("output", ["batch", count], FLOAT)])  # fmt: skip
        assert len(json.loads((tiny[name] / "meta.json").read_text())["labels"]) == count


def test_registry_builds_registered_models_and_uses_local_paths_as_they_are(tmp_path):
    # Only the real models are built in: the demo registers its tiny ones.
    with pytest.raises(ModelNotFoundError, match="registered models"):
        ModelRegistry(tmp_path / "models").resolve("tiny-head")
    registry = tiny_registry(tmp_path / "models", hf_cache_dir=tmp_path / "hf")
    folder = registry.resolve("tiny-head")
    assert folder == tmp_path / "models" / "built" / "tiny-head" and (folder / "model.onnx").is_file()
    assert registry.resolve(folder) == folder
    assert registry.resolve(str(folder / "model.onnx")) == folder / "model.onnx"
    assert registry.spec("tiny-head").defaults["conf_threshold"] == 0.4


def test_a_models_files_are_its_own_files_or_everything_at_a_path(tmp_path):
    registry = tiny_registry(tmp_path / "models", hf_cache_dir=tmp_path / "hf")
    built = registry.resolve("tiny-tagger")
    assert registry.files("tiny-tagger") == {
        "model.onnx": built / "model.onnx", "selected_tags.csv": built / "selected_tags.csv"
    }
    (built / "notes.txt").write_text("not part of the model")  # a registry model is its listed files
    assert set(registry.files("tiny-tagger")) == {"model.onnx", "selected_tags.csv"}
    assert set(registry.files(built)) == {"model.onnx", "selected_tags.csv", "notes.txt"}  # a path: all of it
    assert registry.files(str(built / "model.onnx")) == {"model.onnx": built / "model.onnx"}

    spec = ModelSpec("pinned", "someone/detector", ("v1/model.onnx",), kind="detector")
    registry = ModelRegistry(tmp_path / "models", specs=[spec], hf_cache_dir=tmp_path / "hf")
    target = tmp_path / "models" / "hub" / "someone" / "detector" / "v1" / "model.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    assert registry.files("pinned") == {"model.onnx": target}


def test_missing_real_model_names_places_and_fetch_command(tmp_path):
    registry = ModelRegistry(tmp_path / "models", hf_cache_dir=tmp_path / "hf")
    with pytest.raises(ModelNotFoundError) as raised:
        registry.resolve("ccip-caformer-24-randaug-pruned")
    message = str(raised.value)
    assert "ccip-caformer-24-randaug-pruned" in message
    assert str(tmp_path / "models" / "hub" / "deepghs" / "ccip_onnx") in message
    assert str(tmp_path / "hf") in message
    assert ("hf download deepghs/ccip_onnx ccip-caformer-24-randaug-pruned/model_feat.onnx "
            "ccip-caformer-24-randaug-pruned/model_metrics.onnx ccip-caformer-24-randaug-pruned/metrics.json "
            "--revision main") in message  # fmt: skip
    with pytest.raises(ModelNotFoundError, match="registered models"):
        registry.resolve("no-such-model")


def test_hub_files_placed_by_hand_are_found_and_sha256_checked(tmp_path):
    content = b"not really onnx"
    spec = ModelSpec("pinned", "someone/detector", ("v1/model.onnx",), kind="detector",
                     sha256={"v1/model.onnx": hashlib.sha256(content).hexdigest()})  # fmt: skip
    registry = ModelRegistry(tmp_path / "models", specs=[spec], hf_cache_dir=tmp_path / "hf")
    target = tmp_path / "models" / "hub" / "someone" / "detector" / "v1" / "model.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(content)
    assert registry.resolve("pinned") == target.parent

    target.write_bytes(b"tampered")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        registry.resolve("pinned")


def test_builtin_specs_are_data_with_one_folder_each():
    names = {spec.name for spec in BUILTIN_SPECS}
    assert {"wd-swinv2-tagger-v3", "ccip-caformer-24-randaug-pruned", "person_detect_v1.1_m",
            "monochrome_detect", "anime_aesthetic"} <= names  # fmt: skip
    with pytest.raises(ValueError, match="one folder"):
        ModelSpec("split", "a/b", ("x/model.onnx", "y/meta.json"), kind="classifier")
    with pytest.raises(ValueError, match="kind"):
        ModelSpec("odd", "a/b", ("model.onnx",), kind="segmenter")
    with pytest.raises(ValueError, match="either a repository or a build function"):
        ModelSpec("nowhere", None, ("model.onnx",), kind="detector")


def test_sessions_are_created_with_explicit_providers_and_cached(tiny, monkeypatch):
    created = []
    real_session = runtime.ort.InferenceSession

    def recording_session(path, sess_options=None, providers=None):
        created.append(providers)
        return real_session(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(runtime.ort, "InferenceSession", recording_session)
    monkeypatch.setattr(runtime, "_sessions", {})
    path = tiny["tiny-rating"] / "model.onnx"
    first = runtime.create_session(path, "cpu")
    assert runtime.create_session(path, "cpu") is first
    auto = runtime.create_session(path, "auto")
    assert created and all(providers for providers in created)  # never None / empty
    assert auto.get_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="providers"):
        runtime.create_session(path, "tpu")


def test_cuda_request_fails_clearly_without_cuda(tiny):
    if runtime.cuda_usable(tiny["tiny-rating"] / "model.onnx"):
        pytest.skip("CUDA is usable on this machine")
    with pytest.raises(RuntimeError, match="CUDA"):
        runtime.create_session(tiny["tiny-rating"] / "model.onnx", "cuda")


def test_run_batched_honours_a_fixed_batch_dimension(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "fixed",
        [onnx.helper.make_tensor_value_info("x", FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", FLOAT, [2, 3])],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, tmp_path / "fixed.onnx")
    session = runtime.create_session(tmp_path / "fixed.onnx", "cpu")
    batch = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.testing.assert_array_equal(runtime.run_batched(session, batch, batch_size=4), batch)
