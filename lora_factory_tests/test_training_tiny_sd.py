"""The tiny SD1.5-shaped base model and base-model loading."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lora_factory.training.base_model import (
    BaseModelError,
    encode_prompt,
    load_base_model,
    native_resolution,
    tokenize_captions,
)
from lora_factory.training.tiny_sd import BUILD_MARKER, build_tiny_sd15, byte_symbols

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


def test_build_is_deterministic_and_idempotent(tiny_sd, tmp_path):
    again = build_tiny_sd15(tmp_path / "again")
    for name in WEIGHT_FILES:
        assert (tiny_sd / name).read_bytes() == (again / name).read_bytes(), name
    other_seed = build_tiny_sd15(tmp_path / "other", seed=1)
    assert (other_seed / WEIGHT_FILES[0]).read_bytes() != (tiny_sd / WEIGHT_FILES[0]).read_bytes()

    before = {name: (tiny_sd / name).stat().st_mtime_ns for name in WEIGHT_FILES}
    assert build_tiny_sd15(tiny_sd) == tiny_sd
    assert {name: (tiny_sd / name).stat().st_mtime_ns for name in WEIGHT_FILES} == before
    assert json.loads((tiny_sd / BUILD_MARKER).read_text())["seed"] == 0


def test_concurrent_builds_agree(tiny_sd, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "shared"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: build_tiny_sd15(target), range(2)))
    assert results == [target, target]
    assert (target / WEIGHT_FILES[0]).read_bytes() == (tiny_sd / WEIGHT_FILES[0]).read_bytes()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a tiny SD1.5 build"):
        build_tiny_sd15(tmp_path / "busy")


def test_loads_as_an_sd15_pipeline_and_renders(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.safety_checker is None
    unet = pipeline.unet.config
    assert unet.down_block_types[0] == "CrossAttnDownBlock2D" and unet.up_block_types[-1] == "CrossAttnUpBlock2D"
    assert unet.in_channels == 4 and unet.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.vae_scale_factor == 8 and pipeline.vae.config.latent_channels == 4
    assert pipeline.text_encoder.config.num_hidden_layers >= 2
    assert pipeline.tokenizer.model_max_length == 77
    scheduler = pipeline.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert scheduler.num_train_timesteps == 1000

    image = pipeline("1girl, solo", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)  # the tiny model's native resolution
    assert native_resolution(tiny_sd) == 128


def test_tokenizer_is_byte_level_bpe_with_clip_specials(tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    vocab = tokenizer.get_vocab()
    assert len(byte_symbols()) == 256 and len(set(byte_symbols().values())) == 256
    ids = tokenize_captions(tokenizer, ["1girl, solo, long hair", "ünïcode ✓"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == vocab["<|startoftext|>"] and vocab["<|endoftext|>"] in ids[0].tolist()
    # The merges are used: "hair" becomes one token, not four letters.
    assert vocab["hair</w>"] in ids[0].tolist()
    # Any text round-trips through the byte alphabet.
    assert tokenizer.decode(ids[1], skip_special_tokens=True).strip() == "ünïcode ✓"


def test_load_base_model_freezes_weights_and_hashes_them(tiny_sd):
    base = load_base_model(tiny_sd, device="cpu")
    assert base.name == "tiny-sd15" and len(base.sha256) == 64
    for module in (base.unet, base.vae, base.text_encoder):
        assert not any(parameter.requires_grad for parameter in module.parameters())
        assert next(module.parameters()).dtype == torch.float32
    assert base.noise_scheduler.config.prediction_type == "epsilon"
    assert load_base_model(tiny_sd, device="cpu").sha256 == base.sha256


def test_encode_prompt_clip_skip_uses_earlier_layer_with_final_norm(tiny_sd):
    base = load_base_model(tiny_sd, device="cpu")
    captions = ["1girl, red hair"]
    with torch.no_grad():
        ids = tokenize_captions(base.tokenizer, captions)
        output = base.text_encoder(ids, output_hidden_states=True)
        skip1 = encode_prompt(base, captions, clip_skip=1)
        skip2 = encode_prompt(base, captions, clip_skip=2)
    torch.testing.assert_close(skip1, output.last_hidden_state)
    expected = base.text_encoder.final_layer_norm(output.hidden_states[-2])
    torch.testing.assert_close(skip2, expected)
    assert not torch.allclose(skip1, skip2)
    with pytest.raises(BaseModelError, match="clip_skip=9"):
        encode_prompt(base, captions, clip_skip=9)


def test_bad_base_model_sources_fail_clearly(tmp_path):
    with pytest.raises(BaseModelError, match="not found"):
        load_base_model(tmp_path / "missing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no model_index.json"):
        load_base_model(tmp_path / "empty", device="cpu")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(BaseModelError, match="pickled"):
        load_base_model(pickle, device="cpu")


def test_single_file_needs_an_offline_config(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import safetensors.torch

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    checkpoint = tmp_path / "anime.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(1)}, checkpoint)
    with pytest.raises(BaseModelError, match="config=<an SD1.5 diffusers folder>"):
        load_base_model(checkpoint, device="cpu")
    with pytest.raises(BaseModelError, match="not an SD1.5 diffusers folder"):
        load_base_model(checkpoint, device="cpu", config=tmp_path)


def _resnet_to_original(name: str) -> str:
    for diffusers_name, original in (
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ):
        if name.startswith(diffusers_name):
            return original + name[len(diffusers_name) :]
    return name


def _unet_to_original(state: dict, config: dict) -> dict:
    """Diffusers UNet keys -> the original SD (`model.diffusion_model.*`) layout."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    renames = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for level in range(levels):
        first = level * (per_level + 1)  # each level: its layers, then the down/upsampler slot
        for layer in range(per_level):
            renames[f"down_blocks.{level}.resnets.{layer}."] = f"input_blocks.{first + 1 + layer}.0."
            renames[f"down_blocks.{level}.attentions.{layer}."] = f"input_blocks.{first + 1 + layer}.1."
        renames[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{first + 1 + per_level}.0.op."
        for layer in range(per_level + 1):
            renames[f"up_blocks.{level}.resnets.{layer}."] = f"output_blocks.{first + layer}.0."
            renames[f"up_blocks.{level}.attentions.{layer}."] = f"output_blocks.{first + layer}.1."
        slot = 2 if any(key.startswith(f"up_blocks.{level}.attentions.") for key in state) else 1
        renames[f"up_blocks.{level}.upsamplers.0."] = f"output_blocks.{first + per_level}.{slot}."
    converted = {}
    for key, value in state.items():
        prefix = next(prefix for prefix in renames if key.startswith(prefix))
        rest = key[len(prefix) :]
        if ".resnets." in prefix:
            rest = _resnet_to_original(rest)
        converted["model.diffusion_model." + renames[prefix] + rest] = value
    return converted


def _vae_to_original(state: dict, config: dict) -> dict:
    """Diffusers AutoencoderKL keys -> the original SD (`first_stage_model.*`) layout."""
    levels = len(config["block_out_channels"])
    converted = {}
    for key, value in state.items():
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", name)
        name = re.sub(r"^(decoder\.up\.\d+\.)resnets\.", r"\1block.", name)
        name = re.sub(r"^(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample.", name)
        name = name.replace(".mid_block.resnets.0.", ".mid.block_1.")
        name = name.replace(".mid_block.resnets.1.", ".mid.block_2.")
        name = name.replace(".mid_block.attentions.0.", ".mid.attn_1.")
        name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in name:
            for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
                name = name.replace(f".attn_1.{new}.", f".attn_1.{old}.")
            name = name.replace(".attn_1.to_out.0.", ".attn_1.proj_out.")
            value = value[:, :, None, None] if value.ndim == 2 else value  # 1x1 convs in the original
        converted["first_stage_model." + name] = value
    return converted


def test_single_file_checkpoint_loads_offline_with_a_config_folder(tiny_sd, tmp_path):
    """The tiny model re-saved in the original single-file layout loads to the same weights."""
    import safetensors.torch

    def load(name):
        return safetensors.torch.load_file(tiny_sd / name)

    unet_config = json.loads((tiny_sd / "unet/config.json").read_text())
    vae_config = json.loads((tiny_sd / "vae/config.json").read_text())
    state = {
        **_unet_to_original(load(WEIGHT_FILES[0]), unet_config),
        **_vae_to_original(load(WEIGHT_FILES[1]), vae_config),
        **{
            "cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): value
            for key, value in load(WEIGHT_FILES[2]).items()
        },
    }
    checkpoint = tmp_path / "tiny-single.safetensors"
    safetensors.torch.save_file({key: value.contiguous() for key, value in state.items()}, checkpoint)

    single = load_base_model(checkpoint, device="cpu", config=tiny_sd)
    folder = load_base_model(tiny_sd, device="cpu")
    assert single.name == "tiny-single" and single.sha256 != folder.sha256
    for part in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert expected.keys() == loaded.keys()
        assert all(torch.equal(expected[key], loaded[key]) for key in expected), part
