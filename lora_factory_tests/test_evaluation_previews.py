"""evaluation.previews on the tiny SD1.5 pipeline, with a LoRA written by the trainer's kohya export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_factory.evaluation.previews import PreviewRenderer, render_previews
from lora_factory.evaluation.prompts import preview_prompts
from lora_factory.training.base_model import load_base_model
from lora_factory.training.kohya_format import peft_to_kohya_state_dict, save_kohya_lora
from lora_factory.training.module import add_lora_adapters
from lora_factory.training.tiny_sd import build_tiny_sd15

STEPS = 2
PROMPTS = preview_prompts("ash_ember_knights", ["red_hair"], [["navy_jacket", "beige_skirt"]])[:3]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model gains nothing from threads, and spinning OpenMP threads are slow on a
    # busy machine (tests run beside each other).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("base") / "tiny_sd15")


@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory) -> Path:
    """A kohya LoRA with the trainer's adapter layout and export, its zero-initialised up
    weights replaced by random ones so that it visibly changes the images."""
    base = load_base_model(tiny_model, device="cpu")
    adapter_parameters = add_lora_adapters(base.unet, base.text_encoder, rank=4, alpha=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    for parameter in adapter_parameters:
        if parameter.ndim >= 2 and parameter.abs().sum() == 0:  # the zero-initialised up weights
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    path = tmp_path_factory.mktemp("lora") / "ash_ember_knights-step100.safetensors"
    save_kohya_lora(path, peft_to_kohya_state_dict(base.unet, base.text_encoder, alpha=2), {})
    return path


@pytest.fixture(scope="module")
def renderer(tiny_model) -> PreviewRenderer:
    return PreviewRenderer(tiny_model, size=(64, 64), steps=STEPS, device="cpu")


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def test_same_seeds_give_identical_images(renderer):
    first, second = pixels(renderer.render(None, PROMPTS)), pixels(renderer.render(None, PROMPTS))
    assert all(image.shape == (64, 64, 3) for image in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], first[1])  # other prompt and seed, other image


def test_a_lora_changes_the_images_and_unloads_cleanly(renderer, lora_file):
    base = pixels(renderer.render(None, PROMPTS))
    with_lora = pixels(renderer.render(lora_file, PROMPTS))
    assert all(np.abs(a - b).mean() > 2.0 for a, b in zip(base, with_lora))
    assert all(np.array_equal(a, b) for a, b in zip(with_lora, pixels(renderer.render(lora_file, PROMPTS))))
    # Unloaded after rendering: the bare base model draws exactly what it drew before.
    assert all(np.array_equal(a, b) for a, b in zip(base, pixels(renderer.render(None, PROMPTS))))


def test_a_fused_lora_draws_what_its_unfused_layers_draw(renderer, lora_file):
    # `render` adds the LoRA into the weights for speed; run through peft's LoRA layers
    # instead, the images are the same up to float rounding (at a scale other than 1 too).
    renderer.lora_scale = 0.5
    try:
        fused = pixels(renderer.render(lora_file, PROMPTS))
        renderer._load_lora(lora_file)
        try:
            assert renderer._loaded_lora_layers() > 0
            unfused = pixels(renderer._render_all(PROMPTS))
        finally:
            renderer.pipeline.unload_lora_weights()
    finally:
        renderer.lora_scale = 1.0
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(fused, unfused))
    assert not np.array_equal(fused[0], pixels(renderer.render(lora_file, PROMPTS[:1]))[0])  # the scale counted


def test_lora_scale_zero_draws_the_base_model(renderer, lora_file):
    base = pixels(renderer.render(None, PROMPTS[:1]))
    renderer.lora_scale = 0.0
    try:
        scaled_off = pixels(renderer.render(lora_file, PROMPTS[:1]))
    finally:
        renderer.lora_scale = 1.0
    assert np.array_equal(base[0], scaled_off[0])


def test_a_lora_with_keys_the_model_lacks_is_refused(renderer, lora_file, tmp_path):
    tensors = load_file(str(lora_file))
    bad_module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    renamed = {key.replace(bad_module, bad_module + "_missing"): value for key, value in tensors.items()}
    save_file(renamed, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="LoRA modules loaded"):
        renderer.render(tmp_path / "bad.safetensors", PROMPTS[:1])
    with pytest.raises(FileNotFoundError):
        renderer.render(tmp_path / "absent.safetensors", PROMPTS[:1])
    # The renderer is still usable, back on the bare base model.
    assert renderer._loaded_lora_layers() == 0
    renderer.render(lora_file, PROMPTS[:1])


def test_render_previews_matches_the_renderer(tiny_model, lora_file, renderer):
    once = pixels(render_previews(tiny_model, lora_file, PROMPTS[:2], size=(64, 64), steps=STEPS, device="cpu"))
    held = pixels(renderer.render(lora_file, PROMPTS[:2]))
    assert all(np.array_equal(a, b) for a, b in zip(once, held))


def test_bad_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="multiples of 8"):
        PreviewRenderer(tiny_model, size=(60, 64))
    with pytest.raises(ValueError, match="steps"):
        PreviewRenderer(tiny_model, steps=0)
