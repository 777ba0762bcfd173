"""peft adapters -> kohya LoRA file: key names, real alpha, hashes, and diffusers equivalence."""

from __future__ import annotations

import hashlib
import re

import pytest
import safetensors.torch
import torch

from lora_factory.training.base_model import encode_prompt, load_base_model
from lora_factory.training.kohya_format import (
    kohya_metadata,
    kohya_model_hashes,
    kohya_module_name,
    peft_to_kohya_state_dict,
    read_kohya_lora,
    save_kohya_lora,
    tensor_data_sha256,
)
from lora_factory.training.module import add_lora_adapters
from lora_factory.training.tiny_sd import build_tiny_sd15

RANK, ALPHA = 4, 3.0  # alpha != rank: a converter that writes alpha = rank gets caught
TE_KEY = re.compile(
    r"lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)"
)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="module")
def trained_base(tiny_sd):
    """The tiny base with adapters whose up weights are non-zero, as after some training."""
    base = load_base_model(tiny_sd, device="cpu")
    parameters = add_lora_adapters(base.unet, base.text_encoder, RANK, ALPHA, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return base


def test_keys_follow_kohya_and_a1111_conventions(trained_base):
    tensors = peft_to_kohya_state_dict(trained_base.unet, trained_base.text_encoder, alpha=ALPHA)
    unet_modules = dict(trained_base.unet.named_modules())
    by_kohya_name = {"lora_unet_" + path.replace(".", "_"): path for path in unet_modules}

    unet_names = {kohya_module_name(key) for key in tensors if key.startswith("lora_unet_")}
    te_keys = [key for key in tensors if key.startswith("lora_te_")]
    assert unet_names and te_keys
    assert set(tensors) == {key for key in tensors if key.startswith(("lora_unet_", "lora_te_"))}
    for name in unet_names:
        path = by_kohya_name[name]  # every UNet key names a real module of the UNet
        assert path.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0", "proj_in", "proj_out", "proj", "2"}
        assert ".attentions." in path  # inside a Transformer2DModel, as kohya targets
    for key in te_keys:
        assert TE_KEY.fullmatch(key), key
    layers = trained_base.text_encoder.config.num_hidden_layers
    assert len(te_keys) == layers * 6 * 3

    for name in unet_names | {kohya_module_name(key) for key in te_keys}:
        assert tensors[f"{name}.alpha"].item() == ALPHA
        assert tensors[f"{name}.lora_down.weight"].shape[0] == RANK
        assert tensors[f"{name}.lora_up.weight"].shape[1] == RANK

    # SD1.5's proj_in is a 1x1 convolution: its LoRA weights keep conv shapes.
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert isinstance(unet_modules["down_blocks.0.attentions.0.proj_in"].base_layer, torch.nn.Conv2d)
    assert tensors[f"{proj_in}.lora_down.weight"].shape == (RANK, 32, 1, 1)
    assert tensors[f"{proj_in}.lora_up.weight"].shape == (32, RANK, 1, 1)


def test_alpha_mismatch_and_missing_adapters_are_refused(trained_base, tiny_sd):
    with pytest.raises(ValueError, match="differs from the expected 8"):
        peft_to_kohya_state_dict(trained_base.unet, None, alpha=8)
    plain = load_base_model(tiny_sd, device="cpu")
    with pytest.raises(ValueError, match="no adapter layers"):
        peft_to_kohya_state_dict(plain.unet, plain.text_encoder)


def _capture_loading_warnings(capfd) -> str:
    out, err = capfd.readouterr()
    return out + err


def test_diffusers_loads_the_file_and_reproduces_the_peft_model(trained_base, tiny_sd, tmp_path, capfd):
    from diffusers import StableDiffusionPipeline

    tensors = peft_to_kohya_state_dict(trained_base.unet, trained_base.text_encoder, alpha=ALPHA)
    metadata = kohya_metadata(
        output_name="test_char",
        trigger_word="test_char",
        network_dim=RANK,
        network_alpha=ALPHA,
        tag_frequency={"test_char": 1},
        dataset_dirs={"1_test_char": {"n_repeats": 1, "img_count": 1}},
        base_model_name="tiny-sd15",
        base_model_hash=trained_base.sha256,
        steps=10,
        epoch=1,
        seed=0,
        resolution=64,
        optimizer="adamw",
        learning_rate=1e-4,
        clip_skip=2,
    )
    lora_path = tmp_path / "test_char-000010.safetensors"
    save_kohya_lora(lora_path, tensors, metadata)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    timestep = torch.tensor([500])
    captions = ["test_char, red hair"]
    with torch.no_grad():
        expected_text = encode_prompt(trained_base, captions, clip_skip=2)
        expected_unet = trained_base.unet(sample, timestep, expected_text).sample

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    with torch.no_grad():
        base_text = encode_prompt(pipeline, captions, clip_skip=2)
    capfd.readouterr()
    pipeline.load_lora_weights(str(lora_path), adapter_name="test_char")
    loading_output = _capture_loading_warnings(capfd)
    assert not re.search(r"unexpected|missing|not loaded|incompatible", loading_output, re.IGNORECASE), loading_output

    # Every module of the file became a LoRA layer with the file's weights: nothing dropped.
    from peft.tuners.lora import LoraLayer

    loaded = {
        name: module
        for model in (pipeline.unet, pipeline.text_encoder)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert len(loaded) == len({kohya_module_name(key) for key in tensors})

    with torch.no_grad():
        loaded_text = encode_prompt(pipeline, captions, clip_skip=2)
        loaded_unet = pipeline.unet(sample, timestep, loaded_text).sample
    assert (base_text - expected_text).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(loaded_text, expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded_unet, expected_unet, atol=1e-5, rtol=1e-5)


def test_metadata_and_hashes(tmp_path):
    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(4, 300_000, generator=torch.Generator().manual_seed(0)),
        "lora_unet_a.lora_up.weight": torch.ones(8, 4),
        "lora_unet_a.alpha": torch.tensor(2.0),
    }
    metadata = kohya_metadata(
        output_name="surtr_arknights",
        trigger_word="surtr_(arknights)",
        network_dim=4,
        network_alpha=2,
        tag_frequency={"red_hair": 3},
        dataset_dirs={"2_surtr": {"n_repeats": 2, "img_count": 3}},
        base_model_name="nai",
        base_model_hash="ab" * 32,
        steps=100,
        epoch=4,
        seed=7,
        resolution=512,
        optimizer="adamw",
        learning_rate=1e-4,
        clip_skip=2,
    )
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_alpha"] == "2" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert "surtr_(arknights)" in metadata["ss_training_comment"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.trigger_phrase"] == "surtr_(arknights)"
    assert '"surtr_arknights": {"red_hair": 3}' in metadata["ss_tag_frequency"]

    path = tmp_path / "lora.safetensors"
    edited = {**metadata, "modelspec.description": "edited later"}
    file_sha = save_kohya_lora(path, tensors, edited)
    assert file_sha == hashlib.sha256(path.read_bytes()).hexdigest()
    _, stored = read_kohya_lora(path)
    assert stored["sshs_model_hash"] == tensor_data_sha256(path)
    # The legacy hash reads a 64 KiB window at 1 MiB of the file written with ss_* metadata only.
    training_only = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert len(training_only) > 0x110000
    assert stored["sshs_legacy_hash"] == hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8]
    # Descriptive metadata does not change the hashes.
    assert kohya_model_hashes(tensors, metadata) == (stored["sshs_model_hash"], stored["sshs_legacy_hash"])

    # The same LoRA is the same file, byte for byte (safetensors alone orders its header randomly).
    assert save_kohya_lora(tmp_path / "again.safetensors", tensors, edited) == file_sha

    with pytest.raises(TypeError, match="must be strings"):
        save_kohya_lora(tmp_path / "bad.safetensors", tensors, {"ss_steps": 3})
