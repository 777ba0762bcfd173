"""Exported LoRA / LoHa / LoKr files against the real SD1.5 architecture and LyCORIS' layout.

Full-size models are built on the meta device: the real layer names and shapes, no memory.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lora_factory.training.adapters import add_adapters
from lora_factory.training.base_model import encode_prompt, load_base_model
from lora_factory.training.kohya_format import (
    kohya_metadata,
    kohya_module_name,
    network_metadata,
    peft_to_kohya_state_dict,
    read_kohya_lora,
    save_kohya_lora,
)
from lora_factory.training.sd15_architecture import (
    build_clip_l_text_encoder,
    build_sd15_unet,
)
from lora_factory.training.tiny_sd import build_tiny_sd15

RANK, ALPHA = 4, 3.0  # alpha != rank: a converter that writes alpha = rank gets caught
LAYOUTS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}
LOKR_FACTOR_1 = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
LOKR_FACTOR_2 = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})


CONV_RANK, CONV_ALPHA = 8, 2.0


def kohya_target_modules(
    unet: torch.nn.Module, text_encoder: torch.nn.Module, conv: bool = False
) -> dict[str, torch.nn.Module]:
    """The modules kohya's networks.lora wraps for SD1.5, by kohya name, found independently:
    every Linear / 1x1 Conv2d inside a Transformer2DModel of the UNet, every Linear inside
    the text encoder's CLIPAttention / CLIPMLP blocks (A1111 names keep `text_model`); with
    `conv` (kohya's conv_dim), every Linear and Conv2d of the ResnetBlock2D, Downsample2D
    and Upsample2D blocks too."""
    found = {}
    unet_blocks = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    for owner, prefix, container_types in (
        (unet, "lora_unet_", unet_blocks),
        (text_encoder, "lora_te_text_model_", {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}),
    ):
        for path, module in owner.named_modules():
            if type(module).__name__ not in container_types:
                continue
            for child_path, child in module.named_modules():
                linear = isinstance(child, torch.nn.Linear)
                pointwise_conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                if linear or pointwise_conv or (conv and isinstance(child, torch.nn.Conv2d)):
                    found[prefix + f"{path}.{child_path}".replace(".", "_")] = child
    return found


@pytest.fixture(scope="module")
def full_size_targets():
    with torch.device("meta"):
        unet, text_encoder = build_sd15_unet(), build_clip_l_text_encoder()
    return kohya_target_modules(unet, text_encoder)


def _full_size_export(
    network_type: str, rank: int = 16, alpha: float = 8.0, conv_rank: int = 0, conv_alpha: float | None = None
) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        unet, text_encoder = build_sd15_unet(), build_clip_l_text_encoder()
        add_adapters(unet, text_encoder, network_type, rank, alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    return peft_to_kohya_state_dict(unet, text_encoder, alpha=alpha, conv_alpha=conv_alpha)


def _weight_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in x kernel) of a Linear or conv: the matrix every adapter kind factors."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]


@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr"])
def test_every_key_maps_onto_a_full_size_sd15_module(full_size_targets, network_type):
    tensors = _full_size_export(network_type)
    by_module: dict[str, set[str]] = {}
    for key in tensors:
        name, suffix = key.split(".", 1)
        by_module.setdefault(name, set()).add(suffix)
    # Exactly kohya's module set: 192 UNet modules (16 transformer blocks x 10 + 32
    # proj_in/out) and 72 text-encoder modules (12 layers x 6).
    assert set(by_module) == set(full_size_targets)
    assert len(by_module) == 16 * 10 + 16 * 2 + 12 * 6
    for name, suffixes in by_module.items():
        out_dim, in_dim = _weight_shape(full_size_targets[name])
        if network_type == "lora":
            assert suffixes == LAYOUTS["lora"], name
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            assert (down.shape[0], down.flatten(1).shape[1]) == (16, in_dim)
            assert (up.shape[0], up.flatten(1).shape[1]) == (out_dim, 16)
        elif network_type == "loha":
            assert suffixes == LAYOUTS["loha"], name
            for factor in ("w1", "w2"):
                assert tensors[f"{name}.hada_{factor}_a"].shape == (out_dim, 16)
                assert tensors[f"{name}.hada_{factor}_b"].shape == (16, in_dim)
        else:
            first = next(option for option in LOKR_FACTOR_1 if option <= suffixes)
            second = next(option for option in LOKR_FACTOR_2 if option <= suffixes)
            assert suffixes == first | second | {"alpha"}, name
            w1 = _kron_factor_shape(tensors, name, "w1")
            w2 = _kron_factor_shape(tensors, name, "w2")
            assert (w1[0] * w2[0], w1[1] * w2[1]) == (out_dim, in_dim), name


@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr"])
def test_a_conv_rank_adds_kohyas_resnet_and_sampler_modules(network_type):
    with torch.device("meta"):
        unet, text_encoder = build_sd15_unet(), build_clip_l_text_encoder()
    expected = kohya_target_modules(unet, text_encoder, conv=True)
    tensors = _full_size_export(network_type, 16, 8.0, CONV_RANK, CONV_ALPHA)
    names = {kohya_module_name(key) for key in tensors}
    assert names == set(expected)
    # 22 ResNet blocks (conv1, conv2, time_emb_proj), 14 shortcuts, 3 down- and 3 upsamplers.
    assert len(names) - (16 * 10 + 16 * 2 + 12 * 6) == 22 * 3 + 14 + 6
    for name in names:
        module = expected[name]
        three_by_three = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3)
        # (LoKr with two full Kronecker factors writes alpha = rank: its scale is in the weights.)
        if network_type != "lokr" or any(key.startswith(f"{name}.") and key.endswith("_b") for key in tensors):
            assert tensors[f"{name}.alpha"].item() == (CONV_ALPHA if three_by_three else 8.0), name
        if network_type == "lora" and three_by_three:
            # kohya's conv layout: a 3x3 down convolution, a 1x1 up convolution.
            assert tensors[f"{name}.lora_down.weight"].shape == (CONV_RANK, module.in_channels, 3, 3)
            assert tensors[f"{name}.lora_up.weight"].shape == (module.out_channels, CONV_RANK, 1, 1)
    module_name, args = network_metadata(network_type, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA)
    assert {key: args[key] for key in ("conv_dim", "conv_alpha")} == {"conv_dim": "8", "conv_alpha": "2"}


def _kron_factor_shape(tensors, name: str, factor: str) -> tuple[int, int]:
    if f"{name}.lokr_{factor}" in tensors:
        return tuple(tensors[f"{name}.lokr_{factor}"].flatten(1).shape)
    return tensors[f"{name}.lokr_{factor}_a"].shape[0], tensors[f"{name}.lokr_{factor}_b"].shape[1]


def test_unet_only_training_writes_no_text_encoder_keys():
    with torch.device("meta"):
        unet = build_sd15_unet()
        add_adapters(unet, None, "lora", 8, 4.0)
    tensors = peft_to_kohya_state_dict(unet, None, alpha=4.0)
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)


# --- LoHa / LoKr values: the file, applied the way LyCORIS, A1111 and ComfyUI apply it,
# --- reproduces the peft model that was trained.


def lycoris_delta(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """A module's weight update as the LyCORIS loaders rebuild it (written from their rules:
    scale = alpha / rank where the file has a rank factor, else 1)."""
    alpha = tensors[f"{name}.alpha"].item()
    if f"{name}.hada_w1_a" in tensors:
        w1 = tensors[f"{name}.hada_w1_a"] @ tensors[f"{name}.hada_w1_b"]
        w2 = tensors[f"{name}.hada_w2_a"] @ tensors[f"{name}.hada_w2_b"]
        return (w1 * w2 * alpha / tensors[f"{name}.hada_w1_b"].shape[0]).reshape(shape)
    factors, rank = [], None
    for factor in ("w1", "w2"):
        if f"{name}.lokr_{factor}" in tensors:
            factors.append(tensors[f"{name}.lokr_{factor}"])
        else:
            factors.append(tensors[f"{name}.lokr_{factor}_a"] @ tensors[f"{name}.lokr_{factor}_b"])
            rank = tensors[f"{name}.lokr_{factor}_b"].shape[0]
    scale = alpha / rank if rank is not None else 1.0
    if factors[1].ndim == 4:  # a full conv factor: the first one gets the 1x1 kernel too
        factors[0] = factors[0][:, :, None, None]
    return (torch.kron(factors[0], factors[1]) * scale).reshape(shape)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.mark.parametrize("network_type", ["loha", "lokr"])
def test_lycoris_files_reproduce_the_trained_model(tiny_sd, tmp_path, network_type):
    trained = load_base_model(tiny_sd, device="cpu")
    parameters = add_adapters(trained.unet, trained.text_encoder, network_type, RANK, ALPHA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as after some training: every factor non-zero
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    tensors = peft_to_kohya_state_dict(trained.unet, trained.text_encoder, alpha=ALPHA)
    module, args = network_metadata(network_type)
    metadata = kohya_metadata(
        output_name="tiny_char",
        trigger_word="tiny_char",
        network_dim=RANK,
        network_alpha=ALPHA,
        tag_frequency={"red_hair": 1},
        dataset_dirs={"1_tiny_char": {"n_repeats": 1, "img_count": 1}},
        base_model_name="tiny-sd15",
        base_model_hash=trained.sha256,
        steps=1,
        epoch=1,
        seed=0,
        resolution=128,
        optimizer="adamw",
        learning_rate=1e-4,
        clip_skip=2,
        network_module=module,
        network_args=args,
    )
    path = tmp_path / f"tiny_char_{network_type}.safetensors"
    save_kohya_lora(path, tensors, {key: str(value) for key, value in metadata.items()})
    stored, stored_metadata = read_kohya_lora(path)
    assert stored_metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(stored_metadata["ss_network_args"])["algo"] == network_type
    assert stored_metadata["ss_network_alpha"] == "3" and stored_metadata["ss_network_dim"] == "4"
    if network_type == "lokr":
        # The tiny model has both LoKr forms: factored (rank in the file, alpha = the real
        # alpha) and two full Kronecker factors (no rank: the scale is in the weights).
        factored = {kohya_module_name(key) for key in stored if key.endswith("_b")}
        names = {kohya_module_name(key) for key in stored}
        assert factored and names - factored
        assert {stored[f"{name}.alpha"].item() for name in factored} == {ALPHA}

    # Merge the file into a fresh base model the way the loaders do, and compare outputs.
    merged = load_base_model(tiny_sd, device="cpu")
    targets = {
        **{"lora_unet_" + path.replace(".", "_"): module for path, module in merged.unet.named_modules()},
        **{
            "lora_te_text_model_" + path.replace(".", "_"): module
            for path, module in merged.text_encoder.named_modules()
        },
    }
    with torch.no_grad():
        for name in {kohya_module_name(key) for key in stored}:
            weight = targets[name].weight
            weight += lycoris_delta({k: v.float() for k, v in stored.items()}, name, weight.shape)

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([500])
    with torch.no_grad():
        expected_text = encode_prompt(trained, ["tiny_char, red hair"])
        merged_text = encode_prompt(merged, ["tiny_char, red hair"])
        expected = trained.unet(sample, timestep, expected_text).sample
        reproduced = merged.unet(sample, timestep, merged_text).sample
        untouched = load_base_model(tiny_sd, device="cpu")
        base_output = untouched.unet(sample, timestep, encode_prompt(untouched, ["tiny_char, red hair"])).sample
    assert (expected - base_output).abs().max() > 1e-2  # the adapters do change the model
    # fp16 file weights: small differences only.
    torch.testing.assert_close(merged_text, expected_text, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(reproduced, expected, atol=2e-3, rtol=2e-3)


def test_lycoris_keys_follow_the_kohya_module_names(tiny_sd):
    base = load_base_model(tiny_sd, device="cpu")
    add_adapters(base.unet, base.text_encoder, "loha", RANK, ALPHA)
    keys = peft_to_kohya_state_dict(base.unet, base.text_encoder, alpha=ALPHA)
    pattern = re.compile(
        r"lora_(unet_[a-z0-9_]+|te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))"
        r"\.(hada_w[12]_[ab]|alpha)"
    )
    assert all(pattern.fullmatch(key) for key in keys), [key for key in keys if not pattern.fullmatch(key)]
